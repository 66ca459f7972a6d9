"""SD3-style teachers (#23 item 2): the tiny SD3 stack of tests/_sd3.py loads, encodes prompts as
StableDiffusion3Pipeline does with T5 absent, and feeds the SD3 transformer through the backbone adapter."""

from __future__ import annotations

import shutil

import pytest
import torch

from _sd3 import IMAGE_SIZE, JOINT_ATTENTION_DIM, write_tiny_sd3
from lightning_distill.teacher import TeacherError, load_teacher

PROMPTS = ["a red cat", "a photo of a blue dog digit 7", ""]  # the second is truncated at 8 tokens


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory):
    return write_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def sd3_pipe(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)


def test_sd3_teacher_loads(tiny_sd3_dir):
    from transformers import CLIPTextModelWithProjection

    teacher = load_teacher(str(tiny_sd3_dir))
    assert type(teacher.unet).__name__ == "SD3Transformer2DModel" and teacher.schedule.path == "flow"
    assert teacher.prediction_type == "flow_prediction" and teacher.is_latent and teacher.is_text_conditional
    assert isinstance(teacher.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(teacher.text_encoder_2, CLIPTextModelWithProjection)
    assert teacher.tokenizer_2 is not None and teacher.sample_size == IMAGE_SIZE // 2
    assert not any(p.requires_grad for p in teacher.parameters())


def test_sd3_prompt_embeddings_equal_the_pipelines(tiny_sd3_dir, sd3_pipe):
    teacher = load_teacher(str(tiny_sd3_dir))
    inputs = teacher.text_inputs(PROMPTS)
    assert set(inputs) == {"input_ids", "input_ids_2"} and inputs["input_ids"].shape == (3, 8)
    cond = teacher.text_conditioning(inputs)
    with torch.no_grad():
        ref, _, pooled, _ = sd3_pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert cond["encoder_hidden_states"].shape == (3, 8 + 256, JOINT_ATTENTION_DIM)
    assert torch.equal(cond["encoder_hidden_states"], ref) and torch.equal(cond["pooled_projections"], pooled)
    # layout: 16 + 24 CLIP features, zero padding to 48, then 256 zero T5 tokens
    assert cond["encoder_hidden_states"][:, :8, :40].abs().sum() > 0
    assert not cond["encoder_hidden_states"][:, :8, 40:].any() and not cond["encoder_hidden_states"][:, 8:].any()
    # another T5 length (the pipeline's max_sequence_length) follows it
    short = load_teacher(str(tiny_sd3_dir), max_sequence_length=5).encode_prompts(PROMPTS)
    with torch.no_grad():
        ref5 = sd3_pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=5)[0]
    assert torch.equal(short["encoder_hidden_states"], ref5)


def test_sd3_text_conditioning_drives_the_transformer_as_the_pipeline(tiny_sd3_dir, sd3_pipe):
    teacher = load_teacher(str(tiny_sd3_dir))
    cond = teacher.encode_prompts(PROMPTS[:2])
    sched = sd3_pipe.scheduler
    sched.set_timesteps(3)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sched.timesteps:
            ref = sd3_pipe.transformer(hidden_states=x, timestep=t.expand(2), return_dict=False, **{
                "encoder_hidden_states": cond["encoder_hidden_states"], "pooled_projections": cond["pooled_projections"]})[0]
            assert torch.equal(teacher.denoiser.network(x, t, **cond), ref)


def test_sd3_refusals(tiny_sd3_dir, tmp_path):
    t5 = tmp_path / "with-t5"
    shutil.copytree(tiny_sd3_dir, t5)
    (t5 / "text_encoder_3").mkdir()
    with pytest.raises(TeacherError, match="T5 text_encoder_3/ is not supported"):
        load_teacher(str(t5))
    one = tmp_path / "one-clip"
    shutil.copytree(tiny_sd3_dir, one)
    shutil.rmtree(one / "text_encoder_2")
    teacher = load_teacher(str(one))
    with pytest.raises(TeacherError, match="two CLIP encoders"):
        teacher.encode_prompts(["a cat"])
