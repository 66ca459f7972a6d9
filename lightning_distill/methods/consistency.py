"""Consistency distillation (Song et al. 2023, arXiv 2303.01469), discrete-time as in LCM (Luo et al. 2023).

The student is a consistency function on the teacher's integer timesteps,

    f_theta(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t)                      (Song et al., Eq. 5)

with ``c_skip`` / ``c_out`` exactly as the path's stock x0 sampler applies them
(:func:`~lightning_distill.sampling.x0_sampler_scalings`), so that this sampler is the student's
multistep sampler (Song et al., Algorithm 1: x <- alpha_s f(x, t) + sigma_s z) and an exported pipeline
reproduces :meth:`sample` sample for sample:

* VP teachers: ``LCMScheduler`` and its boundary scalings (:func:`lcm_boundary_scalings`);
* flow-matching teachers (x_s = (1 - s) x + s eps): ``FlowMatchLCMScheduler``, which applies none, so f is
  the x0 estimate x_s - s u itself; f(x, 0) = x holds without scalings (METHODS.md section 7).

Training (Song et al., Algorithm 2; LCM's skipping step k): draw a point t_{n+k} of the sampler's
training grid, noise the data to it, take one teacher ODE step to t_n = t_{n+k} - k (DDIM by default),
and regress f_theta(x_{n+k}, t_{n+k}) onto stopgrad f_theta_minus(x_hat_n, t_n), where theta_minus is an
EMA of the student with rate ``mu`` (mu = 0: the student itself under stop-gradient).

Notation (paper -> code):

=========================  ==========================================================
sigma_min boundary         VP: t = 0 (c_skip(0) = 1, c_out(0) = 0, so f(x, 0) = x exactly);
                           flow: t = -1 (s = 0, f = x_s - 0 u = x_s)
N (discretisation)         ``original_inference_steps`` (LCMScheduler's training grid; on the
                           flow path the levels s = n k / T, i.e. n / N when N divides T)
k (skipping interval)      ``num_train_timesteps // original_inference_steps``
t_{n+k}, t_n               ``t_start``, ``t_end`` (the next lower grid timestep, 0 below the lowest:
                           max(t_start - k, 0) as the LCM script on its grid; on the flow path t = 0 is
                           s = 1 / T, where f = x - u / T is the target; a shifted flow path adds the
                           levels its stock sampler visits to the grid: :func:`consistency_grid`)
theta_minus                ``ConsistencyDistillation.theta_minus`` (target network)
d(., .)                    :func:`consistency_loss`
=========================  ==========================================================

Three weight copies are kept apart (METHODS.md section 2): the online student (``student``), the
target network ``theta_minus`` (here, part of the loss) and the sampling EMA (the ``EMA`` callback).
"""

from __future__ import annotations

import copy
from typing import Callable, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .. import lora
from ..errors import ConfigError
from ..losses import pseudo_huber, regression_distance
from ..parametrisation import Denoiser, NoiseSchedule, Prediction, ddim_step, expand_like
from ..sampling import (  # the grid helpers and lcm_boundary_scalings lived here first (__all__)
    consistency_grid,
    lcm_boundary_scalings,
    lcm_scheduler,
    lcm_training_timesteps,
    levels_off_grid,
    lognormal_interval_probabilities,
    off_grid_timesteps,
    previous_timesteps,
    x0_sampler_scalings,
)
from ..teacher import DiffusionTeacher
from .base import DistillationMethod, LossOutput
from .text import TextToImageMixin

Solver = Literal["ddim", "heun"]
LossKind = Literal["l2", "l1", "pseudo_huber", "pseudo_huber_elementwise"]
TimestepSampling = Literal["uniform", "lognormal"]
SOLVERS = ("ddim", "heun")
LOSSES = ("l2", "l1", "pseudo_huber", "pseudo_huber_elementwise")
TIMESTEP_SAMPLINGS = ("uniform", "lognormal")


# --- boundary condition (pure functions) ----------------------------------------------------------


def consistency_function(
    denoiser: Denoiser, x_t: Tensor, t: Tensor, timestep_scaling: float = 10.0, **cond
) -> Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t) for a denoiser of any prediction type and path.

    c_skip / c_out are those the stock x0 sampler of the denoiser's path applies
    (:func:`~lightning_distill.sampling.x0_sampler_scalings`): LCMScheduler's on the VP path, none on
    the flow path, where f is the x0 estimate x_s - s u itself (and ``timestep_scaling`` is unused).

    x0 is taken unclipped even for pixel models: clamping during training would zero the gradient of
    every out-of-range pixel and leave it stuck there. Sampling (LCMScheduler) clips as the teacher did.
    """
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(x_t.shape[0])
    x0 = denoiser(x_t, t, clip=False, **cond).x0
    c_skip, c_out = x0_sampler_scalings(denoiser.schedule, t, timestep_scaling)
    return expand_like(c_skip, x_t) * x_t + expand_like(c_out, x_t) * x0


# --- teacher ODE solvers (pure functions over a prediction callable) ------------------------------

Predict = Callable[[Tensor, Tensor], Prediction]


def solver_step(
    predict: Predict, schedule: NoiseSchedule, x_t: Tensor, t: Tensor, s: Tensor, solver: Solver = "ddim"
) -> Tensor:
    """One step of the teacher's probability-flow ODE from timestep t down to s (per-sample tensors).

    * ``ddim``: z_s = alpha_s x0 + sigma_s eps (Song et al. 2021, Eq. 12). This is also Euler's method in
      the variance-exploding coordinates y = x / alpha, sigma_ve = sigma / alpha (EDM, Karras et al.
      2022), i.e. the "Euler" of Song et al.'s official code.
    * ``heun``: a second-order (Heun-type) step of the exponential integrator in x0 (the data-prediction
      form of DPM-Solver++(2)): DDIM predictor, then the trapezoid rule on the x0 predictions at both
      ends, z_s = (sigma_s / sigma_t) z_t + alpha_s (1 - e^-h) (x0_t + x0_s) / 2. Two teacher evaluations.
      It is not the EDM Heun of Song et al.'s official solver (trapezoid on eps in VE coordinates), which is
      undefined at the flow path's s = 1 (alpha = 0); near the data end it gains less over DDIM than that one
      does. Where s = -1 (clean, sigma = 0) the corrector is skipped.

    Both are written in alpha / sigma only, so they hold on the flow path too: there ``ddim`` is the Euler
    step x_s + (s' - s) u of ``FlowMatchEulerDiscreteScheduler``.

    Args:
        predict: ``(x, t) -> Prediction``; the teacher (guided or not).
        schedule: the teacher's noise schedule.
        x_t: (B, ...) current points; t, s: (B,) timesteps with s < t.
        solver: ``ddim`` or ``heun``.
    """
    if solver not in SOLVERS:
        raise ConfigError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    pred = predict(x_t, t)
    a_s, s_s = schedule.alpha(s), schedule.sigma(s)
    if solver == "ddim":
        return ddim_step(pred.x0, pred.eps, a_s, s_s)
    # heun: trapezoid on x0 in the exponential-integrator form, h = lambda_s - lambda_t.
    x_pred = ddim_step(pred.x0, pred.eps, a_s, s_s)
    s_safe = s.clamp_min(0)  # the corrector at s = -1 is discarded below; keep the call legal
    x0_s = predict(x_pred, s_safe).x0
    s_t = schedule.sigma(t)
    a_t = schedule.alpha(t)
    ratio = s_s / s_t  # sigma_s / sigma_t
    coef_x0 = a_s - s_s * a_t / s_t  # alpha_s (1 - exp(-h))
    x_heun = expand_like(ratio, x_t) * x_t + expand_like(coef_x0, x_t) * 0.5 * (pred.x0 + x0_s)
    return torch.where(expand_like(s >= 0, x_t).bool(), x_heun, x_pred)


def substep_timesteps(t: Tensor, s: Tensor, substeps: int) -> list[Tensor]:
    """The m + 1 integer timesteps t = t_0 > t_1 > ... > t_m = s splitting each interval [s, t] evenly
    (t_j = t - round(j (t - s) / m)); an interval shorter than m repeats levels (a zero-length step)."""
    if substeps < 1:
        raise ConfigError(f"solver_substeps must be >= 1, got {substeps}")
    span = (t - s).double()
    return [t - torch.round(span * j / substeps).to(t.dtype) for j in range(substeps)] + [s]


def solve_ode(
    predict: Predict, schedule: NoiseSchedule, x_t: Tensor, t: Tensor, s: Tensor, solver: Solver = "ddim",
    substeps: int = 1,
) -> Tensor:
    """The teacher's ODE from t down to s in ``substeps`` equal solver steps (:func:`substep_timesteps`).

    One step (the default) is Song et al.'s Phi(x_{n+k}; phi). More steps lower the solver's error per grid
    interval, so a coarse consistency grid (few links for the boundary condition to travel through, hence
    fast convergence) still targets an accurate trajectory, at ``substeps`` times the teacher evaluations.
    """
    levels = substep_timesteps(t, s, substeps)
    for hi, lo in zip(levels[:-1], levels[1:]):
        x_t = solver_step(predict, schedule, x_t, hi, lo, solver)
    return x_t


# --- loss, target and EMA (pure functions) ----------------------------------------------------------


def consistency_loss(a: Tensor, b: Tensor, kind: LossKind = "l2", huber_c: float = 0.001) -> Tensor:
    """Per-sample distance d(a, b), shape (B,); every form is one of :mod:`lightning_distill.losses`.

    * ``l2``: mean squared error; ``l1``: mean absolute error.
    * ``pseudo_huber``: sqrt(||a - b||^2 + c^2) - c over each sample (Song & Dhariwal 2023, improved
      consistency training; they use c = 0.00054 sqrt(d)): :func:`pseudo_huber`, reduction ``sum``.
    * ``pseudo_huber_elementwise``: mean of sqrt((a - b)^2 + c^2) - c per element (the diffusers LCM
      script's "huber" loss, c = 0.001): :func:`pseudo_huber`, reduction ``elementwise``.
    """
    if kind == "pseudo_huber":
        return pseudo_huber(a, b, huber_c, "sum")
    if kind == "pseudo_huber_elementwise":
        return pseudo_huber(a, b, huber_c, "elementwise")
    if kind in ("l2", "l1"):
        return regression_distance(a, b, kind)
    raise ConfigError(f"unknown loss {kind!r}; choose one of {LOSSES}")


def skipped_timesteps(t_start: Tensor, k: int) -> Tensor:
    """t_n = t_{n+k} - k, clamped at 0 (the boundary) as in the LCM script."""
    return (t_start - k).clamp_min(0)


@torch.no_grad()
def consistency_target(
    teacher_predict: Predict,
    target: Denoiser,
    schedule: NoiseSchedule,
    x_start: Tensor,
    t_start: Tensor,
    t_end: Tensor,
    solver: Solver = "ddim",
    timestep_scaling: float = 10.0,
    substeps: int = 1,
    **target_cond,
) -> tuple[Tensor, Tensor]:
    """The CD target (Song et al., Algorithm 2): x_hat_n = Phi(x_{n+k}; teacher), then f_theta_minus(x_hat_n, t_n).

    Phi is ``substeps`` solver steps (:func:`solve_ode`; one in the paper).

    Returns:
        (x_hat_n, target), both detached.
    """
    x_hat = solve_ode(teacher_predict, schedule, x_start, t_start, t_end, solver, substeps)
    return x_hat, consistency_function(target, x_hat, t_end, timestep_scaling, **target_cond)


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, mu: float) -> None:
    """theta_minus <- mu theta_minus + (1 - mu) theta (buffers copied). mu = 0 copies the online weights."""
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        if p_t is not p_o:  # a shared frozen weight (a LoRA student's base) is its own average
            p_t.lerp_(p_o.detach().to(p_t.dtype), 1.0 - mu)
    for b_t, b_o in zip(target.buffers(), online.buffers()):
        if b_t is not b_o:
            b_t.copy_(b_o)


def shared_dropout_devices(x: Tensor) -> list:
    """Devices whose RNG ``fork_rng`` must save so online and target passes draw the same dropout masks."""
    return [x.device] if x.device.type == "cuda" else []


# --- the LightningModule -------------------------------------------------------------------------------


class ConsistencyDistillation(TextToImageMixin, DistillationMethod):
    """Consistency distillation of a diffusion teacher into a 1-4 step student, sampled with ``LCMScheduler``
    (VP teachers) or ``FlowMatchLCMScheduler`` (flow-matching teachers).

    Args:
        original_inference_steps: N, the LCMScheduler training grid (k = T // N). Choose N dividing T so
            the grid reaches the last timestep T - 1 (e.g. 16 or 32 for T = 1024, 50 for T = 1000). On
            the flow path the K-step sampler visits s = 1, (K-1)/K, ..., 1/K, all on the grid (levels
            n / N) when N divides T and K divides N (e.g. N = 40 for T = 1000 and K = 1, 2, 4); with a shift
            it visits others, which join the training grid for K = 1, 2, 4 and ``sample_steps``
            (:func:`consistency_grid`). A ``sample_steps`` sampler that leaves the grid is warned about at
            construction.
        solver: teacher ODE solver, ``ddim`` (default) or ``heun`` (see :func:`solver_step`).
        solver_substeps: teacher solver steps per grid interval (:func:`solve_ode`; 1 in the paper). A
            coarse grid with several substeps converges in fewer training steps than a fine grid while
            its targets stay close to the teacher's ODE.
        loss: distance d, ``l2``, ``l1``, ``pseudo_huber`` or ``pseudo_huber_elementwise``.
        huber_c: the pseudo-Huber constant c.
        target_decay: mu, the EMA rate of theta_minus (0: stop-gradient of the student itself;
            Song et al. use 0 on CIFAR-10 and 0.95 on ImageNet-64; the LCM script 0.95).
        timestep_scaling: LCMScheduler's ``timestep_scaling`` of the boundary scalings (VP path only:
            ``FlowMatchLCMScheduler`` applies none).
        timestep_sampling: how t_{n+k} is drawn from the grid: ``uniform`` (the LCM script) or
            ``lognormal``, each interval with the mass log sigma ~ N(p_mean, p_std^2) puts on it in EDM
            sigma (improved consistency training; :func:`lognormal_interval_probabilities`).
        p_mean, p_std: that log-normal (iCT: -1.1, 2.0); read only with ``lognormal``.
        sample_steps: steps of logged grids and ``predict``.
        sample_prompt: text-conditional (SD3) teachers: the prompt of logged grids and the default of
            :meth:`sample` (:class:`~lightning_distill.methods.text.TextToImageMixin`).
        **kwargs: :class:`DistillationMethod`'s arguments (teacher, student, optimizer, seed, ...).

    Example::

        >>> dm = TeacherDataModule(teacher="bundled:digits")
        >>> method = ConsistencyDistillation(dm.teacher, original_inference_steps=32, target_decay=0.95)
        >>> L.Trainer(max_steps=1000, callbacks=[EMA(0.995)]).fit(method, dm)
        >>> x = method.sample(16, steps=2)
    """

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        *,
        original_inference_steps: int = 50,
        solver: Solver = "ddim",
        solver_substeps: int = 1,
        loss: LossKind = "l2",
        huber_c: float = 0.001,
        target_decay: float = 0.95,
        timestep_scaling: float = 10.0,
        timestep_sampling: TimestepSampling = "uniform",
        p_mean: float = -1.1,
        p_std: float = 2.0,
        sample_steps: int = 2,
        sample_prompt: str = "",
        **kwargs,
    ) -> None:
        if solver not in SOLVERS:
            raise ConfigError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
        if solver_substeps < 1:
            raise ConfigError(f"solver_substeps must be >= 1, got {solver_substeps}")
        if loss not in LOSSES:
            raise ConfigError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ConfigError(f"unknown timestep_sampling {timestep_sampling!r}; choose one of {TIMESTEP_SAMPLINGS}")
        if not p_std > 0:
            raise ConfigError(f"p_std (the log-normal's standard deviation) must be > 0, got {p_std}")
        if not 0.0 <= target_decay < 1.0:
            raise ConfigError(f"target_decay (mu) must lie in [0, 1), got {target_decay}")
        if teacher is None:
            raise ConfigError(f"{type(self).__name__} needs a teacher (set data.teacher)")
        super().__init__(teacher=teacher, sample_steps=sample_steps, **kwargs)
        served = (1, 2, 4, sample_steps)  # the step counts whose stock sampler levels join a flow grid
        self.register_buffer(
            "train_timesteps", consistency_grid(self.student.schedule, original_inference_steps, served), persistent=False
        )
        self.register_buffer("interval_probabilities", self.interval_distribution(), persistent=False)
        # theta_minus: a registered submodule (saved and restored with checkpoints), never optimised;
        # with mu = 0 it is the student itself under stop-gradient, so no copy is kept.
        self.theta_minus: Denoiser | None = None
        if target_decay > 0:
            # a LoRA student's frozen base is shared, not copied (it is its own average)
            target = lora.copy_trainable(self.student) if lora.has_lora(self.student) else copy.deepcopy(self.student)
            self.theta_minus = target.requires_grad_(False)
        self.make_scheduler()  # fail at construction, not at the first sample, if the grids disagree
        self.warn_if_sampler_leaves_grid(sample_steps)

    # --- hooks a conditional subclass overrides -------------------------------------------------

    def conditioning(self, batch: dict, n: int) -> tuple[dict, Predict]:
        """The student's (and theta_minus's) network keyword arguments, and the teacher's ``(x, t) -> Prediction``.

        Unconditional, class-conditional and text-conditional teachers (the batch's prompt keywords, no
        guidance) here; the LCM subclass adds the guidance.
        """
        if self.text_conditional:
            cond = self.text_cond(batch)
            return cond, self._teacher_call(cond)
        cond = {"class_labels": batch["label"]} if self.is_class_conditional else {}
        teacher_cond = {"class_labels": batch["label"]} if self.teacher.num_classes else {}
        return cond, self._teacher_call(teacher_cond)

    def _teacher_call(self, cond: dict) -> Predict:
        den = self.teacher.denoiser

        # x stays float32: the network gets its own dtype's input (Denoiser.network), while the conversion
        # to x0 / eps / v and the solver step run in float32 (in bf16 they would round to a quarter of a step).
        def predict(x: Tensor, t: Tensor) -> Prediction:
            p = den(x, t, **cond)
            return Prediction(p.x0.float(), p.eps.float(), p.v.float())

        return predict

    # --- the loss ----------------------------------------------------------------------------

    def interval_distribution(self) -> Tensor | None:
        """The probability of each grid point as t_{n+k}: None for uniform (torch.randint, the LCM script),
        else :func:`lognormal_interval_probabilities` of the intervals [t_n, t_{n+k}] in EDM sigma."""
        hp = self.hparams
        if hp.timestep_sampling == "uniform":
            return None
        schedule, grid = self.student.schedule, self.train_timesteps
        edm_sigma = lambda t: schedule.snr(t).double().rsqrt()  # noqa: E731 - sigma / alpha; inf at zero SNR
        return lognormal_interval_probabilities(edm_sigma(previous_timesteps(grid, grid)), edm_sigma(grid), hp.p_mean, hp.p_std)

    def draw_intervals(self, n: int, device) -> Tensor:
        """n indices into the training grid: uniform, or from :meth:`interval_distribution`."""
        if self.interval_probabilities is None:
            return torch.randint(0, self.train_timesteps.numel(), (n,), device=device)
        return torch.multinomial(self.interval_probabilities.to(device), n, replacement=True)

    @property
    def target_denoiser(self) -> Denoiser:
        return self.theta_minus if self.theta_minus is not None else self.student

    def compute_loss(self, batch: dict) -> LossOutput:
        hp = self.hparams
        x0 = batch["x"].float()
        n = x0.shape[0]
        idx = self.draw_intervals(n, x0.device)
        t_start = self.train_timesteps.to(x0.device)[idx]
        t_end = previous_timesteps(self.train_timesteps, t_start)
        eps = torch.randn_like(x0)
        schedule = self.student.schedule
        x_start = schedule.add_noise(x0, eps, t_start)
        cond, teacher_predict = self.conditioning(batch, n)
        # Online and target passes share the dropout random state (Song et al.'s official code): fork the
        # RNG around the online pass so the target pass replays the same draws.
        with torch.random.fork_rng(devices=shared_dropout_devices(x0)):
            online = consistency_function(self.student, x_start, t_start, hp.timestep_scaling, **cond)
        _, target = consistency_target(
            teacher_predict, self.target_denoiser, schedule, x_start, t_start, t_end, hp.solver,
            hp.timestep_scaling, hp.solver_substeps, **cond,
        )
        per_sample = consistency_loss(online, target, hp.loss, hp.huber_c)
        loss = per_sample.mean()
        return LossOutput(loss, {"loss": loss, "t_start": t_start.float().mean().detach()})

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Updated here, right after each real optimiser step (not in on_train_batch_end, which runs after
        # ModelCheckpoint's save): a checkpoint always holds the theta_minus that matches its student.
        if self.theta_minus is not None:
            ema_update_(self.theta_minus, self.student, self.hparams.target_decay)

    # --- sampling / export --------------------------------------------------------------------

    def make_scheduler(self):
        """The stock x0 sampler on the teacher's noise schedule: ``LCMScheduler`` on this method's
        training grid (VP), ``FlowMatchLCMScheduler`` (flow; :func:`~lightning_distill.sampling.lcm_scheduler`)."""
        return lcm_scheduler(self, self.hparams.original_inference_steps, self.hparams.timestep_scaling)

    def warn_if_sampler_leaves_grid(self, steps: int) -> None:
        """Warn when the ``steps``-step sampler visits a timestep the student is not trained at.

        ``LCMScheduler`` picks its timesteps from the training grid itself, so it never does; the flow
        sampler (``sampling.at_steps``) visits its own levels (s = 1, ..., 1/K without a shift), which may fall
        between grid levels.
        """
        limit = self.max_sample_steps()
        if steps < 1 or (limit is not None and steps > limit):
            return  # check_sample_steps refuses these when sampling
        sched = self.sampling_scheduler(steps)
        off = levels_off_grid(sched, self.student.schedule, steps, self.train_timesteps)
        if off:
            rank_zero_warn(
                f"{type(self).__name__}: the {steps}-step sampler ({type(sched).__name__}) visits network "
                f"timesteps {[round(t, 3) for t in off]}, which are not on the training grid of "
                f"original_inference_steps = {self.hparams.original_inference_steps} (T = "
                f"{self.student.schedule.num_train_timesteps}); choose N dividing T and a multiple of {steps} "
                "(exact on an unshifted flow path; a flow shift other than 1 moves the stock sampler's levels)"
            )


__all__ = [
    "ConsistencyDistillation",
    "lcm_boundary_scalings",
    "consistency_function",
    "solver_step",
    "solve_ode",
    "substep_timesteps",
    "consistency_loss",
    "consistency_target",
    "skipped_timesteps",
    "consistency_grid",
    "previous_timesteps",
    "off_grid_timesteps",
    "ema_update_",
]
