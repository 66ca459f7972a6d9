"""Flow-map networks u(z_t, r, t) and their sampler: a UNet with a second time input, and the one loop that
drives it (``MeanFlowDistillation.sample`` and the evaluation of exported folders).

A flow-map network predicts the average velocity over [r, t] and steps z_r = z_t - (t - r) u(z_t, r, t).
Its second input is diffusers' ``class_embed_type="timestep"`` embedding fed the interval (t - r) T. No stock
pipeline passes that interval to a ``UNet2DModel`` (``DDPMPipeline`` passes no ``class_labels``), so
:func:`flow_map_sample` is the loop for both the method and its exported folder, with a stock scheduler whose
``step`` is the flow-map step (:data:`FLOW_MAP_SCHEDULERS`, :func:`flow_map_intervals`). The training
maths is in :mod:`lightning_distill.methods.meanflow`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .nn_utils import eval_mode, rebuilt_with_weights

#: the stock schedulers whose ``step`` is the flow-map step z_r = z_t - (t - r) u (see flow_map_intervals).
FLOW_MAP_SCHEDULERS = ("FlowMapEulerDiscreteScheduler", "DPMSolverMultistepScheduler")

#: The ``DPMSolverMultistepScheduler`` options that make its step the flow-map step of a VP network between
#: consecutive levels of the trailing grid (:func:`flow_map_intervals`): first order, data prediction
#: (``dpmsolver++``), sigmas at the table's own timesteps, the last step onto sigma = 0 (x0).
VP_FLOW_MAP_OPTIONS = {
    "solver_order": 1,
    "algorithm_type": "dpmsolver++",
    "final_sigmas_type": "zero",
    "timestep_spacing": "trailing",
    "thresholding": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "lambda_min_clipped": -float("inf"),
}
#: the keys of a DDPM-family scheduler config that make its alpha_bar table (the rest is its sampler's)
_VP_TABLE_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
)


def is_flow_map_unet(unet: nn.Module) -> bool:
    """A flow-map network: a ``"timestep"`` class embedding (the interval input) and no class table.

    The rule that routes an exported folder to :func:`flow_map_sample`: such a UNet refuses a call without
    ``class_labels``, so no other sampler could drive it, and every MeanFlow student has one.
    """
    cfg = getattr(unet, "config", None) or {}
    return cfg.get("class_embed_type") == "timestep" and not cfg.get("num_class_embeds")


def flow_map_unet(unet: nn.Module, share: bool = False, seed: int = 0) -> nn.Module:
    """The teacher's network with a zero-initialised second time input: rebuilt from its config with
    ``class_embed_type="timestep"`` holding the teacher's weights (a float32 copy, or with ``share`` the
    teacher's own tensors, built without a transient copy: :func:`~lightning_distill.nn_utils.rebuilt_with_weights`),
    the new input's first layer drawn from ``seed`` whichever ``share`` (so ``student_lora.base: shared`` and
    ``copy`` start from the same student, and the global generator is left as it was), and the new
    embedding's last linear layer set to 0, so that it adds nothing to the time embedding until trained.

    Raises:
        ConfigError: for a class-conditional network (its class table is where the interval goes) or a
            network without diffusers' ``class_embed_type`` option.
    """
    cfg = dict(getattr(unet, "config", None) or {})
    if "class_embed_type" not in cfg or type(unet).__name__ != "UNet2DModel":
        raise ConfigError(f"MeanFlow needs a diffusers UNet2DModel teacher (second time input), got {type(unet).__name__}")
    if cfg.get("num_class_embeds") or cfg.get("class_embed_type") is not None:
        raise ConfigError(
            f"MeanFlow does not support class-conditional teachers (num_class_embeds="
            f"{cfg.get('num_class_embeds')}, class_embed_type={cfg.get('class_embed_type')!r}): the class "
            "embedding carries the interval t - r"
        )
    net, new = rebuilt_with_weights(unet, {"class_embed_type": "timestep"}, share=share, seed=seed)
    if any(not k.startswith("class_embedding.") for k in new):
        raise RuntimeError(f"flow-map UNet rebuild lost weights: {new}")
    with torch.no_grad():
        net.class_embedding.linear_2.weight.zero_()
        net.class_embedding.linear_2.bias.zero_()
    return net


def vp_flow_map_scheduler(config: dict, prediction_type: str):
    """The stock sampler of a VP flow-map network: ``DPMSolverMultistepScheduler`` with
    :data:`VP_FLOW_MAP_OPTIONS` on the alpha_bar table of ``config`` (any DDPM-family scheduler's config).

    Why not ``DDIMScheduler`` (the VP sampler before): its step goes from t to t - T // N while its grid is
    round(T - k T / N) - 1, so for N not dividing T a step lands one timestep away from the next one it calls
    the network at (T = 1000, N = 3: 666 -> 333, then a call at 332), the state being read at the wrong level,
    and the last may stop at t = 0 (N = 6: 166 -> 0, sigma_0 = 0.006 of noise left) instead of on x0. No
    DDIM grid fixes both for every N (N jumps of T // N from T - 1 reach below 0 only when N divides T).
    The first-order DPM-Solver++ is DDIM stepped between consecutive grid levels instead, the last onto x0.
    """
    from diffusers import DPMSolverMultistepScheduler

    table = {k: config[k] for k in _VP_TABLE_KEYS if k in config}
    return DPMSolverMultistepScheduler(**table, prediction_type=prediction_type, **VP_FLOW_MAP_OPTIONS)


def flow_map_intervals(scheduler) -> list[tuple[Tensor, Tensor]]:
    """(network timestep, interval t - r in flow time) of each step of a set-up flow-map scheduler.

    Each step goes from the level the network is called at to the next call's level (the last to the clean
    end, r = 0), so every call's (r, t) is the interval stepped.

    * ``FlowMapEulerDiscreteScheduler``: (sigma_k T, sigma_k - sigma_{k+1}); its step is
      z - (sigma_k - sigma_{k+1}) u.
    * ``DPMSolverMultistepScheduler`` with :data:`VP_FLOW_MAP_OPTIONS`: (t_k, lam_k - lam_{k+1}) on its grid
      t_k = round(T - k T / N) - 1 (``NoiseSchedule.trailing_timesteps``), with lam = s / (1 + s) the flow
      time of its sigma s = sigma / alpha (= sigma / (alpha + sigma)), s_N = 0. Its first-order data-prediction
      step from t to r, x_r = (sigma_r / sigma_t) x_t - alpha_r (e^-h - 1) x0_bar with h = log(alpha_r /
      sigma_r) - log(alpha_t / sigma_t), is alpha_r x0_bar + sigma_r eps_bar (eps_bar = (x_t - alpha_t x0_bar)
      / sigma_t): DDIM from t to r. That is the flow-map step: with x0_bar, eps_bar the student's mean at x_t =
      alpha_t x0_bar + sigma_t eps_bar (i.e. z_t = (1 - t) x0_bar + t eps_bar), alpha_r x0_bar + sigma_r eps_bar
      = (alpha_r + sigma_r) ((1 - r) x0_bar + r eps_bar), and (1 - r) x0_bar + r eps_bar = z_t - (t - r)(eps_bar
      - x0_bar) = z_t - (t - r) u: the same update, in VP coordinates.

    Raises:
        ValueError: for another scheduler, or a DPM-Solver configured otherwise (its step would not be the
            flow-map step over these intervals).
    """
    name = type(scheduler).__name__
    if name == "FlowMapEulerDiscreteScheduler":
        s = scheduler.sigmas
        return [(t, s[k] - s[k + 1]) for k, t in enumerate(scheduler.timesteps)]
    if name == "DPMSolverMultistepScheduler":
        wrong = {k: scheduler.config.get(k) for k, v in VP_FLOW_MAP_OPTIONS.items() if scheduler.config.get(k) != v}
        if wrong:
            raise ValueError(f"a flow-map DPMSolverMultistepScheduler needs {VP_FLOW_MAP_OPTIONS}; got {wrong}")
        s = scheduler.sigmas.double()
        lam = s / (1 + s)
        return [(t, lam[k] - lam[k + 1]) for k, t in enumerate(scheduler.timesteps)]
    raise ValueError(f"scheduler {name} is not a flow-map sampler; choose one of {FLOW_MAP_SCHEDULERS}")


@torch.no_grad()
def flow_map_sample(
    unet: nn.Module,
    scheduler,
    n: int,
    steps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Sample a flow-map network in ``steps`` steps: (n, C, H, W) in model space.

    ``DDPMPipeline``'s loop (``randn_tensor`` noise from ``generator``, then ``scheduler.step``) with the
    interval (t - r) T passed to the network as ``class_labels`` (:func:`flow_map_intervals`). The loop
    of :meth:`MeanFlowDistillation.sample` and of exported folders, so both give the same images.

    A ``DDIMScheduler`` (the VP folders exported before :func:`vp_flow_map_scheduler`) is read as its alpha_bar
    table and stepped by that sampler: the same steps where N divides T, the grid's own levels where not.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if type(scheduler).__name__ == "DDIMScheduler":
        scheduler = vp_flow_map_scheduler(scheduler.config, scheduler.config.prediction_type)
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    p = next(unet.parameters())
    device = torch.device(device) if device is not None else p.device
    scheduler.set_timesteps(steps)
    T = scheduler.config.num_train_timesteps
    x = randn_tensor((n, int(cfg.in_channels), int(size), int(size)), generator=generator, device=device)
    with eval_mode(unet):
        for t, interval in flow_map_intervals(scheduler):
            label = (interval * T).to(device=device, dtype=p.dtype).expand(n)
            out = unet(x.to(p.dtype), t.to(device), class_labels=label, return_dict=False)[0].float()
            x = scheduler.step(out, t, x).prev_sample
    return x


__all__ = [
    "FLOW_MAP_SCHEDULERS", "VP_FLOW_MAP_OPTIONS", "is_flow_map_unet", "flow_map_unet", "vp_flow_map_scheduler",
    "flow_map_intervals", "flow_map_sample",
]
