"""Prompt embeddings computed once, cached on disk, and the text encoders released (#23 item 4).

A text-conditional teacher's methods need the prompt embeddings (the denoiser's text keywords:
``encoder_hidden_states``, SD3 and Flux also ``pooled_projections``, guidance-distilled Flux its ``guidance``, SANA
its ``encoder_attention_mask``), not the encoders: with ``data.text_cache`` /
``data.release_encoders`` (:class:`~lightning_distill.data.TeacherDataModule`) every caption is encoded once
at setup (:func:`caption_embeddings`, a ``.pt`` file reused while its key matches), batches carry the
embeddings (``batch["text_cond"]``), and the few prompts a method samples with (``""``, ``sample_prompt``)
go into the teacher's ``prompt_table``. :func:`release_encoders` then drops the text encoders and the VAE's
encoder from the teacher before the trainer moves it to the device; the VAE decoder stays (sample grids,
FID). An export reloads the released parts from the teacher's source (:func:`pipeline_parts`), so the
written folder is a complete pipeline.

Storage: the embeddings are stored with their trailing all-zero slices cut off and padded back per item
(:class:`TextEmbeddings`). For SD3 with T5 absent most of ``encoder_hidden_states`` is such zeros: the
zero T5 tokens (256 of 333) and the padding of the CLIP features to ``joint_attention_dim`` (2,048 of 4,096),
so the cache holds 77 x 2,048 of 333 x 4,096 values per caption (11.6 %). Cutting only exact zeros that
span the whole data set and padding zeros back is lossless. With T5 (SD3's ``text_encoder_3``, Flux's
``text_encoder_2``) the T5 tokens are not zeros and are stored whole. SANA's Gemma2 states are stored whole beside
their attention mask, whose padding zeros past the data set's longest caption are cut as any other.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint_io import atomic_torch_save

#: the teacher's text encoders, in the order load_teacher reads them (SD3's T5 is the third, Flux's the second).
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: their tokenizers, in the same order.
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2", "tokenizer_3")


@dataclass(frozen=True)
class Released:
    """What :func:`release_encoders` took from a teacher, and where to read it back (export)."""

    source: str | None
    revision: str | None
    dtype: torch.dtype
    modules: tuple[str, ...]  # "text_encoder", "text_encoder_2", "text_encoder_3", "vae.encoder"
    nbytes: int  # parameter bytes released


# --- trailing zeros ----------------------------------------------------------------------------------------


def nonzero_extent(x: Tensor) -> tuple[int, ...]:
    """Per non-batch axis of ``x`` (N, ...), one past the last index where any value is non-zero."""
    nz = x != 0
    out = []
    for axis in range(1, x.ndim):
        hit = nz.any(dim=tuple(a for a in range(x.ndim) if a != axis)).nonzero()
        out.append(int(hit.max()) + 1 if hit.numel() else 0)
    return tuple(out)


def pad_to(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Zero-pad the trailing ends of ``x``'s last ``len(shape)`` axes up to ``shape``."""
    pads = []
    for have, want in zip(reversed(x.shape[-len(shape):]), reversed(shape)):
        pads += [0, want - have]
    return F.pad(x, pads) if any(pads) else x


class TextEmbeddings:
    """Per-caption text keywords stored without their trailing zeros; item ``i`` is padded back to full size.

    Args:
        tensors: name -> (N, ...) trimmed embeddings.
        shapes: name -> the full per-caption shape.
    """

    def __init__(self, tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
        self.tensors, self.shapes = tensors, {k: tuple(v) for k, v in shapes.items()}

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, i) -> dict[str, Tensor]:
        return {k: pad_to(v[i], self.shapes[k]) for k, v in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())


# --- encoding ------------------------------------------------------------------------------------------------


def _encoders(teacher) -> list[torch.nn.Module]:
    return [m for m in (getattr(teacher, n) for n in TEXT_ENCODER_NAMES) if m is not None]


@torch.no_grad()
def encode_captions(teacher, prompts: list[str], batch_size: int = 64) -> TextEmbeddings:
    """Every prompt's text keywords (``teacher.encode_prompts``, on a GPU if there is one), stored trimmed.

    Each chunk is trimmed as it comes (so the untrimmed whole never exists), then all are padded to the
    largest extent."""
    encoders = _encoders(teacher)
    home = encoders[0].device
    device = torch.device("cuda") if torch.cuda.is_available() else home
    chunks, shapes = [], {}
    try:
        for m in encoders:
            m.to(device)
        for i in range(0, len(prompts), batch_size):
            out = teacher.text_conditioning(teacher.text_inputs(prompts[i : i + batch_size]))
            shapes = {k: tuple(v.shape[1:]) for k, v in out.items()}
            chunks.append({k: v[(slice(None), *(slice(0, e) for e in nonzero_extent(v)))].cpu() for k, v in out.items()})
    finally:
        for m in encoders:
            m.to(home)
    tensors = {}
    for k in shapes:
        extent = tuple(max(c[k].shape[a] for c in chunks) for a in range(1, len(shapes[k]) + 1))
        tensors[k] = torch.cat([pad_to(c[k], extent) for c in chunks])
    return TextEmbeddings(tensors, shapes)


def cache_key(teacher, source: str, revision: str | None, prompts: list[str]) -> dict:
    """What the cached embeddings depend on: teacher, revision, the captions (content and order) and
    :func:`encoder_key`."""
    digest = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()  # noqa: E731
    return {"teacher": str(source), "revision": revision, "n": len(prompts), "captions": digest(prompts),
            **encoder_key(teacher)}


def encoder_key(teacher) -> dict:
    """What a prompt's embedding depends on besides its text: the encoder settings (classes and configs,
    dtype, tokenizer length, the T5 length and SD3's joint width, a guidance-distilled Flux network's embedded
    guidance), the encoders' weights and the tokenizers' vocabularies (``settings`` and ``weights`` digests; also
    in the teacher pairs' key). Teachers without T5 or guidance input keep the digests they had before either
    was read, so their caches stay valid. A SANA teacher's also holds its ``complex_human_instruction`` (the
    lines put before every prompt; its Gemma2 prompt length is ``max_sequence_length``, in every key)."""
    from . import backbones
    from .nn_utils import content_digest

    encoders = {n: {"class": type(m).__name__, "config": m.config.to_dict()}
                for n in TEXT_ENCODER_NAMES if (m := getattr(teacher, n)) is not None}
    settings = {
        "encoders": encoders, "dtype": str(next(_encoders(teacher)[0].parameters()).dtype),
        "tokenizer_max_length": teacher.tokenizer.model_max_length, "has_tokenizer_2": teacher.tokenizer_2 is not None,
        "max_sequence_length": teacher.max_sequence_length, "denoiser": type(teacher.unet).__name__,
        "joint_attention_dim": dict(teacher.unet.config).get("joint_attention_dim"),
    }
    if getattr(teacher, "tokenizer_3", None) is not None:
        settings["has_tokenizer_3"] = True
    if getattr(teacher, "is_guidance_distilled", False):
        settings["embedded_guidance"] = teacher.embedded_guidance  # it rides with the keywords (text_conditioning)
    if isinstance(backbones.backbone_for(teacher.unet), backbones.SanaBackbone):
        # the instruction changes every prompt's Gemma2 states (None: the teacher puts none before them)
        settings["complex_human_instruction"] = teacher.complex_human_instruction
    digest = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()  # noqa: E731
    tokenizers = [t.get_vocab() for n in TOKENIZER_NAMES if (t := getattr(teacher, n, None)) is not None]
    weights = content_digest(*_encoders(teacher), digest(tokenizers))
    return {"settings": digest(settings), "weights": weights}


def caption_embeddings(teacher, prompts: list[str], key: dict, cache: str | os.PathLike | None) -> TextEmbeddings:
    """:func:`encode_captions` of ``prompts``, read from ``cache`` when its key matches, else computed and
    written there (atomically: an interrupted write never leaves a truncated cache)."""
    path = Path(cache).expanduser() if cache else None
    if path is not None and path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            return TextEmbeddings(stored["tensors"], stored["shapes"])
    emb = encode_captions(teacher, prompts)
    if path is not None:
        # every DDP rank writes its own temporary file (unique across nodes); the last rename wins
        atomic_torch_save({"key": key, "tensors": emb.tensors, "shapes": emb.shapes}, path)
    return emb


def remember_prompts(teacher, prompts: list[str]) -> None:
    """Put each prompt's text keywords (batch 1) in ``teacher.prompt_table`` (no-op for those already there)."""
    new = [p for p in dict.fromkeys(prompts) if p not in teacher.prompt_table]
    if new:
        out = teacher.encode_prompts(new)  # names the missing prompts once the encoders are released
        teacher.prompt_table.update({p: {k: v[i : i + 1].cpu() for k, v in out.items()} for i, p in enumerate(new)})


# --- releasing and reading back ---------------------------------------------------------------------------


def parameter_bytes(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() * p.element_size() for p in module.parameters())


def release_encoders(teacher) -> Released:
    """Drop the text encoders and the VAE's encoder (and ``quant_conv``) from ``teacher``; the decoder stays.

    Prompts then come from ``teacher.prompt_table`` (:func:`remember_prompts` first) and batches; the record
    in ``teacher.released`` lets an export read the parts back. Idempotent."""
    if teacher.released is not None:
        return teacher.released
    names, nbytes = [], 0
    dtype = next(teacher.unet.parameters()).dtype
    for n in TEXT_ENCODER_NAMES:
        if getattr(teacher, n) is not None:
            nbytes += parameter_bytes(getattr(teacher, n))
            setattr(teacher, n, None)
            names.append(n)
    vae = teacher.vae
    if vae is not None and getattr(vae, "encoder", None) is not None:
        nbytes += parameter_bytes(vae.encoder) + parameter_bytes(getattr(vae, "quant_conv", None))
        vae.encoder = None
        if getattr(vae, "quant_conv", None) is not None:
            vae.quant_conv = None
        names.append("vae.encoder")
    teacher.released = Released(teacher.source, teacher.revision, dtype, tuple(names), nbytes)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return teacher.released


def pipeline_parts(teacher):
    """The teacher's VAE, text encoders and tokenizers for an exported pipeline: the teacher itself while it
    holds them, else a namespace with the released parts read back from its source (CPU, teacher dtype) and the
    teacher's text settings (prompt length, embedded guidance, SANA's instruction)."""
    rel = teacher.released
    if rel is None:
        return teacher
    if rel.source is None:
        from .teacher import TeacherError

        raise TeacherError("the teacher's encoders were released and it has no source to read them back from")
    import diffusers

    from .teacher import _read_model_index, _text_encoder_class, resolve_teacher_source, vae_class_name

    denoiser_class = type(getattr(teacher.unet, "_orig_mod", teacher.unet)).__name__

    folder, hub_id = resolve_teacher_source(rel.source)
    location, kwargs = (str(folder), {}) if folder is not None else (hub_id, {"revision": rel.revision})
    index = _read_model_index(folder / "model_index.json") if folder is not None else (
        diffusers.DiffusionPipeline.load_config(hub_id, revision=rel.revision))
    parts = {n: getattr(teacher, n, None) for n in ("vae", *TOKENIZER_NAMES, *TEXT_ENCODER_NAMES)}
    for n in TEXT_ENCODER_NAMES:
        if n in rel.modules:
            parts[n] = _text_encoder_class(index, n, denoiser_class).from_pretrained(
                location, subfolder=n, torch_dtype=rel.dtype, **kwargs)
    if "vae.encoder" in rel.modules:
        parts["vae"] = getattr(diffusers, vae_class_name(denoiser_class)).from_pretrained(
            location, subfolder="vae", torch_dtype=rel.dtype, **kwargs)
    # and the text settings the student was trained with, which the export records (export.pipeline_call_settings)
    settings = {n: getattr(teacher, n) for n in ("max_sequence_length", "embedded_guidance", "complex_human_instruction")}
    return SimpleNamespace(**parts, **settings)


__all__ = [
    "TEXT_ENCODER_NAMES", "TOKENIZER_NAMES", "Released", "TextEmbeddings", "cache_key", "caption_embeddings", "encode_captions", "encoder_key", "nonzero_extent", "pad_to",
    "parameter_bytes", "pipeline_parts", "release_encoders", "remember_prompts",
]
