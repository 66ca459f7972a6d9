"""The plan of one adversarial iteration and the protocol of the callbacks that make it.

* :class:`StepPlan`: what one iteration does (critic updates, generator update, R1 and learning-rate
  multipliers, whether the discriminator backbone learns).
* :class:`AdversarialSchedule`: a callback with ``plan(iteration)``
  (``lightning_distill.callbacks.discriminator.DiscriminatorSchedule``); :func:`attached_schedule`
  finds it among a trainer's callbacks.
* :func:`d_updates_at` turns a (fractional) D:G ratio into a per-iteration count;
  :func:`iteration_generator` is the random stream of one iteration.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..errors import ConfigError


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

    The adversarial loop (:class:`~lightning_distill.methods.adversarial.AdversarialMethod`: ADD, APT,
    DMD2) looks among ``trainer.callbacks`` for the first object with a ``plan`` method and calls
    ``plan(iteration)`` at the start of every training iteration (``iteration`` = 0-based count of
    training batches, restored from checkpoints). The loop returns from ``training_step`` a dict
    ``{"plan", "iteration", "d_loss", "g_loss", "real_logits", "fake_logits"}`` (detached), which the
    callback receives as ``outputs`` in ``on_train_batch_end``.
    """

    def plan(self, step: int) -> StepPlan: ...


def d_updates_at(step: int, ratio: float) -> int:
    """D updates in iteration ``step`` for a D:G ratio ``ratio`` (may be fractional).

    floor((step + 1) r) - floor(step r): r = 5 gives 5 every iteration, r = 0.5 gives 0, 1, 0, 1, ...
    so that after n iterations exactly floor(n r) D updates have been made.
    """
    if ratio < 0:
        raise ConfigError(f"D:G ratio must be >= 0, got {ratio}")
    return math.floor((step + 1) * ratio + 1e-9) - math.floor(step * ratio + 1e-9)


def attached_schedule(trainer) -> AdversarialSchedule | None:
    """The :class:`AdversarialSchedule` callback attached to ``trainer`` (None without trainer or callback)."""
    if trainer is None:
        return None
    return next((cb for cb in trainer.callbacks if isinstance(cb, AdversarialSchedule)), None)


def iteration_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of :func:`iteration_generator`: hashed from ("gan", seed, step, rank), so it fills the low 32
    bits (all a CPU generator keeps) and never equals an evaluation chunk's seed. The formula before,
    seed * 1_000_003 + step, was ``metrics.chunk_seed(seed, step)``: iteration c's generator input noise (APT,
    DMD2 at K = 1) was the first rows of evaluation chunk c's noise at the same seed."""
    digest = hashlib.sha256(f"gan:{int(seed)}:{int(step)}:{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def iteration_generator(seed: int, step: int, device: torch.device, rank: int = 0) -> torch.Generator:
    """Random stream of iteration ``step`` on process ``rank``: a pure function of (seed, step, rank)
    (:func:`iteration_seed`), so resumes are exact, and under DDP every process draws its own noise and
    timesteps (with one stream for all, every rank of an unconditional model would generate the same fake
    batch). Rank 0's stream does not depend on the world size."""
    gen = torch.Generator(device=device)
    gen.manual_seed(iteration_seed(seed, step, rank))
    return gen


__all__ = ["AdversarialSchedule", "StepPlan", "attached_schedule", "d_updates_at", "iteration_generator", "iteration_seed"]
