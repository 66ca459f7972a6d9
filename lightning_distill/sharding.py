"""FSDP2 (``torch.distributed.fsdp.fully_shard``) of the method's networks under Lightning's ``ModelParallelStrategy``.

``ModelParallelStrategy`` neither wraps nor synchronises anything itself: it builds a device mesh and calls
the LightningModule's ``configure_model``, where :func:`configure_model` shards every
:class:`~lightning_distill.parametrisation.Denoiser` network of the method (the student and its copies:
consistency distillation's theta_minus, DMD2's fake score). Each block of :data:`BLOCKS` (the classes of
``configs/strategies/fsdp.yaml``'s wrap policy) becomes one FSDP unit, gathered only while it runs; the
network itself is the root unit holding what lies outside the blocks. The frozen teacher stays whole on
every rank (replicated): it has no gradient to reduce, and sharding it would add an all-gather to each of
its calls. Gradients of sharded networks are averaged over the ranks by FSDP's reduce-scatter, so a
trainable network that is not a ``Denoiser`` (a discriminator) would silently train apart on each rank:
it is refused.

What changes for the code around a sharded network (docs/scaling.md, "FSDP2"):

* every forward is a collective: all ranks sample grids together (``DistillationMethod.log_sample_grid``);
* it cannot be deep-copied (FSDP refuses): :func:`shard_denoiser` keeps a weightless (meta-device) copy
  taken before sharding, and :func:`unsharded` gathers the full weights into it for export;
* its ``state_dict`` holds per-rank ``DTensor`` shards: callbacks gather with
  ``get_model_state_dict(..., full_state_dict=True)`` (:func:`full_state_dict`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import weakref

import torch
from torch import nn

from . import lora
from .errors import ConfigError

#: Block classes made FSDP units (the wrap policy of configs/strategies/fsdp.yaml; tests/test_fsdp2.py
#: checks the two lists agree): UNet down / up blocks, SD3's JointTransformerBlock, Flux's double- and
#: single-stream blocks, DiT's (and SD1.5 UNet attention's) BasicTransformerBlock.
BLOCKS = (
    "diffusers.models.unets.unet_2d_blocks.CrossAttnDownBlock2D",
    "diffusers.models.unets.unet_2d_blocks.CrossAttnUpBlock2D",
    "diffusers.models.unets.unet_2d_blocks.DownBlock2D",
    "diffusers.models.unets.unet_2d_blocks.UpBlock2D",
    "diffusers.models.attention.JointTransformerBlock",
    "diffusers.models.transformers.transformer_flux.FluxTransformerBlock",
    "diffusers.models.transformers.transformer_flux.FluxSingleTransformerBlock",
    "diffusers.models.attention.BasicTransformerBlock",
)

# sharded network -> its weightless copy from before sharding (FSDP modules refuse deepcopy)
_SKELETONS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def block_classes(paths=BLOCKS) -> tuple[type, ...]:
    classes = []
    for path in paths:
        module, _, name = path.rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    return tuple(classes)


def is_sharded(module: nn.Module | None) -> bool:
    """Whether any parameter of ``module`` is a DTensor (sharded by ``fully_shard``)."""
    from torch.distributed.tensor import DTensor

    return module is not None and any(isinstance(p, DTensor) for p in module.parameters())


def is_sharded_state(state: dict) -> bool:
    """Whether a state dict holds DTensor shards (``ModelParallelStrategy(save_distributed_checkpoint=True)``
    saves them; its loader, ``torch.distributed.checkpoint.load``, needs every key of the module, so such a
    checkpoint keeps the teacher's replicated weights, which it writes once)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(v, DTensor) for v in state.values())


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters live on the meta device (no memory); buffers are copied
    (FSDP leaves them whole), so non-persistent ones survive a later ``load_state_dict(assign=True)``."""
    memo: dict[int, torch.Tensor] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b.detach().clone()
    return copy.deepcopy(module, memo)


def shard_network(network: nn.Module, mesh, blocks: tuple[type, ...]) -> nn.Module:
    """``fully_shard`` each block of ``network``, then ``network`` itself as the root unit (in place).

    ``reshard_after_forward=True`` on the root too: its default (False for a root) keeps the root's
    parameters gathered after a forward until the backward, which a no-grad forward (a frozen copy,
    sampling) never runs, so they would stay unsharded and break per-parameter updates (theta_minus's EMA).
    """
    from torch.distributed.fsdp import fully_shard

    _SKELETONS[network] = meta_copy(network)
    for module in list(network.modules())[1:]:
        if isinstance(module, blocks):
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(network, mesh=mesh, reshard_after_forward=True)
    return network


def shard_denoiser(denoiser: nn.Module, mesh, blocks: tuple[type, ...] | None = None) -> None:
    """Shard the network of a :class:`~lightning_distill.parametrisation.Denoiser` (its ``unet``)."""
    if not is_sharded(denoiser.unet):
        shard_network(denoiser.unet, mesh, blocks or block_classes())


def data_parallel_mesh(pl_module) -> "torch.distributed.device_mesh.DeviceMesh | None":
    """The mesh to shard over: ``ModelParallelStrategy``'s data-parallel dimension (None: not under it)."""
    mesh = getattr(pl_module, "device_mesh", None)
    if mesh is None:
        return None
    tp = mesh["tensor_parallel"].size() if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
    if tp != 1:
        raise ConfigError(
            f"FSDP2 here shards over data-parallel ranks only: ModelParallelStrategy has tensor_parallel_size "
            f"{tp}; set tensor_parallel_size: 1 and data_parallel_size: <devices x num_nodes> "
            f"(configs/strategies/fsdp2.yaml)"
        )
    return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh


def configure_model(pl_module) -> None:
    """``configure_model`` of every method: under ``ModelParallelStrategy`` shard the Denoiser networks
    (all but the teacher); with any other strategy (no device mesh) do nothing. Idempotent."""
    from .parametrisation import Denoiser

    mesh = data_parallel_mesh(pl_module)
    if mesh is None:
        return
    blocks = block_classes()
    for name, child in pl_module.named_children():
        if name == "teacher":
            continue
        if isinstance(child, Denoiser):
            teacher = getattr(pl_module, "teacher", None)
            if name == "student" and teacher is not None and lora.shared_tensors(child, teacher):
                raise ConfigError(
                    "FSDP2 shards the student's weights, and this LoRA student's frozen base is the teacher's "
                    "(student_lora.base: shared): set student_lora.base: copy, or use --trainer.strategy ddp"
                )
            shard_denoiser(child, mesh, blocks)
        elif any(p.requires_grad for p in child.parameters()):
            raise ConfigError(
                f"FSDP2: {type(pl_module).__name__}.{name} ({type(child).__name__}) trains but is not a Denoiser "
                f"network, so it would not be sharded and its gradients not averaged over ranks; sharded "
                f"training supports Denoiser networks only (student, theta_minus, fake score): use "
                f"--trainer.strategy ddp for this method"
            )
    # Checkpoints leave out the reloadable teacher and a LoRA student's frozen base (DistillationMethod.
    # on_save_checkpoint); ModelParallelStrategy's loader checks every key of the module before any
    # load_state_dict hook could put them back, so it loads non-strictly: what is missing keeps the weights
    # just read from the teacher's source, which is what restore_left_out_weights would restore.
    pl_module.strict_loading = False


def full_state_dict(module: nn.Module) -> dict:
    """The full (unsharded) state dict of ``module`` on CPU, on rank 0; ``{}`` on the other ranks.

    A collective when ``module`` is sharded: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict) -> None:
    """Load a full state dict (every rank holds it) into a sharded ``module``: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def plain_network(network: nn.Module, state: dict) -> nn.Module:
    """An unsharded network built from a sharded one's pre-sharding skeleton and its full ``state``."""
    plain = meta_copy(_SKELETONS[network])
    plain.load_state_dict(state, assign=True)
    return plain


def per_tensor_kind(multi_avg_fn):
    """Wrap a ``torch.optim.swa_utils`` ``multi_avg_fn`` (foreach ops) so that it runs once on the DTensors
    (sharded parameters) and once on the plain tensors (buffers, which FSDP leaves whole) of its lists:
    a foreach op refuses a list that mixes the two."""
    from torch.distributed.tensor import DTensor

    def average(averaged: list, current: list, n_averaged) -> None:
        for sharded in (True, False):
            idx = [i for i, t in enumerate(averaged) if isinstance(t, DTensor) is sharded]
            if idx:
                multi_avg_fn([averaged[i] for i in idx], [current[i] for i in idx], n_averaged)

    return average


@contextlib.contextmanager
def unsharded(*denoisers: nn.Module, rank_zero: bool):
    """Within the block, each sharded Denoiser's network is an unsharded copy with the full weights on
    rank 0 (``rank_zero=True``; the other ranks only take part in the gather) for exporting. A collective:
    every rank enters it. Denoisers that are not sharded are left as they are."""
    swapped = []
    for den in dict.fromkeys(d for d in denoisers if d is not None and is_sharded(d.unet)):
        state = full_state_dict(den.unet)
        if rank_zero:
            swapped.append((den, den.unet))
            den.unet = plain_network(den.unet, state)
    try:
        yield
    finally:
        for den, network in swapped:
            den.unet = network


__all__ = [
    "BLOCKS", "block_classes", "configure_model", "data_parallel_mesh", "full_state_dict", "is_sharded", "is_sharded_state",
    "load_full_state_dict", "meta_copy", "per_tensor_kind", "plain_network", "shard_denoiser", "shard_network", "unsharded",
]
