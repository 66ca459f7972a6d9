"""One parametrisation layer for every method (EDM's ``EDMPrecond`` idea, for VP / diffusers models).

Notation (diffusers name -> paper name):

=============================  =========================================
``alphas_cumprod[t]``          alpha_t^2 (``alpha_bar`` in DDPM)
``sqrt(alphas_cumprod[t])``    alpha_t
``sqrt(1 - alphas_cumprod)``   sigma_t
``prediction_type="epsilon"``  eps-prediction
``"sample"``                   x-prediction (x0)
``"v_prediction"``             v = alpha_t eps - sigma_t x   (Salimans & Ho 2022, Sec. 4)
=============================  =========================================

x_t = alpha_t x + sigma_t eps with alpha_t^2 + sigma_t^2 = 1, SNR = alpha^2 / sigma^2.

Timesteps are the model's integer timesteps ``0 .. T-1``; ``t = -1`` stands for clean data
(alpha = 1, sigma = 0), which is where the last DDIM step lands (diffusers' ``set_alpha_to_one``).
Methods never branch on ``prediction_type``: they call :class:`Denoiser`, which returns all three
parametrisations, and the pure functions below. A pixel-space denoiser clamps its x0 estimate as its
sampler does; ``denoiser(x_t, t, clip=False)`` is the unclamped estimate that training uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

PredictionType = Literal["epsilon", "sample", "v_prediction"]
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def expand_like(coef: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample coefficient of shape (B,) against a batch ``like`` (B, C, H, W), in its dtype.

    Example::

        >>> expand_like(schedule.alpha(t), x0) * x0   # alpha_t x0, one alpha per sample
    """
    return coef.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


_expand = expand_like  # the old private name, until every caller uses expand_like


class VPSchedule(nn.Module):
    """A discrete variance-preserving noise schedule: alpha, sigma, SNR lookups by integer timestep.

    Args:
        alphas_cumprod: (T,) tensor of alpha_bar_t, as in a diffusers scheduler.

    Example::

        >>> from diffusers import DDIMScheduler
        >>> sched = VPSchedule.from_scheduler(DDIMScheduler(num_train_timesteps=1000))
        >>> sched.alpha(torch.tensor([-1, 999])).shape
        torch.Size([2])
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        super().__init__()
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or not bool(((ac > 0) & (ac <= 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D tensor with values in (0, 1]")
        # index 0 holds t = -1 (clean data): alpha_bar = 1.
        padded = torch.cat([torch.ones(1, dtype=torch.float64), ac])
        self.register_buffer("_alphas_cumprod", padded.float(), persistent=False)

    @classmethod
    def from_scheduler(cls, scheduler) -> "VPSchedule":
        """Build from any diffusers scheduler that exposes ``alphas_cumprod`` (DDPM, DDIM, LCM, ...)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(
                f"{type(scheduler).__name__} has no alphas_cumprod; only VP (DDPM-family) schedulers are supported"
            )
        return cls(torch.as_tensor(scheduler.alphas_cumprod))

    @property
    def num_train_timesteps(self) -> int:
        return self._alphas_cumprod.numel() - 1

    @property
    def alphas_cumprod_table(self) -> Tensor:
        """alpha_bar_t for t = 0 .. T-1: a diffusers scheduler's ``alphas_cumprod`` (a view: do not modify)."""
        return self._alphas_cumprod[1:]

    def copy(self) -> "VPSchedule":
        """An independent schedule with the same alpha_bar (e.g. for a student built from a teacher)."""
        return VPSchedule(self.alphas_cumprod_table.clone())

    def alphas_cumprod(self, t: Tensor) -> Tensor:
        """alpha_bar_t looked up by timestep (t = -1 gives 1, clean data)."""
        t = torch.as_tensor(t, device=self._alphas_cumprod.device).long()
        if bool(((t < -1) | (t >= self.num_train_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [-1, {self.num_train_timesteps - 1}], got {t.tolist()}")
        return self._alphas_cumprod[t + 1]

    def alpha(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod(t).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return (1 - self.alphas_cumprod(t)).clamp_min(0).sqrt()

    def snr(self, t: Tensor) -> Tensor:
        ac = self.alphas_cumprod(t)
        return ac / (1 - ac)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha_t x0 + sigma_t eps (the forward process)."""
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.sigma(t), x0) * eps

    def trailing_timesteps(self, num_steps: int) -> Tensor:
        """The sampling grid of a ``num_steps`` sampler, 'trailing' spacing, high to low, ending at -1.

        Matches diffusers' ``timestep_spacing="trailing"`` (Lin et al. 2023, Table 2) and nests: the
        grid of N steps is every other point of the grid of 2N steps, which progressive distillation
        relies on.
        """
        T = self.num_train_timesteps
        if num_steps < 1 or num_steps > T:
            raise ValueError(f"num_steps must lie in [1, {T}], got {num_steps}")
        grid = torch.round(torch.arange(num_steps + 1, dtype=torch.float64) * (T / num_steps)).long()
        return (T - grid - 1).clamp_min(-1)


# --- conversions between eps / x0 / v (pure functions) -------------------------------------------


@dataclass
class Prediction:
    """A denoiser output in all three parametrisations, for the same x_t."""

    x0: Tensor
    eps: Tensor
    v: Tensor

    def get(self, kind: PredictionType) -> Tensor:
        return {"epsilon": self.eps, "sample": self.x0, "v_prediction": self.v}[kind]


def prediction_from_output(
    output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, kind: PredictionType, clip_x0: float | None = None
) -> Prediction:
    """Turn a network output of type ``kind`` into (x0, eps, v) at noise level (alpha, sigma).

    With ``clip_x0`` the x0 estimate is clamped and eps re-derived from it, as diffusers' schedulers do
    with ``clip_sample`` + ``use_clipped_model_output``.
    """
    a, s = expand_like(alpha, x_t), expand_like(sigma, x_t)
    if kind == "epsilon":
        eps = output
        x0 = (x_t - s * eps) / a
    elif kind == "sample":
        x0 = output
        eps = (x_t - a * x0) / s
    elif kind == "v_prediction":
        x0 = a * x_t - s * output
        eps = s * x_t + a * output
    else:
        raise ValueError(f"unknown prediction_type {kind!r}; choose one of {PREDICTION_TYPES}")
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x_t - a * x0) / s
    return Prediction(x0=x0, eps=eps, v=a * eps - s * x0)


def target_for(kind: PredictionType, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target of a network of type ``kind`` for clean x0 and noise eps."""
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return expand_like(alpha, x0) * eps - expand_like(sigma, x0) * x0
    raise ValueError(f"unknown prediction_type {kind!r}; choose one of {PREDICTION_TYPES}")


def output_for(kind: PredictionType, x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The network output of type ``kind`` that encodes the clean estimate ``x0`` at x_t."""
    a, s = expand_like(alpha, x_t), expand_like(sigma, x_t)
    eps = (x_t - a * x0) / s
    return target_for(kind, x0, eps, alpha, sigma)


def ddim_step(x0: Tensor, eps: Tensor, alpha_s: Tensor, sigma_s: Tensor) -> Tensor:
    """Deterministic DDIM (eta = 0) update to level s: z_s = alpha_s x0 + sigma_s eps (Song et al. 2021, Eq. 12)."""
    return expand_like(alpha_s, x0) * x0 + expand_like(sigma_s, x0) * eps


class Denoiser(nn.Module):
    """A diffusers UNet plus its noise schedule and prediction type: the one place that converts.

    Args:
        unet: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (or anything with the same call).
        schedule: the noise schedule the network was trained with.
        prediction_type: what the network outputs.
        clip_x0: clamp x0 estimates to [-clip_x0, clip_x0] (pixel-space models; None for latents).

    Example::

        >>> den = Denoiser(unet, VPSchedule.from_scheduler(scheduler), "epsilon", clip_x0=1.0)
        >>> pred = den(x_t, t)                     # Prediction(x0, eps, v), x0 clamped as the sampler does
        >>> x0 = den(x_t, t, clip=False).x0        # unclamped: the estimate to train on
        >>> z_s = den.ddim(x_t, t, s)              # one deterministic DDIM step
    """

    def __init__(
        self,
        unet: nn.Module,
        schedule: VPSchedule,
        prediction_type: PredictionType = "epsilon",
        clip_x0: float | None = None,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.clip_x0 = clip_x0

    def raw(self, x_t: Tensor, t: Tensor, **cond) -> Tensor:
        """The bare network output (whatever ``prediction_type`` says)."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        # t = -1 (clean) is never fed to a network; clamp keeps the call legal for the boundary.
        # A teacher held in lower precision (data.teacher_dtype) receives inputs in its own dtype.
        param = next(self.unet.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else x_t.dtype
        cond = {
            k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in cond.items()
            if v is not None
        }
        out = self.unet(x_t.to(dtype), t.clamp_min(0), **cond, return_dict=False)[0]
        return out

    def forward(self, x_t: Tensor, t: Tensor, clip: bool = True, **cond) -> Prediction:
        """The prediction at (x_t, t) in all three parametrisations, in x_t's dtype.

        Args:
            x_t: (B, ...) noisy input.
            t: (B,) integer timesteps, or one timestep for the whole batch.
            clip: apply ``clip_x0`` (when set), as the sampler does. False gives the plain conversion
                of the network output: use it wherever an estimate is trained on or regressed onto, since
                clamping zeros the gradient of every out-of-range pixel and leaves it stuck there.
            **cond: the network's conditioning (``class_labels``, ``encoder_hidden_states``, ...).
        """
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        out = self.raw(x_t, t, **cond).to(x_t.dtype)
        return prediction_from_output(
            out, x_t, self.schedule.alpha(t), self.schedule.sigma(t), self.prediction_type,
            self.clip_x0 if clip else None,
        )

    def ddim(self, x_t: Tensor, t: Tensor, s: Tensor, pred: Prediction | None = None, **cond) -> Tensor:
        """One deterministic DDIM step from timestep t to timestep s < t (s = -1 gives the x0 estimate)."""
        s = torch.as_tensor(s, device=x_t.device)
        if s.ndim == 0:
            s = s.expand(x_t.shape[0])
        pred = self(x_t, t, **cond) if pred is None else pred
        return ddim_step(pred.x0, pred.eps, self.schedule.alpha(s), self.schedule.sigma(s))
