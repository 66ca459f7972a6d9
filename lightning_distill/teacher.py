"""Loading a frozen diffusers-format teacher (local folder or hub id) into one shared object.

The teacher is loaded once, by :class:`~lightning_distill.data.TeacherDataModule`, and handed to the
method (``link_arguments`` in the CLI, or ``trainer.datamodule.teacher``); no method loads its own.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn

from . import backbones
from .errors import ConfigError
from .parametrisation import Denoiser, NoiseSchedule, PredictionType, as_flow_matching, schedule_from_scheduler

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_TEACHERS = {
    "bundled:digits": ASSETS / "teacher_digits",  # VP, v-prediction, DDIM
    "bundled:digits-flow": ASSETS / "teacher_digits_flow",  # rectified flow, velocity, flow Euler
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class TeacherError(ValueError):
    """A teacher that cannot be used: missing, incomplete, or incompatible with the data."""


def resolve_teacher_source(source: str | os.PathLike) -> tuple[Path | None, str | None]:
    """Return (local_folder, hub_id); exactly one is not None. Raises TeacherError for a missing folder."""
    source = str(source)
    if source in BUNDLED_TEACHERS:
        path = BUNDLED_TEACHERS[source]
        if not path.is_dir():
            raise TeacherError(f"bundled teacher {source!r} is missing from the installation ({path})")
        return path, None
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TeacherError(f"teacher {source!r} is a file; expected a diffusers folder with unet/ and scheduler/")
        return path, None
    looks_local = source.startswith((".", "/", "~")) or source.count("/") != 1 or not _HUB_ID.match(source)
    if looks_local:
        raise TeacherError(f"teacher folder {source!r} does not exist")
    return None, source


def _subfolder_class(folder: Path, sub: str, config_name: str) -> str:
    cfg = folder / sub / config_name
    try:
        return json.loads(cfg.read_text())["_class_name"]
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise TeacherError(f"teacher folder {folder}: cannot read {sub}/{config_name} ({err})") from err


#: where a diffusers folder keeps its denoising network: UNet pipelines in unet/, transformer pipelines
#: (DiT, SD3, Flux, SANA) in transformer/.
DENOISER_FOLDERS = ("unet", "transformer")


def denoiser_folder(names) -> str | None:
    """The denoiser component among ``names`` (model_index.json keys or subfolders): unet or transformer."""
    return next((sub for sub in DENOISER_FOLDERS if sub in names), None)


def _local_denoiser_folder(folder: Path) -> str | None:
    # model_index.json says which component the pipeline denoises with; without one, the folder present.
    present = [sub for sub in DENOISER_FOLDERS if (folder / sub).is_dir()]
    index = _read_model_index(folder / "model_index.json")
    return denoiser_folder([sub for sub in present if sub in index]) or denoiser_folder(present)


def _denoiser_class(name: str, where: str):
    try:
        backbones.check_supported(name)
    except ConfigError as err:
        raise TeacherError(f"teacher {where}: {err}") from None
    return _diffusers_class(name)


def _diffusers_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise TeacherError(f"teacher component class {name!r} is not a diffusers class")
    return cls


#: optional components load_teacher reads beside the denoiser and scheduler.
TEXT_AND_VAE = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
#: the text encoder classes a teacher may hold (SD1.5: CLIPTextModel; SD3: CLIPTextModelWithProjection x 2 and
#: an optional T5EncoderModel; Flux: CLIPTextModel + T5EncoderModel; SANA: Gemma2Model).
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "Gemma2Model")
#: per denoiser class, the encoder folders its stock pipeline reads and the classes it reads there (the first:
#: the default where model_index.json names none). StableDiffusion3Pipeline reads the projected pooled output
#: (``text_embeds``) of both CLIPs; FluxPipeline the ``pooler_output`` of a plain CLIPTextModel and T5's sequence.
FAMILY_TEXT_ENCODERS: dict[str, dict[str, tuple[str, ...]]] = {
    "SD3Transformer2DModel": {
        "text_encoder": ("CLIPTextModelWithProjection",), "text_encoder_2": ("CLIPTextModelWithProjection",),
        "text_encoder_3": ("T5EncoderModel",),
    },
    "FluxTransformer2DModel": {"text_encoder": ("CLIPTextModel",), "text_encoder_2": ("T5EncoderModel",)},
    "SanaTransformer2DModel": {"text_encoder": ("Gemma2Model",)},
}
#: every other denoiser (SD1.5-style UNets): one or two CLIP encoders, as before T5 was read.
_CLIP_ONLY = {"text_encoder": TEXT_ENCODERS[:2], "text_encoder_2": TEXT_ENCODERS[:2]}
#: the tokenizer class read for each encoder class (T5: the ``tokenizers``-backed fast tokenizer, which needs no
#: sentencepiece; model_index.json's ``T5Tokenizer`` / ``T5TokenizerFast`` both read as it).
TOKENIZER_FOR = {"CLIPTextModel": "CLIPTokenizer", "CLIPTextModelWithProjection": "CLIPTokenizer",
                 "T5EncoderModel": "T5TokenizerFast", "Gemma2Model": "GemmaTokenizerFast"}
#: the prompt length of the T5 part (SANA: of the Gemma2 sequence) by denoiser class, the stock pipelines'
#: ``max_sequence_length`` default.
MAX_SEQUENCE_LENGTH = {"SD3Transformer2DModel": 256, "FluxTransformer2DModel": 512, "SanaTransformer2DModel": 300}
#: the VAE class the stock pipeline of a denoiser class reads (``SanaPipeline``: the deep-compression
#: ``AutoencoderDC``); every other family: ``AutoencoderKL``.
FAMILY_VAES = {"SanaTransformer2DModel": "AutoencoderDC"}
#: ``SanaPipeline.__call__``'s default ``complex_human_instruction`` (diffusers 0.42.1; tests/test_sana.py checks
#: it against the installed pipeline's): lines joined with
#: "\n" and put before every prompt (not before the negative prompt) when Gemma2 encodes it.
SANA_COMPLEX_HUMAN_INSTRUCTION: tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)


def _read_model_index(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class TextEncoderError(TeacherError, ConfigError):
    """A text encoder or tokenizer class the teacher's pipeline family does not read (a one-line ConfigError)."""


def vae_class_name(denoiser_class: str | None) -> str:
    """The VAE class the stock pipeline of ``denoiser_class`` reads (:data:`FAMILY_VAES`; AutoencoderKL otherwise)."""
    return FAMILY_VAES.get(denoiser_class or "", "AutoencoderKL")


def family_text_encoders(denoiser_class: str | None) -> dict[str, tuple[str, ...]]:
    """Encoder folder -> the classes the stock pipeline of ``denoiser_class`` reads there (:data:`FAMILY_TEXT_ENCODERS`)."""
    return FAMILY_TEXT_ENCODERS.get(denoiser_class or "", _CLIP_ONLY)


def _text_encoder_class_name(index: dict, name: str, denoiser_class: str | None = None) -> str:
    family = family_text_encoders(denoiser_class)
    allowed = family.get(name)
    if allowed is None:
        raise TextEncoderError(
            f"teacher {name}/: a {denoiser_class} pipeline reads no {name}/ (it reads "
            f"{', '.join(f + '/' for f in family)}); remove it"
        )
    entry = index.get(name) or [None, allowed[0]]
    cls = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
    if cls not in allowed:
        # SANA's Gemma2Model named apart, after the CLIP / T5 list the SD / SD3 / Flux messages always gave
        clip_t5 = [e for e in TEXT_ENCODERS if e != "Gemma2Model"]
        raise TextEncoderError(
            f"teacher {name}/ is a {cls}; a {denoiser_class or 'UNet'} teacher reads {' or '.join(allowed)} there "
            f"(supported text encoders: {', '.join(clip_t5)}) or Gemma2Model (SanaTransformer2DModel teachers)"
        )
    return cls


def _text_encoder_class(index: dict, name: str, denoiser_class: str | None = None):
    """The transformers class of text encoder ``name``: model_index.json's entry (CLIPTextModel, or the family's
    default, without one), checked against what the pipeline of ``denoiser_class`` reads there."""
    import transformers

    return getattr(transformers, _text_encoder_class_name(index, name, denoiser_class))


def _tokenizer_class(index: dict, name: str, encoder_class: str):
    """The transformers class of tokenizer ``name`` (``tokenizer``, ``tokenizer_2``, ...): CLIPTokenizer beside a
    CLIP encoder, T5TokenizerFast beside T5; a model_index.json entry of another kind is refused."""
    import transformers

    entry = index.get(name)
    named = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] else None
    want = TOKENIZER_FOR.get(encoder_class, "CLIPTokenizer")
    if named is not None and named.removesuffix("Fast") != want.removesuffix("Fast"):
        raise TextEncoderError(
            f"teacher {name}/ is a {named} beside a {encoder_class}; supported tokenizers: CLIPTokenizer (CLIP "
            "encoders), T5TokenizerFast (T5), GemmaTokenizerFast (Gemma2)"
        )
    return getattr(transformers, want)


class DiffusionTeacher(nn.Module):
    """A frozen diffusion model: denoiser (UNet + schedule + prediction type) and optional VAE / text encoder.

    It stays in eval mode whatever ``.train()`` is called with (a frozen teacher with active dropout
    would give noisy targets), and none of its parameters require gradients.

    Args:
        unet: the teacher network.
        scheduler: a diffusers scheduler instance (its config is kept for exports); a flow-sigma DPM-Solver / UniPC
            one (SANA's, Wan's) is kept as the ``FlowMatchEulerDiscreteScheduler`` of its path
            (:func:`~lightning_distill.parametrisation.flow_matching_config`; one info line says so).
        prediction_type: overrides the scheduler's ``prediction_type`` when given.
        source, revision: where it was loaded from; a teacher with a source is reloadable and is
            therefore left out of checkpoints (see ``DistillationMethod``).
        vae, text_encoder, tokenizer: latent / text-conditional teachers (LCM).
        text_encoder_2, tokenizer_2: the second CLIP encoder of an SD3 teacher (``SD3Transformer2DModel``); the
            T5 encoder of a Flux teacher (``FluxTransformer2DModel``; ``text_encoder`` is then its CLIP).
        text_encoder_3, tokenizer_3: SD3's T5 encoder; None (absent, as ``StableDiffusion3Pipeline`` allows): the
            T5 part of the prompt embeddings is zeros.
        max_sequence_length: the T5 prompt length (SD3: also of the zero T5 part without T5), the pipelines'
            ``max_sequence_length``; None: their default (SD3 256, Flux 512).
        embedded_guidance: a guidance-distilled Flux network (``guidance_embeds``, Flux-dev) takes the guidance
            scale as an input: ``FluxPipeline``'s ``guidance_scale`` (3.5 there by default). It rides with the
            prompt keywords (:meth:`text_conditioning`), so teacher, student and export see the same value.
        complex_human_instruction: SANA teachers (``SanaTransformer2DModel``): the lines ``SanaPipeline`` puts
            before every prompt it encodes, its ``complex_human_instruction`` (default: the pipeline's own,
            :data:`SANA_COMPLEX_HUMAN_INSTRUCTION`; None or empty: no instruction). Other families read none (kept
            None). ``max_sequence_length`` is then the Gemma2 prompt length (300, the pipeline's default).
        clip_x0: clamp x0 estimates (pixel teachers); None for latent teachers.

    Example::

        >>> teacher = load_teacher("bundled:digits")
        >>> teacher.denoiser(x_t, t).x0
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        prediction_type: PredictionType | None = None,
        source: str | None = None,
        revision: str | None = None,
        vae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer=None,
        clip_x0: float | None = 1.0,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2=None,
        max_sequence_length: int | None = None,
        text_encoder_3: nn.Module | None = None,
        tokenizer_3=None,
        embedded_guidance: float = 3.5,
        complex_human_instruction: Sequence[str] | None = SANA_COMPLEX_HUMAN_INSTRUCTION,
    ) -> None:
        super().__init__()
        try:
            # a flow-sigma DPM-Solver / UniPC config (SANA's, Wan's) is read as the FlowMatchEulerDiscreteScheduler of
            # its path, so every sampler, export and promoted teacher built from scheduler_config is a flow one
            read_as = as_flow_matching(scheduler)
            schedule = schedule_from_scheduler(read_as, image_seq_len(unet))
        except ValueError as err:
            raise TeacherError(f"teacher {source or type(unet).__name__}: {err}") from err
        if read_as is not scheduler:
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(
                f"teacher {source or type(unet).__name__}: {type(scheduler).__name__} (use_flow_sigmas, flow_shift="
                f"{scheduler.config.get('flow_shift', 1.0):g}) read as FlowMatchEulerDiscreteScheduler(num_train_timesteps="
                f"{read_as.config.num_train_timesteps}, shift={read_as.config.shift:g}), the same rectified-flow path; "
                "the framework samples it with its flow Euler / FlowMatchLCM samplers"
            )
            scheduler = read_as
        if schedule.path == "flow":
            # flow-matching networks predict the velocity, and their samplers never clamp x0
            if prediction_type not in (None, "flow_prediction"):
                raise TeacherError(
                    f"teacher {source or type(unet).__name__}: a flow-matching teacher ({type(scheduler).__name__}) "
                    f"predicts the velocity: prediction_type must be 'flow_prediction' (or unset), not {prediction_type!r}"
                )
            prediction_type, clip_x0 = "flow_prediction", None
            schedule.linspace_sigmas = pipeline_linspace_sigmas(unet, schedule.linspace_sigmas)
        prediction_type = prediction_type or scheduler.config.get("prediction_type", "epsilon")
        self.denoiser = Denoiser(unet, schedule, prediction_type, clip_x0)
        self.scheduler_class = type(scheduler).__name__
        self.scheduler_config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        self.source = source
        self.revision = revision
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_3 = text_encoder_3
        self.tokenizer_3 = tokenizer_3
        if max_sequence_length is None:
            max_sequence_length = MAX_SEQUENCE_LENGTH.get(type(getattr(unet, "_orig_mod", unet)).__name__, 256)
        self.max_sequence_length = int(max_sequence_length)
        self.embedded_guidance = float(embedded_guidance)
        sana = isinstance(backbones.backbone_for(unet), backbones.SanaBackbone)
        if isinstance(complex_human_instruction, str):  # one string would read as its characters, one per line
            raise TeacherError("complex_human_instruction is a list of lines (SanaPipeline's), not one string")
        self.complex_human_instruction: tuple[str, ...] | None = (
            tuple(complex_human_instruction) if sana and complex_human_instruction else None)
        # Filled by data.text_cache / data.release_encoders (lightning_distill/text_cache.py): prompt -> its text
        # keywords (batch 1), and a record of the encoders released (None while they are held).
        self.prompt_table: dict[str, dict[str, torch.Tensor]] = {}
        self.released = None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DiffusionTeacher":  # noqa: ARG002 - frozen on purpose
        return super().train(False)

    @property
    def unet(self) -> nn.Module:
        return self.denoiser.unet

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    @property
    def prediction_type(self) -> str:
        return self.denoiser.prediction_type

    @property
    def in_channels(self) -> int:
        """Channels of one sample (a packed Flux transformer's in_channels / 4); see ``backbones.sample_shape``."""
        return backbones.sample_shape(self.unet)[0]

    @property
    def sample_size(self) -> int:
        return backbones.sample_shape(self.unet)[1]

    @property
    def num_classes(self) -> int | None:
        """Classes of a class-conditional network (UNet ``num_class_embeds``, DiT ``num_embeds_ada_norm``)."""
        return backbones.num_classes(self.unet)

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel, as the pipelines compute it: 2 ** (blocks - 1) of ``AutoencoderKL``'s
        ``block_out_channels`` or ``AutoencoderDC``'s ``encoder_block_out_channels`` (``SanaPipeline``)."""
        if self.vae is None:
            return 1
        cfg = self.vae.config
        blocks = cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels")
        return 2 ** (len(blocks) - 1)

    # --- latent and text-conditional teachers (LCM) ---------------------------------------------

    @property
    def is_guidance_distilled(self) -> bool:
        """A network with a guidance input (Flux-dev's ``guidance_embeds``): guided by ``embedded_guidance``, not
        by classifier-free guidance against another prompt."""
        return bool(getattr(self.unet, "config", {}).get("guidance_embeds", False))

    @property
    def is_text_conditional(self) -> bool:
        held = self.text_encoder is not None or self.released is not None  # released: prompts come from prompt_table
        return held and self.tokenizer is not None

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> model-space latents (mode of q(z | x) - shift_factor) * scaling_factor.

        The mode, not a sample, so a latent cache is deterministic (the SD VAE's posterior std is tiny).
        ``AutoencoderDC`` (SANA) is deterministic: its ``encode`` returns the latent itself (``.latent``), and
        its config has no shift.
        """
        if self.vae is None:
            raise TeacherError("encode_images needs a latent teacher (a vae/ folder)")
        cfg = self.vae.config
        dtype = next(self.vae.parameters()).dtype
        out = self.vae.encode(x.to(dtype))
        posterior = getattr(out, "latent_dist", None)
        z = (posterior.mode() if posterior is not None else out.latent).float()
        return (z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> images in about [-1, 1] (inverse of :meth:`encode_images`)."""
        if self.vae is None:
            raise TeacherError("decode_latents needs a latent teacher (a vae/ folder)")
        cfg = self.vae.config
        z = z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        return self.vae.decode(z.to(next(self.vae.parameters()).dtype), return_dict=False)[0].float()

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (N, model_max_length), padded and truncated as diffusers' SD / LCM pipelines do."""
        if self.tokenizer is None:
            raise TeacherError("tokenize needs a text-conditional teacher (a tokenizer/ folder)")
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> prompt embeddings (the text encoder's last hidden state, as the pipelines use).

        Like the pipelines, no attention mask is passed for CLIP (``use_attention_mask`` unset).
        """
        if self.text_encoder is None:
            raise TeacherError("encode_text needs a text-conditional teacher (a text_encoder/ folder)")
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(input_ids.to(device))[0]

    @property
    def is_flux(self) -> bool:
        """A Flux teacher: its second encoder is T5 (``FluxPipeline``), not a second CLIP."""
        return isinstance(backbones.backbone_for(self.unet), backbones.FluxBackbone)

    def text_inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """What a batch carries for ``prompts``: token ids ``input_ids`` (CLIP), and where the teacher has them:

        * SD3: ``input_ids_2`` (the second CLIP), padded and truncated to the *first* tokenizer's
          ``model_max_length`` as ``StableDiffusion3Pipeline._get_clip_prompt_embeds`` does; ``input_ids_3`` (T5,
          ``max_sequence_length``, special tokens added), as its ``_get_t5_prompt_embeds``;
        * Flux: ``input_ids_2`` (T5, ``max_sequence_length``), as ``FluxPipeline._get_t5_prompt_embeds``.

        SANA teachers: Gemma2's ``input_ids``, ``attention_mask`` and ``input_length`` (:meth:`_sana_text_inputs`).
        """
        prompts = list(prompts)
        if isinstance(backbones.backbone_for(self.unet), backbones.SanaBackbone):
            return self._sana_text_inputs(prompts)
        inputs = {"input_ids": self.tokenize(prompts)}

        def t5_ids(tokenizer) -> torch.Tensor:
            return tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids

        if self.is_flux:
            if self.tokenizer_2 is not None:
                inputs["input_ids_2"] = t5_ids(self.tokenizer_2)
            return inputs
        if self.tokenizer_2 is not None:
            inputs["input_ids_2"] = self.tokenizer_2(
                prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids
        if self.tokenizer_3 is not None:
            inputs["input_ids_3"] = t5_ids(self.tokenizer_3)
        return inputs

    def _sana_text_inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Gemma2 token ids as ``SanaPipeline._get_gemma_prompt_embeds`` makes them (``clean_caption`` False).

        Each prompt is lower-cased and stripped, prefixed with the ``complex_human_instruction`` lines joined by
        "\n", and tokenized with special tokens, right-padded and truncated to I + ``max_sequence_length`` - 2
        tokens (I: the instruction's own token count, BOS included). A prompt that is empty after that
        preprocessing is the *unconditional* one, every method's ``""``: it is tokenized as the pipeline's
        classifier-free guidance tokenizes its ``negative_prompt`` ``""``, without the instruction, to
        ``max_sequence_length`` tokens. (A user calling ``SanaPipeline(prompt="")`` gets the instruction
        before ""; here ``""`` always means no prompt.)

        Returns:
            ``input_ids`` and ``attention_mask`` (N, W), padded (pad id, mask 0) to the widest row, and
            ``input_length`` (N,): each row's own width, which :func:`sana_prompt_embeds` encodes.
        """
        if self.tokenizer is None:
            raise TeacherError("a SANA teacher tokenizes prompts with Gemma's tokenizer: it needs tokenizer/")
        length = self.max_sequence_length
        texts = [p.lower().strip() for p in prompts]
        instruction = "\n".join(self.complex_human_instruction) if self.complex_human_instruction else None
        rows = []  # (row indices, width, ids, mask): prompts with the instruction, then the unconditional ones
        for kind in ("prompt", "unconditional"):
            index = [i for i, t in enumerate(texts) if (t == "") == (kind == "unconditional")]
            if not index:
                continue
            batch, width = [texts[i] for i in index], length
            if kind == "prompt" and instruction is not None:
                batch = [instruction + t for t in batch]
                width = len(self.tokenizer.encode(instruction)) + length - 2  # the pipeline's max_length_all
            tok = self.tokenizer(batch, padding="max_length", max_length=width, truncation=True,
                                 add_special_tokens=True, return_tensors="pt", padding_side="right")
            rows.append((index, width, tok.input_ids, tok.attention_mask))
        wide = max(width for _, width, _, _ in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(texts), wide), pad, dtype=torch.long)
        mask = torch.zeros(len(texts), wide, dtype=torch.long)
        lengths = torch.zeros(len(texts), dtype=torch.long)
        for index, width, row_ids, row_mask in rows:
            ids[index, :width], mask[index, :width], lengths[index] = row_ids, row_mask.to(torch.long), width
        return {"input_ids": ids, "attention_mask": mask, "input_length": lengths}

    @torch.no_grad()
    def text_conditioning(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Token ids (:meth:`text_inputs`, or a batch holding them) -> the denoiser's text keywords.

        SD1.5-style teachers: ``{"encoder_hidden_states"}`` (:meth:`encode_text`). SD3 teachers:
        ``{"encoder_hidden_states", "pooled_projections"}`` as ``StableDiffusion3Pipeline.encode_prompt``
        gives them, with T5 or without (:func:`sd3_prompt_embeds`). Flux teachers: the same two keywords as
        ``FluxPipeline.encode_prompt`` gives them (:func:`flux_prompt_embeds`; its ``text_ids`` are zeros the
        backbone builds), plus ``guidance`` (B,) = ``embedded_guidance`` for a guidance-distilled network. SANA
        teachers: ``{"encoder_hidden_states", "encoder_attention_mask"}`` as ``SanaPipeline.encode_prompt`` gives
        ``prompt_embeds`` and ``prompt_attention_mask`` (:func:`sana_prompt_embeds`).
        """
        # the pipelines encode outside any autocast; under a training precision's autocast (it is called in
        # training_step) bf16 moved Flux's T5 states by 1e-2, and T5 overflows in float16
        with torch.autocast(inputs["input_ids"].device.type, enabled=False):
            return self._text_conditioning(inputs)

    def _text_conditioning(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        backbone = backbones.backbone_for(self.unet)
        if isinstance(backbone, backbones.SanaBackbone):
            if self.text_encoder is None or "attention_mask" not in inputs:
                raise TeacherError(
                    "a SANA teacher encodes prompts with Gemma2 and its attention mask: it needs text_encoder/ (and "
                    "tokenizer/), and the inputs input_ids and attention_mask (text_inputs)"
                )
            return sana_prompt_embeds(self.text_encoder, inputs["input_ids"], inputs["attention_mask"],
                                      self.max_sequence_length, inputs.get("input_length"))
        if isinstance(backbone, backbones.FluxBackbone):
            if self.text_encoder is None or self.text_encoder_2 is None or "input_ids_2" not in inputs:
                raise TeacherError(
                    "a Flux teacher encodes prompts with CLIP (pooled) and T5 (sequence): it needs text_encoder/ and "
                    "text_encoder_2/ (and their tokenizers), and the inputs input_ids and input_ids_2"
                )
            cond = flux_prompt_embeds(self.text_encoder, self.text_encoder_2, inputs["input_ids"], inputs["input_ids_2"])
            if self.is_guidance_distilled:  # FluxPipeline: full([1], g, float32).expand(B)
                n = cond["pooled_projections"].shape[0]
                cond["guidance"] = torch.full((n,), self.embedded_guidance, dtype=torch.float32,
                                              device=cond["pooled_projections"].device)
            return cond
        if not isinstance(backbone, backbones.SD3Backbone):
            return {"encoder_hidden_states": self.encode_text(inputs["input_ids"])}
        if self.text_encoder is None or self.text_encoder_2 is None or "input_ids_2" not in inputs:
            raise TeacherError(
                "an SD3 teacher encodes prompts with two CLIP encoders: it needs text_encoder/ and text_encoder_2/ "
                "(and their tokenizers), and the inputs input_ids and input_ids_2"
            )
        t5 = None
        if self.text_encoder_3 is not None:
            if "input_ids_3" not in inputs:
                raise TeacherError("this SD3 teacher has a T5 text_encoder_3/: its inputs need input_ids_3 (text_inputs)")
            t5 = (self.text_encoder_3, inputs["input_ids_3"])
        elif "input_ids_3" in inputs:  # T5 ids from a teacher that had T5: zeros here would be another conditioning
            raise TeacherError(
                "the inputs carry T5 ids (input_ids_3) but this SD3 teacher has no text_encoder_3/: build it with the "
                "T5 encoder of the teacher that tokenized them (DiffusionTeacher(text_encoder_3=..., tokenizer_3=...))"
            )
        return sd3_prompt_embeds(
            (self.text_encoder, self.text_encoder_2), (inputs["input_ids"], inputs["input_ids_2"]),
            int(self.unet.config.joint_attention_dim), self.max_sequence_length, t5,
        )

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts -> the denoiser's text keywords: :meth:`text_conditioning` of :meth:`text_inputs`, or the
        cached embeddings of ``prompt_table`` when it holds every prompt (the only way once encoders are released)."""
        table = self.prompt_table
        if prompts and all(p in table for p in prompts):
            return {k: torch.cat([table[p][k] for p in prompts]) for k in table[prompts[0]]}
        if self.released is not None:
            missing = sorted({p for p in prompts if p not in table})
            raise TeacherError(
                f"the text encoders were released (data.release_encoders) and prompts {missing} have no cached "
                f"embedding; cached prompts: {sorted(table)}"
            )
        return self.text_conditioning(self.text_inputs(prompts))

    @property
    def reloadable(self) -> bool:
        """True when the weights can be re-read from ``source`` (so checkpoints need not carry them)."""
        return self.source is not None


@torch.no_grad()
def sd3_prompt_embeds(
    text_encoders: tuple[nn.Module, nn.Module], input_ids: tuple[torch.Tensor, torch.Tensor], joint_attention_dim: int,
    max_sequence_length: int = 256, t5: tuple[nn.Module, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``StableDiffusion3Pipeline.encode_prompt`` from token ids, with T5 (``t5`` = (encoder, ids)) or without.

    * each CLIP encoder's penultimate hidden state (``clip_skip`` None), cast to the first encoder's dtype,
      concatenated on the feature axis and zero-padded to the T5 width;
    * then the T5 part, appended on the token axis: T5's last hidden state (B, ``max_sequence_length``, d) in its
      own dtype, or without T5 zeros (B, ``max_sequence_length``, joint_attention_dim);
    * ``pooled_projections``: the two CLIP encoders' projected pooled outputs (``text_embeds``), concatenated
      (T5 has no part in them).

    Returns:
        ``{"encoder_hidden_states": (B, L1 + max_sequence_length, joint_attention_dim),
        "pooled_projections": (B, P1 + P2)}``.
    """
    dtype = text_encoders[0].dtype
    hidden, pooled = [], []
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        pooled.append(out[0])
        hidden.append(out.hidden_states[-2].to(dtype))
    clip = torch.cat(hidden, dim=-1)
    if t5 is None:
        t5_embeds = torch.zeros(clip.shape[0], max_sequence_length, joint_attention_dim, device=clip.device, dtype=dtype)
    else:
        encoder, ids = t5
        t5_embeds = encoder(ids.to(encoder.device))[0].to(device=clip.device, dtype=encoder.dtype)
    # the pipeline pads the CLIP features to the T5 width (joint_attention_dim for its zeros)
    clip = torch.nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
    return {"encoder_hidden_states": torch.cat([clip, t5_embeds], dim=-2), "pooled_projections": torch.cat(pooled, dim=-1)}


@torch.no_grad()
def flux_prompt_embeds(
    clip: nn.Module, t5: nn.Module, clip_input_ids: torch.Tensor, t5_input_ids: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """``FluxPipeline.encode_prompt`` from token ids (``prompt_2`` = ``prompt``, no LoRA scale).

    * ``pooled_projections``: the CLIPTextModel's ``pooler_output`` (B, D_clip), in its dtype (Flux reads only
      CLIP's pooled output);
    * ``encoder_hidden_states``: T5's last hidden state (B, ``max_sequence_length``, D_t5), in T5's dtype.

    The pipeline's third output, ``text_ids``, is zeros (L, 3): :class:`~lightning_distill.backbones.FluxBackbone`
    builds it (:func:`~lightning_distill.backbones.flux_text_ids`), so it stays out of the batched keywords.
    """
    pooled = clip(clip_input_ids.to(clip.device), output_hidden_states=False).pooler_output.to(clip.dtype)
    hidden = t5(t5_input_ids.to(t5.device), output_hidden_states=False)[0].to(device=pooled.device, dtype=t5.dtype)
    return {"encoder_hidden_states": hidden, "pooled_projections": pooled}


@torch.no_grad()
def sana_prompt_embeds(
    text_encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_sequence_length: int = 300,
    input_length: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``SanaPipeline.encode_prompt`` from Gemma2 token ids (:meth:`DiffusionTeacher.text_inputs`).

    * Gemma2's last hidden state with the tokenizer's attention mask, in the encoder's dtype;
    * of the w tokens of a row, token 0 (BOS) and the last ``max_sequence_length`` - 1 (the pipeline's
      ``select_index``, "Section 3.1" of the SANA paper): with the instruction that drops the instruction's tokens
      but BOS, keeping the prompt's tokens, whose states have read the instruction; without one (w =
      ``max_sequence_length``: the unconditional prompt, which the pipeline does not select) every token;
    * the attention mask of the kept tokens, which the transformer reads as ``encoder_attention_mask``.

    Rows of different widths (``input_length``; None: every row is the full width) are encoded in separate
    batches, each at its own width, as the pipeline encodes prompts and negative prompts apart: the right
    padding that :meth:`DiffusionTeacher.text_inputs` adds to join them is never read.

    Returns:
        ``{"encoder_hidden_states": (B, max_sequence_length, D), "encoder_attention_mask": (B, max_sequence_length)}``
        (the mask in the tokenizer's integer dtype).
    """
    n, wide = input_ids.shape
    device = next(text_encoder.parameters()).device
    lengths = torch.full((n,), wide, dtype=torch.long) if input_length is None else torch.as_tensor(input_length).cpu()
    hidden = mask = None
    for width in lengths.unique().tolist():
        rows = (lengths == width).nonzero().squeeze(1)
        ids, row_mask = input_ids[rows, :width].to(device), attention_mask[rows, :width].to(device)
        out = text_encoder(ids, attention_mask=row_mask)[0].to(dtype=text_encoder.dtype)
        select = [0, *range(width - max_sequence_length + 1, width)]  # [0] + range(-L + 1, 0)
        if hidden is None:
            hidden = out.new_empty(n, len(select), out.shape[-1])
            mask = row_mask.new_empty(n, len(select))
        rows = rows.to(device)
        hidden[rows], mask[rows] = out[:, select], row_mask[:, select]
    return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}


def image_seq_len(unet: nn.Module) -> int | None:
    """Tokens per sample of a network: (sample_size / patch_size)^2 (1 x 1 patches for a UNet, 2 x 2 packing
    for Flux); None when its config gives no resolution.

    What a resolution-dependent flow shift (``use_dynamic_shifting``) is computed from.
    """
    return backbones.image_seq_len(unet)


def pipeline_linspace_sigmas(unet: nn.Module, from_config: bool) -> bool:
    """Whether the stock pipeline of a flow network sets N steps with ``sigmas = linspace(1, 1/N, N)``
    (``FluxPipeline``, whatever its scheduler config) rather than ``set_timesteps(N)`` (``DDPMPipeline``,
    ``DiTPipeline``, ``StableDiffusion3Pipeline``, ``SanaPipeline``, also with a ``use_dynamic_shifting`` config):
    :attr:`FlowSchedule.linspace_sigmas <lightning_distill.parametrisation.FlowSchedule>`. A network of no
    diffusers class (a test double) keeps ``from_config``, the config's family (``use_dynamic_shifting``: Flux's).
    """
    if isinstance(backbones.backbone_for(unet), backbones.FluxBackbone):
        return True
    classes = {c.__name__ for c in type(getattr(unet, "_orig_mod", unet)).__mro__}
    return False if "ModelMixin" in classes else bool(from_config)


def low_cpu_mem_usage() -> bool:
    """Whether diffusers may build models on the meta device before reading weights (it needs accelerate).

    diffusers asks for it by default and, without accelerate, prints a warning recommending accelerate
    on every load. accelerate is not a dependency: it does not load the bundled teacher faster (UNet,
    15 alternating loads in one process on 2 CPU cores: median 71 ms without the meta-device path, 106 ms
    with it); large teachers still get the low-memory path where accelerate is installed. Pass the
    result as ``from_pretrained(low_cpu_mem_usage=...)``.
    """
    from diffusers.utils import is_accelerate_available

    return is_accelerate_available()


def _hub_entries(hub_id: str, revision: str | None) -> set[str]:
    """The top-level names of a hub repo (``unet``, ``scheduler``, ...): asked of the hub, or, when it cannot be
    reached (``HF_HUB_OFFLINE=1``, no network), read from the local Hugging Face cache, so that a teacher
    downloaded once also loads offline (diffusers then reads its files from the same cache). Offline, the
    repo's cached file list (written by ``snapshot_download``) is used when there is one, else its cached
    ``model_index.json``'s components, else the cached folders: a partly downloaded repo must not look like
    a smaller pipeline (an SD folder without ``text_encoder/`` would read as an unconditional UNet)."""
    from huggingface_hub import get_cached_repo_tree, model_info, snapshot_download  # only reached for hub ids

    try:
        return {s.rfilename.split("/")[0] for s in model_info(hub_id, revision=revision).siblings}
    except Exception as err:  # offline, no network or unknown id: the cache, else say which
        reason = err
    try:
        tree = get_cached_repo_tree(hub_id, revision=revision)
    except Exception:
        tree = None
    if tree:
        return {f.path.split("/")[0] for f in tree}
    try:
        cached = Path(snapshot_download(hub_id, revision=revision, local_files_only=True, allow_patterns=["model_index.json"]))
    except Exception:
        raise TeacherError(
            f"teacher {hub_id!r} is not a local folder, could not be reached on the hub ({reason}) and is not in "
            "the local Hugging Face cache"
        ) from None
    index = _read_model_index(cached / "model_index.json") if (cached / "model_index.json").is_file() else {}
    components = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}
    return components or set(os.listdir(cached))


def scheduler_clip(config) -> float | None:
    """The x0 clamp a pixel teacher's scheduler config asks for: ``clip_sample_range`` where ``clip_sample`` is
    on, None where it is off (e.g. an exported progressive-distillation student, so that a chain continued as
    a new job keeps the teacher it had in the run); 1.0 for schedulers without the option (DDPM's convention)."""
    if not config.get("clip_sample", True):
        return None
    return float(config.get("clip_sample_range", 1.0))


def load_teacher(
    source: str | os.PathLike,
    revision: str | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    prediction_type: PredictionType | None = None,
    clip_x0: float | None | Literal["scheduler"] = "scheduler",
    max_sequence_length: int | None = None,
    embedded_guidance: float = 3.5,
    complex_human_instruction: Sequence[str] | None = SANA_COMPLEX_HUMAN_INSTRUCTION,
) -> DiffusionTeacher:
    """Load a frozen teacher from a diffusers folder (``unet/`` or ``transformer/``, + ``scheduler/``) or a hub id.

    The denoiser may be any class of :data:`lightning_distill.backbones.SUPPORTED` (UNets, DiT, SD3,
    Flux, SANA transformers); ``model_index.json`` says whether it lives in ``unet/`` or ``transformer/``.

    Text encoders: ``text_encoder/`` + ``tokenizer/`` (CLIP, SD1.5-style); an SD3 folder also ``text_encoder_2/``
    + ``tokenizer_2/`` (the second CLIP) and optionally ``text_encoder_3/`` + ``tokenizer_3/`` (T5); a Flux folder
    ``text_encoder/`` (CLIPTextModel) + ``text_encoder_2/`` (T5EncoderModel) and their tokenizers. Each encoder's
    class is read from ``model_index.json`` and checked against what the family's pipeline reads there
    (:data:`FAMILY_TEXT_ENCODERS`; a :class:`TextEncoderError` names the supported ones); T5 tokenizers are read
    as ``T5TokenizerFast``. ``max_sequence_length``: the T5 prompt length (None: the pipeline's, SD3 256, Flux
    512); ``embedded_guidance``: the guidance input of a guidance-distilled Flux network (:class:`DiffusionTeacher`).
    A SANA folder (``SanaPipeline``): ``text_encoder/`` (Gemma2Model) + ``tokenizer/`` (``GemmaTokenizerFast``),
    its VAE an ``AutoencoderDC`` (every other family's an ``AutoencoderKL``); ``max_sequence_length`` is then the
    Gemma2 prompt length (default 300) and ``complex_human_instruction`` the pipeline's instruction
    (:class:`DiffusionTeacher`; ignored by other families).

    Hub ids need a network the first time; with ``HF_HUB_OFFLINE=1`` (or no network) a teacher already in the
    local Hugging Face cache loads from there. Weights are read from safetensors, or from a ``.bin`` with
    torch's ``weights_only`` loader (diffusers' and transformers' own), which refuses pickled objects other
    than tensors and containers; no remote code is ever run.

    ``clip_x0``: the clamp of the teacher's x0 estimates; ``"scheduler"`` (default) reads it from the scheduler
    config (:func:`scheduler_clip`). Latent and flow teachers never clamp.

    Raises:
        TeacherError: the folder is missing, lacks a denoiser folder or ``scheduler/``, or holds unknown or
            unsupported classes.
    """
    if dtype not in DTYPES:
        raise TeacherError(f"teacher dtype {dtype!r} is not one of {sorted(DTYPES)}")
    folder, hub_id = resolve_teacher_source(source)
    torch_dtype = DTYPES[dtype]
    if folder is not None:
        sub = _local_denoiser_folder(folder)
        missing = [m for m in (sub or "unet", "scheduler") if not (folder / m).is_dir()]
        if missing:
            raise TeacherError(
                f"teacher folder {folder} lacks {' and '.join(m + '/' for m in missing)}; "
                "a diffusers teacher needs unet/ (or transformer/) and scheduler/"
            )
        location, kwargs = str(folder), {}
        unet_cls = _denoiser_class(_subfolder_class(folder, sub, "config.json"), f"{folder}/{sub}")
        sched_cls = _diffusers_class(_subfolder_class(folder, "scheduler", "scheduler_config.json"))
        has = {c: (folder / c).is_dir() for c in TEXT_AND_VAE}
        index = _read_model_index(folder / "model_index.json")
    else:
        location, kwargs = hub_id, {"revision": revision}
        files = _hub_entries(hub_id, revision)
        import diffusers

        sub, sched_cls = denoiser_folder(files) or "unet", None
        try:  # the network's config names its class
            cfg = diffusers.UNet2DModel.load_config(hub_id, subfolder=sub, revision=revision)
        except Exception as err:
            raise TeacherError(f"teacher {hub_id!r}: cannot read {sub}/config.json ({err})") from err
        unet_cls = _denoiser_class(cfg.get("_class_name", "UNet2DModel"), f"{hub_id}/{sub}")
        has = {c: c in files for c in TEXT_AND_VAE}
        index = {}
        if has["text_encoder_2"]:  # SD3: model_index.json says which CLIP classes (SD1.5 hub ids: CLIPTextModel)
            try:
                index = diffusers.DiffusionPipeline.load_config(hub_id, revision=revision)
            except Exception as err:
                raise TeacherError(f"teacher {hub_id!r}: cannot read model_index.json ({err})") from err
    # every encoder's class, checked against the denoiser family before any weights load
    encoder_classes = {
        n: _text_encoder_class_name(index, n, unet_cls.__name__)
        for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if has[n]
    }
    vae_class = vae_class_name(unet_cls.__name__)
    if has["vae"]:  # the VAE's class, before any weights load: the one the family's pipeline reads
        import diffusers

        try:
            vae_cfg = diffusers.AutoencoderKL.load_config(location, subfolder="vae", **kwargs)
        except Exception as err:
            raise TeacherError(f"teacher {source}: cannot read vae/config.json ({type(err).__name__}: {err})") from err
        if vae_cfg.get("_class_name", vae_class) != vae_class:
            raise TeacherError(
                f"teacher {source}: VAE class {vae_cfg['_class_name']!r} is not supported (supported: {vae_class}) "
                f"beside a {unet_cls.__name__}; supported VAE classes: AutoencoderKL (SD, SD3, Flux, DiT pipelines), "
                "AutoencoderDC (SanaTransformer2DModel)"
            )
    try:
        model_kwargs = {**kwargs, "torch_dtype": torch_dtype, "low_cpu_mem_usage": low_cpu_mem_usage()}
        extra = unet_cls.load_config(location, subfolder=sub, **kwargs).get("addition_embed_type")
        if extra is not None:  # refused from the config, before the weights load
            raise TeacherError(
                f"teacher {source}: a UNet with addition_embed_type={extra!r} (SDXL's pooled-text and size "
                "conditioning) is not supported: its extra inputs are not built (supported: SD1.x / SD2.x UNets)"
            )
        unet = unet_cls.from_pretrained(location, subfolder=sub, **model_kwargs)
        if sched_cls is None:
            import diffusers

            sched_cfg = diffusers.DDIMScheduler.load_config(location, subfolder="scheduler", **kwargs)
            sched_cls = _diffusers_class(sched_cfg["_class_name"])
        scheduler = sched_cls.from_pretrained(location, subfolder="scheduler", **kwargs)
        if clip_x0 == "scheduler":
            clip_x0 = scheduler_clip(scheduler.config)
    except TeacherError:
        raise
    except Exception as err:
        raise TeacherError(f"teacher {location}: could not load {sub}/ or scheduler/ ({type(err).__name__}: {err})") from err
    vae = None
    if has["vae"]:
        import diffusers

        vae = getattr(diffusers, vae_class).from_pretrained(location, subfolder="vae", **model_kwargs)
        clip_x0 = None  # latents are not bounded to [-1, 1]
    text = {}
    for n, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")):
        text[n] = text[tok] = None
        if has[n]:
            import transformers

            text[n] = getattr(transformers, encoder_classes[n]).from_pretrained(
                location, subfolder=n, torch_dtype=torch_dtype, **kwargs
            )
        if has[tok]:  # the tokenizer kind follows the encoder beside it (CLIP without one)
            default = family_text_encoders(unet_cls.__name__).get(n, ("CLIPTextModel",))[0]
            cls = _tokenizer_class(index, tok, encoder_classes.get(n, default))
            text[tok] = cls.from_pretrained(location, subfolder=tok, **kwargs)
    return DiffusionTeacher(
        unet,
        scheduler,
        prediction_type=prediction_type,
        source=str(source),
        revision=revision,
        vae=vae,
        text_encoder=text["text_encoder"],
        tokenizer=text["tokenizer"],
        clip_x0=clip_x0,
        text_encoder_2=text["text_encoder_2"],
        tokenizer_2=text["tokenizer_2"],
        max_sequence_length=max_sequence_length,
        text_encoder_3=text["text_encoder_3"],
        tokenizer_3=text["tokenizer_3"],
        embedded_guidance=embedded_guidance,
        complex_human_instruction=complex_human_instruction,
    )
