"""SD3-style teachers (#23 item 2): the tiny SD3 stack of tests/_sd3.py loads, encodes prompts as
StableDiffusion3Pipeline does with T5 absent, and feeds the SD3 transformer through the backbone adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import write_captions

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
    # a text_encoder_3/ other than T5 is refused by name, with the supported classes (T5 itself: tests/test_sd3_t5.py)
    t5 = tmp_path / "clip-as-t5"
    shutil.copytree(tiny_sd3_dir, t5)
    shutil.copytree(t5 / "text_encoder", t5 / "text_encoder_3")
    index = json.loads((t5 / "model_index.json").read_text())
    (t5 / "model_index.json").write_text(json.dumps({**index, "text_encoder_3": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(TeacherError, match=r"text_encoder_3/ is a CLIPTextModel; a SD3Transformer2DModel teacher reads "
                                           r"T5EncoderModel there \(supported text encoders: .*T5EncoderModel\)"):
        load_teacher(str(t5))
    # a VAE other than AutoencoderKL (SANA's AutoencoderDC) is refused by name, before any weights load
    dc = tmp_path / "dc-vae"
    shutil.copytree(tiny_sd3_dir, dc)
    cfg = json.loads((dc / "vae" / "config.json").read_text())
    (dc / "vae" / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderDC"}))
    with pytest.raises(TeacherError, match=r"VAE class 'AutoencoderDC' is not supported \(supported: AutoencoderKL\)"):
        load_teacher(str(dc))
    one = tmp_path / "one-clip"
    shutil.copytree(tiny_sd3_dir, one)
    shutil.rmtree(one / "text_encoder_2")
    teacher = load_teacher(str(one))
    with pytest.raises(TeacherError, match="two CLIP encoders"):
        teacher.encode_prompts(["a cat"])


# --- LCM on the SD3 stack --------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sd3_captioned(image_folder):
    return write_captions(image_folder)


def sd3_lcm(tiny_sd3_dir, folder, **kw):
    from lightning_distill.data import TeacherDataModule
    from lightning_distill.methods.lcm import LatentConsistencyDistillation

    dm = TeacherDataModule(teacher=str(tiny_sd3_dir), data=str(folder), image_size=IMAGE_SIZE, batch_size=4)
    args = {"w_min": 3.0, "w_max": 3.0, "original_inference_steps": 40, "sample_steps": 2, **kw}
    return dm, LatentConsistencyDistillation(dm.teacher, **args)


def test_sd3_lcm_guided_teacher_and_refusals(tiny_sd3_dir, sd3_captioned):
    from lightning_distill.errors import ConfigError

    dm, method = sd3_lcm(tiny_sd3_dir, sd3_captioned)
    teacher = dm.teacher
    assert not method.guidance_embedding and type(method.student.unet).__name__ == "SD3Transformer2DModel"
    cond_c = teacher.encode_prompts(["a red cat", "a blue dog"])
    cond_u = method.uncond_conditioning(2, "cpu")
    assert set(cond_u) == {"encoder_hidden_states", "pooled_projections"}
    x, t, w = torch.randn(2, 4, 8, 8), torch.tensor([999, 519]), torch.tensor([3.0, 3.0])
    c, u = teacher.denoiser(x, t, **cond_c), teacher.denoiser(x, t, **cond_u)
    guided = method.guided_teacher(cond_c, cond_u, w)(x, t)
    # both text keywords of the unconditional prompt "" enter the CFG: cond + w (cond - uncond)
    torch.testing.assert_close(guided.v, c.v + 3.0 * (c.v - u.v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided.x0, c.x0 + 3.0 * (c.x0 - u.x0), atol=1e-5, rtol=1e-5)
    # the student starts as a copy of the teacher's transformer (no guidance input: one w folded in)
    torch.testing.assert_close(method.student(x, t, **cond_c).v, c.v, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="no guidance-embedding input.*set w_min = w_max"):
        sd3_lcm(tiny_sd3_dir, sd3_captioned, w_max=5.0)
    with pytest.raises(ConfigError, match=r"no guidance input: the guidance it was distilled with \(g = w_min \+ 1 = 4.0\) is folded in"):
        method.sample(1, 1, prompts=["a cat"], guidance_scale=8.0)


def test_sd3_lcm_distils_and_exports_stable_diffusion_3_pipeline(tiny_sd3_dir, sd3_captioned, tmp_path):
    from diffusers import FlowMatchLCMScheduler, StableDiffusion3Pipeline
    from diffusers.utils.torch_utils import randn_tensor

    from lightning_distill.callbacks import EMA

    torch.manual_seed(0)
    dm, method = sd3_lcm(tiny_sd3_dir, sd3_captioned, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    before = {k: v.clone() for k, v in method.student.unet.state_dict().items()}
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, callbacks=[EMA(decay=0.5)], accelerator="cpu")
    trainer.fit(method, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(v, before[k]) for k, v in method.student.unet.state_dict().items())

    prompts = ["a red cat", "a blue dog"]
    for steps in (1, 2):
        method.set_sample_steps(steps)  # the export carries the scheduler of its step count
        path = method.export(tmp_path / f"sd3-lcm-{steps}")
        pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
        assert isinstance(pipe.scheduler, FlowMatchLCMScheduler)
        ours = method.sample(2, steps, torch.Generator().manual_seed(steps), prompts=prompts)
        # StableDiffusion3Pipeline calls scheduler.step without the generator: its fresh noise (multiplied by
        # 0 at the last step) comes from torch's global generator, which is given the state our generator
        # has after drawing the initial latents, where sample() draws the fresh noise from.
        g = torch.Generator().manual_seed(steps)
        randn_tensor(ours.shape, generator=g)
        with torch.random.fork_rng(devices=[]):  # leave the global state as the other tests expect it
            torch.set_rng_state(g.get_state())
            theirs = pipe(prompts, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps, guidance_scale=1.0,
                          generator=torch.Generator().manual_seed(steps), output_type="latent").images
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
            if steps == 1:  # one step needs no fresh noise: any global state reproduces it
                torch.manual_seed(123)
                again = pipe(prompts, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=1, guidance_scale=1.0,
                             generator=torch.Generator().manual_seed(1), output_type="latent").images
                torch.testing.assert_close(ours, again, rtol=0, atol=1e-4)
    # the exported transformer holds the EMA weights (the sampling denoiser)
    ema = method.sampling_denoiser().unet.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in pipe.transformer.state_dict().items())


def test_sd3_lcm_debug_preset(tiny_sd3_dir, sd3_captioned, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from lightning_distill.cli import cli_main

    root = tmp_path / "debug_sd3"
    cli_main(["fit", "--config", str(ROOT / "configs/lcm/debug_sd3.yaml"), "--data.teacher", str(tiny_sd3_dir),
              "--data.data", str(sd3_captioned), "--trainer.default_root_dir", str(root)])
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "student", text_encoder_3=None, tokenizer_3=None)
    image = pipe("a cat", height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=2, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(image).all()
    assert list((root / "logs").rglob("events.out.tfevents*"))


# --- consistency distillation and DMD2 on the SD3 stack (methods/text.py) --------------------------------


def assert_export_reproduces(method, folder, steps: int, seed: int, prompts=("a red cat", "a blue dog"),
                             load_kwargs: dict | None = None):
    """The exported StableDiffusion3Pipeline (guidance_scale=1) gives method.sample's latents for one generator;
    beyond one step torch's global generator gets the state the generator has after the initial latents
    (the pipeline steps the scheduler without the generator; see methods/lcm.py). ``load_kwargs``: of
    ``from_pretrained`` (default: T5 absent; ``{}`` for a folder with T5)."""
    from diffusers import FlowMatchLCMScheduler, StableDiffusion3Pipeline
    from diffusers.utils.torch_utils import randn_tensor

    kw = {"text_encoder_3": None, "tokenizer_3": None} if load_kwargs is None else load_kwargs
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **kw)
    assert isinstance(pipe.scheduler, FlowMatchLCMScheduler)
    ours = method.sample(len(prompts), steps, torch.Generator().manual_seed(seed), prompts=list(prompts))
    g = torch.Generator().manual_seed(seed)
    randn_tensor(ours.shape, generator=g)
    with torch.random.fork_rng(devices=[]):  # leave the global state as the other tests expect it
        torch.set_rng_state(g.get_state())
        theirs = pipe(list(prompts), height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps,
                      guidance_scale=1.0, generator=torch.Generator().manual_seed(seed), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_sd3_consistency_debug_preset_distils_and_exports(tiny_sd3_dir, sd3_captioned, tmp_path):
    from lightning_distill.cli import cli_main

    root = tmp_path / "cd_sd3"
    cli = cli_main(["fit", "--config", str(ROOT / "configs/consistency/debug_sd3.yaml"), "--data.teacher",
                    str(tiny_sd3_dir), "--data.data", str(sd3_captioned), "--trainer.default_root_dir", str(root)])
    method = cli.model
    assert method.text_conditional and cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    batch = next(iter(cli.datamodule.train_dataloader()))
    cond, teacher_predict = method.conditioning(batch, 4)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    # the teacher sees the same prompt keywords, no guidance
    x, t = torch.randn(4, 4, 8, 8), torch.full((4,), 519)
    torch.testing.assert_close(teacher_predict(x, t).v, method.teacher.denoiser(x, t, **cond).v, atol=1e-6, rtol=0)
    assert_export_reproduces(method, root / "student", steps=2, seed=5)


# --- DMD2 on the SD3 stack -------------------------------------------------------------------------------


def test_sd3_dmd2_debug_preset_distils_and_exports(tiny_sd3_dir, sd3_captioned, tmp_path):
    from lightning_distill.cli import cli_main

    root = tmp_path / "dmd2_sd3"
    cli = cli_main(["fit", "--config", str(ROOT / "configs/dmd2/debug_sd3.yaml"), "--data.teacher", str(tiny_sd3_dir),
                    "--data.data", str(sd3_captioned), "--trainer.default_root_dir", str(root)])
    method = cli.model
    assert method.text_conditional and cli.trainer.global_step > 0
    assert torch.isfinite(cli.trainer.callback_metrics["train/fake_score_loss"])
    # the batch's text keywords reach all three networks: the SD3 keywords, not class labels
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert set(method._cond(batch)) == {"encoder_hidden_states", "pooled_projections"}
    assert_export_reproduces(method, root / "student", steps=1, seed=3)
    # gan=true on this teacher: configs/dmd2/debug_sd3_gan.yaml, tests/test_sd3_adversarial.py


def test_dmd2_guided_real_score_by_hand(tiny_sd3_dir, tiny_flow_teacher_dir):
    from lightning_distill.errors import ConfigError
    from lightning_distill.methods.dmd2 import DMD2
    from lightning_distill.methods.text import GuidedScore

    teacher = load_teacher(str(tiny_sd3_dir))
    method = DMD2(teacher=teacher, gan=False, real_guidance_scale=4.0)
    real = method.real_score()
    assert isinstance(real, GuidedScore) and real.schedule is teacher.schedule
    cond = {k: v.float() for k, v in teacher.encode_prompts(["a red cat", "a blue dog"]).items()}
    uncond = teacher.encode_prompts(["", ""])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([900, 300])
    c, u = teacher.denoiser(x, t, **cond), teacher.denoiser(x, t, **uncond)
    p = real(x, t, **cond)
    for name in ("x0", "eps", "v"):  # the pipelines' convention: uncond + g (cond - uncond)
        ref = getattr(u, name) + 4.0 * (getattr(c, name) - getattr(u, name))
        torch.testing.assert_close(getattr(p, name), ref, atol=1e-5, rtol=1e-5)
    assert DMD2(teacher=teacher, gan=False).real_score() is teacher.denoiser  # g = 1: the teacher as it is
    with pytest.raises(ConfigError, match="needs a text-conditional teacher"):
        DMD2(teacher=load_teacher(str(tiny_flow_teacher_dir)), gan=False, real_guidance_scale=4.0)


# --- progressive distillation on the SD3 stack ----------------------------------------------------------


def test_sd3_progressive_debug_preset_distils_and_exports(tiny_sd3_dir, sd3_captioned, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from lightning_distill.cli import cli_main

    root = tmp_path / "pd_sd3"
    cli = cli_main(["fit", "--config", str(ROOT / "configs/progressive/debug_sd3.yaml"), "--data.teacher",
                    str(tiny_sd3_dir), "--data.data", str(sd3_captioned), "--trainer.default_root_dir", str(root)])
    method = cli.model
    assert method.text_conditional and method.round_index == 1 and method.num_student_steps == 1
    # the promoted teacher keeps both CLIP encoders, so round 1 encodes prompts as round 0 did
    assert method.teacher.text_encoder_2 is not None and not method.teacher.reloadable
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "student", text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    prompts = ["a red cat", "a blue dog"]
    # a deterministic sampler: the pipeline reproduces sample() for the same generator, no global state needed
    ours = method.sample(2, 1, torch.Generator().manual_seed(7), prompts=prompts)
    theirs = pipe(prompts, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=1, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(7), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


# --- knowledge distillation into a smaller SD3 transformer ----------------------------------------------


def test_sd3_knowledge_debug_preset_distils_and_exports(tiny_sd3_dir, sd3_captioned, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from lightning_distill.cli import cli_main
    from lightning_distill.errors import ConfigError
    from lightning_distill.methods.knowledge import KnowledgeDistillation, count_parameters

    root = tmp_path / "kd_sd3"
    cli = cli_main(["fit", "--config", str(ROOT / "configs/knowledge/debug_sd3.yaml"), "--data.teacher",
                    str(tiny_sd3_dir), "--data.data", str(sd3_captioned), "--trainer.default_root_dir", str(root)])
    method = cli.model
    assert method.text_conditional and method.student.unet.config.num_layers == 1
    assert count_parameters(method.student.unet) < count_parameters(method.teacher.unet)
    assert cli.trainer.global_step == 3 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "student", text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.transformer.config.num_layers == 1
    prompts = ["a red cat", "a blue dog"]
    ours = method.sample(2, 2, torch.Generator().manual_seed(11), prompts=prompts)
    theirs = pipe(prompts, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=2, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(11), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match="feature KD matches UNet feature maps"):
        KnowledgeDistillation(method.teacher, feature_weights={"transformer_blocks.0": 1.0})
