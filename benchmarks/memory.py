"""Memory of a training step vs what the networks must hold: parameters + gradients + optimiser states.

For each debug preset, in a fresh subprocess (so peak RSS belongs to this preset alone): build the
method, note the resident set size (RSS) before ``fit``, train ``--steps`` steps, and report

* ``state_mb``: bytes of every trainable parameter, its gradient and its optimiser state (read from the
  optimisers after the steps), and the frozen teacher's parameters (no gradient, no optimiser state:
  asserted);
* ``rss_before_fit_mb``, ``peak_rss_mb`` (``ru_maxrss``) and their difference, the growth caused by
  training (optimiser states, gradients, activations, allocator caches).

The interpreter, torch and diffusers account for most of the RSS of these tiny networks; the numbers
matter for the ratio ``peak growth / state`` and for the teacher assertions.

    nice -n 10 python benchmarks/memory.py --out benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

MB = 1024 * 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def measure(name: str, steps: int, extra: list[str]) -> dict:
    import lightning as L
    import torch

    from _method_configs import preset_args, write_fixtures
    from lightning_distill.cli import cli_main

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="ld_mem_"))
    fixtures = write_fixtures(tmp / "fixtures")
    cli = cli_main(preset_args(name, tmp / "run", fixtures) + extra, run=False)
    model, dm = cli.model, cli.datamodule
    model.hparams.sample_every_n_steps = 0
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    before = rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.fit(model, datamodule=dm)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    teacher = getattr(model, "teacher", None)
    teacher_params = list(teacher.parameters()) if teacher is not None else []
    teacher_ids = {id(p) for p in teacher_params}
    opt_params = {id(p): p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    assert not teacher_ids & set(opt_params), f"{name}: teacher parameters are in an optimiser"
    assert all(p.grad is None and not p.requires_grad for p in teacher_params), f"{name}: teacher has gradients"
    opt_state = sum(
        v.numel() * v.element_size()
        for opt in trainer.optimizers for s in opt.state.values() for v in s.values() if hasattr(v, "numel")
    )
    assert not any(id(p) in teacher_ids for opt in trainer.optimizers for p in opt.state), name
    params = sum(p.numel() * p.element_size() for p in opt_params.values())
    grads = sum(p.numel() * p.element_size() for p in opt_params.values())  # one gradient per trained parameter
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher_params)
    state = params + grads + opt_state + teacher_bytes
    return {
        "trained_params": sum(p.numel() for p in opt_params.values()),
        "teacher_params": sum(p.numel() for p in teacher_params),
        "params_mb": params / MB, "grads_mb": grads / MB, "optimizer_state_mb": opt_state / MB,
        "teacher_mb": teacher_bytes / MB, "state_mb": state / MB,
        "rss_before_fit_mb": before, "peak_rss_before_fit_mb": peak_before, "peak_rss_mb": peak,
        "peak_growth_mb": peak - before, "growth_over_state": (peak - before) / (state / MB) if state else None,
        "teacher_grads": 0, "teacher_in_optimizer": 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--extra", default="")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import shlex

    if args.child:
        print("RESULT", json.dumps(measure(args.child, args.steps, shlex.split(args.extra))))
        return
    from _method_configs import all_debug_presets

    results = {"load_avg_start": os.getloadavg(), "presets": {}}
    for name in args.presets or all_debug_presets():
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps),
                               "--extra", args.extra], capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        results["presets"][name] = json.loads(line[0][7:]) if line else {"error": proc.stderr[-600:]}
        print(name, json.dumps(results["presets"][name]), flush=True)
    results["load_avg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
