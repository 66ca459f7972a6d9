"""Discriminators: small trainable heads on the feature maps of a feature network.

* :class:`MultiLevelHeads` / :class:`Discriminator`: one head per feature map of a feature network
  (ADD, APT), with projection conditioning.
* :class:`BottleneckClassifier` on :func:`bottleneck_features`: DMD2's GAN head on the fake score's
  mid-block features (a UNet's mid block; a transformer's middle block, its image tokens as a map).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import backbones
from ..errors import ConfigError
from ..nn_utils import capture_features, eval_mode
from .features import bottleneck_block, image_tokens, is_unet, tokens_to_map


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class _Head(nn.Module):
    """conv(3) -> GroupNorm -> LeakyReLU -> conv(1) logits, plus projection conditioning (Miyato & Koyama 2018)."""

    def __init__(self, kind: int, channels: int, hidden: int, spatial: bool, cond_dim: int | None) -> None:
        super().__init__()
        self.kind, self.spatial = kind, spatial
        if kind == 4:
            self.body = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(_groups(hidden), hidden), nn.LeakyReLU(0.2))
        elif kind == 3:
            self.body = nn.Sequential(nn.Conv1d(channels, hidden, 3, padding=1), nn.GroupNorm(_groups(hidden), hidden), nn.LeakyReLU(0.2))
        else:
            self.body = nn.Sequential(nn.Linear(channels, hidden), nn.LeakyReLU(0.2))
        self.out = nn.Linear(hidden, 1)
        self.proj = nn.Linear(cond_dim, hidden, bias=False) if cond_dim else None
        self.scale = hidden**-0.5

    def forward(self, f: Tensor, cond: Tensor | None) -> Tensor:
        if self.kind == 3:
            f = f.transpose(1, 2)  # (B, N, C) tokens -> (B, C, N) for Conv1d
        h = self.body(f.float())
        if h.ndim > 2:
            h = h.flatten(2)  # (B, hidden, positions)
            if not self.spatial:
                h = h.mean(2, keepdim=True)
        else:
            h = h.unsqueeze(2)
        h = h.transpose(1, 2)  # (B, positions, hidden)
        logits = self.out(h).squeeze(-1)
        if self.proj is not None:
            if cond is None:
                raise ValueError("this discriminator is conditional: pass class labels or a condition embedding")
            logits = logits + (h * self.proj(cond).unsqueeze(1)).sum(-1) * self.scale
        return logits


class MultiLevelHeads(nn.Module):
    """One small trainable head per feature map, concatenated into (B, L) logits.

    Args:
        channels: channels of each feature map (C of (B, C, H, W) or of (B, N, C) tokens, or of (B, C)).
        ndims: tensor rank of each feature (4, 3 or 2).
        hidden: head width.
        spatial: one logit per position of every map (patch discriminator, ADD's heads) or one per
            head after global average pooling.
        num_classes: class-conditional projection: a learned class embedding per head.
        cond_dim: projection of an external condition embedding (e.g. a pooled text embedding).

    Example::

        >>> heads = MultiLevelHeads([32, 64], [4, 4], hidden=32, num_classes=10)
        >>> heads([f1, f2], class_labels=y).shape    # (B, L)
    """

    def __init__(
        self,
        channels: Sequence[int],
        ndims: Sequence[int],
        hidden: int = 64,
        spatial: bool = True,
        num_classes: int | None = None,
        cond_dim: int | None = None,
    ) -> None:
        super().__init__()
        if len(channels) != len(ndims) or not channels:
            raise ConfigError(f"need one rank per feature map: channels={list(channels)}, ndims={list(ndims)}")
        if num_classes and cond_dim:
            raise ConfigError("condition on class labels or on an embedding, not both")
        self.class_embed = nn.Embedding(num_classes, hidden) if num_classes else None
        self.cond_dim = cond_dim
        dim = hidden if num_classes else cond_dim
        self.heads = nn.ModuleList(_Head(k, c, hidden, spatial, dim) for c, k in zip(channels, ndims))

    def forward(self, features: Sequence[Tensor], class_labels: Tensor | None = None, cond_embedding: Tensor | None = None) -> Tensor:
        cond = cond_embedding
        if self.class_embed is not None:
            if class_labels is None:
                raise ValueError("class-conditional heads need class_labels")
            cond = self.class_embed(class_labels)
        return torch.cat([head(f, cond) for head, f in zip(self.heads, features)], dim=1)


class Discriminator(nn.Module):
    """Feature network + :class:`MultiLevelHeads`: images (optionally noised, with t) to (B, L) logits.

    Args:
        backbone: maps ``(x, t=None, **cond)`` to a list of feature tensors (see the module docstring).
        sample_shape: (C, H, W) of the images, used once to probe the feature shapes.
        hidden, spatial, num_classes, cond_dim: head settings (see :class:`MultiLevelHeads`).
        backbone_cond: pass class labels to the backbone too (a class-conditional UNet backbone).
        probe_cond: network keywords of the probe (batch 2) instead of class labels, for a backbone
            conditioned otherwise (an SD3 transformer's text keywords).

    ``forward``'s extra keywords (``network_cond``) go to the backbone as they are (text keywords).

    Example::

        >>> d = Discriminator(UNetEncoderFeatures(teacher.unet), (1, 16, 16), hidden=32)
        >>> d(x).shape   # (B, L)
    """

    def __init__(
        self,
        backbone: nn.Module,
        sample_shape: Sequence[int],
        hidden: int = 64,
        spatial: bool = True,
        num_classes: int | None = None,
        cond_dim: int | None = None,
        backbone_cond: bool = False,
        probe_cond: dict | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_cond = backbone_cond
        probe = torch.zeros(2, *sample_shape)
        if probe_cond is not None:
            kwargs = dict(probe_cond)
        else:
            kwargs = {"class_labels": torch.zeros(2, dtype=torch.long)} if backbone_cond else {}
        with torch.no_grad(), eval_mode(backbone):
            feats = backbone(probe, None, **kwargs)
        channels = [f.shape[-1] if f.ndim == 3 else f.shape[1] for f in feats]
        self.heads = MultiLevelHeads(channels, [f.ndim for f in feats], hidden, spatial, num_classes, cond_dim)

    def forward(
        self, x: Tensor, t: Tensor | None = None, class_labels: Tensor | None = None, cond_embedding: Tensor | None = None,
        **network_cond,
    ) -> Tensor:
        kwargs = {"class_labels": class_labels} if self.backbone_cond else {}
        feats = self.backbone(x, t, **kwargs, **network_cond)
        return self.heads(feats, class_labels=class_labels, cond_embedding=cond_embedding)

    def train(self, mode: bool = True) -> "Discriminator":
        super().train(mode)
        if not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()  # a frozen feature network keeps eval behaviour (BN statistics, dropout off)
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())


def bottleneck_features(network: nn.Module, x_t: Tensor, t: Tensor, module_name: str | None = None, **cond) -> Tensor:
    """The fake score's bottleneck features for input (x_t, t) as a (B, C, h, w) map, via a forward hook.

    A UNet: the output of ``network.<module_name>`` (default the mid block). A transformer (DiT, SD3,
    Flux, SANA): the image tokens of its middle block (:func:`~lightning_distill.gan.features.bottleneck_block`),
    reshaped to a map; it is called through :func:`lightning_distill.backbones.call`.

    ``t`` is what the network is fed (``NoiseSchedule.model_timestep``: the integer timestep on the VP
    path, s * T on the flow path).

    The forward pass stops once the block has run (:func:`capture_features`), so the decoder half
    of a UNet (the later blocks of a transformer) is never evaluated.
    """
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(x_t.shape[0])
    cond = {k: v for k, v in cond.items() if v is not None}
    if is_unet(network):
        name = module_name or "mid_block"
        return capture_features(network, [name], lambda: network(x_t, t.clamp_min(0), **cond, return_dict=False))[0]
    name = module_name or bottleneck_block(network)[0]
    run = lambda: backbones.call(network, x_t, t.clamp_min(0), **cond)  # noqa: E731
    tokens = capture_features(network, [name], run, select=image_tokens)[0]
    return tokens_to_map(tokens, x_t.shape[-2], x_t.shape[-1])


class BottleneckClassifier(nn.Module):
    """The GAN head: a small conv net on the fake score's bottleneck features -> one logit per sample.

    Args:
        channels: channels of the bottleneck features (a UNet's last ``block_out_channels``, a
            transformer's inner width: :func:`~lightning_distill.gan.features.bottleneck_block`).
        hidden: channels of the head's hidden layers (default: ``channels``).
        groups: GroupNorm groups (must divide ``hidden``).

    Example::

        >>> head = BottleneckClassifier(64)
        >>> head(torch.randn(8, 64, 4, 4)).shape
        torch.Size([8])
    """

    def __init__(self, channels: int, hidden: int | None = None, groups: int = 8) -> None:
        super().__init__()
        hidden = hidden or channels
        groups = math.gcd(groups, hidden)
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.GroupNorm(groups, hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GroupNorm(groups, hidden),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features.float()).squeeze(1)


__all__ = ["BottleneckClassifier", "Discriminator", "MultiLevelHeads", "bottleneck_features"]
