"""Shared adversarial machinery: GAN losses and R1 penalties as pure functions (used by ADD, APT, DMD2).

Every function takes discriminator logits (any shape; averaged) and returns a scalar loss.
"""

from __future__ import annotations

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


def r1_penalty(discriminator: nn.Module | callable, real: Tensor, **kwargs) -> Tensor:
    """True R1 (Mescheder et al. 2018): E ||grad_x D(x)||^2 on real data (double backward).

    Returns the mean over the batch of the squared gradient norm, without the gamma / 2 factor.
    """
    real = real.detach().requires_grad_(True)
    logits = discriminator(real, **kwargs)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def approx_r1_penalty(discriminator: nn.Module | callable, real: Tensor, sigma: float = 0.01, **kwargs) -> Tensor:
    """Approximated R1 (Lin et al. 2025, APT): E ||D(x) - D(x + sigma n)||^2, no double backward."""
    noisy = real + sigma * torch.randn_like(real)
    diff = discriminator(real, **kwargs) - discriminator(noisy, **kwargs)
    return diff.pow(2).flatten(1).sum(1).mean() if diff.ndim > 1 else diff.pow(2).mean()


GAN_LOSSES = {"hinge": (hinge_d_loss, hinge_g_loss), "non_saturating": (ns_d_loss, ns_g_loss)}
