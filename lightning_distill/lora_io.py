"""LoRA students on disk: checkpoints, the adapter file, the layers trained in full, fused weights (issue #23).

:mod:`lightning_distill.lora` builds a LoRA student (spec, injection, which layers train); this module holds
every format it is written in or read from, as pure functions that ``DistillationMethod``, the EMA callback and
the export call:

* :func:`drop_base_weights` / :func:`restore_base_weights`: checkpoints that hold the adapters plus a reference
  to the base (the base weights are re-read from the teacher on resume).
* :func:`save_lora` / :func:`load_lora` / :func:`read_lora_file`: export as ``pytorch_lora_weights.safetensors``
  in diffusers' layout, which ``pipe.load_lora_weights`` (and the model's ``load_lora_adapter``) read; layers
  trained in full (LCM's guidance input) go to :data:`FULL_LAYERS_NAME` beside it.
* :func:`fuse_lora`: export as full weights, adapters merged and removed: a stock model.

Injection renames each adapted layer's weights (``to_q.weight`` becomes ``to_q.base_layer.weight``), which is
why exports go through :func:`fuse_lora` or :func:`save_lora` and never through ``save_pretrained`` of the
LoRA model. Every name here stays importable from :mod:`lightning_distill.lora` too.

Example::

    >>> student = add_lora(copy.deepcopy(teacher_unet).float(), LoraSpec(rank=64), seed=0)
    >>> save_lora(student, "out/lora")                         # pipe.load_lora_weights("out/lora")
    >>> fused = fuse_lora(student)                              # a plain UNet2DConditionModel
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint_io import fsync_dir, fsync_tree
from .errors import ConfigError, MissingInputError
from .lora import (
    _check_adapter,
    _uses_diffusers_peft,
    freeze_base,
    has_lora,
    is_lora_key,
    load_lora_state_dict,
    lora_state_dict,
)

#: File name diffusers' ``save_lora_weights`` / ``load_lora_weights`` use by default.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: safetensors header key under which diffusers stores the adapter's ``LoraConfig`` (its rank and alpha).
LORA_METADATA_KEY = "lora_adapter_metadata"
#: File beside the adapter file holding the layers trained in full (peft's ``modules_to_save``), which diffusers'
#: ``load_lora_weights`` refuses ("all LoRA param names contain 'lora'") and the teacher's network lacks.
FULL_LAYERS_NAME = "full_layers.safetensors"
#: Its safetensors header key holding the student network's config (``{"_class_name", ...}``): the architecture
#: that has those layers, to build before loading them (``Model.from_config(json.loads(header[...]))``).
NETWORK_CONFIG_KEY = "network_config"

#: Backbone class -> (diffusers loader mixin whose ``save_lora_weights`` writes its file, component name).
#: The component name is the key prefix in the file ("unet." / "transformer."), which is what the
#: pipeline's ``load_lora_weights`` and the model's ``load_lora_adapter(prefix=...)`` filter on.
STOCK_LORA_FORMAT: dict[str, tuple[str, str]] = {
    "UNet2DConditionModel": ("StableDiffusionLoraLoaderMixin", "unet"),  # SD1.x / SD2.x; SDXL reads the same
    "SD3Transformer2DModel": ("SD3LoraLoaderMixin", "transformer"),
    "FluxTransformer2DModel": ("FluxLoraLoaderMixin", "transformer"),
    "SanaTransformer2DModel": ("SanaLoraLoaderMixin", "transformer"),
}


# --- checkpoints: the adapters plus a reference to the base ---------------------------------------


def drop_base_weights(state_dict: dict[str, Tensor], prefix: str) -> list[str]:
    """Remove the base (non-LoRA) weights under ``prefix`` from a checkpoint's ``state_dict``, in place.

    For ``on_save_checkpoint`` of a LoRA student whose base is the reloadable teacher: the checkpoint then
    holds the adapters plus whatever else the method trains, and the base is re-read on resume (see
    :func:`restore_base_weights`). Returns the removed keys.
    """
    removed = [k for k in state_dict if k.startswith(prefix) and not is_lora_key(k)]
    for key in removed:
        del state_dict[key]
    return removed


def restore_base_weights(state_dict: dict[str, Tensor], module: nn.Module, prefix: str,
                         base_prefix: str | None = None) -> list[str]:
    """Fill the base weights that :func:`drop_base_weights` removed from ``module`` (a freshly built LoRA
    student, whose base is the teacher's), so a strict ``load_state_dict`` accepts the checkpoint. Keys
    already present are kept. Returns the added keys.

    ``base_prefix``: where the same checkpoint holds the plain network the base shares its weights with
    (:func:`~lightning_distill.lora.lora_of_shared`; DMD2's fake score: ``"teacher.denoiser.unet."``); its values are used when present,
    so a load writes one value into each shared tensor whichever key comes last.
    """
    added = []
    for key, value in module.state_dict().items():
        full = prefix + key
        if not is_lora_key(key) and full not in state_dict:
            source = None if base_prefix is None else base_prefix + key.replace(".base_layer", "")
            state_dict[full] = state_dict.get(source, value) if source is not None else value
            added.append(full)
    return added


# --- export: a LoRA file ---------------------------------------------------------------------------


def _json_safe(config: dict) -> dict:
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def lora_component_name(model: nn.Module) -> str:
    """The pipeline component a network is ("unet" or "transformer"): the key prefix in a LoRA file."""
    name = type(model).__name__
    if name in STOCK_LORA_FORMAT:
        return STOCK_LORA_FORMAT[name][1]
    return "unet" if name.startswith("UNet") else "transformer"


def save_lora(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default",
              weight_name: str = LORA_WEIGHT_NAME) -> Path:
    """Write the adapters as ``folder/pytorch_lora_weights.safetensors`` in diffusers' LoRA layout.

    Keys are prefixed by the component (``unet.`` / ``transformer.``) and the ``LoraConfig`` (rank, alpha,
    targets) is stored in the safetensors header, so a non-unit ``alpha / rank`` survives. For the classes
    of :data:`STOCK_LORA_FORMAT` the file is written by the pipeline's own ``save_lora_weights`` and loads with
    ``pipe.load_lora_weights(folder)`` (StableDiffusionPipeline, StableDiffusion3Pipeline, ...) or
    ``model.load_lora_adapter(folder, prefix="unet" | "transformer")``. Other classes (``UNet2DModel``,
    ``DiTTransformer2DModel``: no diffusers LoRA loader) get the same layout, read back by :func:`load_lora`.

    Layers trained in full (:func:`full_layers`) go to ``folder/full_layers.safetensors`` instead (same key
    layout, the network's config in its header): diffusers' loaders refuse non-LoRA keys in a LoRA file, and a
    stock base network lacks such layers anyway. :func:`load_lora` reads both files; with diffusers, build
    the network from the header's config, load the base and this file's weights, then ``load_lora_weights``.

    The folder may already hold other files (an exported base pipeline): only the LoRA files are replaced,
    and atomically (written beside them, then renamed). Weights are saved in float32.
    """
    import diffusers.loaders.lora_pipeline as lora_pipeline
    from diffusers.loaders.lora_base import LoraBaseMixin
    from safetensors.torch import save_file

    _check_adapter(model, adapter_name)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(model, adapter_name).items()}
    layers = {k: v for k, v in state.items() if is_lora_key(k)}  # peft names a full layer's copy by the layer's name
    full = {f"{lora_component_name(model)}.{k}": v for k, v in state.items() if not is_lora_key(k)}
    metadata = {**_json_safe(model.peft_config[adapter_name].to_dict()), "modules_to_save": None}
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lora.tmp-", dir=folder))
    try:
        stock = STOCK_LORA_FORMAT.get(type(model).__name__)
        if stock is not None:
            mixin, component = stock
            getattr(lora_pipeline, mixin).save_lora_weights(
                tmp, weight_name=weight_name,
                **{f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": metadata},
            )
        else:
            component = lora_component_name(model)
            LoraBaseMixin.write_lora_layers(
                state_dict={f"{component}.{k}": v for k, v in layers.items()},
                save_directory=str(tmp), is_main_process=True, weight_name=weight_name, save_function=None,
                safe_serialization=True,
                lora_adapter_metadata={f"{component}.{k}": v for k, v in metadata.items()},
            )
        if full:
            config = {k: v for k, v in dict(getattr(model, "config", None) or {}).items() if not k.startswith("_")}
            header = {NETWORK_CONFIG_KEY: json.dumps({"_class_name": type(model).__name__, **config}, default=list)}
            save_file(full, str(tmp / FULL_LAYERS_NAME), metadata=header)
        fsync_tree(tmp)  # on disk before the renames publish it
        if full:
            os.replace(tmp / FULL_LAYERS_NAME, folder / FULL_LAYERS_NAME)
        else:
            (folder / FULL_LAYERS_NAME).unlink(missing_ok=True)  # a stale one from an earlier save
        os.replace(tmp / weight_name, folder / weight_name)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / weight_name


def read_lora_file(path: str | os.PathLike, component: str | None = None,
                   weight_name: str = LORA_WEIGHT_NAME) -> tuple[dict[str, Tensor], dict | None]:
    """(state dict, LoraConfig dict) of a :func:`save_lora` file (or folder), prefix ``component.`` removed.

    ``component`` None: the file's only prefix. The config is None for a file without the header entry
    (then alpha = rank is the only safe reading).
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / weight_name
    if not path.is_file():
        raise MissingInputError(f"LoRA file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    prefixes = sorted({k.split(".", 1)[0] for k in tensors})
    if component is None:
        if len(prefixes) != 1:
            raise ConfigError(f"LoRA file {path} holds several components {prefixes}: name the one to read")
        component = prefixes[0]
    if component not in prefixes:
        raise ConfigError(f"LoRA file {path} has no {component!r} weights (components: {prefixes})")
    sd = {k[len(component) + 1 :]: v for k, v in tensors.items() if k.startswith(component + ".")}
    meta = json.loads(header[LORA_METADATA_KEY]) if LORA_METADATA_KEY in header else None
    if meta is not None:
        meta = {k[len(component) + 1 :]: v for k, v in meta.items() if k.startswith(component + ".")} or None
    return sd, meta


def load_lora(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default",
              weight_name: str = LORA_WEIGHT_NAME) -> nn.Module:
    """Add the adapters of a :func:`save_lora` file to ``model`` (its base), in place; returns ``model``.

    Works for every class (the counterpart of ``load_lora_adapter`` for models without ``PeftAdapterMixin``),
    and leaves only the adapters trainable, as :func:`add_lora` does, so training can continue from it. A
    ``full_layers.safetensors`` beside the file is loaded too (its layers trained in full, as ``add_lora``'s
    ``train_in_full``); ``model`` must have those layers (build it from that file's network config).
    """
    from peft import LoraConfig

    component = lora_component_name(model)
    sd, meta = read_lora_file(path, component, weight_name)
    path = Path(path).expanduser()
    full_path = (path if path.is_dir() else path.parent) / FULL_LAYERS_NAME
    full = read_lora_file(full_path, component)[0] if full_path.is_file() else {}
    names = sorted({k.rpartition(".")[0] for k in full})
    missing = [n for n in names if n not in dict(model.named_modules())]
    if missing:
        raise ConfigError(
            f"{full_path} holds layers {missing} trained in full that {type(model).__name__} lacks; build the "
            f"network from the config in that file's {NETWORK_CONFIG_KEY!r} header and load the base weights into it"
        )
    if meta is None:  # no header: rank from the B matrices, alpha = rank (what diffusers assumes too)
        rank = next(v.shape[1] for k, v in sd.items() if ".lora_B." in k)
        targets = sorted({k.split(".lora_")[0] for k in sd})
        meta = {"r": rank, "lora_alpha": rank, "target_modules": targets}
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    config = LoraConfig(**{k: v for k, v in meta.items() if k in known and k != "modules_to_save"},
                        modules_to_save=names or None)
    if has_lora(model):
        raise ConfigError(f"{type(model).__name__} already has LoRA adapters; load_lora expects the base network")
    if _uses_diffusers_peft(model):
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    load_lora_state_dict(model, {**sd, **full}, adapter_name)
    return freeze_base(model)


# --- export: fused full weights --------------------------------------------------------------------


def fuse_lora(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Merge the adapters into the base weights (``W + alpha / r * B A``) and remove them: a plain model.

    peft's ``merge_and_unload`` semantics, for models that are not a ``PeftModel``: every adapter layer is
    replaced by its base layer holding the merged weight, and the peft bookkeeping (``peft_config``,
    diffusers' ``_hf_peft_config_loaded``) is removed, so ``save_pretrained`` writes a stock model folder
    (no LoRA or ``base_layer`` keys) that loads with ``from_pretrained`` and needs no peft. A layer trained in
    full is replaced by its trained copy. All parameters are trainable again, as in a freshly loaded model.

    Args:
        model: a model with LoRA adapters (a model without them is returned as is, or copied).
        inplace: merge into ``model`` itself; the default works on a deep copy and leaves the student as it is.

    Raises:
        ValueError: a merge produced non-finite weights (peft's ``safe_merge`` check).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if not inplace:
        model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):  # a layer trained in full: its trained copy
            plain = module.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        elif isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            plain = module.get_base_layer()
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, plain)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False
    model.requires_grad_(True)
    return model


__all__ = [
    "STOCK_LORA_FORMAT", "LORA_WEIGHT_NAME", "LORA_METADATA_KEY", "FULL_LAYERS_NAME", "NETWORK_CONFIG_KEY",
    "drop_base_weights", "restore_base_weights",
    "save_lora", "read_lora_file", "load_lora", "lora_component_name", "fuse_lora",
]
