"""The metric's own checks (``python -m lightning_distill.evaluate --fd-checks``): FD / KID's noise floor
between halves of the real digits, their response to added noise, and the report's sampling determinism."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .evaluate import check_text_inputs, load_sampler, teacher_sampler
from .metrics import (
    ReferenceStats, extract_features, fd_from_features, feature_net_name, gaussian_stats, generated_features, get_feature_net,
    kernel_distance, score_features,
)
from .teacher import load_teacher


def fd_checks(
    out_path: str | os.PathLike,
    feature_net: str | nn.Module = "digits",
    image_size: int = 16,
    model: str | os.PathLike | None = None,
    model_steps: int = 4,
    num_samples: int = 500,
    splits: int = 5,
    noise_levels: Sequence[float] = (0.0, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8),
    device: str | None = None,
) -> dict:
    """Measure the metric's noise floor, its response to noise, and its determinism; write markdown.

    * noise floor: FD / KID between two random disjoint halves of all digits (``splits`` splits);
    * monotonicity: FD of half B plus Gaussian noise of std ``sigma`` (in [-1, 1] units) against half A,
      and of half A plus noise against half A itself (the noise's effect without the split's);
    * determinism: ``model`` (a ``.ckpt`` file, or a teacher source sampled with DDIM) sampled twice with seed 0 and
      once with seed 1 through the report's own sampling path.
    """
    from .data import load_digits_tensor

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = get_feature_net(feature_net).to(device)
    name = feature_net_name(net)
    images = load_digits_tensor(image_size)[0]
    n = images.shape[0]
    floor = []
    for k in range(splits):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(k))
        a, b = images[perm[: n // 2]], images[perm[n // 2 :]]
        fa, fb = extract_features(net, a, device=device), extract_features(net, b, device=device)
        kid, _ = kernel_distance(fa, fb, 100, 1000, generator=torch.Generator().manual_seed(0))
        floor.append((fd_from_features(fa, fb), kid))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    a, b = images[perm[: n // 2]], images[perm[n // 2 :]]
    fa = extract_features(net, a, device=device)
    noise = torch.randn(b.shape, generator=torch.Generator().manual_seed(1))

    noise_a = torch.randn(a.shape, generator=torch.Generator().manual_seed(2))
    mono = []
    for sigma in noise_levels:
        fb = extract_features(net, b + sigma * noise, device=device)
        fa_noisy = extract_features(net, a + sigma * noise_a, device=device)
        kid, _ = kernel_distance(fa, fb, 100, 1000, generator=torch.Generator().manual_seed(0))
        mono.append((sigma, fd_from_features(fa, fb), kid, fd_from_features(fa, fa_noisy)))
    fds = [m[1] for m in mono]
    fds_same = [m[3] for m in mono]
    det = []
    if model is not None:
        # A checkpoint file goes through the student path; anything else is a teacher source (DDIM).
        if Path(model).is_file():
            sampler = load_sampler("model", model, None, device)
        else:
            sampler = teacher_sampler(load_teacher(str(model)).to(device))
        check_text_inputs(sampler, None)  # the digits checks have no prompts: a text model is refused in one line
        refstats = ReferenceStats(*gaussian_stats(fa), fa, "half-A", name)
        for seed in (0, 0, 1):
            f = generated_features(lambda m, g, lab: sampler.sample(m, model_steps, g, lab), net, num_samples, seed, device=device)
            sc = score_features(f, refstats, True, 100, 1000, seed)
            det.append((seed, sc.fd, sc.kid))
    lines = [
        f"# FD-{name.split('-')[0]} checks: noise floor, monotonicity, determinism",
        "",
        f"Feature network: **{name}** ({getattr(net, 'num_features', '?')}-d penultimate features of the bundled "
        f"digits classifier when `digits`). Data: all {n} scikit-learn digits at {image_size}x{image_size}, [-1, 1].",
        f"Feature scale: features multiplied by {getattr(net, 'feature_scale', 1.0):.4g} so that training images "
        "have unit mean variance per feature dimension (trace of their feature covariance = num_features).",
        "Command: `python -m lightning_distill.evaluate --fd-checks --out <dir>"
        + (f" --fd-checks-model {model} --fd-checks-steps {model_steps} --num-samples {num_samples}`" if model else "`"),
        "",
        f"## Noise floor: real vs real, two random disjoint halves ({n // 2} vs {n - n // 2} images)",
        "",
        "| split seed | FD | KID x 1e3 |",
        "|---|---|---|",
        *[f"| {k} | {fd:.4f} | {kid * 1e3:.4f} |" for k, (fd, kid) in enumerate(floor)],
        f"| mean ± std | {torch.tensor([f for f, _ in floor]).mean():.4f} ± {torch.tensor([f for f, _ in floor]).std():.4f} "
        f"| {torch.tensor([k for _, k in floor]).mean() * 1e3:.4f} ± {torch.tensor([k for _, k in floor]).std() * 1e3:.4f} |",
        "",
        "FD below this floor is not a difference; it also sets the scale of 'good' (FD is biased upwards at",
        "small sample counts, so the floor for 2000 generated vs 1617 reference images is at most about this).",
        "",
        "## Monotonicity: half B + Gaussian noise (std sigma, [-1, 1] units, clamped) vs half A",
        "",
        "| sigma | FD (B + noise vs A) | KID x 1e3 (B + noise vs A) | FD (A + noise vs A) |",
        "|---|---|---|---|",
        *[f"| {s} | {fd:.4f} | {kid * 1e3:.4f} | {fds_:.4f} |" for s, fd, kid, fds_ in mono],
        "",
        f"Monotonic increasing, B + noise vs A: **{all(x < y for x, y in zip(fds, fds[1:]))}**; "
        f"A + noise vs A: **{all(x < y for x, y in zip(fds_same, fds_same[1:]))}**.",
        "(Against the other half, noise below the noise floor can move FD either way by split noise.)",
        "",
    ]
    if det:
        lines += [
            f"## Determinism: `{model}` at {model_steps} steps, {num_samples} samples, vs half A",
            "",
            "| run | seed | FD | KID x 1e3 |",
            "|---|---|---|---|",
            *[f"| {i + 1} | {sd} | {fd!r} | {kid * 1e3!r} |" for i, (sd, fd, kid) in enumerate(det)],
            "",
            f"Same seed, same number: **{det[0][1] == det[1][1] and det[0][2] == det[1][2]}** (bit-identical); "
            f"another seed differs: **{det[0][1] != det[2][1]}**.",
            "",
        ]
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text("\n".join(lines))
    return {"floor": floor, "monotonic": mono, "determinism": det}


# --- command line --------------------------------------------------------------------------------


__all__ = ["fd_checks"]
