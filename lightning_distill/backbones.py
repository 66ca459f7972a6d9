"""Backbone adapters: one call convention for every diffusers denoiser, so methods stay backbone-agnostic.

The framework calls a denoising network one way (:meth:`~lightning_distill.parametrisation.Denoiser.network`):
``x_t`` of shape (B, C, H, W), the network timestep ``model_t`` (B,) in the scheduler's units (VP: the
integer timestep; flow: s * T, ``FlowMatchEulerDiscreteScheduler.timesteps``) and conditioning keywords
(``class_labels``, ``encoder_hidden_states``, ``pooled_projections``, ``encoder_attention_mask``, ...).
An adapter maps that call onto one model family's forward as its diffusers pipeline does, and returns
the prediction as (B, C, H, W):

==========================  ======================  ===========================================================
model class                 pipeline read           what the adapter does
==========================  ======================  ===========================================================
``UNet2DModel``,            ``DDPMPipeline``,       ``model(x_t, model_t, **cond)``: the call the framework
``UNet2DConditionModel``    ``StableDiffusion...``  always made (and the one test doubles follow)
``DiTTransformer2DModel``   ``DiTPipeline``         ``timestep=model_t``, ``class_labels``; a learned-sigma
                                                    output (2C channels) keeps its first C (the eps half)
``SD3Transformer2DModel``   ``StableDiffusion3``    ``timestep=model_t`` (sigma * 1000, float),
                                                    ``encoder_hidden_states`` + ``pooled_projections``
``FluxTransformer2DModel``  ``FluxPipeline``        2x2-packs x_t to (B, HW/4, 4C), builds ``img_ids`` /
                                                    ``txt_ids``, ``timestep=model_t / 1000`` (the model
                                                    multiplies by 1000 again), optional ``guidance``; unpacks
``SanaTransformer2DModel``  ``SanaPipeline``        ``timestep=model_t * config.timestep_scale``,
                                                    ``encoder_attention_mask``; learned-sigma split as DiT
==========================  ======================  ===========================================================

Plus what the rest of the code reads from a backbone: :func:`sample_shape` (C, H, W), :func:`num_classes`
(class-conditional), :func:`is_text_conditional`, :func:`image_seq_len` (for a resolution-dependent flow
shift). Dtypes are the caller's business (``Denoiser.network`` casts inputs to the network's dtype).

A network that is not a diffusers model (a test double, a custom ``nn.Module``) is called with the UNet
convention, which is what "anything with the same call" has always meant here; a diffusers model of any
other class is refused with a :class:`~lightning_distill.errors.ConfigError` naming it and the supported ones.

Example::

    >>> from lightning_distill import backbones
    >>> out = backbones.call(transformer, x_t, model_t, class_labels=y)   # (B, C, H, W)
    >>> backbones.sample_shape(transformer), backbones.num_classes(transformer)
    ((4, 32, 32), 1000)
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

from .errors import ConfigError


def _config(model: nn.Module):
    return getattr(model, "config", None) or {}


def _get(cfg, key: str, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _square(size) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def _first_half_if_learned_sigma(out: Tensor, in_channels: int) -> Tensor:
    # DiT / PixArt / SANA with learned variance output [eps, variance] on 2C channels; every sampler here
    # (and the pipelines) step with the first C only, as DiTPipeline's "learned sigma" branch does.
    return out[:, :in_channels] if out.shape[1] == 2 * in_channels else out


class Backbone:
    """How the framework calls one family of diffusers denoisers (see the module table).

    Subclasses set ``classes`` (the diffusers class names they serve) and ``conditions`` (the
    conditioning keywords they accept; None: anything, passed through) and override what differs.
    """

    classes: tuple[str, ...] = ()
    conditions: tuple[str, ...] | None = None
    text_conditional: bool = False

    def __call__(self, model: nn.Module, x_t: Tensor, model_t: Tensor, **cond) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def check_conditions(self, model: nn.Module, cond: dict) -> None:
        if self.conditions is None:
            return
        unknown = sorted(set(cond) - set(self.conditions))
        if unknown:
            raise ConfigError(
                f"{type(model).__name__} takes the conditions {', '.join(self.conditions)}; got {', '.join(unknown)}"
            )

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        cfg = _config(model)
        return (int(_get(cfg, "in_channels")), *_square(_get(cfg, "sample_size")))

    def num_classes(self, model: nn.Module) -> int | None:
        return None

    def is_text_conditional(self, model: nn.Module) -> bool:
        return self.text_conditional

    def to_pipeline_layout(self, model: nn.Module, x: Tensor) -> Tensor:
        """``x`` (B, C, H, W) in the layout the family's stock pipeline keeps its latents in while it steps the
        scheduler (the identity here; Flux: packed)."""
        return x

    def from_pipeline_layout(self, model: nn.Module, x: Tensor, shape: tuple[int, ...]) -> Tensor:
        """The inverse of :meth:`to_pipeline_layout`, back to ``shape`` (B, C, H, W)."""
        return x

    def image_seq_len(self, model: nn.Module) -> int | None:
        """Tokens per sample, (H / patch) (W / patch); None when the config gives no resolution."""
        cfg = _config(model)
        if _get(cfg, "sample_size") is None:
            return None
        _, h, w = self.sample_shape(model)
        patch = int(_get(cfg, "patch_size", None) or 1)
        return (h // patch) * (w // patch)


class UNetBackbone(Backbone):
    """``UNet2DModel`` / ``UNet2DConditionModel`` (and networks with their call): ``model(x_t, t, **cond)``."""

    classes = ("UNet2DModel", "UNet2DConditionModel")

    def __call__(self, model, x_t, model_t, **cond):
        return model(x_t, model_t, **cond, return_dict=False)[0]

    def sample_shape(self, model):
        cfg = _config(model)
        return (int(_get(cfg, "in_channels")), *_square(_get(cfg, "sample_size")))

    def num_classes(self, model):
        n = _get(_config(model), "num_class_embeds", None)
        return int(n) if n else None

    def is_text_conditional(self, model):
        return type(model).__name__ == "UNet2DConditionModel"


class DiTBackbone(Backbone):
    """``DiTTransformer2DModel``: class-conditional (``num_embeds_ada_norm`` classes), learned sigma.

    Its label table has one more row than classes, the null label ``num_classes`` that ``DiTPipeline``
    passes for the unconditional half of classifier-free guidance.
    """

    classes = ("DiTTransformer2DModel",)
    conditions = ("class_labels",)

    def __call__(self, model, x_t, model_t, class_labels=None):
        if class_labels is None:
            raise ConfigError(
                "DiTTransformer2DModel is class-conditional: pass class_labels "
                f"(0 .. {self.num_classes(model) - 1}; {self.num_classes(model)} is the null label)"
            )
        out = model(x_t, timestep=model_t, class_labels=class_labels, return_dict=False)[0]
        return _first_half_if_learned_sigma(out, x_t.shape[1])

    def num_classes(self, model):
        return int(_get(_config(model), "num_embeds_ada_norm"))

    @staticmethod
    def without_label_dropout(model: nn.Module) -> nn.Module:
        """Switch off the label dropout DiT applies in train mode (classifier-free-guidance training):
        a distilled student regresses the teacher's *conditional* targets, so a dropped label would pair
        the null class with a conditional target (and each block draws its own drop). The null label's
        embedding row stays (the table size is fixed at construction)."""
        for module in model.modules():
            if type(module).__name__ == "LabelEmbedding":
                module.dropout_prob = 0.0
        return model


class SD3Backbone(Backbone):
    """``SD3Transformer2DModel`` (MMDiT): ``encoder_hidden_states`` + ``pooled_projections``, timestep s * 1000."""

    classes = ("SD3Transformer2DModel",)
    conditions = ("encoder_hidden_states", "pooled_projections")
    text_conditional = True

    def __call__(self, model, x_t, model_t, encoder_hidden_states=None, pooled_projections=None):
        # StableDiffusion3Pipeline: timestep = t.expand(B), the scheduler's sigma * 1000, as is.
        return model(
            hidden_states=x_t, timestep=model_t, encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, return_dict=False,
        )[0]


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, HW/4, 4C): Flux's 2x2 patch packing (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ConfigError(f"FluxTransformer2DModel packs 2x2 patches: latent height and width must be even, got {h}x{w}")
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """(B, HW/4, 4C) -> (B, C, H, W), the inverse of :func:`pack_latents` (``FluxPipeline._unpack_latents``)."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def flux_image_ids(h: int, w: int, device=None, dtype=None) -> Tensor:
    """Rotary position ids (HW/4, 3) of packed latents: (0, row, col) (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_text_ids(encoder_hidden_states: Tensor) -> Tensor:
    """Rotary position ids (L, 3) of the text tokens: zeros, one row per token of ``encoder_hidden_states``
    (B, L, D), in its dtype (``FluxPipeline.encode_prompt``'s ``text_ids``)."""
    return torch.zeros(encoder_hidden_states.shape[1], 3, device=encoder_hidden_states.device,
                       dtype=encoder_hidden_states.dtype)


class FluxBackbone(Backbone):
    """``FluxTransformer2DModel``: packed 2x2 latents, rotary ids, timestep s (not s * 1000), optional guidance.

    Its config has no resolution: the sample shape is ``config.sample_size`` when a config carries one,
    else ``FluxPipeline``'s default, 128 x 128 latents (1024 px).

    Text keywords are ``FluxPipeline.encode_prompt``'s (:func:`~lightning_distill.teacher.flux_prompt_embeds`):
    T5's sequence as ``encoder_hidden_states``, CLIP's pooled output as ``pooled_projections``; ``txt_ids``
    (zeros, :func:`flux_text_ids`) and ``img_ids`` are built here when not given. ``guidance`` (B,): the embedded
    guidance of a guidance-distilled network (Flux-dev), which the teacher puts among the prompt keywords.
    """

    classes = ("FluxTransformer2DModel",)
    conditions = ("encoder_hidden_states", "pooled_projections", "guidance", "txt_ids", "img_ids")
    text_conditional = True
    default_sample_size = 128  # FluxPipeline.default_sample_size (latent pixels)

    def __call__(self, model, x_t, model_t, encoder_hidden_states=None, pooled_projections=None,
                 guidance=None, txt_ids=None, img_ids=None):
        b, _, h, w = x_t.shape
        if guidance is None and _get(_config(model), "guidance_embeds", False):
            raise ConfigError("FluxTransformer2DModel with guidance_embeds needs a guidance scale: pass guidance (B,)")
        if txt_ids is None:  # FluxPipeline: zeros (text length, 3); zeros in any dtype are the same ids
            txt_ids = flux_text_ids(encoder_hidden_states).to(device=x_t.device, dtype=x_t.dtype)
        if img_ids is None:
            img_ids = flux_image_ids(h, w, x_t.device, x_t.dtype)
        # FluxPipeline: timestep = t.expand(B).to(latents.dtype), passed as timestep / 1000 (the model
        # multiplies by 1000 again); 1000 is the pipeline's constant, not num_train_timesteps.
        out = model(
            hidden_states=pack_latents(x_t), timestep=torch.as_tensor(model_t).to(x_t.dtype) / 1000,
            guidance=guidance, pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    def to_pipeline_layout(self, model, x):
        # FluxPipeline steps its scheduler on packed latents: a sampler's fresh noise (FlowMatchLCMScheduler) is
        # drawn in that shape, so the same random numbers land on other pixels than in (B, C, H, W)
        return pack_latents(x)

    def from_pipeline_layout(self, model, x, shape):
        return unpack_latents(x, shape[-2], shape[-1])

    def sample_shape(self, model):
        cfg = _config(model)
        size = _get(cfg, "sample_size", None) or self.default_sample_size
        return (int(_get(cfg, "in_channels")) // 4, *_square(size))

    def image_seq_len(self, model):
        _, h, w = self.sample_shape(model)
        return (h // 2) * (w // 2)


class SanaBackbone(Backbone):
    """``SanaTransformer2DModel``: ``encoder_hidden_states`` (+ ``encoder_attention_mask``), timestep scaled
    by ``config.timestep_scale``; a learned-sigma output keeps its first half (``SanaPipeline``)."""

    classes = ("SanaTransformer2DModel",)
    conditions = ("encoder_hidden_states", "encoder_attention_mask", "guidance")
    text_conditional = True

    def __call__(self, model, x_t, model_t, encoder_hidden_states=None, encoder_attention_mask=None, guidance=None):
        scale = _get(_config(model), "timestep_scale", 1.0)
        out = model(
            x_t, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
            timestep=model_t * scale, guidance=guidance, return_dict=False,
        )[0]
        return _first_half_if_learned_sigma(out, x_t.shape[1])


#: the adapters, by the diffusers class names they serve.
BACKBONES: tuple[Backbone, ...] = (UNetBackbone(), DiTBackbone(), SD3Backbone(), FluxBackbone(), SanaBackbone())
SUPPORTED: tuple[str, ...] = tuple(name for b in BACKBONES for name in b.classes)
_BY_NAME = {name: b for b in BACKBONES for name in b.classes}


def check_supported(class_name: str) -> Backbone:
    """The adapter of diffusers class ``class_name``; ConfigError naming it and the supported ones otherwise."""
    if class_name not in _BY_NAME:
        raise ConfigError(f"{class_name} is not a supported denoiser; supported: {', '.join(SUPPORTED)}")
    return _BY_NAME[class_name]


@lru_cache(maxsize=None)
def _for_type(cls: type) -> Backbone:
    names = [c.__name__ for c in cls.__mro__]
    for name in names:  # the class itself first, then its bases (a subclass of UNet2DModel is a UNet)
        if name in _BY_NAME:
            return _BY_NAME[name]
    if "ModelMixin" in names:
        return check_supported(cls.__name__)  # raises: a diffusers model nobody wrote an adapter for
    return _BY_NAME["UNet2DModel"]  # not a diffusers model: a custom network with the UNet call


def backbone_for(model: nn.Module) -> Backbone:
    """The adapter that calls ``model`` (a ``torch.compile`` wrapper is looked through)."""
    return _for_type(type(getattr(model, "_orig_mod", model)))


def call(model: nn.Module, x_t: Tensor, model_t: Tensor, **cond) -> Tensor:
    """``model``'s prediction (B, C, H, W) at (x_t, network timestep ``model_t`` (B,)) with conditioning ``cond``."""
    backbone = backbone_for(model)
    backbone.check_conditions(model, cond)
    return backbone(model, x_t, model_t, **cond)


def sample_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of one sample the network denoises (latent units for latent models)."""
    return backbone_for(model).sample_shape(model)


def num_classes(model: nn.Module) -> int | None:
    """The number of classes of a class-conditional network; None when it takes no class label."""
    return backbone_for(model).num_classes(model)


def is_class_conditional(model: nn.Module) -> bool:
    return num_classes(model) is not None


def is_text_conditional(model: nn.Module) -> bool:
    """Whether the network cross-attends to text embeddings (``encoder_hidden_states``)."""
    return backbone_for(model).is_text_conditional(model)


def image_seq_len(model: nn.Module) -> int | None:
    """Image tokens per sample (what a resolution-dependent flow shift reads); None when unknown."""
    return backbone_for(model).image_seq_len(model)


def to_pipeline_layout(model: nn.Module, x: Tensor) -> Tensor:
    """Latents (B, C, H, W) in the layout ``model``'s stock pipeline steps its scheduler in (Flux: packed 2x2,
    (B, HW/4, 4C); every other family: as they are). A sampling loop that steps the scheduler in this layout
    draws a stochastic sampler's fresh noise as the pipeline does."""
    return backbone_for(model).to_pipeline_layout(model, x)


def from_pipeline_layout(model: nn.Module, x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The inverse of :func:`to_pipeline_layout`: back to ``shape`` (B, C, H, W)."""
    return backbone_for(model).from_pipeline_layout(model, x, shape)


def prepare_student(model: nn.Module) -> nn.Module:
    """Make a copy of a teacher network fit to be a distilled student (DiT: no label dropout)."""
    if isinstance(backbone_for(model), DiTBackbone):
        DiTBackbone.without_label_dropout(model)
    return model


def prepare_critic(model: nn.Module) -> nn.Module:
    """Make a trained copy of a teacher network fit to be queried as a function beside the eval-mode teacher
    (DMD2's fake score, a trainable discriminator backbone): :func:`prepare_student`, and every ``nn.Dropout``
    at p = 0, so that in train mode its passes (real, fake, R1's perturbed real; the fake score against the
    teacher) see one function instead of independent dropout masks."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return prepare_student(model)


__all__ = [
    "BACKBONES",
    "SUPPORTED",
    "Backbone",
    "backbone_for",
    "call",
    "check_supported",
    "flux_image_ids",
    "flux_text_ids",
    "from_pipeline_layout",
    "image_seq_len",
    "is_class_conditional",
    "is_text_conditional",
    "num_classes",
    "pack_latents",
    "prepare_critic",
    "prepare_student",
    "sample_shape",
    "to_pipeline_layout",
    "unpack_latents",
]
