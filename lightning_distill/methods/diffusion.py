"""Plain diffusion training (Ho et al. 2020; v-prediction from Salimans & Ho 2022) and flow matching
(Lipman et al. 2023; Liu et al. 2022; SD3's recipe, Esser et al. 2024): makes teachers.

Loss: || F_theta(x_t, t) - target ||^2 with x_t = alpha_t x + sigma_t eps and target = eps, x, v or
the flow velocity eps - x according to ``prediction_type``.

* ``path="vp"``: a DDIM scheduler, t ~ U{0..T-1}; optional min-SNR-gamma weighting (Hang et al. 2023).
* ``path="flow"``: x_s = (1 - s) x + s eps, velocity MSE, a ``FlowMatchEulerDiscreteScheduler``;
  the level is drawn uniformly or logit-normally (u = sigmoid(n), n ~ N(m, std); SD3's default
  m = 0, std = 1) and then shifted, as diffusers' SD3 training script does.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..losses import denoising_loss  # lives in losses.py (DMD2's fake score uses it too); re-exported here
from ..parametrisation import Denoiser, FlowSchedule, PredictionType, VPSchedule
from ..teacher import DiffusionTeacher
from .base import DistillationMethod, LossOutput, build_module


class DiffusionTraining(DistillationMethod):
    """Train a diffusion model from scratch (no teacher): the way to make a teacher.

    Args:
        unet: the network to train (e.g. ``diffusers.UNet2DModel``), configured in YAML.
        teacher: must be None (linked from ``data.teacher`` by the CLI).
        path: "vp" (variance preserving, DDIM sampler) or "flow" (rectified flow, Euler sampler).
        num_train_timesteps: T of the discrete schedule.
        beta_schedule: diffusers beta schedule name (VP).
        prediction_type: what the network learns to output (VP; the flow path learns the velocity,
            ``flow_prediction``).
        shift: the flow path's static timestep shift (1: none; SD3 uses 3.0 at 1024 px).
        timestep_sampling: how training levels are drawn: "uniform" or "logit_normal" (flow path only).
        logit_mean, logit_std: the logit-normal's m and std.
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
        path: Literal["vp", "flow"] = "vp",
        num_train_timesteps: int = 1000,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2",
        prediction_type: PredictionType = "v_prediction",
        shift: float = 1.0,
        timestep_sampling: Literal["uniform", "logit_normal"] = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        min_snr_gamma: float | None = None,
        rescale_betas_zero_snr: bool = False,
        clip_sample: bool = True,
        sample_steps: int = 50,
        **kwargs,
    ) -> None:
        if teacher is not None:
            raise ConfigError("DiffusionTraining trains from scratch and takes no teacher: set data.teacher to null")
        super().__init__(teacher=None, student=None, student_prediction_type=None, sample_steps=sample_steps, **kwargs)
        if path not in ("vp", "flow"):
            raise ConfigError(f"path must be 'vp' or 'flow', got {path!r}")
        if timestep_sampling not in ("uniform", "logit_normal"):
            raise ConfigError(f"timestep_sampling must be 'uniform' or 'logit_normal', got {timestep_sampling!r}")
        if path == "vp" and timestep_sampling != "uniform":
            raise ConfigError("timestep_sampling='logit_normal' is a flow-matching recipe: set path: flow or use 'uniform'")
        if path == "flow":
            from diffusers import FlowMatchEulerDiscreteScheduler

            if prediction_type not in ("flow_prediction", "v_prediction"):  # v_prediction: the default, unset
                raise ConfigError(f"path 'flow' trains the flow velocity: set prediction_type to flow_prediction, not {prediction_type!r}")
            prediction_type = self.hparams.prediction_type = "flow_prediction"
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
            schedule, clip = FlowSchedule.from_scheduler(scheduler), None  # flow samplers never clamp
        else:
            from diffusers import DDIMScheduler

            if prediction_type == "flow_prediction":
                raise ConfigError("prediction_type flow_prediction needs path: flow")
            scheduler = DDIMScheduler(
                num_train_timesteps=num_train_timesteps,
                beta_schedule=beta_schedule,
                prediction_type=prediction_type,
                rescale_betas_zero_snr=rescale_betas_zero_snr,
                clip_sample=clip_sample,
                timestep_spacing="trailing",
                set_alpha_to_one=True,
            )
            schedule, clip = VPSchedule.from_scheduler(scheduler), 1.0 if clip_sample else None
        self.student_scheduler_config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        self.student = Denoiser(build_module(unet), schedule, prediction_type, clip)

    def training_timesteps(self, n: int, device) -> torch.Tensor:
        """n training timesteps: uniform over 0..T-1, or logit-normal levels u = sigmoid(N(m, std)) on the
        unshifted grid (index floor(u T)), shifted by the schedule's table as in diffusers' SD3 script."""
        T = self.student.schedule.num_train_timesteps
        if self.hparams.timestep_sampling == "uniform":
            return torch.randint(0, T, (n,), device=device)
        u = torch.sigmoid(self.hparams.logit_mean + self.hparams.logit_std * torch.randn(n, device=device))
        return (u * T).long().clamp(0, T - 1)

    def compute_loss(self, batch: dict) -> LossOutput:
        x0 = batch["x"]
        t = self.training_timesteps(x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        cond = {"class_labels": batch["label"]} if self.is_class_conditional else {}
        loss = denoising_loss(self.student, x0, t, eps, self.hparams.min_snr_gamma, **cond)
        return LossOutput(loss, {"loss": loss})


__all__ = ["DiffusionTraining", "denoising_loss"]
