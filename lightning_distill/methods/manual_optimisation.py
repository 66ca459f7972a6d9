"""Manual optimisation for the methods that step several optimisers per iteration (the adversarial loop:
ADD, APT, DMD2): gradient clipping inside the precision plugin's step, and several optimisers stepped
from one backward pass under a changing GradScaler scale.
"""

from __future__ import annotations

import lightning as L


class ManualOptimisation(L.LightningModule):
    """Mixin of a manually optimised :class:`~lightning_distill.methods.base.DistillationMethod`."""

    def step_optimizer(self, opt, clip: float | None = None, counted: bool = True) -> None:
        """Step one optimiser of a manually optimised method, clipping its gradients' norm to ``clip``.

        The clip is applied in :meth:`on_before_optimizer_step`, which Lightning calls inside the step
        after the precision plugin has unscaled the gradients. Clipping in ``training_step`` before
        ``opt.step()`` would see the GradScaler's scaled gradients under ``16-mixed``: a limit ``c``
        would act as ``c / scale`` (scale 65536 at the start). ``counted=False`` steps through the same
        strategy / precision path without adding to ``global_step``.
        """
        self._clip_on_step = clip
        try:
            if counted:
                opt.step()
            else:
                self.trainer.strategy.optimizer_step(getattr(opt, "optimizer", opt), closure=lambda: None, model=self)
        finally:
            self._clip_on_step = None

    def step_optimizers(self, steps: list[tuple]) -> None:
        """Step several optimisers whose gradients came from one backward pass, as ``(opt, clip, counted)``.

        Under ``16-mixed`` Lightning updates the GradScaler after every step; when that changes the scale
        (it halves after an overflow and grows after ``growth_interval`` clean steps), the optimisers not
        yet stepped still hold gradients scaled by the old factor, so they are rescaled to the new one
        before the plugin unscales them.
        """
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else None  # a device sync: read once per step
        for i, (opt, clip, counted) in enumerate(steps):
            self.step_optimizer(opt, clip, counted)
            if scaler is None or i == len(steps) - 1:
                continue
            before, scale = scale, scaler.get_scale()
            if scale == before:
                continue
            ratio = scale / before
            for later, _, _ in steps[i + 1 :]:
                for group in later.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.mul_(ratio)

    def on_before_optimizer_step(self, optimizer) -> None:
        clip = getattr(self, "_clip_on_step", None)
        if clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")


__all__ = ["ManualOptimisation"]
