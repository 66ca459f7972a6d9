"""Discriminator schedule for adversarial methods (ADD, APT, DMD2): ``DiscriminatorSchedule``.

The protocol (defined in ``lightning_distill.gan.plan``):

* At the start of every training iteration the method calls ``schedule.plan(iteration)`` and gets a
  :class:`~lightning_distill.gan.plan.StepPlan`: ``update_g`` (take a generator step),
  ``d_updates`` (discriminator steps), ``r1_scale`` (multiplier on the method's ``r1_weight``),
  ``d_lr_scale`` (multiplier on the D optimiser's initial learning rate) and ``train_d_backbone``.
  ``iteration`` is the method's count of training batches (``gan_iteration``, checkpointed).
* The method's ``training_step`` returns ``{"plan", "iteration", "d_loss", "g_loss", "real_logits",
  "fake_logits"}`` (detached); the schedule reads it in ``on_train_batch_end`` to count updates and log
  D accuracy on real and fake samples and the G / D losses.

``plan`` is a pure function of the iteration, built from the schedule functions below, and is the one
override hook (an adaptive schedule overrides it and may read the smoothed accuracies it keeps).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from lightning_distill.errors import ConfigError
from lightning_distill.gan.losses import discriminator_accuracy
from lightning_distill.gan.plan import StepPlan, d_updates_at

Decay = Literal["constant", "linear", "cosine"]


def ramp(step: int, start_value: float, end_value: float, steps: int, shape: Decay = "linear") -> float:
    """Value at ``step`` of a ramp from ``start_value`` (step 0) to ``end_value`` (step ``steps`` and after)."""
    if steps <= 0 or shape == "constant":
        return start_value if shape == "constant" else end_value
    frac = min(max(step / steps, 0.0), 1.0)
    if shape == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return start_value + (end_value - start_value) * frac


def lr_scale_at(step: int, warmup_steps: int, total_steps: int | None, decay: Decay, min_scale: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup_steps`` then ``decay`` to ``min_scale`` at ``total_steps``.

    Warm-up reaches 1 at the end of step ``warmup_steps - 1`` (step 0 uses 1 / warmup_steps, never 0,
    so the first update is not wasted).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or total_steps is None:
        return 1.0
    return ramp(step - warmup_steps, 1.0, min_scale, max(total_steps - warmup_steps, 1), decay)


def ratio_at(step: int, ratio: float, milestones: dict[int, float] | None) -> tuple[float, int]:
    """D:G ratio in force at ``step`` and the iteration it came into force (milestones: {from_step: ratio})."""
    start = 0
    for k in sorted(milestones or {}):
        if step >= k:
            ratio, start = float(milestones[k]), k
    return ratio, start


class DiscriminatorSchedule(L.Callback):
    """Plans every adversarial iteration: D warm-up, D:G ratio over time, R1 and D learning-rate schedules, freezing.

    Args:
        d_warmup_steps: iterations at the start with discriminator steps only (no generator step).
        d_updates_per_g: D:G ratio (fractions allowed: 0.5 = one D step every other iteration).
        ratio_milestones: ``{iteration: ratio}``; from that iteration on the ratio changes.
        r1_scale, r1_scale_end, r1_ramp_steps, r1_ramp: R1 weight multiplier, ramped from
            ``r1_scale`` to ``r1_scale_end`` over ``r1_ramp_steps`` iterations (None: constant).
        d_lr_warmup_steps, d_lr_decay, total_steps, d_lr_min_scale: D learning-rate multiplier (linear
            warm-up, then decay to ``d_lr_min_scale`` at ``total_steps`` iterations).
        freeze_backbone_steps: a trainable D backbone stays fixed for this many iterations (heads first).
        freeze_d_after: no discriminator steps from this iteration on (None: never). DMD2 refuses it: its
            critic steps also train the fake score, which must keep tracking the generator.
        acc_smoothing: decay of the smoothed real / fake accuracies kept in the state.

    Example::

        >>> schedule = DiscriminatorSchedule(d_warmup_steps=100, d_updates_per_g=2, ratio_milestones={1000: 1})
        >>> schedule.plan(0)
        StepPlan(update_g=False, d_updates=2, r1_scale=1.0, d_lr_scale=1.0, train_d_backbone=True)
    """

    def __init__(
        self,
        d_warmup_steps: int = 0,
        d_updates_per_g: float = 1.0,
        ratio_milestones: dict[int, float] | None = None,
        r1_scale: float = 1.0,
        r1_scale_end: float | None = None,
        r1_ramp_steps: int = 0,
        r1_ramp: Decay = "linear",
        d_lr_warmup_steps: int = 0,
        d_lr_decay: Decay = "constant",
        total_steps: int | None = None,
        d_lr_min_scale: float = 0.0,
        freeze_backbone_steps: int = 0,
        freeze_d_after: int | None = None,
        acc_smoothing: float = 0.9,
    ) -> None:
        if d_warmup_steps < 0 or freeze_backbone_steps < 0 or d_lr_warmup_steps < 0:
            raise ConfigError("warm-up and freeze step counts must be >= 0")
        for r in [d_updates_per_g, *(ratio_milestones or {}).values()]:
            d_updates_at(0, r)  # raises on a negative ratio
        if d_lr_decay != "constant" and total_steps is None:
            raise ConfigError(f"d_lr_decay={d_lr_decay!r} needs total_steps")
        if not 0.0 <= acc_smoothing < 1.0:
            raise ConfigError(f"acc_smoothing must lie in [0, 1), got {acc_smoothing}")
        self.d_warmup_steps = d_warmup_steps
        self.d_updates_per_g = d_updates_per_g
        self.ratio_milestones = {int(k): float(v) for k, v in (ratio_milestones or {}).items()}
        self.r1_scale = r1_scale
        self.r1_scale_end = r1_scale_end
        self.r1_ramp_steps = r1_ramp_steps
        self.r1_ramp = r1_ramp
        self.d_lr_warmup_steps = d_lr_warmup_steps
        self.d_lr_decay = d_lr_decay
        self.total_steps = total_steps
        self.d_lr_min_scale = d_lr_min_scale
        self.freeze_backbone_steps = freeze_backbone_steps
        self.freeze_d_after = freeze_d_after
        self.acc_smoothing = acc_smoothing
        # state (checkpointed)
        self.iterations = 0
        self.g_updates = 0
        self.d_updates = 0
        self.acc_real: float | None = None
        self.acc_fake: float | None = None

    # --- the override hook -----------------------------------------------------------------

    def plan(self, step: int) -> StepPlan:
        """What iteration ``step`` (0-based) does; a pure function of ``step`` and the settings."""
        ratio, start = ratio_at(step, self.d_updates_per_g, self.ratio_milestones)
        d_updates = d_updates_at(step - start, ratio)
        warming = step < self.d_warmup_steps
        if warming:
            d_updates = max(d_updates, 1)  # warm-up exists to train D: at least one D step
        if self.freeze_d_after is not None and step >= self.freeze_d_after:
            d_updates = 0
        end = self.r1_scale if self.r1_scale_end is None else self.r1_scale_end
        return StepPlan(
            update_g=not warming,
            d_updates=d_updates,
            r1_scale=ramp(step, self.r1_scale, end, self.r1_ramp_steps, self.r1_ramp),
            d_lr_scale=lr_scale_at(step, self.d_lr_warmup_steps, self.total_steps, self.d_lr_decay, self.d_lr_min_scale),
            train_d_backbone=step >= self.freeze_backbone_steps,
        )

    # --- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "gan_iteration"):
            raise ConfigError(
                f"DiscriminatorSchedule plans adversarial methods (an AdversarialMethod); "
                f"{type(pl_module).__name__} is not one"
            )
        backbone = getattr(getattr(pl_module, "discriminator", None), "backbone_parameters", None)
        if self.freeze_backbone_steps > 0 and callable(backbone):
            params = backbone()
            if params and not any(p.requires_grad for p in params):
                rank_zero_warn(
                    f"DiscriminatorSchedule(freeze_backbone_steps={self.freeze_backbone_steps}) has no effect: "
                    f"{type(pl_module).__name__}'s discriminator backbone is not trained at all (a frozen feature "
                    "network, or APT's train_d_backbone=False), so there is nothing to unfreeze later"
                )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not isinstance(outputs, dict) or not isinstance(outputs.get("plan"), StepPlan):
            return
        plan: StepPlan = outputs["plan"]
        self.iterations += 1
        self.g_updates += int(plan.update_g)
        self.d_updates += plan.d_updates
        logs = {
            "gan/d_updates": float(plan.d_updates),
            "gan/update_g": float(plan.update_g),
            "gan/r1_scale": plan.r1_scale,
            "gan/d_lr_scale": plan.d_lr_scale,
        }
        real, fake = outputs.get("real_logits"), outputs.get("fake_logits")
        if real is not None and fake is not None:
            acc_real, acc_fake = (float(a) for a in discriminator_accuracy(real, fake))
            a = self.acc_smoothing
            self.acc_real = acc_real if self.acc_real is None else a * self.acc_real + (1 - a) * acc_real
            self.acc_fake = acc_fake if self.acc_fake is None else a * self.acc_fake + (1 - a) * acc_fake
            logs.update({"gan/d_acc_real": acc_real, "gan/d_acc_fake": acc_fake})
        for key in ("d_loss", "g_loss"):
            if outputs.get(key) is not None:
                logs[f"gan/{key}"] = float(outputs[key])
        batch_size = batch["x"].shape[0] if isinstance(batch, dict) and "x" in batch else None
        pl_module.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch_size)

    # --- checkpoint state ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "g_updates": self.g_updates,
            "d_updates": self.d_updates,
            "acc_real": self.acc_real,
            "acc_fake": self.acc_fake,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.iterations = int(state_dict.get("iterations", 0))
        self.g_updates = int(state_dict.get("g_updates", 0))
        self.d_updates = int(state_dict.get("d_updates", 0))
        self.acc_real = state_dict.get("acc_real")
        self.acc_fake = state_dict.get("acc_fake")


__all__ = ["DiscriminatorSchedule", "StepPlan", "ramp", "lr_scale_at", "ratio_at"]
