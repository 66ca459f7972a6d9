"""Does the sampling EMA's length matter? Post-hoc weight averages of one run, scored by the evaluate protocol.

A run trained with the ``Snapshots`` callback below (raw student weights every N steps) is averaged after
the fact with several profiles, each written as a copy of the run's exported pipeline and scored at each
evaluation noise seed (FD averaged over them, as ``seeds --eval-seeds``). Each step's weights enter an
exponential average with per-step decays b_n as c_n = (1 - b_n) prod_{j > n} b_j (b_1 = 0: the first
update copies, as ``AveragedModel`` does); a snapshot stands for the ``every`` steps up to it.

Profiles: ``cur`` the EMA callback's default (decay 0.995 with the (1 + k) / (10 + k) warm-up; checked
against the run's own export), ``raw`` the last weights, ``powG`` the power-function EMA of Karras et al.
2024 (EDM2), b_n = (1 - 1/n)^(G + 1), which weighs step n's weights by about n^G, ``lastK`` the uniform
mean of the last K steps.

    PYTHONPATH=benchmarks lightning-distill fit --config benchmarks/results/main_job/posthoc_ema/config.yaml \\
        --seed_everything S --model.init_args.seed S --trainer.default_root_dir runs/posthoc/seed_S
    python benchmarks/posthoc_ema.py runs/posthoc/seed_S --teacher bundled:digits --eval-seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import lightning as L
import torch

from lightning_distill.callbacks.ema import ema_decay

PROFILES = ("cur", "raw", "pow2", "pow4", "pow16", "last200", "last400")


class Snapshots(L.Callback):
    """Save ``pl_module.student``'s raw state dict every ``every`` global steps as ``dirpath/stepNNNNN.pt``."""

    def __init__(self, dirpath: str, every: int = 10) -> None:
        self.dirpath, self.every = Path(dirpath), every

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step % self.every == 0:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            sd = {k: v.detach().cpu().clone() for k, v in pl_module.student.state_dict().items()}
            torch.save(sd, self.dirpath / f"step{trainer.global_step:05d}.pt")


def exponential_weights(decays: list[float]) -> list[float]:
    """c_n = (1 - b_n) prod_{j > n} b_j for n = 1..N, with b_1 taken as 0 (the first update copies)."""
    c, tail = [0.0] * len(decays), 1.0
    for n in range(len(decays) - 1, -1, -1):
        b = 0.0 if n == 0 else decays[n]
        c[n], tail = (1 - b) * tail, tail * b
    return c


def profile_weights(name: str, num_steps: int) -> list[float]:
    """The weight of each step's (1..N) raw weights in profile ``name``; they sum to 1."""
    steps = range(1, num_steps + 1)
    if name == "raw":
        return [0.0] * (num_steps - 1) + [1.0]
    if name == "cur":  # the EMA callback's default schedule; update n follows k = n - 1 earlier updates
        return exponential_weights([ema_decay(n - 1, 0.995, warmup=True) for n in steps])
    if name.startswith("pow"):
        g = float(name[3:])
        return exponential_weights([(1 - 1 / n) ** (g + 1) for n in steps])
    if name.startswith("last"):
        k = int(name[4:])
        return [1.0 / k if n > num_steps - k else 0.0 for n in steps]
    raise ValueError(f"unknown profile {name!r}; choose from {PROFILES}")


def average_snapshots(snap_dir: Path, name: str, prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """The profile's average of the snapshots: the entries under ``prefix`` (the exported UNet's), prefix dropped."""
    files = sorted(snap_dir.glob("step*.pt"))
    steps = [int(f.stem[4:]) for f in files]
    every = steps[1] - steps[0]
    c = profile_weights(name, steps[-1])
    final = torch.load(files[-1], weights_only=True)
    acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in final.items() if v.is_floating_point()}
    for f, s in zip(files, steps):
        w = sum(c[n - 1] for n in range(s - every + 1, s + 1))
        if w:
            sd = final if f == files[-1] else torch.load(f, weights_only=True)
            for k in acc:
                acc[k] += w * sd[k].double()
    out = {k: acc[k].to(v.dtype) if k in acc else v for k, v in final.items()}
    return {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run folder with snapshots/ and student/ (its export)")
    p.add_argument("--teacher", default="bundled:digits")
    p.add_argument("--steps", type=int, nargs="+", default=[2])
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--profiles", nargs="+", default=list(PROFILES))
    args = p.parse_args(argv)
    from diffusers import DiffusionPipeline

    from lightning_distill.evaluate import evaluate_models

    students, out_root = {}, args.run / "posthoc"
    for name in args.profiles:
        dst = out_root / name
        if not (dst / "model_index.json").exists():
            pipe = DiffusionPipeline.from_pretrained(args.run / "student")
            sd = average_snapshots(args.run / "snapshots", name)
            if name == "cur":
                ref = pipe.unet.state_dict()
                diff = max((ref[k].float() - sd[k].float()).abs().max().item() for k in ref)
                print(f"cur against the run's exported EMA: max abs weight difference {diff:.1e}", flush=True)
            pipe.unet.load_state_dict(sd)
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            pipe.save_pretrained(tmp)
            os.replace(tmp, dst)
        students[name] = str(dst)
    fds: dict[str, list[float]] = {}
    for seed in args.eval_seeds:
        rows = evaluate_models(args.teacher, students, steps=args.steps, teacher_steps=[], seed=seed,
                               out_dir=out_root / f"eval_seed{seed}", kid_subsets=10, real_baseline=False)
        for r in rows:
            fds.setdefault(f"{r['model']}@{r['steps']}", []).append(r["fd"])
    summary = {k: {"per_eval_seed": v, "mean": sum(v) / len(v)} for k, v in fds.items()}
    (out_root / "summary.json").write_text(json.dumps(summary, indent=1))
    for k, v in summary.items():
        print(k, [round(x, 4) for x in v["per_eval_seed"]], "mean", round(v["mean"], 4))
    return summary


if __name__ == "__main__":
    main()
