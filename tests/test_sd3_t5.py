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


def test_sd3_t5_progressive_debug_preset_runs_two_rounds_with_t5_and_exports(tiny_sd3_t5_dir, sd3_captioned, tmp_path):  # noqa: F811
    """Progressive distillation 4 -> 2 -> 1 steps on the SD3-with-T5 stack: each promoted teacher carries T5 (the
    batches' T5 ids, input_ids_3, are encoded as round 0 encoded them; a teacher without it refused them at round
    1), and the final 1-step StableDiffusion3Pipeline export, T5 kept, reproduces sample()."""
    from diffusers import StableDiffusion3Pipeline

    from lightning_distill.cli import cli_main

    root = tmp_path / "pd_sd3_t5"
    cli = cli_main(["fit", "--config", str(ROOT / "configs/progressive/debug_sd3.yaml"), "--data.teacher",
                    str(tiny_sd3_t5_dir), "--data.data", str(sd3_captioned), "--trainer.default_root_dir", str(root),
                    "--model.init_args.num_student_steps", "4", "--data.teacher_max_sequence_length", "12"])
    method, configured = cli.model, cli.datamodule.teacher
    assert method.round_index == 2 and method.num_student_steps == 1  # rounds 0 (4 -> 2) and 1 (2 -> 1) done
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    promoted = method.teacher
    assert promoted is not configured and not promoted.reloadable
    assert promoted.text_encoder_3 is configured.text_encoder_3 and promoted.tokenizer_3 is configured.tokenizer_3
    assert promoted.max_sequence_length == 12 and promoted.embedded_guidance == configured.embedded_guidance
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["input_ids_3"].shape == (4, 12)
    ref = configured.text_conditioning(batch)
    cond = promoted.text_conditioning(batch)
    assert cond.keys() == ref.keys() and all(torch.equal(cond[k], ref[k]) for k in ref)
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "student")
    assert pipe.text_encoder_3 is not None
    prompts = ["a red cat", "a blue dog"]
    ours = method.sample(2, 1, torch.Generator().manual_seed(7), prompts=prompts)
    theirs = pipe(prompts, height=16, width=16, num_inference_steps=1, guidance_scale=1.0, max_sequence_length=12,
                  generator=torch.Generator().manual_seed(7), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
