"""``python -m lightning_distill.evaluate`` on text-to-image models: a tiny SD1.5-style stack (``tests/test_lcm.py``)
and a tiny SD3 stack (``tests/_sd3.py``), built locally.

Evaluation has no prompts, so text-conditional networks are refused (README). The refusal comes as each model
loads, in one line naming it and what evaluate scores: before, an exported ``StableDiffusionPipeline`` folder
(also with ``LCMScheduler``), an SD3 folder or an SD-style teacher failed only at its first cell, after the
reference features (and, for a student, every earlier model's cells), and a text student's checkpoint was
scored silently, every image drawn from its one ``sample_prompt``, while its export was refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_distill import evaluate
from lightning_distill.errors import ConfigError

from test_lcm import write_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
CHOICES = "it scores unconditional or class-conditional denoisers (UNet2DModel, DiTTransformer2DModel)"


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """An SD1.5-style student folder as ``export`` writes it (``StableDiffusionPipeline``, no safety checker),
    the same with ``LCMScheduler`` (an LCM student with ``guidance_embedding: false``), and an SD3 folder."""
    from diffusers import AutoencoderKL, LCMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from _sd3 import write_tiny_sd3

    root = tmp_path_factory.mktemp("text_models")
    sd = write_tiny_sd(root / "tiny-sd")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(sd / "vae"), text_encoder=CLIPTextModel.from_pretrained(sd / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(sd / "tokenizer"), unet=UNet2DConditionModel.from_pretrained(sd / "unet"),
        scheduler=PNDMScheduler.from_pretrained(sd / "scheduler"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd15")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=4)
    pipe.save_pretrained(root / "sd15_lcm")
    return {"tiny_sd": sd, "sd15": root / "sd15", "sd15_lcm": root / "sd15_lcm", "sd3": write_tiny_sd3(root / "sd3")}


def no_reference_features(monkeypatch):
    """Reference features are the slow part of a real run (minutes of Inception): a refusal comes before them."""
    def refuse(*args, **kwargs):
        raise AssertionError("reference features computed before the text-conditional model was refused")

    monkeypatch.setattr(evaluate, "reference_images", refuse)


@pytest.mark.parametrize(
    ("role", "model", "cls"),
    [("student", "sd15", "UNet2DConditionModel"), ("student", "sd15_lcm", "UNet2DConditionModel"),
     ("student", "sd3", "SD3Transformer2DModel"), ("teacher", "sd15", "UNet2DConditionModel")],
)
def test_a_text_to_image_model_is_one_line_error_before_reference_features(text_models, role, model, cls, tmp_path,
                                                                          monkeypatch, capsys):
    no_reference_features(monkeypatch)
    path = text_models[model]
    who = ["--teacher", "none", "--student", f"s={path}"] if role == "student" else ["--teacher", str(path)]
    monkeypatch.delenv("LIGHTNING_DISTILL_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["evaluate", *who, "--steps", "1", "2", "--teacher-steps", "1", "--num-samples", "4",
                                     "--image-size", "8", "--channels", "3", "--device", "cpu", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exc:
        evaluate._entry()
    assert exc.value.code == 2
    # the error is one line; before it stderr holds the pipeline's loading bars (diffusers' tqdm), not a traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    what = f"student 's' ({path})" if role == "student" else f"teacher {str(path)!r}"
    assert line == (f"evaluate: error: ConfigError: {what} is text-conditional ({cls}): evaluate has no prompts to "
                    f"condition it on; {CHOICES}")
    assert not (tmp_path / "out").exists()


def test_a_text_students_checkpoint_is_refused_as_its_export_is(text_models, image_folder, tmp_path, monkeypatch):
    """The LCM debug preset on the tiny SD stack: its checkpoint was scored (each image from the one
    ``sample_prompt``) while its exported folder was refused; both are refused now, the same way."""
    from lightning_distill.cli import cli_main

    rows = [{"file_name": f"{c}/{i}.png", "text": f"a photo of {'cat' if c == 'a' else 'dog'}"} for c in "ab" for i in range(6)]
    (image_folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "run"
    cli_main(["fit", "--config", str(ROOT / "configs/lcm/debug.yaml"), "--data.teacher", str(text_models["tiny_sd"]),
              "--data.data", str(image_folder), "--trainer.default_root_dir", str(run), "--trainer.max_steps", "1",
              "--trainer.logger", "false"])
    no_reference_features(monkeypatch)
    for name, spec in (("ckpt", run / "checkpoints" / "last.ckpt"), ("export", run / "student")):
        with pytest.raises(ConfigError) as err:
            evaluate.evaluate_models(teacher=None, students={name: spec}, steps=[1], image_size=8, num_samples=4,
                                     device="cpu", out_dir=tmp_path / "out")
        assert str(err.value) == (f"student {name!r} ({spec}) is text-conditional (UNet2DConditionModel): evaluate has "
                                  f"no prompts to condition it on; {CHOICES}")
