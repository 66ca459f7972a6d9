"""MeanFlow distillation (Geng et al. 2025, arXiv 2505.13447): a flow map u(z_t, r, t) from a teacher.

A MeanFlow network predicts the *average* velocity over an interval [r, t] of the teacher's
probability-flow ODE, written in rectified-flow coordinates z_t = (1 - t) x + t eps (t = 1 noise):

    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_tau, tau) dtau,        z_r = z_t - (t - r) u(z_t, r, t)

so one network samples at any step count (one step: x = z_1 - u(z_1, 0, 1)). Differentiating
(t - r) u = int_r^t v in t gives the MeanFlow identity (Eq. 6), the regression target of training:

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . d_z u + d_t u   (Eq. 8)

The total derivative is a forward-mode JVP of (z, r, t) -> u_theta with tangents (v, 0, 1); the
target is stop-gradient (Eq. 9-10, Algorithm 1). Here v is the *teacher's* velocity at (z_t, t)
(distillation; the paper's v_t = eps - x trains from data).

Both teacher paths (VP and flow) serve without a branch: a point x_p = alpha x + sigma eps of the
teacher's path at flow time t = sigma / (alpha + sigma) (``schedule.at_flow_time``) is the point
z = x_p / (alpha + sigma) of the rectified-flow path, and any network's (x0_hat, eps_hat) at x_p gives
the flow velocity eps_hat - x0_hat in z coordinates. The student is the teacher's UNet with a second
time input: diffusers' ``class_embed_type="timestep"`` embedding, fed the interval (t - r) T and
zero-initialised, so at step 0 the student is the teacher for every r (u = v, the r = t answer).

Notation (paper -> code):

===========================  ==================================================================
t, r (t >= r; t = 1 noise)   ``t``, ``r``: flow times lam in [0, 1] (parametrisation's ``at_flow_time``)
z_t                          ``z`` (:func:`flow_interpolate`); on the teacher's path x_p = (alpha + sigma) z
                             (:func:`path_point`)
v(z_t, t)                    ``v``: :func:`flow_velocity` of the teacher (eps_hat - x0_hat)
u_theta(z_t, r, t)           :func:`average_velocity` (student; its output read at (x_p, t) gives
                             (x0_bar, eps_bar), u = eps_bar - x0_bar); second input (t - r) T as
                             ``class_labels`` (:func:`interval_label`)
d/dt u (Eq. 8)               ``du_dt`` (:func:`total_derivative`: ``torch.func.jvp`` or central differences)
u_tgt (Eq. 10)               :func:`meanflow_target`
w = 1 / (||Delta||^2 + c)^p  :func:`adaptive_weighted_loss` (``adaptive_power`` p, ``adaptive_c`` c)
(r, t) ~ logit-normal        :func:`sample_interval` (``time_mean``, ``time_std``, ``ratio_r_neq_t``)
===========================  ==================================================================

Sampling (any N): a grid of flow times from 1 to 0 and z_r = z_t - (t - r) u(z_t, r, t) per step, each
network call told the interval it steps. Flow teachers: diffusers' ``FlowMapEulerDiscreteScheduler``
(sigmas shift(linspace(1, 0, N + 1)), the network fed sigma T and the interval (sigma_t - sigma_r) T). VP
teachers: the first-order ``DPMSolverMultistepScheduler`` (data prediction, trailing spacing, last step onto
x0, no clipping: ``flow_map.vp_flow_map_scheduler``), which is DDIM between consecutive levels of the trailing
grid T - 1, ..., round(T / N) - 1, clean (``NoiseSchedule.trailing_timesteps``) and so exactly the flow-map
step (``flow_map.flow_map_intervals``). ``DDIMScheduler`` itself steps t -> t - T // N, off that grid when
N does not divide T. The grid starts at timestep T - 1, i.e. at flow time ``flow_time(T - 1)`` < 1 (for the
digits teacher 1 - 5e-5), where the sampler's Gaussian draw stands for the VP point x_{T-1} as it does for
the teacher.
No stock pipeline passes the interval to a ``UNet2DModel`` (``DDPMPipeline`` passes no class_labels), so
``flow_map.flow_map_sample`` (:mod:`lightning_distill.flow_map`) is the one loop of :meth:`MeanFlowDistillation.sample` and of evaluating an
exported folder (``metrics.scheduler_sample`` dispatches to it for any UNet with a ``"timestep"`` class
embedding and no class table: ``flow_map.is_flow_map_unet``).

Students: ``UNet2DModel`` only (unconditional). Text transformers are refused at construction (#23 item 2):
``SD3Transformer2DModel`` has no second time input (its forward takes one ``timestep``, and the pooled-text
embedding it adds to it is the prompt's) and ``StableDiffusion3Pipeline`` feeds none; the one stock
flow-map pipeline in diffusers 0.42, ``AnyFlowPipeline``, drives only its own Wan video transformer. No
stock SD3 folder could reproduce an any-step flow map, so none is written.

Forward-mode AD and attention: the CPU flash kernel of ``scaled_dot_product_attention`` (diffusers'
default attention) has no forward-mode derivative (``NotImplementedError`` in ``torch.func.jvp``, torch
2.14); ``nn_utils.forward_ad_attention`` selects the math kernel for the JVP, which has one, at its
O(tokens^2) memory per head. The JVP runs outside autocast (bf16 autocast fails inside it). On GPU
(not checked in this repository's tests) the same context keeps the fused CUDA kernels (flash,
memory-efficient, cuDNN) out of the JVP; where a model's own kernels lack forward AD,
``jvp="finite_difference"`` takes central differences (two more forward passes, no gradient) with any kernel.

Where the code knowingly differs from the paper: the loss is the adaptive-weighted squared L2 norm summed
over each sample's pixels, ||Delta||_2^2 as the paper writes it (c = 1e-3 is relative to that sum); r = t
is chosen per sample with probability 1 - ``ratio_r_neq_t`` rather than for a fixed share of each batch;
VP teachers are trained on t <= flow_time(T - 1), the levels their timestep table reaches.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..flow_map import flow_map_sample, flow_map_unet, is_flow_map_unet
from ..nn_utils import JVP_MODES, JVPMode, forward_ad_attention
from ..parametrisation import Denoiser, NoiseSchedule, expand_like
from ..teacher import DiffusionTeacher
from .base import DistillationMethod, LossOutput, build_module


# --- time sampling and paths (pure functions) ----------------------------------------------------


def logit_normal(n: int, mean: float, std: float, device=None, generator: torch.Generator | None = None) -> Tensor:
    """sigmoid(N(mean, std^2)) draws in (0, 1) (Esser et al. 2024's logit-normal time sampling)."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))


def sample_interval(
    n: int,
    mean: float = -0.4,
    std: float = 1.0,
    ratio_r_neq_t: float = 0.25,
    device=None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(r, t) per sample: two logit-normal draws sorted so that t >= r, then r = t with probability
    1 - ``ratio_r_neq_t`` (paper Table 1a: 25% r != t is best; r = t is plain flow matching)."""
    a, b = logit_normal(n, mean, std, device, generator), logit_normal(n, mean, std, device, generator)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    same = torch.rand(n, device=device, generator=generator) >= ratio_r_neq_t
    return torch.where(same, t, r), t


def flow_interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """z_t = (1 - t) x + t eps (the paper's Eq. 1 path)."""
    return expand_like(1 - t, x0) * x0 + expand_like(t, x0) * eps


def path_point(schedule: NoiseSchedule, z: Tensor, lam: Tensor) -> Tensor:
    """x_p = (alpha + sigma) z: the teacher-path point at flow time ``lam`` of flow coordinates z
    (alpha / (alpha + sigma) = 1 - lam, so x_p = alpha x + sigma eps when z = (1 - lam) x + lam eps)."""
    alpha, sigma, _ = schedule.at_flow_time(lam)
    return expand_like(alpha + sigma, z) * z


def flow_velocity(den: Denoiser, z: Tensor, lam: Tensor, **cond) -> Tensor:
    """dz/dlam = eps_hat - x0_hat of ``den`` at flow-coordinate point z, flow time lam: on either path,
    since z = (1 - lam) x0_hat + lam eps_hat. Differentiable in z and lam."""
    return den.at_flow_time(path_point(den.schedule, z, lam), lam, **cond).flow


def interval_label(r: Tensor, t: Tensor, num_train_timesteps: int) -> Tensor:
    """The student's second time input: the interval t - r in the network's timestep units, (t - r) T."""
    return (t - r) * num_train_timesteps


def average_velocity(student: Denoiser, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
    """u_theta(z, r, t): the student's output read at (x_p, t) as (x0_bar, eps_bar), u = eps_bar - x0_bar."""
    return flow_velocity(student, z, t, class_labels=interval_label(r, t, student.schedule.num_train_timesteps))


# --- the MeanFlow identity (pure functions) ------------------------------------------------------


def total_derivative(
    u_fn: Callable[[Tensor, Tensor], Tensor],
    z: Tensor,
    t: Tensor,
    v: Tensor,
    mode: JVPMode = "forward",
    step: float = 1e-4,
    t_max: float = 1.0,
    r: Tensor | None = None,
    primal_graph: bool = True,
) -> tuple[Tensor, Tensor]:
    """(u, du/dt) with du/dt = v . d_z u + d_t u, the derivative along the teacher's ODE (Eq. 8).

    ``u_fn(z, t)`` is u_theta(z, r, t) with r held (its tangent is 0). ``forward``: one ``torch.func.jvp``
    with tangents (v, 1); u keeps its graph to the parameters (the paper's Algorithm 1 uses the JVP's
    primal output as the prediction), outside autocast. With ``primal_graph=False`` the JVP runs without a
    graph and u is a separate call: the same values at one more forward pass, for a network with activation
    checkpointing, whose recomputation cannot replay a forward-mode pass. ``finite_difference``: central differences with step h = ``step``
    in flow time, (u(z + h v, t + h) - u(z - h v, t - h)) / 2h, t + h kept below ``t_max`` and t - h above
    the interval's start ``r`` (and 0), one-sided at those ends; u is a separate (third) call. du/dt is
    returned detached: it only enters the stop-gradient target.
    """
    if mode == "forward":
        with forward_ad_attention(z.device.type), torch.set_grad_enabled(primal_graph and torch.is_grad_enabled()):
            u, du_dt = torch.func.jvp(u_fn, (z, t), (v, torch.ones_like(t)))  # math attention kernel, no autocast
        return (u if primal_graph else u_fn(z, t)), du_dt.detach()
    if mode != "finite_difference":
        raise ConfigError(f"unknown jvp {mode!r}; choose one of {JVP_MODES}")
    u = u_fn(z, t)
    # a difference of two nearby outputs: in float32 (under bf16 autocast it would be mostly rounding);
    # t - h stays at or above r (u at a negative interval is untrained) and above 0 (sigma = 0 divides
    # an x0-predicting student by zero): one-sided there. A zero-width difference (t = r = t_max) is 0.
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        t_plus = (t + step).clamp(max=t_max)
        lo = torch.zeros_like(t) if r is None else r
        t_minus = torch.minimum(torch.maximum(t - step, lo).clamp(min=min(step, 1e-4)), t)
        up = u_fn(z + expand_like(t_plus - t, z) * v, t_plus)
        down = u_fn(z + expand_like(t_minus - t, z) * v, t_minus)
        du_dt = (up - down) / expand_like((t_plus - t_minus).clamp(min=1e-12), z)
    return u, du_dt


def meanflow_target(v: Tensor, du_dt: Tensor, r: Tensor, t: Tensor) -> Tensor:
    """u_tgt = v - (t - r) du/dt (Eq. 10), stop-gradient. At r = t it is the teacher's velocity v."""
    return (v - expand_like(t - r, v) * du_dt).detach()


def adaptive_weighted_loss(delta: Tensor, power: float = 1.0, c: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Per-sample sg(w) ||Delta||_2^2 with w = 1 / (||Delta||_2^2 + c)^p (Sec. 4.3; p = 1, c = 1e-3).

    ||Delta||_2^2 is summed over each sample's elements, as the paper's norm. With p = 1 the loss is
    about 1 wherever the error is large: a robust loss (p = 0.5 is the pseudo-Huber-like case).

    Returns:
        (weighted loss, ||Delta||^2), both of shape (B,).
    """
    sq = delta.flatten(1).square().sum(1)
    weight = (sq.detach() + c).pow(-power)
    return weight * sq, sq


# --- the flow-map sampler (shared by sample() and exported folders) -------------------------------


# --- the LightningModule -------------------------------------------------------------------------


class MeanFlowDistillation(DistillationMethod):
    """MeanFlow distillation of a VP or flow-matching teacher into an any-step flow-map student.

    Args:
        time_mean, time_std: the logit-normal (mean, std) of r and t (paper: -0.4, 1.0).
        ratio_r_neq_t: the probability of r != t (paper: 0.25); otherwise r = t (flow matching on the teacher).
        adaptive_power: p of the adaptive loss weight; 0 (default) is the plain squared L2 loss. The paper's 1
            (training from data) fails to distil: the r = t samples, which the teacher-initialised student
            already fits, get ~2 / ||Delta|| and 96% of the gradient (benchmarks/meanflow_loss_weight.py).
        adaptive_c: c of the adaptive loss weight (paper: 1e-3).
        jvp: ``forward`` (``torch.func.jvp`` through the math attention kernel) or ``finite_difference``.
        finite_difference_step: h of the central differences (flow time), for ``jvp="finite_difference"``.
            1e-4: a UNet's sinusoidal time embedding oscillates up to once per timestep (1 / T in flow
            time), so 1e-3 is too coarse (20% off the JVP on the tiny test UNet, 0.5% at 1e-4).
        sample_steps: steps of logged grids, ``predict`` and the FID callback's "current".
        **kwargs: :class:`DistillationMethod`'s arguments (teacher, student, optimizer, seed, ...).

    Example::

        >>> dm = TeacherDataModule(teacher="bundled:digits-flow")
        >>> method = MeanFlowDistillation(dm.teacher, ratio_r_neq_t=0.25)
        >>> L.Trainer(max_steps=1000, callbacks=[EMA(0.995)]).fit(method, dm)
        >>> x = method.sample(16, steps=1)        # any step count: 1, 2, 4, ...
    """

    float32_student = True  # the MeanFlow identity's derivative (JVP or finite difference) runs in float32

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        *,
        time_mean: float = -0.4,
        time_std: float = 1.0,
        ratio_r_neq_t: float = 0.25,
        adaptive_power: float = 0.0,
        adaptive_c: float = 1e-3,
        jvp: JVPMode = "forward",
        finite_difference_step: float = 1e-4,
        sample_steps: int = 1,
        **kwargs,
    ) -> None:
        if jvp not in JVP_MODES:
            raise ConfigError(f"unknown jvp {jvp!r}; choose one of {JVP_MODES}")
        if not 0.0 <= ratio_r_neq_t <= 1.0:
            raise ConfigError(f"ratio_r_neq_t must lie in [0, 1], got {ratio_r_neq_t}")
        if time_std <= 0:
            raise ConfigError(f"time_std must be > 0, got {time_std}")
        if adaptive_power < 0 or adaptive_c <= 0:
            raise ConfigError(f"adaptive_power must be >= 0 and adaptive_c > 0, got {adaptive_power}, {adaptive_c}")
        if finite_difference_step <= 0:
            raise ConfigError(f"finite_difference_step must be > 0, got {finite_difference_step}")
        if teacher is None:
            raise ConfigError(f"{type(self).__name__} needs a teacher (set data.teacher)")
        super().__init__(teacher=teacher, sample_steps=sample_steps, **kwargs)
        # The highest level the teacher's table reaches (VP: flow_time(T - 1) < 1; flow: 1).
        self.t_max = float(self.student.schedule.flow_time(torch.tensor(self.student.schedule.num_train_timesteps - 1)))

    def build_student(self, student: nn.Module | None, prediction_type) -> None:
        """The teacher's UNet with a zero-initialised interval input (:func:`~lightning_distill.flow_map.flow_map_unet`)."""
        if self.teacher is None:
            raise ConfigError(f"{type(self).__name__} needs a teacher (set data.teacher)")
        net = build_module(student)
        net = self.teacher.unet if net is None else net
        if type(net).__name__ != "UNet2DModel":
            raise ConfigError(
                f"{type(self).__name__} supports UNet2DModel students only, got {type(net).__name__}: the interval "
                "t - r needs a second time input (class_embed_type='timestep') that a stock pipeline feeds, and this "
                "network and its pipeline have none"
            )
        if self.teacher.num_classes or self.teacher.is_text_conditional:
            raise ConfigError(
                f"{type(self).__name__} supports unconditional teachers only (this one is "
                f"{'class' if self.teacher.num_classes else 'text'}-conditional): the class embedding carries the interval"
            )
        if not is_flow_map_unet(net):
            net = flow_map_unet(net, share=self.shares_teacher_base, seed=self.hparams.get("seed", 0))
        super().build_student(net, prediction_type)

    # --- the loss ----------------------------------------------------------------------------

    def teacher_velocity(self, z: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(z.device.type, enabled=False):  # the ODE's velocity, not a bf16 one
            return flow_velocity(self.teacher.denoiser, z, t).float()

    def compute_loss(self, batch: dict) -> LossOutput:
        hp = self.hparams
        x0 = batch["x"].float()
        n = x0.shape[0]
        r, t = sample_interval(n, hp.time_mean, hp.time_std, hp.ratio_r_neq_t, device=x0.device)
        t = t.clamp(max=self.t_max)
        r = torch.minimum(r, t)
        z = flow_interpolate(x0, torch.randn_like(x0), t)
        with torch.no_grad():
            v = self.teacher_velocity(z, t)

        def u_fn(z_: Tensor, t_: Tensor) -> Tensor:
            return average_velocity(self.student, z_, r, t_).float()

        # Validation runs under inference mode, which forward-mode AD cannot enter: the (logged) target
        # is then taken by central differences.
        mode = hp.jvp if torch.is_grad_enabled() else "finite_difference"
        checkpointed = bool(getattr(self.student.unet, "is_gradient_checkpointing", False))
        u, du_dt = total_derivative(u_fn, z, t, v, mode, hp.finite_difference_step, self.t_max, r, not checkpointed)
        u_tgt = meanflow_target(v, du_dt, r, t)
        per_sample, sq = adaptive_weighted_loss(u - u_tgt, hp.adaptive_power, hp.adaptive_c)
        loss = per_sample.mean()
        return LossOutput(loss, {"loss": loss, "mse": sq.detach().mean() / x0[0].numel(),
                                 "r_neq_t": (r < t).float().mean()})

    # --- sampling / export --------------------------------------------------------------------

    def make_scheduler(self):
        """The stock flow-map sampler: ``FlowMapEulerDiscreteScheduler`` (T, the teacher's shift) on the flow
        path; on the VP path the first-order ``DPMSolverMultistepScheduler`` (trailing, onto x0, no clipping),
        whose step is the flow-map step (:func:`~lightning_distill.flow_map.flow_map_intervals`)."""
        from ..sampling import flow_map_scheduler

        return flow_map_scheduler(self.student_scheduler_config, self.student.schedule, self.student.prediction_type)

    def sampling_scheduler(self, steps: int):
        """One scheduler for every step count: both flow-map samplers set their grid in ``set_timesteps``."""
        cache = self.__dict__.setdefault("_scheduler_cache", {})
        if "base" not in cache:
            cache["base"] = self.make_scheduler()
        return cache["base"]

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        labels: Tensor | None = None,
        denoiser: Denoiser | None = None,
    ) -> Tensor:
        """Draw ``n`` samples in ``steps`` flow-map steps with :func:`~lightning_distill.flow_map.flow_map_sample` (the exported folder's loop)."""
        if labels is not None:
            raise ConfigError(f"{type(self).__name__} students are unconditional: no labels")
        den = denoiser or self.sampling_denoiser()
        steps = steps or self.hparams.sample_steps
        self.check_sample_steps(steps)
        device = next(den.parameters()).device
        return flow_map_sample(den.unet, self.sampling_scheduler(steps), n, steps, generator, device)


__all__ = [
    "MeanFlowDistillation", "sample_interval", "logit_normal", "flow_interpolate", "path_point",
    "flow_velocity", "interval_label", "average_velocity", "total_derivative", "meanflow_target",
    "adaptive_weighted_loss",
]
