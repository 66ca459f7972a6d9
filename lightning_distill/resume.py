"""Exact resume: a run killed at step k and resumed from ``last.ckpt`` continues as if never stopped.

Lightning restores weights, optimiser, schedulers, loop counters and callback states, but not two
things a diffusion step depends on:

* the global random state (the noise and timesteps drawn in ``compute_loss``): the CLI seeds again
  on resume, so without :class:`ResumeRNG` the resumed run would replay the noise of steps 1, 2, ...;
* the position inside the current epoch: a plain ``DataLoader`` restarts its epoch from the first
  batch, with a new shuffle drawn from the (already wrong) global random state.

:class:`EpochSeededRandomSampler` makes the shuffle a function of (seed, epoch) only, and
:class:`ResumableDataLoader` gives Lightning the ``state_dict`` / ``load_state_dict`` pair it saves with
the fit loop, so a resumed epoch skips the batches already consumed. With DDP Lightning swaps the
sampler for a ``DistributedSampler``, which is (seed, epoch)-determined as well.

What cannot be made exact, and why (see docs/scaling.md): a resume on a different number of
processes (the data shards differ), or a different thread count / device (floating-point reduction
order); both fall back to "statistically equivalent" and :class:`ResumeRNG` warns.
"""

from __future__ import annotations

import os
import random
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, RandomSampler

#: 2^32 / the golden ratio. A CPU generator keeps only a seed's low 32 bits, and multiples k * GOLDEN of
#: different small k stay far apart there (at least 1.9e6 for k <= 1000), so ``offset_seed`` streams of small
#: indices never share those bits while their offsets (epochs, ranks, batches) stay below that.
GOLDEN = 0x9E3779B1


def offset_seed(base: int, index: int) -> int:
    """``base + index * GOLDEN`` (mod 2^63): stream ``index`` of ``base``; index 0 is ``base`` itself.

    Plain ``base + index`` aliases across indices: seed s at epoch e + 1 shuffled as seed s + 1 at epoch e,
    and rank r of seed s drew rank 0 of seed s + r's noise, so runs of neighbouring seeds were not
    independent draws.
    """
    return (int(base) + int(index) * GOLDEN) % 2**63


# --- random state as plain types (checkpoints load with torch.load(weights_only=True)) ------------


def collect_rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / Python random state, as tensors, lists and numbers."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]
    except ImportError:  # pragma: no cover - numpy is a dependency of the stack
        pass
    version, internal, gauss = random.getstate()
    state["python"] = [int(version), list(internal), gauss]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _world(trainer: L.Trainer | None) -> tuple[int, int]:
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size


class ResumeRNG(L.Callback):
    """Save every rank's random state in checkpoints and restore it when training resumes.

    Registered by :meth:`DistillationMethod.configure_callbacks`, so every method has it.

    Args:
        decorrelate_ranks: on a fresh (not resumed) multi-process run, reseed rank r > 0 with
            ``offset_seed(seed, r)``. ``seed_everything`` gives every rank the same seed, so without this all ranks
            would draw the same noise and timesteps for their different images. Rank 0 keeps the
            single-process stream.

    Example::

        >>> trainer = L.Trainer(callbacks=[ResumeRNG()])
    """

    def __init__(self, decorrelate_ranks: bool = True) -> None:
        self.decorrelate_ranks = decorrelate_ranks
        self._trainer: L.Trainer | None = None
        self._pending: list | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while the checkpoint is assembled (rank 0 alone writes it), so the
        # collective below is entered by all ranks together.
        mine = collect_rng_state()
        rank, world = _world(self._trainer)
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list = [None] * world
            torch.distributed.all_gather_object(states, mine)
        else:
            states = [mine]
        return {"per_rank": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("per_rank")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Restored here, after everything that runs between loading the checkpoint and the first
        # training step (model setup, sanity validation, the dataloader iterator) has used randomness.
        rank, world = _world(trainer)
        if self._pending is not None:
            states, self._pending = self._pending, None
            if len(states) != world:
                rank_zero_warn(
                    f"ResumeRNG: checkpoint holds random states of {len(states)} processes but this run has "
                    f"{world}; resuming with fresh random streams (not bit-identical to an uninterrupted run)"
                )
                return
            set_rng_state(states[rank])
        elif self.decorrelate_ranks and world > 1 and rank > 0:
            seed = offset_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), rank) % 2**32
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                import numpy as np

                np.random.seed(seed % 2**32)
            except ImportError:  # pragma: no cover
                pass


class OptimizerSettingsCheck(L.Callback):
    """Warn when a resume restores optimiser settings other than the configured ones.

    Lightning restores the optimiser's state from the checkpoint, its param groups' learning rate and
    weight decay included, after ``configure_optimizers`` built it from the given settings; so a new
    learning rate given for a resume (``--model.init_args.optimizer.init_args.lr``) is silently not used.
    The learning rate compared is a group's ``initial_lr`` where an LR scheduler set one (a schedule moves
    ``lr`` itself). Registered with :class:`ResumeRNG` by :meth:`DistillationMethod.configure_callbacks`.
    """

    KEYS = ("lr", "weight_decay")

    @staticmethod
    def settings(trainer: L.Trainer) -> list[list[dict]]:
        return [[{"lr": g.get("initial_lr", g.get("lr")), "weight_decay": g.get("weight_decay")} for g in opt.param_groups]
                for opt in trainer.optimizers]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._configured = self.settings(trainer)  # built from the config; the checkpoint's state comes next

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        configured, self._configured = getattr(self, "_configured", None), None
        if not trainer.ckpt_path or configured is None:
            return
        restored = self.settings(trainer)
        changed = [f"optimizer {i} group {j} {k}: {c[k]!r} -> {r[k]!r}"
                   for i, (co, ro) in enumerate(zip(configured, restored)) for j, (c, r) in enumerate(zip(co, ro))
                   for k in self.KEYS if c[k] != r[k]]
        if changed:
            rank_zero_warn(
                f"resuming from {trainer.ckpt_path}: the checkpoint's optimiser state replaces the configured "
                f"settings (configured -> used): {'; '.join(changed)}. To train on with new ones, start a new run "
                f"from the trained student instead of resuming"
            )


# --- data order ------------------------------------------------------------------------------------


class EpochSeededRandomSampler(RandomSampler):
    """``RandomSampler`` whose permutation depends only on (seed, epoch), never on the global RNG.

    Lightning calls ``set_epoch`` at every epoch start (as for ``DistributedSampler``, which replaces
    this sampler under DDP with the same (seed, epoch) rule).
    """

    def __init__(self, data_source, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        # epoch e of seed s; seed 0's orders are epoch e's (as before offset_seed)
        self.generator = torch.Generator().manual_seed(offset_seed(self.epoch, self.seed))
        return super().__iter__()


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that remembers how many batches of which epoch it has yielded.

    Lightning saves ``state_dict()`` with the fit loop and calls ``load_state_dict`` before iterating
    again on resume; the next iterator over the same epoch then skips the consumed batches. The epoch
    is read from the sampler (``EpochSeededRandomSampler`` or ``DistributedSampler``); with a sampler
    that has no ``epoch`` nothing is skipped.
    """

    def __init__(self, *args, **kwargs) -> None:
        # Without a generator of its own, every new iterator draws its base seed from the global
        # RNG (even with num_workers=0), one draw that a resumed run would make at the wrong time.
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)))
        super().__init__(*args, **kwargs)
        self._base_seed = self.generator.initial_seed()
        self._state = {"epoch": None, "consumed": 0}
        self._resume_from: dict | None = None

    def _sampler_epoch(self) -> int | None:
        for s in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if s is not None and hasattr(s, "epoch"):
                return int(s.epoch)
        return None

    def __iter__(self) -> Iterator:
        return self._iterate()

    def _iterate(self) -> Iterator:
        # A generator: its body runs at the first next(), after Lightning's set_epoch for this epoch.
        epoch = self._sampler_epoch()
        skip = 0
        resume, self._resume_from = self._resume_from, None
        if resume is not None and epoch is not None and resume["epoch"] == epoch:
            skip = int(resume["consumed"])
        self._state = {"epoch": epoch, "consumed": skip}
        # Worker seeds of this epoch: a function of (seed, epoch), as the sampler's order is.
        self.generator.manual_seed(offset_seed(epoch or 0, self._base_seed))
        it = super().__iter__()
        # Skipped batches are still loaded (cheap for the in-memory data sets of TeacherDataModule).
        for _ in range(skip):
            next(it)
        for batch in it:
            self._state["consumed"] += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_from = dict(state_dict)


__all__ = ["ResumeRNG", "OptimizerSettingsCheck", "EpochSeededRandomSampler", "ResumableDataLoader", "collect_rng_state", "set_rng_state"]
