"""Where does a MeanFlow distillation step's gradient come from? The diagnostic behind the meanflow presets' loss weight.

For a batch of digits at the presets' (r, t) proposal this evaluates a training checkpoint's (raw, not EMA)
student and the MeanFlow target, and splits the per-sample error Delta = u - u_tgt into the r = t samples
(plain flow matching on the teacher's velocity, which the teacher-initialised student already fits) and
the r != t ones (the intervals it must learn). For adaptive weight powers p it reports each group's
share of the summed per-sample gradient norms at the output, ||d/du sg(w) ||Delta||^2|| = 2 ||Delta|| /
(||Delta||^2 + c)^p: with p = 1 that is 2 / ||Delta|| for small errors, so near-zero r = t errors get the
largest gradients.

    python benchmarks/meanflow_loss_weight.py --checkpoint runs/mf/fd01/checkpoints/last.ckpt \\
        --out benchmarks/results/meanflow_digits_flow/loss_weight.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from lightning_distill.data import load_digits_tensor
from lightning_distill.evaluate import load_checkpoint_model
from lightning_distill.methods.meanflow import (
    average_velocity, flow_interpolate, flow_velocity, meanflow_target, sample_interval, total_derivative,
)


def diagnose(checkpoint: str, batch: int, powers: list[float], c: float, seed: int) -> dict:
    model, _ = load_checkpoint_model(checkpoint, use_ema=False)
    model.eval()
    hp = model.hparams
    gen = torch.Generator().manual_seed(seed)
    x, _ = load_digits_tensor(16)
    x0 = x[torch.randperm(x.shape[0], generator=gen)[:batch]].float()
    r, t = sample_interval(batch, hp.time_mean, hp.time_std, hp.ratio_r_neq_t, generator=gen)
    t = t.clamp(max=model.t_max)
    r = torch.minimum(r, t)
    z = flow_interpolate(x0, torch.randn(x0.shape, generator=gen), t)
    with torch.no_grad():
        v = flow_velocity(model.teacher.denoiser, z, t).float()
        u, du_dt = total_derivative(lambda a, b: average_velocity(model.student, a, r, b).float(), z, t, v,
                                    "finite_difference", hp.finite_difference_step, model.t_max)
    err = torch.linalg.vector_norm((u - meanflow_target(v, du_dt, r, t)).flatten(1), dim=1)
    same = r >= t
    rows = []
    for p in powers:
        grad = 2 * err / (err.square() + c).pow(p)
        rows.append({"power": p, "share_r_eq_t": float(grad[same].sum() / grad.sum()),
                     "median_grad_norm_r_eq_t": float(grad[same].median()),
                     "median_grad_norm_r_neq_t": float(grad[~same].median())})
    return {
        "checkpoint": checkpoint, "step": int(torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]),
        "batch": batch, "seed": seed, "c": c, "fraction_r_eq_t": float(same.float().mean()),
        "median_error_norm_r_eq_t": float(err[same].median()), "median_error_norm_r_neq_t": float(err[~same].median()),
        "weights": rows,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", nargs="+", required=True, help="MeanFlowDistillation training checkpoints")
    p.add_argument("--powers", nargs="+", type=float, default=[1.0, 0.5, 0.0])
    p.add_argument("--c", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    result = {"command": "python " + " ".join(sys.argv),
              "checkpoints": [diagnose(ck, a.batch, a.powers, a.c, a.seed) for ck in a.checkpoint]}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
