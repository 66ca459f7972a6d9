"""Adversarial post-training, APT (Lin et al. 2025, arXiv 2501.08316, "Seaweed-APT").

A one-step generator, first distilled (consistency distillation) and then trained adversarially against
REAL data only: no teacher targets. Confirmed by the paper (METHODS.md section 5): the generator starts
from a consistency-distilled student; the discriminator backbone is initialised from the same
diffusion network, with extra heads on several layers producing a logit; R1 is replaced by the
approximated R1; 1-step generation. Unconfirmed starting points (tune): non-saturating loss, RMSProp
(alpha 0.9), lr around 5e-6, generator EMA around 0.995, approx-R1 lambda 100 with sigma 0.01, and
collapse if trained long, hence early stopping on FID.

Notation (paper -> code):

=======================  ===========================================================
G(z)                     :meth:`AdversarialPostTraining.generate`: the student's x0 at t = T - 1
D(x, t)                  ``discriminator``: teacher-UNet encoder copy + ``MultiLevelHeads``
x_t (D's input)          alpha_t x + sigma_t n, t ~ U{d_t_min .. d_t_max} (:meth:`discriminate`)
L_aR1                    :func:`~lightning_distill.methods.adversarial.approx_r1_penalty`
=======================  ===========================================================

Sampling and export: the stock DDIM sampler with one trailing step evaluates the student at t = T - 1
on pure noise and returns its (clipped) x0: the same map G that is trained here.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ..parametrisation import PredictionType
from ..teacher import DiffusionTeacher
from .adversarial import AdversarialMethod, Discriminator, GanLoss, Generated, UNetEncoderFeatures, unclipped_x0


def apt_optimizer(params) -> torch.optim.Optimizer:
    """RMSProp with alpha = 0.9, the APT paper's optimiser (lr unconfirmed; 5e-6 there, larger for small nets)."""
    return torch.optim.RMSprop(params, lr=5e-6, alpha=0.9)


class AdversarialPostTraining(AdversarialMethod):
    """APT: one-step generator vs a diffusion-backbone discriminator on real data, approximated R1.

    Args:
        teacher: the frozen teacher; its UNet initialises the discriminator backbone (and the generator
            when ``init_from`` is None).
        student, student_prediction_type: as :class:`DistillationMethod`.
        init_from: a consistency-distilled student to start from: a ``.ckpt`` of
            ``ConsistencyDistillation`` (or any method) or an exported pipeline folder.
        init_use_ema: take the checkpoint's sampling-EMA weights when it has them.
        d_levels: discriminator backbone levels with a head (down block indices, -1 = mid block).
        head_hidden: head width.
        spatial_logits: one logit per position instead of one per head (APT: one per head).
        d_t_min, d_t_max: range of the discriminator's noise timestep (None: T - 1).
        train_d_backbone: train the discriminator backbone (APT) or only its heads.
        generator_optimizer, discriminator_optimizer, generator_lr_scheduler, gan_loss, r1, r1_weight,
            r1_sigma, d_updates_per_g, generator_grad_clip, discriminator_grad_clip, d_augment,
            sample_every_n_steps, num_log_samples, seed: see :class:`AdversarialMethod`.
        sample_steps: steps of logged sample grids and ``predict`` (1: the trained one-step map; more
            steps run the DDIM sampler, which the generator was not trained for).

    Example::

        >>> model = AdversarialPostTraining(dm.teacher, init_from="runs/cd_digits/checkpoints/last.ckpt")
        >>> L.Trainer(callbacks=[EMA(0.995), FIDCallback(steps=[1])]).fit(model, dm)
    """

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        student: nn.Module | None = None,
        student_prediction_type: PredictionType | None = None,
        init_from: str | None = None,
        init_use_ema: bool = True,
        d_levels: list[int] | None = None,
        head_hidden: int = 64,
        spatial_logits: bool = False,
        d_t_min: int = 0,
        d_t_max: int | None = None,
        train_d_backbone: bool = True,
        generator_optimizer: OptimizerCallable = apt_optimizer,
        discriminator_optimizer: OptimizerCallable = apt_optimizer,
        generator_lr_scheduler: LRSchedulerCallable | None = None,
        gan_loss: GanLoss = "non_saturating",
        r1: Literal["true", "approx", "none"] = "approx",
        r1_weight: float = 100.0,
        r1_sigma: float = 0.01,
        d_updates_per_g: float = 1.0,
        generator_grad_clip: float | None = None,
        discriminator_grad_clip: float | None = None,
        d_augment: list[str] | None = None,
        sample_steps: int = 1,
        sample_every_n_steps: int = 0,
        num_log_samples: int = 64,
        seed: int = 0,
    ) -> None:
        if teacher is None:
            raise ValueError("AdversarialPostTraining needs a teacher (set data.teacher): it initialises the discriminator")
        super().__init__(
            teacher=teacher,
            student=student,
            student_prediction_type=student_prediction_type,
            init_from=init_from,
            init_use_ema=init_use_ema,
            generator_optimizer=generator_optimizer,
            discriminator_optimizer=discriminator_optimizer,
            generator_lr_scheduler=generator_lr_scheduler,
            gan_loss=gan_loss,
            r1=r1,
            r1_weight=r1_weight,
            r1_sigma=r1_sigma,
            d_updates_per_g=d_updates_per_g,
            generator_grad_clip=generator_grad_clip,
            discriminator_grad_clip=discriminator_grad_clip,
            d_augment=d_augment,
            sample_steps=sample_steps,
            sample_every_n_steps=sample_every_n_steps,
            num_log_samples=num_log_samples,
            seed=seed,
        )
        T = self.student.schedule.num_train_timesteps
        self.generator_timestep = int(self.student.schedule.trailing_timesteps(1)[0])  # T - 1: pure noise in
        self.d_t_max = T - 1 if d_t_max is None else d_t_max
        if not 0 <= d_t_min <= self.d_t_max < T:
            raise ValueError(f"need 0 <= d_t_min <= d_t_max < {T}, got {d_t_min}, {d_t_max}")
        backbone = UNetEncoderFeatures.trainable_copy(teacher.unet, d_levels, requires_grad=train_d_backbone)
        cond = self.is_class_conditional
        self.discriminator = Discriminator(
            backbone,
            self.sample_shape,
            hidden=head_hidden,
            spatial=spatial_logits,
            num_classes=int(self.student.unet.config.num_class_embeds) if cond else None,
            backbone_cond=cond,
        )
        self.discriminator.train()

    # --- AdversarialMethod hooks ---------------------------------------------------------------

    def generate(self, batch: dict, gen: torch.Generator) -> Generated:
        """G(z): the student's x0 estimate from pure noise at t = T - 1 (one step)."""
        x = batch["x"]
        z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        labels = self._labels(batch)
        cond = {"class_labels": labels} if labels is not None else {}
        t = torch.full((x.shape[0],), self.generator_timestep, device=x.device, dtype=torch.long)
        return Generated(unclipped_x0(self.student, z, t, **cond), labels)

    def discriminator_t_range(self) -> tuple[int, int]:
        return (self.hparams.d_t_min, self.d_t_max)


__all__ = ["AdversarialPostTraining", "apt_optimizer"]
