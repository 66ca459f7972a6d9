"""Feature networks of discriminators: ``forward(x, t=None, **cond) -> list[Tensor]``.

* :class:`UNetEncoderFeatures`: a diffusers UNet's down blocks and mid block (the teacher's encoder in
  ADD, a trainable copy in APT); the decoder never runs.
* :class:`ModuleFeatures`: named layers of any module (a torchvision model, the digits classifier).
* :class:`HFVisionFeatures`: a local transformers vision model such as DINOv2 (ADD's paper choice).
* :class:`DigitsClassifierFeatures`: the bundled digits classifier.

All of them read block outputs with :class:`~lightning_distill.nn_utils.FeatureTap`, the grabber that
knowledge distillation's feature losses use too.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..nn_utils import FeatureTap, capture_features


class UNetEncoderFeatures(nn.Module):
    """Feature maps of a diffusers UNet's encoder: the outputs of its down blocks and its mid block.

    The UNet's decoder never runs (a hook stops the forward after the last requested level).

    Args:
        unet: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel``.
        levels: which outputs to return: ``i`` = down block i, ``-1`` = mid block. None: all of them.
        trainable: True registers the UNet as a submodule (trained and checkpointed, APT's backbone).
            False keeps only a reference to a frozen network (e.g. the teacher's own UNet in ADD), so
            its weights are neither trained nor saved twice.
        timestep: the network timestep used when ``forward`` gets ``t=None`` (0: clean images); what
            the UNet is fed, so a flow-matching UNet's s * T (``NoiseSchedule.model_timestep``).

    Example::

        >>> feats = UNetEncoderFeatures(teacher.unet, levels=[1, 2, -1])
        >>> [f.shape for f in feats(x)]   # three (B, C_i, H_i, W_i) maps
    """

    def __init__(
        self, unet: nn.Module, levels: Sequence[int] | None = None, trainable: bool = False, timestep: float = 0
    ) -> None:
        super().__init__()
        n_down = len(unet.down_blocks)
        has_mid = getattr(unet, "mid_block", None) is not None
        valid = list(range(n_down)) + ([-1] if has_mid else [])
        levels = list(valid if levels is None else levels)
        bad = [lv for lv in levels if lv not in valid]
        if bad or not levels:
            raise ConfigError(f"UNet feature levels {levels} invalid; choose from {valid} (-1 = mid block)")
        self.levels = levels
        self.trainable = trainable
        self.timestep = timestep
        if trainable:
            self.unet = unet
        else:
            unet.requires_grad_(False)
            self._frozen = [unet]  # a list hides it from nn.Module registration (no training, no saving)

    @classmethod
    def trainable_copy(
        cls, unet: nn.Module, levels: Sequence[int] | None = None, timestep: float = 0, requires_grad: bool = True
    ) -> "UNetEncoderFeatures":
        """Features of a float32 copy of ``unet`` that is trained and checkpointed with the discriminator
        (APT's backbone, ADD's ``train_features``); ``requires_grad=False`` registers it frozen."""
        copy_ = copy.deepcopy(unet).float().requires_grad_(requires_grad)
        return cls(copy_, levels, trainable=True, timestep=timestep)

    @property
    def network(self) -> nn.Module:
        return self.unet if self.trainable else self._frozen[0]

    def forward(self, x: Tensor, t: Tensor | None = None, **cond) -> list[Tensor]:
        unet = self.network
        if t is None:
            # an integer timestep stays int64 (VP UNets); a flow UNet's s * T is a float
            dtype = torch.long if float(self.timestep).is_integer() else torch.float32
            t = torch.full((x.shape[0],), self.timestep, device=x.device, dtype=dtype)
        names = ["mid_block" if lv == -1 else f"down_blocks.{lv}" for lv in self.levels]
        cond = {k: v for k, v in cond.items() if v is not None}
        x = x.to(next(unet.parameters()).dtype)
        return capture_features(unet, names, lambda: unet(x, t, **cond, return_dict=False))


class ModuleFeatures(nn.Module):
    """Feature maps of any ``nn.Module``: outputs of named submodules, or the module's own list output.

    This is the plug for user feature networks: the digits feature classifier, a torchvision model,
    DINOv2, ... Images arrive in model space ([-1, 1], shape (B, C, H, W)); ``resize_to``, ``mean`` /
    ``std`` (applied after mapping to [0, 1]) and ``repeat_channels`` adapt them to the network.

    Args:
        module: the network. It is frozen unless ``trainable``.
        layers: dotted names of submodules whose outputs are the features (``named_modules`` names).
            None: ``module(x)`` itself returns a list or tuple of tensors.
        trainable: train the network too (default frozen, as in ADD).
        resize_to: bilinear resize to this side before the network.
        mean, std: per-channel normalisation of [0, 1] images (e.g. ImageNet's); None: keep [-1, 1].
        repeat_channels: repeat a 1-channel image to this many channels (grey images, RGB networks).

    Feature tensors may be (B, C, H, W) maps, (B, N, C) token sequences or (B, C) vectors.

    Example::

        >>> feats = ModuleFeatures(torchvision.models.resnet18(), layers=["layer2", "layer3"], repeat_channels=3)
    """

    def __init__(
        self,
        module: nn.Module,
        layers: list[str] | None = None,
        trainable: bool = False,
        resize_to: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        repeat_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.layers = layers
        self.trainable = trainable
        self.resize_to = resize_to
        self.repeat_channels = repeat_channels
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std, or neither")
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        if layers is not None:
            FeatureTap(module, layers)  # raises naming any unknown layer now, not at the first step
        if not trainable:
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> "ModuleFeatures":
        super().train(mode)
        if not self.trainable:
            self.module.eval()  # a frozen network keeps eval behaviour (dropout off, BN statistics fixed)
        return self

    def preprocess(self, x: Tensor) -> Tensor:
        if self.repeat_channels and x.shape[1] == 1:
            x = x.repeat(1, self.repeat_channels, 1, 1)
        if self.resize_to is not None and x.shape[-1] != self.resize_to:
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        if self.mean is not None:
            x = ((x + 1) / 2 - self.mean) / self.std
        return x

    def run(self, x: Tensor):
        """Call the wrapped network (override for networks with another call signature)."""
        return self.module(x)

    def forward(self, x: Tensor, t: Tensor | None = None, **cond) -> list[Tensor]:  # noqa: ARG002 - no time input
        x = self.preprocess(x)
        if self.layers is None:
            out = self.run(x)
            if not isinstance(out, (list, tuple)):
                raise TypeError(f"{type(self.module).__name__} returned {type(out).__name__}; with layers=None it must return a list of tensors")
            return list(out)
        return capture_features(self.module, self.layers, lambda: self.run(x))


class HFVisionFeatures(ModuleFeatures):
    """Hidden states of a transformers vision model loaded from a local folder (DINOv2 in ADD).

    Args:
        path: a local ``save_pretrained`` folder (never downloaded: ``local_files_only``).
        hidden_layers: indices into ``hidden_states`` (0 = patch embeddings) used as features;
            each is a (B, N, C) token sequence.
        resize_to, mean, std, repeat_channels: as :class:`ModuleFeatures` (DINOv2: 224, ImageNet
            statistics, 3 channels).

    Example::

        >>> feats = HFVisionFeatures("/models/dinov2-small", hidden_layers=[3, 6, 9, 12], resize_to=224)
    """

    def __init__(
        self,
        path: str,
        hidden_layers: list[int],
        resize_to: int | None = 224,
        mean: list[float] | None = (0.485, 0.456, 0.406),
        std: list[float] | None = (0.229, 0.224, 0.225),
        repeat_channels: int | None = 3,
    ) -> None:
        from transformers import AutoModel

        module = AutoModel.from_pretrained(path, local_files_only=True)
        super().__init__(
            module,
            None,
            False,
            resize_to,
            None if mean is None else list(mean),
            None if std is None else list(std),
            repeat_channels,
        )
        self.hidden_layers = list(hidden_layers)

    def run(self, x: Tensor):
        states = self.module(pixel_values=x, output_hidden_states=True).hidden_states
        return [states[i] for i in self.hidden_layers]


class DigitsClassifierFeatures(ModuleFeatures):
    """The digits feature classifier (``lightning_distill.feature_net``) as a frozen feature network.

    Caution: it is also the network behind the FD-digits metric; a discriminator on the same features
    optimises the metric directly, so FD-digits of a student trained this way is not a fair score.

    Args:
        folder: a saved classifier folder (None: the bundled ``assets/digits_classifier``).
        layers: submodule names of ``DigitsFeatureNet`` whose outputs are the features (default: the
            activations before each pooling and the penultimate layer).

    Example::

        >>> ADD(teacher, feature_network=DigitsClassifierFeatures())
    """

    def __init__(self, folder: str | None = None, layers: list[str] | None = None) -> None:
        from ..feature_net import load_digits_feature_net

        net = load_digits_feature_net(folder)
        if layers is None:  # the activation before each pooling and the penultimate layer
            body = list(net.body)
            layers = [f"body.{i - 1}" for i, m in enumerate(body) if isinstance(m, nn.MaxPool2d)]
            layers.append(f"body.{len(body) - 1}")
        super().__init__(net, layers)


__all__ = ["DigitsClassifierFeatures", "HFVisionFeatures", "ModuleFeatures", "UNetEncoderFeatures"]
