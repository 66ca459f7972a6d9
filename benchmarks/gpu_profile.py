"""Where a training iteration's time goes: torch.profiler over a few iterations of full presets.

    python benchmarks/gpu_profile.py --configs configs/teacher/digits.yaml configs/dmd2/digits.yaml --out prof.txt

Per config: ``--warmup`` iterations, then ``--steps`` profiled ones (CPU and, where present, CUDA activity);
prints the wall time per iteration, the operators with the most self CPU time and the number of
host-device synchronisations (``aten::item`` / ``aten::_local_scalar_dense``, ``cudaStreamSynchronize``,
``cudaMemcpyAsync`` device-to-host) per iteration. FID / export callbacks and image logging are off.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


class Profiled(L.Callback):
    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.seen, self.prof, self.t0, self.wall = warmup, steps, 0, None, None, None
        self.device = None

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.warmup + 1:
            self._sync(pl_module)
            self.device = pl_module.device
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pl_module.device.type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

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
    from lightning_distill.callbacks import PipelineExport
    from lightning_distill.callbacks.fid import FIDCallback
    from lightning_distill.cli import cli_main

    tmp = Path(tempfile.mkdtemp(prefix="ld_prof_"))
    report = []
    for name in args.configs:
        cli = cli_main(["--config", name, "--trainer.default_root_dir", str(tmp / name.replace("/", "_")),
                        "--trainer.accelerator", args.accelerator, "--trainer.devices", "1",
                        "--trainer.precision", args.precision, "--trainer.max_steps", "100000",
                        "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
                        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"], run=False)
        cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, (FIDCallback, PipelineExport))]
        cb = Profiled(args.warmup, args.steps)
        cli.trainer.callbacks.append(cb)
        cli.model.hparams.sample_every_n_steps = 0
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
