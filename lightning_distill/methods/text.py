"""Text-to-image students for methods whose maths does not depend on the conditioning (#23 item 2).

A method that conditions every network on the same keywords (consistency distillation, DMD2) needs three
things from a text-conditional (SD3) teacher, gathered here once:

* the keywords of a batch: :meth:`TextToImageMixin.text_cond`, the teacher's ``text_conditioning`` of the
  batch's token ids (SD3: ``encoder_hidden_states`` + ``pooled_projections``), in float32;
* sampling from prompts: :meth:`TextToImageMixin.sample` takes ``prompts`` (default: ``sample_prompt``) or
  ``prompt_embeds`` and runs the text pipelines' loop (:func:`~lightning_distill.sampling.text_to_image_sample`);
* export: an ``SD3Transformer2DModel`` student becomes a ``StableDiffusion3Pipeline`` folder with the
  method's sampler (:func:`~lightning_distill.export.export_sd3_pipeline`), called with ``guidance_scale=1``.

Unconditional and class-conditional students go to the method's base class unchanged. Guidance is not
distilled here (the teacher is the plain conditional model); LCM (:mod:`.lcm`) does that.

Example::

    >>> class DMD2(TextToImageMixin, AdversarialMethod): ...
    >>> dmd2.sample(2, prompts=["a red cat", "a blue dog"])   # latents
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backbones
from ..parametrisation import Denoiser
from ..sampling import text_to_image_sample


class TextToImageMixin:
    """Text conditioning, prompt sampling and SD3 export; put it before the method's base class."""

    @property
    def text_conditional(self) -> bool:
        """A text-to-image student: batches carry token ids, samples take prompts."""
        teacher = getattr(self, "teacher", None)
        return (
            self.student is not None and backbones.is_text_conditional(self.student.unet)
            and teacher is not None and teacher.is_text_conditional
        )

    def text_cond(self, batch: dict) -> dict:
        """The network keywords of a batch's prompts (the teacher's ``text_conditioning``), float32."""
        return {k: v.float() for k, v in self.teacher.text_conditioning(batch).items()}

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
        return text_to_image_sample(self, n, steps, generator, prompt_embeds, denoiser)

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        if not self.text_conditional:
            return super().predict_step(batch, batch_idx)
        gen = torch.Generator(device="cpu").manual_seed(self.hparams.seed + batch_idx)
        return self.sample(batch["x"].shape[0], self.hparams.sample_steps, gen, prompt_embeds=self.text_cond(batch))

    def export(self, target, use_ema: bool = True):
        """The base export; an SD3 student as a ``StableDiffusion3Pipeline`` folder (the sampler of
        ``sample_steps``; load with ``text_encoder_3=None, tokenizer_3=None``, call with ``guidance_scale=1``)."""
        den = self.sampling_denoiser() if use_ema else self.student
        if type(den.unet).__name__ != "SD3Transformer2DModel":
            return super().export(target, use_ema)
        from ..export import export_sd3_pipeline

        return export_sd3_pipeline(den.unet, self.sampling_scheduler(self.hparams.sample_steps), self.teacher, target)


__all__ = ["TextToImageMixin"]
