"""Collect the in-run FD evaluations (``FIDCallback step N: ...`` lines) of training logs into one table.

    python benchmarks/fid_log_summary.py runs/logs/*.log --metric fid/digits-feat/1step/n2000 --out summary.json

A run is named by its log file's stem; ``group`` is the stem up to the last ``_seed`` (``preset_seed3`` ->
``preset``). Per run: every evaluation, the best value and its step; per group: the best values of its
runs, their median, minimum and maximum, and the median of every evaluation step the runs share.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

LINE = re.compile(r"FIDCallback step (\d+): (.*)$")


def parse_log(path: Path) -> dict[int, dict[str, float]]:
    evals: dict[int, dict[str, float]] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        m = LINE.search(line)
        if m:
            evals[int(m.group(1))] = {k: float(v) for k, v in (kv.split("=", 1) for kv in m.group(2).split(", "))}
    return evals


def summarise(logs: list[Path], metric: str) -> dict:
    runs, groups = {}, {}
    for log in sorted(logs):
        evals = {step: vals[metric] for step, vals in parse_log(log).items() if metric in vals}
        run = {"evaluations": evals, "last_step": max(evals, default=None)}
        if evals:
            step = min(evals, key=evals.get)
            run.update(best=evals[step], best_step=step)
        runs[log.stem] = run
        groups.setdefault(log.stem.rsplit("_seed", 1)[0], []).append(log.stem)
    out = {"metric": metric, "runs": runs, "groups": {}}
    for name, members in groups.items():
        bests = [runs[m]["best"] for m in members if "best" in runs[m]]
        shared = set.intersection(*(set(runs[m]["evaluations"]) for m in members)) if members else set()
        out["groups"][name] = {
            "runs": members,
            "best_per_run": bests,
            "median_best": statistics.median(bests) if bests else None,
            "min_best": min(bests, default=None),
            "max_best": max(bests, default=None),
            "median_by_step": {s: statistics.median(runs[m]["evaluations"][s] for m in members) for s in sorted(shared)},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("logs", nargs="+", type=Path)
    ap.add_argument("--metric", default="fid/digits-feat/1step/n2000")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = summarise(args.logs, args.metric)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    for name, g in result["groups"].items():
        print(f"{name}: best per run {[round(b, 3) for b in g['best_per_run']]}, median {g['median_best']}")


if __name__ == "__main__":
    main()
