"""Adversarial methods on transformer teachers (#23): discriminator features read from transformer blocks
(gan/features.py TransformerFeatures, bottleneck_block), checked against the blocks run by hand on a DiT and
an SD3 MMDiT; ADD, APT and DMD2 (gan=true) debug presets on the tiny SD3 stack of tests/_sd3.py, each export
(StableDiffusion3Pipeline) reproducing sample() for the same generator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _sd3 import IMAGE_SIZE, PROJECTION_DIMS
from lightning_distill.errors import ConfigError
from lightning_distill.gan import TransformerFeatures, bottleneck_block, bottleneck_features
from test_backbones import tiny_dit, tiny_sd3
from test_sd3 import assert_export_reproduces, sd3_captioned, tiny_sd3_dir  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]


def _as_map(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, N, C) -> (B, C, side, side) by hand, token k = patch (k // side, k % side) as DiT's unpatchify reads it."""
    b, n, c = tokens.shape
    return torch.stack([tokens[:, r * side + q] for r in range(side) for q in range(side)], -1).reshape(b, c, side, side)


def test_transformer_features_equal_the_blocks_run_by_hand():
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 500])
    # DiT: pos_embed, then each block with timestep and class labels (DiTTransformer2DModel.forward)
    dit, labels = tiny_dit(), torch.tensor([1, 7])
    with torch.no_grad():
        h = dit.pos_embed(x)
        ref = dit.transformer_blocks[0](h, timestep=t, class_labels=labels)
        (got,) = TransformerFeatures(dit, [-1])(x, t, class_labels=labels)
    torch.testing.assert_close(got, _as_map(ref, 4), rtol=0, atol=0)
    assert bottleneck_block(dit) == ("transformer_blocks.0", 8)
    torch.testing.assert_close(bottleneck_features(dit, x, t, class_labels=labels), got, rtol=0, atol=0)
    # SD3: the image stream (second output) of the joint block, not the text stream
    sd3, x4, ts = tiny_sd3(), torch.randn(2, 4, 8, 8), torch.tensor([900.0, 30.0])
    ehs, pooled = torch.randn(2, 5, 16), torch.randn(2, 8)
    with torch.no_grad():
        temb = sd3.time_text_embed(ts, pooled)
        _, ref = sd3.transformer_blocks[0](sd3.pos_embed(x4), sd3.context_embedder(ehs), temb)
        (got,) = TransformerFeatures(sd3)(x4, ts, encoder_hidden_states=ehs, pooled_projections=pooled)
    torch.testing.assert_close(got, _as_map(ref, 4), rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"feature levels \[3\] invalid; choose block indices 0 .. 0"):
        TransformerFeatures(sd3, [3])


def _run(preset: str, teacher: Path, data: Path, root: Path):
    from lightning_distill.cli import cli_main

    return cli_main(["fit", "--config", str(ROOT / preset), "--data.teacher", str(teacher), "--data.data", str(data),
                     "--trainer.default_root_dir", str(root), "--trainer.enable_model_summary", "false"])


def _prompt_changes_logits(method, batch) -> bool:
    """D's logits on the same images differ between the batch's prompts and the "" prompt."""
    x, labels = batch["x"], None
    cond = method.text_cond(batch)
    empty = {k: v.expand(x.shape[0], *v.shape[1:]) for k, v in method.uncond_text_cond().items()}
    with torch.no_grad():
        a = method.discriminate(x, labels, torch.Generator().manual_seed(1), cond)(x)
        b = method.discriminate(x, labels, torch.Generator().manual_seed(1), empty)(x)
    return a.shape[0] == x.shape[0] and not torch.allclose(a, b)


def test_sd3_add_debug_preset_distils_and_exports(tiny_sd3_dir, sd3_captioned, tmp_path):  # noqa: F811
    root = tmp_path / "add_sd3"
    cli = _run("configs/add/debug_sd3.yaml", tiny_sd3_dir, sd3_captioned, root)
    method = cli.model
    assert method.text_conditional and cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/g_adv"])
    assert torch.isfinite(cli.trainer.callback_metrics["train/distill"])
    d = method.discriminator
    # the frozen teacher transformer itself (not a registered copy), both blocks, pooled-text projection heads
    assert isinstance(d.backbone, TransformerFeatures) and d.backbone.network is method.teacher.unet
    assert not any(k.startswith("discriminator.backbone") for k in method.state_dict())
    assert d.backbone.names == ["transformer_blocks.0", "transformer_blocks.1"] and d.heads.cond_dim == sum(PROJECTION_DIMS)
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert set(method.generate(batch, torch.Generator().manual_seed(0)).cond) == {"encoder_hidden_states", "pooled_projections"}
    assert _prompt_changes_logits(method, batch)
    assert_export_reproduces(method, root / "student", steps=2, seed=5)


def test_sd3_apt_debug_preset_distils_and_exports(tiny_sd3_dir, sd3_captioned, tmp_path):  # noqa: F811
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    root = tmp_path / "apt_sd3"
    cli = _run("configs/apt/debug_sd3.yaml", tiny_sd3_dir, sd3_captioned, root)
    method = cli.model
    assert method.text_conditional and cli.trainer.global_step == 3
    d = method.discriminator
    # a trained copy of the teacher transformer: registered, and moved away from the teacher by training
    assert isinstance(d.backbone, TransformerFeatures) and d.backbone.network is not method.teacher.unet
    teacher = method.teacher.unet.state_dict()
    assert any(not torch.equal(v, teacher[k]) for k, v in d.backbone.network.state_dict().items())
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert _prompt_changes_logits(method, batch)
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "student", text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    prompts = ["a red cat", "a blue dog"]
    # one deterministic step (x0 = z - u): the pipeline reproduces sample() with no global-RNG help
    ours = method.sample(2, 1, torch.Generator().manual_seed(4), prompts=prompts)
    theirs = pipe(prompts, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=1, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(4), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_sd3_dmd2_gan_debug_preset_distils_and_exports(tiny_sd3_dir, sd3_captioned, tmp_path):  # noqa: F811
    root = tmp_path / "dmd2_gan_sd3"
    cli = _run("configs/dmd2/debug_sd3_gan.yaml", tiny_sd3_dir, sd3_captioned, root)
    method = cli.model
    assert method.text_conditional and cli.trainer.global_step == 4
    assert torch.isfinite(cli.trainer.callback_metrics["train/d_gan"]) and torch.isfinite(cli.trainer.callback_metrics["train/g_gan"])
    fake = method.fake_score.unet
    assert bottleneck_block(fake) == ("transformer_blocks.1", 16)
    # the head reads the fake score's last (middle of 2) block, image tokens as a 4x4 map, given the prompt
    batch = next(iter(cli.datamodule.train_dataloader()))
    cond = method.text_cond(batch)
    x, t, noise = batch["x"], torch.full((4,), 200), torch.randn_like(batch["x"])
    with torch.no_grad():
        logits = method.discriminator_logits(x, t, noise, **cond)
        x_t = method.fake_score.schedule.add_noise(x, noise, t)
        model_t = method.fake_score.schedule.model_timestep(t)
        temb = fake.time_text_embed(model_t, cond["pooled_projections"])
        h, c = fake.pos_embed(x_t), fake.context_embedder(cond["encoder_hidden_states"])
        c, h = fake.transformer_blocks[0](h, c, temb)
        _, h = fake.transformer_blocks[1](h, c, temb)
        ref = method.discriminator_head(_as_map(h, 4))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)
    assert_export_reproduces(method, root / "student", steps=1, seed=3)
