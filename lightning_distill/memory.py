"""Memory options for three networks (issue #23 item 4): activation checkpointing, a teacher offloaded to the
CPU between its calls, and the byte counts the memory benchmark and tests read.

What each option trades (numbers: ``benchmarks/results/memory_options.md``; per-GPU estimates for 2B and 12B
students: ``docs/scaling.md``, "Memory for three networks"):

* :func:`enable_gradient_checkpointing` (``gradient_checkpointing: true`` on any method: the student, and
  DMD2's fake score): the diffusers model's own ``enable_gradient_checkpointing()``; its blocks keep their
  inputs only and recompute the rest in the backward pass (about one more forward pass of compute).
* :func:`offload_between_calls` (``teacher_offload: true``): the frozen teacher network's weights live on the
  CPU and are copied to the device of its input for each call, then dropped; the CPU copy is never written,
  so nothing is copied back. Between calls the device holds none of the teacher's weights; each call pays one
  host-to-device copy of them (pinned memory, so it can overlap). On a CPU-only machine it changes nothing.
* The teacher in bf16 (``data.teacher_dtype``) and LoRA networks (``student_lora``, DMD2's
  ``fake_score_lora``, :mod:`lightning_distill.lora`) live elsewhere; this module only counts their bytes.

Measuring: :func:`saved_tensor_bytes` (what autograd keeps for the backward pass), :func:`state_bytes`
(parameters, gradients and optimiser state, each tensor once) and :func:`profiler_peak_bytes` (the CPU
allocator's peak during a ``torch.profiler`` window; on CUDA, ``torch.cuda.max_memory_allocated``).

Example::

    >>> enable_gradient_checkpointing(student.unet, "student")
    >>> offload_between_calls(teacher.unet)        # or DistillationMethod(teacher_offload=True)
    >>> with saved_tensor_bytes() as saved:
    ...     loss = denoising_loss(student, x, t, noise)
    >>> saved.bytes                                 # activations held for backward
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .errors import ConfigError

# --- activation checkpointing ----------------------------------------------------------------------


def enable_gradient_checkpointing(network: nn.Module, what: str = "student") -> nn.Module:
    """Switch on the diffusers model's activation checkpointing (in place; returns ``network``).

    diffusers' default checkpoint function is ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, which
    also works for blocks whose inputs need no gradient (a LoRA network's frozen first layers) and is only active
    when gradients are on, so no-grad calls (a frozen copy, EMA sampling) cost nothing extra.

    Raises:
        ConfigError: ``network`` is not a diffusers model, or its class does not support checkpointing.
    """
    supported = getattr(type(network), "_supports_gradient_checkpointing", False)
    if not callable(getattr(network, "enable_gradient_checkpointing", None)) or not supported:
        raise ConfigError(
            f"gradient_checkpointing: the {what} is a {type(network).__name__}, which has no "
            "enable_gradient_checkpointing(); it needs a diffusers model that supports it (UNet2DModel, "
            "UNet2DConditionModel, DiTTransformer2DModel, SD3 / Flux / SANA transformers), or set "
            "gradient_checkpointing: false"
        )
    network.enable_gradient_checkpointing()
    return network


def gradient_checkpointing_enabled(network: nn.Module) -> bool:
    """Whether ``network`` (a diffusers model) checkpoints its blocks' activations."""
    return bool(getattr(network, "is_gradient_checkpointing", False))


# --- the teacher offloaded to the CPU between calls ------------------------------------------------


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value):
            return value
    return None


class _Offload:
    """The pair of hooks of :func:`offload_between_calls` and the state one call needs.

    A call swaps each weight for a device copy (``setattr`` of a new frozen Parameter / buffer, tied weights
    kept tied) and swaps the CPU originals back afterwards: no ``.data`` surgery, so it works for any pair of
    devices (tests use the meta device) and the CPU tensors are never written.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.home: list[tuple[nn.Module, str, Tensor]] = []  # (owner, name, CPU original) during a call

    def slots(self) -> list[tuple[nn.Module, str, Tensor]]:
        return [(m, n, t) for m in self.network.modules()
                for n, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)) if t is not None]

    def onload(self, module, args, kwargs) -> None:
        x = _first_tensor(args, kwargs)
        if x is None or self.home:
            return  # nothing says where to run, or a re-entrant call that already moved the weights
        device = x.device
        slots = [s for s in self.slots() if s[2].device != device]
        if not slots:
            return  # the input is on the CPU: the offloaded teacher simply runs there
        if torch.is_grad_enabled() and any(torch.is_tensor(v) and v.requires_grad for v in (*args, *kwargs.values())):
            # the backward pass would need the device weights after the call has dropped them
            raise ConfigError(
                f"teacher_offload: the offloaded {type(module).__name__} was called with gradients flowing through "
                "it (e.g. ADD's discriminator on the teacher's features); its device weights are dropped after each "
                "call, so set teacher_offload: false for this method"
            )
        copies: dict[int, Tensor] = {}
        for owner, name, t in slots:
            if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
                # once: later calls copy from page-locked memory, asynchronously
                t = nn.Parameter(t.pin_memory(), requires_grad=False) if isinstance(t, nn.Parameter) else t.pin_memory()
                setattr(owner, name, t)
            self.home.append((owner, name, t))
            if id(t) not in copies:
                moved = t.to(device, non_blocking=True)
                copies[id(t)] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
            setattr(owner, name, copies[id(t)])

    def offload(self, module, args, kwargs, output) -> None:
        # The CPU originals were never modified (the teacher is frozen): putting them back drops the device
        # copies without a device-to-host transfer.
        for owner, name, t in self.home:
            setattr(owner, name, t)
        self.home = []


def offload_between_calls(network: nn.Module) -> nn.Module:
    """Keep ``network``'s weights on the CPU and move them to its input's device for each forward call.

    For a frozen network only (the teacher): the device copy is dropped after the call, not copied back.
    Calling it twice on one network changes nothing. Returns ``network``.

    A LightningModule holding the network must leave it on the CPU when it moves to its device:
    ``DistillationMethod.to`` does so through :func:`kept_on_cpu`. Call it after every copy of the network is
    made (``DistillationMethod.setup``): a deep copy would carry the hooks.
    """
    if is_offloaded(network):
        return network
    if any(p.requires_grad for p in network.parameters()):
        raise ConfigError(f"offload_between_calls is for frozen networks; {type(network).__name__} has trainable weights")
    network.to("cpu")
    hooks = _Offload(network)
    handles = (
        network.register_forward_pre_hook(hooks.onload, with_kwargs=True),
        # always_call: a call that raises (a feature hook that stops the forward pass) still drops the copy
        network.register_forward_hook(hooks.offload, with_kwargs=True, always_call=True),
    )
    network.__dict__["_ld_offload"] = (hooks, handles)  # plain attribute: not a submodule, not in state_dict
    return network


def is_offloaded(network: nn.Module | None) -> bool:
    return network is not None and "_ld_offload" in network.__dict__


def remove_offload(network: nn.Module) -> None:
    """Undo :func:`offload_between_calls` (the weights stay where they are: on the CPU)."""
    hooks, handles = network.__dict__.pop("_ld_offload", (None, ()))
    for handle in handles:
        handle.remove()


def _dtype_in(args: tuple, kwargs: dict) -> torch.dtype | None:
    for value in (*args, kwargs.get("dtype"), kwargs.get("tensor")):
        if isinstance(value, torch.dtype):
            return value
        if torch.is_tensor(value):
            return value.dtype
    return None


@contextlib.contextmanager
def kept_on_cpu(owner: nn.Module | None, name: str, args: tuple = (), kwargs: dict | None = None):
    """While the body runs (a ``Module.to(...)`` of a parent), ``owner.<name>`` is detached from the module tree
    when it is offloaded, so the move leaves it on the CPU; a dtype in ``args`` / ``kwargs`` still applies to it.

    Lightning moves the whole LightningModule to its device before training: without this an offloaded teacher
    would land there in full first (the peak the option exists to avoid).
    """
    network = getattr(owner, name, None) if owner is not None else None
    if not is_offloaded(network):
        yield
        return
    delattr(owner, name)
    try:
        yield
    finally:
        setattr(owner, name, network)
        dtype = _dtype_in(args, kwargs or {})
        if dtype is not None and dtype.is_floating_point:
            network.to(dtype=dtype)


def check_strategy(trainer) -> None:
    """FSDP wraps and moves every submodule itself, the teacher included: refuse the offload there."""
    strategy = type(getattr(trainer, "strategy", None)).__name__
    if "FSDP" in strategy:
        raise ConfigError(
            f"teacher_offload keeps the teacher on the CPU, but the {strategy} strategy shards and moves every "
            "submodule itself; use teacher_offload with the single-device or DDP strategies, or set it to false"
        )


# --- measuring ----------------------------------------------------------------------------------------


class SavedBytes:
    """Running count of :func:`saved_tensor_bytes`: ``bytes`` (distinct storages) and ``tensors`` (saves)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.tensors = 0
        self._storages: set[tuple[str, int]] = set()

    def add(self, t: Tensor) -> Tensor:
        self.tensors += 1
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in self._storages:  # one activation saved by several ops is held once
            self._storages.add(key)
            self.bytes += storage.nbytes()
        return t


@contextlib.contextmanager
def saved_tensor_bytes():
    """Count the bytes autograd saves for the backward pass of the graph built in the body.

    Each distinct storage counts once (parameters included when an op saves them, e.g. a conv's weight).
    Activation checkpointing (non-reentrant) installs its own hooks inside each checkpointed block, so what
    it discards never reaches these: the count drops by the activations it recomputes.
    """
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.add, lambda t: t):
        yield counter


def _unique(tensors: Iterable[Tensor]) -> list[Tensor]:
    seen: dict[int, Tensor] = {}
    for t in tensors:
        if t is not None:
            seen.setdefault(id(t), t)
    return list(seen.values())


def nbytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in _unique(tensors))


def state_bytes(module: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> dict[str, int]:
    """Bytes a training run holds besides activations, each tensor counted once (shared weights too).

    Returns ``{"trainable", "frozen", "grads", "optimizer", "total"}``: trainable / frozen parameters (a LoRA
    network's base and the teacher are frozen), existing gradients, optimiser state tensors.
    """
    params = _unique(module.parameters())
    out = {
        "trainable": nbytes(p for p in params if p.requires_grad),
        "frozen": nbytes(p for p in params if not p.requires_grad),
        "grads": nbytes(p.grad for p in params if p.grad is not None),
        "optimizer": nbytes(
            v for opt in optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
        ),
    }
    out["total"] = sum(out.values())
    return out


def profiler_peak_bytes(prof) -> tuple[int, int]:
    """(peak, end) of the live CPU bytes allocated inside a ``torch.profiler.profile(profile_memory=True)`` window,
    relative to its start.

    The profiler records each operator's allocations net of its frees (``self_cpu_memory_usage``) and frees
    outside operators as ``[memory]`` events; their running sum in time order is the allocator's live-bytes
    curve at operator granularity (a temporary allocated and freed inside one leaf operator is not seen).
    """
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        delta = e.self_cpu_memory_usage
        if delta:
            live += delta
            peak = max(peak, live)
    return peak, live


__all__ = [
    "enable_gradient_checkpointing", "gradient_checkpointing_enabled",
    "offload_between_calls", "is_offloaded", "remove_offload", "kept_on_cpu", "check_strategy",
    "saved_tensor_bytes", "SavedBytes", "state_bytes", "nbytes", "profiler_peak_bytes",
]
