"""Samplers shared by several methods: the stock deterministic sampler of each path (DDIM / flow Euler),
the LCM training grid, the stock x0-sampler builder (``LCMScheduler`` / ``FlowMatchLCMScheduler``: x0
estimate, then fresh noise to the next timestep) and its training-time counterpart, backward simulation
(DMD2, Sec. 4.3), used by consistency distillation, LCM, ADD and DMD2.

Flow-path step grids: ``FlowMatch*Scheduler.set_timesteps(N)`` spaces N levels from 1 down to the
scheduler's smallest training level (1/T), so its default 2-step grid is (1, 0.001) and wastes a
step. Every flow sampler here is instead built for its step count with ``shift_terminal`` at the
last non-zero level of the trailing grid (:meth:`NoiseSchedule.trailing_timesteps`): for shift 1 it
visits s = 1, (N-1)/N, ..., 1/N, 0 (Flux's grid), the grid flow students are trained on. An exported
flow pipeline carries the scheduler of its trained step count K, so a call with ``num_inference_steps=K``
reproduces the framework's samples exactly. The stock stretch visits other levels at another count
(and gives NaN sigmas at 1 step when K >= 2): rebuild the scheduler with :func:`at_steps` for it.

The pipelines set those N steps two ways, and the framework follows the network's own
(:func:`set_pipeline_steps`, wherever it samples or picks the levels a few-step student trains at):
``DDPMPipeline`` and ``StableDiffusion3Pipeline`` call ``set_timesteps(N)`` (the grid above), ``FluxPipeline``
calls ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)``, which on the scheduler :func:`at_steps` built
visits shift(1 - k/N), the trailing grid where N divides T, at any shift (Flux at 4096 tokens, N = 4: 1, 0.9045,
0.7595, 0.513, where ``set_timesteps(4)`` would give 1, 0.933, 0.810, 0.513).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError
from .parametrisation import Denoiser, FlowSchedule, NoiseSchedule, as_flow_matching

if TYPE_CHECKING:
    from .methods.base import DistillationMethod


#: the stock scheduler of each path for a deterministic multi-step sampler and for an x0 sampler.
STOCK_SAMPLERS = {
    "vp": {"ddim": "DDIMScheduler", "x0": "LCMScheduler"},
    "flow": {"ddim": "FlowMatchEulerDiscreteScheduler", "x0": "FlowMatchLCMScheduler"},
}


#: what the stock VP samplers (DDIM, LCM, DPM-Solver) accept as ``prediction_type``: not the flow velocity.
VP_SAMPLER_PREDICTIONS = ("epsilon", "sample", "v_prediction")


def flow_scheduler(kind: str, schedule: FlowSchedule):
    """A stock flow scheduler (``kind`` "ddim": Euler, "x0": LCM) on ``schedule``'s T and static shift."""
    import diffusers

    cls = getattr(diffusers, STOCK_SAMPLERS["flow"][kind])
    return cls(num_train_timesteps=schedule.num_train_timesteps, shift=schedule.shift)


def at_steps(scheduler, steps: int, schedule: NoiseSchedule | None = None):
    """The scheduler to take ``steps`` steps with: VP schedulers unchanged; a flow one rebuilt with
    ``shift_terminal`` so that ``set_timesteps(steps)`` visits the trailing grid (module docstring).

    ``schedule`` defaults to the one the scheduler's config describes (a static shift). A flow-sigma DPM-Solver /
    UniPC scheduler (a SANA or Wan folder's) is rebuilt as the ``FlowMatchEulerDiscreteScheduler`` of its path
    (:func:`~lightning_distill.parametrisation.flow_matching_config`), as the teacher reads it: its folder then
    samples as the teacher does.
    """
    scheduler = as_flow_matching(scheduler)  # before the VP test: a flow-sigma solver has a (VP) alphas_cumprod too
    if not hasattr(scheduler, "sigmas") or hasattr(scheduler, "alphas_cumprod"):
        return scheduler
    schedule = schedule if schedule is not None else FlowSchedule.from_scheduler(scheduler)
    cfg = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}  # _use_default_values resets keys
    cfg.update(shift=schedule.shift, use_dynamic_shifting=False, shift_terminal=None)
    if steps >= 2:  # one step goes from s = 1 straight to 0; stretching a one-point grid would divide by 0
        cfg["shift_terminal"] = float(schedule.sigma(schedule.trailing_timesteps(steps)[-2]))
    return type(scheduler).from_config(cfg)


def set_pipeline_steps(scheduler, steps: int, schedule: NoiseSchedule, device=None):
    """``scheduler.set_timesteps`` for ``steps`` steps the way the network's stock pipeline calls it; returns it.

    A flow schedule with ``linspace_sigmas`` (the Flux family, :class:`~lightning_distill.parametrisation.FlowSchedule`)
    gets ``FluxPipeline``'s call, ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)``; every other scheduler
    (VP, SD3, unconditional flow folders) the plain ``set_timesteps(N)``. ``mu`` matters only to a scheduler
    that still shifts dynamically (a teacher's own; :func:`at_steps` fixes the shift): the one whose shift is
    ``schedule.shift`` (e^mu for exponential time shifting, mu for linear).
    """
    flow = hasattr(scheduler, "sigmas") and not hasattr(scheduler, "alphas_cumprod")  # as at_steps tells them
    if not (flow and getattr(schedule, "linspace_sigmas", False)):
        scheduler.set_timesteps(steps, device=device)
        return scheduler
    mu = None
    if scheduler.config.get("use_dynamic_shifting"):
        exponential = scheduler.config.get("time_shift_type", "exponential") == "exponential"
        mu = math.log(schedule.shift) if exponential else schedule.shift
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu, device=device)
    return scheduler


def deterministic_scheduler(
    scheduler_config: dict, schedule: NoiseSchedule, prediction_type: str, clip_x0: float | None
):
    """The stock deterministic sampler of a network: DDIM (eta = 0, trailing spacing, last step onto x0,
    clipping as ``clip_x0``) on the VP path, ``FlowMatchEulerDiscreteScheduler`` on the flow path.

    Students and teachers alike, so step counts mean the same grid. Take a flow one through
    :func:`at_steps` before sampling, and set its steps with :func:`set_pipeline_steps`.
    """
    if schedule.path == "flow":
        if prediction_type != "flow_prediction":
            raise ConfigError(
                f"a flow-matching sampler steps with the velocity: the network must be a flow_prediction one, not {prediction_type!r}"
            )
        return flow_scheduler("ddim", schedule)
    from diffusers import DDIMScheduler

    if prediction_type not in VP_SAMPLER_PREDICTIONS:
        raise ConfigError(
            f"a VP sampler (DDIMScheduler) steps with {', '.join(VP_SAMPLER_PREDICTIONS)}: prediction_type "
            f"{prediction_type!r} has no stock VP sampler"
        )
    cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    cfg["prediction_type"] = prediction_type
    # Trailing spacing starts at the last training timestep (pure noise for zero-terminal-SNR
    # schedules), which few-step samplers need; set_alpha_to_one makes the last step land on x0.
    # No dynamic thresholding (a teacher may ship it on, e.g. DeepFloyd IF): the step stays linear in the
    # prediction, which sample() computes and progressive distillation's target assumes.
    cfg.update(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=clip_x0 is not None,
               clip_sample_range=clip_x0 or 1.0, thresholding=False)
    return DDIMScheduler.from_config(cfg)


def flow_map_scheduler(config: dict, schedule: NoiseSchedule, prediction_type: str):
    """The stock sampler of a flow-map (MeanFlow) student: ``FlowMapEulerDiscreteScheduler`` (T, the
    path's shift) on the flow path; on the VP path the first-order ``DPMSolverMultistepScheduler`` (trailing,
    onto x0: :func:`~lightning_distill.flow_map.vp_flow_map_scheduler`), whose step with the mean (x0, eps)
    is the flow-map step between consecutive grid levels, for any N (DDIM's t -> t - T // N is not when N
    does not divide T). No clipping: a clamped x0 would no longer be that step."""
    if schedule.path == "flow":
        from diffusers import FlowMapEulerDiscreteScheduler

        return FlowMapEulerDiscreteScheduler(num_train_timesteps=schedule.num_train_timesteps, shift=schedule.shift)
    from .flow_map import vp_flow_map_scheduler

    return vp_flow_map_scheduler(config, prediction_type)


def lcm_training_timesteps(num_train_timesteps: int, original_inference_steps: int) -> Tensor:
    """The LCM training grid t_n = n k - 1, n = 1..N, k = T // N (ascending), as ``LCMScheduler.set_timesteps``.

    Every inference schedule of LCMScheduler with this ``original_inference_steps`` is a subset of this
    grid, so training on it trains exactly the timesteps the sampler visits.
    """
    if not 1 <= original_inference_steps <= num_train_timesteps:
        raise ConfigError(
            f"original_inference_steps must lie in [1, {num_train_timesteps}], got {original_inference_steps}"
        )
    k = num_train_timesteps // original_inference_steps
    return torch.arange(1, original_inference_steps + 1) * k - 1


#: sigma_data of LCMScheduler.get_scalings_for_boundary_condition_discrete (hard-coded there).
LCM_SIGMA_DATA = 0.5


def lcm_boundary_scalings(
    t: Tensor, timestep_scaling: float = 10.0, sigma_data: float = LCM_SIGMA_DATA
) -> tuple[Tensor, Tensor]:
    """c_skip(t), c_out(t) exactly as diffusers' ``LCMScheduler.get_scalings_for_boundary_condition_discrete``.

    With s = t * timestep_scaling:  c_skip = sigma_data^2 / (s^2 + sigma_data^2),
    c_out = s / sqrt(s^2 + sigma_data^2). So c_skip(0) = 1 and c_out(0) = 0 exactly: f(x, 0) = x.

    Known discrepancy (METHODS.md section 3): Song et al.'s c_out is (sigma - sigma_min) sigma_data /
    sqrt(sigma^2 + sigma_data^2); the LCM script and LCMScheduler drop the sigma_data factor, so their
    c_out tends to 1 (not sigma_data) at high noise. We keep diffusers' form on purpose: the exported
    ``LCMScheduler`` applies it at sampling time, and training must use the same function.

    Args:
        t: integer timesteps (any shape).
        timestep_scaling: LCMScheduler's ``timestep_scaling`` (10 by default); larger makes c_skip fall faster.
        sigma_data: 0.5 in LCMScheduler.

    Returns:
        (c_skip, c_out), float32 tensors shaped like ``t``.
    """
    scaled = torch.as_tensor(t).float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def x0_sampler_scalings(schedule: NoiseSchedule, t: Tensor, timestep_scaling: float) -> tuple[Tensor, Tensor]:
    """c_skip(t), c_out(t) that the path's stock x0 sampler (:func:`lcm_scheduler`) applies to a network's
    x0 estimate: the sampler steps from f(x_t, t) = c_skip x_t + c_out x0(x_t, t), the consistency
    function a student of that sampler is trained as.

    * ``LCMScheduler`` (VP): :func:`lcm_boundary_scalings`, whose c_skip(0) = 1, c_out(0) = 0 give f(x, 0) = x.
    * ``FlowMatchLCMScheduler`` (flow): none, i.e. c_skip = 0, c_out = 1 (``timestep_scaling`` unused):
      f = x0 = x_s - s u, which at s = 0 is x_s already, so the boundary condition needs no scalings.

    Returns:
        (c_skip, c_out), float32 tensors shaped like ``t``.
    """
    if schedule.path == "flow":
        t = torch.as_tensor(t).float()
        return torch.zeros_like(t), torch.ones_like(t)
    return lcm_boundary_scalings(t, timestep_scaling)


#: ``timestep_scaling`` that makes LCMScheduler's boundary scalings the identity for t >= 1
#: (c_skip = 0.25 / ((1000 t)^2 + 0.25) < 3e-7): the sampler then takes a student's x0 estimate as it is
#: and re-noises it with fresh noise (the multistep sampler of ADD and multi-step DMD2 generators).
X0_SAMPLER_TIMESTEP_SCALING = 1000.0


def lcm_scheduler(method: DistillationMethod, original_inference_steps: int, timestep_scaling: float):
    """A stock ``LCMScheduler`` on ``method``'s noise schedule: x0 estimate, then fresh noise to the next t.

    Its inference timesteps are subsets of :func:`lcm_training_timesteps` (``original_inference_steps``).
    Raises if the scheduler rebuilt from the teacher's config does not reproduce the student's
    ``alphas_cumprod`` (a teacher scheduler with betas LCMScheduler cannot express).
    """
    import diffusers

    if method.student.path == "flow":
        # FlowMatchLCMScheduler: x0 = x_s - s u, then (1 - s') x0 + s' eps; no boundary scalings to match.
        if method.student.prediction_type != "flow_prediction":
            raise ConfigError("a flow-matching x0 sampler needs a flow_prediction student")
        return flow_scheduler("x0", method.student.schedule)
    src = dict(method.student_scheduler_config)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    cfg = {k: src[k] for k in keys if k in src}
    cfg.update(
        prediction_type=method.student.prediction_type,
        original_inference_steps=original_inference_steps,
        timestep_scaling=timestep_scaling,
        clip_sample=method.student.clip_x0 is not None,
        clip_sample_range=method.student.clip_x0 or 1.0,
        set_alpha_to_one=True,
        thresholding=False,
    )
    sched = diffusers.LCMScheduler(**cfg)
    ours = method.student.schedule.alphas_cumprod_table.cpu()
    if ours.shape != sched.alphas_cumprod.shape or not torch.allclose(ours, sched.alphas_cumprod.float(), atol=1e-6):
        raise ConfigError(
            "LCMScheduler rebuilt from the teacher's scheduler config does not reproduce the teacher's "
            f"alphas_cumprod (teacher scheduler {method.teacher.scheduler_class}); pass trained_betas in its config"
        )
    return sched


@torch.no_grad()
def text_to_image_loop(denoiser: Denoiser, scheduler, x: Tensor, generator: torch.Generator | None = None, **cond) -> Tensor:
    """The sampling loop of diffusers' text-to-image pipelines (``LatentConsistencyModelPipeline``,
    ``StableDiffusion3Pipeline``) from initial latents ``x``, with ``scheduler`` already ``set_timesteps``.

    Each step calls the network with the scheduler's timestep and the conditioning keywords ``cond``
    (text embeddings, LCM's ``timestep_cond``), then ``scheduler.step(..., generator=generator)`` on the
    latents in the layout the network's stock pipeline steps them in (``backbones.to_pipeline_layout``; Flux:
    packed, so a multi-step ``FlowMatchLCMScheduler`` draws its fresh noise as ``FluxPipeline`` does). The result
    is the last step's x0 estimate where the scheduler returns one (``LCMScheduler``'s ``denoised``), else
    its last sample (``FlowMatch*Scheduler``s; ``FlowMatchLCMScheduler``'s last step lands on its x0).
    """
    from . import backbones

    net, shape = denoiser, x.shape
    while not hasattr(net, "unet") and hasattr(net, "denoiser"):  # a wrapper of a Denoiser (metrics.GuidedNetwork)
        net = net.denoiser
    net = getattr(net, "unet", None)  # None (no network to ask): the latents' own layout
    denoised = x
    for t in scheduler.timesteps:
        out = denoiser.network(x, t, **cond)
        x, *x0 = scheduler.step(backbones.to_pipeline_layout(net, out), t, backbones.to_pipeline_layout(net, x),
                                generator=generator, return_dict=False)
        x, x0 = backbones.from_pipeline_layout(net, x, shape), [backbones.from_pipeline_layout(net, v, shape) for v in x0]
        denoised = x0[0] if x0 else x
    return denoised


@torch.no_grad()
def text_to_image_sample(
    method: DistillationMethod, n: int, steps: int | None, generator: torch.Generator | None, text_cond: dict,
    denoiser: Denoiser | None = None, **extra_cond,
) -> Tensor:
    """``n`` latents from ``method``'s student sampler in a text-to-image pipeline's loop (LCM, DMD2, ...).

    Initial latents from ``randn_tensor`` with ``generator`` in the text embeddings' dtype (times the
    scheduler's ``init_noise_sigma`` where it has one), then :func:`text_to_image_loop` with the text
    keywords ``text_cond`` (:meth:`DiffusionTeacher.text_conditioning`) and ``extra_cond`` (cast to the
    latents' dtype: LCM's ``timestep_cond``).
    """
    from diffusers.utils.torch_utils import randn_tensor

    from .nn_utils import eval_mode

    den = denoiser or method.sampling_denoiser()
    device = next(den.parameters()).device
    steps = steps or method.hparams.sample_steps
    method.check_sample_steps(steps)
    cond = {k: v.to(device) for k, v in text_cond.items()}
    sched = method.sampling_scheduler(steps)  # built once per count; set_timesteps resets it
    set_pipeline_steps(sched, steps, method.student.schedule, device=device)
    x = randn_tensor((n, *method.sample_shape), generator=generator, device=device,
                     dtype=cond["encoder_hidden_states"].dtype)
    x = x * getattr(sched, "init_noise_sigma", 1.0)  # the flow schedulers (and SD3 pipeline) have none
    cond.update({k: v.to(device=device, dtype=x.dtype) for k, v in extra_cond.items()})
    with eval_mode(den):
        return text_to_image_loop(den, sched, x, generator, **cond)


def generator_timesteps(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """The K input timesteps of a K-step x0-sampler student (ADD, DMD2), high to low: those the path's
    stock x0 sampler (:func:`lcm_scheduler`) visits at K steps, so the student trains where it is sampled.

    * VP: the grid of ``LCMScheduler(original_inference_steps=K)``, t_n = n (T // K) - 1, n = K..1 (for
      T = 1024, K = 4: 1023, 767, 511, 255).
    * flow: the levels ``FlowMatchLCMScheduler`` visits through :func:`at_steps`, each rounded to the
      nearest training level (at most half a level away). Without a shift they are s = 1, (K-1)/K, ...,
      1/K, the trailing grid. With a shift (SD3: 3) and K >= 3 the stock grid is the shifted linspace
      stretched to end at shift(1/K) (``shift_terminal``), not shift(1 - k/K): at shift 3, K = 4 it feeds
      the network 1000, 928, 799, 500, where shift(1 - k/K) would be 1000, 900, 750, 500. A Flux-family
      schedule (``linspace_sigmas``) sets its steps as ``FluxPipeline`` does (:func:`set_pipeline_steps`) and
      visits shift(1 - k/K) itself.

    K = 1 gives [T - 1], one step from pure noise, on both paths.
    """
    if schedule.path == "flow":
        sampler = set_pipeline_steps(at_steps(flow_scheduler("x0", schedule), num_steps, schedule), num_steps, schedule)
        visits = sampler.sigmas[:-1].double().cpu()
        levels = schedule.sigma(torch.arange(schedule.num_train_timesteps)).double().cpu()
        return (levels[None, :] - visits[:, None]).abs().argmin(1)
    return lcm_training_timesteps(schedule.num_train_timesteps, num_steps).flip(0)


@torch.no_grad()
def backward_simulation(
    generator: Denoiser, z: Tensor, timesteps: Tensor, index: int, rng: torch.Generator | None = None, **cond
) -> Tensor:
    """Run the generator's own first ``index`` steps from noise ``z`` (DMD2, Sec. 4.3).

    Returns the state x_{t_index} the generator sees at step ``index`` at inference time, so training
    inputs match inference inputs: each step takes the generator's x0 estimate at t_j (clipped as the
    sampler clips it) and re-noises it with fresh noise (drawn from ``rng``) to t_{j+1}, which is what
    the exported ``LCMScheduler`` sampler does.
    """
    x = z
    for j in range(index):
        x0 = generator(x, timesteps[j], **cond).x0
        eps = torch.randn(x0.shape, generator=rng, device=x0.device, dtype=x0.dtype)
        x = generator.schedule.add_noise(x0, eps, timesteps[j + 1].expand(x0.shape[0]))
    return x



def off_grid_timesteps(visited: Tensor, trained: Tensor, atol: float = 1e-2) -> list[float]:
    """The sampler timesteps in ``visited`` (``scheduler.timesteps``: the network's timestep units) farther
    than ``atol`` from every trained one (``trained``, same units): levels the student never trained at."""
    visited = torch.as_tensor(visited).double().flatten()
    trained = torch.as_tensor(trained).double().flatten().to(visited.device)
    far = (visited[:, None] - trained[None, :]).abs().amin(dim=1) > atol
    return visited[far].tolist()


def consistency_grid(schedule: NoiseSchedule, original_inference_steps: int, served_steps=(1, 2, 4)) -> Tensor:
    """The training timesteps, ascending: the LCM grid t = n k - 1 (:func:`lcm_training_timesteps`) and, on the
    flow path, the levels the stock K-step sampler visits for each K in ``served_steps`` (each the nearest
    training level, :func:`~lightning_distill.sampling.generator_timesteps`), so the student is trained where
    it is sampled. Unshifted with K dividing N those are grid levels already and the grid is the LCM grid; a
    shifted path (SD3: 3) visits others (at N = 40, K = 4: 928 and 799 between the grid's levels). On the VP
    path ``LCMScheduler`` picks its timesteps from the grid itself."""
    T = schedule.num_train_timesteps
    grid = lcm_training_timesteps(T, original_inference_steps)
    if schedule.path != "flow":
        return grid
    limit = original_inference_steps
    visited = [generator_timesteps(schedule, k) for k in sorted(set(served_steps)) if 1 <= k <= limit]
    levels = torch.cat([grid, *[v.to(grid.dtype) for v in visited]])
    return torch.unique(levels[levels >= 1])  # sorted; level 0 is the boundary every chain ends at


def previous_timesteps(grid: Tensor, t_start: Tensor) -> Tensor:
    """t_n for each t_start of the ascending ``grid``: the next lower grid timestep, 0 (the boundary) below
    the lowest. On the plain LCM grid this is :func:`skipped_timesteps` (t - k, clamped at 0)."""
    grid = grid.to(t_start.device)
    idx = torch.searchsorted(grid, t_start)
    return torch.where(idx > 0, grid[(idx - 1).clamp_min(0)], torch.zeros_like(t_start))


def lognormal_interval_probabilities(sigma_end: Tensor, sigma_start: Tensor, p_mean: float, p_std: float) -> Tensor:
    """p(i): the mass a log-normal noise level, log sigma ~ N(P_mean, P_std^2), puts on each grid interval
    [sigma_end_i, sigma_start_i] (Song & Dhariwal 2023, improved consistency training, Sec. 3.5:
    p(sigma_i) proportional to erf((log sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((log sigma_i - P_mean) /
    (sqrt 2 P_std)); they use P_mean = -1.1, P_std = 2.0). The sigmas are EDM noise levels, sigma / alpha of
    the path; an infinite one (zero terminal SNR, the flow path's s = 1) counts as erf = 1.
    """
    def cdf(sigma: Tensor) -> Tensor:
        return torch.erf((sigma.double().log() - p_mean) / (2.0**0.5 * p_std))

    mass = (cdf(sigma_start) - cdf(sigma_end)).clamp_min(0.0)
    if not bool(mass.sum() > 0):
        raise ConfigError(f"the log-normal N({p_mean}, {p_std}^2) puts no mass on the training grid's intervals")
    return (mass / mass.sum()).float()


def levels_off_grid(scheduler, schedule: NoiseSchedule, steps: int, trained: Tensor) -> list[float]:
    """Network timesteps the ``steps``-step x0 sampler ``scheduler`` visits that are not training levels in
    ``trained``: on the flow path the nearest training level of each visited one (:func:`generator_timesteps`,
    half a level away at most, as ADD / DMD2 train) must be in ``trained``; ``LCMScheduler`` (VP) visits
    timesteps itself, compared directly (:func:`off_grid_timesteps`)."""
    if schedule.path == "flow":
        kept = set(trained.tolist())
        return [float(schedule.model_timestep(lv)) for lv in generator_timesteps(schedule, steps) if int(lv) not in kept]
    set_pipeline_steps(scheduler, steps, schedule)
    return off_grid_timesteps(scheduler.timesteps, schedule.model_timestep(trained))


def sampler_grid_gap(scheduler, schedule: NoiseSchedule, num_steps: int) -> float:
    """The largest distance, in the path's sigma, between the noise levels the stock deterministic sampler
    visits at ``num_steps`` steps and the trailing grid (a progressive-distillation student's); 0 where they coincide.

    DDIM steps from each of its timesteps t to t - T // N (clean below 0), so when N does not divide T
    its steps land between the trained levels, and the last may stop at t = 0 with noise left. A flow
    Euler sampler with a shift visits diffusers' stretched grid, not the trailing one, unless its pipeline
    sets Flux's sigmas (module docstring).
    """
    sched = set_pipeline_steps(at_steps(scheduler, num_steps, schedule), num_steps, schedule)
    trained = schedule.sigma(schedule.trailing_timesteps(num_steps)).double()
    if hasattr(sched, "alphas_cumprod"):
        t = sched.timesteps.long()
        prev = (t - schedule.num_train_timesteps // num_steps).clamp_min(-1)
        starts, ends = schedule.sigma(t).double(), schedule.sigma(prev).double()
        return float(torch.maximum((starts - trained[:-1]).abs(), (ends - trained[1:]).abs()).max())
    visited = sched.sigmas[: num_steps + 1].double()
    return float((visited - trained).abs().max())


__all__ = [
    "STOCK_SAMPLERS",
    "X0_SAMPLER_TIMESTEP_SCALING",
    "at_steps",
    "consistency_grid",
    "levels_off_grid",
    "off_grid_timesteps",
    "previous_timesteps",
    "sampler_grid_gap",
    "set_pipeline_steps",
    "VP_SAMPLER_PREDICTIONS",
    "deterministic_scheduler",
    "flow_map_scheduler",
    "flow_scheduler",
    "backward_simulation",
    "generator_timesteps",
    "LCM_SIGMA_DATA",
    "lcm_boundary_scalings",
    "lcm_scheduler",
    "lcm_training_timesteps",
    "text_to_image_loop",
    "text_to_image_sample",
    "x0_sampler_scalings",
]
