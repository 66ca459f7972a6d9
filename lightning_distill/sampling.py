"""Samplers shared by several methods: the LCM training grid, the stock ``LCMScheduler`` builder, the x0
sampler (x0 estimate, then fresh noise to the next timestep) and its training-time counterpart,
backward simulation (DMD2, Sec. 4.3), used by consistency distillation, LCM, ADD and DMD2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import ConfigError
from .parametrisation import Denoiser, VPSchedule

if TYPE_CHECKING:
    from .methods.base import DistillationMethod


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


def generator_timesteps(schedule: VPSchedule, num_steps: int) -> Tensor:
    """The K input timesteps of a K-step generator, high to low: t_n = n (T // K) - 1, n = K..1.

    The grid ``LCMScheduler(original_inference_steps=K)`` visits (for T = 1024, K = 4: 1023, 767, 511,
    255); K = 1 gives [T - 1], one step from pure noise.
    """
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


__all__ = [
    "X0_SAMPLER_TIMESTEP_SCALING",
    "backward_simulation",
    "generator_timesteps",
    "lcm_scheduler",
    "lcm_training_timesteps",
]
