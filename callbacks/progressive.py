"""Rounds of progressive distillation: when the student becomes the teacher, and when training stops.

The maths of a round (x_tilde, the two teacher steps) lives in
``lightning_distill.methods.progressive``; this callback owns the schedule across rounds. At the end
of a round it calls ``pl_module.promote_student()`` (the student's weights are copied into a new frozen
teacher and N halves; with ``promote="ema"`` the sampling EMA's weights are copied into the student first),
re-creates the optimiser and its per-round learning-rate schedule through the
strategy, restarts every callback that offers ``reset(pl_module)`` (the sampling EMA), and logs the
round. When the round of the ``final_steps`` student ends, it sets ``trainer.should_stop``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lightning_distill import sharding
from lightning_distill.callbacks.ema import EMA
from lightning_distill.errors import ConfigError
from lightning_distill.methods.progressive import check_halving


PROMOTE_CHOICES = ("student", "ema")


def student_ema(trainer: L.Trainer) -> EMA | None:
    """The trainer's EMA callback that averages ``student`` (None without one)."""
    return next((c for c in trainer.callbacks if isinstance(c, EMA) and c.module_name == "student"), None)


class TeacherSwap(L.Callback):
    """End progressive-distillation rounds after a step budget or on a loss plateau, down to ``final_steps``.

    Acts on a module exposing ``num_student_steps``, ``round_index``, ``round_length`` and
    ``promote_student()`` (:class:`~lightning_distill.methods.progressive.ProgressiveDistillation`).

    Args:
        steps_per_round: optimiser steps per round (also the length of the per-round LR annealing):
            one count for every round, or a list with one count per round of this run, from the method's
            ``num_student_steps`` down to ``final_steps`` (e.g. ``[500, 500, 1500, 1500]`` for 32 -> 4:
            longer late rounds, where each halving costs the most). None: rounds end only on a plateau.
        final_steps: the student's step count at which training stops (after that student's round).
            Must be reachable from the method's ``num_student_steps`` by halving, checked at setup.
        plateau_patience: also end a round when the smoothed training loss has not improved by a
            relative ``plateau_min_delta`` for this many optimiser steps (None: off).
        plateau_min_delta: relative improvement that counts as progress.
        plateau_smoothing: decay of the (bias-corrected) moving average of the training loss.
        min_steps_per_round: a plateau never ends a round before this many steps.
        promote: which weights become the next round's teacher (and start its student): ``"student"``,
            the raw weights (Salimans & Ho train without an EMA), or ``"ema"``, the sampling EMA's
            average as it stands at the swap, i.e. the student that every in-run score and export
            measures. ``"ema"`` needs an :class:`~lightning_distill.callbacks.ema.EMA` callback on
            ``student``.
        export_rounds: a folder where every round's student (its sampling EMA when there is one, as the
            in-run FD scores it) is exported when its round ends, before the swap, as ``<N>step/``: a stock
            pipeline folder per step count. A checkpoint written at a round's last step holds the state after
            the swap (the next round's start, its EMA restarted), so this is where each round's student is kept.

    Example::

        >>> swap = TeacherSwap(steps_per_round=800, final_steps=1)
        >>> longer_late = TeacherSwap(steps_per_round=[500, 500, 1500, 1500], final_steps=4)  # 32 -> 4 steps
        >>> trainer = L.Trainer(max_epochs=-1, callbacks=[swap, EMA(decay=0.995)])
    """

    def __init__(
        self,
        steps_per_round: int | list[int] | None = 1000,
        final_steps: int = 1,
        plateau_patience: int | None = None,
        plateau_min_delta: float = 0.01,
        plateau_smoothing: float = 0.98,
        min_steps_per_round: int = 0,
        promote: str = "student",
        export_rounds: str | None = None,
    ) -> None:
        if steps_per_round is None and plateau_patience is None:
            raise ConfigError("TeacherSwap needs steps_per_round, plateau_patience, or both")
        counts = list(steps_per_round) if isinstance(steps_per_round, Sequence) else [steps_per_round]
        if steps_per_round is not None and (not counts or any(c is None or c < 1 for c in counts)):
            raise ConfigError(f"steps_per_round must be >= 1 (one count, or a non-empty list of counts), got {steps_per_round}")
        if plateau_patience is not None and plateau_patience < 1:
            raise ConfigError(f"plateau_patience must be >= 1, got {plateau_patience}")
        if not 0.0 <= plateau_min_delta <= 1.0:
            raise ConfigError(f"plateau_min_delta is a relative improvement in [0, 1], got {plateau_min_delta}")
        if not 0.0 <= plateau_smoothing < 1.0:
            raise ConfigError(f"plateau_smoothing must lie in [0, 1), got {plateau_smoothing}")
        if final_steps < 1:
            raise ConfigError(f"final_steps must be >= 1, got {final_steps}")
        if promote not in PROMOTE_CHOICES:
            raise ConfigError(f"promote must be one of {list(PROMOTE_CHOICES)}, got {promote!r}")
        self.steps_per_round = counts if isinstance(steps_per_round, Sequence) else steps_per_round
        self.final_steps = final_steps
        self.plateau_patience = plateau_patience
        self.plateau_min_delta = plateau_min_delta
        self.plateau_smoothing = plateau_smoothing
        self.min_steps_per_round = min_steps_per_round
        self.promote = promote
        self.export_rounds = export_rounds
        # state (checkpointed)
        self.round = 0
        self.num_student_steps: int | None = None
        self.round_start_step = 0
        self.first_round = 0  # the module's round when this run's chain began: the list's first entry
        self.finished = False
        self._last_step = -1
        self._reset_plateau()
        self._loaded = False

    def round_steps(self, round_index: int) -> int | None:
        """The step budget of round ``round_index`` of this run (None: the round ends on a plateau)."""
        if isinstance(self.steps_per_round, list):
            return self.steps_per_round[round_index - self.first_round]
        return self.steps_per_round

    # --- the one small override hook ---------------------------------------------------------------

    def should_end_round(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """True when the current round is over (step budget spent, or loss plateau)."""
        steps = trainer.global_step - self.round_start_step
        budget = self.round_steps(self.round)
        if budget is not None and steps >= budget:
            return True
        if self.plateau_patience is not None and steps >= self.min_steps_per_round:
            return self._plateau_steps >= self.plateau_patience
        return False

    # --- plateau tracking --------------------------------------------------------------------------

    def _reset_plateau(self) -> None:
        self._loss_avg = 0.0
        self._loss_count = 0
        self._best = math.inf
        self._plateau_steps = 0

    def _track(self, loss: float) -> None:
        b = self.plateau_smoothing
        self._loss_avg = b * self._loss_avg + (1 - b) * loss
        self._loss_count += 1
        smoothed = self._loss_avg / (1 - b**self._loss_count)
        # The first step of a round always counts as progress (inf * 0 would be NaN for min_delta = 1).
        if self._best == math.inf or smoothed < self._best * (1 - self.plateau_min_delta):
            self._best = smoothed
            self._plateau_steps = 0
        else:
            self._plateau_steps += 1

    # --- hooks -------------------------------------------------------------------------------------

    def _check_module(self, pl_module: L.LightningModule) -> None:
        missing = [a for a in ("num_student_steps", "round_index", "promote_student") if not hasattr(pl_module, a)]
        if missing:
            raise ConfigError(f"TeacherSwap needs a progressive-distillation module; {type(pl_module).__name__} lacks {missing}")

    def _check_reachable(self, start_steps: int) -> int:
        return check_halving(start_steps, self.final_steps)  # raises ConfigError naming both step counts

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_module(pl_module)
        if self.promote == "ema" and student_ema(trainer) is None:
            raise ConfigError('TeacherSwap(promote="ema") needs an EMA callback on the student (lightning_distill.callbacks.EMA)')
        # Before any training step (and before a checkpoint is restored: the configured start count).
        rounds = self._check_reachable(pl_module.num_student_steps) + 1
        if isinstance(self.steps_per_round, list) and len(self.steps_per_round) != rounds:
            raise ConfigError(
                f"steps_per_round lists {len(self.steps_per_round)} rounds, but {pl_module.num_student_steps} -> "
                f"{self.final_steps} student steps takes {rounds}: give one count per round, or one count for all"
            )
        # A module continued from a round >= 1 (load_from_checkpoint, then a fresh Trainer): the list starts
        # there. (A resume with ckpt_path restores the value its run began with.)
        self.first_round = pl_module.round_index
        # The method's configure_optimizers anneals the rate over this many steps (after every reset).
        pl_module.round_length = self.round_steps(pl_module.round_index)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The module's round is restored by now (restore_model runs before the callbacks): anneal over its budget.
        pl_module.round_length = self.round_steps(pl_module.round_index)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded:
            # Resumed: the method restored N and the teacher from its own checkpoint entry.
            if self.num_student_steps != pl_module.num_student_steps or self.round != pl_module.round_index:
                raise RuntimeError(
                    f"checkpoint mismatch: TeacherSwap is in round {self.round} with N={self.num_student_steps}, "
                    f"the model in round {pl_module.round_index} with N={pl_module.num_student_steps}"
                )
        else:
            self.round = pl_module.round_index
            self.num_student_steps = pl_module.num_student_steps
            self.round_start_step = trainer.global_step
        self._check_reachable(self.num_student_steps)
        if self.finished:
            trainer.should_stop = True
        rank_zero_info(f"Progressive distillation: round {self.round}, {self.num_student_steps}-step student")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # counts the optimiser step just taken
        # With gradient accumulation this hook runs per micro-batch: act once per optimiser step.
        if step == self._last_step:
            return
        self._last_step = step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and self.plateau_patience is not None:
            self._track(float(loss))
        pl_module.log("progressive/round", float(self.round), on_step=True, on_epoch=False)
        pl_module.log("progressive/num_student_steps", float(self.num_student_steps), on_step=True, on_epoch=False)
        if self.finished or not self.should_end_round(trainer, pl_module):
            return
        self.export_round(trainer, pl_module)
        if self.num_student_steps <= self.final_steps:
            self.finished = True
            trainer.should_stop = True
            rank_zero_info(f"Progressive distillation done: {self.num_student_steps}-step student after {step} steps")
            return
        self.swap(trainer, pl_module)

    def export_round(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Export the ending round's student to ``export_rounds/<N>step`` (nothing without ``export_rounds``)."""
        if self.export_rounds is None:
            return
        # FSDP2: every rank gathers its shards; rank 0 writes unsharded copies (as PipelineExport)
        with sharding.unsharded(pl_module.sampling_denoiser(), rank_zero=trainer.is_global_zero):
            if trainer.is_global_zero:
                path = pl_module.export(Path(self.export_rounds) / f"{self.num_student_steps}step")
                rank_zero_info(f"Progressive distillation: the {self.num_student_steps}-step student exported to {path}")
        trainer.strategy.barrier("teacher_swap_export")

    def swap(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Promote the student (or its EMA), reset optimiser + LR schedule and every resettable callback."""
        if self.promote == "ema":
            averaged = student_ema(trainer).sampling_module(pl_module)
            if averaged is None:
                raise RuntimeError(f"TeacherSwap(promote='ema'): the EMA has not started averaging by step {trainer.global_step}")
            pl_module.student.load_state_dict(averaged.state_dict())  # the next round starts from the average
        pl_module.promote_student()
        self.round = pl_module.round_index
        self.num_student_steps = pl_module.num_student_steps
        self.round_start_step = trainer.global_step
        self._reset_plateau()
        pl_module.round_length = self.round_steps(self.round)
        # Fresh optimiser state and a fresh (round-local) LR schedule, as in the paper.
        trainer.strategy.setup_optimizers(trainer)
        for cb in trainer.callbacks:
            reset = getattr(cb, "reset", None)
            if cb is not self and callable(reset):
                reset(pl_module)  # the sampling EMA restarts from the new round's student
        rank_zero_info(
            f"Progressive distillation: step {trainer.global_step}, round {self.round} starts, "
            f"{self.num_student_steps}-step student"
        )

    # --- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "num_student_steps": self.num_student_steps,
            "round_start_step": self.round_start_step,
            "first_round": self.first_round,
            "finished": self.finished,
            "last_step": self._last_step,
            "plateau": {
                "loss_avg": self._loss_avg,
                "loss_count": self._loss_count,
                "best": self._best,
                "plateau_steps": self._plateau_steps,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round = state_dict["round"]
        self.num_student_steps = state_dict["num_student_steps"]
        self.round_start_step = state_dict["round_start_step"]
        self.first_round = state_dict.get("first_round", 0)  # (checkpoints before it was stored: chains began at 0)
        self.finished = state_dict["finished"]
        self._last_step = state_dict["last_step"]
        p = state_dict["plateau"]
        self._loss_avg, self._loss_count = p["loss_avg"], p["loss_count"]
        self._best, self._plateau_steps = p["best"], p["plateau_steps"]
        self._loaded = True


__all__ = ["TeacherSwap"]
