"""SD3 teachers with T5 (SD3.5's ``text_encoder_3``): the tiny SD3 stack of tests/_sd3.py with a tiny T5 loads,
encodes prompts as StableDiffusion3Pipeline.encode_prompt does with T5 present, and the consistency debug preset
(encoders released, embeddings cached) exports a StableDiffusion3Pipeline folder that keeps T5 and samples as
sample()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _sd3 import JOINT_ATTENTION_DIM, write_tiny_sd3
from test_sd3 import assert_export_reproduces, sd3_captioned  # noqa: F401 - fixture
from lightning_distill.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a photo of a blue dog digit 7", ""]


@pytest.fixture(scope="module")
def tiny_sd3_t5_dir(tmp_path_factory):
    return write_tiny_sd3(tmp_path_factory.mktemp("sd3t5") / "tiny-sd3-t5", t5=True)


def test_sd3_t5_prompt_embeddings_equal_the_pipelines(tiny_sd3_t5_dir):
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5EncoderModel

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_t5_dir)
    teacher = load_teacher(str(tiny_sd3_t5_dir))
    assert isinstance(teacher.text_encoder_3, T5EncoderModel) and teacher.max_sequence_length == 256
    inputs = teacher.text_inputs(PROMPTS)
    assert set(inputs) == {"input_ids", "input_ids_2", "input_ids_3"} and inputs["input_ids_3"].shape == (3, 256)
    cond = teacher.text_conditioning(inputs)
    with torch.no_grad():
        ref, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    assert cond["encoder_hidden_states"].shape == (3, 8 + 256, JOINT_ATTENTION_DIM)
    assert torch.equal(cond["encoder_hidden_states"], ref) and torch.equal(cond["pooled_projections"], pooled)
    assert cond["encoder_hidden_states"][:, 8:].abs().sum() > 0  # the T5 tokens are T5's, not zeros
    short = load_teacher(str(tiny_sd3_t5_dir), max_sequence_length=5).encode_prompts(PROMPTS)
    with torch.no_grad():
        ref5 = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=5)[0]
    assert torch.equal(short["encoder_hidden_states"], ref5)


def test_sd3_t5_consistency_preset_with_released_encoders_exports_with_t5(tiny_sd3_t5_dir, sd3_captioned, tmp_path):  # noqa: F811
    from diffusers import StableDiffusion3Pipeline

    from lightning_distill.cli import cli_main

    root = tmp_path / "cd_sd3_t5"
    cli = cli_main(["fit", "--config", str(ROOT / "configs/consistency/debug_sd3.yaml"), "--data.teacher",
                    str(tiny_sd3_t5_dir), "--data.data", str(sd3_captioned), "--trainer.default_root_dir", str(root),
                    "--data.text_cache", str(tmp_path / "text.pt"), "--data.release_encoders", "true"])
    method = cli.model
    assert method.text_conditional and cli.trainer.global_step == 3
    assert set(method.teacher.released.modules) == {"text_encoder", "text_encoder_2", "text_encoder_3", "vae.encoder"}
    # the export reads T5 back from the source and keeps it: a plain from_pretrained loads it with T5
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "student")
    ref = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_t5_dir).text_encoder_3.state_dict()
    assert pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None
    assert all(torch.equal(v, ref[k]) for k, v in pipe.text_encoder_3.state_dict().items())
    assert_export_reproduces(method, root / "student", steps=2, seed=5, prompts=(method.hparams.sample_prompt, ""),
                             load_kwargs={})
