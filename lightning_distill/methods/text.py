"""Text-to-image students for methods whose maths does not depend on the conditioning (#23 item 2).

A method that conditions every network on the same keywords (consistency distillation, DMD2) needs three
things from a text-conditional (SD3, Flux, SANA) teacher, gathered here once:

* the keywords of a batch: :meth:`TextToImageMixin.text_cond`, the teacher's ``text_conditioning`` of the
  batch's token ids (SD3, Flux: ``encoder_hidden_states`` + ``pooled_projections``; guidance-distilled Flux also
  ``guidance``; SANA: ``encoder_hidden_states`` + ``encoder_attention_mask``), in float32, or the batch's
  precomputed ``text_cond`` (``data.text_cache`` /
  ``data.release_encoders``, :mod:`lightning_distill.text_cache`);
* sampling from prompts: :meth:`TextToImageMixin.sample` takes ``prompts`` (default: ``sample_prompt``) or
  ``prompt_embeds`` and runs the text pipelines' loop (:func:`~lightning_distill.sampling.text_to_image_sample`);
* export: the student goes into its family's stock pipeline with the method's sampler
  (:func:`~lightning_distill.export.export_text_pipeline`): ``StableDiffusion3Pipeline`` (SD3),
  ``FluxPipeline`` (Flux), ``SanaPipeline`` (SANA), ``StableDiffusionPipeline`` (SD1.5-style UNets).

The teacher layer owns every family's conversions (token ids -> keywords, ``teacher.text_conditioning``; Flux's
packing, ids and guidance input, SANA's timestep scale, :mod:`~lightning_distill.backbones`), so nothing here
branches on the family. The unconditional prompt ``""`` is encoded as each family's pipeline encodes its negative
prompt for classifier-free guidance (SANA: without the instruction its prompts get).

Unconditional and class-conditional students go to the method's base class unchanged. Guidance: a
method may guide its teacher with :class:`GuidedScore` (DMD2's ``real_guidance_scale``: the real score is
uncond + g (cond - uncond), the unconditional prompt ""), so the student learns the guided distribution;
consistency distillation uses the plain conditional teacher, and LCM (:mod:`.lcm`) distils guidance its own way.

Example::

    >>> class DMD2(TextToImageMixin, AdversarialMethod): ...
    >>> dmd2.sample(2, prompts=["a red cat", "a blue dog"])   # latents
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backbones
from ..errors import ConfigError
from ..parametrisation import Denoiser, NoiseSchedule, Prediction, cfg_prediction
from ..sampling import text_to_image_sample


class GuidedScore:
    """A frozen denoiser under classifier-free guidance, called like it: uncond + g (cond - uncond).

    ``g`` is the pipelines' guidance scale (g = 1: the conditional model); the prediction is guided in x0,
    eps and v alike (:func:`~lightning_distill.parametrisation.cfg_prediction`, w = g - 1), from one
    batched call of 2B (conditional keywords, then ``uncond``'s, broadcast to the batch).

    Args:
        denoiser: the frozen teacher's denoiser.
        uncond: the text keywords of the unconditional prompt (batch 1 or B).
        guidance_scale: g.
    """

    def __init__(self, denoiser: Denoiser, uncond: dict, guidance_scale: float) -> None:
        self.denoiser, self.uncond, self.guidance_scale = denoiser, uncond, float(guidance_scale)

    @staticmethod
    def check(guidance_scale: float, teacher, text_conditional: bool, option: str) -> None:
        """Refuse, in one line, a scale g != 1 that cannot guide ``teacher``: one without text input (no prompt ""
        to guide against), or a guidance-distilled one (Flux-dev: already guided by its embedded guidance, so
        classifier-free guidance on top would guide it twice)."""
        if guidance_scale == 1.0:
            return
        if not text_conditional:
            raise ConfigError(f"{option}={guidance_scale} guides the real score against the prompt \"\": it needs a "
                              "text-conditional teacher (1.0 otherwise)")
        if teacher.is_guidance_distilled:
            raise ConfigError(
                f"{option}={guidance_scale}: the teacher is guidance-distilled (a guidance input, e.g. Flux-dev), already "
                f"guided by its embedded guidance {teacher.embedded_guidance} (data.teacher_embedded_guidance); "
                f"classifier-free guidance against \"\" would guide it twice: set {option} to 1.0 and change the "
                "embedded guidance instead"
            )

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    def __call__(self, x_t: Tensor, t: Tensor, clip: bool = True, **cond) -> Prediction:
        n = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(n) if t.ndim == 0 else t
        both = {k: torch.cat([v, self.uncond[k].to(v).expand(n, *v.shape[1:])]) for k, v in cond.items()}
        p = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), clip=clip, **both)
        c, u = (Prediction(p.x0[s], p.eps[s], p.v[s]) for s in (slice(0, n), slice(n, None)))
        return cfg_prediction(c, u, torch.full((n,), self.guidance_scale - 1.0, device=x_t.device))


class TextToImageMixin:
    """Text conditioning, prompt sampling and text-to-image pipeline export; put it before the method's base class."""

    @property
    def text_conditional(self) -> bool:
        """A text-to-image student: batches carry token ids, samples take prompts."""
        teacher = getattr(self, "teacher", None)
        return (
            self.student is not None and backbones.is_text_conditional(self.student.unet)
            and teacher is not None and teacher.is_text_conditional
        )

    def text_cond(self, batch: dict) -> dict:
        """The network keywords of a batch's prompts (precomputed ``text_cond``, else the teacher's
        ``text_conditioning`` of its token ids), float32."""
        cond = batch["text_cond"] if "text_cond" in batch else self.teacher.text_conditioning(batch)
        return {k: v.float() for k, v in cond.items()}

    def prompts_to_cache(self) -> list[str]:
        """The prompts this method encodes outside batches (sample grids, guidance), encoded once before
        ``data.release_encoders`` drops the text encoders."""
        return [self.hparams.get("sample_prompt") or "", self.hparams.get("uncond_prompt", "")]

    def uncond_text_cond(self, prompt: str = "") -> dict:
        """The keywords of the unconditional prompt (batch 1, float32), on the method's device."""
        return {k: v.float().to(self.device) for k, v in self.teacher.encode_prompts([prompt]).items()}

    @torch.no_grad()
    def sample(
        self, n: int, steps: int | None = None, generator: torch.Generator | None = None, labels: Tensor | None = None,
        denoiser: Denoiser | None = None, prompts: list[str] | None = None, prompt_embeds: dict | None = None,
    ) -> Tensor:
        """The base sampler; a text-conditional student samples ``prompts`` (default: ``sample_prompt``) or
        ``prompt_embeds`` (text keywords) in the text pipelines' loop."""
        if not self.text_conditional:
            return super().sample(n, steps, generator, labels, denoiser)
        if prompt_embeds is None:
            prompt = self.hparams.get("sample_prompt") or ""
            prompt_embeds = self.teacher.encode_prompts(prompts if prompts is not None else [prompt] * n)
        # float32, as text_cond gives batches and the exported float32 pipeline draws: the latents are drawn in the
        # embeddings' dtype, and a bf16 teacher's would round the starting noise (7.8e-3)
        prompt_embeds = {k: v.float() if v.is_floating_point() else v for k, v in prompt_embeds.items()}
        return text_to_image_sample(self, n, steps, generator, prompt_embeds, denoiser)

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        if not self.text_conditional:
            return super().predict_step(batch, batch_idx)
        gen = self.predict_generator(batch_idx)
        return self.sample(batch["x"].shape[0], self.hparams.sample_steps, gen, prompt_embeds=self.text_cond(batch))

    def export(self, target, use_ema: bool = True):
        """The base export; a text-to-image student as its family's stock pipeline folder with the sampler of
        ``sample_steps`` and the teacher's VAE, text encoders and tokenizers
        (:func:`~lightning_distill.export.export_text_pipeline`): an SD3 student as ``StableDiffusion3Pipeline``
        (T5-less folders load with ``text_encoder_3=None, tokenizer_3=None``), a Flux student as ``FluxPipeline``
        (call it with ``guidance_scale`` = the teacher's ``embedded_guidance``, which a guidance-distilled network
        was trained at), a SANA student as ``SanaPipeline``, an SD1.5-style ``UNet2DConditionModel`` as
        ``StableDiffusionPipeline``; call SD, SD3 and SANA with ``guidance_scale=1`` (the student samples the plain
        conditional teacher's distribution; SANA below its resolution bins also with ``use_resolution_binning=False``,
        :func:`~lightning_distill.export.export_sana_pipeline`). A LoRA student
        (``student_lora``) is written fused, with its adapters beside it in the file the teacher's pipeline reads
        with ``load_lora_weights`` (:func:`~lightning_distill.export.write_student_pipeline`)."""
        from ..export import TEXT_PIPELINE_EXPORTS, export_text_pipeline

        den = self.sampling_denoiser() if use_ema else self.student
        if not self.text_conditional or type(den.unet).__name__ not in TEXT_PIPELINE_EXPORTS:
            return super().export(target, use_ema)
        from ..text_cache import pipeline_parts

        parts = pipeline_parts(self.teacher)  # encoders read back from the source when released
        return export_text_pipeline(den.unet, self.sampling_scheduler(self.hparams.sample_steps), parts, target)


__all__ = ["GuidedScore", "TextToImageMixin"]
