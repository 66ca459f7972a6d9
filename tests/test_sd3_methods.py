"""Data distillation, sCD and MeanFlow on the tiny SD3 stack (#23 item 2; tests/test_sd3.py has the others).

Each supported method runs its configs/<method>/debug_sd3.yaml on the tiny SD3 teacher of tests/_sd3.py, and its
StableDiffusion3Pipeline export (T5 absent, guidance_scale=1) reproduces the method's ``sample()`` for the same
prompts and generator. MeanFlow is refused on an SD3 transformer (no second time input a stock pipeline feeds).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from _sd3 import IMAGE_SIZE
from lightning_distill.teacher import load_teacher
from test_sd3 import assert_export_reproduces, tiny_sd3_dir  # noqa: F401  (a module-scoped fixture)

ROOT = Path(__file__).resolve().parents[1]
# Short captions: the tiny tokenizer keeps 6 tokens, so test_sd3's "a photo of cat i" would all read "a photo".
CAPTIONS = {f"{c}/{i}.png": f"{'cat' if c == 'a' else 'dog'} {i}" for c in ("a", "b") for i in range(6)}


@pytest.fixture
def captioned(image_folder):
    rows = [{"file_name": f, "text": text} for f, text in CAPTIONS.items()]
    (image_folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return image_folder


def fit(preset: str, teacher, data, root: Path):
    from lightning_distill.cli import cli_main

    return cli_main(["fit", "--config", str(ROOT / "configs" / preset / "debug_sd3.yaml"), "--data.teacher",
                     str(teacher), "--data.data", str(data), "--trainer.default_root_dir", str(root)])


def test_sd3_data_distillation_pairs_carry_prompts_and_export_reproduces(tiny_sd3_dir, captioned, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from lightning_distill.teacher_pairs import load_pairs

    root = tmp_path / "dd_sd3"
    cli = fit("data_distillation", tiny_sd3_dir, captioned, root)
    method, dm = cli.model, cli.datamodule
    assert method.text_conditional and cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    # every pair stores the token ids of one training caption; several captions are drawn
    pairs = load_pairs(root / "pairs")
    assert set(pairs) == {"noise", "sample", "input_ids", "input_ids_2"}
    train = [CAPTIONS[f] for f in sorted(CAPTIONS)]
    train = [train[i] for i in dm.image_train_set.indices]
    ids = dm.teacher.text_inputs(train)["input_ids"]
    which = [next(j for j in range(len(train)) if torch.equal(ids[j], row)) for row in pairs["input_ids"]]
    assert len({train[j] for j in which}) > 3
    # the text encoders are in the pairs' key: the same transformer with other encoder weights, other pairs
    from lightning_distill.pairs_store import read_manifest
    from lightning_distill.text_cache import encoder_key

    teacher = load_teacher(str(tiny_sd3_dir))
    key = encoder_key(teacher)
    assert read_manifest(root / "pairs")["settings"]["prompts"]["encoders"] == key
    with torch.no_grad():
        next(teacher.text_encoder.parameters()).add_(1e-3)
    assert encoder_key(teacher)["weights"] != key["weights"]
    # the pairs are the stock pipeline's samples: the teacher's 4-step Euler sampler (trailing levels 1, .75, .5,
    # .25 before SD3's shift) from the stored noise, on the stored prompt, no guidance
    teacher_pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    k = [0, 5, 11]
    ref = teacher_pipe([train[which[i]] for i in k], height=IMAGE_SIZE, width=IMAGE_SIZE, guidance_scale=1.0,
                       sigmas=[1.0, 0.75, 0.5, 0.25], latents=pairs["noise"][k], output_type="latent").images
    torch.testing.assert_close(pairs["sample"][k], ref, rtol=0, atol=1e-4)
    # the export: the 1-step flow Euler sampler, deterministic, so the same generator gives the same latents
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "student", text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    prompts = ["cat 1", "dog 4"]
    ours = method.sample(2, 1, torch.Generator().manual_seed(3), prompts=prompts)
    theirs = pipe(prompts, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=1, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(3), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert not torch.allclose(ours[0], method.sample(1, 1, torch.Generator().manual_seed(3), prompts=["dog 4"])[0])


def test_sd3_scm_debug_preset_jvp_through_the_transformer_and_export(tiny_sd3_dir, captioned, tmp_path):
    from lightning_distill.methods.scm import trigflow_jvp, trigflow_output

    root = tmp_path / "scm_sd3"
    cli = fit("scm", tiny_sd3_dir, captioned, root)
    method = cli.model
    assert method.text_conditional and cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    batch = next(iter(cli.datamodule.train_dataloader()))
    cond, teacher_cond = method.conditioning(batch)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"} and teacher_cond is cond
    # forward-mode AD through SD3Transformer2DModel (the code path of training, float32) against central
    # differences of a float64 copy: the prompt keywords are constants, tangents (dx_t/dt, 1) in (x_t, t). The
    # differences agree to ~1e-3 of the largest entry at best (diffusers' timestep embedding runs in float32
    # even in a float64 model); the x_t and t parts of dF/dt are each > 20% of it, so dropping one fails.
    g = torch.Generator().manual_seed(0)
    x_t, dx = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.7, 1.1, 1.4])
    with torch.no_grad():
        _, dF = trigflow_jvp(lambda x, s: trigflow_output(method.student, x, s, 0.5, **cond), x_t, t, dx, "forward")
        student64 = copy.deepcopy(method.student).double()
        cond64 = {k: v.double() for k, v in cond.items()}
        _, dF64 = trigflow_jvp(lambda x, s: trigflow_output(student64, x, s, 0.5, **cond64), x_t.double(), t.double(),
                               dx.double(), "finite_difference", 1e-4)
    assert dF.abs().max() > 1.0
    torch.testing.assert_close(dF.double(), dF64, rtol=0, atol=3e-3 * float(dF64.abs().max()))
    assert_export_reproduces(method, root / "student", steps=2, seed=5, prompts=("cat 1", "dog 4"))


def test_meanflow_refuses_an_sd3_transformer(tiny_sd3_dir):
    from lightning_distill.errors import ConfigError
    from lightning_distill.methods.meanflow import MeanFlowDistillation

    with pytest.raises(ConfigError, match="supports UNet2DModel students only, got SD3Transformer2DModel"):
        MeanFlowDistillation(load_teacher(str(tiny_sd3_dir)))
