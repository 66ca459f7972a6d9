"""Which intervals has a MeanFlow student learned? Its average velocity against the teacher's ODE, per interval.

From one Gaussian draw at the top of the teacher's path (flow time ``t_max``: 1 on the flow path, the VP
table's last level otherwise) the teacher's probability-flow ODE is integrated in flow time (Heun, uniform
grid) to 0. For each pair r < t of the listed flow times the true average velocity of the teacher's flow is
u* = (z_t - z_r) / (t - r), with z on the integrated trajectory; the script reports the student's relative
error ||u_theta(z_t, r, t) - u*||^2 / ||u*||^2 (summed over the batch) and, for reference, that of the
teacher's instantaneous velocity v(z_t, t), which is the student's output at initialisation; and, in pixel
units, the mean and root-mean-square of the student's landing point z_r minus the ODE's. The pair (0, t_max)
is the one-step sampler's interval.

    python benchmarks/meanflow_interval_error.py \\
        --checkpoint runs/seeds/meanflow_digits/seed_0/checkpoints/last.ckpt \\
        --out benchmarks/results/meanflow_digits/interval_error.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from lightning_distill.evaluate import load_checkpoint_model
from lightning_distill.methods.meanflow import average_velocity, flow_velocity


def teacher_trajectory(den, z_top: torch.Tensor, t_max: float, ode_steps: int) -> tuple[torch.Tensor, list]:
    """(grid, states): Heun's method in flow time from t_max to 0 on a uniform grid of ``ode_steps`` steps; the
    last step is Euler's, so that the teacher is never called at t = 0 (the clean end, outside its training)."""
    grid = torch.linspace(t_max, 0.0, ode_steps + 1, dtype=torch.float64)
    z, states, n = z_top, [z_top], z_top.shape[0]
    for k in range(ode_steps):
        h = float(grid[k + 1] - grid[k])
        v = flow_velocity(den, z, grid[k].float().expand(n)).float()
        last = k == ode_steps - 1
        v_next = v if last else flow_velocity(den, z + h * v, grid[k + 1].float().expand(n)).float()
        z = z + h * 0.5 * (v + v_next)
        states.append(z)
    return grid, states


def relative_error(u: torch.Tensor, u_star: torch.Tensor) -> float:
    return float((u - u_star).square().sum() / u_star.square().sum())


@torch.no_grad()
def interval_errors(model, n: int, seed: int, ode_steps: int, times: list[float]) -> list[dict]:
    """One row per pair r < t of ``times`` (1 stands for ``model.t_max``) for a ``MeanFlowDistillation``."""
    student, teacher = model.student, model.teacher.denoiser
    cfg = student.unet.config
    z_top = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=torch.Generator().manual_seed(seed))
    grid, states = teacher_trajectory(teacher, z_top, model.t_max, ode_steps)

    def state_at(time: float) -> tuple[float, torch.Tensor]:
        k = int(torch.argmin((grid - min(time, model.t_max)).abs()))
        return float(grid[k]), states[k]

    rows = []
    levels = sorted({state_at(x)[0] for x in times}, reverse=True)
    for i, t in enumerate(levels):
        _, z_t = state_at(t)
        tt = torch.full((n,), t)
        v = flow_velocity(teacher, z_t, tt).float()
        for r in levels[i + 1:]:
            _, z_r = state_at(r)
            u_star = (z_t - z_r) / (t - r)
            u = average_velocity(student, z_t, torch.full((n,), r), tt).float()
            offset = (t - r) * (u_star - u)  # the student's z_r minus the ODE's
            rows.append({"t": round(t, 5), "r": round(r, 5), "student": relative_error(u, u_star),
                         "teacher_velocity": relative_error(v, u_star),
                         "student_mean_offset": float(offset.mean()),
                         "student_rms_error": float(offset.square().mean().sqrt())})
    return rows


def diagnose(checkpoint: str, n: int, seed: int, ode_steps: int, times: list[float]) -> dict:
    model, used_ema = load_checkpoint_model(checkpoint, use_ema=True)
    model.eval()
    step = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    return {"checkpoint": checkpoint, "step": int(step), "ema": bool(used_ema), "teacher_path": model.teacher.denoiser.path,
            "t_max": model.t_max, "intervals": interval_errors(model, n, seed, ode_steps, times)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", nargs="+", required=True, help="MeanFlowDistillation training checkpoints")
    p.add_argument("--n", type=int, default=256, help="trajectories (one batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ode-steps", type=int, default=200, help="Heun steps of the teacher's ODE from t_max to 0")
    p.add_argument("--times", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25, 0.0],
                   help="flow times whose pairs are checked (1 stands for t_max)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    result = {"command": "python " + " ".join(sys.argv), "n": a.n, "seed": a.seed, "ode_steps": a.ode_steps,
              "checkpoints": [diagnose(ck, a.n, a.seed, a.ode_steps, a.times) for ck in a.checkpoint]}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
