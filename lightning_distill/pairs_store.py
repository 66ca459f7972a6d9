"""Teacher-pairs storage: shards and manifest on disk, written atomically and checked by sha256.

:mod:`lightning_distill.teacher_pairs` generates the (noise, teacher sample[, label]) pairs; this module owns
how they are stored, resumed and verified. Layout of a pairs folder::

    manifest.json              settings + one entry per shard (file, count, bytes, sha256)
    shard-00000.safetensors    tensors "noise", "sample" (and "label", or a text teacher's token ids
                               "input_ids"[, "input_ids_2"]), metadata = settings + index
    shard-00001.safetensors
    ...

Guarantees:
  * Every shard is written to a temporary name and renamed into place (``os.replace``), so a killed
    run never leaves a final-named partial shard. A rerun skips the complete shards (:func:`shard_ok`)
    and regenerates the rest.
  * The manifest is written last (rank 0, after all ranks are done) and is the completion marker.
    Loading checks every shard against it (size and sha256) and raises :class:`PairsError` on any
    mismatch; ``teacher_pairs.ensure_pairs`` instead regenerates a shard that fails the check.
  * A folder holding pairs made with other settings is refused (:func:`check_manifest_settings`), never
    silently reused.

Every name here stays importable from :mod:`lightning_distill.teacher_pairs` too.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .teacher_pairs import PairsConfig

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class PairsError(ValueError):
    """A pairs folder that cannot be used: missing, incomplete, corrupt, or made with other settings."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_shard(path: Path, expected_count: int | None = None, settings: dict | None = None) -> dict[str, Tensor]:
    """Load one shard, raising PairsError if it is truncated, unreadable, or made with other settings."""
    from safetensors.torch import load_file
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated headers / data
        raise PairsError(f"shard {path} is unreadable or truncated ({type(err).__name__}: {err})") from err
    if "noise" not in tensors or "sample" not in tensors:
        raise PairsError(f"shard {path} lacks the 'noise' / 'sample' tensors")
    n = tensors["noise"].shape[0]
    if any(v.shape[0] != n for v in tensors.values()):
        raise PairsError(f"shard {path}: tensors disagree in length")
    if expected_count is not None and n != expected_count:
        raise PairsError(f"shard {path} holds {n} pairs, expected {expected_count}")
    if settings is not None and json.loads(meta.get("settings", "null")) != settings:
        raise PairsError(f"shard {path} was generated with other settings: {meta.get('settings')}")
    return tensors


def write_shard(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write to ``.<name>.tmp`` and rename into place, so a final-named shard is always complete."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_manifest_settings(folder: Path, settings: dict) -> None:
    """Refuse a folder whose manifest records other settings (or is unreadable); a folder without one passes."""
    path = folder / MANIFEST
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())["settings"]
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise PairsError(f"{path} is unreadable ({err}); delete it to regenerate the manifest") from err
    if json.loads(json.dumps(settings)) != old:
        raise PairsError(
            f"pairs folder {folder} holds pairs generated with other settings ({old}); "
            "use another folder or delete this one"
        )


def shard_ok(path: Path, count: int, settings: dict) -> bool:
    """Whether ``path`` is a complete shard of ``count`` pairs made with ``settings`` (a rerun keeps it)."""
    if not path.exists():
        return False
    try:
        read_shard(path, count, json.loads(json.dumps(settings)))
        return True
    except PairsError:
        return False


def write_manifest(folder: Path, cfg: PairsConfig, settings: dict) -> None:
    """Record every shard's count, size and sha256 (rank 0, after all shards exist)."""
    shards = []
    for i in range(cfg.num_shards):
        p = folder / shard_name(i)
        if not p.exists():
            raise PairsError(f"shard {p} is missing after generation (did a rank fail?)")
        shards.append({"file": p.name, "index": i, "count": cfg.shard_count(i), "bytes": p.stat().st_size,
                       "sha256": _sha256(p)})
    manifest = {"format": FORMAT_VERSION, "num_pairs": cfg.num_pairs, "settings": settings, "shards": shards}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify_pairs(folder: str | os.PathLike) -> list[str]:
    """Names of the shards that are missing or differ from the manifest (size or sha256); [] when all match."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    bad = []
    for s in manifest["shards"]:
        p = folder / s["file"]
        if not p.exists() or p.stat().st_size != s["bytes"] or _sha256(p) != s["sha256"]:
            bad.append(s["file"])
    return bad


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder).expanduser() / MANIFEST
    if not path.exists():
        raise PairsError(f"{path} does not exist: the pairs in {folder} are incomplete (generation has not finished)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PairsError(f"{path} is unreadable ({err})") from err


def load_pairs(folder: str | os.PathLike) -> dict[str, Tensor]:
    """All pairs of a complete folder, in index order; PairsError on any missing or corrupt shard."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    bad = verify_pairs(folder)
    if bad:
        raise PairsError(
            f"pairs folder {folder}: shard(s) {bad} are missing, truncated or corrupt (size / sha256 differ "
            "from manifest.json); rerun generation to regenerate them"
        )
    parts = [read_shard(folder / s["file"], s["count"]) for s in manifest["shards"]]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "PairsError",
    "check_manifest_settings",
    "load_pairs",
    "read_manifest",
    "read_shard",
    "shard_name",
    "shard_ok",
    "verify_pairs",
    "write_manifest",
    "write_shard",
]
