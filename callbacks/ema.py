"""Sampling EMA of one named submodule (default ``student``).

Built on ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``. Lightning's own
``EMAWeightAveraging`` averages the whole LightningModule (the frozen teacher included) and so does not
fit: this callback averages only the named submodule, keeps its state in checkpoints, and offers the
averaged copy for sampling, evaluation and export through ``sampling_module(pl_module)``.

A LoRA student's frozen base is its own average, so for it the averaged copy (:class:`TrainableAverage`)
holds new tensors for the trainable weights only and shares the base with the student (which may in turn
share it with the teacher: ``student_lora.base``): the EMA of a 12B teacher's LoRA costs the adapters.
"""

from __future__ import annotations

from typing import Any

from collections import defaultdict

import lightning as L
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lightning_distill import lora, sharding
from lightning_distill.errors import ConfigError


def ema_decay(num_updates: int, decay: float, warmup: bool) -> float:
    """Decay used for update number ``num_updates`` (0-based).

    With ``warmup`` the decay ramps as (1 + n) / (10 + n) (the TensorFlow / DDPM convention), so early
    averages are not dominated by the random initialisation; it never exceeds ``decay``.
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


class TrainableAverage(nn.Module):
    """``AveragedModel`` for a network that trains only some weights (a LoRA network): the copy's frozen
    parameters and buffers are the network's own tensors, and only the trainable ones are averaged.

    Same state-dict layout as ``AveragedModel`` (``module.<name>``, ``n_averaged``) and the same update rule
    (the first update copies, later ones call ``multi_avg_fn(averaged, current, n_averaged)``).
    """

    def __init__(self, model: nn.Module, multi_avg_fn) -> None:
        super().__init__()
        self.module = lora.copy_trainable(model)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))
        self.multi_avg_fn = multi_avg_fn

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        groups: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
        for mine, theirs in zip(self.module.parameters(), model.parameters(), strict=True):
            if theirs.requires_grad:  # a frozen weight is shared: nothing to average
                group = groups[(mine.device, mine.dtype)]
                group[0].append(mine)
                group[1].append(theirs.detach().to(mine.device))
        for averaged, current in groups.values():
            if self.n_averaged == 0:
                for a, c in zip(averaged, current):
                    a.copy_(c)
            else:
                self.multi_avg_fn(averaged, current, self.n_averaged.to(averaged[0].device))
        self.n_averaged += 1


class EMA(L.Callback):
    """Exponential moving average of ``pl_module.<module_name>`` for sampling.

    Args:
        decay: EMA decay (e.g. 0.999 for short runs, 0.9999 for long ones).
        warmup: ramp the decay up at the start (see :func:`ema_decay`).
        module_name: the submodule to average (``student``).
        update_every_n_steps: update every N global steps (optimiser steps; iterations for the
            adversarial methods).
        start_step: first global step at which averaging starts (copies the weights then).

    Example::

        >>> trainer = L.Trainer(callbacks=[EMA(decay=0.999)])
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        module_name: str = "student",
        update_every_n_steps: int = 1,
        start_step: int = 0,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must lie in [0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise ConfigError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}")
        self.decay = decay
        self.warmup = warmup
        self.module_name = module_name
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.averaged: AveragedModel | None = None
        self._pending: dict | None = None
        self._last_step = -1

    # the one small override hook
    def should_update(self, step: int) -> bool:
        return step >= self.start_step and step % self.update_every_n_steps == 0

    def _target(self, pl_module: L.LightningModule) -> nn.Module:
        module = getattr(pl_module, self.module_name, None)
        if not isinstance(module, nn.Module):
            raise AttributeError(f"EMA: {type(pl_module).__name__} has no submodule {self.module_name!r}")
        return module

    def _build(self, pl_module: L.LightningModule) -> None:
        target = self._target(pl_module)
        average = get_ema_multi_avg_fn(self.decay)
        if lora.has_lora(target) and getattr(pl_module, "device_mesh", None) is None:
            self.averaged = TrainableAverage(target, average)  # (FSDP2 shards a whole copy: AveragedModel)
        else:
            self.averaged = AveragedModel(target, multi_avg_fn=average, use_buffers=True)
        self.averaged.requires_grad_(False)
        self.averaged.eval()
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    def reset(self, pl_module: L.LightningModule) -> None:
        """Restart averaging from the current weights (progressive distillation does this every round)."""
        self._pending = None
        self._build(pl_module)
        self._last_step = -1  # the fresh average takes in this step's weights (its first update copies them)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.averaged is None:
            self._build(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = self._target(pl_module)
        if sharding.is_sharded(target) and not sharding.is_sharded(self.averaged.module):
            # FSDP2 (sharding.py): the copy was taken in setup, before configure_model sharded the target
            # (a sharded module cannot be copied); shard it the same way, so that each rank averages its
            # own shards. Runs before a checkpoint's state is restored under ModelParallelStrategy.
            sharding.shard_denoiser(self.averaged.module, sharding.data_parallel_mesh(pl_module))
        self.averaged.to(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # No optimiser step has been taken at this global step since (re)starting, yet with gradient
        # accumulation the first micro-batches still see it: an update there would average the initial
        # weights of a fresh run in (and run the warm-up counter one ahead), or update a resumed run a
        # second time at the step it was checkpointed at.
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.update(trainer, pl_module)

    def update(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Average in the optimiser step just taken (once per step: later calls at the same step do nothing)."""
        step = trainer.global_step  # already counts the optimiser step just taken
        # With gradient accumulation this hook runs per micro-batch: update once per optimiser step.
        if step == self._last_step or not self.should_update(step):
            return
        self._last_step = step
        n = int(self.averaged.n_averaged.item())
        average = get_ema_multi_avg_fn(ema_decay(n, self.decay, self.warmup))
        # sharded (FSDP2): DTensor parameters and plain buffers cannot share one foreach call
        self.averaged.multi_avg_fn = sharding.per_tensor_kind(average) if sharding.is_sharded(self.averaged) else average
        self.averaged.update_parameters(self._target(pl_module))

    def sampling_module(self, pl_module: L.LightningModule) -> nn.Module | None:
        """The averaged copy of the submodule, or None before averaging has started.

        During training it is the average as of the current optimiser step, whichever callback asks: one
        listed before this one (an FID score, ``TeacherSwap`` promoting or exporting the average) would
        otherwise read it one update behind, in its ``on_train_batch_end`` before this callback's.
        """
        trainer = pl_module._trainer
        if trainer is not None and trainer.training and self.averaged is not None:
            self.update(trainer, pl_module)
        if self.averaged is None or int(self.averaged.n_averaged.item()) == 0:
            return None
        return self.averaged.module

    def state_dict(self) -> dict[str, Any]:
        if self.averaged is None:
            return {"averaged": self._pending}
        # sharded: gathered on every rank (a collective), held by rank 0 (the one that saves checkpoints)
        sd = sharding.full_state_dict(self.averaged) if sharding.is_sharded(self.averaged) else self.averaged.state_dict()
        if lora.has_lora(self.averaged.module):
            # a LoRA student's base is frozen, so its average is the base itself: rebuilt, not stored
            lora.drop_base_weights(sd, "module.")
        return {"averaged": sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = state_dict.get("averaged")
        if sd is None:
            return
        if self.averaged is None:
            self._pending = sd
        else:
            self._load(sd)

    def _load(self, sd: dict[str, Any]) -> None:
        if lora.has_lora(self.averaged.module):
            sd = dict(sd)
            lora.restore_base_weights(sd, self.averaged.module, "module.")
        if sharding.is_sharded(self.averaged):
            sharding.load_full_state_dict(self.averaged, sd)  # each rank keeps its shard of the full tensors
        else:
            self.averaged.load_state_dict(sd)
