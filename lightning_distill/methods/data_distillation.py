"""Data distillation: a one-step student regressed on the teacher's DDIM pairs (Luhman & Luhman 2021).

The teacher's knowledge is first frozen into a data set of pairs (x_T, y = F_teacher(x_T)) by
:mod:`lightning_distill.teacher_pairs` (``data.pairs`` in the config), then the student learns
s(x_T) ~= y by ordinary regression (METHODS.md section 0):

* the student starts as a copy of the teacher and is queried at the last training timestep
  t_N = T - 1 (Luhman & Luhman's code), where its input is pure noise;
* its output is read as an x0 estimate through the parametrisation layer, so any prediction type
  works (eps-prediction is ill-conditioned there, since x0 = (x - sigma eps) / alpha with alpha ~ 0:
  set ``student_prediction_type: sample`` or use a v-prediction teacher);
* loss: L1 (their CIFAR-10 setting) or L2 between the x0 estimate and the teacher's sample.

Sampling (``sample(n, steps=1)``) is one step of the stock DDIM scheduler with trailing spacing: its
single timestep is T - 1 and its single update lands on the (clipped) x0 estimate, which is exactly
:func:`one_step_sample`, so training, ``sample()`` and the exported pipeline agree.

On a flow-matching teacher t_N = T - 1 is s = 1, where x_1 = eps exactly (alpha = 0): the pairs are the
teacher's Euler samples, the student's x0 estimate is x_1 - u (its velocity output, the default), and
the one-step ``FlowMatchEulerDiscreteScheduler`` step from s = 1 to 0 is that same x_1 - u (no clipping
on the flow path). An eps-student is undefined there (x0 = (x - s eps) / alpha with alpha = 0).

Text-conditional (SD3) teachers (#23 item 2): each pair stores the token ids of the training prompt it was
sampled with (:class:`~lightning_distill.teacher_pairs.PromptPool`); the student sees the teacher's keywords
of those ids (:class:`~.text.TextToImageMixin`), samples prompts in the text pipelines' loop, and exports as
a ``StableDiffusion3Pipeline`` with the one-step ``FlowMatchEulerDiscreteScheduler`` (guidance_scale=1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..losses import Distance, regression_distance
from ..parametrisation import Denoiser
from ..teacher import DiffusionTeacher
from .base import DistillationMethod, LossOutput
from .text import TextToImageMixin


def one_step_x0(student: Denoiser, noise: Tensor, clip: bool = False, **cond) -> Tensor:
    """The student's x0 estimate from pure noise at the last timestep t_N = T - 1 (no clipping by default).

    Training uses the unclipped estimate: clipping would zero the gradient of every pixel outside
    [-1, 1]. With ``clip`` it is what the one-step DDIM sampler returns.
    """
    t = torch.full((noise.shape[0],), student.schedule.num_train_timesteps - 1, device=noise.device)
    return student(noise.float(), t, clip=clip, **cond).x0


def one_step_sample(student: Denoiser, noise: Tensor, **cond) -> Tensor:
    """What a 1-step trailing DDIM sampler (set_alpha_to_one) returns: the clipped x0 estimate."""
    return one_step_x0(student, noise, clip=True, **cond)


def pair_regression_loss(student: Denoiser, noise: Tensor, target: Tensor, distance: Distance = "l1", **cond) -> Tensor:
    """Luhman & Luhman's objective: E d(s(x_T), F_teacher(x_T)) (Sec. 3, Eq. 5 with d = L1 or L2)."""
    return regression_distance(one_step_x0(student, noise, **cond), target, distance).mean()


class DataDistillation(TextToImageMixin, DistillationMethod):
    """One-step student trained by regression on cached teacher (noise, sample) pairs.

    Needs ``data.pairs`` (teacher-data mode): batches are {"noise", "x", "label"} with x the teacher's
    DDIM sample from that noise (text teachers: also the token ids of the pair's prompt).

    Args:
        distance: ``l1`` (Luhman & Luhman on CIFAR-10) or ``l2`` (their other data sets).
        sample_steps: 1: the student is a one-step generator.
        sample_prompt: text-conditional (SD3) teachers: the prompt of logged grids and the default of
            :meth:`sample` (:class:`~lightning_distill.methods.text.TextToImageMixin`).
        **kwargs: :class:`DistillationMethod`'s arguments: ``student`` (None: a copy of the teacher, as in
            the paper), ``student_prediction_type`` (``sample`` suits eps-prediction teachers), ...

    Example::

        >>> model = DataDistillation(teacher, distance="l1")
        >>> x = model.sample(16, steps=1)
    """

    def __init__(
        self, teacher: DiffusionTeacher | None = None, *, distance: Distance = "l1", sample_steps: int = 1,
        sample_prompt: str = "", **kwargs,
    ) -> None:
        if teacher is None:
            raise ConfigError("DataDistillation needs a teacher (set data.teacher)")
        super().__init__(teacher=teacher, sample_steps=sample_steps, **kwargs)

    def compute_loss(self, batch: dict) -> LossOutput:
        if "noise" not in batch:
            raise KeyError("DataDistillation trains on teacher pairs: set data.pairs (batches need a 'noise' entry)")
        if self.text_conditional:  # the keywords of the prompt each pair was sampled with
            cond = self.text_cond(batch)
        else:
            cond = {"class_labels": batch["label"]} if self.is_class_conditional else {}
        loss = pair_regression_loss(self.student, batch["noise"], batch["x"], self.hparams.distance, **cond)
        return LossOutput(loss, {"loss": loss.detach(), self.hparams.distance: loss.detach()})


__all__ = ["DataDistillation", "one_step_x0", "one_step_sample", "pair_regression_loss"]
