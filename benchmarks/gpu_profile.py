"""Where a training iteration's time goes: torch.profiler over a few iterations of full presets.

    python benchmarks/gpu_profile.py --configs configs/teacher/digits.yaml configs/dmd2/digits.yaml --out prof.txt

Per config: ``--warmup`` iterations, then ``--steps`` profiled ones (CPU and, where present, CUDA activity);
prints the wall time per iteration, the operators with the most self CPU time and the number of
host-device synchronisations (``aten::item`` / ``aten::_local_scalar_dense``, ``cudaStreamSynchronize``,
``cudaMemcpyAsync`` calls) per iteration. FID / export callbacks and image logging are off.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from gpu_throughput import Throughput, config_cli  # this script's folder is on sys.path


class Profiled(Throughput):
    """Throughput's timing, with torch.profiler over iterations warmup+1 .. warmup+steps; then stops training."""

    def __init__(self, warmup: int, steps: int) -> None:
        super().__init__(warmup)
        self.steps, self.prof, self.device, self.wall = steps, None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.seen == self.warmup + 1:
            self.device = pl_module.device
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pl_module.device.type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.prof is not None and self.wall is None and self.seen == self.warmup + self.steps:
            self._sync(pl_module)
            self.wall = (time.perf_counter() - self.t0) / self.steps
            self.prof.__exit__(None, None, None)
            trainer.should_stop = True


SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--accelerator", default="gpu")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ld_prof_"))
    report = []
    for name in args.configs:
        cli = config_cli(name, tmp, args.accelerator, args.precision, max_steps=100_000)
        cb = Profiled(args.warmup, args.steps)
        cli.trainer.callbacks.append(cb)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        events = cb.prof.key_averages()
        syncs = {e.key: e.count / args.steps for e in events if e.key in SYNC_OPS}
        d2h = sum(e.count for e in events if e.key == "cudaMemcpyAsync") / args.steps
        sort = "self_cpu_time_total"
        lines = [f"== {name} ({args.precision}, {cb.device}): {cb.wall * 1e3:.1f} ms per iteration "
                 f"(mean of {args.steps}, profiler overhead included); per iteration: syncs {syncs}, cudaMemcpyAsync {d2h:.1f}",
                 events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60)]
        report.append("\n".join(lines))
        print(report[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n\n".join(report))


if __name__ == "__main__":
    main()
