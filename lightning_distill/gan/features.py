"""Feature networks of discriminators: ``forward(x, t=None, **cond) -> list[Tensor]``.

* :class:`UNetEncoderFeatures`: a diffusers UNet's down blocks and mid block (the teacher's encoder in
  ADD, a trainable copy in APT); the decoder never runs.
* :class:`TransformerFeatures`: the image tokens of chosen blocks of a diffusers transformer denoiser
  (DiT, SD3's MMDiT, Flux, SANA), reshaped to (B, C, H / p, W / p) maps; the later blocks never run.
  :func:`denoiser_features` picks one of the two for a network; :func:`bottleneck_block` names the block
  DMD2's GAN head reads.
* :class:`ModuleFeatures`: named layers of any module (a torchvision model, the digits classifier).
* :class:`HFVisionFeatures`: a local transformers vision model such as DINOv2 (ADD's paper choice).
* :class:`DigitsClassifierFeatures`: the bundled digits classifier.

All of them read block outputs with :class:`~lightning_distill.nn_utils.FeatureTap`, the grabber that
knowledge distillation's feature losses use too.

Transformer blocks, per family (what :func:`transformer_block_names` and :func:`image_tokens` know):

==========================  ==============================================  ===============================
model class                 blocks, in forward order                        block output -> image tokens
==========================  ==============================================  ===============================
``DiTTransformer2DModel``   ``transformer_blocks.i``                        (B, N, C), as is
``SanaTransformer2DModel``  ``transformer_blocks.i``                        (B, N, C), as is
``SD3Transformer2DModel``   ``transformer_blocks.i``                        ``(encoder_hidden_states,
                                                                            hidden_states)``: the second
``FluxTransformer2DModel``  ``transformer_blocks.i``, then                  the same (both block kinds)
                            ``single_transformer_blocks.j`` (numbered on)
==========================  ==============================================  ===============================

The N image tokens are the patches of the (H, W) input in row-major order (patch side p: the config's
``patch_size``, Flux's 2x2 packing), so they reshape to an (H / p, W / p) map with p = sqrt(HW / N).
"""

from __future__ import annotations

import copy
import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backbones
from ..errors import ConfigError
from ..nn_utils import FeatureTap, capture_features


def transformer_block_names(network: nn.Module) -> list[str]:
    """The transformer blocks of a diffusers transformer denoiser in forward order (Flux: its double-stream
    blocks, then its single-stream ones); empty for a network without any."""
    names: list[str] = []
    for attr in ("transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(network, attr, None)
        if isinstance(blocks, nn.ModuleList):
            names += [f"{attr}.{i}" for i in range(len(blocks))]
    return names


def image_tokens(output) -> Tensor:
    """The image tokens (B, N, C) of a transformer block's output: the output itself (DiT, SANA) or the
    image stream of a two-stream block's ``(encoder_hidden_states, hidden_states)`` (SD3, Flux; SD3's
    last block returns None for the text stream)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[1], Tensor):
        return output[1]
    raise TypeError(f"cannot take image tokens from a transformer block output of type {type(output).__name__}")


def tokens_to_map(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, N, C) patch tokens of an (height, width) input, row-major -> (B, C, height / p, width / p)."""
    b, n, c = tokens.shape
    p = math.isqrt(max(height * width // max(n, 1), 1))
    if p * p * n != height * width or height % p or width % p:
        raise ValueError(f"{n} tokens are not the square patches of a {height}x{width} input")
    return tokens.transpose(1, 2).reshape(b, c, height // p, width // p)


def is_unet(network: nn.Module) -> bool:
    """A UNet (or a custom network with the UNet call): features from its down / mid blocks."""
    return isinstance(backbones.backbone_for(network), backbones.UNetBackbone)


def bottleneck_block(network: nn.Module) -> tuple[str, int]:
    """(block path, channels) of the features DMD2's GAN head reads: a UNet's mid block (its last
    ``block_out_channels``), a transformer's middle block (index n // 2; its inner width, heads x head dim)."""
    cfg = dict(getattr(network, "config", None) or {})
    if is_unet(network):
        if "block_out_channels" not in cfg or getattr(network, "mid_block", None) is None:
            raise ConfigError(
                f"DMD2's GAN head reads UNet mid-block or transformer-block features; a {type(network).__name__} "
                "fake score has neither: set gan=false"
            )
        return "mid_block", int(cfg["block_out_channels"][-1])
    names = transformer_block_names(network)
    if not names or "num_attention_heads" not in cfg or "attention_head_dim" not in cfg:
        raise ConfigError(f"{type(network).__name__} has no transformer blocks to read features from: set gan=false")
    return names[len(names) // 2], int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])


class _DenoiserFeatures(nn.Module):
    """What the UNet and transformer feature networks share: a frozen reference or a registered (trainable)
    network, and the timestep used when ``forward`` gets none."""

    attr = "network_"

    def __init__(self, network: nn.Module, trainable: bool, timestep: float) -> None:
        super().__init__()
        self.trainable = trainable
        self.timestep = timestep
        if trainable:
            setattr(self, self.attr, network)
        else:
            network.requires_grad_(False)
            self._frozen = [network]  # a list hides it from nn.Module registration (no training, no saving)

    @classmethod
    def trainable_copy(cls, network: nn.Module, levels: Sequence[int] | None = None, timestep: float = 0,
                       requires_grad: bool = True):
        """Features of a float32 copy of ``network`` that is trained and checkpointed with the discriminator
        (APT's backbone, ADD's ``train_features``); ``requires_grad=False`` registers it frozen."""
        # prepare_critic: no dropout (a DiT's label dropout included), so that the real, fake and R1 passes see one function
        copy_ = backbones.prepare_critic(copy.deepcopy(network).float().requires_grad_(requires_grad))
        return cls(copy_, levels, trainable=True, timestep=timestep)

    @property
    def network(self) -> nn.Module:
        return getattr(self, self.attr) if self.trainable else self._frozen[0]

    def _default_t(self, x: Tensor, t: Tensor | None) -> Tensor:
        if t is not None:
            return t
        # an integer timestep stays int64 (VP networks); a flow network's s * T is a float
        dtype = torch.long if float(self.timestep).is_integer() else torch.float32
        return torch.full((x.shape[0],), self.timestep, device=x.device, dtype=dtype)


class UNetEncoderFeatures(_DenoiserFeatures):
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

    attr = "unet"

    def __init__(
        self, unet: nn.Module, levels: Sequence[int] | None = None, trainable: bool = False, timestep: float = 0
    ) -> None:
        n_down = len(unet.down_blocks)
        has_mid = getattr(unet, "mid_block", None) is not None
        valid = list(range(n_down)) + ([-1] if has_mid else [])
        levels = list(valid if levels is None else levels)
        bad = [lv for lv in levels if lv not in valid]
        if bad or not levels:
            raise ConfigError(f"UNet feature levels {levels} invalid; choose from {valid} (-1 = mid block)")
        super().__init__(unet, trainable, timestep)
        self.levels = levels

    def forward(self, x: Tensor, t: Tensor | None = None, **cond) -> list[Tensor]:
        unet = self.network
        t = self._default_t(x, t)
        names = ["mid_block" if lv == -1 else f"down_blocks.{lv}" for lv in self.levels]
        cond = {k: v for k, v in cond.items() if v is not None}
        x = x.to(next(unet.parameters()).dtype)
        return capture_features(unet, names, lambda: unet(x, t, **cond, return_dict=False))


class TransformerFeatures(_DenoiserFeatures):
    """Feature maps of a diffusers transformer denoiser: the image tokens of chosen blocks as spatial maps.

    The network is called as the framework calls it (:func:`lightning_distill.backbones.call`: DiT's class
    labels, SD3's text keywords, Flux's packing), and the forward stops after the last chosen block. Each
    block's image tokens (B, N, C) become a (B, C, H / p, W / p) map (:func:`tokens_to_map`), so the
    discriminators' conv heads (and their per-position logits) work as on UNet features.

    Args:
        network: a ``DiTTransformer2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel`` or
            ``SanaTransformer2DModel``.
        levels: block indices into :func:`transformer_block_names` (negative ones count from the last
            block: -1 = the last). None: every block.
        trainable, timestep: as :class:`UNetEncoderFeatures`.

    Example::

        >>> feats = TransformerFeatures(teacher.unet, levels=[0, -1])   # an SD3 teacher
        >>> [f.shape for f in feats(x, t, **text_keywords)]   # two (B, inner_dim, H / 2, W / 2) maps
    """

    attr = "transformer"

    def __init__(
        self, network: nn.Module, levels: Sequence[int] | None = None, trainable: bool = False, timestep: float = 0
    ) -> None:
        blocks = transformer_block_names(network)
        n = len(blocks)
        levels = list(range(n) if levels is None else levels)
        bad = [lv for lv in levels if not -n <= lv < n]
        if bad or not levels:
            raise ConfigError(
                f"{type(network).__name__} feature levels {levels} invalid; choose block indices 0 .. {n - 1} "
                "(negative: from the last, -1 = last block)"
            )
        super().__init__(network, trainable, timestep)
        self.levels = levels
        self.names = [blocks[lv] for lv in levels]

    def forward(self, x: Tensor, t: Tensor | None = None, **cond) -> list[Tensor]:
        net = self.network
        t = self._default_t(x, t)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        dtype = next(net.parameters()).dtype
        cond = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in cond.items() if v is not None}
        x = x.to(dtype)
        tokens = capture_features(net, self.names, lambda: backbones.call(net, x, t, **cond), select=image_tokens)
        return [tokens_to_map(f, x.shape[-2], x.shape[-1]) for f in tokens]


def denoiser_features(
    network: nn.Module,
    levels: Sequence[int] | None = None,
    timestep: float = 0,
    mode: Literal["frozen", "copy", "frozen_copy"] = "frozen",
) -> UNetEncoderFeatures | TransformerFeatures:
    """The discriminator features of a diffusers denoiser: :class:`UNetEncoderFeatures` for a UNet,
    :class:`TransformerFeatures` for a transformer (``levels`` in that class's terms).

    ``mode``: ``"frozen"`` reads ``network`` itself, unregistered (ADD's teacher); ``"copy"`` a trainable
    float32 copy (APT, ADD's ``train_features``); ``"frozen_copy"`` a registered copy without gradients.
    """
    cls = UNetEncoderFeatures if is_unet(network) else TransformerFeatures
    if not is_unet(network) and not transformer_block_names(network):
        raise ConfigError(f"{type(network).__name__} has neither UNet down blocks nor transformer blocks to read features from")
    if mode == "frozen":
        return cls(network, levels, trainable=False, timestep=timestep)
    return cls.trainable_copy(network, levels, timestep, requires_grad=mode == "copy")


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


__all__ = [
    "DigitsClassifierFeatures",
    "HFVisionFeatures",
    "ModuleFeatures",
    "TransformerFeatures",
    "UNetEncoderFeatures",
    "bottleneck_block",
    "denoiser_features",
    "image_tokens",
    "tokens_to_map",
    "transformer_block_names",
]
