"""Differentiable augmentation of a discriminator's inputs (DiffAugment, Zhao et al. 2020, arXiv 2006.10738)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from ..errors import ConfigError


AUGMENT_POLICIES = ("translation", "cutout")


def check_augment_policy(policy: Sequence[str]) -> tuple[str, ...]:
    """The policy as a tuple; raises ValueError naming any augmentation that is not in ``AUGMENT_POLICIES``."""
    unknown = sorted(set(policy) - set(AUGMENT_POLICIES))
    if unknown:
        raise ConfigError(f"unknown discriminator augmentation {unknown}; choose from {list(AUGMENT_POLICIES)}")
    return tuple(policy)


@dataclass(frozen=True)
class DiscriminatorAugment:
    """Differentiable augmentation of D's inputs (DiffAugment, Zhao et al. 2020): random parameters drawn once.

    A frozen feature network is easily fooled: the generator can move its features with small pixel
    changes that fit one fixed alignment of the image. Random translations (and cutout) applied to
    real and fake images alike, differentiably so that the generator's gradient passes through, make
    such perturbations much less useful. The parameters are drawn once per iteration and indexed by
    sample position, so the real, fake and R1 evaluations of a step see the same function of the image.

    Args:
        shifts: (B, 2) integer (dy, dx) translations; pixels entering from outside repeat the border
            (digits: background), not a constant that the discriminator could key on.
        boxes: (B, 4) cutout boxes (y0, x0, y1, x1), zeroed; None: no cutout.
    """

    shifts: Tensor | None
    boxes: Tensor | None

    @classmethod
    def draw(
        cls, policy: Sequence[str], shape: Sequence[int], gen: torch.Generator | None, device,
        translation: float = 0.125, cutout: float = 0.5,
    ) -> "DiscriminatorAugment":
        """Random parameters for a batch of ``shape`` (B, C, H, W); ``translation`` / ``cutout`` are fractions of the side.

        An empty policy gives the identity and draws nothing from ``gen`` (random streams stay as without augmentation).
        """
        check_augment_policy(policy)
        b, _, h, w = shape
        shifts = boxes = None
        if "translation" in policy:
            m = max(int(round(translation * min(h, w))), 0)
            shifts = torch.randint(-m, m + 1, (b, 2), generator=gen, device=device)
        if "cutout" in policy:
            ch, cw = max(int(round(cutout * h)), 1), max(int(round(cutout * w)), 1)
            cy = torch.randint(0, h, (b,), generator=gen, device=device)
            cx = torch.randint(0, w, (b,), generator=gen, device=device)
            boxes = torch.stack([cy - ch // 2, cx - cw // 2, cy - ch // 2 + ch, cx - cw // 2 + cw], 1)
        return cls(shifts, boxes)

    def __call__(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        if self.shifts is not None:
            dy, dx = self.shifts[:n, 0], self.shifts[:n, 1]
            rows = (torch.arange(h, device=x.device)[None] - dy[:, None]).clamp(0, h - 1)  # (n, H)
            cols = (torch.arange(w, device=x.device)[None] - dx[:, None]).clamp(0, w - 1)  # (n, W)
            b = torch.arange(n, device=x.device)[:, None, None, None]
            ch = torch.arange(c, device=x.device)[None, :, None, None]
            x = x[b, ch, rows[:, None, :, None], cols[:, None, None, :]]
        if self.boxes is not None:
            y0, x0, y1, x1 = (v[:n, None, None, None] for v in self.boxes.unbind(1))
            yy = torch.arange(h, device=x.device)[None, None, :, None]
            xx = torch.arange(w, device=x.device)[None, None, None, :]
            inside = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
            x = x * (~inside).to(x.dtype)
        return x


__all__ = ["AUGMENT_POLICIES", "DiscriminatorAugment", "check_augment_policy"]
