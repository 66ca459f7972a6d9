"""Small helpers shared across the package (imports nothing from it but its error type)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from .errors import ConfigError


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


#: how the continuous-time methods (sCD, MeanFlow) take a network's time derivative.
JVPMode = Literal["forward", "finite_difference"]
JVP_MODES = ("forward", "finite_difference")


@contextmanager
def forward_ad_attention(device_type: str):
    """Run a forward-mode JVP: PyTorch's math attention kernel and no autocast.

    The fused attention kernels (flash on CPU and GPU, memory-efficient on GPU) have no forward-mode
    derivative; the math kernel has one, at its memory cost (the attention matrix per head). bf16 autocast
    casts an op's primal inputs but not their tangents (a float tangent meets a bf16 weight in the first
    convolution), so the JVP runs in the weights' own dtype.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), torch.autocast(device_type, enabled=False):
        yield


def lcm_step_limit(scheduler) -> int | None:
    """The most inference steps of an ``LCMScheduler`` (``original_inference_steps``); None for others.

    Its schedules are subsets of that many training-grid timesteps, so it cannot take more steps.
    """
    if type(scheduler).__name__ != "LCMScheduler":
        return None
    return int(scheduler.config.original_inference_steps)


class _StopForward(Exception):
    """Raised from a forward hook once every tapped block has run: skips the rest of the network."""


def _first_tensor(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]  # diffusers down blocks return (hidden_states, res_samples)
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"cannot take a feature tensor from a {type(output).__name__} output")


class FeatureTap:
    """Forward hooks on named blocks of one network: ``with tap: net(...)`` fills ``tap.features``.

    The one feature grabber of the package: knowledge distillation's feature losses and the
    discriminators' feature networks both read block outputs through it. Hooks live only inside the
    ``with`` block, so copies of the network (the EMA callback's ``deepcopy``) carry none.

    Args:
        network: the network whose blocks are tapped.
        names: block paths (``named_modules`` names), or a dict mapping the key a feature is stored
            under to its block path.
        stop: end the forward pass once every tapped block has run (the rest of the network, e.g. a
            UNet's decoder, is never evaluated; the ``with`` block then ends quietly).
        select: the feature tensor of a block's output (default: the output itself, the first element of
            a tuple, or ``last_hidden_state``); e.g. the image stream of an MMDiT block's
            ``(encoder_hidden_states, hidden_states)``.

    Example::

        >>> tap = FeatureTap(unet, ["down_blocks.1", "mid_block"], stop=True)
        >>> with tap:
        ...     unet(x, t)
        >>> tap.features["mid_block"].shape
    """

    def __init__(self, network: nn.Module, names, stop: bool = False, select=None) -> None:
        names = dict(names) if isinstance(names, dict) else {n: n for n in names}
        # Feature networks build a tap per forward pass: look up only the named paths (walking every
        # module of the network is left to the error message).
        blocks, unknown = {}, []
        for key, path in names.items():
            try:
                blocks[key] = network.get_submodule(path)
            except AttributeError:
                unknown.append(path)
        if unknown or not names:
            known = [n for n, _ in network.named_modules() if n and n.count(".") <= 1]
            raise ConfigError(f"no block named {unknown or '(none given)'} in {type(network).__name__}; blocks: {known[:24]}")
        self.network_name = type(network).__name__
        self.blocks = blocks
        self.stop = stop
        self.select = select or _first_tensor
        self.features: dict[str, Tensor] = {}
        self._handles: list = []

    def _hook(self, key: str):
        def fn(_module, _inputs, output):
            self.features[key] = self.select(output)
            if self.stop and len(self.features) == len(self.blocks):
                raise _StopForward

        return fn

    def __enter__(self) -> "FeatureTap":
        self.features = {}
        self._handles = [block.register_forward_hook(self._hook(key)) for key, block in self.blocks.items()]
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if exc_type is None or exc_type is _StopForward:
            missing = [key for key in self.blocks if key not in self.features]
            if missing:
                raise RuntimeError(f"{self.network_name}: tapped blocks {missing} were never called in forward")
        return exc_type is _StopForward


def capture_features(network: nn.Module, names, run, select=None) -> list[Tensor]:
    """Run ``run()`` and return the outputs of the blocks ``names`` in order, stopping after the last one
    (``select``: as :class:`FeatureTap`'s)."""
    names = list(names)
    with FeatureTap(network, names, stop=True, select=select) as tap:
        run()
    return [tap.features[n] for n in names]


def content_digest(*items: "Tensor | nn.Module | str") -> str:
    """A sha256 of tensors' bytes (with shapes and dtypes), modules' state dicts (names and tensors) and
    strings, in order: part of a cache key that must change when the weights or the data behind it do."""
    import hashlib

    h = hashlib.sha256()

    def tensor(t: Tensor) -> None:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())  # the buffer itself, no copy

    for item in items:
        if isinstance(item, nn.Module):
            for name, value in item.state_dict().items():
                h.update(name.encode())
                tensor(value)
        elif isinstance(item, Tensor):
            tensor(item)
        else:
            h.update(str(item).encode())
    return h.hexdigest()[:24]


def rebuilt_with_weights(
    network: nn.Module, changes: dict, share: bool = False, seed: int = 0
) -> tuple[nn.Module, list[str]]:
    """``network``'s diffusers class built from its config with ``changes``, holding ``network``'s weights
    wherever a name and shape match; returns it and the names of the tensors ``network`` had none for.

    ``share=False``: a float32 copy. ``share=True``: the matching tensors *are* ``network``'s (its dtype and
    device). The network is built on the meta device, so no copy of it exists even for a moment (a float32
    copy of an SD-size UNet is 3.4 GB of host memory); the new tensors are made float32 on ``network``'s
    device. Either way the modules holding only new tensors are initialised by their ``reset_parameters``
    from ``seed``, in ``named_modules`` order, with the global generator untouched: a rebuild when resuming a
    checkpoint that leaves the frozen base out gives the same tensors, both settings give the same network
    (a LoRA student's ``base: shared`` and ``copy`` start alike), and building it moves no later training draw.

    Raises:
        RuntimeError: (``share``) a module holding both matched and new tensors, or a new tensor whose module
            has no ``reset_parameters``: it cannot be initialised without writing into ``network``'s tensors.
    """
    config = {k: v for k, v in network.config.items() if not k.startswith("_")}  # `_use_default_values` would
    config.update(changes)  # make from_config ignore a changed default
    theirs = network.state_dict()
    if not share:
        with torch.random.fork_rng(devices=[]):  # built on the CPU: the class's own draws leave no trace
            torch.manual_seed(seed)
            net = type(network).from_config(config).float()
        own = net.state_dict()
        matching = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
        net.load_state_dict(matching, strict=False)
        new = {k for k in own if k not in matching}
        fresh = []  # as share=True picks them: a module with a new tensor of its own and no matched one below it
        for prefix, module in net.named_modules():
            keys = [f"{prefix}.{k}" if prefix else k for k in module.state_dict()]
            mine = [k for k in keys if "." not in k.removeprefix(f"{prefix}.")]
            if any(k in new for k in mine) and all(k in new for k in keys) and hasattr(module, "reset_parameters"):
                fresh.append(module)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in fresh:
                module.reset_parameters()
        return net, [k for k in net.state_dict() if k in new]
    with torch.device("meta"):
        net = type(network).from_config(config)
    own = net.state_dict()
    matching = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    net.load_state_dict(matching, strict=False, assign=True)
    buffers = dict(network.named_buffers())  # non-persistent ones are not in a state dict
    fresh = []
    for module_name, module in net.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            if buf.is_meta and full in buffers and buffers[full].shape == buf.shape:
                module.register_buffer(name, buffers[full], persistent=name in module.state_dict())
        if not any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
            continue
        # its reset_parameters may reach its children: none of them may hold the network's tensors
        if not all(t.is_meta for t in [*module.parameters(), *module.buffers()]) or not hasattr(module, "reset_parameters"):
            raise RuntimeError(
                f"cannot initialise the new tensors of {module_name or type(net).__name__} ({type(module).__name__}) "
                "without a copy of the network: rebuild it with share=False"
            )
        fresh.append(module)
    device = next(network.parameters()).device
    with torch.random.fork_rng(devices=[]):  # initialised on the CPU: no accelerator generator is touched
        torch.manual_seed(seed)
        for module in fresh:
            module.to_empty(device="cpu", recurse=False)
        for module in fresh:
            module.reset_parameters()
    for module in fresh:
        module.to(device)
    return net, [k for k in own if k not in matching]
