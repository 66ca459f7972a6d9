"""Which method for 1, 2 and 4 steps: several methods' seeds scored with the same evaluation noise, median [min, max] each.

Command::

    python -m lightning_distill.compare --run cd=runs/seeds/consistency_digits_flow \\
        --run scd=runs/seeds/scm_digits_flow --run meanflow=runs/seeds/meanflow_digits_flow \\
        --steps 1 2 4 --teacher-steps 50 --out benchmarks/results/compare_digits_flow

Each ``--run NAME=DIR`` is a report folder of :mod:`lightning_distill.seeds` (its ``protocol.json`` lists one
export per training seed) or one exported pipeline folder (a single run, reported as such). Every export of
every method goes into one :func:`~lightning_distill.evaluate.evaluate_models` call per evaluation seed: the same noise,
reference statistics and feature network for all of them, so the methods differ only by their students. The
seeds reports must name the same teacher (``--teacher`` overrides it, and is needed when no seeds report is
given); the data settings are the first seeds run's saved config (``--data`` / ``--image-size`` override them).
Text-to-image students are scored from ``--prompts FILE|captions`` with ``--guidance-scale`` (the teacher's) and
``--student-guidance`` (LCM students with a guidance input), passed through to ``evaluate``; the protocol records
the prompts' source, count and sha256 and the scales.

With several ``--eval-seeds`` the evaluation is repeated with each noise seed. A training seed's FD is then the
mean over the evaluation seeds, and each ratio to the teacher is given with the range of the ratios each
evaluation seed gives alone (which need not contain the averaged ratio): the teacher's 50-step FD-digits at
2,000 samples moves by up to 2x between noise seeds (``benchmarks/results/eval_noise``), so a ratio from one
evaluation seed is a draw, not a property of the method.

Writes to ``--out``: ``results.md`` (median [min, max] over seeds per method and step count, each median's
ratio to the teacher's FD at its largest step count, the best median per step count in bold; per-seed values;
per-evaluation-seed medians; the protocol), ``results.csv``, ``per_seed.csv`` (one row per evaluation seed),
``fd_vs_steps.png`` (median lines, min-max bands), ``protocol.json`` and ``evaluate/`` (the evaluation's own
report and sample grids; ``evaluate/seed<E>/`` per evaluation seed when there are several).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import yaml

from .seeds import (
    PER_SEED_FIELDS, SUMMARY_FIELDS, evaluate_eval_seeds, evaluation_protocol,
    mean_over_eval_seeds, plot_spread, run_evaluation_data, run_teacher, summarise, text_options, write_csv,
)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
COMPARE_FIELDS = [*SUMMARY_FIELDS[:8], "ratio_to_teacher", "ratio_eval_min", "ratio_eval_max", *SUMMARY_FIELDS[8:]]


@dataclass
class MethodRuns:
    """One ``--run``: the method's name, its exports by training seed (None: a single run) and where they came from."""

    name: str
    source: Path
    exports: dict[int | None, Path]
    teacher: str | None = None
    data: dict = field(default_factory=dict)
    config: str | None = None


def parse_run(spec: str) -> tuple[str, Path]:
    """``NAME=DIR`` -> (NAME, DIR); NAME becomes part of file names, so it is a plain word."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise ValueError(f"--run {spec!r}: expected NAME=DIR (a seeds report folder or an exported pipeline folder)")
    if not NAME.match(name):
        raise ValueError(f"--run {spec!r}: NAME must be letters, digits and _ . + - (it names files), got {name!r}")
    return name, Path(path)


def load_runs(name: str, source: Path) -> MethodRuns:
    """The exports behind one ``--run``: a seeds report's ``protocol.json``, or a single pipeline folder."""
    if (source / "model_index.json").is_file():
        return MethodRuns(name, source, {None: source})
    protocol_path = source / "protocol.json"
    if not protocol_path.is_file():
        raise FileNotFoundError(
            f"--run {name}={source}: neither a seeds report (no protocol.json) nor an exported pipeline (no model_index.json)"
        )
    protocol = json.loads(protocol_path.read_text())
    exports = {int(s): Path(p) for s, p in (protocol.get("exports") or {}).items()}
    if not exports:
        raise ValueError(f"--run {name}={source}: {protocol_path} lists no exports")
    for seed, path in exports.items():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"--run {name}={source}: seed {seed}'s export {path} is missing (no model_index.json)")
    data: dict = {}
    saved = next((Path(p) for p in (protocol.get("saved_configs") or {}).values() if p and Path(p).is_file()), None)
    if saved is not None:
        data = (yaml.safe_load(saved.read_text()) or {}).get("data") or {}
    return MethodRuns(name, source, exports, protocol.get("teacher"), data, protocol.get("config"))


def parse_run_steps(specs: Sequence[str]) -> dict[str, list[int]]:
    """``NAME=S[,S...]`` each -> {NAME: steps}: runs' own step counts (e.g. ``dmd2=1`` for a 1-step generator)."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            steps = [int(v) for v in value.split(",")] if sep else []
        except ValueError:
            steps = []
        if not steps:
            raise ValueError(f"--run-steps {spec!r}: expected NAME=S[,S...] with positive step counts, e.g. {name}=1")
        if name in out:
            raise ValueError(f"--run-steps {spec!r}: {name!r} is given twice")
        out[name] = steps
    return out


def check_run_steps(run_steps: dict[str, Sequence[int]], names: Sequence[str]) -> None:
    for name, steps in run_steps.items():
        if name not in names:
            raise ValueError(f"--run-steps {name}=...: {name!r} is not a --run name (runs: {', '.join(names)})")
        if not steps or min(steps) < 1:
            raise ValueError(f"--run-steps {name}={','.join(map(str, steps))}: step counts must be positive")


def common_teacher(methods: Sequence[MethodRuns], teacher: str | None) -> str:
    """The teacher every seeds report names; a clear error when they differ or none is known."""
    if teacher is not None:
        return teacher
    named = {m.name: m.teacher for m in methods if m.teacher is not None}
    if not named:
        raise ValueError("no seeds report names a teacher (only pipeline folders were given): pass --teacher")
    if len(set(named.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in named.items())
        raise ValueError(f"the runs distil different teachers ({listed}); compare runs of one teacher, or pass --teacher")
    return next(iter(named.values()))


def student_key(name: str, seed: int | None) -> str:
    return name if seed is None else f"{name}_seed{seed}"


def add_ratios(summary: list[dict]) -> float | None:
    """Set each row's ``ratio_to_teacher`` (median FD / the teacher's FD at its largest step count); return that FD."""
    teacher = [r for r in summary if r["kind"] == "teacher"]
    ref = max(teacher, key=lambda r: r["steps"])["fd_median"] if teacher else None
    for r in summary:
        r["ratio_to_teacher"] = r["fd_median"] / ref if ref else None
    return ref


def per_eval_seed_summaries(per_eval: Sequence[dict]) -> dict[int, list[dict]]:
    """Each evaluation seed's own summary (median over training seeds, ratio to that seed's teacher FD)."""
    out = {}
    for e in dict.fromkeys(r["eval_seed"] for r in per_eval):
        out[e] = summarise([r for r in per_eval if r["eval_seed"] == e])
        add_ratios(out[e])
    return out


def add_eval_ranges(summary: list[dict], by_seed: dict[int, list[dict]]) -> None:
    """Set each summary row's ``ratio_eval_min`` / ``ratio_eval_max``: its ratio's range over the evaluation seeds."""
    for r in summary:
        ratios = [x["ratio_to_teacher"] for rows in by_seed.values() for x in rows
                  if x["model"] == r["model"] and x["steps"] == r["steps"] and x["ratio_to_teacher"] is not None
                  and not math.isnan(x["ratio_to_teacher"])]  # a diverged seed's NaN: min / max would depend on order
        r["ratio_eval_min"], r["ratio_eval_max"] = (min(ratios), max(ratios)) if ratios else (None, None)


def markdown(summary: Sequence[dict], per_seed: Sequence[dict], protocol: dict,
             by_eval_seed: dict[int, list[dict]] | None = None) -> str:
    """results.md: the comparison table (best median per step count in bold), per-seed values, each evaluation
    seed's medians (when there are several), protocol."""
    from .evaluate import TEACHER_SAMPLER, chunk_protocol_lines, text_protocol_lines

    steps = sorted({r["steps"] for r in summary})
    students = [r for r in summary if r["kind"] != "teacher"]
    best = {s: min((r["fd_median"] for r in students if r["steps"] == s and not math.isnan(r["fd_median"])), default=None)
            for s in steps}  # a diverged (NaN) median is never best, wherever it is listed
    teacher = [r for r in summary if r["kind"] == "teacher"]
    ref = max(teacher, key=lambda r: r["steps"]) if teacher else None
    head = " | ".join(f"{s} step{'s' if s > 1 else ''}" for s in steps)
    eval_seeds = protocol["eval_seeds"]
    several = len(eval_seeds) > 1
    lines = [
        "# Methods compared on the same evaluation noise",
        "",
        (f"A training seed's FD is its mean over the evaluation seeds {' '.join(map(str, eval_seeds))}. " if several else "")
        + "FD median [min, max] over each method's training seeds"
        + (f"; in brackets after it, the median's ratio to the teacher's {ref['steps']}-step FD ({ref['fd_median']:.4g})"
           + ("; after the semicolon, the range of the ratios the evaluation seeds give alone (each seed's median over "
              "training seeds against the teacher's FD with the same noise; it need not contain the averaged ratio)"
              if several else "")
           if ref else "")
        + ". Bold: the best student median at that step count.",
        "",
        f"| method | seeds | {head} |",
        "|---|---|" + "---|" * len(steps),
    ]
    for model in dict.fromkeys(r["model"] for r in summary):
        cells = {r["steps"]: r for r in summary if r["model"] == model}
        first = next(iter(cells.values()))
        seeds = first["seeds"] or ("-" if first["kind"] == "teacher" else "1 run")

        def cell(c: dict | None) -> str:
            if c is None:
                return ""
            med = f"{c['fd_median']:.4g}"
            if c["kind"] != "teacher" and c["fd_median"] == best[c["steps"]]:
                med = f"**{med}**"
            spread = f" [{c['fd_min']:.4g}, {c['fd_max']:.4g}]" if c["num_seeds"] > 1 else ""
            ratio = ""
            if c.get("ratio_to_teacher") is not None:
                span = (f"; {c['ratio_eval_min']:.2f}-{c['ratio_eval_max']:.2f}x"
                        if several and c["kind"] != "teacher" and c.get("ratio_eval_min") is not None else "")
                ratio = f" ({c['ratio_to_teacher']:.2f}x{span})"
            return med + spread + ratio

        lines.append(f"| {model} | {seeds} | " + " | ".join(cell(cells.get(s)) for s in steps) + " |")
    lines += ["", "## Per training seed" + (" (mean over the evaluation seeds)" if several else ""), "",
              f"| method | seed | {head} |", "|---|---|" + "---|" * len(steps)]
    for model, seed in dict.fromkeys((r["model"], r["seed"]) for r in per_seed):
        cells = {r["steps"]: r["fd"] for r in per_seed if r["model"] == model and r["seed"] == seed}
        lines.append(f"| {model} | {'-' if seed is None else seed} | "
                     + " | ".join(f"{cells[s]:.4g}" if s in cells else "" for s in steps) + " |")
    if several and by_eval_seed:
        lines += ["", "## Per evaluation seed", "",
                  "Median over training seeds with each evaluation seed alone (the teacher: its FD), and its ratio to "
                  "the teacher's FD with that noise.", "",
                  f"| method | eval seed | {head} |", "|---|---|" + "---|" * len(steps)]
        for model in dict.fromkeys(r["model"] for r in summary):
            for e, rows in by_eval_seed.items():
                cells = {r["steps"]: r for r in rows if r["model"] == model}
                lines.append(f"| {model} | {e} | " + " | ".join(
                    f"{cells[s]['fd_median']:.4g}" + (f" ({cells[s]['ratio_to_teacher']:.2f}x)"
                                                      if cells[s]["ratio_to_teacher"] is not None else "")
                    if s in cells else "" for s in steps) + " |")
    lines += [
        "",
        "## Protocol",
        "",
        f"- Teacher: `{protocol['teacher']}`, sampled with {TEACHER_SAMPLER}; students: their exported pipeline's scheduler",
        f"- Feature network: **{protocol['feature_net']}** (\"FD-digits\" when it is the bundled digits classifier)",
        f"- Reference set: {protocol['reference']}",
        f"- Generated samples per cell: {protocol['num_samples']}, evaluation seed{'s' if several else ''} "
        f"{' '.join(map(str, eval_seeds))} (the same noise for every model"
        + ("; one evaluate run per seed)" if several else ", one evaluate run)"),
        *chunk_protocol_lines(protocol),
        *text_protocol_lines(protocol),
        "- Median of an even number of seeds: the mean of the middle two",
        f"- Command: `{protocol['command']}`",
        "",
        "Runs:",
        "",
        *[f"- {name}: `{r['source']}`" + (f" (config `{r['config']}`)" if r.get("config") else "")
          + (f"; scored at {', '.join(map(str, protocol['run_steps'][name]))} step(s) only"
             if name in protocol.get("run_steps", {}) else "")
          for name, r in protocol["runs"].items()],
        "",
    ]
    return "\n".join(lines)


def compare_methods(
    runs: Sequence[tuple[str, str | os.PathLike]],
    out: str | os.PathLike,
    teacher: str | None = None,
    steps: Sequence[int] = (1, 2, 4),
    teacher_steps: Sequence[int] = (50,),
    num_samples: int = 2000,
    eval_seeds: Sequence[int] = (0,),
    feature_net: str = "digits",
    data: str | None = None,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    run_steps: dict[str, Sequence[int]] | None = None,
    prompts: str | os.PathLike | Sequence[str] | None = None,
    guidance_scale: float = 1.0,
    student_guidance: float | None = None,
) -> list[dict]:
    """Score every seed of every method in one evaluate run per evaluation seed; write the report to ``out``;
    return the summary.

    Args:
        runs: (name, folder) pairs: seeds report folders or exported pipeline folders, names distinct.
        teacher: overrides the teacher the seeds reports name (needed when every run is a pipeline folder).
        steps, teacher_steps, num_samples, feature_net, cache_dir, device: the evaluation's.
        eval_seeds: evaluation noise seeds; with several, one evaluate run each, FD averaged over them.
        run_steps: step counts of the runs named, instead of ``steps`` (a 1-step generator: ``{"dmd2": [1]}``).
        data, image_size: override the data settings read from the first seeds run's saved config.
        prompts, guidance_scale, student_guidance: text-to-image students: ``evaluate``'s (a prompt file,
            ``"captions"`` or the list; the teacher's classifier-free guidance; the g of LCM students with a guidance
            input), recorded in the protocol.

    Returns:
        Summary rows (``COMPARE_FIELDS``), one per method (and the teacher) and step count.
    """

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not runs:
        raise ValueError("give at least one --run NAME=DIR")
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"--run names must be distinct, got {names}")
    eval_seeds = [int(e) for e in eval_seeds]
    if not eval_seeds or len(set(eval_seeds)) != len(eval_seeds):
        raise ValueError(f"--eval-seeds must be distinct noise seeds, got {eval_seeds}")
    check_run_steps(run_steps or {}, names)
    text = text_options(prompts, guidance_scale, student_guidance)
    methods = [load_runs(n, Path(p)) for n, p in runs]
    teacher = common_teacher(methods, teacher)
    settings = next((m.data for m in methods if m.data), {})
    # each evaluated student's (method, seed, export), keyed by its name in the evaluate run
    owner = {student_key(m.name, s): (m.name, s, p) for m in methods for s, p in m.exports.items()}
    if len(owner) != sum(len(m.exports) for m in methods):  # e.g. --run cd=<report> and --run cd_seed0=<pipeline>
        keys = [(student_key(m.name, s), m.name) for m in methods for s in m.exports]
        clash = sorted({k for k, _ in keys if sum(k == j for j, _ in keys) > 1})
        raise ValueError(f"--run names give students the same name {clash} (each seed is NAME_seedS): rename a --run")
    student_steps = {k: list(run_steps[v[0]]) for k, v in owner.items() if v[0] in (run_steps or {})}
    from .evaluate import StepCountError

    try:
        reference = run_evaluation_data({**settings, **{k: v for k, v in (("data", data), ("image_size", image_size)) if v}})
        rows = evaluate_eval_seeds(
            eval_seeds, Path(out) / "evaluate", run_teacher(settings, teacher), students={k: v[2] for k, v in owner.items()},
            steps=steps, teacher_steps=teacher_steps, num_samples=num_samples, student_steps=student_steps,
            feature_net=feature_net, **reference, cache_dir=cache_dir, device=device, log=log, **text,
        )
    except StepCountError as err:  # name the --run and seed, not the evaluate run's internal key
        run, seed, _ = owner.get(err.name, (err.name, None, None))
        fit = ",".join(str(s) for s in range(1, err.max_steps + 1))
        raise ValueError(f"--run {run}" + ("" if seed is None else f" seed {seed}") + f" samples with at most "
                         f"{err.max_steps} steps; none of {err.steps} fit (e.g. --run-steps {run}={fit})") from None
    per_seed = []
    for row in rows:
        if row["kind"] == "data":
            continue
        name, seed, source = owner.get(row["model"], (row["model"], None, teacher))
        per_seed.append(dict(
            model=name, kind=row["kind"], seed=seed, steps=row["steps"], fd=row["fd"], kid=row["kid"],
            kid_std=row["kid_std"], num_samples=row["num_samples"], eval_seed=row["seed"],
            feature_net=row["feature_net"], reference=row["reference"], source=str(source),
        ))
    per_seed.sort(key=lambda r: r["kind"] != "teacher")  # the teacher's row first: the yardstick
    per_training_seed = mean_over_eval_seeds(per_seed)
    summary = summarise(per_training_seed)
    add_ratios(summary)
    by_eval_seed = per_eval_seed_summaries(per_seed)
    add_eval_ranges(summary, by_eval_seed)
    first = per_seed[0]
    protocol = dict(
        teacher=str(teacher), steps=list(steps), run_steps={k: list(v) for k, v in (run_steps or {}).items()},
        teacher_steps=list(teacher_steps), num_samples=first["num_samples"],
        eval_seeds=eval_seeds, feature_net=first["feature_net"], reference=first["reference"],
        runs={m.name: dict(source=str(m.source), config=m.config,
                           exports={"-" if s is None else str(s): str(p) for s, p in m.exports.items()}) for m in methods},
        command=command or "python -m lightning_distill.compare " + " ".join(f"--run {n}={p}" for n, p in runs),
        **evaluation_protocol(Path(out) / "evaluate", eval_seeds),
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", summary, COMPARE_FIELDS)
    write_csv(out / "per_seed.csv", per_seed, PER_SEED_FIELDS)
    (out / "protocol.json").write_text(json.dumps(protocol, indent=2) + "\n")
    (out / "results.md").write_text(markdown(summary, per_training_seed, protocol, by_eval_seed))
    plot_spread(summary, out / "fd_vs_steps.png", protocol["feature_net"], protocol["num_samples"])
    log(f"report: {out / 'results.md'}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightning_distill.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                   help="a seeds report folder (python -m lightning_distill.seeds --out) or an exported pipeline; repeatable")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--teacher", default=None, help="the teacher (default: the one the seeds reports name)")
    p.add_argument("--run-steps", action="append", default=[], metavar="NAME=S[,S...]",
                   help="one run's own step counts instead of --steps, e.g. dmd2=1 for a 1-step generator; repeatable")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="student step counts")
    p.add_argument("--teacher-steps", type=int, nargs="*", default=[50], help="teacher step counts; the largest is the ratio's yardstick")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--eval-seeds", "--eval-seed", dest="eval_seeds", type=int, nargs="+", default=[0],
                   help="noise seeds of the evaluation (the same for every model); with several, FD is averaged over them")
    p.add_argument("--feature-net", default="digits", help="digits, inception, or a saved classifier folder")
    p.add_argument("--data", default=None, help="reference data (default: the first seeds run's data.data)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="reference-statistics cache")
    p.add_argument("--device", default=None)
    from .evaluate import add_text_arguments

    add_text_arguments(p)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    runs = [parse_run(s) for s in a.run]
    run_steps = parse_run_steps(a.run_steps)
    summary = compare_methods(
        runs, a.out, a.teacher, a.steps, a.teacher_steps, a.num_samples, a.eval_seeds,
        a.feature_net, a.data, a.image_size, a.cache_dir, a.device,
        command="python -m lightning_distill.compare " + " ".join(shlex.quote(x) for x in argv), run_steps=run_steps,
        prompts=a.prompts, guidance_scale=a.guidance_scale, student_guidance=a.student_guidance,
    )
    print((Path(a.out) / "results.md").read_text())
    return summary


def _entry() -> None:
    """``python -m lightning_distill.compare``: bad input ends in one line naming the problem."""
    from .cli import one_line_errors

    with one_line_errors("compare", (ValueError, FileNotFoundError)):
        main()


if __name__ == "__main__":
    _entry()
