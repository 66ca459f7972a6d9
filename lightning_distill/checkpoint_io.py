"""Atomic, durable local checkpoint writes.

Lightning's ``TorchCheckpointIO`` writes local files through an fsspec transaction whose temporary file
lives in the system temp folder (``tempfile.mkstemp()`` with no ``dir``) and is then ``shutil.move``-d
onto the target. When ``$TMPDIR`` and the checkpoint folder are on different file systems (node-local
/tmp and a shared checkpoint volume, the usual cluster layout) that move is a copy, which truncates the
target first: a kill during it destroys the previous ``last.ckpt``. Nothing is fsynced either, so a
power loss can leave a renamed but empty file.

:class:`AtomicCheckpointIO` writes to a temporary file in the target's own folder, fsyncs it, renames
it over the target (``os.replace``, atomic on POSIX within one file system) and fsyncs the folder. A
kill at any point leaves either the previous checkpoint or the new one, never a partial file. Remote
paths (``s3://`` ...) go to Lightning's implementation unchanged.

Enable with ``--trainer.plugins lightning_distill.checkpoint_io.AtomicCheckpointIO`` (or
``Trainer(plugins=[AtomicCheckpointIO()])``).

The same writes serve every other file the framework publishes: the reference-feature, latent and text
caches go through :func:`atomic_torch_save`, exports and LoRA files are fsynced (:func:`fsync_tree`) before
their renames.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


def fsync_dir(folder: Path) -> None:
    """fsync a folder (its entries: a rename in it is durable); a no-op where the file system refuses."""
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened / synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then the folders themselves (deepest first)."""
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in reversed(folders):
        fsync_dir(d)


def umask_mode(base: int = 0o666) -> int:
    """The mode a plain ``open`` / ``mkdir`` would give under the current umask (``base`` 0o666 / 0o777)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` so that ``path`` holds either its old content or all of the new one.

    The temporary file has a unique name in the target's folder (``mkstemp``: processes of several nodes
    writing one shared cache never share it), is fsynced before the rename and gets a plain file's mode
    under the umask (``mkstemp`` makes it private, 0600), so a shared cache or checkpoint stays readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable (see the module docstring).

    Example::

        >>> trainer = L.Trainer(plugins=[AtomicCheckpointIO()])
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options (got {storage_options!r})")
        fs = get_filesystem(path)
        if "file" not in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, path)


__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "fsync_dir", "fsync_tree", "umask_mode"]
