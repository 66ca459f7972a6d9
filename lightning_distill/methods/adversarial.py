"""Shared adversarial machinery for ADD, APT and DMD2: GAN losses, R1 penalties, discriminators, a GAN base class.

Contents, in order:

* Losses (pure functions of discriminator logits): hinge, non-saturating; the true R1 penalty
  (Mescheder et al. 2018) and APT's approximated R1 (Lin et al. 2025).
* :class:`StepPlan` and :class:`AdversarialSchedule`: the protocol by which a method asks a schedule
  callback (``lightning_distill.callbacks.discriminator.DiscriminatorSchedule``) what to do each
  iteration; :func:`d_updates_at` turns a D:G ratio into a per-iteration count.
* Feature networks (``forward(x, t=None, **cond) -> list[Tensor]``): :class:`UNetEncoderFeatures`
  (a diffusers UNet's down blocks + mid block), :class:`ModuleFeatures` (named layers of any module,
  e.g. the digits classifier), :class:`HFVisionFeatures` (a local transformers vision model such as
  DINOv2).
* :class:`MultiLevelHeads` (small trainable heads, one per feature map, with projection conditioning)
  and :class:`Discriminator` (feature network + heads).
* :class:`AdversarialMethod`: a :class:`DistillationMethod` trained with Lightning manual optimisation,
  two optimisers (generator = ``student``, ``discriminator``), a D:G ratio, per-network clipping.

Logit convention: a discriminator returns logits of shape (B, L) (L = one per head, or one per
spatial position of every head). The GAN losses average over all of them; the R1 penalties treat
the per-sample mean over L as "D(x)" (one number per image, as in the papers' single-logit
discriminators). With many logits that mean is smoother than each logit, so the penalty a given weight
buys shrinks as L grows (roughly like 1 / L for independent spatial logits): tune the R1 weight per
discriminator layout.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..export import load_student_state
from ..parametrisation import Denoiser, PredictionType, prediction_from_output
from ..teacher import DiffusionTeacher
from .base import DistillationMethod, LossOutput, check_finite, default_optimizer, eval_mode

# --- losses (pure functions) -----------------------------------------------------------------------


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
    if real_logits is None:
        real_logits = discriminator(real, **kwargs)
    diff = _per_sample(real_logits) - _per_sample(discriminator(noisy, **kwargs))
    return diff.pow(2).mean()


def discriminator_accuracy(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Fraction of real samples with D(x) > 0 and of fake samples with D(G(z)) < 0."""
    return (_per_sample(real_logits) > 0).float().mean(), (_per_sample(fake_logits) < 0).float().mean()


# --- the schedule protocol ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """What one training iteration of an adversarial method does.

    Attributes:
        update_g: take a generator step after the discriminator steps.
        d_updates: discriminator steps this iteration (0 freezes D for the iteration).
        r1_scale: multiplier on the method's ``r1_weight`` (true or approximated R1).
        d_lr_scale: multiplier on the discriminator optimiser's initial learning rate.
        train_d_backbone: False keeps a trainable D backbone fixed (only the heads learn).
    """

    update_g: bool = True
    d_updates: int = 1
    r1_scale: float = 1.0
    d_lr_scale: float = 1.0
    train_d_backbone: bool = True


@runtime_checkable
class AdversarialSchedule(Protocol):
    """A callback that plans adversarial iterations.

    An :class:`AdversarialMethod` looks among ``trainer.callbacks`` for the first object with a
    ``plan`` method and calls ``plan(iteration)`` at the start of every training iteration
    (``iteration`` = 0-based count of training batches, restored from checkpoints). The method returns
    from ``training_step`` a dict ``{"plan", "d_loss", "g_loss", "real_logits", "fake_logits", ...}``
    (detached), which the callback receives as ``outputs`` in ``on_train_batch_end``.
    """

    def plan(self, step: int) -> StepPlan: ...


def d_updates_at(step: int, ratio: float) -> int:
    """D updates in iteration ``step`` for a D:G ratio ``ratio`` (may be fractional).

    floor((step + 1) r) - floor(step r): r = 5 gives 5 every iteration, r = 0.5 gives 0, 1, 0, 1, ...
    so that after n iterations exactly floor(n r) D updates have been made.
    """
    if ratio < 0:
        raise ValueError(f"D:G ratio must be >= 0, got {ratio}")
    return math.floor((step + 1) * ratio + 1e-9) - math.floor(step * ratio + 1e-9)


# --- feature networks --------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised from a forward hook once every requested feature is captured: skips the rest of the net."""


def _first_tensor(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]  # diffusers down blocks return (hidden_states, res_samples)
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"cannot take a feature tensor from a {type(output).__name__} output")


def capture_features(module: nn.Module, layers: Sequence[nn.Module], run: Callable[[], object]) -> list[Tensor]:
    """Run ``run()`` and return the outputs of ``layers`` (forward hooks), stopping after the last one."""
    captured: dict[int, Tensor] = {}

    def hook(index):
        def fn(_mod, _inp, out):
            captured[index] = _first_tensor(out)
            if len(captured) == len(layers):
                raise _StopForward

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        run()
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(layers)) if i not in captured]
    if missing:
        raise RuntimeError(f"{type(module).__name__}: feature layers {missing} were never called in forward")
    return [captured[i] for i in range(len(layers))]


class UNetEncoderFeatures(nn.Module):
    """Feature maps of a diffusers UNet's encoder: the outputs of its down blocks and its mid block.

    The UNet's decoder never runs (a hook stops the forward after the last requested level).

    Args:
        unet: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel``.
        levels: which outputs to return: ``i`` = down block i, ``-1`` = mid block. None: all of them.
        trainable: True registers the UNet as a submodule (trained and checkpointed, APT's backbone).
            False keeps only a reference to a frozen network (e.g. the teacher's own UNet in ADD), so
            its weights are neither trained nor saved twice.
        timestep: the timestep used when ``forward`` gets ``t=None`` (0: clean images).

    Example::

        >>> feats = UNetEncoderFeatures(teacher.unet, levels=[1, 2, -1])
        >>> [f.shape for f in feats(x)]   # three (B, C_i, H_i, W_i) maps
    """

    def __init__(
        self, unet: nn.Module, levels: Sequence[int] | None = None, trainable: bool = False, timestep: int = 0
    ) -> None:
        super().__init__()
        n_down = len(unet.down_blocks)
        has_mid = getattr(unet, "mid_block", None) is not None
        valid = list(range(n_down)) + ([-1] if has_mid else [])
        levels = list(valid if levels is None else levels)
        bad = [lv for lv in levels if lv not in valid]
        if bad or not levels:
            raise ValueError(f"UNet feature levels {levels} invalid; choose from {valid} (-1 = mid block)")
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
        cls, unet: nn.Module, levels: Sequence[int] | None = None, timestep: int = 0, requires_grad: bool = True
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
            t = torch.full((x.shape[0],), self.timestep, device=x.device, dtype=torch.long)
        layers = [unet.mid_block if lv == -1 else unet.down_blocks[lv] for lv in self.levels]
        cond = {k: v for k, v in cond.items() if v is not None}
        x = x.to(next(unet.parameters()).dtype)
        return capture_features(unet, layers, lambda: unet(x, t, **cond, return_dict=False))


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
            raise ValueError("give both mean and std, or neither")
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        if layers is not None:
            names = dict(module.named_modules())
            unknown = [n for n in layers if n not in names]
            if unknown:
                raise ValueError(f"unknown feature layers {unknown}; the module has e.g. {list(names)[1:12]}")
            self._layers = [names[n] for n in layers]
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
        return capture_features(self.module, self._layers, lambda: self.run(x))


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


# --- discriminator heads -----------------------------------------------------------------------------


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
            raise ValueError(f"need one rank per feature map: channels={list(channels)}, ndims={list(ndims)}")
        if num_classes and cond_dim:
            raise ValueError("condition on class labels or on an embedding, not both")
        self.class_embed = nn.Embedding(num_classes, hidden) if num_classes else None
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
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_cond = backbone_cond
        probe = torch.zeros(2, *sample_shape)
        kwargs = {"class_labels": torch.zeros(2, dtype=torch.long)} if backbone_cond else {}
        with torch.no_grad(), eval_mode(backbone):
            feats = backbone(probe, None, **kwargs)
        channels = [f.shape[-1] if f.ndim == 3 else f.shape[1] for f in feats]
        self.heads = MultiLevelHeads(channels, [f.ndim for f in feats], hidden, spatial, num_classes, cond_dim)

    def forward(
        self, x: Tensor, t: Tensor | None = None, class_labels: Tensor | None = None, cond_embedding: Tensor | None = None
    ) -> Tensor:
        kwargs = {"class_labels": class_labels} if self.backbone_cond else {}
        feats = self.backbone(x, t, **kwargs)
        return self.heads(feats, class_labels=class_labels, cond_embedding=cond_embedding)

    def train(self, mode: bool = True) -> "Discriminator":
        super().train(mode)
        if not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()  # a frozen feature network keeps eval behaviour (BN statistics, dropout off)
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())


@contextmanager
def frozen(params: Iterable[nn.Parameter]):
    """Temporarily set ``requires_grad=False`` on the given parameters (restored on exit)."""
    changed = [p for p in params if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def unclipped_x0(denoiser: Denoiser, x_t: Tensor, t: Tensor, **cond) -> Tensor:
    """The denoiser's x0 estimate without ``clip_x0``: clamping would zero the generator's gradient."""
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(x_t.shape[0])
    out = denoiser.raw(x_t, t, **cond).to(x_t.dtype)
    sched = denoiser.schedule
    return prediction_from_output(out, x_t, sched.alpha(t), sched.sigma(t), denoiser.prediction_type).x0


# --- differentiable augmentation of the discriminator's inputs ------------------------------------

AUGMENT_POLICIES = ("translation", "cutout")


def check_augment_policy(policy: Sequence[str]) -> tuple[str, ...]:
    """The policy as a tuple; raises ValueError naming any augmentation that is not in ``AUGMENT_POLICIES``."""
    unknown = sorted(set(policy) - set(AUGMENT_POLICIES))
    if unknown:
        raise ValueError(f"unknown discriminator augmentation {unknown}; choose from {list(AUGMENT_POLICIES)}")
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


# --- the GAN base class ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdversarialSettings:
    """The GAN settings of an :class:`AdversarialMethod` (its init args of the same names)."""

    gan_loss: str
    r1: str
    r1_weight: float
    r1_sigma: float
    d_updates_per_g: float
    generator_grad_clip: float | None
    discriminator_grad_clip: float | None
    sample_every_n_steps: int
    seed: int
    d_augment: tuple[str, ...] = ()


@dataclass
class Generated:
    """A generator output: the fake images and the condition they were made with."""

    x: Tensor
    class_labels: Tensor | None = None


def attached_schedule(trainer) -> AdversarialSchedule | None:
    """The :class:`AdversarialSchedule` callback attached to ``trainer`` (None without trainer or callback)."""
    if trainer is None:
        return None
    return next((cb for cb in trainer.callbacks if isinstance(cb, AdversarialSchedule)), None)


def load_init_state(unet: nn.Module, state: dict[str, Tensor], init_from: str) -> None:
    """Load a trained student's weights (``load_student_state(init_from)``) into ``unet``: all must fit."""
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"init_from {init_from!r} does not fit the student UNet: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def iteration_generator(seed: int, step: int, device: torch.device, rank: int = 0) -> torch.Generator:
    """Random stream of iteration ``step`` on process ``rank``: a pure function of (seed, step, rank), so
    resumes are exact, and under DDP every process draws its own noise and timesteps (with one stream for
    all, every rank of an unconditional model would generate the same fake batch). Rank 0's stream does
    not depend on the world size. The rank offset changes the low 32 bits: CPU generators seed their
    Mersenne twister from those alone."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + step + rank * 0x9E3779B1)
    return gen


def remember_initial_lr(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Store each group's configured rate as ``initial_lr``: the schedule's ``d_lr_scale`` is relative to
    it, and it is saved with the optimiser state, so a resumed run scales the same base rate."""
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return opt


class AdversarialMethod(DistillationMethod):
    """Generator (``student``) vs ``discriminator`` with manual optimisation and two optimisers.

    Each training iteration (one batch): ``plan.d_updates`` discriminator steps (each on the batch's
    real images and freshly generated fakes), then, if ``plan.update_g``, one generator step. The plan
    comes from an :class:`AdversarialSchedule` callback when one is attached (D warm-up, ratio over
    time, R1 / learning-rate schedules, backbone freezing), else from ``d_updates_per_g``.

    Subclasses set ``self.discriminator`` and implement :meth:`generate` and :meth:`discriminate`;
    :meth:`generator_extra_loss` adds non-adversarial generator terms (ADD's distillation loss).

    Randomness of an iteration comes from a generator seeded by (seed, iteration), so a run resumed
    from a checkpoint repeats the uninterrupted run (given the same data order).

    Note: in manual optimisation Lightning counts every optimiser step in ``trainer.global_step``
    (``max_steps``), D steps included; ``gan_iteration`` counts iterations (batches).

    Args:
        teacher, student, student_prediction_type: as :class:`DistillationMethod`.
        init_from: start the generator from a trained student instead of the teacher: a ``.ckpt`` of
            any method or an exported pipeline folder (its UNet must fit the student's).
        init_use_ema: take the checkpoint's sampling-EMA weights when it has them.
        generator_optimizer, discriminator_optimizer: optimiser factories for the two networks.
        generator_lr_scheduler: optional LR scheduler of the generator (stepped per generator step).
        gan_loss: ``"hinge"`` or ``"non_saturating"``.
        r1: ``"true"`` (double backward), ``"approx"`` (APT) or ``"none"``.
        r1_weight: weight of the R1 term in the D loss (gamma / 2 for true R1).
        r1_sigma: perturbation scale of the approximated R1.
        d_updates_per_g: D:G ratio when no schedule callback is attached (fractions allowed).
        generator_grad_clip, discriminator_grad_clip: max gradient norm per network (None: off).
        d_augment: differentiable augmentations of every discriminator input, real and fake
            (:class:`DiscriminatorAugment`: ``"translation"`` by up to 1/8 of the side, ``"cutout"`` of
            half the side); None or []: none.
        sample_steps, sample_every_n_steps, num_log_samples, seed: as :class:`DistillationMethod`
            (``sample_every_n_steps`` counts iterations here).
    """

    #: init args kept out of ``hparams`` (networks and factories); subclasses extend it.
    hparams_ignore: tuple[str, ...] = (
        "teacher",
        "student",
        "optimizer",
        "lr_scheduler",
        "generator_optimizer",
        "discriminator_optimizer",
        "generator_lr_scheduler",
    )

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        student: nn.Module | None = None,
        student_prediction_type: PredictionType | None = None,
        init_from: str | None = None,
        init_use_ema: bool = True,
        generator_optimizer: OptimizerCallable = default_optimizer,
        discriminator_optimizer: OptimizerCallable = default_optimizer,
        generator_lr_scheduler: LRSchedulerCallable | None = None,
        gan_loss: GanLoss = "hinge",
        r1: Literal["true", "approx", "none"] = "true",
        r1_weight: float = 1.0,
        r1_sigma: float = 0.01,
        d_updates_per_g: float = 1.0,
        generator_grad_clip: float | None = None,
        discriminator_grad_clip: float | None = None,
        d_augment: list[str] | None = None,
        sample_steps: int = 1,
        sample_every_n_steps: int = 0,
        num_log_samples: int = 64,
        seed: int = 0,
    ) -> None:
        d_augment = check_augment_policy(d_augment or ())
        if gan_loss not in GAN_LOSSES:
            raise ValueError(f"unknown gan_loss {gan_loss!r}; choose one of {sorted(GAN_LOSSES)}")
        if r1 not in ("true", "approx", "none"):
            raise ValueError(f"unknown r1 {r1!r}; choose 'true', 'approx' or 'none'")
        d_updates_at(0, d_updates_per_g)  # validates the ratio
        state = None
        if init_from is not None:
            state, recorded = load_student_state(init_from, init_use_ema)
            student_prediction_type = student_prediction_type or recorded
        super().__init__(
            teacher=teacher,
            student=student,
            student_prediction_type=student_prediction_type,
            optimizer=generator_optimizer,
            lr_scheduler=generator_lr_scheduler,
            sample_steps=sample_steps,
            sample_every_n_steps=sample_every_n_steps,
            num_log_samples=num_log_samples,
            seed=seed,
        )
        if state is not None:
            load_init_state(self.student.unet, state, init_from)
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        # Settings are read from ``self.adv``, not ``hparams``: under LightningCLI ``hparams`` holds only the
        # subclass's own init args as configured, and a checkpoint's ``hparams`` must stay valid init args
        # of the subclass (the CLI re-instantiates from them on resume).
        self.adv = AdversarialSettings(
            gan_loss=gan_loss, r1=r1, r1_weight=r1_weight, r1_sigma=r1_sigma, d_updates_per_g=d_updates_per_g,
            generator_grad_clip=generator_grad_clip, discriminator_grad_clip=discriminator_grad_clip,
            sample_every_n_steps=sample_every_n_steps, seed=seed, d_augment=d_augment,
        )
        if "sample_steps" in self.hparams and self.hparams.sample_steps is None:
            self.hparams.sample_steps = sample_steps  # a subclass's "None = automatic", resolved
        self.automatic_optimization = False
        self.discriminator_optimizer_factory = discriminator_optimizer
        self.d_loss_fn, self.g_loss_fn = GAN_LOSSES[gan_loss]
        self.discriminator: Discriminator | None = None
        # Iterations done; persistent so that resumed runs continue the plan and the random streams.
        self.register_buffer("gan_iteration", torch.zeros((), dtype=torch.long))

    # --- what subclasses define ----------------------------------------------------------------

    def generate(self, batch: dict, gen: torch.Generator) -> Generated:  # pragma: no cover - abstract
        """Fake images for a batch (with gradient to the student when grad is enabled)."""
        raise NotImplementedError

    def discriminator_t_range(self) -> tuple[int, int] | None:
        """``(lo, hi)``: D sees its inputs noised to a random t in that range (and gets t); None: clean."""
        return None

    def discriminate(self, x: Tensor, class_labels: Tensor | None, gen: torch.Generator) -> Callable[[Tensor], Tensor]:
        """Return D as a function of images only, with any internal randomness drawn now from ``gen``.

        With :meth:`discriminator_t_range` (APT; ADD's LADD option) the images are noised at a random t,
        one t and one noise draw per sample taken here, so real, fake and R1 evaluations see the same
        function of the image; ``d_augment`` parameters are drawn here too and applied before the noise.
        """
        labels = class_labels if self.discriminator.heads.class_embed is not None or self.discriminator.backbone_cond else None
        augment = DiscriminatorAugment.draw(self.adv.d_augment, x.shape, gen, x.device)  # identity, no draws, without a policy
        t_range = self.discriminator_t_range()
        if t_range is None:
            return lambda images: self.discriminator(augment(images), class_labels=labels)
        t = torch.randint(int(t_range[0]), int(t_range[1]) + 1, (x.shape[0],), generator=gen, device=x.device)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        sched = self.student.schedule

        def d_fn(images: Tensor) -> Tensor:
            n = images.shape[0]
            return self.discriminator(sched.add_noise(augment(images), noise[:n], t[:n]), t[:n], class_labels=labels)

        return d_fn

    def generator_extra_loss(self, fake: Generated, batch: dict, gen: torch.Generator) -> LossOutput | None:
        """Non-adversarial generator terms (weighted already); None when there are none."""
        return None

    # --- plan, randomness, parameters ----------------------------------------------------------

    def schedule_callback(self) -> AdversarialSchedule | None:
        return attached_schedule(self._trainer)

    def plan(self, step: int) -> StepPlan:
        cb = self.schedule_callback()
        if cb is not None:
            return cb.plan(step)
        return StepPlan(update_g=True, d_updates=d_updates_at(step, self.adv.d_updates_per_g))

    def step_generator(self, step: int) -> torch.Generator:
        return iteration_generator(self.adv.seed, step, self.device, self.global_rank)

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.discriminator.parameters() if p.requires_grad]

    def configure_optimizers(self):
        if self.discriminator is None:
            raise ValueError(f"{type(self).__name__} has no discriminator")
        g_opt = self.optimizer_factory(self.trainable_parameters())
        d_opt = remember_initial_lr(self.discriminator_optimizer_factory(self.discriminator_parameters()))
        if self.lr_scheduler_factory is None:
            return [g_opt, d_opt]
        return [g_opt, d_opt], [{"scheduler": self.lr_scheduler_factory(g_opt), "interval": "step"}]

    # --- losses of one iteration ---------------------------------------------------------------

    def discriminator_loss(self, batch: dict, gen: torch.Generator, r1_weight: float) -> tuple[LossOutput, Tensor, Tensor]:
        """D loss on real images vs fresh fakes (+ weighted R1); returns (loss, real logits, fake logits)."""
        real = batch["x"]
        with torch.no_grad():
            fake = self.generate(batch, gen)
        d_fn = self.discriminate(real, fake.class_labels, gen)
        real_logits = d_fn(real)
        fake_logits = d_fn(fake.x.detach())
        gan = self.d_loss_fn(real_logits, fake_logits)
        logs = {"d_loss": gan.detach()}
        loss = gan
        if self.adv.r1 != "none" and r1_weight > 0:
            if self.adv.r1 == "true":
                penalty = r1_penalty(d_fn, real)
            else:
                noise = torch.randn(real.shape, generator=gen, device=real.device, dtype=real.dtype)
                penalty = approx_r1_penalty(d_fn, real, self.adv.r1_sigma, noise=noise, real_logits=real_logits)
            loss = loss + r1_weight * penalty
            logs["r1"] = penalty.detach()
        return LossOutput(loss, logs), real_logits.detach(), fake_logits.detach()

    def generator_loss(self, batch: dict, gen: torch.Generator) -> LossOutput:
        """Adversarial G loss on fresh fakes plus :meth:`generator_extra_loss`."""
        fake = self.generate(batch, gen)
        d_fn = self.discriminate(batch["x"], fake.class_labels, gen)
        adv = self.g_loss_fn(d_fn(fake.x))
        loss, logs = adv, {"g_adv": adv.detach()}
        extra = self.generator_extra_loss(fake, batch, gen)
        if extra is not None:
            loss = loss + extra.loss
            logs.update({k: v.detach() for k, v in extra.logs.items()})
        logs["g_loss"] = loss.detach()
        return LossOutput(loss, logs)

    def compute_loss(self, batch: dict) -> LossOutput:
        """Validation: the D and G losses of the current networks, no update, no R1."""
        gen = self.step_generator(2**40)  # a fixed stream, disjoint from the training iterations' ones
        d_out, _, _ = self.discriminator_loss(batch, gen, r1_weight=0.0)
        with torch.no_grad():
            g_out = self.generator_loss(batch, gen)
        return LossOutput(g_out.loss, {**d_out.logs, **g_out.logs})

    # --- one training iteration ----------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        step = int(self.gan_iteration)
        plan = self.plan(step)
        gen = self.step_generator(step)
        g_opt, d_opt = self.optimizers()
        hp = self.adv
        for group in d_opt.param_groups:
            group["lr"] = group["initial_lr"] * plan.d_lr_scale
        logs: dict[str, Tensor] = {}
        real_logits = fake_logits = None
        backbone = [] if plan.train_d_backbone else self.discriminator.backbone_parameters()
        # 1. discriminator steps (Goodfellow et al. 2014, Algorithm 1: k D steps per G step)
        for _ in range(plan.d_updates):
            with frozen(backbone):
                d_out, real_logits, fake_logits = self.discriminator_loss(batch, gen, hp.r1_weight * plan.r1_scale)
                check_finite(d_out, self.global_step)
                d_opt.zero_grad(set_to_none=True)
                self.manual_backward(d_out.loss)
            self.step_optimizer(d_opt, hp.discriminator_grad_clip)
            logs.update(d_out.logs)
        # 2. generator step, D frozen (its parameters get no gradient; the input gradient still flows)
        if plan.update_g:
            with frozen(self.discriminator.parameters()):
                g_out = self.generator_loss(batch, gen)
                check_finite(g_out, self.global_step)
                g_opt.zero_grad(set_to_none=True)
                self.manual_backward(g_out.loss)
            self.step_optimizer(g_opt, hp.generator_grad_clip)
            sched = self.lr_schedulers()
            if sched is not None:
                sched.step()
            logs.update(g_out.logs)
        self.gan_iteration += 1
        if logs:
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=True, batch_size=batch["x"].shape[0])
        return {
            "plan": plan,
            "iteration": step,
            "d_loss": logs.get("d_loss"),
            "g_loss": logs.get("g_loss"),
            "real_logits": real_logits,
            "fake_logits": fake_logits,
        }

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.adv.sample_every_n_steps
        it = int(self.gan_iteration)
        if every and it % every == 0:
            self.log_sample_grid()


__all__ = [
    "attached_schedule",
    "iteration_generator",
    "load_init_state",
    "remember_initial_lr",
    "hinge_d_loss",
    "hinge_g_loss",
    "ns_d_loss",
    "ns_g_loss",
    "r1_penalty",
    "approx_r1_penalty",
    "discriminator_accuracy",
    "GAN_LOSSES",
    "StepPlan",
    "AdversarialSchedule",
    "d_updates_at",
    "capture_features",
    "UNetEncoderFeatures",
    "ModuleFeatures",
    "HFVisionFeatures",
    "DigitsClassifierFeatures",
    "MultiLevelHeads",
    "Discriminator",
    "DiscriminatorAugment",
    "frozen",
    "unclipped_x0",
    "Generated",
    "AdversarialMethod",
]
