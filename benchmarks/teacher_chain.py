"""FD of the trajectory a consistency student is trained to reproduce: the teacher's own ODE chain on the CD grid.

Consistency distillation regresses f(x_{t_{n+k}}) onto f_minus(Phi(x_{t_{n+k}})), where Phi is the teacher's
solver over one grid interval (``solver_substeps`` steps of ``solver``). A perfect student therefore outputs
what chaining Phi from t = T - 1 down to 0 outputs. This samples that chain (pure noise at the top of the
grid, ``lcm_training_timesteps`` intervals, the last one ending at t = 0) and scores it with the evaluate
protocol (2,000 samples, chunked per-chunk noise seeds, digits train split, digits classifier), so the
student's gap to its targets and the targets' gap to the teacher's 50-step DDIM can be told apart.

    python benchmarks/teacher_chain.py --grid 8:2 4:2 8:1 --eval-seed 0 --out benchmarks/results/main_job/trials3/teacher_chain.json

``--grid N:M``: N grid points (``original_inference_steps``), M solver substeps per interval.
VP teachers only (the chain starts from unit noise, as LCMScheduler does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_distill.evaluate import reference_images
from lightning_distill.methods.consistency import skipped_timesteps, solve_ode
from lightning_distill.metrics import feature_net_name, generated_features, get_feature_net, reference_stats, score_features
from lightning_distill.sampling import lcm_training_timesteps
from lightning_distill.teacher import load_teacher


def chain_sampler(teacher, grid_points: int, substeps: int, solver: str):
    den = teacher.denoiser
    schedule = den.schedule
    T = schedule.num_train_timesteps
    k = T // grid_points
    levels = lcm_training_timesteps(T, grid_points).flip(0)
    shape = (teacher.in_channels, teacher.sample_size, teacher.sample_size)

    @torch.no_grad()
    def sample(n: int, g: torch.Generator, labels) -> torch.Tensor:
        x = torch.randn(n, *shape, generator=g)
        for t in levels:
            t_start = torch.full((n,), int(t))
            x = solve_ode(den, schedule, x, t_start, skipped_timesteps(t_start, k), solver, substeps)
        return x.clamp(-1, 1)

    return sample


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="bundled:digits")
    p.add_argument("--grid", nargs="+", default=["8:2"], help="N:M, N grid points and M solver substeps")
    p.add_argument("--solver", default="heun", choices=["heun", "ddim"])
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    teacher = load_teacher(a.teacher)
    if teacher.denoiser.path != "vp" or teacher.is_latent:
        raise SystemExit(f"teacher_chain.py: {a.teacher} is not a pixel-space VP teacher")
    net = get_feature_net("digits")
    images, _ = reference_images("digits", teacher.sample_size, "train", 0, 0.1, None)
    ref = reference_stats(images, net, None, device="cpu")
    rows = []
    for spec in a.grid:
        n_grid, substeps = (int(v) for v in spec.split(":"))
        feats = generated_features(chain_sampler(teacher, n_grid, substeps, a.solver), net, a.num_samples, a.eval_seed,
                                   250, None, device="cpu")
        fd = score_features(feats, ref, kid=False).fd
        rows.append(dict(grid=n_grid, substeps=substeps, solver=a.solver, fd=fd, num_samples=a.num_samples,
                         eval_seed=a.eval_seed, feature_net=feature_net_name(net), reference=f"digits train split ({ref.num_images} images)"))
        print(f"grid {n_grid}, {substeps} {a.solver} substep(s): chain FD {fd:.4f}", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(dict(teacher=a.teacher, rows=rows), indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
