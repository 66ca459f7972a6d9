"""Peak memory of one DMD2 training step (three networks) per memory option (#23 item 4).

For each stack (the tiny SD3 stack of tests/_sd3.py, the bundled digits teacher) and each option, in a fresh
subprocess: build DMD2 from its debug preset (``generator_every 1``: every iteration has a critic update and a
generator update, so one step holds all three networks' activations), train iteration 0 (optimiser states
exist afterwards), then measure iteration 1:

* ``state_mb``: what is held at the start of the step, each tensor once (:func:`lightning_distill.memory.state_bytes`):
  trainable and frozen parameters (teacher, and a LoRA network's base), gradients, optimiser state;
* ``step_growth_mb``: the allocator's peak during the step above its start. CPU: the running sum of
  ``torch.profiler`` memory events (operator granularity, :func:`~lightning_distill.memory.profiler_peak_bytes`);
  CUDA: ``max_memory_allocated`` minus ``memory_allocated`` at the start;
* ``peak_mb`` = state + growth (on CUDA: ``max_memory_allocated``, which also counts what the state count
  does not, e.g. the GAN head's buffers).

Options: baseline; gradient_checkpointing (student and fake score); student_lora (rank 4); fake_score_lora
(rank 4); teacher_bf16 (``data.teacher_dtype bfloat16``); teacher_offload (weights on the CPU between calls:
only a device run can show a saving; on a CPU run the row is the baseline and says so); all (the first four
together, plus bf16).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/memory_options.py \\
        --out benchmarks/results/memory_options.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
MB = 1024 * 1024

LORA = '{"rank": 4, "alpha": 4}'
OPTIONS: dict[str, list[str]] = {
    "baseline": [],
    "gradient_checkpointing": ["--model.init_args.gradient_checkpointing", "true"],
    "student_lora": ["--model.init_args.student_lora", LORA],
    "fake_score_lora": ["--model.init_args.fake_score_lora", LORA],
    "teacher_bf16": ["--data.teacher_dtype", "bfloat16"],
    "teacher_offload": ["--model.init_args.teacher_offload", "true"],
    "all": ["--model.init_args.gradient_checkpointing", "true", "--model.init_args.student_lora", LORA,
            "--model.init_args.fake_score_lora", LORA, "--data.teacher_dtype", "bfloat16"],
}


def stack_args(stack: str, tmp: Path, batch_size: int) -> list[str]:
    """The DMD2 debug preset on ``stack``, tiny and offline, writing under ``tmp``."""
    # the CLI only builds model and data here: measure() trains them with its own Trainer
    common = ["--trainer.default_root_dir", str(tmp / "run"), "--model.init_args.generator_every", "1",
              "--model.init_args.sample_every_n_steps", "0", "--data.batch_size", str(batch_size)]
    if stack == "digits":
        return ["--config", str(REPO / "configs/dmd2/debug.yaml"), "--data.teacher", "bundled:digits",
                "--data.image_size", "16", *common]
    if stack == "sd3":
        import numpy as np
        from PIL import Image

        from _sd3 import IMAGE_SIZE, write_tiny_sd3

        teacher = write_tiny_sd3(tmp / "tiny-sd3")
        images = tmp / "captioned"
        rng = np.random.default_rng(0)
        rows = []
        for cls in ("a", "b"):
            (images / cls).mkdir(parents=True)
            for i in range(batch_size):
                Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(images / cls / f"{i}.png")
                rows.append({"file_name": f"{cls}/{i}.png", "text": f"a photo of a {'cat' if cls == 'a' else 'dog'} {i}"})
        (images / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        return ["--config", str(REPO / "configs/dmd2/debug_sd3.yaml"), "--data.teacher", str(teacher),
                "--data.data", str(images), *common]
    raise SystemExit(f"unknown stack {stack!r}; choose sd3 or digits")


def measure(stack: str, option: str, batch_size: int) -> dict:
    import lightning as L
    import torch

    from lightning_distill import memory
    from lightning_distill.cli import cli_main

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    tmp = Path(tempfile.mkdtemp(prefix="ld_memopt_"))
    cli = cli_main([*stack_args(stack, tmp, batch_size), *OPTIONS[option]], run=False)
    model, dm = cli.model, cli.datamodule
    out: dict = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step != 1:  # the second iteration (an epoch may hold one batch only)
                return
            self.measuring = True
            state = memory.state_bytes(pl_module, trainer.optimizers)
            out.update({f"{k}_mb": v / MB for k, v in state.items()})
            out["state_mb"] = state["total"] / MB
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.start = torch.cuda.memory_allocated()
                out["cuda_allocated_at_start_mb"] = self.start / MB
            else:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
                self.prof.__enter__()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not getattr(self, "measuring", False):
                return
            self.measuring = False
            out["step_s"] = time.perf_counter() - self.t0
            if cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
                out["step_growth_mb"] = (peak - self.start) / MB
                out["peak_mb"] = peak / MB
            else:
                self.prof.__exit__(None, None, None)
                peak, _ = memory.profiler_peak_bytes(self.prof)
                out["step_growth_mb"] = peak / MB
                out["peak_mb"] = out["state_mb"] + peak / MB
            teacher_net = pl_module.teacher.unet
            out["teacher_weights_device_after_step"] = str(next(teacher_net.parameters()).device)

    trainer = L.Trainer(max_steps=2, accelerator="gpu" if cuda else "cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Probe()])
    trainer.fit(model, datamodule=dm)
    out["trained_params"] = sum(p.numel() for opt in trainer.optimizers for g in opt.param_groups for p in g["params"])
    out["device"] = "cuda" if cuda else "cpu"
    return out


NOTES = {
    "baseline": "full generator, full fake score (fp32 copies), fp32 teacher",
    "gradient_checkpointing": "student and fake score",
    "student_lora": "rank 4; base = the teacher's own tensors (student_lora.base: shared, the default)",
    "fake_score_lora": "rank 4; base = the teacher's own tensors",
    "teacher_bf16": "data.teacher_dtype bfloat16",
    "teacher_offload": "",
    "all": "checkpointing + both LoRAs + bf16 teacher",
}


def render_markdown(results: dict) -> str:
    """The table of ``benchmarks/results/memory_options.md`` from the json."""
    m = results["machine"]
    device = "CUDA" if m["cuda"] else "CPU (no GPU on this machine)"
    lines = [
        "# Peak memory of one DMD2 training step per memory option (#23 item 4)", "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, device {device}; {m['time_utc']}; "
        f"load average {m['load_avg_start'][0]:.1f} at the start, {m['load_avg_end'][0]:.1f} at the end (shared machine).", "",
        "What is measured (see the script's docstring): DMD2's debug preset with a critic and a generator update in every "
        "iteration; the second iteration is measured. `state` = parameters (each tensor once: a LoRA fake score's base is "
        "the teacher's), gradients and optimiser state held at the start of the step; `step growth` = the allocator's peak "
        "during the step above its start (CPU: torch.profiler memory events, operator granularity); `peak` = state + growth. "
        "Step time is wall time on a loaded shared CPU: only its ratios mean anything.", "",
    ]
    for stack, run in results["runs"].items():
        title = {"sd3": "Tiny SD3 stack (tests/_sd3.py: 2-layer SD3Transformer2DModel, 8x8 latents, two tiny CLIP encoders, VAE)",
                 "digits": "Bundled digits teacher (`--data.teacher bundled:digits`, UNet2DModel 1.1 M parameters, 16x16)"}[stack]
        lines += [f"## {title}, batch {run['batch_size']}", "",
                  "| option | trained params | state MB | of which optimiser MB | step growth MB | peak MB | peak vs baseline | step s | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        base = run["options"].get("baseline", {}).get("peak_mb")
        for option, row in run["options"].items():
            if "error" in row:
                lines.append(f"| {option} | error: {row['error'][-200:]!r} | | | | | | | |")
                continue
            note = NOTES.get(option, "")
            if option == "teacher_offload" and row.get("device") == "cpu":
                note = ("a no-op on a CPU run (the teacher's weights never leave the CPU): its GPU saving was not "
                        "measured here (no GPU)")
            if row.get("rerun"):
                note = f"{note}; {row['rerun']}"
            ratio = f"{row['peak_mb'] / base:.2f}x" if base else ""
            lines.append(
                f"| {option} | {row['trained_params']:,} | {row['state_mb']:.2f} | {row['optimizer_mb']:.2f} | "
                f"{row['step_growth_mb']:.2f} | {row['peak_mb']:.2f} | {ratio} | {row['step_s']:.2f} | {note} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stacks", nargs="*", default=["sd3", "digits"])
    ap.add_argument("--options", nargs="*", default=list(OPTIONS))
    ap.add_argument("--batch-size", type=int, default=None, help="default: 4 (sd3), 32 (digits)")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="json path; the markdown table is written beside it (.md)")
    ap.add_argument("--render", default=None, help="only write the .md table of an existing json")
    args = ap.parse_args()
    if args.render:
        results = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(render_markdown(results))
        return
    if args.child:
        stack, option = args.child
        print("RESULT", json.dumps(measure(stack, option, args.batch_size)))
        return
    import torch

    results = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available(), "load_avg_start": os.getloadavg(),
                    "time_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "runs": {},
    }
    for stack in args.stacks:
        batch = args.batch_size or {"sd3": 4, "digits": 32}[stack]
        results["runs"][stack] = {"batch_size": batch, "options": {}}
        for option in args.options:
            proc = subprocess.run([sys.executable, __file__, "--child", stack, option, "--batch-size", str(batch)],
                                  capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            row = json.loads(line[0][7:]) if line else {"error": proc.stderr[-800:]}
            results["runs"][stack]["options"][option] = row
            print(stack, option, json.dumps(row), flush=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        Path(args.out).with_suffix(".md").write_text(render_markdown(results))


if __name__ == "__main__":
    main()
