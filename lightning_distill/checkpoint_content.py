"""What a method's checkpoint holds besides trained weights, and what it leaves out on purpose.

* Networks passed as hyperparameters are stored as :func:`module_spec` (class path + config), so
  ``torch.load(weights_only=True)`` accepts the checkpoint; :func:`build_module` rebuilds them.
* Weights that can be re-read from the teacher's source are left out (:func:`drop_left_out_weights`): a
  reloadable teacher's, and the frozen base of LoRA networks derived from it. :func:`restore_left_out_weights`
  puts them back from the live module before a strict load (resume, FSDP's loaders, ``from_best`` export).
"""

from __future__ import annotations

from torch import nn

from . import lora


def module_spec(module: nn.Module) -> dict | None:
    """A weights-only-loadable description of a network: its class path and config (diffusers models).

    Checkpoints store this instead of the pickled module, so ``torch.load(weights_only=True)`` (the
    default for resuming) accepts them; the weights themselves are in ``state_dict``.
    """
    config = getattr(module, "config", None)
    if config is None:
        return None
    cls = type(module)
    init_args = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def build_module(spec: nn.Module | dict | None) -> nn.Module | None:
    """Inverse of :func:`module_spec`: pass modules through, build ``{"class_path", "init_args"}`` dicts."""
    if spec is None or isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, dict) and "class_path" in spec:
        import importlib

        module_name, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        args = dict(spec.get("init_args") or {})
        return cls.from_config(args) if hasattr(cls, "from_config") else cls(**args)
    raise TypeError(f"expected an nn.Module or a {{'class_path', 'init_args'}} dict, got {type(spec).__name__}")


def drop_left_out_weights(sd: dict, lora_prefixes: list[str], teacher) -> None:
    """Remove from state dict ``sd`` the frozen base under each LoRA network prefix and a reloadable teacher's weights."""
    for prefix in lora_prefixes:  # the adapters stay; the base is re-read from the teacher's source
        lora.drop_base_weights(sd, prefix)
    if teacher is not None and teacher.reloadable:
        for key in [k for k in sd if k.startswith("teacher.")]:
            del sd[key]


def restore_left_out_weights(sd: dict, networks: dict[str, nn.Module], teacher, prefix: str = "") -> None:
    """Put back what :func:`drop_left_out_weights` removed, from the live networks; keys already present are kept.

    Args:
        sd: the state dict being loaded (changed in place).
        networks: LoRA network prefix (e.g. ``"student.unet."``) -> that network in the live module.
        teacher: the live teacher (its weights were just loaded from its source), or None.
        prefix: where the module sits in the loaded tree (e.g. under an FSDP wrapper).
    """
    for lp, network in networks.items():
        lora.restore_base_weights(sd, network, prefix + lp)
    if teacher is not None and not any(k.startswith(prefix + "teacher.") for k in sd):
        sd.update({f"{prefix}teacher.{k}": v for k, v in teacher.state_dict().items()})


def check_lora_spec(checkpoint: dict, spec) -> None:
    """Refuse a checkpoint whose student adapters were built with another ``student_lora`` (rank, alpha,
    targets) than this run's, before the state dict's per-layer size mismatches would."""
    from .errors import ConfigError

    saved = lora.LoraSpec.from_config((checkpoint.get("hyper_parameters") or {}).get("student_lora"))
    mine = lora.LoraSpec.from_config(spec)
    if saved != mine and not (saved is not None and saved.same_adapters(mine)):
        show = lambda s: None if s is None else s.to_dict()  # noqa: E731
        raise ConfigError(
            f"this checkpoint's student_lora is {show(saved)}, this run's is {show(mine)}: resume with the checkpoint's settings"
        )


def base_identity(teacher) -> dict:
    """What a left-out LoRA base is beyond its source: the teacher network's dtype and a sha256 of its weights
    (computed once per teacher; a sharded network records its dtype only). A teacher loaded in another dtype,
    a hub id whose ``main`` moved, or a folder rewritten in place is then another base."""
    from . import sharding
    from .nn_utils import content_digest

    net = teacher.unet
    out = {"dtype": str(next(net.parameters()).dtype)}
    if not sharding.is_sharded(net):
        if "_base_digest" not in teacher.__dict__:
            teacher.__dict__["_base_digest"] = content_digest(net)
        out["weights"] = teacher.__dict__["_base_digest"]
    return out


def check_left_out_base(recorded: dict | None, teacher, lora_prefixes: list[str]) -> None:
    """A LoRA network's frozen base is re-read from the live teacher: refuse a checkpoint whose recorded
    teacher (``teacher_source``: source and revision, and where recorded its dtype and weights digest,
    :func:`base_identity`) is another one, where the adapters would sit on a base they were not trained on.
    Folders compare by resolved path, hub ids with their revision."""
    from .errors import ConfigError
    from .teacher import TeacherError, resolve_teacher_source

    if not recorded or not lora_prefixes or teacher is None or not teacher.reloadable:
        return

    def identity(source: str, revision: str | None) -> tuple:
        try:
            folder, hub_id = resolve_teacher_source(source)
        except TeacherError:  # the recorded folder is gone: compare as written
            return (str(source), revision)
        return (str(folder.resolve()), None) if folder is not None else (hub_id, revision)

    if identity(recorded["source"], recorded.get("revision")) != identity(teacher.source, teacher.revision):
        raise ConfigError(
            f"this checkpoint's LoRA adapters were trained on teacher {recorded['source']!r}"
            f"{' (revision ' + repr(recorded.get('revision')) + ')' if recorded.get('revision') else ''}, not on "
            f"{teacher.source!r}: their frozen base is re-read from the teacher, so pass --data.teacher {recorded['source']}"
        )
    live = base_identity(teacher) if ("dtype" in recorded or "weights" in recorded) else {}
    if "dtype" in recorded and recorded["dtype"] != live["dtype"]:
        raise ConfigError(
            f"this checkpoint's LoRA adapters were trained on teacher {recorded['source']!r} held in {recorded['dtype']}, "
            f"not {live['dtype']}: their frozen base is re-read from the teacher, so load it as then (data.teacher_dtype)"
        )
    if recorded.get("weights") and live.get("weights") and recorded["weights"] != live["weights"]:
        raise ConfigError(
            f"this checkpoint's LoRA adapters were trained on other weights of teacher {recorded['source']!r} (its "
            "weights changed since: a moved hub revision or a rewritten folder): pin the revision they were trained on"
        )
