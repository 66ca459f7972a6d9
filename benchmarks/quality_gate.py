"""Quality gate of the README main job: train it, fail if its student got worse or the job got slower.

    python benchmarks/quality_gate.py                    # configs/consistency/main.yaml -> runs/quality_gate
    python benchmarks/quality_gate.py --budget-min 8.1   # the time bar given here instead of read from README.md

The job is the README's first command (``lightning-distill fit --config configs/consistency/main.yaml``, with
``--trainer.default_root_dir`` set to ``--out``), timed by benchmarks/main_job.py's :func:`time_command`
(fresh subprocess, offline; the median over ``--repeats``). Its FD numbers are the ones the job itself prints
and writes: the ``DistillationReport`` callback's ``results.csv`` (FD-digits, 2000 samples, seed 0, the
digits train split, the exported student against the teacher's DDIM). Two bars, both must hold:

* quality: student FD at 2 steps / teacher FD at 50 steps <= 1.3 (``--max-ratio``);
* time: wall time <= 1.5 (``--max-time-factor``) x the minutes README.md's results table states for the
  main job (the row naming ``consistency/main``), or ``--budget-min``.

``--eval-seeds 0 1 2`` scores the job's exported student again with the evaluate protocol at each evaluation
noise seed (the report's samples, feature network and reference set; ``OUT/gate_eval/``) and judges the ratio
of the two FDs each averaged over them: the teacher's own 50-step FD-digits moves by up to 2x between noise seeds
(benchmarks/results/eval_noise), so one seed's ratio is a draw. Each extra seed costs about 5 core-minutes the
first time (the teacher's 50-step cell, cached after).

Exit status 0: both bars hold; 1: a bar failed (one line per failed bar); 2: bad input, or the job failed or
wrote no report. The verdict, the numbers and the timing record go to ``OUT/quality_gate.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from main_job import time_command  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

MAIN_CONFIG = str(REPO / "configs" / "consistency" / "main.yaml")


class GateError(ValueError):
    """Bad input, or a job that did not produce what the gate measures (exit status 2)."""


@dataclass
class GateResult:
    """The verdict: each bar's measured value and limit, and one line per failed bar."""

    student_fd: float
    teacher_fd: float
    fd_ratio: float
    max_ratio: float
    wall_s: float
    budget_min: float
    max_time_factor: float
    time_limit_s: float
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def judge(
    student_fd: float, teacher_fd: float, wall_s: float, budget_min: float, max_ratio: float = 1.3,
    max_time_factor: float = 1.5,
) -> GateResult:
    """Apply both bars (a value exactly at its limit passes).

    Args:
        student_fd: the student's FD at 2 steps.
        teacher_fd: the teacher's FD at 50 DDIM steps.
        wall_s: the job's wall time in seconds.
        budget_min: the README's stated wall time in minutes.
        max_ratio: the largest allowed ``student_fd / teacher_fd``.
        max_time_factor: the largest allowed ``wall_s / (60 * budget_min)``.

    Returns:
        A :class:`GateResult`; ``failures`` names each bar that failed with its value and limit.

    Example::

        >>> judge(0.18, 0.139, 400.0, budget_min=8.1).passed
        True
    """
    if not teacher_fd > 0:
        raise GateError(f"teacher FD must be positive to form a ratio, got {teacher_fd}")
    if not budget_min > 0:
        raise GateError(f"the stated wall time must be positive, got {budget_min} min")
    ratio = student_fd / teacher_fd
    limit_s = 60.0 * budget_min * max_time_factor
    failures = []
    if not ratio <= max_ratio:  # `not <=` so that a NaN FD fails
        failures.append(f"quality: student 2-step FD {student_fd:.4g} is {ratio:.3f}x the teacher's 50-step FD "
                        f"{teacher_fd:.4g} (bar: at most {max_ratio}x)")
    if not wall_s <= limit_s:
        failures.append(f"time: {wall_s / 60:.2f} min wall is {wall_s / (60 * budget_min):.2f}x the stated "
                        f"{budget_min:g} min (bar: at most {max_time_factor}x = {limit_s / 60:.2f} min)")
    return GateResult(student_fd, teacher_fd, ratio, max_ratio, wall_s, budget_min, max_time_factor, limit_s, failures)


def readme_minutes(text: str, config_name: str = "consistency/main") -> float:
    """The wall time in minutes stated in README.md's results table, on the row naming ``config_name``."""
    for line in text.splitlines():
        if line.lstrip().startswith("|") and f"`{config_name}`" in line:
            m = re.search(r"(\d+(?:\.\d+)?)\s*min\b", line.split("|")[1])
            if m:
                return float(m.group(1))
    raise GateError(f"README.md has no results-table row naming `{config_name}` with a time in minutes "
                    "(e.g. '8.1 min wall'); pass --budget-min")


def report_fds(results_csv: Path, student_steps: int = 2, teacher_steps: int = 50) -> tuple[float, float]:
    """(student FD at ``student_steps``, teacher FD at ``teacher_steps``) from an evaluation ``results.csv``."""
    with open(results_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    teacher = [r for r in rows if r["kind"] == "teacher" and int(r["steps"]) == teacher_steps]
    student = [r for r in rows if r["kind"] not in ("teacher", "data") and int(r["steps"]) == student_steps]
    if not teacher or not student:
        missing = " and ".join(m for m, ok in ((f"the teacher at {teacher_steps} steps", teacher),
                                                (f"a student at {student_steps} steps", student)) if not ok)
        raise GateError(f"{results_csv} has no row for {missing}")
    return float(student[0]["fd"]), float(teacher[0]["fd"])


def saved_config(run_dir: Path) -> tuple[Path, dict]:
    """The job's saved, resolved ``config.yaml`` (path and contents)."""
    import yaml

    from lightning_distill.seeds import saved_run_config

    saved = saved_run_config(run_dir)
    if saved is None:
        raise GateError(f"no config.yaml saved under {run_dir}: the job did not start")
    return saved, yaml.safe_load(saved.read_text())


def averaged_fds(run_dir: Path, eval_seeds: Sequence[int], student_steps: int = 2, teacher_steps: int = 50,
                 cache_dir: str | None = None) -> tuple[float, float, list[dict]]:
    """(student FD, teacher FD, rows): the run's export and its teacher scored by the evaluate protocol at each
    evaluation seed, with the report's sample count and feature network; each FD the mean over the seeds."""
    import statistics

    from lightning_distill.seeds import callback_arg, evaluate_eval_seeds, export_dir, run_evaluation_data, run_teacher

    _, cfg = saved_config(run_dir)
    data = cfg.get("data") or {}
    export = export_dir(cfg, run_dir)
    if not (export / "model_index.json").is_file():
        raise GateError(f"the job exported no student at {export}")
    rows = evaluate_eval_seeds(
        list(eval_seeds), run_dir / "gate_eval", run_teacher(data), students={"student": export},
        steps=[student_steps], teacher_steps=[teacher_steps],
        num_samples=callback_arg(cfg, "DistillationReport", "num_samples") or 2000,
        feature_net=callback_arg(cfg, "DistillationReport", "feature_net") or "digits",
        **run_evaluation_data(data), cache_dir=cache_dir,
    )
    student = [r["fd"] for r in rows if r["kind"] not in ("teacher", "data") and int(r["steps"]) == student_steps]
    teacher = [r["fd"] for r in rows if r["kind"] == "teacher" and int(r["steps"]) == teacher_steps]
    if len(student) != len(eval_seeds) or len(teacher) != len(eval_seeds):
        raise GateError(f"the evaluation of {export} gave {len(student)} student and {len(teacher)} teacher cells "
                        f"for {len(eval_seeds)} evaluation seeds")
    return statistics.fmean(student), statistics.fmean(teacher), rows


def report_csv(run_dir: Path) -> Path:
    """The ``results.csv`` of the run's ``DistillationReport`` (its ``out_dir`` from the saved, resolved config)."""
    from lightning_distill.seeds import callback_arg

    saved, cfg = saved_config(run_dir)
    out_dir = callback_arg(cfg, "DistillationReport", "out_dir")
    if out_dir is None:
        raise GateError(f"the config ({saved}) has no lightning_distill.callbacks.DistillationReport callback to score the student")
    return Path(out_dir) / "results.csv"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/quality_gate.py", description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- are passed to `lightning-distill fit`.")
    p.add_argument("--config", default=MAIN_CONFIG)
    p.add_argument("--out", default="runs/quality_gate", help="the job's trainer.default_root_dir")
    p.add_argument("--repeats", type=int, default=1, help="runs timed; the median wall time is judged")
    p.add_argument("--budget-min", type=float, default=None, help="stated wall time (default: from README.md)")
    p.add_argument("--readme", default=str(REPO / "README.md"))
    p.add_argument("--max-ratio", type=float, default=1.3)
    p.add_argument("--max-time-factor", type=float, default=1.5)
    p.add_argument("--eval-seeds", type=int, nargs="+", default=None,
                   help="judge FDs averaged over these evaluation noise seeds (the export scored again); "
                        "default: the job's own report (seed 0)")
    p.add_argument("--cache-dir", default=None, help="evaluate's feature cache (default: its own)")
    return p


def run_gate(argv: Sequence[str] | None = None) -> GateResult:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    a, extra = build_parser().parse_args(argv[:split]), argv[split + 1:]
    if not Path(a.config).is_file():
        raise GateError(f"config {a.config!r} not found")
    if a.eval_seeds is not None and len(set(a.eval_seeds)) != len(a.eval_seeds):
        raise GateError(f"--eval-seeds must be distinct noise seeds, got {a.eval_seeds}")
    budget = a.budget_min if a.budget_min is not None else readme_minutes(Path(a.readme).read_text())
    out = Path(a.out)
    cmd = [sys.executable, "-m", "lightning_distill", "fit", "--config", a.config, "--trainer.default_root_dir", str(out), *extra]
    started = time.time()
    timing = time_command(cmd, a.repeats, target_min=budget * a.max_time_factor)
    if any(timing["exit_codes"]):
        raise GateError(f"the job exited with {timing['exit_codes']}: {shlex.join(cmd)}")
    csv_path = report_csv(out)
    if not csv_path.is_file() or csv_path.stat().st_mtime < started:
        raise GateError(f"the job wrote no new report at {csv_path}")
    if a.eval_seeds is None:  # the job's own report
        student_fd, teacher_fd = report_fds(csv_path)
        scored = {"report": str(csv_path), "eval_seeds": [0]}
    else:
        student_fd, teacher_fd, rows = averaged_fds(out, a.eval_seeds, cache_dir=a.cache_dir)
        scored = {"report": str(out / "gate_eval"), "eval_seeds": list(a.eval_seeds),
                  "per_eval_seed": [{k: r[k] for k in ("model", "kind", "steps", "fd", "seed")} for r in rows]}
    result = judge(student_fd, teacher_fd, timing["median_wall_s"], budget, a.max_ratio, a.max_time_factor)
    record = {"passed": result.passed, **asdict(result), **scored, "timing": timing}
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_gate.json").write_text(json.dumps(record, indent=2) + "\n")
    over = f" (each the mean over evaluation seeds {' '.join(map(str, scored['eval_seeds']))})" if a.eval_seeds else ""
    print(f"quality: student 2-step FD {student_fd:.4g} / teacher 50-step FD {teacher_fd:.4g}{over} = "
          f"{result.fd_ratio:.3f}x (bar {a.max_ratio}x)")
    print(f"time: {result.wall_s / 60:.2f} min wall (bar {a.max_time_factor} x {budget:g} min = "
          f"{result.time_limit_s / 60:.2f} min)")
    for line in result.failures:
        print(f"FAIL {line}")
    print(f"quality gate {'passed' if result.passed else 'FAILED'}; record: {out / 'quality_gate.json'}")
    return result


def main() -> None:
    try:
        result = run_gate()
    except (GateError, FileNotFoundError) as err:
        print(f"quality_gate: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(0 if result.passed else 1)


if __name__ == "__main__":
    main()
