"""Wall time (and peak RSS) of a whole command, e.g. the README's main job, over repeated runs.

    nice -n 10 python benchmarks/main_job.py --repeats 1 --out benchmarks/results/main_job.json -- \
        lightning-distill fit --config configs/progressive/digits.yaml

Each run is a fresh subprocess; reports every wall time, the median, the children's peak RSS, the
machine's load average before and after, and whether the target (<= --target-min minutes) was met.
:func:`time_command` is the same measurement as a function (benchmarks/quality_gate.py uses it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence


def time_command(cmd: Sequence[str], repeats: int = 1, target_min: float = 10.0, env: dict | None = None) -> dict:
    """Run ``cmd`` ``repeats`` times as fresh subprocesses (offline) and return the timing record.

    Args:
        cmd: the command and its arguments.
        repeats: number of runs; the verdict uses their median wall time.
        target_min: the wall-time target in minutes that ``meets_target`` is judged against.
        env: extra environment variables for the command (``HF_HUB_OFFLINE=1`` is always set).

    Returns:
        A JSON-ready dict: ``wall_s`` (every run), ``median_wall_s``, ``exit_codes``, the children's peak RSS,
        the CPU count, the load average before and after, ``target_min`` and ``meets_target``.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    walls, codes = [], []
    load_start = os.getloadavg()
    for i in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(list(cmd), env=env)
        walls.append(time.perf_counter() - t0)
        codes.append(proc.returncode)
        print(f"run {i + 1}: {walls[-1]:.1f} s (exit {proc.returncode})", file=sys.stderr, flush=True)
    return {
        "command": list(cmd),
        "wall_s": walls,
        "median_wall_s": statistics.median(walls),
        "exit_codes": codes,
        "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "cpus": os.cpu_count(),
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "target_min": target_min,
        "meets_target": statistics.median(walls) <= 60 * target_min and not any(codes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--target-min", type=float, default=10.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command after --")
    result = time_command(cmd, args.repeats, args.target_min)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
