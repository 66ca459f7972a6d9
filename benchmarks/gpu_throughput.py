"""Images per second of every debug preset, or of full presets, on one device (used by gpu_check.sh and gpu_session.sh).

    python benchmarks/gpu_throughput.py --accelerator gpu --precision bf16-mixed --steps 20
    python benchmarks/gpu_throughput.py --configs configs/dmd2/digits.yaml --steps 200 --precision 32-true

Per preset: the debug preset (tiny teacher substituted as in the tests), or with ``--configs`` the named
configs as they are (bundled teacher and data; their FID / export callbacks and image logging off),
``--steps`` optimiser steps with the given precision; images/s = batch size x batches / time, timed
inside Lightning between the first batch after ``--warmup`` and the end of training (start-up and
compilation excluded); ``batches_per_s`` is the training iteration rate.
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
        self.warmup, self.t0, self.images, self.batches, self.seen = warmup, None, 0, 0, 0

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
            self.batches += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.elapsed = time.perf_counter() - self.t0 if self.t0 else float("nan")


def timing_overrides(accelerator: str, precision: str, max_steps: int) -> list[str]:
    """CLI overrides for timing training alone: one device, no logger, no validation."""
    return ["--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.precision", precision,
            "--trainer.max_steps", str(max_steps), "--trainer.logger", "false", "--trainer.limit_val_batches", "0"]


def config_cli(config: str, root: Path, accelerator: str, precision: str, max_steps: int):
    """The CLI (not run) of a full config, to time its training alone: no logger, validation, in-run FID,
    export or image logging; writes under ``root``."""
    from lightning_distill.callbacks import PipelineExport
    from lightning_distill.callbacks.fid import FIDCallback
    from lightning_distill.cli import cli_main

    cli = cli_main(["--config", config, "--trainer.default_root_dir", str(root / config.replace("/", "_")),
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
                   + timing_overrides(accelerator, precision, max_steps), run=False)
    cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, (FIDCallback, PipelineExport))]
    cli.model.hparams.sample_every_n_steps = 0
    return cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=None)
    ap.add_argument("--configs", nargs="*", default=None, help="full configs to time instead of debug presets")
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
    names = args.configs if args.configs else (args.presets or all_debug_presets())
    for name in names:
        try:
            if args.configs:
                cli = config_cli(name, tmp, args.accelerator, args.precision, args.steps)
            else:
                cli = cli_main(preset_args(name, tmp / name, fixtures)
                               + timing_overrides(args.accelerator, args.precision, args.steps), run=False)
                cli.model.hparams.sample_every_n_steps = 0
            cb = Throughput(args.warmup)
            cli.trainer.callbacks.append(cb)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            rows[name] = {"images_per_s": cb.images / cb.elapsed, "batches_per_s": cb.batches / cb.elapsed,
                          "images": cb.images, "seconds": cb.elapsed, "steps": cli.trainer.global_step}
        except Exception as err:
            rows[name] = {"error": f"{type(err).__name__}: {err}"[:400]}
        print(f"{name:28s} " + (f"{rows[name]['images_per_s']:10.1f} images/s" if "images_per_s" in rows[name]
                                else rows[name]["error"]), flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"device": device, "torch": torch.__version__, "precision": args.precision, "steps": args.steps,
              "presets": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
