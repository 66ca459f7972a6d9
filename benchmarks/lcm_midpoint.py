"""Does the 2-step sampler's intermediate timestep hold back an exported consistency student?

``LCMScheduler`` at 2 steps visits the top of the training grid and the grid's middle (for the main job's
8-point grid on T = 1024: t = 1023, then 511). Consistency-model papers tune that midpoint for 2-step
sampling (Song et al. 2023 pick it by search), so this scores each exported student with the midpoint
moved to every other grid point, through ``LCMScheduler.set_timesteps(timesteps=[T - 1, m])`` (the stock
scheduler's custom-timestep path, which diffusers pipelines expose as ``timesteps=``). Protocol as evaluate:
2,000 samples in per-chunk noise seeds, digits train split, digits classifier.

    python benchmarks/lcm_midpoint.py runs/trials_ema/seeds_vp/seed_{0,1,2}/student --eval-seed 0 \\
        --out benchmarks/results/main_job/trials4/lcm_midpoint.json

The grid midpoint's row equals what evaluate reports for the same export at 2 steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor

from lightning_distill import backbones
from lightning_distill.evaluate import load_pipeline_folder, reference_images
from lightning_distill.metrics import feature_net_name, generated_features, get_feature_net, reference_stats, score_features
from lightning_distill.sampling import lcm_training_timesteps


def two_step_sampler(unet, scheduler, midpoint: int):
    top = scheduler.config.num_train_timesteps - 1
    shape = backbones.sample_shape(unet)

    @torch.no_grad()
    def sample(n: int, g: torch.Generator, labels) -> torch.Tensor:
        scheduler.set_timesteps(timesteps=[top, midpoint])
        x = randn_tensor((n, *shape), generator=g)  # DDPMPipeline's draw, as evaluate's loop
        for t in scheduler.timesteps:
            x = scheduler.step(backbones.call(unet, x, t).float(), t, x, generator=g).prev_sample
        return x

    return sample


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("students", nargs="+", type=Path, help="exported LCMScheduler pipeline folders")
    p.add_argument("--midpoints", type=int, nargs="+", help="default: every interior grid point")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    net = get_feature_net("digits")
    rows, refs = [], {}
    for folder in a.students:
        unet, sched, _ = load_pipeline_folder(folder)
        if type(sched).__name__ != "LCMScheduler":
            raise SystemExit(f"lcm_midpoint.py: {folder} samples with {type(sched).__name__}, not LCMScheduler")
        T, n_grid = sched.config.num_train_timesteps, sched.config.original_inference_steps
        grid = lcm_training_timesteps(T, n_grid).tolist()
        sched.set_timesteps(2)
        default = int(sched.timesteps[-1])
        size = backbones.sample_shape(unet)[-1]
        if size not in refs:  # one reference per image size, not one per student
            images, _ = reference_images("digits", size, "train", 0, 0.1, None)
            refs[size] = reference_stats(images, net, None, device="cpu")
        ref = refs[size]
        for m in a.midpoints or grid[:-1]:
            feats = generated_features(two_step_sampler(unet, sched, m), net, a.num_samples, a.eval_seed, 250, None,
                                       device="cpu")
            fd = score_features(feats, ref, kid=False).fd
            rows.append(dict(student=str(folder), midpoint=m, default_midpoint=default, fd=fd))
            print(f"{folder}: midpoint {m}{' (default)' if m == default else ''}: FD {fd:.4f}", flush=True)
    by_mid: dict[int, list[float]] = {}
    for r in rows:
        by_mid.setdefault(r["midpoint"], []).append(r["fd"])
    summary = {m: dict(median=statistics.median(v), min=min(v), max=max(v)) for m, v in sorted(by_mid.items())}
    for m, s in summary.items():
        print(f"midpoint {m}: median {s['median']:.4f} [{s['min']:.4f}, {s['max']:.4f}] over {len(by_mid[m])} students")
    result = dict(rows=rows, median_by_midpoint=summary, num_samples=a.num_samples, eval_seed=a.eval_seed,
                  feature_net=feature_net_name(net), reference=f"digits train split ({ref.num_images} images)")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
