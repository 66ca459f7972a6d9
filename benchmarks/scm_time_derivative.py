"""How smooth is a teacher-initialised sCD student in time? The diagnostic behind the scm presets' settings.

At initialisation the student is the teacher. For a batch of digits at the presets' TrigFlow time proposal
this compares the exact dF/dt (forward-mode JVP) with central differences over h radians: their relative
distance, and the cosine between the tangents g they give (``scm_tangent``, r = 1). A smooth F would make
the distance O(h^2); the cosine says how much of the exact tangent's direction survives smoothing.

    python benchmarks/scm_time_derivative.py --out benchmarks/results/scm_digits_flow/time_derivative.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from lightning_distill.data import load_digits_tensor
from lightning_distill.methods.scm import sample_trigflow_time, scm_tangent, trigflow_jvp, trigflow_output
from lightning_distill.parametrisation import expand_like
from lightning_distill.teacher import load_teacher


def compare(teacher: str, steps: list[float], batch: int, sigma_data: float, seed: int) -> dict:
    torch.manual_seed(seed)
    den = load_teacher(teacher).denoiser
    x, _ = load_digits_tensor(16)
    x0 = x[torch.randperm(x.shape[0])[:batch]].float()
    t = sample_trigflow_time(batch, -0.8, 1.6, sigma_data)
    x_t = expand_like(torch.cos(t), x0) * x0 + expand_like(torch.sin(t), x0) * torch.randn_like(x0) * sigma_data

    def F_fn(a, b):
        return trigflow_output(den, a, b, sigma_data)

    def norm(a):
        return torch.linalg.vector_norm(a.flatten(1), dim=1)

    with torch.no_grad():
        dxt_dt = sigma_data * F_fn(x_t, t)
        F, dF_exact = trigflow_jvp(F_fn, x_t, t, dxt_dt, "forward")
        g_exact = scm_tangent(F, dF_exact, dxt_dt, x_t, t, sigma_data, 1.0)
        rows = []
        for h in steps:
            _, dF_h = trigflow_jvp(F_fn, x_t, t, dxt_dt, "finite_difference", h)
            g_h = scm_tangent(F, dF_h, dxt_dt, x_t, t, sigma_data, 1.0)
            cos = (g_exact * g_h).flatten(1).sum(1) / (norm(g_exact) * norm(g_h))
            rows.append({
                "h_rad": h,
                "dF_dt_relative_distance_median": float((norm(dF_h - dF_exact) / norm(dF_exact)).median()),
                "tangent_cosine_mean": float(cos.mean()),
                "tangent_norm_median": float(norm(g_h).median()),
            })
    return {"teacher": teacher, "batch": batch, "seed": seed, "exact_tangent_norm_median": float(norm(g_exact).median()),
            "fraction_exact_tangent_norm_above_1": float((norm(g_exact) > 1).float().mean()), "finite_differences": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", nargs="+", default=["bundled:digits-flow", "bundled:digits"])
    p.add_argument("--steps", nargs="+", type=float, default=[1e-4, 5e-3, 0.02])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    result = {"command": "python " + " ".join(sys.argv),
              "teachers": [compare(t, a.steps, a.batch, 0.5, a.seed) for t in a.teachers]}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
