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
FLOW_MAP_SCHEDULERS = ("FlowMapEulerDiscreteScheduler", "DDIMScheduler")


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
    teacher's own tensors, built without a transient copy, the new input's first layer drawn from ``seed``:
    :func:`~lightning_distill.nn_utils.rebuilt_with_weights`),
    and the new embedding's last linear layer set to 0, so that it adds nothing to the time embedding until
    trained.

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


def flow_map_intervals(scheduler) -> list[tuple[Tensor, Tensor]]:
    """(network timestep, interval t - r in flow time) of each step of a set-up flow-map scheduler.

    * ``FlowMapEulerDiscreteScheduler``: (sigma_k T, sigma_k - sigma_{k+1}); its step is
      z - (sigma_k - sigma_{k+1}) u.
    * ``DDIMScheduler`` (eta 0, no clipping): (t, lam(t) - lam(t')) with t' = t - T // N (DDIM's own
      previous timestep; alpha_bar = ``final_alpha_cumprod`` below 0) and lam = sigma / (alpha + sigma).
      Its step is the flow-map step: with x0_bar, eps_bar the student's mean at x_t = alpha_t x0_bar +
      sigma_t eps_bar (i.e. z_t = (1 - t) x0_bar + t eps_bar), DDIM returns alpha_t' x0_bar + sigma_t'
      eps_bar = (alpha_t' + sigma_t') ((1 - r) x0_bar + r eps_bar), and (1 - r) x0_bar + r eps_bar =
      z_t - (t - r)(eps_bar - x0_bar) = z_t - (t - r) u: the same update, in VP coordinates.
    """
    name = type(scheduler).__name__
    if name == "FlowMapEulerDiscreteScheduler":
        s = scheduler.sigmas
        return [(t, s[k] - s[k + 1]) for k, t in enumerate(scheduler.timesteps)]
    if name == "DDIMScheduler":
        if scheduler.config.clip_sample or scheduler.config.thresholding:
            raise ValueError("a flow-map DDIMScheduler must not clip or threshold (clip_sample=False)")
        ac = scheduler.alphas_cumprod.double()
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)

        def lam(a: Tensor) -> Tensor:
            return (1 - a).sqrt() / (a.sqrt() + (1 - a).sqrt())

        jump = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        out = []
        for t in scheduler.timesteps:
            prev = int(t) - jump
            out.append((t, lam(ac[int(t)]) - lam(ac[prev] if prev >= 0 else final)))
        return out
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
    """
    from diffusers.utils.torch_utils import randn_tensor

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


__all__ = ["FLOW_MAP_SCHEDULERS", "is_flow_map_unet", "flow_map_unet", "flow_map_intervals", "flow_map_sample"]
