"""Small helpers shared across the package (no imports from the rest of it)."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module):
    """Run the block with ``module`` in eval mode, restoring train mode afterwards if it was on.

    Toggling the mode walks every submodule (~0.5 ms for the digits UNet, a sixth of a 16-image forward
    pass), so a module already in eval mode (e.g. the EMA copy) is left alone. The mode is restored
    when the block raises, too.
    """
    was_training = module.training
    if was_training:
        module.eval()
    try:
        yield module
    finally:
        if was_training:
            module.train()


def lcm_step_limit(scheduler) -> int | None:
    """The most inference steps of an ``LCMScheduler`` (``original_inference_steps``); None for others.

    Its schedules are subsets of that many training-grid timesteps, so it cannot take more steps.
    """
    if type(scheduler).__name__ != "LCMScheduler":
        return None
    return int(scheduler.config.original_inference_steps)
