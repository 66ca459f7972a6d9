"""Continuous-time consistency distillation, sCD (Lu & Song 2024, arXiv 2410.11081), on TrigFlow.

TrigFlow (Sec. 2): x_t = cos(t) x + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2]. A network F gives the
probability-flow ODE dx_t/dt = sigma_d F(x_t / sigma_d, t) and the consistency model

    f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t)              (Eq. 6)

so f(x, 0) = x holds by construction. Any Gaussian path x_p = alpha x + sigma eps is TrigFlow after a time
change and a scale (Sec. 4, METHODS.md section 8): tan(t) = sigma / (sigma_d alpha) and
x_t = k x_p with k = cos(t) / alpha = sigma_d / sqrt(sigma_d^2 alpha^2 + sigma^2). The teacher and the
student are therefore the framework's :class:`~lightning_distill.parametrisation.Denoiser` s on their own
path, read at the continuous level of the same signal-to-noise ratio
(:meth:`~lightning_distill.parametrisation.NoiseSchedule.at_flow_time`), and turned into F by

    F = cos(t) eps_hat - sin(t) x_hat / sigma_d          (:func:`trigflow_output`)

(from d/dt [cos(t) x + sin(t) sigma_d eps] = sigma_d F); f is then exactly the denoiser's x0 estimate. VP
and flow-matching teachers both serve, and the student keeps its teacher's network, timestep input and
prediction type, so it samples and exports with the path's stock x0 sampler (``LCMScheduler`` /
``FlowMatchLCMScheduler``), as discrete consistency distillation does.

Training (Algorithm 1, distillation): draw t with tan(t) = e^tau / sigma_d, tau ~ N(P_mean, P_std^2); take
the teacher's dx_t/dt = sigma_d F_teacher; take the total derivative of the stop-gradient student along the
ODE, dF_theta-/dt, by one forward-mode JVP with tangents (dx_t/dt, 1) in (x_t, t) (it runs through the
network's timestep input, so the c_noise(t) factor of the paper is included); then

    g = -cos^2(t) (sigma_d F- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF-/dt)       (Eq. 8 with w = 1/(sigma_d tan t))
    L = e^{-w_phi(t)} mean(|| F_theta - F- - g / (||g|| + c) ||^2) + w_phi(t)         (Sec. 4.2, 4.3)

whose gradient is the continuous-time consistency gradient (cos(t) df-/dt = g). The stabilisers of Sec.
4.2-4.3 are here: tangent warm-up r = min(1, step / ``tangent_warmup_steps``), tangent normalisation with
c = ``tangent_norm_const`` (the per-sample L2 norm over all pixels), and the adaptive weight w_phi(t), a
linear layer on Fourier features of log(sigma_d tan t) (log of the noise-to-signal ratio), learned
jointly with the student (its minimiser is the log of the per-t mean loss).

Notation (paper -> code):

=======================  ===================================================================
sigma_d                  ``sigma_data``
t (TrigFlow time)        ``t``; flow time lam = sigma / (alpha + sigma) (:func:`flow_time_of_trigflow`)
F_theta, F_theta-        ``trigflow_output(student, ...)`` with and without gradient
dx_t/dt                  ``dxt_dt`` = sigma_d F_teacher
dF_theta-/dt             ``dF_dt`` (:func:`trigflow_jvp`: ``torch.func.jvp`` or central differences)
r (tangent warm-up)      ``warmup``
w_phi(t)                 :class:`AdaptiveWeight` (the paper's "logvar")
=======================  ===================================================================

Where the code knowingly differs: the paper's network changes (positional time embedding with small scale,
adaptive double normalisation) cannot be applied to a teacher-initialised diffusers UNet; the student keeps
its teacher's time input (for the digits teachers a sinusoidal embedding of timesteps 0-1000, trained at
integer timesteps only). Its exact time derivative is dominated by wiggles a few timesteps wide that no
sampler visits (on the digits teachers the exact tangent g and one smoothed over 0.02 rad agree in
direction to a mean cosine of 0.40-0.48: ``benchmarks/scm_time_derivative.py``). The digits presets
therefore take dF/dt by central differences over 0.02 rad (``jvp: finite_difference``,
``finite_difference_step: 0.02``); with c = 1.6 this gave a 6-8x lower FD at step 500 than the JVP with
c = 0.1 (one seed, flow teacher). The exported ``LCMScheduler`` (VP) applies its boundary scalings with
``timestep_scaling`` 1000, which at the sampled timesteps t >= 1 are c_skip < 3e-7: the sampler uses the
student's x0 estimate f as it is.

Forward-mode AD and attention: PyTorch's fused attention kernels (flash / memory-efficient on GPU, the
flash kernel on CPU) have no forward-mode derivative; ``nn_utils.forward_ad_attention`` selects the math
kernel for the JVP, which supports it on every device at the math kernel's memory cost (O(tokens^2) per
head). For large models use ``jvp="finite_difference"``, which calls the network twice with any kernel.

Text-conditional (SD3) teachers (#23 item 2): student and teacher see the batch's prompt keywords
(:class:`~.text.TextToImageMixin`, the plain conditional teacher, no guidance); the prompt keywords are
constants of the JVP (tangents only in x_t and t). Forward-mode AD goes through ``SD3Transformer2DModel``
(its joint attention under the math kernel; checked against central differences on the tiny SD3 stack);
the export is a ``StableDiffusion3Pipeline`` with the ``FlowMatchLCMScheduler`` above, called with
``guidance_scale=1``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..nn_utils import JVP_MODES, JVPMode, forward_ad_attention
from ..parametrisation import Denoiser, expand_like
from ..sampling import X0_SAMPLER_TIMESTEP_SCALING, lcm_scheduler
from ..teacher import DiffusionTeacher
from .base import DistillationMethod, LossOutput
from .text import TextToImageMixin


# --- TrigFlow <-> the teacher's path (pure functions) -------------------------------------------


def trigflow_time(lam: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow time of flow time ``lam``: tan(t) = sigma / (sigma_d alpha) = lam / ((1 - lam) sigma_d)."""
    return torch.atan2(lam, (1 - lam) * sigma_data)


def flow_time_of_trigflow(t: Tensor, sigma_data: float) -> Tensor:
    """Inverse of :func:`trigflow_time`: lam = sigma_d sin(t) / (cos(t) + sigma_d sin(t))."""
    s = sigma_data * torch.sin(t)
    return s / (torch.cos(t) + s)


def trigflow_scale(alpha: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """k with x_t(TrigFlow) = k x_p for a path point x_p = alpha x + sigma eps: sigma_d / sqrt(sigma_d^2 alpha^2 + sigma^2)."""
    return sigma_data / (sigma_data**2 * alpha**2 + sigma**2).sqrt()


def trigflow_range(schedule, sigma_data: float) -> tuple[float, float]:
    """The TrigFlow times of a teacher's lowest and highest training levels, inside (0, pi/2) (both ends are
    singular for the conversion to its path). Beyond them the network's timestep input pins at its table's
    end while alpha and sigma keep moving (a non-zero-terminal-SNR VP teacher, SD 1.5: t <= 1.537)."""
    ends = schedule.flow_time(torch.tensor([0, schedule.num_train_timesteps - 1]))
    lo, hi = trigflow_time(ends.double(), sigma_data).tolist()
    return max(lo, 1e-6), min(hi, math.pi / 2 - 1e-6)


def sample_trigflow_time(
    n: int, p_mean: float, p_std: float, sigma_data: float, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2): EDM's log-normal noise levels in TrigFlow time."""
    tau = torch.randn(n, generator=generator, device=device) * p_std + p_mean
    return torch.atan(tau.exp() / sigma_data)


def trigflow_output(den: Denoiser, x_t: Tensor, t: Tensor, sigma_data: float, **cond) -> Tensor:
    """F(x_t / sigma_d, t) of a denoiser on any path: read at the level with the same SNR, then
    F = cos(t) eps_hat - sin(t) x_hat / sigma_d. Differentiable in x_t and t (both modes)."""
    lam = flow_time_of_trigflow(t, sigma_data)
    alpha, sigma, _ = den.schedule.at_flow_time(lam)
    k = trigflow_scale(alpha, sigma, sigma_data)
    pred = den.at_flow_time(x_t / expand_like(k, x_t), lam, **cond)
    return expand_like(torch.cos(t), x_t) * pred.eps - expand_like(torch.sin(t) / sigma_data, x_t) * pred.x0


def consistency_function(x_t: Tensor, t: Tensor, F: Tensor, sigma_data: float) -> Tensor:
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F (Eq. 6); equals the denoiser's x0 estimate."""
    return expand_like(torch.cos(t), x_t) * x_t - expand_like(torch.sin(t) * sigma_data, x_t) * F


def trigflow_jvp(
    F: Callable[[Tensor, Tensor], Tensor], x_t: Tensor, t: Tensor, dxt_dt: Tensor,
    mode: JVPMode = "forward", step: float = 1e-4, t_range: tuple[float, float] = (1e-6, math.pi / 2 - 1e-6),
) -> tuple[Tensor, Tensor]:
    """(F(x_t, t), dF/dt) with dF/dt = dF/dx . dx_t/dt + dF/dt, the total derivative along the ODE.

    ``forward``: one ``torch.func.jvp`` with tangents (dx_t/dt, 1). ``finite_difference``: central
    differences (F(x + h dx, t + h) - F(x - h dx, t - h)) / 2h with h = ``step`` (in radians), for
    networks whose kernels lack forward-mode support; F(x_t, t) is then a third call. t +- h stay in
    ``t_range`` (:func:`trigflow_range`), one-sided at its ends.
    """
    if mode == "forward":
        with forward_ad_attention(x_t.device.type):
            return torch.func.jvp(F, (x_t.float(), t.float()), (dxt_dt.float(), torch.ones_like(t, dtype=torch.float32)))
    t_plus, t_minus = (t + step).clamp(max=t_range[1]), (t - step).clamp(min=t_range[0])
    dx = expand_like(t_plus - t, x_t) * dxt_dt, expand_like(t_minus - t, x_t) * dxt_dt
    # a difference of two nearby outputs: in float32 (under bf16 autocast it would be mostly rounding)
    with torch.autocast(x_t.device.type, enabled=False):
        dF = (F(x_t + dx[0], t_plus) - F(x_t + dx[1], t_minus)) / expand_like(t_plus - t_minus, x_t)
        return F(x_t, t), dF


def scm_tangent(
    F_minus: Tensor, dF_dt: Tensor, dxt_dt: Tensor, x_t: Tensor, t: Tensor, sigma_data: float, warmup: float
) -> Tensor:
    """g = -cos^2(t) (sigma_d F- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF-/dt): cos(t) df-/dt with the
    second term warmed up by r (Eq. 8 and Sec. 4.2)."""
    c, s = expand_like(torch.cos(t), x_t), expand_like(torch.sin(t), x_t)
    return -(c**2) * (sigma_data * F_minus - dxt_dt) - warmup * c * s * (x_t + sigma_data * dF_dt)


def normalise_tangent(g: Tensor, const: float = 0.1) -> Tensor:
    """g / (||g|| + c), the per-sample L2 norm over all non-batch dimensions (Sec. 4.2)."""
    norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    return g / expand_like(norm + const, g)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """r = min(1, step / warmup_steps); no warm-up when warmup_steps is 0."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def scm_loss(F_theta: Tensor, F_minus: Tensor, g: Tensor, logvar: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample loss and its unweighted part: e^{-w} mean((F - F- - g)^2) + w (w = ``logvar``, or none)."""
    unweighted = (F_theta - F_minus - g).pow(2).flatten(1).mean(1)
    if logvar is None:
        return unweighted, unweighted
    return unweighted * torch.exp(-logvar) + logvar, unweighted


class AdaptiveWeight(nn.Module):
    """w_phi(t): a linear map of Fourier features of log(sigma_d tan t), zero at initialisation (Sec. 4.3).

    Args:
        sigma_data: sigma_d (the features see the noise-to-signal ratio sigma_d tan t = sigma / alpha).
        num_frequencies: Fourier features per sin / cos.
    """

    def __init__(self, sigma_data: float = 0.5, num_frequencies: int = 16) -> None:
        super().__init__()
        self.sigma_data = sigma_data
        # log-ratios span about [-8, 8]: periods from 2 to ~64 cover it without aliasing
        self.register_buffer("freqs", torch.logspace(-1, math.log10(math.pi), num_frequencies), persistent=False)
        self.linear = nn.Linear(2 * num_frequencies, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        log_ratio = torch.log(self.sigma_data * torch.tan(t).clamp_min(1e-8))
        angle = log_ratio[:, None] * self.freqs[None, :]
        return self.linear(torch.cat([angle.sin(), angle.cos()], dim=1)).squeeze(1)


# --- the LightningModule -------------------------------------------------------------------------------


class SCMDistillation(TextToImageMixin, DistillationMethod):
    """Continuous-time consistency distillation (sCD) of a VP or flow-matching teacher into a 1-2 step
    student, sampled and exported with the path's stock x0 sampler (``LCMScheduler`` / ``FlowMatchLCMScheduler``).

    Args:
        sigma_data: sigma_d of TrigFlow (0.5 in the paper, for data of standard deviation 0.5).
        p_mean, p_std: the log-normal time distribution tan(t) = e^tau / sigma_d, tau ~ N(p_mean, p_std^2)
            (the paper: -1.0 / 1.4 for CIFAR-10, -0.8 / 1.6 for ImageNet).
        tangent_warmup_steps: steps over which r rises from 0 to 1 (the paper: 10,000; 0: none).
        tangent_norm_const: c of the tangent normalisation g / (||g|| + c); None disables it.
        adaptive_weighting: learn w_phi(t) (True) or weight every t equally.
        jvp: ``forward`` (``torch.func.jvp`` through the math attention kernel) or ``finite_difference``.
        finite_difference_step: h of the central differences, in TrigFlow time (radians).
        sample_steps: steps of logged grids, ``predict`` and the export's default.
        sample_prompt: text-conditional (SD3) teachers: the prompt of logged grids and the default of
            :meth:`sample` (:class:`~lightning_distill.methods.text.TextToImageMixin`).
        **kwargs: :class:`DistillationMethod`'s arguments (teacher, student, optimizer, seed, ...).

    Example::

        >>> dm = TeacherDataModule(teacher="bundled:digits-flow")
        >>> method = SCMDistillation(dm.teacher, tangent_warmup_steps=200)
        >>> L.Trainer(max_steps=1000, callbacks=[EMA(0.995)]).fit(method, dm)
        >>> x = method.sample(16, steps=2)
    """

    float32_student = True  # the time derivative (JVP or finite difference) runs in float32

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        *,
        sigma_data: float = 0.5,
        p_mean: float = -0.8,
        p_std: float = 1.6,
        tangent_warmup_steps: int = 1000,
        tangent_norm_const: float | None = 0.1,
        adaptive_weighting: bool = True,
        jvp: JVPMode = "forward",
        finite_difference_step: float = 1e-4,
        sample_steps: int = 2,
        sample_prompt: str = "",
        **kwargs,
    ) -> None:
        if jvp not in JVP_MODES:
            raise ConfigError(f"unknown jvp {jvp!r}; choose one of {JVP_MODES}")
        if sigma_data <= 0 or p_std <= 0:
            raise ConfigError(f"sigma_data and p_std must be positive, got {sigma_data} and {p_std}")
        if tangent_warmup_steps < 0:
            raise ConfigError(f"tangent_warmup_steps must be >= 0, got {tangent_warmup_steps}")
        if tangent_norm_const is not None and tangent_norm_const <= 0:
            raise ConfigError(f"tangent_norm_const must be positive or null (no normalisation), got {tangent_norm_const}")
        if not 0 < finite_difference_step < 0.1:
            raise ConfigError(f"finite_difference_step must lie in (0, 0.1) radians, got {finite_difference_step}")
        if teacher is None:
            raise ConfigError(f"{type(self).__name__} needs a teacher (set data.teacher)")
        super().__init__(teacher=teacher, sample_steps=sample_steps, **kwargs)
        self.adaptive_weight = AdaptiveWeight(sigma_data) if adaptive_weighting else None
        self.t_range = trigflow_range(self.student.schedule, sigma_data)  # times the teacher's table covers
        self.make_scheduler()  # fail at construction if the teacher's betas have no LCMScheduler

    def trainable_parameters(self):
        params = super().trainable_parameters()
        return params + (list(self.adaptive_weight.parameters()) if self.adaptive_weight is not None else [])

    def conditioning(self, batch: dict) -> tuple[dict, dict]:
        """The student's and the teacher's network keywords: the batch's prompt keywords for both (text
        teachers), else class labels where each network takes them."""
        if self.text_conditional:
            cond = self.text_cond(batch)
            return cond, cond
        student = {"class_labels": batch["label"]} if self.is_class_conditional else {}
        return student, {"class_labels": batch["label"]} if self.teacher.num_classes else {}

    def teacher_velocity(self, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        """dx_t/dt = sigma_d F_teacher(x_t, t), in float32 whatever the teacher's dtype."""
        with torch.no_grad(), torch.autocast(x_t.device.type, enabled=False):  # the ODE's velocity, not a bf16 one
            F = trigflow_output(self.teacher.denoiser, x_t, t, self.hparams.sigma_data, **cond)
        return self.hparams.sigma_data * F.float()

    def compute_loss(self, batch: dict) -> LossOutput:
        hp = self.hparams
        x0 = batch["x"].float()
        n = x0.shape[0]
        t = sample_trigflow_time(n, hp.p_mean, hp.p_std, hp.sigma_data, device=x0.device).clamp(*self.t_range)
        z = torch.randn_like(x0) * hp.sigma_data
        x_t = expand_like(torch.cos(t), x0) * x0 + expand_like(torch.sin(t), x0) * z
        cond, teacher_cond = self.conditioning(batch)
        dxt_dt = self.teacher_velocity(x_t, t, teacher_cond)

        def F_minus_fn(x: Tensor, tt: Tensor) -> Tensor:
            return trigflow_output(self.student, x, tt, hp.sigma_data, **cond)

        with torch.no_grad():
            F_minus, dF_dt = trigflow_jvp(F_minus_fn, x_t, t, dxt_dt, hp.jvp, hp.finite_difference_step, self.t_range)
        warmup = tangent_warmup(self.global_step, hp.tangent_warmup_steps)
        g = scm_tangent(F_minus, dF_dt, dxt_dt, x_t, t, hp.sigma_data, warmup)
        if hp.tangent_norm_const is not None:
            g = normalise_tangent(g, hp.tangent_norm_const)
        F_theta = trigflow_output(self.student, x_t, t, hp.sigma_data, **cond)
        logvar = self.adaptive_weight(t) if self.adaptive_weight is not None else None
        # F- is F_theta under stop-gradient (Eq. 8): the JVP's float32 primal would differ from a bf16-autocast
        # F_theta by rounding, a bias that stays in the residual; F_minus above only forms the tangent.
        per_sample, unweighted = scm_loss(F_theta, F_theta.detach(), g.detach(), logvar)
        loss = per_sample.mean()
        logs = {"loss": loss, "unweighted": unweighted.mean().detach(), "warmup": torch.tensor(warmup, device=loss.device)}
        if logvar is not None:
            logs["logvar"] = logvar.mean().detach()
        return LossOutput(loss, logs)

    # --- sampling / export --------------------------------------------------------------------

    def make_scheduler(self):
        """The path's stock x0 sampler on every timestep of the teacher (the student is trained at
        continuous levels): ``LCMScheduler(original_inference_steps=T)`` with boundary scalings off
        (VP), ``FlowMatchLCMScheduler`` (flow)."""
        T = self.student.schedule.num_train_timesteps
        return lcm_scheduler(self, T, X0_SAMPLER_TIMESTEP_SCALING)


__all__ = [
    "AdaptiveWeight",
    "SCMDistillation",
    "consistency_function",
    "flow_time_of_trigflow",
    "normalise_tangent",
    "sample_trigflow_time",
    "scm_loss",
    "scm_tangent",
    "tangent_warmup",
    "trigflow_jvp",
    "trigflow_range",
    "trigflow_output",
    "trigflow_scale",
    "trigflow_time",
]
