"""GAN losses and R1 penalties, pure functions of discriminator logits (ADD, APT, DMD2's GAN head).

Logit convention: a discriminator returns logits of shape (B, L) (L = one per head, or one per
spatial position of every head). The GAN losses average over all of them; the R1 penalties treat
the per-sample mean over L as "D(x)" (one number per image, as in the papers' single-logit
discriminators). With many logits that mean is smoother than each logit, so the penalty a given weight
buys shrinks as L grows (roughly like 1 / L for independent spatial logits): tune the R1 weight per
discriminator layout.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge loss for D (Lim & Ye 2017): E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """Hinge loss for G: -E[D(G(z))]."""
    return -fake_logits.mean()


def ns_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Non-saturating (logistic) D loss: E[softplus(-D(x))] + E[softplus(D(G(z)))]."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def ns_g_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating G loss (Goodfellow et al. 2014): E[softplus(-D(G(z)))] = -E[log sigmoid D(G(z))]."""
    return F.softplus(-fake_logits).mean()


GAN_LOSSES = {"hinge": (hinge_d_loss, hinge_g_loss), "non_saturating": (ns_d_loss, ns_g_loss)}
GanLoss = Literal["hinge", "non_saturating"]


def _per_sample(logits: Tensor) -> Tensor:
    """D(x) as one number per sample: the mean over every logit of that sample."""
    return logits.flatten(1).mean(1) if logits.ndim > 1 else logits


def _math_attention():
    """Double backward (true R1) needs the math SDPA kernel: flash / memory-efficient kernels lack it."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    except ImportError:  # pragma: no cover - old torch
        return nullcontext()


def r1_penalty(discriminator: nn.Module | Callable, real: Tensor, **kwargs) -> Tensor:
    """True R1 (Mescheder et al. 2018, Eq. 9): E ||grad_x D(x)||^2 on real data (double backward).

    Returns the mean over the batch of the squared gradient norm, without the gamma / 2 factor (the
    caller's weight is gamma / 2). D(x) is the per-sample mean logit (see the module docstring).
    Computed with autocast off: under fp16 autocast the inner input gradient is not loss-scaled, so its
    half-precision intermediates would underflow (or, scaled, overflow) and silently change the penalty.
    """
    real = real.detach().requires_grad_(True)
    with _math_attention(), torch.autocast(real.device.type, enabled=False):
        logits = discriminator(real, **kwargs)
        (grad,) = torch.autograd.grad(_per_sample(logits).float().sum(), real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def approx_r1_penalty(
    discriminator: nn.Module | Callable,
    real: Tensor,
    sigma: float = 0.01,
    noise: Tensor | None = None,
    real_logits: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """Approximated R1 (Lin et al. 2025, APT): E (D(x) - D(x + sigma n))^2, no double backward.

    For small sigma this is sigma^2 E ||grad_x D(x)||^2 projected on random directions, so it pulls D
    towards flatness on real data like R1 at the cost of one extra forward pass. The caller's weight
    (APT: about 100) multiplies it.

    Args:
        discriminator: maps images (and ``kwargs``) to logits. Any randomness inside it (APT's
            diffusion noise) must be fixed by the caller, or the difference measures that noise.
        real: real images.
        sigma: perturbation scale.
        noise: the perturbation direction n (standard normal); drawn with ``randn_like`` when None.
        real_logits: ``discriminator(real)`` when the caller already has it (with its graph, as the D
            loss computes it): re-used instead of a second forward pass on the real images.
    """
    noise = torch.randn_like(real) if noise is None else noise
    noisy = real + sigma * noise
    # The difference is about sigma ||grad D||, below bf16's three digits: both passes run with autocast off
    # (a caller's logits from an autocast pass are recomputed), as the true R1 does.
    mixed = torch.is_autocast_enabled(real.device.type)
    with torch.autocast(real.device.type, enabled=False):
        if real_logits is None or mixed:
            real_logits = discriminator(real, **kwargs)
        diff = _per_sample(real_logits).float() - _per_sample(discriminator(noisy, **kwargs)).float()
    return diff.pow(2).mean()


def discriminator_accuracy(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Fraction of real samples with D(x) > 0 and of fake samples with D(G(z)) < 0."""
    return (_per_sample(real_logits) > 0).float().mean(), (_per_sample(fake_logits) < 0).float().mean()


__all__ = [
    "GAN_LOSSES",
    "GanLoss",
    "approx_r1_penalty",
    "discriminator_accuracy",
    "hinge_d_loss",
    "hinge_g_loss",
    "ns_d_loss",
    "ns_g_loss",
    "r1_penalty",
]
