"""Writing a student as a diffusers pipeline folder, atomically.

The pipeline is written to a temporary sibling folder and renamed into place, so an interrupted export
never leaves a half-written folder at the target path; an existing export at that path is replaced only
once the new one is complete.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn


def atomic_write_dir(target: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``target`` (replacing it) in two renames.

    The previous folder is moved aside first and removed only after the new one is in place; a crash
    between the two renames leaves it next to the target as ``<name>.old-*`` rather than losing it.
    """
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def make_pipeline(unet: nn.Module, scheduler):
    """A stock diffusers pipeline around ``unet`` whose sampling loop is the framework's own.

    ``DDPMPipeline`` calls ``scheduler.step(out, t, x, generator=...)`` with the scheduler's defaults,
    which is exactly :meth:`DistillationMethod.sample`, for DDIM (eta = 0) and LCM schedulers alike.
    """
    from diffusers import DDPMPipeline

    return DDPMPipeline(unet=unet, scheduler=scheduler)


def export_pipeline(unet: nn.Module, scheduler, target: str | os.PathLike) -> Path:
    """Save ``unet`` (float32, safetensors) and ``scheduler`` as a loadable diffusers pipeline folder."""
    unet = copy.deepcopy(unet).to(device="cpu", dtype=torch.float32)
    unet.requires_grad_(True)  # save_pretrained does not care; keep the copy a plain trainable model

    def write(tmp: Path) -> None:
        make_pipeline(unet, scheduler).save_pretrained(tmp, safe_serialization=True)

    return atomic_write_dir(target, write)
