"""SANA text-to-image teachers: the tiny SANA stack of tests/_sana.py (Gemma2 + AutoencoderDC) loads as a text-
conditional flow teacher, encodes prompts as SanaPipeline.encode_prompt does (complex_human_instruction, the last
max_sequence_length tokens, the attention mask; the unconditional "" as its negative prompt), drives the transformer as
the pipeline's loop does, and distils with the consistency debug preset (and DMD2's text preset) into a stock
SanaPipeline folder (full weights, or a LoRA file SanaPipeline.load_lora_weights reads) that samples as sample() and
that evaluate scores through SanaPipeline itself."""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from _sana import GEMMA_WIDTH, IMAGE_SIZE, write_tiny_sana
from lightning_distill.teacher import TeacherError, load_teacher

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "A Photo of a Blue dog digit 7  ", "a cat " * 200]  # case and spaces; the third is truncated
LATENT = IMAGE_SIZE // 4


@pytest.fixture(scope="module")
def tiny_sana_dir(tmp_path_factory):
    return write_tiny_sana(tmp_path_factory.mktemp("sana") / "tiny-sana")


@pytest.fixture(scope="module")
def sana_pipe(tiny_sana_dir):
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(tiny_sana_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """Twelve 12 x 10 PNGs in two class folders, a caption each (metadata.jsonl)."""
    from conftest import write_captions, write_image_folder

    return write_captions(write_image_folder(tmp_path_factory.mktemp("captioned") / "images"))


def encode(pipe, prompts, **kw):
    """SanaPipeline.encode_prompt with classifier-free guidance (the negative prompt ""), as its __call__ calls it:
    its default complex_human_instruction unless given."""
    default = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
    kw.setdefault("complex_human_instruction", default)
    with torch.no_grad():
        return pipe.encode_prompt(prompts, True, **kw)


def test_sana_teacher_loads_and_encodes_prompts_as_the_pipeline(tiny_sana_dir, sana_pipe):
    from diffusers import AutoencoderDC, SanaPipeline
    from transformers import Gemma2Model

    from lightning_distill.teacher import SANA_COMPLEX_HUMAN_INSTRUCTION

    # the instruction is SanaPipeline's default, as its __call__ uses it
    assert list(SANA_COMPLEX_HUMAN_INSTRUCTION) == \
        inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    teacher = load_teacher(str(tiny_sana_dir))
    assert type(teacher.unet).__name__ == "SanaTransformer2DModel" and teacher.schedule.path == "flow"
    assert isinstance(teacher.text_encoder, Gemma2Model) and isinstance(teacher.vae, AutoencoderDC)
    assert type(teacher.tokenizer).__name__.startswith("GemmaTokenizer") and teacher.is_text_conditional
    assert teacher.max_sequence_length == 300 and teacher.complex_human_instruction == SANA_COMPLEX_HUMAN_INSTRUCTION
    # AutoencoderDC's compression 2 ** (len(encoder_block_out_channels) - 1), as SanaPipeline computes it
    assert teacher.vae_scale_factor == sana_pipe.vae_scale_factor == 4 and teacher.sample_size == LATENT

    inputs = teacher.text_inputs(PROMPTS)
    assert set(inputs) == {"input_ids", "attention_mask", "input_length"}
    cond = teacher.text_conditioning(inputs)
    ref, mask, neg, neg_mask = encode(sana_pipe, PROMPTS)
    assert set(cond) == {"encoder_hidden_states", "encoder_attention_mask"}
    assert cond["encoder_hidden_states"].shape == (3, 300, GEMMA_WIDTH)
    assert cond["encoder_attention_mask"].dtype == mask.dtype == torch.long
    assert (cond["encoder_hidden_states"] - ref).abs().max() == 0 and torch.equal(cond["encoder_attention_mask"], mask)
    # "" is the negative prompt of the pipeline's classifier-free guidance (no instruction, no selection), alone
    # or beside prompts
    uncond = teacher.encode_prompts([""] * 3)
    assert torch.equal(uncond["encoder_hidden_states"], neg) and torch.equal(uncond["encoder_attention_mask"], neg_mask)
    mixed = teacher.encode_prompts([PROMPTS[0], "", PROMPTS[1]])
    assert torch.equal(mixed["encoder_hidden_states"][[0, 2]], ref[:2])
    assert torch.equal(mixed["encoder_hidden_states"][1], neg[0])
    assert torch.equal(mixed["encoder_attention_mask"][1], neg_mask[0])

    # another length and instruction (none; a custom one) follow the pipeline's max_sequence_length and
    # complex_human_instruction
    for kw in ({"max_sequence_length": 7}, {"complex_human_instruction": None},
               {"complex_human_instruction": ["Draw:"]}):
        other = load_teacher(str(tiny_sana_dir), **kw).encode_prompts(PROMPTS[:2])
        want, want_mask, _, _ = encode(sana_pipe, PROMPTS[:2], **kw)
        assert torch.equal(other["encoder_hidden_states"], want)
        assert torch.equal(other["encoder_attention_mask"], want_mask)

    # AutoencoderDC latents: encode's latent (no distribution) times scaling_factor, no shift; decode its inverse
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sf = sana_pipe.vae.config.scaling_factor
    with torch.no_grad():
        z = teacher.encode_images(x)
        assert torch.equal(z, sana_pipe.vae.encode(x).latent * sf) and z.shape == (2, 4, LATENT, LATENT)
        assert torch.equal(teacher.decode_latents(z), sana_pipe.vae.decode(z / sf).sample)

    # the denoiser's call is SanaPipeline's transformer call (timestep * timestep_scale, the prompt mask)
    sched = sana_pipe.scheduler
    sched.set_timesteps(2)
    x = torch.randn(3, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in sched.timesteps:
            out = sana_pipe.transformer(x, encoder_hidden_states=ref, encoder_attention_mask=mask,
                                        timestep=t.expand(3) * sana_pipe.transformer.config.timestep_scale,
                                        return_dict=False)[0]
            assert torch.equal(teacher.denoiser.network(x, t, **cond), out)


def test_sana_refusals_name_the_supported_classes(tiny_sana_dir, tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    from lightning_distill.teacher import TextEncoderError

    vae = tmp_path / "kl-vae"
    shutil.copytree(tiny_sana_dir, vae)
    cfg = json.loads((vae / "vae" / "config.json").read_text())
    (vae / "vae" / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    with pytest.raises(TeacherError, match=r"VAE class 'AutoencoderKL' is not supported \(supported: AutoencoderDC\) "
                                           r"beside a SanaTransformer2DModel; supported VAE classes: AutoencoderKL .*"
                                           r"AutoencoderDC \(SanaTransformer2DModel\)"):
        load_teacher(str(vae))
    swapped = tmp_path / "clip"
    shutil.copytree(tiny_sana_dir, swapped)
    index = json.loads((swapped / "model_index.json").read_text())
    (swapped / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(TextEncoderError, match=r"text_encoder/ is a CLIPTextModel; a SanaTransformer2DModel teacher "
                                               r"reads Gemma2Model there"):
        load_teacher(str(swapped))
    none = tmp_path / "no-gemma"
    shutil.copytree(tiny_sana_dir, none)
    shutil.rmtree(none / "text_encoder")
    with pytest.raises(TeacherError, match="a SANA teacher encodes prompts with Gemma2 and its attention mask"):
        load_teacher(str(none)).text_conditioning({"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(TeacherError, match="a list of lines"):
        load_teacher(str(tiny_sana_dir), complex_human_instruction="Draw:")
    # SANA's shipped DPM-Solver flow config loads (tests/test_flow_solver_configs.py); one whose shift comes from the
    # pipeline's mu does not map onto a static flow shift: one line naming the supported configs
    dpm = write_tiny_sana(tmp_path / "dpm", scheduler=DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", use_dynamic_shifting=True))
    with pytest.raises(TeacherError, match=r"DPMSolverMultistepScheduler with use_flow_sigmas and use_dynamic_shifting "
                                           r".* not supported; supported flow-sigma configs: "):
        load_teacher(str(dpm))


def test_sana_text_cache_keys_follow_the_instruction_and_length(tiny_sana_dir):
    from lightning_distill.text_cache import encoder_key

    keys = [encoder_key(load_teacher(str(tiny_sana_dir), **kw))["settings"] for kw in (
        {}, {"complex_human_instruction": None}, {"complex_human_instruction": ["Draw:"]}, {"max_sequence_length": 7})]
    assert len(set(keys)) == 4
    assert encoder_key(load_teacher(str(tiny_sana_dir)))["settings"] == keys[0]


# --- distillation on the SANA stack: the presets, their exports, evaluate ----------------------------------


def run_preset(tiny_sana_dir, folder, root, *extra, preset="consistency/debug_sana.yaml"):
    from lightning_distill.cli import cli_main

    return cli_main(["fit", "--config", str(ROOT / "configs" / preset), "--data.teacher", str(tiny_sana_dir),
                     "--data.data", str(folder), "--trainer.default_root_dir", str(root), *extra])


def pipeline_latents(pipe, prompts, steps: int, seed: int) -> torch.Tensor:
    """SanaPipeline's latents as a user calls it: it draws its latents from the generator and steps the scheduler
    with it; the tiny network's sample_size (2) has no resolution bin, hence use_resolution_binning=False."""
    return pipe(list(prompts), height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(seed), use_resolution_binning=False,
                output_type="latent").images


@pytest.fixture(scope="module")
def cd_run(tiny_sana_dir, captioned, tmp_path_factory):
    root = tmp_path_factory.mktemp("cd_sana")
    return root, run_preset(tiny_sana_dir, captioned, root)


def test_sana_consistency_debug_preset_distils_and_exports_sana_pipeline(cd_run, tmp_path):
    from diffusers import FlowMatchLCMScheduler, SanaPipeline

    root, cli = cd_run
    method = cli.model
    assert method.text_conditional and cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    batch = next(iter(cli.datamodule.train_dataloader()))
    cond, teacher_predict = method.conditioning(batch, 4)
    assert set(cond) == {"encoder_hidden_states", "encoder_attention_mask"}
    x, t = torch.randn(4, 4, LATENT, LATENT), torch.full((4,), 519)
    torch.testing.assert_close(teacher_predict(x, t).v, method.teacher.denoiser(x, t, **cond).v, atol=1e-6, rtol=0)

    pipe = SanaPipeline.from_pretrained(root / "student")
    assert isinstance(pipe.scheduler, FlowMatchLCMScheduler)
    ema = method.sampling_denoiser().unet.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in pipe.transformer.state_dict().items())  # the EMA weights
    prompts = ["a red cat", "a blue dog"]
    for steps in (1, 2):
        ours = method.sample(2, steps, torch.Generator().manual_seed(steps), prompts=prompts)
        method.set_sample_steps(steps)  # the export carries the scheduler of its step count
        pipe = SanaPipeline.from_pretrained(method.export(tmp_path / f"sana-{steps}"))
        pipe.set_progress_bar_config(disable=True)
        torch.testing.assert_close(pipeline_latents(pipe, prompts, steps, steps), ours, rtol=0, atol=1e-5)
    method.set_sample_steps(2)


def test_sana_lora_student_with_released_encoders_exports_a_load_lora_weights_file(
        tiny_sana_dir, sana_pipe, captioned, tmp_path):
    from diffusers import FlowMatchLCMScheduler, SanaPipeline
    from safetensors import safe_open

    from lightning_distill import lora

    root = tmp_path / "lora_sana"
    cli = run_preset(tiny_sana_dir, captioned, root, "--model.init_args.student_lora", "{rank: 4, alpha: 4}",
                     "--model.init_args.optimizer.init_args.lr", "1e-2", "--data.text_cache", str(tmp_path / "text.pt"),
                     "--data.release_encoders", "true")
    method, dm = cli.model, cli.datamodule
    assert method.text_conditional and cli.trainer.global_step == 3
    trainable = {n for n, p in method.student.unet.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_lora_key(n) for n in trainable)

    # the cache holds SanaPipeline.encode_prompt's embeddings and masks; Gemma2 and the VAE encoder were released
    assert set(method.teacher.released.modules) == {"text_encoder", "vae.encoder"}
    assert method.teacher.text_encoder is None
    full = dm.train_set.dataset
    texts = dm.prompts(torch.zeros(len(full), dtype=torch.long))
    ref, mask, neg, neg_mask = encode(sana_pipe, texts)
    items = [full[i]["text_cond"] for i in range(len(full))]
    assert torch.equal(torch.stack([it["encoder_hidden_states"] for it in items]), ref)
    assert torch.equal(torch.stack([it["encoder_attention_mask"] for it in items]), mask)
    assert torch.equal(method.teacher.prompt_table[""]["encoder_hidden_states"], neg[:1])

    # the export: SanaPipeline with the fused transformer and Gemma2 read back from the source ...
    folder = root / "student"
    prompts, steps = [method.hparams.sample_prompt] * 2, method.hparams.sample_steps
    ours = method.sample(2, steps, torch.Generator().manual_seed(5), prompts=prompts)
    fused = SanaPipeline.from_pretrained(folder)
    fused.set_progress_bar_config(disable=True)
    assert isinstance(fused.scheduler, FlowMatchLCMScheduler) and not lora.has_lora(fused.transformer)
    ref_sd = sana_pipe.text_encoder.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in fused.text_encoder.state_dict().items())
    torch.testing.assert_close(pipeline_latents(fused, prompts, steps, 5), ours, rtol=0, atol=1e-5)
    # the call settings come from the teacher, not from the released parts read back (which carry none)
    import json

    call = json.loads((folder / "distillation_call.json").read_text())
    assert call["max_sequence_length"] == method.teacher.max_sequence_length
    assert call["complex_human_instruction"] == list(method.teacher.complex_human_instruction)

    # ... and the adapters in diffusers' layout, which the teacher's own SanaPipeline loads
    with safe_open(str(folder / lora.LORA_WEIGHT_NAME), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    lcm = FlowMatchLCMScheduler.from_pretrained(folder / "scheduler")
    teacher = SanaPipeline.from_pretrained(tiny_sana_dir, scheduler=lcm)
    teacher.set_progress_bar_config(disable=True)
    # without the adapters the samples differ
    assert (pipeline_latents(teacher, prompts, steps, 5) - ours).abs().max() > 1e-2
    teacher.load_lora_weights(folder)
    torch.testing.assert_close(pipeline_latents(teacher, prompts, steps, 5), ours, rtol=0, atol=1e-5)


def test_sana_dmd2_guides_against_the_negative_prompt_and_exports(tiny_sana_dir, sana_pipe, captioned, tmp_path):
    """DMD2's SD3 preset on the SANA stack (at 32 px: AutoencoderDC's factor 4 gives the network's 8 x 8 latents):
    its real score is guided at 4 against SanaPipeline's negative-prompt embeddings of "", and the 1-step SanaPipeline
    export reproduces sample()."""
    from diffusers import SanaPipeline

    root = tmp_path / "dmd2_sana"
    cli = run_preset(tiny_sana_dir, captioned, root, "--data.image_size", str(IMAGE_SIZE), preset="dmd2/debug_sd3.yaml")
    method = cli.model
    assert method.text_conditional and cli.trainer.global_step > 0
    assert torch.isfinite(cli.trainer.callback_metrics["train/fake_score_loss"])
    real = method.real_score()
    _, _, neg, neg_mask = encode(sana_pipe, ["a cat"])
    assert real.guidance_scale == 4.0 and torch.equal(real.uncond["encoder_hidden_states"], neg)
    assert torch.equal(real.uncond["encoder_attention_mask"].long(), neg_mask)
    prompts = ["a red cat", "a blue dog"]
    ours = method.sample(2, 1, torch.Generator().manual_seed(3), prompts=prompts)
    pipe = SanaPipeline.from_pretrained(root / "student")
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(pipeline_latents(pipe, prompts, 1, 3), ours, rtol=0, atol=1e-5)


def test_sana_folders_and_teacher_are_scored_through_sana_pipeline(tiny_sana_dir, captioned, cd_run, tmp_path):
    """evaluate scores a SANA teacher from prompts and SanaPipeline folders through the stock SanaPipeline: the
    teacher and its own folder draw the same images; the consistency preset's export (FlowMatchLCMScheduler, 2
    steps) scores as SanaPipeline's own images for the same generators and prompts."""
    from diffusers import SanaPipeline

    from lightning_distill import evaluate
    from lightning_distill.feature_net import save_feature_net
    from lightning_distill.metrics import (
        chunk_bounds, chunk_seed, decode_latents, fd_from_features, pipeline_sample, sample_text_teacher,
    )
    from test_evaluate_sd import PROMPTS as EVAL_PROMPTS, feature_net, prompt_file

    prompts, feat = prompt_file(tmp_path), save_feature_net(feature_net(IMAGE_SIZE), tmp_path / "feat")
    root, _ = cd_run
    args = ["--prompts", str(prompts), "--data", str(captioned), "--image-size", str(IMAGE_SIZE), "--channels", "3",
            "--num-samples", "6", "--seed", "3", "--chunk-size", "4", "--kid-subsets", "2", "--kid-subset-size", "4",
            "--feature-net", str(feat), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    rows = evaluate.main(["--teacher", str(tiny_sana_dir), "--student", f"own={tiny_sana_dir}", "--student",
                          f"cd={root / 'student'}", "--steps", "2", "--teacher-steps", "2", *args, "--out",
                          str(tmp_path / "report")])
    fd = {(r["model"], r["steps"]): r["fd"] for r in rows if r["kind"] != "data"}
    assert set(fd) == {("teacher", 2), ("own", 2), ("cd", 2)} and all(math.isfinite(v) for v in fd.values())
    assert fd[("own", 2)] == fd[("teacher", 2)]
    md = (tmp_path / "report" / "results.md").read_text()
    assert "text-to-image (SanaTransformer2DModel), guidance scale 1" in md

    net = feature_net(IMAGE_SIZE)
    ref = net(evaluate.reference_images(str(captioned), IMAGE_SIZE, "train", 0, 0.1, 3)[0]).double()
    pipe = SanaPipeline.from_pretrained(root / "student")
    pipe.set_progress_bar_config(disable=True)
    feats = []
    with torch.no_grad():
        for c, (a, b) in enumerate(chunk_bounds(6, 4)):
            z = pipeline_latents(pipe, [EVAL_PROMPTS[i % len(EVAL_PROMPTS)] for i in range(a, b)], 2, chunk_seed(3, c))
            feats.append(net(pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample).double())
    assert fd[("cd", 2)] == pytest.approx(fd_from_features(torch.cat(feats), ref), rel=1e-6)

    # the teacher guided at g (evaluate's --guidance-scale, the negative prompt "") draws SanaPipeline's own guided
    # images: its classifier-free guidance, on the same latents and grid
    teacher = load_teacher(str(tiny_sana_dir))
    pipe = SanaPipeline.from_pretrained(tiny_sana_dir)
    pipe.set_progress_bar_config(disable=True)
    ours = sample_text_teacher(teacher, EVAL_PROMPTS[:2], 2, torch.Generator().manual_seed(4), 4.5)
    theirs = decode_latents(pipeline_sample(pipe, EVAL_PROMPTS[:2], 2, torch.Generator().manual_seed(4), 4.5), pipe.vae)
    plain = sample_text_teacher(teacher, EVAL_PROMPTS[:2], 2, torch.Generator().manual_seed(4), 1.0)
    assert torch.equal(ours, theirs) and (plain - ours).abs().max() > 1e-3
