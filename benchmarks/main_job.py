"""Wall time (and peak RSS) of a whole command, e.g. the README's main job, over repeated runs.

    nice -n 10 python benchmarks/main_job.py --repeats 1 --out benchmarks/results/main_job.json -- \
        lightning-distill fit --config configs/progressive/digits.yaml

Each run is a fresh subprocess; reports every wall time, the median, the children's peak RSS, the
machine's load average before and after, and whether the target (<= --target-min minutes) was met.
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
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    walls, codes = [], []
    load_start = os.getloadavg()
    for i in range(args.repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env)
        walls.append(time.perf_counter() - t0)
        codes.append(proc.returncode)
        print(f"run {i + 1}: {walls[-1]:.1f} s (exit {proc.returncode})", file=sys.stderr, flush=True)
    result = {
        "command": cmd,
        "wall_s": walls,
        "median_wall_s": statistics.median(walls),
        "exit_codes": codes,
        "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "cpus": os.cpu_count(),
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "target_min": args.target_min,
        "meets_target": statistics.median(walls) <= 60 * args.target_min and not any(codes),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
