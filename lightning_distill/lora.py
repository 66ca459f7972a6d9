"""LoRA students through peft: inject, train only the adapters (issue #23).

A LoRA student is the teacher's network with low-rank adapters on some of its layers: every base weight
stays frozen at the teacher's value and only the adapters train (LCM-LoRA, arXiv 2311.05556: rank 64 on
SD1.5's attention and feed-forward projections). What this module gives, as pure functions that
``DistillationMethod`` calls:

* :class:`LoraSpec`: the config schema ``student_lora: {rank, alpha, target_modules, init}``, validated.
* :func:`add_lora`: build the student (inject adapters, freeze every base weight).
* :func:`lora_state_dict` / :func:`load_lora_state_dict`: the adapter weights alone (peft's key format).
* :func:`is_lora_key`: whether a parameter / checkpoint key is an adapter's or the frozen base's.
* :func:`new_layers` / ``add_lora(train_in_full=...)``: layers the student has and the teacher lacks (LCM's
  guidance input ``time_embedding.cond_proj``) train in full beside the adapters (peft's ``modules_to_save``).
* :func:`lora_of_shared`: a LoRA whose frozen base shares another network's tensors (DMD2's fake score);
  :func:`tie_base`: the same for a student already built (``student_lora.base: shared``).
* :func:`trainable_fraction` / :func:`parameter_counts`: logging.

The formats a LoRA student is written in live in :mod:`lightning_distill.lora_io`, and their names stay
importable from here: checkpoints that hold the adapters plus a reference to the base
(:func:`drop_base_weights`, :func:`restore_base_weights`), the diffusers adapter file (:func:`save_lora` /
:func:`load_lora`, :data:`LORA_WEIGHT_NAME`), the layers trained in full beside it
(:data:`FULL_LAYERS_NAME`) and fused full weights (:func:`fuse_lora`).

peft's LoRA layer, in its notation: ``h = W x + (alpha / r) * B A x`` with ``A`` (r, in) and ``B`` (out, r);
both initialisations offered here set ``B = 0``, so the student starts as exactly the teacher.

Two ways to inject, one result: diffusers models with ``PeftAdapterMixin`` (``UNet2DConditionModel``, the
SD3 / Flux / SANA transformers) get ``model.add_adapter`` (so their own ``fuse_lora`` / ``set_adapters`` /
``save_lora_adapter`` keep working); the others (``UNet2DModel``, ``DiTTransformer2DModel``, a custom
module) get ``peft.inject_adapter_in_model``. Either way the model keeps its class (no ``PeftModel``
wrapper), so the backbone adapters and ``Denoiser`` call it unchanged. Injection renames each adapted
layer's weights (``to_q.weight`` becomes ``to_q.base_layer.weight``), which is why exports go through
:func:`fuse_lora` or :func:`save_lora` and never through ``save_pretrained`` of the LoRA model.

Example::

    >>> spec = LoraSpec(rank=64, alpha=64)                     # attention + feed-forward projections
    >>> student = add_lora(copy.deepcopy(teacher_unet).float(), spec, seed=0)
    >>> opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad])
    >>> save_lora(student, "out/lora")                         # pipe.load_lora_weights("out/lora")
    >>> fused = fuse_lora(student)                              # a plain UNet2DConditionModel
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .errors import ConfigError

LoraInit = Literal["gaussian", "kaiming"]
#: ``init`` -> peft's ``init_lora_weights``. Both draw A at random and set B = 0 (output unchanged at init).
#: Initialisations that rewrite the base weights (PiSSA, OLoRA, LoftQ) are left out on purpose: the
#: checkpoint stores the adapters only and re-reads the base from the teacher, which needs the base intact.
INIT_CHOICES: dict[str, bool | str] = {
    "gaussian": "gaussian",  # A ~ N(0, 1/r): the diffusers LCM-LoRA script's choice
    "kaiming": True,  # A Kaiming-uniform: peft's default
}

# Layer names (as peft matches them: the full module name or its ending after a ".").
ATTENTION = (
    "to_q", "to_k", "to_v", "to_out.0",
    # joint (MMDiT) attention's context stream: SD3 and Flux
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)
FEED_FORWARD = (
    "ff.net.0.proj", "ff.net.2",  # diffusers FeedForward (GELU / GEGLU projection in, linear out)
    "ff_context.net.0.proj", "ff_context.net.2",  # SD3 / Flux context-stream feed-forward
    "proj_mlp",  # Flux single-stream blocks' MLP in-projection
)
RESNET = ("conv1", "conv2", "conv_shortcut", "time_emb_proj")  # UNet ResnetBlock2D
#: ``target_modules`` presets. Each preset's names that match nothing in a model are skipped (a pixel
#: UNet2DModel may have no attention at all); an explicit list must match in full.
PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION,
    "attention_ff": ATTENTION + FEED_FORWARD,
    "all": ATTENTION + FEED_FORWARD + RESNET,
}
#: Default preset per backbone class. A pixel ``UNet2DModel`` is mostly convolutions (the digits teacher
#: has no attention block), so its adapters go on the resnets too; everything else follows LCM-LoRA.
DEFAULT_PRESET: dict[str, str] = {"UNet2DModel": "all"}
FALLBACK_PRESET = "attention_ff"

#: Layer types peft's LoRA adapts (others, e.g. an Attention block itself, are refused by name).
_LORA_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
# adapter weights, and the trained copy of a layer trained in full (peft's modules_to_save.<adapter>)
_LORA_KEY = re.compile(r"(^|\.)(lora_(A|B|embedding_A|embedding_B|magnitude_vector)|modules_to_save)(\.|$)")


# --- the config schema -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """``student_lora``: which layers get adapters, of what rank and scale, and how they start.

    Args:
        rank: r, the adapters' rank (LCM-LoRA: 64 for SD1.5).
        alpha: peft's ``lora_alpha``; the update is scaled by ``alpha / rank``. None: ``rank`` (scale 1).
        target_modules: a preset (``"attention"``: q/k/v/out projections incl. MMDiT's context stream;
            ``"attention_ff"``: plus feed-forward projections; ``"all"``: plus UNet resnet convolutions
            and time-embedding projections), a list of layer names (peft matching: a name matches a module
            whose full name equals it or ends with ``"." + name``, e.g. ``"to_out.0"``, ``"attn1.to_q"``),
            or None for the backbone's default (``"all"`` for ``UNet2DModel``, else ``"attention_ff"``).
        init: ``"gaussian"`` (A ~ N(0, 1/r), as the diffusers LCM-LoRA script) or ``"kaiming"`` (peft's
            default); B = 0 in both, so the student's output equals the teacher's at step 0.
        base: where a student derived from the teacher keeps its frozen base. ``"shared"`` (default): the
            teacher's own tensors (:func:`tie_base`), so the base costs no memory beyond the teacher, and it
            runs in the teacher's dtype (``data.teacher_dtype``; the adapters stay float32). ``"copy"``: a float32
            copy of the teacher's weights (float32 base computation with a reduced-precision teacher, at the
            cost of a second copy). Both hold the same values, so with a float32 teacher they train identically.
            Not part of what a checkpoint must match: the stored adapters fit either.

    Example::

        >>> LoraSpec(rank=64)
        >>> LoraSpec.from_config({"rank": 8, "alpha": 16, "target_modules": ["to_q", "to_v"]})
    """

    rank: int = 16
    alpha: float | None = None
    target_modules: str | tuple[str, ...] | None = None
    init: LoraInit = "gaussian"
    base: Literal["shared", "copy"] = "shared"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"student_lora.rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not self.alpha > 0):
            raise ConfigError(f"student_lora.alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}")
        if self.init not in INIT_CHOICES:
            raise ConfigError(f"student_lora.init must be one of {sorted(INIT_CHOICES)}, got {self.init!r}")
        if self.base not in ("shared", "copy"):
            raise ConfigError(f"student_lora.base must be one of ['copy', 'shared'], got {self.base!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets not in PRESETS:
                raise ConfigError(
                    f"student_lora.target_modules {targets!r} is not a preset; choose one of {sorted(PRESETS)}, "
                    "or give a list of layer names such as ['to_q', 'to_k', 'to_v', 'to_out.0']"
                )
        elif targets is not None:
            targets = tuple(targets)
            bad = [t for t in targets if not isinstance(t, str) or not t.strip(".")]
            if not targets or bad:
                raise ConfigError(
                    f"student_lora.target_modules must be a preset {sorted(PRESETS)} or a non-empty list of layer "
                    f"names, got {self.target_modules!r}"
                )
            object.__setattr__(self, "target_modules", targets)  # a list from YAML: hashable and comparable

    @classmethod
    def from_config(cls, value: LoraSpec | Mapping | None, name: str = "student_lora") -> LoraSpec | None:
        """A spec from a config value: a LoraSpec, a mapping (a YAML block, a checkpoint's hparams), or None.

        ``name``: the config key the value came from, for error messages (``fake_score_lora``).
        """
        if value is None or isinstance(value, LoraSpec):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping {{rank, alpha, target_modules, init}}, got {value!r}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(f"{name} has unknown keys {unknown}; valid keys are {fields}")
        try:
            return cls(**value)
        except ConfigError as err:
            raise ConfigError(str(err).replace("student_lora", name)) from None

    def to_dict(self) -> dict:
        """Plain types only (a list for the targets), so a checkpoint's hparams stay ``weights_only``-loadable."""
        out = dataclasses.asdict(self)
        if isinstance(self.target_modules, tuple):
            out["target_modules"] = list(self.target_modules)
        return out

    def same_adapters(self, other: LoraSpec | None) -> bool:
        """Whether ``other`` builds the same adapters (everything but ``base``, which does not change them)."""
        return other is not None and dataclasses.replace(self, base=other.base) == other

    @property
    def lora_alpha(self) -> float:
        return self.rank if self.alpha is None else self.alpha

    def lora_config(self, target_modules: Sequence[str], modules_to_save: Sequence[str] = ()):
        """The peft ``LoraConfig`` for these settings, already resolved layer names and layers trained in full."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha,
            target_modules=list(target_modules),
            init_lora_weights=INIT_CHOICES[self.init],
            modules_to_save=list(modules_to_save) or None,
        )


# --- which layers ----------------------------------------------------------------------------------


def _matches(module_name: str, target: str) -> bool:
    # peft's rule for a list of target names (tuners_utils.check_target_module_exists)
    return module_name == target or module_name.endswith("." + target)


def _adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and isinstance(m, _LORA_LAYER_TYPES)}


def _short_name(module_name: str) -> str:
    """The name a user would write: the last component, or the last two when it is a list index."""
    parts = module_name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def default_target_modules(model: nn.Module) -> str:
    """The preset used when ``target_modules`` is None, by backbone class (see :data:`DEFAULT_PRESET`)."""
    return DEFAULT_PRESET.get(type(model).__name__, FALLBACK_PRESET)


def resolve_target_modules(model: nn.Module, target_modules: str | Sequence[str] | None) -> list[str]:
    """The layer names to give peft: a preset's names that occur in ``model``, or a list checked in full.

    Raises:
        ConfigError: a listed name that matches no Linear / Conv / Embedding layer of ``model``, or a preset
            that matches none; the message lists layer names the model does have.
    """
    layers = _adaptable_layers(model)
    explicit = target_modules is not None and not isinstance(target_modules, str)
    preset = None if explicit else (target_modules or default_target_modules(model))
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown target_modules preset {preset!r}; choose one of {sorted(PRESETS)}")
    names = list(target_modules) if explicit else list(PRESETS[preset])
    found = [t for t in names if any(_matches(n, t) for n in layers)]
    missing = [t for t in names if t not in found]
    if (explicit and missing) or not found:
        existing = sorted({_short_name(n) for n in layers})
        shown = ", ".join(existing[:16]) + (f", ... ({len(existing)} in all)" if len(existing) > 16 else "")
        what = f"student_lora.target_modules {missing}" if explicit else f"preset {preset!r} ({', '.join(names)})"
        raise ConfigError(
            f"{what} matches no Linear / Conv / Embedding layer of {type(model).__name__}; "
            f"its layers include: {shown}"
        )
    return found


# --- building the student --------------------------------------------------------------------------


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds peft adapter layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def is_lora_key(key: str) -> bool:
    """Whether a parameter / state-dict name belongs to a LoRA adapter (``...lora_A.default.weight``) or to a
    layer trained in full beside it (``...cond_proj.modules_to_save.default.weight``) rather than to the frozen
    base network (``...base_layer.weight``, ``...norm.weight``, ``...cond_proj.original_module.weight``)."""
    return _LORA_KEY.search(key) is not None


@contextlib.contextmanager
def _seeded(seed: int | None):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):  # adapters are created on the CPU (the base's device)
        torch.manual_seed(seed)
        yield


def _uses_diffusers_peft(model: nn.Module) -> bool:
    try:
        from diffusers.loaders.peft import PeftAdapterMixin
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(model, PeftAdapterMixin)


def freeze_base(model: nn.Module) -> nn.Module:
    """Make the LoRA weights the only trainable parameters of ``model`` (in place; returns it)."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_key(name))
    return model


def new_layers(model: nn.Module, base: nn.Module) -> list[str]:
    """Names of ``model``'s layers with a parameter that ``base`` lacks (by name and shape): the layers a student
    built from the teacher adds (LCM's ``time_embedding.cond_proj``), which a LoRA student trains in full."""
    theirs = {k: v.shape for k, v in base.state_dict().items()}
    # the root module's own parameters (SANA's scale_shift_table) have no "name." prefix
    return [name for name, module in model.named_modules()
            if any(theirs.get(f"{name}.{p}" if name else p) != v.shape
                   for p, v in module.named_parameters(recurse=False))]


def full_layers(model: nn.Module) -> list[str]:
    """Names of the layers ``model`` trains in full beside its adapters (peft's ``modules_to_save`` wrappers)."""
    from peft.utils import ModulesToSaveWrapper

    return [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def add_lora(model: nn.Module, spec: LoraSpec | Mapping, *, seed: int | None = None,
             adapter_name: str = "default", train_in_full: Sequence[str] = ()) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze everything else; returns ``model``.

    Call it on the student after anything that sets ``requires_grad`` on the whole network (base.py's
    ``student.requires_grad_(True)``): afterwards only the adapters train.

    Args:
        model: the network (a diffusers model or any module with Linear / Conv layers), float32 ideally:
            the adapters take the dtype of the layer they wrap.
        spec: a :class:`LoraSpec` or its mapping.
        seed: seed for the adapters' random A matrices (the global RNG is left as it was); None draws from
            the global RNG, which is then deterministic given ``torch.manual_seed``.
        adapter_name: peft's adapter name (one adapter per student here).
        train_in_full: full names of layers that train in full instead (:func:`new_layers`: layers the base
            lacks, such as a zero-initialised new input); peft's ``modules_to_save``: the layer is kept
            frozen as ``original_module`` and a trained copy ``modules_to_save.<adapter_name>`` is used.

    Raises:
        ConfigError: bad spec values, target names that match nothing, or a model that already has adapters.
    """
    spec = LoraSpec.from_config(spec)
    if spec is None:
        raise ConfigError("add_lora needs a LoraSpec, got None")
    if has_lora(model):
        raise ConfigError(f"{type(model).__name__} already has LoRA adapters; add_lora adds the first adapter only")
    unknown = sorted(set(train_in_full) - {n for n, _ in model.named_modules()})
    if unknown:
        raise ConfigError(f"train_in_full names {unknown}, which are not layers of {type(model).__name__}")
    config = spec.lora_config(resolve_target_modules(model, spec.target_modules), train_in_full)
    with _seeded(seed):
        if _uses_diffusers_peft(model):
            model.add_adapter(config, adapter_name=adapter_name)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, model, adapter_name=adapter_name)
    return freeze_base(model)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in seen.values() if p.requires_grad), total


def trainable_fraction(model: nn.Module) -> float:
    """Fraction of ``model``'s parameters that train (for logging; 1.0 for a full student)."""
    trainable, total = parameter_counts(model)
    return trainable / total if total else 0.0


# --- adapter weights and checkpoints ---------------------------------------------------------------


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter weights alone, in peft's format (``down_blocks.0...to_q.lora_A.weight``: no adapter name).

    The tensors are the model's own (not copies); clone them to keep a snapshot.
    """
    from peft import get_peft_model_state_dict

    _check_adapter(model, adapter_name)
    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], adapter_name: str = "default") -> None:
    """Load :func:`lora_state_dict` output into a model with the same adapters (strict: same keys, shapes).

    Raises:
        ConfigError: keys missing from or unknown to the model's adapters (the first few are named).
    """
    from peft import set_peft_model_state_dict

    expected = set(lora_state_dict(model, adapter_name))
    given = set(state_dict)
    if expected != given:
        missing, unknown = sorted(expected - given), sorted(given - expected)
        raise ConfigError(
            f"LoRA state dict does not fit {type(model).__name__}'s adapters: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unknown)} unexpected (e.g. {unknown[:3]})"
        )
    set_peft_model_state_dict(model, dict(state_dict), adapter_name=adapter_name)


def shared_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network``'s modules that holds ``network``'s own parameters and buffers (the same tensor
    objects, no new memory): module state (train / eval, flags) is the copy's, weights are shared."""
    shared = {id(t): t for t in (*network.parameters(), *network.buffers())}
    return copy.deepcopy(network, memo=shared)  # deepcopy's memo returns each listed tensor itself


def copy_trainable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with new tensors for its trainable parameters only; its frozen parameters and
    buffers are ``model``'s own. The averaged copies of a LoRA network (the sampling EMA, consistency
    distillation's theta_minus) then share its frozen base instead of holding another one."""
    frozen = {id(t): t for t in (*model.parameters(), *model.buffers()) if not t.requires_grad}
    return copy.deepcopy(model, memo=frozen)


def _base_name(name: str) -> str:
    # peft's names of a wrapped layer's frozen weights -> the plain network's (to_q.base_layer.weight -> to_q.weight)
    return ".".join(p for p in name.split(".") if p not in ("base_layer", "original_module"))


def tie_base(model: nn.Module, base: nn.Module) -> int:
    """Make every frozen parameter of LoRA network ``model`` that equals ``base``'s parameter of the same name
    (and shape) *be* that parameter; returns how many were tied. Trainable parameters and frozen ones that
    differ (or that ``base`` lacks) are left alone.

    The student of a teacher then holds no copy of the frozen base: a float32 student built from a bf16
    teacher takes the teacher's bf16 tensors (equal after the cast). Tied tensors keep ``requires_grad=False``.
    """
    theirs = dict(base.named_parameters())
    tied = 0
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            other = theirs.get(_base_name(f"{module_name}.{name}" if module_name else name))
            if param.requires_grad or other is None or other is param or other.shape != param.shape:
                continue
            same = (param.data_ptr(), param.dtype, param.stride()) == (other.data_ptr(), other.dtype, other.stride())
            if same or torch.equal(param.detach().float(), other.detach().to(param.device).float()):
                module.register_parameter(name, other)
                tied += 1
    return tied


def shared_tensors(a: nn.Module, b: nn.Module) -> int:
    """How many parameter tensors modules ``a`` and ``b`` share (the same objects)."""
    theirs = {id(p) for p in b.parameters()}
    return sum(id(p) in theirs for p in a.parameters())


def check_shared_base(pl_module: nn.Module, trainer=None) -> None:
    """Refuse, before training, the setups that networks holding each other's tensors cannot run
    (``student_lora.base: shared``, DMD2's ``fake_score_lora``, consistency distillation's theta_minus of a LoRA
    student); ``trainer``: the run's (None: only what the module alone decides).

    Raises:
        ConfigError: ``FSDPStrategy`` (FSDP1 flattens a tensor two networks share into one network's unit, and
            the other then reads a shard); ``teacher_offload`` with a student on the teacher's weights (it moves
            them off the device between the teacher's calls); a reduced-precision shared base under a
            precision without autocast (``32-true``) when the student trains float32 layers in full (e.g. LCM's
            ``cond_proj``: they would get the base's bf16 activations) or when the base is float16 (no loss
            scaling for the gradients through it); a reduced-precision shared base in a method that
            differentiates its student numerically (``float32_student``: sCD, MeanFlow).
    """
    strategy = type(getattr(trainer, "strategy", None)).__name__
    if strategy == "FSDPStrategy":
        owner: dict[int, str] = {}
        for name, child in pl_module.named_children():
            for p in child.parameters():
                other = owner.setdefault(id(p), name)
                if other != name:
                    raise ConfigError(
                        f"FSDPStrategy wraps each network on its own and cannot hold the tensors that {other} and "
                        f"{name} share (a LoRA network's frozen base): use DDP, or ModelParallelStrategy "
                        "(configs/strategies/fsdp2.yaml) with student_lora.base: copy"
                    )
    teacher = getattr(pl_module, "teacher", None)
    if teacher is None:
        return
    for name, network in pl_module.named_children():
        if name != "teacher" and shared_tensors(network, teacher):
            _check_network_on_base(pl_module, trainer, name, network)


def _check_network_on_base(pl_module: nn.Module, trainer, name: str, network: nn.Module) -> None:
    """:func:`check_shared_base` for one network (the student, DMD2's fake score) whose frozen base is the teacher's."""
    student = name == "student"
    fix = ("or give the fake score its own network (fake_score) instead of fake_score_lora" if name == "fake_score"
           else "or set student_lora.base: copy (a float32 copy of the base)")  # theta_minus: the student's copy
    what = "the LoRA student's frozen base is" if student else f"the LoRA {name}'s frozen base is"
    if getattr(pl_module, "hparams", {}).get("teacher_offload"):
        raise ConfigError(
            f"teacher_offload moves the teacher's weights between its calls, and {what} "
            f"those weights: set teacher_offload: false, {fix}"
        )
    dtypes = {p.dtype for p in network.parameters() if not p.requires_grad} - {torch.float32, torch.float64}
    if student and dtypes and getattr(pl_module, "float32_student", False):
        raise ConfigError(
            f"{type(pl_module).__name__} differentiates the student in float32, and a LoRA student on the "
            f"{sorted(map(str, dtypes))[0]} teacher's weights computes in that precision: {fix.removeprefix('or ')}"
        )
    precision = str(getattr(trainer, "precision", None))
    if precision not in ("32", "32-true", "64", "64-true"):
        return
    full = full_layers(network)
    label = "LoRA student" if student else f"LoRA {name}"
    if full and dtypes:
        raise ConfigError(
            f"the {label} shares the {sorted(map(str, dtypes))[0]} teacher's base and trains {full} in float32: "
            f"under precision {precision!r} those layers get the base's reduced-precision activations; use "
            f"trainer.precision bf16-mixed (or 16-mixed), {fix}"
        )
    if torch.float16 in dtypes:
        raise ConfigError(
            f"the {label} shares the float16 teacher's base: under precision {precision!r} nothing scales the "
            f"loss for the gradients through it; use trainer.precision 16-mixed, {fix}"
        )


def lora_of_shared(network: nn.Module, spec: LoraSpec | Mapping, *, seed: int | None = None) -> nn.Module:
    """A LoRA network whose frozen base *is* ``network``'s weights (shared tensors, not a copy); ``network``
    itself is left as it was (its modules are copied, its parameters and buffers are not).

    The memory of a second copy of a frozen network (DMD2's fake score as a LoRA of the teacher) is then the
    adapters alone. The adapters are float32 whatever the base's dtype (a bf16 teacher): peft casts the input
    of each adapter to its dtype and the sum back to the layer's.
    """
    from diffusers.training_utils import cast_training_params

    if any(p.requires_grad for p in network.parameters()):
        raise ConfigError(f"lora_of_shared needs a frozen network; {type(network).__name__} has trainable weights")
    model = shared_copy(network)
    add_lora(model, spec, seed=seed)
    cast_training_params(model, dtype=torch.float32)  # only the trainable (adapter) weights
    return model


def _check_adapter(model: nn.Module, adapter_name: str) -> None:
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ConfigError(
            f"{type(model).__name__} has no LoRA adapter {adapter_name!r} (adapters: {sorted(configs) or 'none'}); "
            "build the student with add_lora first"
        )


# --- the file formats: lora_io.py ------------------------------------------------------------------

#: Names defined in :mod:`lightning_distill.lora_io`, served from here so ``lora.save_lora`` and
#: ``from lightning_distill.lora import save_lora`` keep working. Looked up on first use (PEP 562) rather than
#: imported at the top: lora_io imports this module, and a top-level import would be circular.
_IO_NAMES = frozenset({
    "STOCK_LORA_FORMAT", "LORA_WEIGHT_NAME", "LORA_METADATA_KEY", "FULL_LAYERS_NAME", "NETWORK_CONFIG_KEY",
    "drop_base_weights", "restore_base_weights",
    "save_lora", "read_lora_file", "load_lora", "lora_component_name", "fuse_lora",
})


def __getattr__(name: str):
    if name in _IO_NAMES:
        from . import lora_io

        return getattr(lora_io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_IO_NAMES})


__all__ = [
    "LoraSpec", "PRESETS", "STOCK_LORA_FORMAT", "LORA_WEIGHT_NAME", "FULL_LAYERS_NAME", "NETWORK_CONFIG_KEY",
    "add_lora", "new_layers", "full_layers", "default_target_modules", "resolve_target_modules", "has_lora", "is_lora_key", "freeze_base",
    "lora_state_dict", "load_lora_state_dict", "drop_base_weights", "restore_base_weights", "lora_of_shared",
    "shared_copy", "copy_trainable", "tie_base", "shared_tensors", "check_shared_base",
    "save_lora", "read_lora_file", "load_lora", "lora_component_name", "fuse_lora",
    "parameter_counts", "trainable_fraction",
]
