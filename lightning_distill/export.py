"""Writing a student as a diffusers pipeline folder, atomically.

The pipeline is written to a temporary sibling folder and renamed into place, so an interrupted export
never leaves a half-written folder at the target path; an existing export at that path is replaced only
once the new one is complete.

A LoRA student (:mod:`lightning_distill.lora`) is written the same way for every pipeline class
(:func:`write_student_pipeline`): the folder holds the fused network (a stock model, no peft needed) and,
beside it, the adapters as ``pytorch_lora_weights.safetensors``, which the *teacher's* pipeline loads with
``load_lora_weights`` (SD UNets, SD3, Flux and SANA transformers) or :func:`lightning_distill.lora.load_lora` (the
others).

Text-to-image students go into their teacher family's stock pipeline (:func:`export_text_pipeline`):
``StableDiffusionPipeline``, ``StableDiffusion3Pipeline`` (with T5 when the teacher has it), ``FluxPipeline``,
``SanaPipeline``. Beside ``model_index.json``, in the same atomic write, goes :data:`CALL_SETTINGS_NAME`: the keywords
of the pipeline call that samples as the student's ``sample()`` (the teacher's text settings the student was trained
with, which the folder's components do not record: :func:`pipeline_call_settings`)::

    >>> pipe = FluxPipeline.from_pretrained(folder)
    >>> images = pipe(prompt="a red cat", **json.loads((folder / "distillation_call.json").read_text())).images
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint_io import fsync_dir, fsync_tree, umask_mode
from .errors import ConfigError, MissingInputError
from .teacher import low_cpu_mem_usage


def atomic_write_dir(target: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``target`` (replacing it) in two renames.

    The previous folder is moved aside first and removed only after the new one is in place; if the second
    rename fails it is moved back, and a crash between the two renames leaves it next to the target as
    ``.<name>.old-*`` rather than losing it.
    """
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        # mkdtemp makes the folder private (0700); the export gets what a plain mkdir would give under the umask
        os.chmod(tmp, umask_mode(0o777))
        write(tmp)
        fsync_tree(tmp)  # the content is on disk before the rename publishes it (a power loss: old or new)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old)  # onto the empty folder mkdtemp made: a unique name, never a stale one
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)  # the second rename failed: the previous folder goes back
        raise
    return target


def make_pipeline(unet: nn.Module, scheduler, vae: nn.Module | None = None):
    """A stock diffusers pipeline around ``unet`` whose sampling loop is the framework's own.

    ``DDPMPipeline`` calls ``scheduler.step(out, t, x, generator=...)`` with the scheduler's defaults,
    which is exactly :meth:`DistillationMethod.sample`, for DDIM (eta = 0) and LCM schedulers alike.
    A latent ``DiTTransformer2DModel`` (with the teacher's ``vae``) goes into ``DiTPipeline``, whose loop
    is the same (learned-sigma half, class labels) except that it passes no generator to
    ``scheduler.step``: it reproduces deterministic samplers (DDIM, flow Euler) and 1-step LCM sampling,
    not the fresh noise of a multi-step LCM sampler. A pixel-space DiT has no stock pipeline
    (``DiTPipeline`` always decodes with a VAE): it is written as a ``DDPMPipeline`` folder, which
    ``load_teacher`` / ``load_student_state`` read but ``DDPMPipeline.__call__`` cannot sample (no labels).
    """
    from diffusers import DDPMPipeline, DiTPipeline

    if type(unet).__name__ == "DiTTransformer2DModel" and vae is not None:
        return DiTPipeline(transformer=unet, vae=vae, scheduler=scheduler)
    return DDPMPipeline(unet=unet, scheduler=scheduler)


def cpu_float_copy(module: nn.Module) -> nn.Module:
    """A float32 copy of ``module`` on the CPU, each tensor copied straight there: ``deepcopy(module).cpu()``
    would first make a second copy on the module's device (another 24 GB of GPU memory for a bf16 12 B
    network at export time). Non-float tensors keep their dtype; nothing is shared with ``module``."""
    def moved(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True)

    memo = {id(p): nn.Parameter(moved(p), requires_grad=p.requires_grad) for p in module.parameters()}
    memo.update({id(b): moved(b) for b in module.buffers()})
    return copy.deepcopy(module, memo)  # deepcopy's memo returns each listed tensor's copy


def write_student_pipeline(network: nn.Module, make_pipe, target: str | os.PathLike, call_settings=None) -> Path:
    """Save ``make_pipe(plain)`` (a diffusers pipeline around ``plain``, a float32 CPU copy of the student
    ``network``) at ``target``, atomically; the one path every export takes. ``call_settings(pipe)``: the keywords
    of the pipeline's call, written as :data:`CALL_SETTINGS_NAME` inside the same atomic write (None: no file).

    A LoRA ``network`` goes into the pipeline fused (``W + alpha / r * B A``: a stock folder loadable with
    ``from_pretrained`` and no peft), and its adapters go into the same folder, inside the same atomic write,
    as :data:`~lightning_distill.lora.LORA_WEIGHT_NAME` in diffusers' layout (:func:`lightning_distill.lora.save_lora`),
    so the teacher's pipeline + ``load_lora_weights(folder)`` + the exported scheduler samples as the student.
    """
    from . import lora

    adapters = lora.has_lora(network)
    # .to(dtype=...) makes diffusers warn about fp32 modules. The adapters merge in float32 (peft merges in the
    # base's dtype: a bf16 base would round W + B A to bf16, losing most of a small update).
    plain = cpu_float_copy(network)
    if adapters:
        lora.fuse_lora(plain, inplace=True)
    plain.requires_grad_(True)  # save_pretrained does not care; keep the copy a plain trainable model
    pipe = make_pipe(plain)
    call = call_settings(pipe) if call_settings is not None else None  # before the write: a failure writes nothing

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if adapters:
            lora.save_lora(network, tmp)
        if call is not None:
            (tmp / CALL_SETTINGS_NAME).write_text(json.dumps(call, indent=2) + "\n")

    return atomic_write_dir(target, write)


def export_pipeline(unet: nn.Module, scheduler, target: str | os.PathLike, vae: nn.Module | None = None) -> Path:
    """Save ``unet`` (float32, safetensors) and ``scheduler`` as a loadable diffusers pipeline folder
    (with ``vae``, for a latent DiT: a ``DiTPipeline``; see :func:`make_pipeline`); a LoRA ``unet`` as its
    fused network plus the adapter file (:func:`write_student_pipeline`)."""
    if vae is not None and type(unet).__name__ == "DiTTransformer2DModel":
        vae = cpu_float_copy(vae)
    else:
        vae = None  # only a DiT export carries the VAE (a UNet export stays a DDPMPipeline)
    return write_student_pipeline(unet, lambda net: make_pipeline(net, scheduler, vae), target)


def float32_parts(parts, *names: str) -> dict[str, nn.Module | None]:
    """The named pipeline parts of ``parts`` (a teacher, or :func:`~lightning_distill.text_cache.pipeline_parts`)
    in float32 on the CPU, as the student is written: a folder whose parts differ in dtype (a bf16 teacher's text
    encoders beside the float32 student) fails when loaded with a plain ``from_pretrained`` (the pipeline draws
    latents in its encoders' dtype and feeds them to the float32 network). A part already float32 is used as it
    is (saving does not change it); a missing one is None."""
    out = {}
    for name in names:
        module = getattr(parts, name, None)
        floats = [] if module is None else [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
        out[name] = module if all(t.dtype == torch.float32 for t in floats) else cpu_float_copy(module)
    return out


#: the file a text-to-image export writes beside ``model_index.json``: the keywords of the stock pipeline's call that
#: sample as the student's ``sample()`` (:func:`pipeline_call_settings`). diffusers does not read it; evaluate does.
CALL_SETTINGS_NAME = "distillation_call.json"


def pipeline_call_settings(pipe, teacher) -> dict:
    """The keywords to call ``pipe`` (a text-to-image export's stock pipeline) with so that it samples as the
    student's ``sample()``, from the ``teacher`` the student was distilled from (a teacher, or
    :func:`~lightning_distill.text_cache.pipeline_parts`); written as :data:`CALL_SETTINGS_NAME`.

    * ``height`` / ``width``: the network's sample size in pixels (``FluxPipeline`` draws 1024 px whatever the
      network's config says; the others default to it already);
    * ``guidance_scale``: 1 for SD, SD3 and SANA students (they sample the plain conditional teacher's
      distribution; the pipelines' own defaults would add classifier-free guidance); for a guidance-distilled Flux
      network the teacher's ``embedded_guidance`` it was trained at (``FluxPipeline``'s guidance_scale is that input;
      a network without it takes no guidance keyword);
    * ``max_sequence_length``: the teacher's T5 prompt length (SD3, also of the zero T5 part without T5; Flux) or
      Gemma2 prompt length (SANA);
    * SANA: ``complex_human_instruction`` (null: none; else the lines) and ``use_resolution_binning: false``
      (``sample()`` draws at the network's own size; the bin tables refuse sizes outside them).

    A setting ``teacher`` does not carry (a namespace of parts without it) is left out, with a warning: the
    pipeline's default is then used, which may not be the student's.
    """
    import warnings

    from . import backbones

    net = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    kind = type(net).__name__
    flux, sana = kind == "FluxTransformer2DModel", kind == "SanaTransformer2DModel"
    size = backbones.sample_shape(net)[1] * int(pipe.vae_scale_factor)
    call: dict = {"height": size, "width": size, **({} if flux else {"guidance_scale": 1.0})}
    recorded = {}  # call keyword -> (the teacher's attribute, its JSON value)
    if kind != "UNet2DConditionModel":
        recorded["max_sequence_length"] = ("max_sequence_length", int)
    if flux and net.config.get("guidance_embeds", False):
        recorded["guidance_scale"] = ("embedded_guidance", float)
    if sana:
        recorded["complex_human_instruction"] = ("complex_human_instruction",
                                                 lambda lines: list(lines) if lines else None)
        call["use_resolution_binning"] = False
    missing = [attr for attr, _ in recorded.values() if not hasattr(teacher, attr)]
    if missing:
        warnings.warn(f"{CALL_SETTINGS_NAME}: the teacher's {', '.join(missing)} cannot be read from a "
                      f"{type(teacher).__name__}; left out (the pipeline's default is then used)", stacklevel=3)
    for key, (attr, as_json) in recorded.items():
        if hasattr(teacher, attr):
            call[key] = as_json(getattr(teacher, attr))
    return call


def export_sd3_pipeline(transformer: nn.Module, scheduler, teacher, target: str | os.PathLike) -> Path:
    """Save an ``SD3Transformer2DModel`` student (float32) with ``scheduler`` and the SD3 ``teacher``'s VAE,
    text encoders and tokenizers (T5 where the teacher has one) as a ``StableDiffusion3Pipeline`` folder; a LoRA
    student as its fused transformer plus the adapter file (:func:`write_student_pipeline`: the teacher's pipeline
    + ``load_lora_weights(folder)`` + this folder's scheduler samples as the student).

    Every part is written in float32 (:func:`float32_parts`), so a plain ``from_pretrained`` runs; pass
    ``torch_dtype`` to run in another. Load it with ``StableDiffusion3Pipeline.from_pretrained(path)``, T5-less
    folders with ``text_encoder_3=None, tokenizer_3=None``, and call it with the keywords in
    :data:`CALL_SETTINGS_NAME` (``guidance_scale=1``, the teacher's T5 ``max_sequence_length``).
    Its loop is :func:`~lightning_distill.sampling.text_to_image_loop` except that it passes no generator to
    ``scheduler.step``: deterministic samplers and one-step x0 samplers reproduce the framework's samples
    for the same generator; a multi-step ``FlowMatchLCMScheduler`` draws its fresh noise from torch's
    global generator instead.
    """
    from diffusers import StableDiffusion3Pipeline

    t = teacher
    parts = float32_parts(t, "vae", "text_encoder", "text_encoder_2", "text_encoder_3")

    def make(net: nn.Module):
        return StableDiffusion3Pipeline(
            transformer=net, scheduler=scheduler, tokenizer=t.tokenizer, tokenizer_2=t.tokenizer_2,
            tokenizer_3=getattr(t, "tokenizer_3", None), **parts,
        )

    return write_student_pipeline(transformer, make, target, lambda pipe: pipeline_call_settings(pipe, t))


def export_flux_pipeline(transformer: nn.Module, scheduler, teacher, target: str | os.PathLike) -> Path:
    """Save a ``FluxTransformer2DModel`` student (float32) with ``scheduler`` and the Flux ``teacher``'s VAE, CLIP
    (``text_encoder``) and T5 (``text_encoder_2``) encoders and tokenizers as a ``FluxPipeline`` folder; a LoRA
    student as its fused transformer plus the adapter file, which ``FluxPipeline.load_lora_weights`` reads
    (:func:`write_student_pipeline`).

    Its loop is :func:`~lightning_distill.sampling.text_to_image_loop` with ``FluxPipeline``'s steps
    (:func:`~lightning_distill.sampling.set_pipeline_steps`) and, like SD3's, no generator passed to
    ``scheduler.step`` (see :func:`export_sd3_pipeline`). Call it with the keywords in :data:`CALL_SETTINGS_NAME`:
    ``guidance_scale`` = the teacher's ``embedded_guidance`` for a guidance-distilled network (the value it was
    trained at; absent otherwise), the teacher's T5 ``max_sequence_length``, and the network's ``height`` / ``width``.
    """
    from diffusers import FluxPipeline

    t = teacher
    parts = float32_parts(t, "vae", "text_encoder", "text_encoder_2")

    def make(net: nn.Module):
        return FluxPipeline(transformer=net, scheduler=scheduler, tokenizer=t.tokenizer, tokenizer_2=t.tokenizer_2, **parts)

    return write_student_pipeline(transformer, make, target, lambda pipe: pipeline_call_settings(pipe, t))


def export_sana_pipeline(transformer: nn.Module, scheduler, teacher, target: str | os.PathLike) -> Path:
    """Save a ``SanaTransformer2DModel`` student (float32) with ``scheduler`` and the SANA ``teacher``'s
    ``AutoencoderDC``, Gemma2 encoder and tokenizer as a ``SanaPipeline`` folder; a LoRA student as its fused
    transformer plus the adapter file, which ``SanaPipeline.load_lora_weights`` reads (:func:`write_student_pipeline`).

    Its loop is :func:`~lightning_distill.sampling.text_to_image_loop`'s, and it passes its generator to
    ``scheduler.step``, so a multi-step ``FlowMatchLCMScheduler`` draws its fresh noise as ``sample()`` does. Call
    it with the keywords in :data:`CALL_SETTINGS_NAME`: ``guidance_scale=1`` (the student samples the plain
    conditional teacher), ``use_resolution_binning=False`` (the bin tables refuse a ``sample_size`` other than 16,
    32, 64 or 128), and the teacher's ``complex_human_instruction`` (null: none) and Gemma2 ``max_sequence_length``.
    """
    from diffusers import SanaPipeline

    t = teacher
    parts = float32_parts(t, "vae", "text_encoder")

    def make(net: nn.Module):
        return SanaPipeline(transformer=net, scheduler=scheduler, tokenizer=t.tokenizer, **parts)

    return write_student_pipeline(transformer, make, target, lambda pipe: pipeline_call_settings(pipe, t))


def export_sd_pipeline(unet: nn.Module, scheduler, teacher, target: str | os.PathLike) -> Path:
    """Save an SD1.5-style ``UNet2DConditionModel`` student with the teacher's VAE and text encoder as a
    ``StableDiffusionPipeline`` folder (call it with the keywords in :data:`CALL_SETTINGS_NAME`, ``guidance_scale=1``:
    the student samples the plain conditional teacher's distribution, and its loop is ``sample()``'s)."""
    from diffusers import StableDiffusionPipeline

    t = teacher
    parts = float32_parts(t, "vae", "text_encoder")

    def make(net: nn.Module):
        return StableDiffusionPipeline(
            tokenizer=t.tokenizer, unet=net, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **parts,
        )

    return write_student_pipeline(unet, make, target, lambda pipe: pipeline_call_settings(pipe, t))


#: text-to-image network class -> the export writing its stock pipeline.
TEXT_PIPELINE_EXPORTS = {
    "UNet2DConditionModel": export_sd_pipeline,
    "SD3Transformer2DModel": export_sd3_pipeline,
    "FluxTransformer2DModel": export_flux_pipeline,
    "SanaTransformer2DModel": export_sana_pipeline,
}


def export_text_pipeline(network: nn.Module, scheduler, teacher, target: str | os.PathLike) -> Path:
    """Save a text-to-image student in its family's stock pipeline (:data:`TEXT_PIPELINE_EXPORTS`), with the text
    encoders, tokenizers and VAE of ``teacher`` (a teacher, or :func:`~lightning_distill.text_cache.pipeline_parts`),
    and, beside ``model_index.json``, :data:`CALL_SETTINGS_NAME`: the keywords of the call that samples as
    ``sample()`` (the teacher's text settings, read from ``teacher``: :func:`pipeline_call_settings`)::

        >>> pipe(prompt="a red cat", **json.loads((folder / CALL_SETTINGS_NAME).read_text()))
    """
    kind = type(getattr(network, "_orig_mod", network)).__name__
    if kind not in TEXT_PIPELINE_EXPORTS:
        raise ConfigError(f"no text-to-image pipeline export for {kind}; supported: {', '.join(TEXT_PIPELINE_EXPORTS)}")
    return TEXT_PIPELINE_EXPORTS[kind](network, scheduler, teacher, target)


# --- reading a trained student back ----------------------------------------------------------------


def ema_state_from_checkpoint(ckpt: dict) -> dict | None:
    """The sampling-EMA copy of the student stored by the EMA callback (``{"averaged": ...}``), without
    ``AveragedModel``'s ``module.`` prefix; None when absent or never updated."""
    for state in (ckpt.get("callbacks") or {}).values():
        avg = state.get("averaged") if isinstance(state, dict) else None
        if not avg:
            continue
        n = avg.get("n_averaged")
        if n is not None and int(n) == 0:
            continue
        return {k[len("module.") :]: v for k, v in avg.items() if k.startswith("module.")}
    return None


def load_student_state(path: str | os.PathLike, use_ema: bool = True) -> tuple[dict[str, Tensor], str | None]:
    """UNet weights (and prediction type, when recorded) of a trained student.

    Accepts:
      * a Lightning ``.ckpt`` of any ``DistillationMethod`` (e.g. ``ConsistencyDistillation``):
        the sampling-EMA weights of an ``EMA`` callback when present and ``use_ema``, else ``student.unet``;
        the prediction type from ``hyper_parameters.student_prediction_type`` when set;
      * an exported pipeline folder (``unet/`` or a DiT's ``transformer/``, + ``scheduler/``): the network's
        weights and the scheduler's ``prediction_type``.

    Raises:
        MissingInputError (a FileNotFoundError): the path does not exist. ConfigError (a ValueError): no
            student weights in it.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingInputError(f"student {str(path)!r} does not exist (a .ckpt file or an exported pipeline folder)")
    if path.is_dir():
        sub = next((s for s in ("unet", "transformer") if (path / s / "config.json").is_file()), None)
        if sub is None:
            raise ConfigError(f"student folder {path} has no unet/config.json (expected an exported pipeline)")
        import diffusers

        cls = getattr(diffusers, json.loads((path / sub / "config.json").read_text())["_class_name"])
        unet = cls.from_pretrained(path, subfolder=sub, low_cpu_mem_usage=low_cpu_mem_usage())
        sched_cfg = path / "scheduler" / "scheduler_config.json"
        pred = json.loads(sched_cfg.read_text()).get("prediction_type") if sched_cfg.is_file() else None
        return unet.state_dict(), pred
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    pred = (ckpt.get("hyper_parameters") or {}).get("student_prediction_type")
    ema = ema_state_from_checkpoint(ckpt) if use_ema else None
    if ema is not None:
        sd = {k[len("unet.") :]: v for k, v in ema.items() if k.startswith("unet.")}
        if sd:
            return sd, pred
    sd = {k[len("student.unet.") :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("student.unet.")}
    if not sd:
        raise ConfigError(f"checkpoint {path} holds no student.unet weights")
    return sd, pred
