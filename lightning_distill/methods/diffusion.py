"""Plain diffusion training (Ho et al. 2020; v-prediction from Salimans & Ho 2022): makes teachers.

Loss: || F_theta(x_t, t) - target ||^2 with x_t = alpha_t x + sigma_t eps, t ~ U{0..T-1}, and
target = eps, x or v according to ``prediction_type``. Optional min-SNR-gamma weighting
(Hang et al. 2023) is off by default.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..losses import denoising_loss  # lives in losses.py (DMD2's fake score uses it too); re-exported here
from ..parametrisation import Denoiser, PredictionType, VPSchedule
from ..teacher import DiffusionTeacher
from .base import DistillationMethod, LossOutput, build_module


class DiffusionTraining(DistillationMethod):
    """Train a diffusion model from scratch (no teacher): the way to make a teacher.

    Args:
        unet: the network to train (e.g. ``diffusers.UNet2DModel``), configured in YAML.
        teacher: must be None (linked from ``data.teacher`` by the CLI).
        num_train_timesteps: T of the discrete schedule.
        beta_schedule: diffusers beta schedule name.
        prediction_type: what the network learns to output.
        min_snr_gamma: optional Min-SNR-gamma loss weighting (None: plain MSE).
        rescale_betas_zero_snr: enforce zero terminal SNR (Lin et al. 2023).
        clip_sample: clamp x0 to [-1, 1] in the sampler (pixel-space models).
        sample_steps: steps of logged grids and ``predict``.
        **kwargs: :class:`DistillationMethod`'s optimiser and logging arguments (``optimizer``, ``seed``, ...).

    Example::

        >>> model = DiffusionTraining(unet=UNet2DModel(sample_size=16, in_channels=1, out_channels=1))
    """

    #: the network is ``unet`` and its output type ``prediction_type``: the base's student arguments
    #: are fixed (None), so they are neither settings nor hyper-parameters here.
    hparams_ignore = DistillationMethod.hparams_ignore + ("student", "student_prediction_type")

    def __init__(
        self,
        unet: nn.Module,
        teacher: DiffusionTeacher | None = None,
        *,
        num_train_timesteps: int = 1000,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2",
        prediction_type: PredictionType = "v_prediction",
        min_snr_gamma: float | None = None,
        rescale_betas_zero_snr: bool = False,
        clip_sample: bool = True,
        sample_steps: int = 50,
        **kwargs,
    ) -> None:
        if teacher is not None:
            raise ConfigError("DiffusionTraining trains from scratch and takes no teacher: set data.teacher to null")
        super().__init__(teacher=None, student=None, student_prediction_type=None, sample_steps=sample_steps, **kwargs)
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            clip_sample=clip_sample,
            timestep_spacing="trailing",
            set_alpha_to_one=True,
        )
        self.student_scheduler_config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        self.student = Denoiser(
            build_module(unet), VPSchedule.from_scheduler(scheduler), prediction_type, 1.0 if clip_sample else None
        )

    def compute_loss(self, batch: dict) -> LossOutput:
        x0 = batch["x"]
        t = torch.randint(0, self.student.schedule.num_train_timesteps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        cond = {"class_labels": batch["label"]} if self.is_class_conditional else {}
        loss = denoising_loss(self.student, x0, t, eps, self.hparams.min_snr_gamma, **cond)
        return LossOutput(loss, {"loss": loss})


__all__ = ["DiffusionTraining", "denoising_loss"]
