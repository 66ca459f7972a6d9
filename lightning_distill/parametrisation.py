"""One parametrisation layer for every method (EDM's ``EDMPrecond`` idea, for diffusers models).

Two Gaussian paths x_t = alpha_t x + sigma_t eps share one interface (:class:`NoiseSchedule`):

* variance preserving (:class:`VPSchedule`, DDPM / DDIM / LCM schedulers): alpha^2 + sigma^2 = 1;
* rectified flow (:class:`FlowSchedule`, ``FlowMatchEulerDiscreteScheduler``; SD3, Flux, SANA, Wan):
  alpha = 1 - s, sigma = s, s in [0, 1] (Liu et al. 2022; Esser et al. 2024). The flow-sigma DPM-Solver /
  UniPC configs SANA and Wan ship (``use_flow_sigmas``) are the same path: :func:`flow_matching_config`.

Notation for VP (diffusers name -> paper name):

=============================  =========================================
``alphas_cumprod[t]``          alpha_t^2 (``alpha_bar`` in DDPM)
``sqrt(alphas_cumprod[t])``    alpha_t
``sqrt(1 - alphas_cumprod)``   sigma_t
``prediction_type="epsilon"``  eps-prediction
``"sample"``                   x-prediction (x0)
``"v_prediction"``             v = alpha_t eps - sigma_t x   (Salimans & Ho 2022, Sec. 4)

``"flow_prediction"``          flow velocity u = dx_s/ds = eps - x (diffusers' DPM-Solver name for it)
=============================  =========================================

SNR = alpha^2 / sigma^2 on both paths. A zero-terminal-SNR VP schedule (``rescale_betas_zero_snr``, Lin et al.
2023) keeps its exact alpha = 0 at T - 1, as the stock samplers do; the flow path always ends there. At that
level x0 = (x_t - sigma eps) / alpha is undefined, so :class:`Denoiser` refuses eps-prediction on both.

Methods index noise levels by integer timesteps ``0 .. T-1`` on both paths; ``t = -1`` stands for
clean data (alpha = 1, sigma = 0), which is where the last DDIM / Euler step lands. On the VP path the
index is the network's timestep; on the flow path index i is diffusers' training level
s_i = shift((i + 1) / T) and the network is fed s_i * T (:meth:`NoiseSchedule.model_timestep`), as
``FlowMatchEulerDiscreteScheduler`` does. Methods never branch on the path or on ``prediction_type``:
they call :class:`Denoiser`, which returns every parametrisation, and the pure functions below.
The deterministic DDIM step (alpha_s x0 + sigma_s eps) is, on the flow path, exactly the Euler step
x_s' = x_s + (s' - s) u of ``FlowMatchEulerDiscreteScheduler``. A pixel-space denoiser clamps its x0 estimate as its
sampler does; ``denoiser(x_t, t, clip=False)`` is the unclamped estimate that training uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from . import backbones
from .errors import ConfigError

PredictionType = Literal["epsilon", "sample", "v_prediction", "flow_prediction"]
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
#: the diffusers scheduler classes each path is read from (a teacher's ``scheduler/`` folder).
VP_SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "LCMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler", "HeunDiscreteScheduler", "TCDScheduler",
)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler")
#: multistep solvers that diffusers runs on the flow path with ``use_flow_sigmas`` (SANA's folders ship DPM-Solver,
#: Wan's UniPC): read as the ``FlowMatchEulerDiscreteScheduler`` of the same path (:func:`flow_matching_config`).
FLOW_SOLVER_SCHEDULERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


def expand_like(coef: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample coefficient of shape (B,) against a batch ``like`` (B, C, H, W), in its dtype.

    Example::

        >>> expand_like(schedule.alpha(t), x0) * x0   # alpha_t x0, one alpha per sample
    """
    return coef.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


_expand = expand_like  # the old private name, until every caller uses expand_like


class NoiseSchedule(nn.Module):
    """A discrete Gaussian path x_t = alpha_t x + sigma_t eps, looked up by integer timestep t in [-1, T-1].

    Subclasses fill ``_alpha`` / ``_sigma`` tables of T + 1 entries (index 0 is t = -1, clean data) and
    say what the network is fed (:meth:`model_timestep`). Everything else is shared.
    """

    path: str = ""
    #: the path's velocity parametrisation (v on VP, u = eps - x0 on flow): stable at the pure-noise end,
    #: where eps-prediction's x0 = (x_t - sigma eps) / alpha divides by alpha ~ 0, and on the flow path
    #: the output its stock Euler sampler steps with. Progressive distillation's students default to it;
    #: the other methods keep the teacher's type (DMD2's SD 1.5 generator predicts eps, too) unless
    #: ``student_prediction_type`` says otherwise.
    velocity_prediction: str = ""

    def _set_tables(self, alpha: Tensor, sigma: Tensor) -> None:
        self.register_buffer("_alpha", alpha.float(), persistent=False)
        self.register_buffer("_sigma", sigma.float(), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return self._alpha.numel() - 1

    def _index(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=self._alpha.device).long()
        if bool(((t < -1) | (t >= self.num_train_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [-1, {self.num_train_timesteps - 1}], got {t.tolist()}")
        return t + 1

    def alpha(self, t: Tensor) -> Tensor:
        return self._alpha[self._index(t)]

    def sigma(self, t: Tensor) -> Tensor:
        return self._sigma[self._index(t)]

    def alphas_cumprod(self, t: Tensor) -> Tensor:
        """alpha_t^2 (diffusers' alpha_bar on the VP path) looked up by timestep (t = -1 gives 1)."""
        return self.alpha(t) ** 2

    def snr(self, t: Tensor) -> Tensor:
        return self.alpha(t) ** 2 / self.sigma(t) ** 2

    def model_timestep(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The timestep the network is called with at integer timestep t."""
        raise NotImplementedError

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha_t x0 + sigma_t eps (the forward process)."""
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.sigma(t), x0) * eps

    def trailing_timesteps(self, num_steps: int) -> Tensor:
        """The sampling grid of a ``num_steps`` sampler, 'trailing' spacing, high to low, ending at -1.

        Matches diffusers' ``timestep_spacing="trailing"`` (Lin et al. 2023, Table 2) and nests: the
        grid of N steps is every other point of the grid of 2N steps, which progressive distillation
        relies on. On the flow path it is s_k = shift(1 - k / N), Flux's grid, when N divides T.
        """
        T = self.num_train_timesteps
        if num_steps < 1 or num_steps > T:
            raise ValueError(f"num_steps must lie in [1, {T}], got {num_steps}")
        grid = torch.round(torch.arange(num_steps + 1, dtype=torch.float64) * (T / num_steps)).long()
        return (T - grid - 1).clamp_min(-1)

    def copy(self) -> "NoiseSchedule":  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def zero_terminal_snr(self) -> bool:
        """alpha = 0 at the last training timestep (pure noise): the flow path, or a VP schedule rescaled to zero SNR."""
        return float(self._alpha[-1]) == 0.0

    # --- continuous time (sCM's TrigFlow, MeanFlow's flow map) ------------------------------------

    def at_flow_time(self, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """alpha, sigma and the network timestep at flow time ``lam`` = sigma / (alpha + sigma) in [0, 1].

        The continuous counterpart of the integer-timestep lookups, differentiable in ``lam`` (forward-
        and reverse-mode), so that a continuous-time method can take d/d(time) of a network through its
        timestep input. Flow time is the level of the rectified-flow path with the same signal-to-noise
        ratio: z = x_t / (alpha + sigma) is then the point (1 - lam) x + lam eps of that path.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def flow_time(self, t: Tensor) -> Tensor:
        """The flow time sigma / (alpha + sigma) of integer timesteps t (-1: 0)."""
        return self.sigma(t) / (self.alpha(t) + self.sigma(t))


class VPSchedule(NoiseSchedule):
    """A discrete variance-preserving noise schedule: alpha, sigma, SNR lookups by integer timestep.

    Args:
        alphas_cumprod: (T,) tensor of alpha_bar_t, as in a diffusers scheduler.

    Example::

        >>> from diffusers import DDIMScheduler
        >>> sched = VPSchedule.from_scheduler(DDIMScheduler(num_train_timesteps=1000))
        >>> sched.alpha(torch.tensor([-1, 999])).shape
        torch.Size([2])
    """

    path = "vp"
    velocity_prediction = "v_prediction"

    def __init__(self, alphas_cumprod: Tensor) -> None:
        super().__init__()
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        # The last entry may be exactly 0 (zero terminal SNR: DDIM / DDPM / LCM with rescale_betas_zero_snr).
        # It stays 0 (alpha = 0, sigma = 1), as those samplers keep it, so sampler and Denoiser agree there.
        if ac.ndim != 1 or ac.numel() < 1 or not bool((ac[:-1] > 0).all() and ac[-1] >= 0 and (ac <= 1).all()):
            raise ValueError(
                "alphas_cumprod must be a 1-D tensor with values in (0, 1] (the last may be 0: zero terminal SNR)"
            )
        # index 0 holds t = -1 (clean data): alpha_bar = 1.
        padded = torch.cat([torch.ones(1, dtype=torch.float64), ac])
        self.register_buffer("_alphas_cumprod", padded.float(), persistent=False)
        self._set_tables(padded.float().sqrt(), (1 - padded.float()).clamp_min(0).sqrt())

    @classmethod
    def from_scheduler(cls, scheduler) -> "VPSchedule":
        """Build from any diffusers scheduler that exposes ``alphas_cumprod`` (DDPM, DDIM, LCM, ...)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(
                f"{type(scheduler).__name__} has no alphas_cumprod; only VP (DDPM-family) schedulers are supported"
            )
        return cls(torch.as_tensor(scheduler.alphas_cumprod))

    @property
    def alphas_cumprod_table(self) -> Tensor:
        """alpha_bar_t for t = 0 .. T-1: a diffusers scheduler's ``alphas_cumprod`` (a view: do not modify)."""
        return self._alphas_cumprod[1:]

    def copy(self) -> "VPSchedule":
        """An independent schedule with the same alpha_bar (e.g. for a student built from a teacher)."""
        return VPSchedule(self.alphas_cumprod_table.clone())

    def alphas_cumprod(self, t: Tensor) -> Tensor:
        return self._alphas_cumprod[self._index(t)]

    def snr(self, t: Tensor) -> Tensor:
        ac = self.alphas_cumprod(t)
        return ac / (1 - ac)

    def model_timestep(self, t: Tensor) -> Tensor:
        # t = -1 (clean) is never fed to a network; clamp keeps the call legal for the boundary.
        return torch.as_tensor(t).clamp_min(0)

    def at_flow_time(self, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # alpha^2 + sigma^2 = 1 with sigma / alpha = lam / (1 - lam).
        norm = ((1 - lam) ** 2 + lam**2).sqrt()
        alpha, sigma = (1 - lam) / norm, lam / norm
        # The network only knows the table's timesteps 0 .. T-1: a fractional timestep interpolates
        # linearly in flow time between neighbours (ascending in t), clamped to the table's ends.
        table = self._sigma[1:] / (self._alpha[1:] + self._sigma[1:])
        hi = torch.searchsorted(table, lam.detach().contiguous()).clamp(1, table.numel() - 1)
        lo_lam, hi_lam = table[hi - 1], table[hi]
        frac = ((lam - lo_lam) / (hi_lam - lo_lam)).clamp(0, 1)  # beyond either end: the end timestep
        return alpha, sigma, (hi - 1).to(lam.dtype) + frac


def flow_shift(s: Tensor, shift: float) -> Tensor:
    """SD3's static timestep shift s -> shift s / (1 + (shift - 1) s) (Esser et al. 2024, Eq. 23).

    Flux's resolution-dependent shift e^mu / (e^mu + 1/s - 1) is the same map with shift = e^mu.
    """
    return shift * s / (1 + (shift - 1) * s)


def dynamic_shift(image_seq_len: int, config: dict) -> float:
    """The static shift equal to a ``use_dynamic_shifting`` scheduler's at ``image_seq_len`` tokens.

    mu grows linearly from ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at
    ``max_image_seq_len`` (Flux's ``calculate_shift``); exponential time shifting is shift = e^mu,
    linear time shifting is shift = mu.
    """
    import math

    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    mu = base + (top - base) * (image_seq_len - base_len) / (max_len - base_len)
    return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu


class FlowSchedule(NoiseSchedule):
    """The rectified-flow path x_s = (1 - s) x + s eps on diffusers' discrete training levels.

    Integer timestep i in [0, T-1] is the level s_i = shift((i + 1) / T) of
    ``FlowMatchEulerDiscreteScheduler``'s training table (``scheduler.sigmas``, ascending), and the
    network is fed s_i * T; i = -1 is clean data (s = 0).

    Args:
        num_train_timesteps: T.
        shift: the static timestep shift (1: none; SD3 uses 3.0).
        linspace_sigmas: how the network's stock pipeline sets N sampling steps (read by
            :func:`~lightning_distill.sampling.set_pipeline_steps`): True, ``set_timesteps(sigmas=linspace(1, 1/N, N),
            mu=mu)``, i.e. the levels shift(1 - k/N), as ``FluxPipeline`` does; False, ``set_timesteps(N)``, diffusers'
            shifted grid stretched down to its smallest training level, as ``DDPMPipeline`` and
            ``StableDiffusion3Pipeline`` do. :meth:`from_scheduler` sets it for a ``use_dynamic_shifting`` config
            (Flux's); :class:`~lightning_distill.teacher.DiffusionTeacher` from the network's pipeline.

    Example::

        >>> sched = FlowSchedule(1000, shift=3.0)
        >>> sched.sigma(torch.tensor([-1, 999]))       # tensor([0., 1.])
    """

    path = "flow"
    velocity_prediction = "flow_prediction"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, linspace_sigmas: bool = False) -> None:
        super().__init__()
        if num_train_timesteps < 1 or shift <= 0:
            raise ValueError(f"FlowSchedule needs num_train_timesteps >= 1 and shift > 0, got {num_train_timesteps}, {shift}")
        self.shift = float(shift)
        self.linspace_sigmas = bool(linspace_sigmas)
        levels = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        sigma = flow_shift(levels, self.shift)
        self._set_tables(1 - sigma, sigma)
        self.register_buffer("_timestep", (sigma * num_train_timesteps).float(), persistent=False)

    @classmethod
    def from_scheduler(cls, scheduler, image_seq_len: int | None = None) -> "FlowSchedule":
        """Build from a ``FlowMatch*`` scheduler; a dynamically shifting one needs ``image_seq_len`` and is taken
        for the Flux family's (``linspace_sigmas``). A flow-sigma DPM-Solver / UniPC config is read as
        :func:`flow_matching_config` says."""
        scheduler = as_flow_matching(scheduler)
        cfg = dict(scheduler.config)
        shift = float(cfg.get("shift", 1.0))
        if cfg.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise ValueError(
                    f"{type(scheduler).__name__} shifts with the resolution (use_dynamic_shifting): "
                    "the image token count is needed to fix its shift"
                )
            shift = dynamic_shift(image_seq_len, cfg)
        return cls(int(cfg["num_train_timesteps"]), shift, linspace_sigmas=bool(cfg.get("use_dynamic_shifting")))

    def copy(self) -> "FlowSchedule":
        return FlowSchedule(self.num_train_timesteps, self.shift, self.linspace_sigmas)

    def model_timestep(self, t: Tensor) -> Tensor:
        return self._timestep[self._index(t)]

    def at_flow_time(self, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # The path itself: the network is fed s * T at any level s (shift only moves the table's levels).
        return 1 - lam, lam, lam * self.num_train_timesteps


def flow_matching_config(class_name: str, config) -> dict | None:
    """The ``FlowMatchEulerDiscreteScheduler`` config of the path a flow-sigma solver config samples; None for a
    config without ``use_flow_sigmas`` (read as it is).

    SANA's folders ship ``DPMSolverMultistepScheduler``, Wan's ``UniPCMultistepScheduler``, with
    ``use_flow_sigmas: true``, ``prediction_type: flow_prediction`` and ``flow_shift`` (3.0, 4.0, ...). In
    diffusers 0.42.1 (``set_timesteps``, ``_sigma_to_alpha_sigma_t``, ``convert_model_output``) both then

    * step on x_s = (1 - s) x + s eps (alpha = 1 - sigma, sigma = s) with the network's velocity u
      (DPM-Solver++'s data prediction x0 = x_s - s u); their ``alphas_cumprod`` table (betas) is never read;
    * visit levels s = shift u / (1 + (shift - 1) u) with shift = ``flow_shift``, the static shift of
      ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)`` (:func:`flow_shift`), at N steps spaced as
      DPM-Solver u = k (1 - 1/T) / N for k = N .. 1, UniPC u = 1 - k (1 - 1/T) / N for k = 0 .. N - 1 (its first
      level nudged to s = 1 - 1e-6, against log(0) in its update), then s = 0;
    * call the network with the timestep s T, cast to int64 (truncated: SANA at T = 1000, shift 3, gets 999 for
      s = 0.99967); FlowMatchEulerDiscreteScheduler and the framework feed s T itself.

    So the path is ``FlowSchedule(num_train_timesteps, shift=flow_shift)``; only the grid and the solver differ,
    and the framework samples with its own flow samplers (Euler / ``FlowMatchLCMScheduler`` on its trailing grid),
    whatever the grid options say (``timestep_spacing``, ``use_karras_sigmas``, ``shift_terminal``,
    ``final_sigmas_type``, ``solver_order``). ``time_shift_type`` only applies with ``use_dynamic_shifting``.

    Args:
        class_name: the scheduler's class (``_class_name``).
        config: its config (a ``scheduler.config`` or the JSON's dict).

    Returns:
        ``{"num_train_timesteps": T, "shift": flow_shift}``, or None without ``use_flow_sigmas``.

    Raises:
        ValueError, one line naming the supported configs, for what does not map: ``use_flow_sigmas`` on another
        class, a prediction other than the velocity, or ``use_dynamic_shifting`` (the shift is then
        exp(mu) / mu with the pipeline's mu, which the config does not fix).

    Example::

        >>> flow_matching_config("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0,
        ...                      "prediction_type": "flow_prediction", "num_train_timesteps": 1000})
        {'num_train_timesteps': 1000, 'shift': 3.0}
    """
    config = dict(config or {})
    if not config.get("use_flow_sigmas"):
        return None
    supported = (f"supported flow-sigma configs: {' or '.join(FLOW_SOLVER_SCHEDULERS)} with use_flow_sigmas, "
                 "prediction_type flow_prediction and a static flow_shift; flow-matching: " + ", ".join(FLOW_SCHEDULERS))
    if class_name not in FLOW_SOLVER_SCHEDULERS:
        raise ValueError(f"scheduler {class_name} with use_flow_sigmas is not supported; {supported}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "flow_prediction":
        raise ValueError(f"scheduler {class_name} with use_flow_sigmas and prediction_type {prediction!r} is not "
                         f"supported (a flow teacher predicts the velocity); {supported}")
    if config.get("use_dynamic_shifting"):
        raise ValueError(f"scheduler {class_name} with use_flow_sigmas and use_dynamic_shifting (its shift comes from "
                         f"the pipeline's mu, time_shift_type {config.get('time_shift_type', 'exponential')!r}) is not "
                         f"supported; {supported}")
    return {"num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
            "shift": float(config.get("flow_shift", 1.0))}


def as_flow_matching(scheduler):
    """``scheduler`` itself, or, for a flow-sigma solver (:func:`flow_matching_config`), the
    ``FlowMatchEulerDiscreteScheduler`` of the same path: what the framework reads a teacher's scheduler as and
    builds its own samplers from. Raises ValueError for a flow-sigma config that does not map."""
    cfg = flow_matching_config(type(scheduler).__name__, getattr(scheduler, "config", None))
    if cfg is None:
        return scheduler
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(cfg)


def schedule_from_scheduler(scheduler, image_seq_len: int | None = None) -> NoiseSchedule:
    """The path of a diffusers scheduler instance: :class:`FlowSchedule` for ``FlowMatch*`` classes and flow-sigma
    DPM-Solver / UniPC configs (:func:`flow_matching_config`), :class:`VPSchedule` for the DDPM family. Raises
    ValueError naming the supported classes otherwise."""
    scheduler = as_flow_matching(scheduler)  # before the VP test: a flow-sigma solver has a (VP) alphas_cumprod too
    name = type(scheduler).__name__
    if name in FLOW_SCHEDULERS:
        return FlowSchedule.from_scheduler(scheduler, image_seq_len)
    if name in VP_SCHEDULERS or hasattr(scheduler, "alphas_cumprod"):
        return VPSchedule.from_scheduler(scheduler)
    raise ValueError(
        f"scheduler {name} is not supported; flow-matching: {', '.join(FLOW_SCHEDULERS)}; "
        f"variance-preserving: {', '.join(VP_SCHEDULERS)}"
    )


# --- conversions between eps / x0 / v (pure functions) -------------------------------------------


@dataclass
class Prediction:
    """A denoiser output in every parametrisation, for the same x_t."""

    x0: Tensor
    eps: Tensor
    v: Tensor

    @property
    def flow(self) -> Tensor:
        """The flow velocity u = eps - x0 (the rectified-flow network output)."""
        return self.eps - self.x0

    def get(self, kind: PredictionType) -> Tensor:
        if kind == "flow_prediction":
            return self.flow
        return {"epsilon": self.eps, "sample": self.x0, "v_prediction": self.v}[kind]


def _check_kind(kind: str) -> None:
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {kind!r}; choose one of {PREDICTION_TYPES}")



def cfg_prediction(cond: Prediction, uncond: Prediction, w: Tensor) -> Prediction:
    """Classifier-free guidance in the LCM convention: cond + w (cond - uncond), for x0, eps and v alike.

    All three parametrisations are linear in (x0, eps) at a fixed x_t, so guiding each keeps them
    consistent (v = alpha eps - sigma x0 still holds). w = 0 is the conditional model; the pipelines'
    guidance scale g (uncond + g (cond - uncond)) is w = g - 1.
    """
    def guide(c: Tensor, u: Tensor) -> Tensor:
        wb = w.reshape(-1, *([1] * (c.ndim - 1))).to(c.dtype)
        return c + wb * (c - u)

    return Prediction(guide(cond.x0, uncond.x0), guide(cond.eps, uncond.eps), guide(cond.v, uncond.v))

def prediction_from_output(
    output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, kind: PredictionType, clip_x0: float | None = None
) -> Prediction:
    """Turn a network output of type ``kind`` into (x0, eps, v) at noise level (alpha, sigma).

    Valid on any Gaussian path x_t = alpha x0 + sigma eps. v = alpha eps - sigma x0 inverts as
    x0 = (alpha x_t - sigma v) / d, eps = (sigma x_t + alpha v) / d with d = alpha^2 + sigma^2 (d = 1 on
    the VP path, the familiar x0 = alpha x_t - sigma v); the flow velocity u = eps - x0 inverts as
    x0 = (x_t - sigma u) / (alpha + sigma), i.e. x0 = x_t - s u on the flow path.
    With ``clip_x0`` the x0 estimate is clamped and eps re-derived from it, as diffusers' schedulers do
    with ``clip_sample`` + ``use_clipped_model_output``.
    """
    _check_kind(kind)
    a, s = expand_like(alpha, x_t), expand_like(sigma, x_t)
    if kind == "epsilon":
        eps = output
        x0 = (x_t - s * eps) / a
    elif kind == "sample":
        x0 = output
        eps = (x_t - a * x0) / s
    elif kind == "v_prediction":
        d = a * a + s * s  # 1 on the VP path; not on the flow path, where a + s = 1
        x0 = (a * x_t - s * output) / d
        eps = (s * x_t + a * output) / d
    else:  # flow_prediction
        x0 = (x_t - s * output) / (a + s)
        eps = output + x0
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x_t - a * x0) / s
    return Prediction(x0=x0, eps=eps, v=a * eps - s * x0)


def target_for(kind: PredictionType, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target of a network of type ``kind`` for clean x0 and noise eps."""
    _check_kind(kind)
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return expand_like(alpha, x0) * eps - expand_like(sigma, x0) * x0
    return eps - x0


def output_for(kind: PredictionType, x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The network output of type ``kind`` that encodes the clean estimate ``x0`` at x_t."""
    a, s = expand_like(alpha, x_t), expand_like(sigma, x_t)
    eps = (x_t - a * x0) / s
    return target_for(kind, x0, eps, alpha, sigma)


def ddim_step(x0: Tensor, eps: Tensor, alpha_s: Tensor, sigma_s: Tensor) -> Tensor:
    """Deterministic DDIM (eta = 0) update to level s: z_s = alpha_s x0 + sigma_s eps (Song et al. 2021, Eq. 12).

    On the flow path this is the Euler step x_s + (s' - s) u of ``FlowMatchEulerDiscreteScheduler``.
    """
    return expand_like(alpha_s, x0) * x0 + expand_like(sigma_s, x0) * eps


class Denoiser(nn.Module):
    """A diffusers network plus its noise schedule and prediction type: the one place that converts.

    Args:
        unet: the denoising network: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (or anything
            with the same call), or a transformer of :data:`lightning_distill.backbones.SUPPORTED`; the
            attribute keeps the name ``unet`` whatever the backbone (every method reads it).
        schedule: the path the network was trained on (:class:`VPSchedule` or :class:`FlowSchedule`).
        prediction_type: what the network outputs.
        clip_x0: clamp x0 estimates to [-clip_x0, clip_x0] (pixel-space models; None for latents).

    Example::

        >>> den = Denoiser(unet, VPSchedule.from_scheduler(scheduler), "epsilon", clip_x0=1.0)
        >>> pred = den(x_t, t)                     # Prediction(x0, eps, v), x0 clamped as the sampler does
        >>> x0 = den(x_t, t, clip=False).x0        # unclamped: the estimate to train on
        >>> z_s = den.ddim(x_t, t, s)              # one deterministic DDIM (flow path: Euler) step
    """

    def __init__(
        self,
        unet: nn.Module,
        schedule: NoiseSchedule,
        prediction_type: PredictionType = "epsilon",
        clip_x0: float | None = None,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
        if prediction_type == "epsilon" and schedule.zero_terminal_snr:
            raise ConfigError(
                f"prediction_type 'epsilon' is undefined at the last timestep of a zero-terminal-SNR schedule "
                f"(alpha = 0: x0 = (x_t - sigma eps) / alpha); choose one of {(schedule.velocity_prediction, 'sample')}"
            )
        backbones.backbone_for(unet)  # an unsupported diffusers model fails here, not at its first call
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.clip_x0 = clip_x0

    @property
    def path(self) -> str:
        """"vp" or "flow": the schedule's path."""
        return self.schedule.path

    def raw(self, x_t: Tensor, t: Tensor, **cond) -> Tensor:
        """The bare network output (whatever ``prediction_type`` says) at integer timestep t."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.network(x_t, self.schedule.model_timestep(t), **cond)

    def network(self, x_t: Tensor, model_t: Tensor, **cond) -> Tensor:
        """The network called with its own timestep (a sampler's ``scheduler.timesteps`` entry)."""
        model_t = torch.as_tensor(model_t, device=x_t.device)
        if model_t.ndim == 0:
            model_t = model_t.expand(x_t.shape[0])
        # A teacher held in lower precision (data.teacher_dtype) receives inputs in its own dtype.
        param = next(self.unet.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else x_t.dtype
        cond = {
            k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in cond.items()
            if v is not None
        }
        # The backbone adapter maps this one call onto the model's forward (names, timestep units,
        # Flux's packing, DiT's learned-sigma half); a UNet is called model(x_t, model_t, **cond) as before.
        return backbones.call(self.unet, x_t.to(dtype), model_t, **cond)

    def at_flow_time(self, x_t: Tensor, lam: Tensor, **cond) -> Prediction:
        """The unclamped prediction at a continuous level: flow time ``lam`` (B,) in [0, 1], x_t on this path.

        See :meth:`NoiseSchedule.at_flow_time`; differentiable in ``lam`` through the network's timestep
        input, for continuous-time methods (sCD, MeanFlow).
        """
        alpha, sigma, model_t = self.schedule.at_flow_time(lam)
        out = self.network(x_t, model_t, **cond).to(x_t.dtype)
        return prediction_from_output(out, x_t, alpha, sigma, self.prediction_type)

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
        """One deterministic DDIM (flow: Euler) step from timestep t to s < t (s = -1 gives the x0 estimate)."""
        s = torch.as_tensor(s, device=x_t.device)
        if s.ndim == 0:
            s = s.expand(x_t.shape[0])
        pred = self(x_t, t, **cond) if pred is None else pred
        return ddim_step(pred.x0, pred.eps, self.schedule.alpha(s), self.schedule.sigma(s))
