"""Text-to-image teachers in reduced precision: an export from a bf16 teacher is float32 throughout, as the student, so a
plain ``from_pretrained`` runs it; prompts encode outside the training precision's autocast, as the pipelines do (the tiny
Flux stack of tests/_flux.py)."""

from __future__ import annotations

import pytest
import torch

from _flux import IMAGE_SIZE, write_tiny_flux
from lightning_distill.teacher import load_teacher


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux")


def test_export_from_a_bf16_teacher_is_float32_throughout_and_runs_with_a_plain_from_pretrained(tiny_flux_dir, tmp_path):
    """The student is written in float32; the bf16 teacher's text encoders and VAE went in as they were, so the
    folder loaded with mixed dtypes and its pipeline failed (bf16 latents into the float32 transformer)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from lightning_distill.export import cpu_float_copy, export_flux_pipeline

    teacher = load_teacher(str(tiny_flux_dir), dtype="bfloat16")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux_dir / "scheduler")
    export_flux_pipeline(cpu_float_copy(teacher.unet), scheduler, teacher, tmp_path / "student")
    assert {p.dtype for p in teacher.text_encoder_2.parameters()} == {torch.bfloat16}  # the teacher is untouched
    pipe = FluxPipeline.from_pretrained(tmp_path / "student")
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.float32}, name
    image = pipe("a red cat", num_inference_steps=1, height=IMAGE_SIZE, width=IMAGE_SIZE, guidance_scale=3.5,
                 max_sequence_length=16, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(image).all()


def test_prompts_encode_as_the_pipeline_under_a_training_precisions_autocast(tiny_flux_dir):
    """text_conditioning runs inside training_step, under Lightning's autocast: it encodes as the pipeline does,
    outside it (bf16 autocast moved the T5 states by 1e-2 and the pooled CLIP output by 1.3e-2)."""
    teacher = load_teacher(str(tiny_flux_dir))
    inputs = teacher.text_inputs(["a red cat", "a photo of a blue dog"])
    plain = teacher.text_conditioning(inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = teacher.text_conditioning(inputs)
    assert plain.keys() == mixed.keys()
    for key, value in plain.items():
        assert mixed[key].dtype == value.dtype and torch.equal(mixed[key], value), key


def test_a_students_samples_from_a_bf16_teachers_prompts_start_from_float32_noise(tiny_flux_dir):
    """sample(prompts=...) encodes with the teacher; a bf16 teacher's embeddings made the starting latents bf16
    (rounded noise, 7.8e-3), while its export draws float32 and batches (text_cond) are float32: the student now
    samples the same from prompts as from the float32 embeddings."""
    from lightning_distill.methods.consistency import ConsistencyDistillation

    teacher = load_teacher(str(tiny_flux_dir), dtype="bfloat16")
    method = ConsistencyDistillation(teacher, original_inference_steps=4, sample_steps=1)
    prompts = ["a red cat", "a blue dog"]
    embeds = {k: v.float() for k, v in teacher.encode_prompts(prompts).items()}
    ours = method.sample(2, 1, torch.Generator().manual_seed(0), prompts=prompts)
    ref = method.sample(2, 1, torch.Generator().manual_seed(0), prompt_embeds=embeds)
    assert ours.dtype == torch.float32 and torch.equal(ours, ref)
