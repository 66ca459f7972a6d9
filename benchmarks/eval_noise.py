"""How much does a teacher's FD move with the evaluation noise alone? The yardstick behind every ratio bar.

Every quality bar is a ratio to the teacher's 50-step FD, measured with one evaluation seed (the noise the
teacher and the students are sampled from). This scores each teacher at its step count once per evaluation
seed, with the evaluate protocol otherwise unchanged (2,000 samples, digits train split, digits classifier;
the teacher's features come from the evaluation cache when it holds them), and reports the spread:

    python benchmarks/eval_noise.py --teacher bundled:digits bundled:digits-flow --seeds 0 1 2 3 4 \\
        --out benchmarks/results/eval_noise

Writes ``eval_noise.json`` and ``README.md`` (per-seed FD, mean, standard deviation, min, max, max / min).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from lightning_distill.evaluate import evaluate_models
from lightning_distill.teacher import load_teacher


def teacher_fd_by_seed(teacher: str, seeds: list[int], steps: int, num_samples: int, cache_dir: str | None) -> dict:
    fd = {}
    loaded = load_teacher(teacher)  # once, not once per seed
    for e in seeds:
        rows = evaluate_models(teacher=loaded, students=None, teacher_steps=[steps], num_samples=num_samples, seed=e,
                               real_baseline=False, cache_dir=cache_dir)
        fd[e] = rows[0]["fd"]
        protocol = {k: rows[0][k] for k in ("num_samples", "feature_net", "reference")}
    vals = list(fd.values())
    return dict(teacher=teacher, steps=steps, fd_by_seed=fd, mean=statistics.fmean(vals), std=statistics.stdev(vals),
                min=min(vals), max=max(vals), max_over_min=max(vals) / min(vals), **protocol)


def markdown(results: list[dict], command: str) -> str:
    seeds = list(results[0]["fd_by_seed"])
    lines = [
        "# The teacher's FD over evaluation seeds",
        "",
        f"| teacher | steps | {' | '.join(f'seed {e}' for e in seeds)} | mean ± std | min-max | max / min |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    for r in results:
        lines.append(f"| `{r['teacher']}` | {r['steps']} | " + " | ".join(f"{r['fd_by_seed'][e]:.4f}" for e in seeds)
                     + f" | {r['mean']:.4f} ± {r['std']:.4f} | {r['min']:.4f}-{r['max']:.4f} | {r['max_over_min']:.2f} |")
    r = results[0]
    lines += ["", f"Protocol: {r['num_samples']} samples per cell, reference {r['reference']}, feature network "
              f"{r['feature_net']}; the teacher sampled as in `python -m lightning_distill.evaluate`.", "",
              f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", nargs="+", default=["bundled:digits", "bundled:digits-flow"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if len(set(a.seeds)) < 2 or len(set(a.seeds)) != len(a.seeds):
        p.error(f"--seeds: give at least two distinct evaluation seeds (a spread needs two), got {a.seeds}")
    command = "python " + " ".join(sys.argv if argv is None else ["benchmarks/eval_noise.py", *argv])
    results = [teacher_fd_by_seed(t, a.seeds, a.steps, a.num_samples, a.cache_dir) for t in a.teacher]
    text = json.dumps({"command": command, "results": results}, indent=2)
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_noise.json").write_text(text + "\n")
        (out / "README.md").write_text(markdown(results, command))


if __name__ == "__main__":
    main()
