"""Images per second of every debug preset on one device, for a few steps (used by gpu_check.sh).

    python benchmarks/gpu_throughput.py --accelerator gpu --precision bf16-mixed --steps 20

Per preset: the debug preset (tiny teacher substituted as in the tests), ``--steps`` optimiser steps
with the given precision; images/s = batch size x steps / time, timed inside Lightning between the
first batch after ``--warmup`` and the end of training (start-up and compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import lightning as L  # noqa: E402
import torch  # noqa: E402


class Throughput(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.images, self.seen = warmup, None, 0, 0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.warmup + 1:
            self._sync(pl_module)
            self.t0 = time.perf_counter()
        if self.t0 is not None:
            self.images += int(batch["x"].shape[0])

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.elapsed = time.perf_counter() - self.t0 if self.t0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=None)
    ap.add_argument("--accelerator", default="gpu")
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from _method_configs import all_debug_presets, preset_args, write_fixtures
    from lightning_distill.cli import cli_main

    tmp = Path(tempfile.mkdtemp(prefix="ld_gpu_"))
    fixtures = write_fixtures(tmp / "fixtures")
    rows = {}
    for name in args.presets or all_debug_presets():
        try:
            extra = ["--trainer.accelerator", args.accelerator, "--trainer.devices", "1",
                     "--trainer.precision", args.precision, "--trainer.max_steps", str(args.steps),
                     "--trainer.logger", "false", "--trainer.limit_val_batches", "0"]
            cli = cli_main(preset_args(name, tmp / name, fixtures) + extra, run=False)
            cb = Throughput(args.warmup)
            cli.trainer.callbacks.append(cb)
            cli.model.hparams.sample_every_n_steps = 0
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            rows[name] = {"images_per_s": cb.images / cb.elapsed, "images": cb.images, "seconds": cb.elapsed,
                          "steps": cli.trainer.global_step}
        except Exception as err:
            rows[name] = {"error": f"{type(err).__name__}: {err}"[:400]}
        print(f"{name:20s} " + (f"{rows[name]['images_per_s']:10.1f} images/s" if "images_per_s" in rows[name]
                                else rows[name]["error"]), flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"device": device, "precision": args.precision, "steps": args.steps, "presets": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
