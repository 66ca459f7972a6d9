"""Cached features of a teacher's generated samples: the fixed rows of every evaluation report.

A report scores the teacher at its step counts next to each student under one protocol (sample count,
noise seed, chunking, feature network). The teacher does not change between runs, so its generated
features are a function of the teacher's weights, its sampler and that protocol; computing them again
in every run is the largest cost of a small report (the bundled digits teacher's 50-step cell is most
of the README main job's closing report). This module keys those features by a content hash of
everything they depend on and reads them from, in order,

1. the user cache (``cache_dir``, by default ``~/.cache/lightning_distill/reference_stats``, beside the
   reference statistics), which a first run fills;
2. the teacher folder's ``eval_cache/``, where a teacher can ship entries measured by
   ``python -m lightning_distill.evaluate ... --teacher-cache-out <teacher folder>/eval_cache`` (the
   bundled digits teachers ship the README protocol's cells).

The key covers every weight of the teacher network (and of its VAE), its scheduler config, the sampler, the step count,
the protocol (samples, seed, chunk size, classes), the feature network's fingerprint, the device type
and the torch / diffusers versions (a sampler or kernel change in either gives a new key, so a stale
entry is never read; it is recomputed instead); for a text-to-image teacher also its text encoders
(``text_cache.encoder_key``: settings and weights), the prompts (sha256 of the list, count) and the guidance
scale, so another prompt set or scale never reuses a cell. An entry holds the features and the first sample-grid
images, so a report from the cache is the same report. ``teacher_cache=False`` in
:func:`~lightning_distill.evaluate.evaluate_models` (``--no-teacher-cache``) always samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .checkpoint_io import atomic_torch_save
from .metrics import default_cache_dir, fingerprint, read_cache_entry

SHIPPED_DIR = "eval_cache"


def teacher_digest(teacher, net: nn.Module, device: torch.device | str) -> str:
    """What every cell of one teacher shares: a sha256 over the teacher's (and its VAE's) weights, its
    scheduler and parametrisation, the feature network's fingerprint, the device type and the torch /
    diffusers versions; a text-to-image teacher's text encoders too (:func:`~lightning_distill.text_cache.encoder_key`:
    another encoder gives other embeddings of the same prompts). Computed once per report; :func:`cell_key`
    adds the cell's own settings."""
    import diffusers

    h = hashlib.sha256()
    meta = {
        "num_classes": teacher.num_classes, "scheduler": dict(teacher.scheduler_config),
        "path": teacher.denoiser.schedule.path, "prediction": teacher.denoiser.prediction_type,
        "clip_x0": teacher.denoiser.clip_x0,
        "feature_net": fingerprint(net), "device": torch.device(device).type,
        "torch": ".".join(torch.__version__.split("+")[0].split(".")[:2]), "diffusers": diffusers.__version__,
    }
    if teacher.is_text_conditional:  # only there, so the keys of unconditional teachers (shipped entries) stay
        from .text_cache import encoder_key

        meta["text_encoders"] = encoder_key(teacher)
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, module in (("unet", teacher.unet), ("vae", teacher.vae)):
        for k, v in (module.state_dict().items() if module is not None else ()):
            h.update(f"{name}.{k}".encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cell_key(digest: str, steps: int, num_samples: int, seed: int, chunk_size: int,
             conditioning: dict | None = None) -> str:
    """Content key of one teacher cell: ``teacher-<steps>step-n<N>-s<seed>-<sha256 prefix>``.

    ``conditioning``: what a text-to-image teacher's cell is drawn with (the prompts' sha256 and count, the
    guidance scale: :func:`text_conditioning`); None for other teachers, whose keys it leaves as they were.
    """
    cell = {"steps": int(steps), "num_samples": int(num_samples), "seed": int(seed), "chunk_size": int(chunk_size)}
    if conditioning is not None:
        cell["conditioning"] = conditioning
    cell = json.dumps(cell, sort_keys=True)
    return f"teacher-{steps}step-n{num_samples}-s{seed}-{hashlib.sha256((digest + cell).encode()).hexdigest()[:20]}"


def text_conditioning(prompts_sha256: str, num_prompts: int, guidance_scale: float) -> dict:
    """The ``conditioning`` of a text-to-image teacher's cells: the prompt list (sha256, count; image i is drawn
    with prompt i % count) and the classifier-free guidance scale."""
    return {"prompts_sha256": str(prompts_sha256), "num_prompts": int(num_prompts), "guidance_scale": float(guidance_scale)}


def teacher_features_key(
    teacher, steps: int, num_samples: int, seed: int, chunk_size: int, net: nn.Module, device: torch.device | str,
    conditioning: dict | None = None,
) -> str:
    """:func:`cell_key` of one cell, digest included (one-off lookups; a report computes the digest once)."""
    return cell_key(teacher_digest(teacher, net, device), steps, num_samples, seed, chunk_size, conditioning)


def search_dirs(teacher, cache_dir: str | os.PathLike | None) -> list[Path]:
    """Where entries are looked for: the user cache, then the teacher folder's shipped ``eval_cache/``."""
    from .teacher import resolve_teacher_source

    dirs = [Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()]
    if teacher.source is not None:
        folder, _ = resolve_teacher_source(teacher.source)
        if folder is not None:
            dirs.append(Path(folder) / SHIPPED_DIR)
    return dirs


def load_entry(key: str, dirs: list[Path], num_samples: int | None = None) -> tuple[Tensor, Tensor, Path] | None:
    """(features, grid images, file) of the first usable entry named ``key``; None when there is none.

    An entry that cannot be read, or lacks (N, d) ``features`` (N = ``num_samples`` when given) or (B, C, H, W)
    ``grid`` images, is skipped with a warning naming the file (:func:`~lightning_distill.metrics.read_cache_entry`):
    the next folder's entry is read, or the cell is computed, as when there is no entry.
    """
    for d in dirs:
        path = d / f"{key}.pt"
        if path.is_file():
            e = read_cache_entry(path, {"features": (num_samples, None), "grid": (None, None, None, None)},
                                 "skipping it (the cell is read from another entry or sampled)")
            if e is not None:
                return e["features"], e["grid"], path
    return None


def save_entry(key: str, features: Tensor, grid: Tensor, directory: str | os.PathLike) -> Path:
    """Write an entry atomically (:func:`~lightning_distill.checkpoint_io.atomic_torch_save`)."""
    return atomic_torch_save({"features": features.to(torch.float64).cpu(), "grid": grid.float().cpu()},
                             Path(directory).expanduser() / f"{key}.pt")


def cached_cell(
    teacher, digest: str, steps: int, num_samples: int, seed: int, chunk_size: int,
    compute: Callable[[], tuple[Tensor, Tensor]], cache_dir=None, use_cache: bool = True, cache_out=None,
    conditioning: dict | None = None,
) -> tuple[Tensor, Tensor, str | None]:
    """Features and sample-grid images of one teacher cell, and the entry file they were read from (None
    when computed).

    Read from the first usable entry with the cell's key (:func:`search_dirs`, :func:`load_entry`) when
    ``use_cache``; otherwise ``compute()`` samples them and they are written to the user cache (when
    ``use_cache``). A damaged entry (:func:`load_entry` warns, naming it) is replaced there, atomically, by the
    cell computed or read from the teacher folder; one shipped in the teacher folder is left as it is (the folder
    may be read-only, or a checkout's tracked files): the user cache, searched first, holds the cell from then
    on. A user cache that cannot be written (read-only) is warned about and the cell used uncached.
    ``cache_out`` receives the entry either way. ``conditioning``: a text-to-image teacher's prompts and
    guidance (:func:`cell_key`).
    """
    key = cell_key(digest, steps, num_samples, seed, chunk_size, conditioning)
    dirs = search_dirs(teacher, cache_dir)
    user = dirs[0] / f"{key}.pt"
    entry = load_entry(key, dirs, num_samples) if use_cache else None
    if entry is not None:
        feats, grid, path = entry
    else:
        (feats, grid), path = compute(), None
    # a computed cell, or one read from the teacher folder while the user cache's entry was damaged
    if use_cache and path != user and (path is None or user.is_file()):
        try:
            save_entry(key, feats, grid, dirs[0])
        except OSError as err:
            warnings.warn(f"cannot write the teacher cell's cache entry {user} ({err}): the cell is used without "
                          "being cached", stacklevel=2)
    if cache_out is not None:
        save_entry(key, feats, grid, cache_out)
    return feats, grid, None if path is None else str(path)


__all__ = ["cached_cell", "cell_key", "text_conditioning", "teacher_digest", "teacher_features_key", "search_dirs",
           "load_entry", "save_entry", "SHIPPED_DIR"]
