"""Quality over training seeds: train a preset once per seed, evaluate every export, report median / min / max.

Command::

    python -m lightning_distill.seeds --config configs/consistency/main.yaml --seeds 0 1 2 --jobs 2 \\
        --teacher-steps 50 --out runs/seeds/consistency_main [-- extra lightning-distill overrides]

For each seed ``S`` it runs (arguments after ``--`` are appended)::

    lightning-distill fit --config CONFIG --seed_everything S --model.init_args.seed S \\
        --trainer.default_root_dir OUT/seed_S ...

``seed_everything`` seeds the global RNGs (data order, noise of the non-adversarial methods); the method's
``seed`` seeds its own generators (the adversarial methods' per-iteration noise, validation and logged
grids), so both change with the seed. ``--jobs N`` trains N seeds at once, each process with one thread
(``OMP_NUM_THREADS=1``) and its output in ``OUT/seed_S/train.log``. Presets that build a shared cache on
first use (``data_distillation``'s teacher pairs) should be run with ``--jobs 1``, or have their cache built
once beforehand.

Every export (the folder ``PipelineExport`` writes, ``${trainer.default_root_dir}/student`` in the presets)
is then scored by :func:`lightning_distill.evaluate.evaluate_models` in one call, with the README's protocol
unless told otherwise: FD-digits, 2000 samples per cell, evaluation seed 0 (the same noise for every seed's
student), the digits train split as the reference. ``--eval-seeds 0 1 2`` repeats the evaluation with each
noise seed and averages every FD over them (a teacher's FD-digits at 2,000 samples moves by up to 2x between
noise seeds; ``benchmarks/results/eval_noise``). ``--skip-train`` only evaluates: it summarises runs
trained elsewhere, laid out as ``OUT/seed_S`` (a ``lightning-distill fit`` run folder with its export).
Text-to-image presets are scored from prompts as ``evaluate`` scores them: ``--prompts FILE|captions``,
``--guidance-scale`` (the teacher's) and ``--student-guidance`` (LCM students with a guidance input) are passed
through, and the protocol records the prompts' source, count and sha256 and the scales.
``--resume`` continues an interrupted runner in the same ``--out`` (a run longer than a session, a killed
machine): a seed whose export exists is not trained again, a seed with a ``last.ckpt`` continues from it
(``--ckpt_path``, the exact kill-and-resume of every method), the others train from the start.

Writes to ``--out``: ``results.md`` (median [min, max] per model and step count, the per-seed values and
the protocol), ``results.csv`` (the summary), ``per_seed.csv`` (every seed's value), ``fd_vs_steps.png``
(median line, min-max band), ``protocol.json``, and ``evaluate/`` (the evaluation's own report and sample
grids, one model per seed).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import yaml

SUMMARY_FIELDS = [
    "model", "kind", "steps", "num_seeds", "seeds", "fd_median", "fd_min", "fd_max", "kid_median", "kid_min", "kid_max",
    "num_samples", "eval_seed", "feature_net", "reference",
]
PER_SEED_FIELDS = ["model", "kind", "seed", "steps", "fd", "kid", "kid_std", "num_samples", "eval_seed", "feature_net",
                   "reference", "source"]
# Set by the runner for every seed; the same key among the overrides would make all seeds one run.
RESERVED = ("--trainer.default_root_dir", "--seed_everything", "--model.init_args.seed")
ROOT_DIR = "${trainer.default_root_dir}"


class TrainingFailed(RuntimeError):
    """A seed's ``lightning-distill fit`` exited with an error."""


@dataclass
class SeedRun:
    """One seed's training run: its folder, its export and the config it was trained with (if saved)."""

    seed: int
    run_dir: Path
    export: Path
    config: dict  # the run's saved (resolved) config.yaml, else the preset with the overrides applied
    saved_config: Path | None


# --- configs -------------------------------------------------------------------------------------


def _set(cfg: dict, dotted: str, value) -> None:
    node = cfg
    *parents, last = dotted.split(".")
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[last] = value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``--key value`` / ``--key=value`` command-line overrides as a nested dict (values parsed as YAML)."""
    cfg: dict = {}
    args = list(overrides)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg[2:], args[i + 1]
            i += 2
        else:
            i += 1
            continue
        _set(cfg, key, yaml.safe_load(value))
    return cfg


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_config(config: Path, overrides: Sequence[str] = ()) -> dict:
    """The preset's YAML with the command-line overrides set (no instantiation, no ``${...}`` resolution).

    Only what the runner reads from it (``data.*``, ``model.class_path``, the export callback) needs to be
    right; the training itself goes through the CLI, which resolves everything.
    """
    return _merge(yaml.safe_load(Path(config).read_text()) or {}, parse_overrides(overrides))


def saved_run_config(run_dir: Path) -> Path | None:
    """The newest ``config.yaml`` LightningCLI saved under ``run_dir`` (resolved: overrides and ``${...}`` applied)."""
    found = [p for p in Path(run_dir).glob("**/config.yaml") if "student" not in p.parts]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def callback_arg(cfg: dict, class_name: str, arg: str):
    """``init_args[arg]`` of the first ``trainer.callbacks`` entry whose class is ``class_name`` (None if absent)."""
    for cb in (cfg.get("trainer") or {}).get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).rsplit(".", 1)[-1] == class_name:
            return (cb.get("init_args") or {}).get(arg)
    return None


def export_dir(cfg: dict, run_dir: Path) -> Path:
    """Where ``PipelineExport`` writes the student of the run in ``run_dir``."""
    dirpath = callback_arg(cfg, "PipelineExport", "dirpath")
    if dirpath is None:
        raise ValueError("the config has no lightning_distill.callbacks.PipelineExport callback, so no student is exported")
    path = Path(str(dirpath).replace(ROOT_DIR, str(run_dir)))
    # A saved config holds resolved paths, possibly of another machine: re-root them at run_dir.
    root = (cfg.get("trainer") or {}).get("default_root_dir")
    if root and ROOT_DIR not in str(dirpath):
        try:
            return Path(run_dir) / path.relative_to(root)
        except ValueError:  # an export outside the run folder: taken as written
            pass
    return path


def model_accepts_seed(cfg: dict) -> bool:
    """Whether the config's model class takes a ``seed`` argument (True when the class cannot be imported:
    the CLI then names the problem itself)."""
    from .evaluate import _import_class

    class_path = (cfg.get("model") or {}).get("class_path")
    try:
        cls = _import_class(str(class_path))
    except ValueError:
        return True
    # A method may forward its parent's arguments through **kwargs: look along the class hierarchy.
    for klass in inspect.getmro(cls):
        params = inspect.signature(klass.__init__).parameters if "__init__" in vars(klass) else {}
        if "seed" in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and params:
            return False
    return False


def train_command(config: Path, seed: int | str, run_dir: Path, overrides: Sequence[str], seed_arg: bool = True) -> list[str]:
    """The ``lightning-distill fit`` arguments of one seed (without the program name)."""
    args = ["fit", "--config", str(config), "--seed_everything", str(seed)]
    if seed_arg:
        args += ["--model.init_args.seed", str(seed)]
    return args + ["--trainer.default_root_dir", str(run_dir), *overrides]


def check_overrides(overrides: Sequence[str]) -> None:
    for arg in overrides:
        if arg.split("=", 1)[0] in RESERVED:
            raise ValueError(f"override {arg!r} is set per seed by the runner; drop it (reserved: {', '.join(RESERVED)})")


# --- training ------------------------------------------------------------------------------------


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.is_file() else []
    return lines[-1] if lines else "no output"


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``last*.ckpt`` under ``run_dir`` (``ModelCheckpoint(save_last=True)``'s), or None."""
    found = [p for p in Path(run_dir).rglob("last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def earlier_output(preset: dict, run_dir: Path) -> list[Path]:
    """An earlier run's export and checkpoints in ``run_dir`` (empty when there are none)."""
    export = export_dir(preset, run_dir)
    found = [export] if (export / "model_index.json").is_file() else []
    return found + sorted(Path(run_dir).rglob("*.ckpt")) if Path(run_dir).is_dir() else found


def finished_export(preset: dict, run_dir: Path) -> Path | None:
    """The run's export if its training finished: written after the run's saved config (a fit that was killed
    leaves an export older than the config it saved at its start)."""
    export = export_dir(preset, run_dir)
    index = export / "model_index.json"
    if not index.is_file():
        return None
    saved = saved_run_config(run_dir)
    return export if saved is None or index.stat().st_mtime >= saved.stat().st_mtime else None


def train_seeds(
    config: Path, seeds: Sequence[int], out: Path, overrides: Sequence[str] = (), jobs: int = 1,
    log: Callable[[str], None] = print, resume: bool = False,
) -> dict[int, str]:
    """Train every seed with the CLI, ``jobs`` processes at a time; output to ``out/seed_S/train.log``.

    With ``resume``, a seed whose export already exists is left as it is, and a seed with a last checkpoint
    continues from it (its log appended to); the others train from the start.

    Returns:
        Per seed, what was done: ``"trained"``, ``"resumed from <last.ckpt>"`` or ``"kept (export exists)"``.

    Raises:
        TrainingFailed: a seed's training failed; names the seed, its exit status, the log's last line and the log.
    """
    preset = preset_config(config, overrides)
    seed_arg = model_accepts_seed(preset)
    env = dict(os.environ)
    if jobs > 1:  # N processes on N cores: one thread each, else they oversubscribe the CPU
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    if not resume:  # a fresh start never trains over (or later resumes from, or keeps) an earlier run's output
        earlier = {seed: found for seed in seeds if (found := earlier_output(preset, out / f"seed_{seed}"))}
        if earlier:
            listed = "; ".join(f"seed {s}: {', '.join(map(str, f))}" for s, f in earlier.items())
            raise FileExistsError(f"{out} holds earlier runs ({listed}): pass --resume to continue them, or choose "
                                  f"another --out (nothing was deleted)")

    def one(seed: int) -> tuple[int, int, Path, str]:
        run_dir = out / f"seed_{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "lightning_distill", *train_command(config, seed, run_dir, overrides, seed_arg)]
        done, mode = "trained", "w"
        if resume:
            if finished_export(preset, run_dir) is not None:
                log(f"seed {seed}: {export_dir(preset, run_dir)} exists, not trained again (--resume)")
                return seed, 0, run_dir / "train.log", "kept (export exists)"
            if (ckpt := last_checkpoint(run_dir)) is not None:
                cmd += ["--ckpt_path", str(ckpt)]
                done, mode = f"resumed from {ckpt}", "a"
        log(f"seed {seed}: {'training' if mode == 'w' else done} -> {run_dir} (log: {run_dir / 'train.log'})")
        with open(run_dir / "train.log", mode) as f:
            if mode == "a":
                f.write(f"\n--- resumed by the seeds runner: {shlex.join(cmd)}\n")
                f.flush()
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        log(f"seed {seed}: training {'done' if rc == 0 else f'failed (exit {rc})'}")
        return seed, rc, run_dir / "train.log", done

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(one, seeds))
    failed = [(s, rc, p) for s, rc, p, _ in results if rc != 0]
    if failed:
        s, rc, p = failed[0]
        more = f" ({len(failed) - 1} more seed(s) failed too)" if len(failed) > 1 else ""
        raise TrainingFailed(f"seed {s}: training exited with {rc}: {_last_line(p)} (log: {p}){more}")
    return {s: done for s, _, _, done in results}


def find_runs(config: Path, seeds: Sequence[int], out: Path, overrides: Sequence[str] = ()) -> list[SeedRun]:
    """Each seed's run folder ``out/seed_S``, its export and config; one clear error for the first problem."""
    preset = preset_config(config, overrides)
    runs = []
    for seed in seeds:
        run_dir = out / f"seed_{seed}"
        saved = saved_run_config(run_dir)
        cfg = yaml.safe_load(saved.read_text()) if saved else preset
        export = export_dir(cfg, run_dir)
        if not (export / "model_index.json").is_file():
            raise FileNotFoundError(
                f"seed {seed}: no exported student at {export} (no model_index.json); train it, or drop --skip-train"
            )
        if saved and cfg.get("seed_everything") not in (None, seed):
            raise ValueError(f"seed {seed}: {run_dir} was trained with seed_everything {cfg['seed_everything']} ({saved})")
        runs.append(SeedRun(seed, run_dir, export, cfg, saved))
    return runs


# --- summary (pure) ------------------------------------------------------------------------------


def _worst_last(v: float) -> tuple[bool, float]:
    return (math.isnan(v), 0.0 if math.isnan(v) else v)


def _median(ordered: list[float]) -> float:
    """``statistics.median`` of values sorted with NaN last (statistics.median itself sorts NaN arbitrarily)."""
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def summarise(per_seed: Sequence[dict]) -> list[dict]:
    """Median, min and max of FD and KID per (model, steps) over the rows' seeds, in first-seen order.

    A row's ``seed`` is its training seed (None for the teacher, which is the same model for every seed and
    is evaluated once). The median of an even count is the mean of the middle two (``statistics.median``).
    A NaN FD (a diverged seed) counts as the worst value: the median and max are taken with it sorted last,
    so they do not depend on the rows' order, and a majority of NaN seeds gives a NaN median.
    """
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in per_seed:
        groups.setdefault((r["model"], r["steps"]), []).append(r)
    out = []
    for (model, steps), rows in groups.items():
        fd = sorted((r["fd"] for r in rows), key=_worst_last)
        kid = sorted((r["kid"] for r in rows if r.get("kid") is not None), key=_worst_last)
        first = rows[0]
        out.append(dict(
            model=model, kind=first["kind"], steps=steps, num_seeds=len(rows),
            seeds=" ".join(str(r["seed"]) for r in rows if r["seed"] is not None),
            fd_median=_median(fd), fd_min=fd[0], fd_max=fd[-1],
            kid_median=_median(kid) if kid else None, kid_min=kid[0] if kid else None,
            kid_max=kid[-1] if kid else None,
            num_samples=first["num_samples"], eval_seed=first["eval_seed"], feature_net=first["feature_net"],
            reference=first["reference"],
        ))
    return out


def mean_over_eval_seeds(per_eval: Sequence[dict]) -> list[dict]:
    """One row per (model, training seed, steps): FD, KID and KID std averaged over the evaluation seeds, whose
    list becomes the row's ``eval_seed`` (e.g. ``"0 1 2"``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in per_eval:
        groups.setdefault((r["model"], r["seed"], r["steps"]), []).append(r)
    out = []
    for rows in groups.values():
        avg = {k: statistics.fmean(r[k] for r in rows) if all(r.get(k) is not None for r in rows) else None
               for k in ("fd", "kid", "kid_std")}
        out.append({**rows[0], **avg, "eval_seed": " ".join(str(r["eval_seed"]) for r in rows)})
    return out


def text_options(prompts, guidance_scale: float = 1.0, student_guidance: float | None = None) -> dict:
    """``evaluate_models``' text keywords from ``--prompts`` / ``--guidance-scale`` / ``--student-guidance``, checked
    before any training: a prompt file is read now (:func:`~lightning_distill.evaluate.resolve_prompts`; a wrong
    path fails before hours of training), ``captions`` is passed on (``evaluate`` reads the reference images'
    captions), a scale below 1 is refused. Empty without prompts or scales, so other runs call ``evaluate`` as before."""
    from .evaluate import resolve_prompts

    for flag, g in (("--guidance-scale", guidance_scale), ("--student-guidance", student_guidance)):
        if g is not None and not g >= 1:
            raise ValueError(f"{flag} must be >= 1 (the pipelines' convention, 1: no guidance), got {g}")
    if prompts is not None and not (isinstance(prompts, str) and prompts == "captions"):
        prompts = resolve_prompts(prompts, "digits")  # the data only matters for "captions", passed on as it is
    if prompts is None and guidance_scale == 1 and student_guidance is None:
        return {}
    return dict(prompts=prompts, guidance_scale=float(guidance_scale), student_guidance=student_guidance)


def evaluation_protocol(out_dir: Path, eval_seeds: Sequence[int]) -> dict:
    """What the evaluation's own ``protocol.json`` records beyond the rows (that of its first evaluation seed:
    every seed's evaluation uses the same settings): the noise ``chunk_size`` (each chunk has its own generator,
    so it changes the values), and for text-to-image evaluations the prompts (source, count, sha256) and guidance
    scales."""
    path = Path(out_dir) / (f"seed{eval_seeds[0]}" if len(eval_seeds) > 1 else "") / "protocol.json"
    protocol = json.loads(path.read_text()) if path.is_file() else {}
    keys = ("chunk_size",) + (("prompts", "guidance_scale", "student_guidance") if "prompts" in protocol else ())
    return {k: protocol.get(k) for k in keys if k in protocol}


def run_evaluation_data(data: dict) -> dict:
    """``evaluate_models``'s reference settings from a run's ``data`` config block: the images, size, channels
    and the train / val split it trained with (``split_seed``, ``val_fraction``: the reference is the train split,
    so another split is another reference; the run's own ``DistillationReport`` uses them too)."""
    return dict(data=data.get("data") or "digits", image_size=data.get("image_size"), channels=data.get("channels"),
                split_seed=int(data.get("split_seed") or 0), val_fraction=float(data.get("val_fraction") or 0.1))


def run_teacher(data: dict, source: str | os.PathLike | None = None):
    """The teacher as a run's ``data`` block loads it (revision, dtype, prediction type, T5 length, embedded
    guidance: :func:`~lightning_distill.data.load_run_teacher`, as the run's data module), from ``source`` if given."""
    from .data import load_run_teacher

    return load_run_teacher(data, source)


def evaluate_eval_seeds(eval_seeds: Sequence[int], out_dir: Path, teacher, **kwargs) -> list[dict]:
    """``evaluate_models`` once per evaluation seed, the teacher loaded once; its report in ``out_dir``, or in
    ``out_dir/seed<E>`` each when there are several seeds. The rows of all seeds, each with its ``seed``."""
    from .evaluate import evaluate_models
    from .teacher import load_teacher

    if isinstance(teacher, (str, os.PathLike)):
        teacher = load_teacher(teacher)
    rows: list[dict] = []
    for e in eval_seeds:
        rows += evaluate_models(teacher=teacher, seed=e, out_dir=Path(out_dir) / (f"seed{e}" if len(eval_seeds) > 1 else ""),
                                **kwargs)
    return rows


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else str(v))


def write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in fields})


def plot_spread(summary: Sequence[dict], path: Path, feat_name: str, num_samples: int) -> None:
    """FD against steps: the median over seeds as a line, min..max as a band (the teacher: one dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import style_fd_axes

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in summary):
        pts = sorted((r["steps"], r["fd_median"], r["fd_min"], r["fd_max"], r["num_seeds"]) for r in summary if r["model"] == model)
        teacher = next(r["kind"] for r in summary if r["model"] == model) == "teacher"
        x = [p[0] for p in pts]
        n = max(p[4] for p in pts)
        (line,) = ax.plot(x, [p[1] for p in pts], marker="o", ls="--" if teacher else "-",
                          label=model if teacher else f"{model} (median of {n} seeds, min-max band)")
        if not teacher:
            ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.25, lw=0)
    style_fd_axes(ax, feat_name, f"FD vs steps over training seeds, n={num_samples}", log_y=all(r["fd_min"] > 0 for r in summary))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, summary: Sequence[dict], per_seed: Sequence[dict], protocol: dict) -> None:
    """results.md / results.csv / per_seed.csv / fd_vs_steps.png / protocol.json in ``out``."""
    from .evaluate import TEACHER_SAMPLER, chunk_protocol_lines, text_protocol_lines

    write_csv(out / "results.csv", summary, SUMMARY_FIELDS)
    write_csv(out / "per_seed.csv", per_seed, PER_SEED_FIELDS)
    (out / "protocol.json").write_text(json.dumps(protocol, indent=2) + "\n")
    per_seed = mean_over_eval_seeds(per_seed)  # the tables: one value per training seed
    steps = sorted({r["steps"] for r in summary})
    head = "| " + " | ".join(f"{s} step{'s' if s > 1 else ''}" for s in steps) + " |"
    rule = "|---|" + "---|" * len(steps)
    lines = [
        f"# FD over training seeds: `{protocol['config']}`",
        "",
        "Median [min, max] of FD over the training seeds, per model and step count (the teacher does not depend "
        "on the training seed: one value).",
        "",
        "| model | seeds " + head, "|---" + rule,
    ]
    for model in dict.fromkeys(r["model"] for r in summary):
        cells = {r["steps"]: r for r in summary if r["model"] == model}
        any_row = next(iter(cells.values()))
        label = f"{model} ({any_row['kind']})"
        seeds = any_row["seeds"] or "-"
        lines.append(f"| {label} | {seeds} | " + " | ".join(
            (f"{c['fd_median']:.4g}" + (f" [{c['fd_min']:.4g}, {c['fd_max']:.4g}]" if c["num_seeds"] > 1 else ""))
            if (c := cells.get(s)) else "" for s in steps) + " |")
    several = len(protocol["eval_seeds"]) > 1
    lines += ["", "## Per training seed" + (" (mean over the evaluation seeds)" if several else ""), "",
              "| model | seed " + head, "|---" + rule]
    keys = dict.fromkeys((r["model"], r["seed"]) for r in per_seed)
    for model, seed in keys:
        cells = {r["steps"]: r["fd"] for r in per_seed if r["model"] == model and r["seed"] == seed}
        lines.append(f"| {model} | {'-' if seed is None else seed} | "
                     + " | ".join(f"{cells[s]:.4g}" if s in cells else "" for s in steps) + " |")
    overrides = " ".join(shlex.quote(a) for a in protocol["overrides"]) or "none"
    lines += [
        "",
        "## Protocol",
        "",
        f"- Config: `{protocol['config']}`; overrides: `{overrides}`",
        f"- Training seeds: {', '.join(map(str, protocol['seeds']))} "
        + ("(trained elsewhere; evaluated with `--skip-train`)" if protocol["skip_train"] else "(trained here"
           + "".join(f"; seed {k}: {v}" for k, v in protocol.get("training", {}).items() if v != "trained") + ")"),
        f"- Training command per seed: `{protocol['train_command']}`",
        f"- Feature network: **{protocol['feature_net']}** (\"FD-digits\" when it is the bundled digits classifier)",
        f"- Reference set: {protocol['reference']}",
        f"- Generated samples per cell: {protocol['num_samples']}, evaluation seed{'s' if len(protocol['eval_seeds']) > 1 else ''} "
        f"{' '.join(map(str, protocol['eval_seeds']))} (the same noise for every seed's student and the teacher"
        + ("; a training seed's FD is its mean over them)" if len(protocol["eval_seeds"]) > 1 else ")"),
        *chunk_protocol_lines(protocol),
        f"- Students: their exported pipeline's scheduler; teacher: {TEACHER_SAMPLER}",
        *text_protocol_lines(protocol),
        "- Median of an even number of seeds: the mean of the middle two",
        f"- Summary command: `{protocol['command']}`",
        "",
        "Exports:",
        "",
        *[f"- seed {s}: `{p}`" for s, p in protocol["exports"].items()],
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    plot_spread(summary, out / "fd_vs_steps.png", protocol["feature_net"], protocol["num_samples"])


# --- the runner ----------------------------------------------------------------------------------


def default_out(config: Path) -> Path:
    parts = Path(config).with_suffix("").parts
    tail = parts[parts.index("configs") + 1:] if "configs" in parts else parts[-2:]
    return Path("runs") / "seeds" / "_".join(tail)


def run_seeds(
    config: str | os.PathLike,
    seeds: Sequence[int],
    out: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    jobs: int = 1,
    skip_train: bool = False,
    steps: Sequence[int] = (1, 2, 4, 8),
    teacher_steps: Sequence[int] = (),
    num_samples: int = 2000,
    eval_seeds: Sequence[int] = (0,),
    feature_net: str = "digits",
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    name: str | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    resume: bool = False,
    prompts: str | os.PathLike | Sequence[str] | None = None,
    guidance_scale: float = 1.0,
    student_guidance: float | None = None,
) -> list[dict]:
    """Train (unless ``skip_train``) and evaluate ``config`` once per seed; write the report; return the summary.

    Args:
        config: the preset YAML.
        seeds: training seeds (distinct).
        out: report folder, holding one run folder ``seed_S`` per seed (default ``runs/seeds/<method>_<preset>``).
        overrides: extra ``lightning-distill fit`` arguments, the same for every seed.
        jobs: seeds trained at once (one thread per process when above 1).
        skip_train: evaluate the exports already in ``out/seed_S``.
        steps, teacher_steps: student / teacher DDIM step counts (no teacher rows when ``teacher_steps`` is empty).
        num_samples, feature_net, cache_dir, device: the evaluation's (see ``evaluate_models``).
        eval_seeds: evaluation noise seeds; with several, one evaluation each and every FD averaged over them
            (``per_seed.csv`` keeps each evaluation's row).
        name: the students' name in the tables (default: the config's ``method/preset``).
        command: the command line recorded in the protocol.
        resume: continue an interrupted runner in ``out`` (:func:`train_seeds`); not with ``skip_train``.
        prompts, guidance_scale, student_guidance: text-to-image presets: ``evaluate``'s (a prompt file,
            ``"captions"`` or the list; the teacher's classifier-free guidance; the g of LCM students with a guidance
            input), recorded in the protocol.

    Returns:
        The summary rows (``SUMMARY_FIELDS``), one per model and step count.

    Example::

        >>> rows = run_seeds("configs/consistency/main.yaml", [0, 1, 2], jobs=2, teacher_steps=[50])
        >>> [(r["steps"], r["fd_median"], r["fd_min"], r["fd_max"]) for r in rows if r["kind"] != "teacher"]
    """

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"config {str(config)!r} not found")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct training seeds, got {seeds}")
    check_overrides(overrides)
    eval_seeds = [int(e) for e in eval_seeds]
    if not eval_seeds or len(set(eval_seeds)) != len(eval_seeds):
        raise ValueError(f"--eval-seeds must be distinct noise seeds, got {eval_seeds}")
    if resume and skip_train:
        raise ValueError("--resume continues training and --skip-train trains nothing: give one of them")
    text = text_options(prompts, guidance_scale, student_guidance)
    out = Path(out) if out is not None else default_out(config)
    name = name or "/".join(config.with_suffix("").parts[-2:])
    out.mkdir(parents=True, exist_ok=True)
    training = {} if skip_train else train_seeds(config, seeds, out, overrides, jobs, log, resume)
    runs = find_runs(config, seeds, out, overrides)

    # the run's own data settings, except those given again on this command line (a teacher moved since)
    given = parse_overrides(overrides).get("data") or {}
    data = _merge(runs[0].config.get("data") or {}, given)
    teacher = data.get("teacher")
    trained_from = {r.seed: (r.config.get("data") or {}).get("teacher") for r in runs}
    if "teacher" not in given and len(set(map(str, trained_from.values()))) > 1:
        # e.g. a chained job whose teacher is each seed's own earlier export: no one teacher to score against
        raise ValueError(
            "the seeds were trained from different teachers (" + ", ".join(f"seed {s}: {t}" for s, t in trained_from.items())
            + "); name the teacher of the comparison after --, e.g. -- --data.teacher bundled:digits"
        )
    students = {f"seed_{r.seed}": r.export for r in runs}
    rows = evaluate_eval_seeds(
        eval_seeds, out / "evaluate", run_teacher(data), students=students, steps=steps, teacher_steps=teacher_steps,
        num_samples=num_samples, feature_net=feature_net, **run_evaluation_data(data), cache_dir=cache_dir,
        device=device, log=log, **text,
    )
    by_name = {f"seed_{r.seed}": r for r in runs}
    per_seed = []
    for row in rows:
        if row["kind"] == "data":  # the held-out real baseline: in evaluate/results.md, not a model
            continue
        run = by_name.get(row["model"])
        per_seed.append(dict(
            model=name if run else row["model"], kind=row["kind"], seed=run.seed if run else None, steps=row["steps"],
            fd=row["fd"], kid=row["kid"], kid_std=row["kid_std"], num_samples=row["num_samples"], eval_seed=row["seed"],
            feature_net=row["feature_net"], reference=row["reference"], source=str(run.export) if run else str(teacher),
        ))
    # teacher rows first in evaluate's output; the seeds' student first in the tables
    per_seed.sort(key=lambda r: r["kind"] == "teacher")
    summary = summarise(mean_over_eval_seeds(per_seed))
    first = per_seed[0]
    protocol = dict(
        config=str(config), overrides=list(overrides), seeds=seeds, skip_train=skip_train,
        training={str(k): v for k, v in training.items()},
        train_command="lightning-distill " + " ".join(shlex.quote(a) for a in train_command(
            config, "S", out / "seed_S", overrides, model_accepts_seed(preset_config(config, overrides)))),
        num_samples=first["num_samples"], eval_seeds=eval_seeds, feature_net=first["feature_net"],
        reference=first["reference"], steps=list(steps), teacher_steps=list(teacher_steps), teacher=str(teacher),
        exports={str(r.seed): str(r.export) for r in runs},
        saved_configs={str(r.seed): str(r.saved_config) if r.saved_config else None for r in runs},
        command=command or f"python -m lightning_distill.seeds --config {config} --seeds {' '.join(map(str, seeds))}",
        **evaluation_protocol(out / "evaluate", eval_seeds),
    )
    write_report(out, summary, per_seed, protocol)
    log(f"report: {out / 'results.md'}")
    return summary


# --- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightning_distill.seeds", description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- are passed to every `lightning-distill fit` run.",
    )
    p.add_argument("--config", required=True, help="preset YAML, e.g. configs/consistency/main.yaml")
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="training seeds, e.g. 0 1 2")
    p.add_argument("--out", default=None, help="report folder with one run folder seed_S per seed "
                   "(default runs/seeds/<method>_<preset>)")
    p.add_argument("--jobs", type=int, default=1, help="seeds trained at once, one thread each when above 1")
    p.add_argument("--skip-train", action="store_true", help="only evaluate the exports already in OUT/seed_S")
    p.add_argument("--resume", action="store_true", help="continue an interrupted runner in OUT: keep the seeds "
                   "with an export, continue those with a last.ckpt, train the others")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="student step counts")
    p.add_argument("--teacher-steps", type=int, nargs="*", default=[], help="teacher DDIM step counts (e.g. 50)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--eval-seeds", "--eval-seed", dest="eval_seeds", type=int, nargs="+", default=[0],
                   help="noise seeds of the evaluation (the same for every model); with several, FD is averaged over them")
    p.add_argument("--feature-net", default="digits", help="digits, inception, or a saved classifier folder")
    p.add_argument("--cache-dir", default=None, help="reference-statistics cache")
    p.add_argument("--device", default=None)
    p.add_argument("--name", default=None, help="the students' name in the tables (default: method/preset)")
    from .evaluate import add_text_arguments

    add_text_arguments(p)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, overrides = argv[:split], argv[split + 1:]
    a = build_parser().parse_args(own)
    if a.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {a.jobs}")
    summary = run_seeds(
        a.config, a.seeds, a.out, overrides, a.jobs, a.skip_train, a.steps, a.teacher_steps, a.num_samples,
        a.eval_seeds, a.feature_net, a.cache_dir, a.device, a.name, resume=a.resume, prompts=a.prompts,
        guidance_scale=a.guidance_scale, student_guidance=a.student_guidance,
        command="python -m lightning_distill.seeds " + " ".join(shlex.quote(x) for x in argv),
    )
    out = Path(a.out) if a.out else default_out(Path(a.config))
    print((out / "results.md").read_text())
    return summary


def _entry() -> None:
    """``python -m lightning_distill.seeds``: bad input and failed runs end in one line naming the problem."""
    from .cli import one_line_errors

    with one_line_errors("seeds", (ValueError, FileNotFoundError, TrainingFailed)):
        main()


if __name__ == "__main__":
    _entry()
