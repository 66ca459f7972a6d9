"""Quality-versus-steps report: FD / KID of a teacher and its students at several step counts.

Command::

    python -m lightning_distill.evaluate --teacher bundled:digits \\
        --student pd=runs/pd/checkpoints/last.ckpt --student cd=runs/cd/student \\
        --steps 1 2 4 8 --teacher-steps 1 2 4 8 50 --num-samples 2000 --seed 0 --out reports/digits

Students are checkpoints (``.ckpt`` of any LightningModule with a ``sample`` method, written by
``lightning-distill fit``: the class is rebuilt from the class path stored in its hyper-parameters and
the sampling-EMA weights are used when the checkpoint holds them) or exported diffusers pipeline folders.
The teacher is sampled with deterministic DDIM (eta = 0, trailing spacing); a flow-matching teacher with
Euler steps at s = 1, (N-1)/N, ..., 0 (``sampling.at_steps``), as are flow pipeline folders. ``--teacher-dtype``
holds it in bfloat16 / float16, as a run's ``data.teacher_dtype`` does (a checkpoint's own teacher is reloaded in
the run's dtype whatever this says).
Any denoiser :mod:`lightning_distill.backbones` supports for unprompted sampling (UNets, a class-conditional
``DiTTransformer2DModel``, pixel or latent) is called through its adapter, its sample shape and class count
read from its config; class-conditional models get the balanced labels ``i % num_classes`` (image i).

Text-to-image models (SD1.5-style ``UNet2DConditionModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
``SanaTransformer2DModel``) are sampled from prompts: ``--prompts FILE`` (one prompt per line, UTF-8, blank lines
ignored) or ``--prompts captions`` (the captions of the reference images, read from the ``--data`` folder's
``metadata.jsonl`` / ``prompts.txt`` by ``TeacherDataModule``). Image i is drawn with prompt i % P, whatever the
chunking (as the noise: see ``metrics.chunk_seed``). Without prompts a text model is a one-line error as it loads;
prompts given where no model is text-conditional, too.

* the teacher: the sampler above in the text pipelines' loop on ``teacher.encode_prompts`` keywords
  (``metrics.sample_text_teacher``), with classifier-free guidance at ``--guidance-scale`` g (the empty prompt
  as the unconditional one, as the stock pipelines; default 1: none);
* an exported folder: the stock pipeline it was saved as (``StableDiffusionPipeline``,
  ``StableDiffusion3Pipeline``, ``LatentConsistencyModelPipeline``, ``FluxPipeline``, ``SanaPipeline``), with the
  latents drawn from the same generator as every other model (``metrics.pipeline_sample``; Flux: drawn unpacked,
  passed packed) and ``guidance_scale=1``, as exported; a guidance-distilled Flux folder with ``guidance_scale`` =
  the teacher's embedded guidance (``--teacher-embedded-guidance``, default 3.5: what its student was trained at),
  and folders with T5 with the teacher's T5 length (``--teacher-max-sequence-length``); a ``SanaPipeline`` folder
  with the SANA teacher's Gemma2 prompt length and ``complex_human_instruction``. Without a teacher of the folder's
  family these text settings come from the folder's ``distillation_call.json`` (the export records the ones its
  student was trained with: ``export.CALL_SETTINGS_NAME``), else the pipeline's defaults;
* a checkpoint: its ``sample(..., prompts=...)``.

An LCM student with a guidance input (its w embedding: a ``LatentConsistencyModelPipeline`` folder or its
checkpoint) embeds w = g - 1 from ``--student-guidance`` g, which it then needs.

Writes to ``--out``: ``results.csv`` and ``results.md`` (FD and KID per model and step count, with the
protocol: sample count, seed, noise chunk size, reference set, feature network, the teacher's dtype; text models:
the prompts' source, count and sha256, the guidance scales), ``protocol.json``, ``fd_vs_steps.png`` and one sample grid
``samples_<model>.png`` per model (one row per step count, the same noise in every row and model).

Every model is sampled from the same seeded noise chunks (common random numbers), so differences
between rows are differences between models, not between noise draws. :func:`evaluate_models` is the
same thing as a Python function.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import backbones, lora, teacher_features
from .export import ema_state_from_checkpoint
from .errors import ConfigError
from .metrics import (
    check_kid_settings,
    decode_latents,
    extract_features,
    feature_net_name,
    generated_features,
    get_feature_net,
    pipeline_sample,
    reference_stats,
    sample_teacher,
    sample_text_teacher,
    scheduler_sample,
    score_features,
)
from .nn_utils import lcm_step_limit
from .teacher import DTYPES, DiffusionTeacher, load_teacher, low_cpu_mem_usage

#: The teacher's sampler in every report's protocol (this module's and the seeds runner's).
TEACHER_SAMPLER = "deterministic DDIM (eta = 0, trailing timesteps; a flow-matching teacher: Euler at s = 1, (N-1)/N, ..., 0)"
#: How a text-to-image evaluation gets its prompts (the one-line errors name them).
PROMPT_OPTIONS = ("--prompts FILE (one prompt per line) or --prompts captions (the captions of the --data image "
                  "folder, metadata.jsonl)")
#: The stock pipelines an exported text-to-image student is sampled with (the classes ``export`` writes).
TEXT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusion3Pipeline", "LatentConsistencyModelPipeline",
                  "FluxPipeline", "SanaPipeline")

CSV_FIELDS = [
    "model", "kind", "steps", "fd", "kid", "kid_std", "num_samples", "seed", "feature_net", "reference", "num_reference",
]


@dataclass
class Sampler:
    """Something that draws images in [-1, 1]: ``sample(n, steps, generator, labels)``; a text-to-image model's
    takes the n images' prompts (``list[str]``) in place of the labels."""

    name: str
    kind: str  # "teacher", "checkpoint", "pipeline"
    source: str
    sample: Callable[[int, int, torch.Generator, Tensor | list[str] | None], Tensor]
    num_classes: int | None = None
    ema: bool | None = None
    max_steps: int | None = None  # an LCMScheduler sampler's limit (its training grid); None: any
    text_network: str | None = None  # the class of a text-conditional network: sample() takes prompts
    guidance: float | None = None  # text models: the guidance scale g they are sampled at (1: none)
    guidance_input: bool = False  # an LCM student embedding w = g - 1 (its g is --student-guidance)
    embedded_guidance: float | None = None  # a guidance-distilled Flux network's guidance input (None: it has none)

    @property
    def what(self) -> str:
        """The model as errors name it."""
        return f"teacher {self.source!r}" if self.kind == "teacher" else f"student {self.name!r} ({self.source})"


@dataclass(frozen=True)
class Prompts:
    """The prompt list of a text-to-image evaluation; image i is drawn with prompt i % P.

    ``sha256`` (of the list as a UTF-8 JSON array, so no separator is ambiguous) and the count go into the
    protocol and the teacher cells' cache key (:func:`~lightning_distill.teacher_features.text_conditioning`).

    Example::

        >>> p = Prompts(("a cat", "a dog"), "file prompts.txt")
        >>> p.for_images(torch.arange(3))
        ['a cat', 'a dog', 'a cat']
    """

    texts: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        if not self.texts:
            raise ConfigError(f"no prompts in {self.source}: a text-to-image evaluation needs at least one")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(list(self.texts), ensure_ascii=False).encode("utf-8")).hexdigest()

    def for_images(self, index: Tensor) -> list[str]:
        """The prompts of images ``index``: prompt i % P for image i (``generated_features`` hands out i % P
        already, which this leaves as it is)."""
        return [self.texts[int(i) % len(self.texts)] for i in index]

    def protocol(self) -> dict:
        return {"source": self.source, "count": len(self), "sha256": self.sha256}


def read_prompt_file(path: str | os.PathLike) -> Prompts:
    """``--prompts FILE``: one prompt per line, UTF-8; surrounding whitespace stripped, blank lines ignored."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist; --prompts takes FILE or 'captions'")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"prompt file {str(path)!r} is not UTF-8 ({err.reason} at byte {err.start})") from None
    return Prompts(tuple(line.strip() for line in text.splitlines() if line.strip()), f"file {path}")


def resolve_prompts(prompts: str | os.PathLike | Sequence[str] | Prompts | None, data: str) -> Prompts | str | None:
    """``evaluate_models``' ``prompts``: a :class:`Prompts`, ``"captions"`` (checked here, read with the
    reference set), or None. A sequence of strings is taken as the list itself."""
    if prompts is None or isinstance(prompts, Prompts):
        return prompts
    if isinstance(prompts, (str, os.PathLike)):
        if str(prompts) != "captions":
            return read_prompt_file(prompts)
        folder = None if data == "digits" else Path(data).expanduser()
        if folder is None or not any((folder / n).is_file() for n in ("metadata.jsonl", "prompts.txt")):
            raise ConfigError(
                f"--prompts captions reads the captions of the reference images: --data must be an image folder "
                f"with metadata.jsonl (or prompts.txt); data is {data!r}"
            )
        return "captions"
    return Prompts(tuple(str(p) for p in prompts), "the given list")


# --- loading models ------------------------------------------------------------------------------


def _import_class(class_path: str):
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import class {class_path!r} named by the checkpoint ({err})") from err


class StepCountError(ValueError):
    """A student that can sample at none of the step counts asked for (its ``name``, ``max_steps``, ``steps``)."""

    def __init__(self, name: str, max_steps: int, steps) -> None:
        self.name, self.max_steps, self.steps = name, max_steps, list(steps)
        super().__init__(f"student {name!r} samples with at most {max_steps} steps; none of {self.steps} fit")


def load_checkpoint_model(
    path: str | os.PathLike, teacher: DiffusionTeacher | None = None, class_path: str | None = None, use_ema: bool = True
):
    """Rebuild a method from a ``lightning-distill fit`` checkpoint; returns (model, used_ema).

    The class comes from ``class_path`` or the ``_class_path`` LightningCLI stores in the hyper-parameters.
    A method that was trained with a teacher gets one: the source recorded in the checkpoint, else the
    ``teacher`` given here. The EMA callback's weights replace the student's when present.
    """
    import lightning as L

    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters") or {}
    class_path = class_path or hp.get("_class_path")
    if class_path is None:
        raise ValueError(
            f"checkpoint {path} does not record its class (it was not written by `lightning-distill fit`); "
            "pass class_path='package.module.Class'"
        )
    cls = _import_class(class_path)
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise ValueError(f"{class_path!r} from checkpoint {path} is not a LightningModule")
    kwargs = {}
    needs_teacher = "teacher_source" in ckpt or any(k.startswith("teacher.") for k in ckpt["state_dict"])
    if needs_teacher:
        src = ckpt.get("teacher_source")
        if src:
            # the teacher as the run loaded it (data.teacher_dtype / _prediction_type / _max_sequence_length /
            # _embedded_guidance / _complex_human_instruction, in the data module's hyper-parameters): its encoders,
            # VAE and conditioning are the student's as it was trained; None: the defaults
            from .data import load_run_teacher

            data_hp = ckpt.get("datamodule_hyper_parameters") or {}
            run = {k: data_hp.get(k) for k in ("teacher_dtype", "teacher_prediction_type", "teacher_max_sequence_length",
                                               "teacher_embedded_guidance")}
            # carried only when recorded: absent (a run from before the option) is the default instruction, while a
            # recorded None is no instruction
            if "teacher_complex_human_instruction" in data_hp:
                run["teacher_complex_human_instruction"] = data_hp["teacher_complex_human_instruction"]
            if teacher is None or teacher.source != src["source"] or not _run_settings_match(teacher, run):
                teacher = load_run_teacher({"teacher": src["source"], "teacher_revision": src.get("revision"), **run})
        elif teacher is None:
            raise ValueError(f"checkpoint {path} holds a teacher without a source: pass --teacher with the same architecture")
        kwargs["teacher"] = teacher
    model = cls.load_from_checkpoint(path, map_location="cpu", **kwargs)
    used_ema = False
    ema = ema_state_from_checkpoint(ckpt) if use_ema else None
    if ema is not None and getattr(model, "student", None) is not None:
        if lora.has_lora(model.student):  # the EMA stores the adapters: its base is the loaded student's
            lora.restore_base_weights(ema, model.student, "")
        model.student.load_state_dict(ema)
        used_ema = True
    return model.eval(), used_ema


def _run_settings_match(teacher: DiffusionTeacher, text: dict) -> bool:
    """Whether ``teacher`` has the dtype, prediction type, T5 length and embedded guidance a run's data settings
    ``text`` give it (None: the defaults of :class:`~lightning_distill.teacher.DiffusionTeacher`), and, a SANA
    teacher, the ``complex_human_instruction`` of ``text["teacher_complex_human_instruction"]`` (absent or
    ``"default"``: the pipeline's; None: none; else the lines), as :func:`~lightning_distill.data.load_run_teacher`
    reads them."""
    from .data import DEFAULT_INSTRUCTION, resolved_instruction
    from .teacher import MAX_SEQUENCE_LENGTH

    if next(teacher.unet.parameters()).dtype != DTYPES[text.get("teacher_dtype") or "float32"]:
        return False
    if text.get("teacher_prediction_type") not in (None, teacher.denoiser.prediction_type):
        return False
    sana = isinstance(backbones.backbone_for(teacher.unet), backbones.SanaBackbone)
    instruction = resolved_instruction(text.get("teacher_complex_human_instruction", DEFAULT_INSTRUCTION))
    if sana and teacher.complex_human_instruction != instruction:
        return False

    net = type(getattr(teacher.unet, "_orig_mod", teacher.unet)).__name__
    length = text.get("teacher_max_sequence_length") or MAX_SEQUENCE_LENGTH.get(net, 256)
    guidance = text.get("teacher_embedded_guidance")
    guidance = 3.5 if guidance is None else float(guidance)
    return teacher.max_sequence_length == int(length) and teacher.embedded_guidance == guidance


def check_text_inputs(sampler: Sampler, prompts) -> None:
    """A text-to-image model without prompts (or an LCM student with a guidance input without its g): a one-line
    ConfigError as it loads, before the reference features and any other model's cells.

    The guidance scale has no default: an exported folder records none (its pipeline's own default, 8.5, would
    score an arbitrary w), and it is part of the protocol.
    """
    if sampler.text_network is None:
        return
    if prompts is None:
        raise ConfigError(
            f"{sampler.what} is text-conditional ({sampler.text_network}): evaluate needs prompts to condition it "
            f"on: pass {PROMPT_OPTIONS}"
        )
    if sampler.guidance_input and sampler.guidance is None:
        raise ConfigError(f"{sampler.what} takes a guidance input (LCM's w embedding, w = g - 1): pass --student-guidance g")


def load_sampler(
    name: str, spec: str | os.PathLike, teacher: DiffusionTeacher | None, device: torch.device,
    student_guidance: float | None = None,
) -> Sampler:
    """A checkpoint (file) or an exported diffusers pipeline (folder) as a :class:`Sampler`.

    Text-to-image students sample prompts (module docstring); ``student_guidance`` is the g of those with a
    guidance input (LCM), the others are sampled at guidance 1, as exported.
    """
    p = Path(spec).expanduser()
    vae = teacher.vae if teacher is not None and teacher.is_latent else None
    if p.is_file():
        model, used_ema = load_checkpoint_model(p, teacher)
        if not hasattr(model, "sample"):
            raise ValueError(f"{type(model).__name__} from {p} has no sample() method")
        den = getattr(model, "student", None)
        model.to(device)
        mvae = getattr(getattr(model, "teacher", None), "vae", None) or vae
        limit = model.max_sample_steps() if hasattr(model, "max_sample_steps") else None
        if den is not None and backbones.is_text_conditional(den.unet):
            if "prompts" not in inspect.signature(model.sample).parameters:
                raise ConfigError(f"student {name!r} ({p}): {type(model).__name__}.sample() takes no prompts, so it "
                                  "cannot be evaluated as a text-to-image model")
            guided = getattr(model, "guidance_embedding", False)  # LCM's w input (check_text_inputs wants its g)
            kw = {"guidance_scale": student_guidance} if guided else {}

            def sample(n, steps, g, prompts):
                return decode_latents(model.sample(n, steps, g, denoiser=den, prompts=list(prompts), **kw), mvae)

            return Sampler(name, "checkpoint", str(p), sample, None, used_ema, limit, type(den.unet).__name__,
                           student_guidance if guided else 1.0, guided)
        # classes read through the backbone adapter: UNet num_class_embeds, DiT num_embeds_ada_norm
        ncls = backbones.num_classes(den.unet) if getattr(model, "is_class_conditional", False) else None

        def sample(n, steps, g, labels):
            return decode_latents(model.sample(n, steps, g, labels=labels, denoiser=den), mvae)

        return Sampler(name, "checkpoint", str(p), sample, ncls, used_ema, limit)
    if p.is_dir():
        pipe, net, sched, pvae = read_pipeline_folder(p)
        if backbones.is_text_conditional(net):
            return text_pipeline_sampler(name, p, pipe, net, device, student_guidance, teacher)
        net = net.to(device)
        pvae = pvae or vae
        ncls = backbones.num_classes(net)

        def sample(n, steps, g, labels):
            return decode_latents(scheduler_sample(net, sched, n, steps, g, labels, device), pvae)

        return Sampler(name, "pipeline", str(p), sample, ncls, None, lcm_step_limit(sched))
    raise FileNotFoundError(f"student {name!r}: {str(spec)!r} is neither a checkpoint file nor a pipeline folder")


def text_pipeline_sampler(name: str, path: Path, pipe, net: nn.Module, device: torch.device,
                          student_guidance: float | None, teacher: DiffusionTeacher | None = None) -> Sampler:
    """An exported text-to-image folder, sampled with the stock pipeline it was saved as (:data:`TEXT_PIPELINES`)
    through :func:`~lightning_distill.metrics.pipeline_sample`; its latents decoded by its own VAE.

    A ``FluxPipeline`` folder of a guidance-distilled network is called with ``guidance_scale`` = the teacher's
    embedded guidance (the value its student was trained at; without a teacher the pipeline's 3.5), and a folder
    with T5 (Flux, SD3 with ``text_encoder_3``) with the teacher's T5 length where the teacher is of its family;
    a ``SanaPipeline`` folder with the teacher's Gemma2 length and instruction; without such a teacher, with the
    settings the folder's export recorded (:func:`folder_text_settings`)."""
    what = f"student {name!r} ({path})"
    kind = type(pipe).__name__ if pipe is not None else "no stock pipeline"
    if kind not in TEXT_PIPELINES:
        raise ConfigError(f"{what} is text-conditional ({type(net).__name__}) but saved as {kind}: evaluate samples "
                          f"exported text-to-image students with {', '.join(TEXT_PIPELINES)}")
    # LatentConsistencyModelPipeline embeds w = g - 1 (no CFG; check_text_inputs wants its g); the others are
    # students of the plain conditional sampler, called with guidance_scale=1 as export documents
    guided = kind == "LatentConsistencyModelPipeline"
    g = student_guidance if guided else 1.0
    embedded, text = folder_text_settings(pipe, net, teacher, path)
    call_g = g if embedded is None else embedded  # FluxPipeline's guidance_scale is the embedded guidance
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def sample(n, steps, gen, prompts):
        return decode_latents(pipeline_sample(pipe, list(prompts), steps, gen, call_g, **text), pipe.vae)

    return Sampler(name, "pipeline", str(path), sample, None, None, lcm_step_limit(pipe.scheduler),
                   type(net).__name__, g, guided, embedded)


def folder_text_settings(pipe, net: nn.Module, teacher: DiffusionTeacher | None,
                         folder: str | os.PathLike | None = None) -> tuple[float | None, dict]:
    """(embedded guidance, text keywords of the pipeline call) an exported text folder is called with: the embedded
    guidance of a guidance-distilled Flux network (None for others), the T5 ``max_sequence_length`` of a folder with
    T5 or a ``SanaPipeline``'s Gemma2 length, and a ``SanaPipeline``'s ``complex_human_instruction`` (None: no
    instruction).

    Where they come from, first found:

    1. a ``teacher`` of the folder's network class: its own settings (``--teacher-embedded-guidance``,
       ``--teacher-max-sequence-length``, or a run's data settings), the teacher the folder is scored against; a
       recorded value that differs is warned about;
    2. the folder's :data:`~lightning_distill.export.CALL_SETTINGS_NAME`, the settings its export recorded (the
       teacher's the student was trained with; read only for the keys above: ``pipeline_sample`` sets the size);
    3. the pipeline's defaults (``FluxPipeline``'s guidance 3.5), which are those of a teacher loaded without options.

    Raises:
        ConfigError: the recorded file is not a JSON object.
    """
    same_family = teacher is not None and type(teacher.unet).__name__ == type(net).__name__
    recorded = read_call_settings(folder) if folder is not None else {}
    sana = isinstance(backbones.backbone_for(net), backbones.SanaBackbone)
    flux = isinstance(backbones.backbone_for(net), backbones.FluxBackbone)
    guided = flux and net.config.get("guidance_embeds", False)

    def text_keys(call: dict) -> dict:  # the teacher's text settings among a call's keywords (not size, binning)
        return {k: v for k, v in call.items() if k == "max_sequence_length"
                or (k == "complex_human_instruction" and sana) or (k == "guidance_scale" and guided)}

    if same_family:
        from .export import pipeline_call_settings

        ours = text_keys(pipeline_call_settings(pipe, teacher))  # what the export records, from this teacher
        differ = sorted(k for k in ours if k in recorded and recorded[k] != ours[k])
        if differ:
            import warnings

            warnings.warn(f"{folder}: scored with the teacher's {', '.join(f'{k}={ours[k]!r}' for k in differ)}; its "
                          f"export recorded {', '.join(f'{k}={recorded[k]!r}' for k in differ)} (what its student was "
                          "trained with)", stacklevel=2)
        settings = ours
    else:
        settings = text_keys(recorded)
    embedded = float(settings.pop("guidance_scale", 3.5)) if guided else None
    return embedded, settings


def read_call_settings(folder: str | os.PathLike) -> dict:
    """The keywords an export recorded beside ``model_index.json``
    (:data:`~lightning_distill.export.CALL_SETTINGS_NAME`); empty when the folder has none (exported before it existed, or written by something else)."""
    from .export import CALL_SETTINGS_NAME

    path = Path(folder) / CALL_SETTINGS_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} cannot be read as JSON ({err}): re-export the folder or remove the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not the JSON object of pipeline keywords an export "
                          "writes")
    return data


def read_pipeline_folder(path: str | os.PathLike):
    """(pipeline or None, denoiser, scheduler, vae or None) of an exported pipeline folder, as a user loads it.

    ``DiffusionPipeline.from_pretrained`` reads the folder (a UNet's ``DDPMPipeline``, a latent DiT's
    ``DiTPipeline``, a pixel DiT's ``DDPMPipeline`` folder holding the transformer, the text-to-image
    pipelines); the denoiser is its ``unet`` or ``transformer``. A folder no stock pipeline loads (a pixel-space
    DiT laid out as ``DiTPipeline`` without ``vae/``, as DiT teacher folders are) is read component by component:
    ``unet/`` or ``transformer/`` (a class :mod:`~lightning_distill.backbones` supports), ``scheduler/``
    and an optional ``vae/``; its pipeline is then None.

    Components ``model_index.json`` records as absent (``[null, null]``: an SD3 export's T5, an SD export's safety
    checker) are passed as None, as the export tells users to load them (``text_encoder_3=None, tokenizer_3=None``).
    """
    import diffusers

    path = Path(path)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        index = {}
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(path, low_cpu_mem_usage=low_cpu_mem_usage(), **absent)
    except (ValueError, TypeError, OSError) as err:
        try:
            return (None, *_load_pipeline_components(path))
        except Exception:
            raise err from None
    net = getattr(pipe, "unet", None)
    if net is None:
        net = getattr(pipe, "transformer", None)
    if net is None:
        raise ValueError(f"pipeline folder {path} ({type(pipe).__name__}) has no unet or transformer to sample")
    return pipe, net, pipe.scheduler, getattr(pipe, "vae", None)


def load_pipeline_folder(path: str | os.PathLike):
    """(denoiser, scheduler, vae or None) of an exported pipeline folder (:func:`read_pipeline_folder`)."""
    return read_pipeline_folder(path)[1:]


def _load_pipeline_components(path: Path):
    import diffusers

    def class_of(sub: str, config: str):
        return json.loads((path / sub / config).read_text())["_class_name"]

    sub = next((s for s in ("unet", "transformer") if (path / s / "config.json").is_file()), None)
    if sub is None or not (path / "scheduler" / "scheduler_config.json").is_file():
        raise ValueError(f"pipeline folder {path} has no unet/ or transformer/ with scheduler/")
    name = class_of(sub, "config.json")
    backbones.check_supported(name)
    net = getattr(diffusers, name).from_pretrained(path, subfolder=sub, low_cpu_mem_usage=low_cpu_mem_usage())
    sched = getattr(diffusers, class_of("scheduler", "scheduler_config.json")).from_pretrained(path, subfolder="scheduler")
    vae = None
    if (path / "vae" / "config.json").is_file():
        vae = getattr(diffusers, class_of("vae", "config.json")).from_pretrained(
            path, subfolder="vae", low_cpu_mem_usage=low_cpu_mem_usage()
        )
    return net, sched, vae


def teacher_sampler(teacher: DiffusionTeacher, name: str = "teacher", guidance_scale: float = 1.0) -> Sampler:
    """The teacher with :data:`TEACHER_SAMPLER`; a text-to-image teacher from prompts, guided at ``guidance_scale``
    (:func:`~lightning_distill.metrics.sample_text_teacher`)."""
    if guidance_scale != 1 and teacher.is_guidance_distilled:
        raise ConfigError(
            f"guidance scale {guidance_scale}: the teacher is guidance-distilled (a guidance input, e.g. Flux-dev), "
            f"guided by its embedded guidance {teacher.embedded_guidance} (FluxPipeline's guidance_scale; "
            "--teacher-embedded-guidance / data.teacher_embedded_guidance); classifier-free guidance against \"\" "
            "would guide it twice: use 1"
        )
    if backbones.is_text_conditional(teacher.unet):
        if not teacher.is_text_conditional:
            raise ConfigError(f"teacher {str(teacher.source)!r} is text-conditional ({type(teacher.unet).__name__}) "
                              "but has no text_encoder/ and tokenizer/ to encode prompts with")
        embedded = teacher.embedded_guidance if teacher.is_guidance_distilled else None
        return Sampler(
            name, "teacher", str(teacher.source),
            lambda n, steps, g, prompts: sample_text_teacher(teacher, list(prompts), steps, g, guidance_scale),
            text_network=type(teacher.unet).__name__, guidance=float(guidance_scale), embedded_guidance=embedded,
        )
    return Sampler(
        name, "teacher", str(teacher.source), lambda n, steps, g, labels: sample_teacher(teacher, n, steps, g, labels),
        teacher.num_classes,
    )


# --- the evaluation ------------------------------------------------------------------------------


def reference_images(data: str, image_size: int, reference: str, split_seed: int, val_fraction: float, channels: int | None):
    """(reference images, held-out images or None) in [-1, 1]: :func:`reference_set` without captions."""
    return reference_set(data, image_size, reference, split_seed, val_fraction, channels)[:2]


def reference_set(
    data: str, image_size: int, reference: str, split_seed: int, val_fraction: float, channels: int | None,
    captions: bool = False,
) -> tuple[Tensor, Tensor | None, Prompts | None]:
    """The reference images, the held-out ones (``reference="train"``: the val split; else None) and, with
    ``captions``, the reference images' captions in the same order (``--prompts captions``), read by
    ``TeacherDataModule.prompts`` from the folder's ``metadata.jsonl`` / ``prompts.txt``."""
    from .data import TeacherDataModule

    dm = TeacherDataModule(teacher=None, data=data, image_size=image_size, channels=channels,
                           split_seed=split_seed, val_fraction=val_fraction)
    dm.setup("fit")
    if reference not in ("train", "val", "all"):
        raise ValueError(f"reference must be 'train', 'val' or 'all', got {reference!r}")
    train, val = list(dm.image_train_set.indices), list(dm.image_val_set.indices)
    index = {"train": train, "val": val, "all": train + val}[reference]  # rows of the folder, in load order
    ref = dm.pixels[index]
    heldout = dm.pixels[val] if reference == "train" else None
    text = None
    if captions:  # one caption per image of the folder, in load order; the labels only fill a {label} prompt
        every = dm.prompts(torch.zeros(len(dm.pixels), dtype=torch.long))
        text = Prompts(tuple(every[i] for i in index), f"captions of the {data} {reference} split")
    return ref, heldout, text


def evaluate_models(
    teacher: str | DiffusionTeacher | None = "bundled:digits",
    students: dict[str, str | os.PathLike] | None = None,
    steps: Sequence[int] = (1, 2, 4, 8),
    teacher_steps: Sequence[int] = (1, 2, 4, 8, 50),
    num_samples: int = 2000,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    feature_net: str | nn.Module = "digits",
    feature_extractor_weights_path: str | None = None,
    data: str = "digits",
    image_size: int | None = None,
    channels: int | None = None,
    reference: str = "train",
    split_seed: int = 0,
    val_fraction: float = 0.1,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    chunk_size: int = 250,
    grid_size: int = 16,
    real_baseline: bool = True,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = None,
    teacher_cache: bool = True,
    teacher_cache_out: str | os.PathLike | None = None,
    student_steps: dict[str, Sequence[int]] | None = None,
    prompts: str | os.PathLike | Sequence[str] | Prompts | None = None,
    guidance_scale: float = 1.0,
    student_guidance: float | None = None,
) -> list[dict]:
    """FD / KID of the teacher (at ``teacher_steps``) and each student (at ``steps``); one dict per row.

    With ``out_dir`` the report files are written there (see the module docstring). Rows carry their
    protocol (``num_samples``, ``seed``, ``feature_net``, ``reference``, ``num_reference``).

    The teacher's cells read their generated features from :mod:`~lightning_distill.teacher_features`
    when an entry with the same content key exists (``teacher_cache``; the report names the file), and
    write the ones they compute to ``cache_dir`` and to ``teacher_cache_out`` when given.
    ``student_steps`` gives the students it names their own step counts instead of ``steps`` (a 1-step
    generator need not be scored at 4).

    Text-to-image models (module docstring): ``prompts`` is a prompt file, ``"captions"`` (the reference
    images' captions) or the list itself; ``guidance_scale`` the teacher's classifier-free guidance (1: none);
    ``student_guidance`` the g of LCM students with a guidance input.

    Example::

        >>> rows = evaluate_models("bundled:digits", {"pd": "runs/pd/student"}, steps=[1, 2], num_samples=500)
        >>> rows[0]["fd"]
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    bad = [s for s in [*steps, *teacher_steps, *(s for v in (student_steps or {}).values() for s in v)] if int(s) < 1]
    if bad or chunk_size < 1:
        raise ConfigError(f"step counts and chunk_size must be >= 1, got steps {bad or 'ok'} and chunk_size {chunk_size}")
    check_kid_settings(kid_subsets, kid_subset_size)
    if teacher is not None and teacher_steps and "teacher" in (students or {}):
        raise ConfigError("a student is named 'teacher', the teacher's own row: rename it (its rows would merge)")
    for flag, g in (("--guidance-scale", guidance_scale), ("--student-guidance", student_guidance)):
        if g is not None and not g >= 1:
            raise ConfigError(f"{flag} must be >= 1 (the pipelines' convention, 1: no guidance), got {g}")
    prompts = resolve_prompts(prompts, data)  # a prompt file is read (and refused) before any model loads
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(teacher, (str, os.PathLike)):
        teacher = load_teacher(teacher)
    if teacher is not None:
        teacher.to(device)
    if image_size is None:
        if teacher is None:
            raise ValueError("image_size is needed when there is no teacher to take it from")
        # a latent teacher's pipeline default: its sample size times its VAE's scale factor (SD3: 128 x 8 = 1024)
        image_size = teacher.sample_size * teacher.vae_scale_factor
    # every model loads before the feature network and the reference statistics, so a wrong student path
    # fails at once instead of after minutes of reference feature extraction
    models: list[tuple[Sampler, Sequence[int]]] = []
    if teacher is not None and teacher_steps:
        models.append((teacher_sampler(teacher, guidance_scale=guidance_scale), list(teacher_steps)))
        check_text_inputs(models[-1][0], prompts)
    for name, spec in (students or {}).items():
        sampler = load_sampler(name, spec, teacher, device, student_guidance)
        check_text_inputs(sampler, prompts)
        own = list((student_steps or {}).get(name, steps))
        ok = [s for s in own if sampler.max_steps is None or s <= sampler.max_steps]
        if not ok:
            raise StepCountError(name, sampler.max_steps, own)
        if len(ok) < len(own):
            log(f"{name}: samples with at most {sampler.max_steps} steps (its training grid); "
                f"skipping steps {[s for s in own if s not in ok]}")
        models.append((sampler, ok))
    check_text_options([s for s, _ in models], prompts, guidance_scale, student_guidance)
    kwargs = {"feature_extractor_weights_path": feature_extractor_weights_path} if feature_extractor_weights_path else {}
    net = get_feature_net(feature_net, **kwargs).to(device)
    feat_name = feature_net_name(net)
    ref_images, heldout, captions = reference_set(data, image_size, reference, split_seed, val_fraction, channels,
                                                  captions=prompts == "captions")
    prompts = captions or prompts
    ref = reference_stats(ref_images, net, cache_dir, device=device)
    ref_desc = f"{data} {reference} split (split_seed={split_seed}, val_fraction={val_fraction}, {ref.num_images} images, {image_size}x{image_size})"
    log(f"reference: {ref_desc}; feature net {feat_name}; {'cached' if ref.from_cache else 'computed'} stats {ref.key}")

    rows: list[dict] = []
    grids: dict[str, dict[int, Tensor]] = {}
    protocol = dict(num_samples=num_samples, seed=seed, feature_net=feat_name, reference=ref_desc, num_reference=ref.num_images)
    text = {}  # the text-to-image protocol (results.md, protocol.json); empty otherwise, so other reports stay as they were
    if prompts is not None:
        text = {"prompts": prompts.protocol(), "guidance_scale": float(guidance_scale), "student_guidance": student_guidance}
        log(f"prompts: {len(prompts)} from {prompts.source} (sha256 {prompts.sha256[:12]}); image i gets prompt i % "
            f"{len(prompts)}; teacher guidance scale {guidance_scale}")
    if real_baseline and heldout is not None and heldout.shape[0] >= 2:
        s = score_features(extract_features(net, heldout, device=device), ref, True, kid_subsets, kid_subset_size, seed)
        rows.append(dict(model="real held-out (val split)", kind="data", steps=0, fd=s.fd, kid=s.kid, kid_std=s.kid_std,
                         **{**protocol, "num_samples": s.num_samples}))
    cached_from: dict[int, str] = {}
    digest = None
    for sampler, step_list in models:
        grids[sampler.name] = {}
        for st in step_list:
            compute = lambda st=st: sample_cell(sampler, st, net, num_samples, seed, chunk_size, grid_size, device,
                                                prompts)
            if sampler.kind == "teacher":
                digest = digest or teacher_features.teacher_digest(teacher, net, device)
                conditioning = None
                if sampler.text_network is not None:  # another prompt list or scale: another entry
                    conditioning = teacher_features.text_conditioning(prompts.sha256, len(prompts), sampler.guidance)
                feats, grid, path = teacher_features.cached_cell(
                    teacher, digest, st, num_samples, seed, chunk_size, compute, cache_dir, teacher_cache,
                    teacher_cache_out, conditioning,
                )
                if path is not None:
                    cached_from[st] = path
            else:
                (feats, grid), path = compute(), None
            s = score_features(feats, ref, True, kid_subsets, kid_subset_size, seed)
            grids[sampler.name][st] = grid
            rows.append(dict(model=sampler.name, kind=sampler.kind, steps=st, fd=s.fd, kid=s.kid, kid_std=s.kid_std,
                             **protocol))
            log(f"{sampler.name} {st} steps: FD {s.fd:.4f}  KID {s.kid:.5f} ± {s.kid_std:.5f}"
                + (f"  (features read from {path})" if path else ""))
    if out_dir is not None:
        # KID caps a subset at the smaller set: the size the generated rows used (the held-out row: its own)
        used = min(kid_subset_size, num_samples, ref.num_images)
        kid = {"kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size, "kid_subset_size_used": used}
        if real_baseline and heldout is not None and heldout.shape[0] >= 2:
            kid["kid_subset_size_used_heldout"] = min(kid_subset_size, int(heldout.shape[0]), ref.num_images)
        # chunk_size: each chunk draws from its own generator (metrics.chunk_seed), so it is part of the noise;
        # the teacher's dtype (--teacher-dtype): a bf16 teacher draws other images (and decodes the latents of
        # students without a VAE of their own)
        weight = None if teacher is None else next(iter(teacher.unet.parameters()), None)
        held = {} if weight is None else {"teacher_dtype": str(weight.dtype).removeprefix("torch.")}
        write_report(rows, grids, out_dir, models, {**protocol, "chunk_size": chunk_size, **kid, **text, **held,
                                                    "teacher_features_cached": cached_from}, feat_name)
    return rows


def check_text_options(samplers: list[Sampler], prompts, guidance_scale: float, student_guidance: float | None) -> None:
    """Prompts or guidance scales given where no model takes them: one-line ConfigErrors (they would be
    silently ignored, and a report stating them would be wrong)."""
    text = [s for s in samplers if s.text_network is not None]
    if prompts is not None and not text:
        source = "--prompts captions" if prompts == "captions" else f"--prompts ({prompts.source})"
        raise ConfigError(
            f"{source} given, but no model here is text-conditional ({', '.join(s.what for s in samplers) or 'none'}): "
            "prompts condition text-to-image models (UNet2DConditionModel, SD3Transformer2DModel, "
            "FluxTransformer2DModel) only"
        )
    if guidance_scale != 1 and not any(s.kind == "teacher" for s in text):
        raise ConfigError(f"--guidance-scale {guidance_scale} guides a text-to-image teacher, and there is none here")
    if student_guidance is not None and not any(s.guidance_input for s in samplers):
        raise ConfigError(
            f"--student-guidance {student_guidance} is the g of LCM students with a guidance input "
            "(LatentConsistencyModelPipeline folders, their checkpoints), and there is none here"
        )


def kid_sizes(protocol: dict) -> str:
    """The KID subset size for results.md: the one used, and the requested one where the sets capped it."""
    req = protocol.get("kid_subset_size", 1000)
    used = protocol.get("kid_subset_size_used", req)
    text = f"{used} samples per set" + (f" (requested {req}, capped at the smaller set)" if used != req else "")
    heldout = protocol.get("kid_subset_size_used_heldout")
    return text + (f"; the held-out row: {heldout}" if heldout is not None and heldout != used else "")


def sample_cell(sampler, steps: int, net, num_samples: int, seed: int, chunk_size: int, grid_size: int, device,
                prompts: Prompts | None = None):
    """Features of ``num_samples`` images the sampler draws at ``steps`` (the protocol's chunks and seeds),
    and the first ``grid_size`` images for the sample grid.

    A text-to-image sampler draws image i with prompt i % P: ``generated_features`` hands out the indices
    i % P as it hands out class labels, from the image's own index, so the prompts (like the noise) do not
    depend on how the images are split into chunks or over ranks.
    """
    first: list[Tensor] = []
    text = sampler.text_network is not None
    if text and prompts is None:
        raise ConfigError(f"{sampler.what} is text-conditional: its cells need prompts")

    def fn(n, g, labels):
        x = sampler.sample(n, steps, g, prompts.for_images(labels) if text else labels)
        if not first:
            first.append(x[:grid_size].float().cpu())
        return x

    classes = len(prompts) if text else sampler.num_classes
    return generated_features(fn, net, num_samples, seed, chunk_size, classes, device=device), first[0]


# --- report files --------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_report(rows: list[dict], grids: dict, out_dir, models, protocol: dict, feat_name: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    all_steps = sorted({r["steps"] for r in rows if r["kind"] != "data"})
    lines = [
        "# FD / KID versus sampling steps",
        "",
        f"- Feature network: **{feat_name}** (\"FD-digits\" when it is the bundled digits classifier)",
        f"- Reference set: {protocol['reference']}",
        f"- Generated samples per cell: {protocol['num_samples']}, seed {protocol['seed']} (the same noise chunks "
        "for every model and step count)",
        *chunk_protocol_lines(protocol),
        f"- Teacher: {TEACHER_SAMPLER}; students: their own sampler (checkpoint: "
        "`sample()` with EMA weights when stored; pipeline: its scheduler)",
        *([f"- Teacher precision: {protocol['teacher_dtype']} (`--teacher-dtype`; its VAE and text encoders too; a "
           "checkpoint's own teacher is the run's, in the run's dtype)"] if protocol.get("teacher_dtype") else []),
        f"- KID: unbiased polynomial-kernel MMD^2 (x 1e3 below), mean over {protocol.get('kid_subsets', 100)} subsets "
        f"of {kid_sizes(protocol)}",
        *text_protocol_lines(protocol),
        "",
    ]
    for metric, scale, title in (("fd", 1.0, "FD"), ("kid", 1e3, "KID x 1e3")):
        lines += [f"## {title}", "", "| model | " + " | ".join(f"{s} steps" for s in all_steps) + " |",
                  "|---|" + "---|" * len(all_steps)]
        for sampler, _ in models:
            cells = {r["steps"]: r[metric] for r in rows if r["model"] == sampler.name}
            lines.append(f"| {sampler.name} ({sampler.kind}) | " + " | ".join(
                f"{cells[s] * scale:.4g}" if s in cells else "" for s in all_steps) + " |")
        lines.append("")
    for r in rows:
        if r["kind"] == "data":
            lines += [f"Real held-out data against the reference ({r['num_samples']} images; a small-sample "
                      f"value, not a floor at {protocol['num_samples']}): FD {r['fd']:.4g}, KID x 1e3 {r['kid'] * 1e3:.4g}", ""]
    for st, path in sorted(protocol.get("teacher_features_cached", {}).items()):
        lines += [f"Teacher {st} steps: generated features read from the cache entry `{path}` (same teacher weights, "
                  "sampler, protocol and library versions; `--no-teacher-cache` samples them again)", ""]
    lines += ["Models:", ""] + [
        f"- {s.name}: {s.kind} `{s.source}`" + (f" (EMA weights: {'yes' if s.ema else 'no'})" if s.ema is not None else "")
        + (f"; text-to-image ({s.text_network}), guidance scale {s.guidance:g}" if s.text_network is not None else "")
        + (f", embedded guidance {s.embedded_guidance:g}" if s.embedded_guidance is not None else "")
        for s, _ in models
    ] + [""]
    (out / "results.md").write_text("\n".join(lines))
    (out / "protocol.json").write_text(json.dumps(protocol, indent=2) + "\n")
    plot_fd_vs_steps(rows, out / "fd_vs_steps.png", feat_name, protocol["num_samples"])
    save_grids(grids, out)
    return out


def chunk_protocol_lines(protocol: dict) -> list[str]:
    """results.md's line on the noise chunks (``protocol["chunk_size"]``), for this module's, the seeds runner's
    and compare's reports: none when the protocol does not record it."""
    if protocol.get("chunk_size") is None:
        return []
    return [f"- Noise chunks: {protocol['chunk_size']} images each (`--chunk-size`), chunk c drawn from its own "
            "generator seeded from (seed, c): another chunk size draws other noise, hence other values"]


def text_protocol_lines(protocol: dict) -> list[str]:
    """results.md's lines on the prompts and guidance of a text-to-image evaluation; none for other reports."""
    if "prompts" not in protocol:
        return []
    p, g, sg = protocol["prompts"], protocol["guidance_scale"], protocol.get("student_guidance")
    return [
        f"- Prompts: {p['count']} from {p['source']} (sha256 of the list as a UTF-8 JSON array: `{p['sha256']}`); "
        f"image i is drawn with prompt i % {p['count']} by every model",
        f"- Teacher guidance: classifier-free, scale {g:g} (the empty prompt as the unconditional one; 1 = no guidance); "
        "students: sampled as exported, guidance scale 1 (pipeline folders: the stock pipeline they were saved as, "
        "on the same latents; checkpoints: `sample(..., prompts=...)`)"
        + (f"; LCM students with a guidance input: g = {sg:g} (w = {sg - 1:g})" if sg is not None else ""),
    ]


def style_fd_axes(ax, feat_name: str, title: str, log_y: bool) -> None:
    """Axes of an FD-vs-steps plot: log2 steps, log FD when every value is positive, labels, grid."""
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")  # FD spans orders of magnitude between 1 step and the teacher's 50
    ax.set_xlabel("sampling steps (network evaluations)")
    ax.set_ylabel(f"FD ({feat_name})")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def plot_fd_vs_steps(rows: list[dict], path: Path, feat_name: str, num_samples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(dict.fromkeys(r["model"] for r in rows if r["kind"] != "data"))
    for name in names:
        pts = sorted((r["steps"], r["fd"]) for r in rows if r["model"] == name)
        kind = next(r["kind"] for r in rows if r["model"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="--" if kind == "teacher" else "-", label=name)
    for r in rows:
        if r["kind"] == "data":
            ax.axhline(r["fd"], color="grey", lw=0.8, ls=":", label=f"real held-out (n={r['num_samples']})")
    style_fd_axes(ax, feat_name, f"FD vs steps, n={num_samples}", log_y=all(r["fd"] > 0 for r in rows))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_grids(grids: dict[str, dict[int, Tensor]], out: Path) -> None:
    from torchvision.utils import make_grid, save_image

    for name, per_step in grids.items():
        if not per_step:
            continue
        rows = [per_step[s] for s in sorted(per_step)]
        n = min(r.shape[0] for r in rows)
        imgs = torch.cat([r[:n] for r in rows])
        if imgs.shape[-1] < 64:  # small images (16x16 digits): enlarge, without smoothing, to be seen
            imgs = torch.nn.functional.interpolate(imgs, scale_factor=-(-64 // imgs.shape[-1]), mode="nearest")
        grid = make_grid((imgs.clamp(-1, 1) + 1) / 2, nrow=n, padding=1, pad_value=1.0)
        save_image(grid, out / f"samples_{_safe(name)}.png")


# --- sanity checks of the metric itself ----------------------------------------------------------


def _student(arg: str) -> tuple[str, str]:
    name, sep, path = arg.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--student takes NAME=PATH, got {arg!r}")
    return name, path


def add_text_arguments(p: argparse.ArgumentParser) -> None:
    """The text-to-image options (``--prompts``, ``--guidance-scale``, ``--student-guidance``) of ``evaluate`` and
    of the runners that pass them through to its scoring (``seeds``, ``compare``)."""
    p.add_argument("--prompts", default=None, metavar="FILE|captions",
                   help="text-to-image models: a prompt file (one per line, UTF-8; blank lines ignored) or 'captions' "
                        "(the data folder's metadata.jsonl); image i gets prompt i %% P")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="the text-to-image teacher's classifier-free guidance scale ('' as unconditional; 1: none)")
    p.add_argument("--student-guidance", type=float, default=None,
                   help="g of LCM students with a guidance input (they embed w = g - 1); other students: 1, as exported")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightning_distill.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="bundled:digits", help="teacher source; 'none' for students only")
    p.add_argument("--student", type=_student, action="append", default=[], metavar="NAME=PATH",
                   help="a checkpoint (.ckpt) or exported pipeline folder; repeatable")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--teacher-steps", type=int, nargs="*", default=[1, 2, 4, 8, 50])
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--feature-net", default="digits", help="digits, inception, or a saved classifier folder")
    p.add_argument("--feature-extractor-weights-path", default=None, help="Inception weights file (offline)")
    p.add_argument("--data", default="digits")
    p.add_argument("--image-size", type=int, default=None,
                   help="default: the teacher's resolution (a latent teacher's sample size x its VAE's scale factor)")
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--reference", choices=["train", "val", "all"], default="train")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--chunk-size", type=int, default=250)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-teacher-cache", action="store_true", help="always sample the teacher's cells")
    p.add_argument("--teacher-cache-out", default=None,
                   help="also write the teacher's cell features here (e.g. <teacher folder>/eval_cache to ship them)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-real-baseline", action="store_true")
    add_text_arguments(p)
    p.add_argument("--teacher-embedded-guidance", type=float, default=None,
                   help="a guidance-distilled Flux teacher's embedded guidance, as the run's data.teacher_embedded_guidance "
                        "(default 3.5); its FluxPipeline students are called with it")
    p.add_argument("--teacher-max-sequence-length", type=int, default=None,
                   help="the T5 prompt length of an SD3-with-T5 or Flux teacher and its students, as the run's "
                        "data.teacher_max_sequence_length (default: the pipeline's, 256 / 512)")
    p.add_argument("--teacher-complex-human-instruction", default=None, metavar="FILE|none",
                   help="a SANA teacher's complex_human_instruction, as the run's data.teacher_complex_human_instruction: "
                        "a UTF-8 file of its lines, or none (default: SanaPipeline's own)")
    # checked in main, not by argparse's choices: a bad value is then one line (argparse adds its usage line)
    p.add_argument("--teacher-dtype", default=None, metavar="{" + ",".join(DTYPES) + "}",
                   help="the precision the teacher (and its VAE and text encoders) is held in, as the run's "
                        "data.teacher_dtype (default float32); a checkpoint's teacher is the run's own, in its dtype")
    p.add_argument("--fd-checks", action="store_true", help="run the metric's own checks instead; writes <out>/fd_checks.md")
    p.add_argument("--fd-checks-model", default=None, help="model sampled twice for the determinism check")
    p.add_argument("--fd-checks-steps", type=int, default=4)
    return p


def instruction_lines(value: str) -> list[str] | None:
    """``--teacher-complex-human-instruction``: None for ``none``, else the lines of the UTF-8 file ``value`` (every
    line kept, blank ones too; one final newline is not a line)."""
    if value.lower() == "none":
        return None
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"--teacher-complex-human-instruction {value!r}: no such file (a UTF-8 file of the "
                          "instruction's lines, or none)")
    return path.read_text(encoding="utf-8").removesuffix("\n").split("\n")


def main(argv: list[str] | None = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    if a.teacher_dtype is not None and a.teacher_dtype not in DTYPES:
        raise ConfigError(f"--teacher-dtype {a.teacher_dtype!r} is not one of {', '.join(DTYPES)}")
    if a.fd_checks:
        from .fd_checks import fd_checks

        fd_checks(Path(a.out) / "fd_checks.md", a.feature_net, a.image_size or 16, a.fd_checks_model,
                  a.fd_checks_steps, a.num_samples, device=a.device)
        print((Path(a.out) / "fd_checks.md").read_text())
        return []
    names = [n for n, _ in a.student]
    if len(set(names)) != len(names):
        raise SystemExit(f"evaluate: duplicate student names {names}")
    teacher = None if a.teacher.lower() == "none" else a.teacher
    text = {"teacher_embedded_guidance": a.teacher_embedded_guidance,
            "teacher_max_sequence_length": a.teacher_max_sequence_length}
    if teacher is None and any(v is not None for v in text.values()):
        raise ConfigError("--teacher-embedded-guidance and --teacher-max-sequence-length set the teacher's text "
                          "conditioning, but --teacher is none: unset them")
    if a.teacher_complex_human_instruction is not None:
        if teacher is None:
            raise ConfigError("--teacher-complex-human-instruction sets a SANA teacher's instruction, but --teacher is "
                              "none: unset it")
        text["teacher_complex_human_instruction"] = instruction_lines(a.teacher_complex_human_instruction)
    if teacher is None and a.teacher_dtype is not None:
        raise ConfigError(f"--teacher-dtype {a.teacher_dtype} sets the teacher's precision, but --teacher is none: unset it")
    settings = {**text, "teacher_dtype": a.teacher_dtype}
    if any(v is not None for v in settings.values()) or "teacher_complex_human_instruction" in settings:
        # the teacher as the run's data settings load it (an instruction set to none is a setting)
        from .data import load_run_teacher

        teacher = load_run_teacher({"teacher": teacher, **settings})
    rows = evaluate_models(
        teacher=teacher,
        students=dict(a.student),
        steps=a.steps,
        teacher_steps=a.teacher_steps,
        num_samples=a.num_samples,
        seed=a.seed,
        out_dir=a.out,
        feature_net=a.feature_net,
        feature_extractor_weights_path=a.feature_extractor_weights_path,
        data=a.data,
        image_size=a.image_size,
        channels=a.channels,
        reference=a.reference,
        split_seed=a.split_seed,
        val_fraction=a.val_fraction,
        kid_subsets=a.kid_subsets,
        kid_subset_size=a.kid_subset_size,
        chunk_size=a.chunk_size,
        real_baseline=not a.no_real_baseline,
        cache_dir=a.cache_dir, teacher_cache=not a.no_teacher_cache, teacher_cache_out=a.teacher_cache_out,
        device=a.device, prompts=a.prompts, guidance_scale=a.guidance_scale, student_guidance=a.student_guidance,
    )
    print((Path(a.out) / "results.md").read_text())
    return rows


def _entry() -> None:
    """``python -m lightning_distill.evaluate``: bad input ends in one line, as in the training CLI."""
    from .cli import one_line_errors

    with one_line_errors("evaluate", (ValueError, FileNotFoundError)):  # TeacherError, DataError: ValueError
        main()


if __name__ == "__main__":
    _entry()
