"""Latent consistency distillation, LCM (Luo et al. 2023, arXiv 2310.04378, Algorithm 1).

Consistency distillation (:mod:`.consistency`) in a VAE latent space with a text-conditional teacher,
with classifier-free guidance distilled into the student:

* w ~ U[w_min, w_max] per sample, embedded sinusoidally (:func:`guidance_scale_embedding`) and fed to the
  student as an extra time condition (diffusers' ``time_cond_proj_dim`` / ``timestep_cond``);
* the teacher's ODE step uses the guided prediction, for x0 and eps alike (LCM, Eq. 9):
  pred = cond + w (cond - uncond), with "" as the unconditional prompt;
* the student (and theta_minus) see (x, t, w, prompt); the target is f_theta_minus(x_hat_n, t_n, w, prompt).

Guidance-scale conventions (off by one, a classic bug):

===========================  ======================================  ======================
convention                   guided prediction                       no guidance at
LCM paper / diffusers script cond + w (cond - uncond)                w = 0
Imagen / diffusers pipelines uncond + g (cond - uncond)              g = 1
===========================  ======================================  ======================

so g = w + 1. ``w_min`` / ``w_max`` here are in the LCM convention (the script's defaults 5 and 15 are
g = 6 .. 16); the student embeds w. diffusers' ``LatentConsistencyModelPipeline`` takes g
(``guidance_scale``) and embeds g - 1 = w, so an exported student is called with guidance_scale = w + 1.

Two teacher families (the student's network is the teacher's class):

==========================  =================================  ==============================================
teacher                     guidance in the student            sampler / export
==========================  =================================  ==============================================
``UNet2DConditionModel``    w ~ U[w_min, w_max], embedded      ``LCMScheduler``; ``LatentConsistencyModel``
(SD1.5-style, VP)           (``time_cond_proj_dim``)           ``Pipeline`` called with guidance_scale = w + 1
``SD3Transformer2DModel``   one fixed w = w_min = w_max folded ``FlowMatchLCMScheduler``;
(flow, T5 absent)           into the weights: MMDiT has no     ``StableDiffusion3Pipeline`` called with
                            guidance input a stock pipeline    guidance_scale = 1 (its CFG off: the student is
                            can feed                           already guided)
==========================  =================================  ==============================================

On the flow path the consistency function is the x0 estimate x_s - s u (:mod:`.consistency`), and the
sampler is ``FlowMatchLCMScheduler`` (x0, then fresh noise to the next level). ``StableDiffusion3Pipeline``
calls ``scheduler.step`` without the generator, so its fresh noise comes from torch's global generator:
one step (where the noise is multiplied by 0) reproduces :meth:`sample` for the same generator; more
steps do when the global generator holds the state the given one has after drawing the initial latents.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..nn_utils import rebuilt_with_weights
from ..parametrisation import Denoiser, Prediction, cfg_prediction  # cfg_prediction lived here first (__all__)
from ..sampling import text_to_image_sample
from ..teacher import DiffusionTeacher
from .consistency import ConsistencyDistillation, LossKind, Predict


# --- pure functions ----------------------------------------------------------------------------------


def guidance_scale_embedding(w: Tensor, embedding_dim: int = 256, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of the guidance scale (VDM's Fourier features; LCM, Sec. 4.2).

    emb = [sin(1000 w f_i), cos(1000 w f_i)], f_i = 10000^(-i / (d/2 - 1)), i = 0 .. d/2 - 1 (zero-padded
    for odd d): the same numbers ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` gives.

    Args:
        w: (B,) guidance scales in the LCM convention (see the module docstring).
        embedding_dim: the student's ``time_cond_proj_dim``.

    Returns:
        (B, embedding_dim) tensor.
    """
    if w.ndim != 1:
        raise ValueError(f"w must be a 1-D tensor of per-sample guidance scales, got shape {tuple(w.shape)}")
    w = w * 1000.0
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(dtype)[:, None] * freqs.to(w.device)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


def takes_guidance_embedding(network: nn.Module) -> bool:
    """Whether a network has an input for the w embedding (``UNet2DConditionModel``'s ``time_cond_proj_dim``)."""
    return "time_cond_proj_dim" in dict(getattr(network, "config", None) or {})


def text_keywords(cond: Tensor | dict) -> dict:
    """Text conditioning as network keywords: a tensor is SD1.5-style ``encoder_hidden_states``."""
    return dict(cond) if isinstance(cond, dict) else {"encoder_hidden_states": cond}


def student_unet_with_guidance_embedding(teacher_unet: nn.Module, time_cond_proj_dim: int, share: bool = False) -> nn.Module:
    """The teacher's UNet architecture plus a w-embedding input, initialised from the teacher.

    Built from the teacher's config with ``time_cond_proj_dim`` set; every weight whose name and shape
    match is the teacher's: a float32 copy, or with ``share`` the teacher's own tensors (a LoRA student on
    the teacher's weights, built without a transient copy: :func:`~lightning_distill.nn_utils.rebuilt_with_weights`).
    The new projection ``time_embedding.cond_proj`` (float32) is zero-initialised, so the student starts as
    exactly the teacher's conditional model and learns the w dependence.
    """
    if "time_cond_proj_dim" not in teacher_unet.config:
        raise ConfigError(
            f"{type(teacher_unet).__name__} has no time_cond_proj_dim input for the guidance embedding; "
            "LCM needs a UNet2DConditionModel teacher (use ConsistencyDistillation for unconditional teachers)"
        )
    student, _ = rebuilt_with_weights(teacher_unet, {"time_cond_proj_dim": time_cond_proj_dim}, share=share)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student


# --- the LightningModule ---------------------------------------------------------------------------------


class LatentConsistencyDistillation(ConsistencyDistillation):
    """LCM: guidance-distilled consistency distillation of a latent text-to-image teacher.

    Args:
        teacher: a latent, text-conditional teacher (``vae/``, ``unet/`` UNet2DConditionModel,
            ``scheduler/``, ``text_encoder/``, ``tokenizer/``; or an SD3 folder: ``transformer/``
            SD3Transformer2DModel, two CLIP encoders, T5 absent), linked from ``data.teacher``.
        student: student UNet with ``time_cond_proj_dim`` set; None: built from the teacher
            (:func:`student_unet_with_guidance_embedding`; SD3: a copy of the teacher's transformer).
        w_min, w_max: range of the distilled guidance scale w, LCM convention (g = w + 1). A student
            without a guidance-embedding input (SD3) distils one scale: w_min = w_max.
        time_cond_proj_dim: size of the w embedding (256 in the diffusers LCM script).
        guidance_embedding: UNet teachers: give the student the w input (True, LCM). False: the student keeps
            the teacher's architecture and w ~ U[w_min, w_max] is folded in without an input (the diffusers
            LCM-LoRA script's recipe), so a LoRA student's adapter file alone runs on the teacher's pipeline
            (``load_lora_weights``; ``full_layers.safetensors`` is not needed).
        uncond_prompt: the unconditional prompt of the teacher's CFG ("" as in LCM).
        sample_prompt, sample_guidance_scale: prompt and pipeline-convention g for logged samples
            (a fixed-guidance student samples at its own w_min + 1 whatever this says).
        loss, sample_steps, num_log_samples: as in :class:`ConsistencyDistillation`, with LCM's defaults.
        **kwargs: :class:`ConsistencyDistillation`'s arguments (defaults follow the diffusers LCM script:
            N = 50 grid, DDIM solver, c = 0.001, mu = 0.95) and :class:`DistillationMethod`'s.

    Example::

        >>> dm = TeacherDataModule(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", data="captioned/",
        ...                        image_size=512)
        >>> lcm = LatentConsistencyDistillation(dm.teacher, w_min=3.0, w_max=15.0)
        >>> lcm.sample(4, steps=4, prompts=["a red bicycle"] * 4, guidance_scale=8.0)  # latents
    """

    #: the teacher networks LCM distils (see the module table).
    TEACHERS = ("UNet2DConditionModel", "SD3Transformer2DModel")

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        *,
        student: nn.Module | None = None,
        w_min: float = 5.0,
        w_max: float = 15.0,
        time_cond_proj_dim: int = 256,
        guidance_embedding: bool = True,
        uncond_prompt: str = "",
        sample_prompt: str = "",
        sample_guidance_scale: float = 8.0,
        loss: LossKind = "pseudo_huber_elementwise",
        sample_steps: int = 4,
        num_log_samples: int = 16,
        **kwargs,
    ) -> None:
        if teacher is None:
            raise ConfigError("LatentConsistencyDistillation needs a teacher (set data.teacher)")
        if not teacher.is_text_conditional:
            raise ConfigError(
                "LatentConsistencyDistillation needs a text-conditional teacher (text_encoder/ and tokenizer/); "
                "use ConsistencyDistillation for unconditional or class-conditional teachers"
            )
        if not 0.0 <= w_min <= w_max:
            raise ConfigError(f"need 0 <= w_min <= w_max, got w_min={w_min}, w_max={w_max}")
        kind = type(teacher.unet).__name__
        if kind not in self.TEACHERS:
            raise ConfigError(f"LatentConsistencyDistillation distils {' and '.join(self.TEACHERS)} teachers, not {kind}")
        if not takes_guidance_embedding(student if student is not None else teacher.unet):
            # SD3: no w input that StableDiffusion3Pipeline could feed, so one guidance scale is distilled in
            if w_min != w_max:
                raise ConfigError(
                    f"a {kind} student has no guidance-embedding input: LCM distils one fixed guidance scale into "
                    f"it; set w_min = w_max (got w_min={w_min}, w_max={w_max})"
                )
        elif not guidance_embedding:
            if student is not None:
                raise ConfigError("guidance_embedding=False builds the student from the teacher's UNet: give no student")
        elif student is not None and getattr(student.config, "time_cond_proj_dim", None) != time_cond_proj_dim:
            raise ConfigError(f"the student UNet's time_cond_proj_dim must equal time_cond_proj_dim={time_cond_proj_dim}")
        super().__init__(
            teacher=teacher, student=student, loss=loss, sample_steps=sample_steps, num_log_samples=num_log_samples,
            sample_prompt=sample_prompt, **kwargs,
        )

    def build_student(self, student: nn.Module | None, prediction_type) -> None:
        """None: the teacher's network, a UNet with the w input added (:func:`student_unet_with_guidance_embedding`).

        Built here rather than passed in as a given student, so that it counts as derived from the teacher
        (base.py): a LoRA student (LCM-LoRA) then trains the new ``time_embedding.cond_proj`` in full beside the
        adapters (frozen, it would stay zero and the student would ignore w), and its checkpoint leaves out
        the frozen base re-read from the teacher."""
        if student is None and takes_guidance_embedding(self.teacher.unet) and self.hparams.guidance_embedding:
            student = student_unet_with_guidance_embedding(
                self.teacher.unet, self.hparams.time_cond_proj_dim, share=self.shares_teacher_base
            )
        super().build_student(student, prediction_type)

    # --- conditioning ---------------------------------------------------------------------------

    @property
    def guidance_embedding(self) -> bool:
        """Whether the student embeds w (a UNet with ``time_cond_proj_dim``); False: the guidance is folded in
        (SD3: one w; a UNet with ``guidance_embedding=False``: w ~ U[w_min, w_max] without an input)."""
        return dict(getattr(self.student.unet, "config", None) or {}).get("time_cond_proj_dim") is not None

    def prompt_conditioning(self, batch: dict) -> dict:
        """The text keywords of a batch's prompts: precomputed (``text_cond``) or the teacher's ``text_conditioning``."""
        return batch["text_cond"] if "text_cond" in batch else self.teacher.text_conditioning(batch)

    def uncond_conditioning(self, n: int, device) -> dict:
        cond = self.teacher.encode_prompts([self.hparams.uncond_prompt])  # cached when the encoders are released
        return {k: v.to(device).expand(n, *v.shape[1:]) for k, v in cond.items()}

    def prompt_embeds(self, batch: dict) -> Tensor:
        return self.prompt_conditioning(batch)["encoder_hidden_states"]

    def uncond_embeds(self, n: int, device) -> Tensor:
        return self.uncond_conditioning(n, device)["encoder_hidden_states"]

    def conditioning(self, batch: dict, n: int) -> tuple[dict, Predict]:
        hp = self.hparams
        device = batch["x"].device
        w = hp.w_min + (hp.w_max - hp.w_min) * torch.rand(n, device=device)  # LCM convention
        cond_c = self.prompt_conditioning(batch)
        cond_u = self.uncond_conditioning(n, device)
        cond = {k: v.float() for k, v in cond_c.items()}
        if self.guidance_embedding:
            cond["timestep_cond"] = guidance_scale_embedding(w, hp.time_cond_proj_dim).to(device)
        return cond, self.guided_teacher(cond_c, cond_u, w)

    def guided_teacher(self, cond_c: Tensor | dict, cond_u: Tensor | dict, w: Tensor) -> Predict:
        """The teacher's CFG prediction cond + w (cond - uncond), one batched call of 2B.

        ``cond_c`` / ``cond_u``: the text keywords of the prompts and of the unconditional prompt (a tensor:
        ``encoder_hidden_states``)."""
        cond_c, cond_u = text_keywords(cond_c), text_keywords(cond_u)
        call = self._teacher_call({k: torch.cat([cond_c[k], cond_u[k]]) for k in cond_c})

        def predict(x: Tensor, t: Tensor) -> Prediction:
            both = call(torch.cat([x, x]), torch.cat([t, t]))
            n = x.shape[0]
            split = lambda v: (v[:n], v[n:])  # noqa: E731
            (c0, u0), (ce, ue), (cv, uv) = split(both.x0), split(both.eps), split(both.v)
            return cfg_prediction(Prediction(c0, ce, cv), Prediction(u0, ue, uv), w)

        return predict

    # --- sampling / export ------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self, n: int, steps: int | None = None, generator: torch.Generator | None = None, labels: Tensor | None = None,
        denoiser: Denoiser | None = None, prompts: list[str] | None = None, guidance_scale: float | None = None,
        prompt_embeds: Tensor | dict | None = None,
    ) -> Tensor:
        """``n`` latents in ``steps`` steps; the loop is ``LatentConsistencyModelPipeline``'s (UNet) or
        ``StableDiffusion3Pipeline``'s (SD3; the generator also draws the sampler's fresh noise).

        Args:
            prompts: one per sample (default: ``sample_prompt``); or give ``prompt_embeds``, the text
                keywords (a tensor: ``encoder_hidden_states``).
            guidance_scale: g in the pipelines' (Imagen) convention; the student embeds w = g - 1. A
                fixed-guidance (SD3) student takes only its own g = w_min + 1 (or None).
        """
        hp = self.hparams
        if prompt_embeds is None:
            prompts = prompts if prompts is not None else [hp.sample_prompt] * n
            prompt_embeds = self.teacher.encode_prompts(prompts)
        extra = {}
        if self.guidance_embedding:
            g = hp.sample_guidance_scale if guidance_scale is None else guidance_scale
            if not hp.w_min <= g - 1 <= hp.w_max:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"guidance_scale {g} embeds w = {g - 1}, outside the trained range [w_min, w_max] = "
                    f"[{hp.w_min}, {hp.w_max}] (g in [{hp.w_min + 1}, {hp.w_max + 1}]): the w-embedding extrapolates"
                )
            den = denoiser or self.sampling_denoiser()
            extra["timestep_cond"] = guidance_scale_embedding(torch.tensor(g - 1).repeat(n), den.unet.config.time_cond_proj_dim)
        elif guidance_scale is not None and not hp.w_min + 1 <= guidance_scale <= hp.w_max + 1:
            folded = f"g = w_min + 1 = {hp.w_min + 1}" if hp.w_min == hp.w_max else f"g in [{hp.w_min + 1}, {hp.w_max + 1}]"
            raise ConfigError(
                f"this student has no guidance input: the guidance it was distilled with ({folded}) is folded in; "
                f"got guidance_scale={guidance_scale}"
            )
        return text_to_image_sample(self, n, steps, generator, text_keywords(prompt_embeds), denoiser, **extra)

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        gen = self.predict_generator(batch_idx)
        emb = self.prompt_conditioning(batch) if "input_ids" in batch or "text_cond" in batch else None
        return self.sample(batch["x"].shape[0], self.hparams.sample_steps, gen, prompt_embeds=emb)

    def log_sample_grid(self, tag: str = "samples") -> None:
        """Decoded samples (VAE) from fixed noise to TensorBoard."""
        if self.trainer.is_global_zero and self.logger is not None and hasattr(self.logger.experiment, "add_image"):
            from torchvision.utils import make_grid

            n = self.hparams.num_log_samples
            z = self.sample(n, self.hparams.sample_steps, torch.Generator().manual_seed(self.hparams.seed))
            x = self.teacher.decode_latents(z)
            grid = make_grid((x.clamp(-1, 1) + 1) / 2, nrow=int(n**0.5))
            self.logger.experiment.add_image(f"{tag}/{self.hparams.sample_steps}step", grid, self.global_step)

    def export(self, target, use_ema: bool = True):
        """Write a ``LatentConsistencyModelPipeline`` folder (teacher's VAE and text encoder, student UNet,
        ``LCMScheduler``); call it with ``guidance_scale = w + 1``.

        SD3: a ``StableDiffusion3Pipeline`` folder (student transformer, the teacher's VAE, CLIP encoders and
        tokenizers, T5 absent, ``FlowMatchLCMScheduler`` set up for ``sample_steps``); load it with
        ``text_encoder_3=None, tokenizer_3=None`` and call it with ``guidance_scale=1`` (no CFG: the
        student is guided already) and ``num_inference_steps=sample_steps``.

        A LoRA student (``student_lora``: LCM-LoRA) is written fused, with its adapters beside it as
        ``pytorch_lora_weights.safetensors``, which the teacher's pipeline loads with ``load_lora_weights``
        (:func:`~lightning_distill.export.write_student_pipeline`). A UNet student's guidance input
        ``time_embedding.cond_proj`` (trained in full) is not in that file: diffusers' loader refuses non-LoRA
        keys and the teacher's UNet has no such layer (``LatentConsistencyModelPipeline`` cannot run it: no
        ``time_cond_proj_dim``). It is written to ``full_layers.safetensors`` (``lora.FULL_LAYERS_NAME``),
        whose header holds the student UNet's config::

            >>> header = safe_open(f"{folder}/full_layers.safetensors", "pt").metadata()
            >>> unet = UNet2DConditionModel.from_config(json.loads(header["network_config"]))
            >>> layers = {k.removeprefix("unet."): v for k, v in load_file(f"{folder}/full_layers.safetensors").items()}
            >>> unet.load_state_dict({**teacher_pipe.unet.state_dict(), **layers})
            >>> pipe = LatentConsistencyModelPipeline(**{**teacher_pipe.components, "unet": unet,
            ...                                          "scheduler": LCMScheduler.from_pretrained(folder, subfolder="scheduler")})
            >>> pipe.load_lora_weights(folder)  # the adapters; sample with guidance_scale = w + 1
        """
        from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

        from ..export import export_sd3_pipeline, write_student_pipeline
        from ..text_cache import pipeline_parts

        den = self.sampling_denoiser() if use_ema else self.student
        parts = pipeline_parts(self.teacher)  # encoders read back from the source when released
        if type(den.unet).__name__ == "SD3Transformer2DModel":
            return export_sd3_pipeline(den.unet, self.sampling_scheduler(self.hparams.sample_steps), parts, target)
        # no w input (guidance_embedding=False): LatentConsistencyModelPipeline embeds w unconditionally and
        # cannot run it; the teacher's StableDiffusionPipeline with LCMScheduler and guidance_scale=1 does
        cls = LatentConsistencyModelPipeline if self.guidance_embedding else StableDiffusionPipeline
        return write_student_pipeline(den.unet, lambda unet: cls(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
            unet=unet, scheduler=self.make_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        ), target)


__all__ = [
    "LatentConsistencyDistillation",
    "guidance_scale_embedding",
    "cfg_prediction",
    "student_unet_with_guidance_embedding",
    "takes_guidance_embedding",
    "text_keywords",
]
