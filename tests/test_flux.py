"""Flux text-to-image teachers: the tiny Flux stack of tests/_flux.py (CLIP + T5, guidance-distilled) loads as a
text-conditional flow teacher, encodes prompts as FluxPipeline.encode_prompt does, drives the transformer as the
pipeline's loop does (embedded guidance included), and distils with the consistency debug preset into a stock
FluxPipeline folder (full weights, or a LoRA file FluxPipeline.load_lora_weights reads) that samples as sample()."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _flux import CLIP_WIDTH, IMAGE_SIZE, T5_WIDTH, write_tiny_flux
from test_sd3 import sd3_captioned  # noqa: F401 - fixture: the captioned image folder
from lightning_distill import backbones
from lightning_distill.errors import ConfigError
from lightning_distill.teacher import TeacherError, load_teacher

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a photo of a blue dog digit 7", ""]  # the second is truncated at 8 CLIP tokens


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux")


@pytest.fixture(scope="module")
def flux_pipe(tiny_flux_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux_dir)


def test_flux_teacher_loads_and_encodes_prompts_as_the_pipeline(tiny_flux_dir, flux_pipe, tmp_path):
    from transformers import CLIPTextModel, T5EncoderModel

    teacher = load_teacher(str(tiny_flux_dir))
    assert type(teacher.unet).__name__ == "FluxTransformer2DModel" and teacher.schedule.path == "flow"
    assert teacher.is_latent and teacher.is_text_conditional and teacher.is_flux
    assert isinstance(teacher.text_encoder, CLIPTextModel) and isinstance(teacher.text_encoder_2, T5EncoderModel)
    assert type(teacher.tokenizer_2).__name__.startswith("T5Tokenizer") and teacher.text_encoder_3 is None
    assert teacher.max_sequence_length == 512 and teacher.sample_size == IMAGE_SIZE // 2 and teacher.in_channels == 4
    assert not any(p.requires_grad for p in teacher.parameters())

    inputs = teacher.text_inputs(PROMPTS)
    assert set(inputs) == {"input_ids", "input_ids_2"} and inputs["input_ids"].shape == (3, 8)
    assert inputs["input_ids_2"].shape == (3, 512)  # T5 ids, the pipeline's max_sequence_length
    cond = teacher.text_conditioning(inputs)
    with torch.no_grad():
        ref, pooled, text_ids = flux_pipe.encode_prompt(PROMPTS, None)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections", "guidance"}
    assert cond["encoder_hidden_states"].shape == (3, 512, T5_WIDTH) and cond["pooled_projections"].shape == (3, CLIP_WIDTH)
    assert torch.equal(cond["encoder_hidden_states"], ref) and torch.equal(cond["pooled_projections"], pooled)
    assert torch.equal(backbones.flux_text_ids(cond["encoder_hidden_states"]), text_ids)
    # the embedded guidance of a guidance-distilled network: FluxPipeline's guidance_scale, float32, per sample
    assert cond["guidance"].dtype == torch.float32 and torch.equal(cond["guidance"], torch.full((3,), 3.5))
    # another T5 length and guidance follow the pipeline's max_sequence_length and guidance_scale
    short = load_teacher(str(tiny_flux_dir), max_sequence_length=7, embedded_guidance=2.0).encode_prompts(PROMPTS)
    with torch.no_grad():
        ref7 = flux_pipe.encode_prompt(PROMPTS, None, max_sequence_length=7)[0]
    assert torch.equal(short["encoder_hidden_states"], ref7) and torch.equal(short["guidance"], torch.full((3,), 2.0))

    # a network without the guidance input (schnell-like) gets no guidance keyword
    plain = load_teacher(str(write_tiny_flux(tmp_path / "schnell", guidance_embeds=False)))
    assert set(plain.encode_prompts(PROMPTS[:1])) == {"encoder_hidden_states", "pooled_projections"}


def test_flux_text_conditioning_drives_the_transformer_as_the_pipeline(tiny_flux_dir, flux_pipe):
    """The denoiser's call with the teacher's keywords is FluxPipeline's transformer call (packed latents, ids,
    timestep / 1000, guidance), unpacked."""
    from diffusers import FluxPipeline

    teacher = load_teacher(str(tiny_flux_dir))
    cond = teacher.encode_prompts(PROMPTS[:2])
    sched = flux_pipe.scheduler
    sched.set_timesteps(sigmas=[1.0, 0.5], mu=0.5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(x, 2, 4, 8, 8)
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = flux_pipe.encode_prompt(PROMPTS[:2], None)
        img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, x.device, x.dtype)
        for t in sched.timesteps:
            ref = flux_pipe.transformer(
                hidden_states=packed, timestep=t.expand(2) / 1000, guidance=torch.full([1], 3.5).expand(2),
                pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=img_ids,
                return_dict=False)[0]
            assert torch.equal(teacher.denoiser.network(x, t, **cond), FluxPipeline._unpack_latents(ref, 16, 16, 2))


def test_flux_refusals_name_the_supported_classes(tiny_flux_dir, tmp_path):
    from lightning_distill.teacher import TextEncoderError

    swapped = tmp_path / "clip-as-t5"
    shutil.copytree(tiny_flux_dir, swapped)
    index = json.loads((swapped / "model_index.json").read_text())
    (swapped / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(TextEncoderError, match=r"text_encoder_2/ is a CLIPTextModel; a FluxTransformer2DModel teacher "
                                               r"reads T5EncoderModel there \(supported text encoders: CLIPTextModel, "
                                               r"CLIPTextModelWithProjection, T5EncoderModel\)"):
        load_teacher(str(swapped))
    assert issubclass(TextEncoderError, ConfigError) and issubclass(TextEncoderError, TeacherError)
    extra = tmp_path / "with-te3"
    shutil.copytree(tiny_flux_dir, extra)
    shutil.copytree(extra / "text_encoder_2", extra / "text_encoder_3")
    with pytest.raises(TextEncoderError, match="a FluxTransformer2DModel pipeline reads no text_encoder_3/"):
        load_teacher(str(extra))
    one = tmp_path / "no-t5"
    shutil.copytree(tiny_flux_dir, one)
    shutil.rmtree(one / "text_encoder_2")
    with pytest.raises(TeacherError, match=r"a Flux teacher encodes prompts with CLIP \(pooled\) and T5 \(sequence\)"):
        load_teacher(str(one)).encode_prompts(["a cat"])


# --- consistency distillation on the Flux stack: the debug preset, its export ------------------------------


def pipeline_latents(pipe, prompts, steps: int, seed: int, shape, guidance_scale: float) -> torch.Tensor:
    """``pipe``'s latents, unpacked, under test_sd3.assert_export_reproduces' protocol: a multi-step
    FlowMatchLCMScheduler draws its fresh noise from torch's global generator, given the state our generator has
    after the initial latents (FluxPipeline steps the scheduler without the generator, as SD3's does)."""
    from diffusers.utils.torch_utils import randn_tensor

    g = torch.Generator().manual_seed(seed)
    randn_tensor(shape, generator=g)
    with torch.random.fork_rng(devices=[]):  # leave the global state as the other tests expect it
        torch.set_rng_state(g.get_state())
        packed = pipe(list(prompts), height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
                      output_type="latent").images
    return backbones.unpack_latents(packed, *shape[-2:])


def run_preset(tiny_flux_dir, folder, root, *extra):
    from lightning_distill.cli import cli_main

    return cli_main(["fit", "--config", str(ROOT / "configs/consistency/debug_flux.yaml"), "--data.teacher",
                     str(tiny_flux_dir), "--data.data", str(folder), "--trainer.default_root_dir", str(root), *extra])


def test_flux_consistency_debug_preset_distils_and_exports_flux_pipeline(tiny_flux_dir, sd3_captioned, tmp_path):  # noqa: F811
    from diffusers import FlowMatchLCMScheduler, FluxPipeline

    root = tmp_path / "cd_flux"
    cli = run_preset(tiny_flux_dir, sd3_captioned, root)
    method = cli.model
    assert method.text_conditional and cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["input_ids_2"].shape == (4, 512)
    cond, teacher_predict = method.conditioning(batch, 4)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections", "guidance"}
    x, t = torch.randn(4, 4, 8, 8), torch.full((4,), 519)
    torch.testing.assert_close(teacher_predict(x, t).v, method.teacher.denoiser(x, t, **cond).v, atol=1e-6, rtol=0)

    pipe = FluxPipeline.from_pretrained(root / "student")
    assert isinstance(pipe.scheduler, FlowMatchLCMScheduler) and pipe.transformer.config.guidance_embeds
    ema = method.sampling_denoiser().unet.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in pipe.transformer.state_dict().items())  # the EMA weights
    prompts = ["a red cat", "a blue dog"]
    g = method.teacher.embedded_guidance
    for steps in (1, 2):
        ours = method.sample(2, steps, torch.Generator().manual_seed(steps), prompts=prompts)
        method.set_sample_steps(steps)  # the export carries the scheduler of its step count
        pipe = FluxPipeline.from_pretrained(method.export(tmp_path / f"flux-{steps}"))
        torch.testing.assert_close(pipeline_latents(pipe, prompts, steps, steps, ours.shape, g), ours, rtol=0, atol=1e-4)
    # the guidance input matters: at another guidance scale the pipeline samples something else
    other = pipeline_latents(pipe, prompts, 2, 2, ours.shape, 1.0)
    assert (other - ours).abs().max() > 1e-3


def test_flux_lora_student_with_released_encoders_exports_a_load_lora_weights_file(
        tiny_flux_dir, flux_pipe, sd3_captioned, tmp_path):  # noqa: F811
    from diffusers import FlowMatchLCMScheduler, FluxPipeline
    from safetensors import safe_open

    from lightning_distill import lora

    root = tmp_path / "lora_flux"
    cli = run_preset(tiny_flux_dir, sd3_captioned, root, "--model.init_args.student_lora", "{rank: 4, alpha: 4}",
                     "--model.init_args.optimizer.init_args.lr", "1e-2", "--data.text_cache", str(tmp_path / "text.pt"),
                     "--data.release_encoders", "true")
    method, dm = cli.model, cli.datamodule
    assert method.text_conditional and cli.trainer.global_step == 3
    trainable = {n for n, p in method.student.unet.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_lora_key(n) for n in trainable)

    # the cache holds FluxPipeline.encode_prompt's embeddings (and the guidance); CLIP and T5 were released
    assert set(method.teacher.released.modules) == {"text_encoder", "text_encoder_2", "vae.encoder"}
    assert method.teacher.text_encoder is None and method.teacher.text_encoder_2 is None
    full = dm.train_set.dataset
    texts = dm.prompts(torch.zeros(len(full), dtype=torch.long))
    with torch.no_grad():
        ref, pooled, _ = flux_pipe.encode_prompt(texts, None)
    items = [full[i]["text_cond"] for i in range(len(full))]
    torch.testing.assert_close(torch.stack([it["encoder_hidden_states"] for it in items]), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.stack([it["pooled_projections"] for it in items]), pooled, rtol=0, atol=1e-6)
    assert all(float(it["guidance"]) == 3.5 for it in items)

    # the export: FluxPipeline with the fused transformer and the encoders read back from the source ...
    folder = root / "student"
    prompts, steps, g = [method.hparams.sample_prompt, ""], method.hparams.sample_steps, method.teacher.embedded_guidance
    ours = method.sample(2, steps, torch.Generator().manual_seed(5), prompts=prompts)
    fused = FluxPipeline.from_pretrained(folder)
    assert isinstance(fused.scheduler, FlowMatchLCMScheduler) and not lora.has_lora(fused.transformer)
    for name in ("text_encoder", "text_encoder_2"):
        ref_sd = getattr(flux_pipe, name).state_dict()
        assert all(torch.equal(v, ref_sd[k]) for k, v in getattr(fused, name).state_dict().items())
    torch.testing.assert_close(pipeline_latents(fused, prompts, steps, 5, ours.shape, g), ours, rtol=0, atol=1e-4)

    # ... and the adapters in diffusers' Flux layout, which the teacher's own FluxPipeline loads
    with safe_open(str(folder / lora.LORA_WEIGHT_NAME), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    teacher = FluxPipeline.from_pretrained(tiny_flux_dir, scheduler=FlowMatchLCMScheduler.from_pretrained(folder / "scheduler"))
    plain = pipeline_latents(teacher, prompts, steps, 5, ours.shape, g)
    assert (plain - ours).abs().max() > 1e-2  # the adapters matter: without them the samples differ
    teacher.load_lora_weights(folder)
    torch.testing.assert_close(pipeline_latents(teacher, prompts, steps, 5, ours.shape, g), ours, rtol=0, atol=1e-4)


def test_flux_dmd2_distils_and_exports_and_refuses_a_second_guidance(tiny_flux_dir, sd3_captioned, tmp_path, capsys):  # noqa: F811
    """DMD2's SD3 preset runs on the Flux teacher with its real score unguided (real_guidance_scale 1: the
    guidance-distilled network is guided by its embedded guidance), and the 1-step FluxPipeline export reproduces
    sample(). The preset's real_guidance_scale 4 (classifier-free guidance against "" on top of the embedded
    guidance: guided twice) is refused in one line, before anything is written."""
    from diffusers import FluxPipeline

    from lightning_distill.cli import cli_main

    args = ["fit", "--config", str(ROOT / "configs/dmd2/debug_sd3.yaml"), "--data.teacher", str(tiny_flux_dir),
            "--data.data", str(sd3_captioned)]
    with pytest.raises(SystemExit) as exc:
        cli_main([*args, "--trainer.default_root_dir", str(tmp_path / "twice")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "guidance-distilled" in err[-1] and "real_guidance_scale to 1.0" in err[-1]
    assert not (tmp_path / "twice" / "checkpoints").exists()

    root = tmp_path / "dmd2_flux"
    cli = cli_main([*args, "--model.init_args.real_guidance_scale", "1.0", "--trainer.default_root_dir", str(root)])
    method = cli.model
    assert method.text_conditional and cli.trainer.global_step > 0
    assert torch.isfinite(cli.trainer.callback_metrics["train/fake_score_loss"])
    assert method.real_score() is method.teacher.denoiser
    prompts = ["a red cat", "a blue dog"]
    ours = method.sample(2, 1, torch.Generator().manual_seed(3), prompts=prompts)
    pipe = FluxPipeline.from_pretrained(root / "student")
    theirs = pipeline_latents(pipe, prompts, 1, 3, ours.shape, method.teacher.embedded_guidance)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


# --- the data options: T5 length and embedded guidance from the CLI ----------------------------------------


def test_flux_data_options_reach_the_teacher_and_change_the_training(tiny_flux_dir, sd3_captioned, tmp_path):  # noqa: F811
    """--data.teacher_embedded_guidance / --data.teacher_max_sequence_length reach the teacher the run trains with,
    the batches and conditioning follow them (so the loss moves), and every re-load of the run's teacher (seeds'
    and compare's run_teacher, evaluate's checkpoint loading) gets the same values."""
    from lightning_distill.evaluate import load_checkpoint_model
    from lightning_distill.seeds import run_teacher

    base = run_preset(tiny_flux_dir, sd3_captioned, tmp_path / "default", "--trainer.max_steps", "1")
    cli = run_preset(tiny_flux_dir, sd3_captioned, tmp_path / "g2", "--trainer.max_steps", "1",
                     "--data.teacher_embedded_guidance", "2.0", "--data.teacher_max_sequence_length", "16")
    method = cli.model
    assert cli.datamodule.teacher is method.teacher
    assert method.teacher.embedded_guidance == 2.0 and method.teacher.max_sequence_length == 16
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["input_ids_2"].shape == (4, 16)  # T5 ids at the run's length
    cond, teacher_predict = method.conditioning(batch, 4)
    assert torch.equal(cond["guidance"], torch.full((4,), 2.0))
    # the teacher's targets are those of guidance 2.0, not of the default 3.5 ...
    default = load_teacher(str(tiny_flux_dir), max_sequence_length=16)
    x, t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((4,), 519)
    ref = default.denoiser(x, t, **{**default.text_conditioning(batch), "guidance": torch.full((4,), 2.0)}).v
    torch.testing.assert_close(teacher_predict(x, t).v, ref, rtol=0, atol=1e-6)
    assert (default.denoiser(x, t, **default.text_conditioning(batch)).v - ref).abs().max() > 1e-4
    # ... so the same first step (same seed, data and noise) has another loss
    loss, loss_default = (float(c.trainer.callback_metrics["train/loss"]) for c in (cli, base))
    assert loss != pytest.approx(loss_default, rel=1e-6, abs=0)

    data = cli.config["fit.data"].as_dict()  # the run's data block, as seeds / compare read it from its config
    again = run_teacher(data)
    assert again.embedded_guidance == 2.0 and again.max_sequence_length == 16
    model, _ = load_checkpoint_model(tmp_path / "g2" / "checkpoints" / "last.ckpt", teacher=default)
    assert model.teacher.embedded_guidance == 2.0 and model.teacher.max_sequence_length == 16
    model, _ = load_checkpoint_model(tmp_path / "default" / "checkpoints" / "last.ckpt", teacher=default)
    assert model.teacher.embedded_guidance == 3.5 and model.teacher.max_sequence_length == 512
    # a run whose teacher was loaded in bf16 is re-loaded so (its encoders and VAE are the student's as trained);
    # the given float32 teacher was used as it was before
    ckpt = torch.load(tmp_path / "default" / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["datamodule_hyper_parameters"]["teacher_dtype"] = "bfloat16"
    torch.save(ckpt, tmp_path / "bf16.ckpt")
    model, _ = load_checkpoint_model(tmp_path / "bf16.ckpt", teacher=default)
    assert {p.dtype for p in model.teacher.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.teacher.text_encoder_2.parameters()} <= {torch.bfloat16, torch.float32}
    assert {p.dtype for p in model.student.unet.parameters()} == {torch.float32}


@pytest.mark.parametrize("stack, option, value, message", [
    ("schnell", "--data.teacher_embedded_guidance", "2.0",
     "ConfigError: data.teacher_embedded_guidance=2.0 is the guidance input of a guidance-distilled Flux network "
     "(FluxTransformer2DModel with guidance_embeds), but teacher "),
    ("sd3", "--data.teacher_max_sequence_length", "77",
     "ConfigError: data.teacher_max_sequence_length=77 sets the T5 prompt length, but teacher "),
    ("sd3", "--data.teacher_embedded_guidance", "2.0", "ConfigError: data.teacher_embedded_guidance=2.0 is the "),
    ("flux", "--data.teacher_max_sequence_length", "513",
     "ConfigError: data.teacher_max_sequence_length must lie in [1, 512] (the pipelines' limit), got 513"),
])
def test_flux_data_options_where_they_do_not_apply_are_one_line(
        stack, option, value, message, tiny_flux_dir, sd3_captioned, tmp_path, capsys, monkeypatch):  # noqa: F811
    from _sd3 import write_tiny_sd3

    from lightning_distill.cli import cli_main

    monkeypatch.delenv("LIGHTNING_DISTILL_TRACEBACK", raising=False)
    teacher = {"flux": lambda: tiny_flux_dir, "schnell": lambda: write_tiny_flux(tmp_path / "schnell", guidance_embeds=False),
               "sd3": lambda: write_tiny_sd3(tmp_path / "sd3")}[stack]()  # the SD3 stack: no T5, no guidance input
    preset = "consistency/debug_flux.yaml" if stack != "sd3" else "consistency/debug_sd3.yaml"
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(ROOT / "configs" / preset), "--data.teacher", str(teacher), "--data.data",
                  str(sd3_captioned), "--trainer.default_root_dir", str(root), option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lightning-distill: error: {message}"), err[-3:]
    assert not (root / "checkpoints").exists()


def test_flux_progressive_promoted_teachers_keep_the_embedded_guidance(tiny_flux_dir, sd3_captioned, tmp_path):  # noqa: F811
    """Progressive distillation 4 -> 2 -> 1 steps on the Flux stack at --data.teacher_embedded_guidance 2.0: every
    promoted teacher conditions its network at 2.0 (not the constructor's 3.5), as the configured teacher did."""
    from lightning_distill.cli import cli_main

    root = tmp_path / "pd_flux"
    cli = cli_main(["fit", "--config", str(ROOT / "configs/progressive/debug_sd3.yaml"), "--data.teacher",
                    str(tiny_flux_dir), "--data.data", str(sd3_captioned), "--trainer.default_root_dir", str(root),
                    "--model.init_args.num_student_steps", "4", "--data.teacher_embedded_guidance", "2.0"])
    method, configured = cli.model, cli.datamodule.teacher
    assert method.round_index == 2 and method.num_student_steps == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    promoted = method.teacher
    assert promoted is not configured and not promoted.reloadable and promoted.embedded_guidance == 2.0
    batch = next(iter(cli.datamodule.train_dataloader()))
    cond = promoted.text_conditioning(batch)
    assert torch.equal(cond["guidance"], torch.full((4,), 2.0))
    assert all(torch.equal(v, configured.text_conditioning(batch)[k]) for k, v in cond.items())


def test_classifier_free_guidance_on_a_guidance_distilled_teacher_is_refused_in_evaluate(tiny_flux_dir):
    """evaluate's (and the callbacks') guidance_scale is classifier-free guidance against "": on Flux-dev, whose
    own guidance is the embedded one (FluxPipeline's guidance_scale), it would guide twice, under the pipeline's
    name for the other thing; refused in one line naming the embedded guidance. A network without a guidance input
    (Flux-schnell) keeps classifier-free guidance."""
    from lightning_distill.evaluate import teacher_sampler

    teacher = load_teacher(str(tiny_flux_dir))
    assert teacher.is_guidance_distilled and teacher_sampler(teacher).guidance == 1.0
    with pytest.raises(ConfigError, match=r"guidance scale 3.5: the teacher is guidance-distilled .* embedded guidance 3.5"):
        teacher_sampler(teacher, guidance_scale=3.5)
    schnell = load_teacher(str(write_tiny_flux(tiny_flux_dir.parent / "schnell", guidance_embeds=False)))
    assert not schnell.is_guidance_distilled and teacher_sampler(schnell, guidance_scale=3.5).guidance == 3.5
