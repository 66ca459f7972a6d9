"""Evaluation on non-UNet backbones: ``evaluate`` / ``metrics.scheduler_sample`` / ``sample_teacher``, the FID
callback and DistillationReport on class-conditional DiTs (pixel space, and latent exported as DiTPipeline).

Every FD checked here is recomputed by hand: the DiT is sampled the way ``DiTPipeline.__call__`` calls it
(``randn_tensor`` noise, ``scale_model_input``, the timestep expanded to the batch, ``class_labels``, the
first C channels of a learned-sigma output, ``scheduler.step``; a latent model decoded as DiTPipeline
decodes, without its final clamp), with the evaluate protocol's chunks (chunk c from ``chunk_seed(seed, c)``)
and balanced labels (image i gets class i % num_classes), features taken with the feature network
directly, FD from the features. Tiny random models (one DiT block, 8x8); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from lightning_distill import backbones
from lightning_distill.feature_net import save_feature_net
from lightning_distill.metrics import chunk_bounds, chunk_seed, fd_from_features, scheduler_sample

from conftest import make_tiny_unet
from test_backbones import tiny_dit, write_tiny_dit_teacher, write_tiny_latent_dit_teacher
from test_evaluate import tiny_net
from test_fid_callback import np_fd

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
H = 8


@torch.no_grad()
def dit_pipeline_loop(transformer, scheduler, n, steps, generator, labels, step_generator=False):
    """DiTPipeline.__call__'s loop at guidance_scale 1, up to the latents (model space).

    ``step_generator``: pass the generator to ``scheduler.step`` as DDPMPipeline (and every sampler of
    this framework) does; DiTPipeline passes none, which only matters for a stochastic step (multi-step LCM).
    """
    c, s = transformer.config.in_channels, transformer.config.sample_size
    latents = randn_tensor((n, c, s, s), generator=generator, device=torch.device("cpu"), dtype=transformer.dtype)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        latents = scheduler.scale_model_input(latents, t)
        timesteps = t[None].expand(latents.shape[0])
        noise_pred = transformer(latents, timestep=timesteps, class_labels=labels).sample
        if transformer.config.out_channels // 2 == c:
            model_output, _ = torch.split(noise_pred, c, dim=1)
        else:
            model_output = noise_pred
        kw = {"generator": generator} if step_generator else {}
        latents = scheduler.step(model_output, t, latents, **kw).prev_sample
    return latents


def dit_decode(vae, latents):
    """DiTPipeline's decode, before its (x / 2 + 0.5).clamp(0, 1): images in [-1, 1] model space."""
    return latents if vae is None else vae.decode(1 / vae.config.scaling_factor * latents).sample


@torch.no_grad()
def hand_features(sample_fn, net, n, seed, chunk_size, num_classes):
    """The evaluate protocol by hand: chunk c from chunk_seed(seed, c), labels i % num_classes."""
    feats = []
    for c, (a, b) in enumerate(chunk_bounds(n, chunk_size)):
        g = torch.Generator().manual_seed(chunk_seed(seed, c))
        labels = torch.arange(a, b) % num_classes
        feats.append(net(sample_fn(b - a, g, labels)).double())
    return torch.cat(feats)


def teacher_ddim(folder: Path, clip: bool) -> DDIMScheduler:
    """The teacher's deterministic DDIM as evaluate documents it: eta 0, trailing, last step onto x0,
    clipping for pixel teachers."""
    cfg = dict(DDIMScheduler.load_config(folder, subfolder="scheduler"))
    cfg.update(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=clip, clip_sample_range=1.0)
    return DDIMScheduler.from_config(cfg)


def reference_features(net, image_size=H):
    from lightning_distill.evaluate import reference_images

    train, _ = reference_images("digits", image_size, "train", 0, 0.1, None)
    return batched_features(net, train)


@torch.no_grad()
def batched_features(net, images, batch=500):
    """Features of real images in batches of 500, as the reference statistics take them."""
    return torch.cat([net(images[i : i + batch]).double() for i in range(0, len(images), batch)])


def _common(tmp_path, net):
    return dict(num_samples=10, seed=5, chunk_size=4, kid_subsets=2, kid_subset_size=4, device="cpu",
                feature_net=save_feature_net(net, tmp_path / "feat"), cache_dir=tmp_path / "cache",
                real_baseline=False, log=lambda msg: None)


def _check_fd(got: float, fake: torch.Tensor, real: torch.Tensor, exact: bool = True) -> None:
    if exact:
        assert got == fd_from_features(fake, real)  # the same features: the same number, exactly
    assert got == pytest.approx(np_fd(real.numpy(), fake.numpy()), rel=1e-6, abs=1e-9)  # and a numpy FD


# --- pixel-space DiT ----------------------------------------------------------------------------


def test_evaluate_pixel_dit_teacher_and_folders_equal_dit_pipeline_sampling_by_hand(tmp_path):
    from lightning_distill.evaluate import evaluate_models
    from lightning_distill.export import export_pipeline

    folder = write_tiny_dit_teacher(tmp_path / "dit")
    # a student exported by the framework (a pixel DiT stays a DDPMPipeline folder holding the transformer)
    student = tiny_dit()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    exported = export_pipeline(student, DDIMScheduler.from_pretrained(folder, subfolder="scheduler"), tmp_path / "exp")
    assert json.loads((exported / "model_index.json").read_text())["unet"][1] == "DiTTransformer2DModel"
    net = tiny_net()
    rows = evaluate_models(
        str(folder), {"exported": exported, "folder": folder},  # the teacher folder itself: DiTPipeline, no vae/
        steps=[1, 2], teacher_steps=[1, 3], out_dir=tmp_path / "report", **_common(tmp_path, net),
    )
    by = {(r["model"], r["steps"]): r["fd"] for r in rows}
    assert set(by) == {("teacher", 1), ("teacher", 3), ("exported", 1), ("exported", 2), ("folder", 1), ("folder", 2)}
    assert (tmp_path / "report" / "samples_exported.png").is_file()

    real = reference_features(net)
    teacher_net = tiny_dit().eval()
    for name, model, steps, sched in (
        ("teacher", teacher_net, (1, 3), lambda: teacher_ddim(folder, clip=True)),
        ("exported", student.eval(), (1, 2), lambda: DDIMScheduler.from_pretrained(exported, subfolder="scheduler")),
        ("folder", teacher_net, (1, 2), lambda: DDIMScheduler.from_pretrained(folder, subfolder="scheduler")),
    ):
        for s in steps:
            fake = hand_features(lambda n, g, y: dit_pipeline_loop(model, sched(), n, s, g, y), net, 10, 5, 4, 10)
            _check_fd(by[(name, s)], fake, real)
    # the folder's own scheduler already is the teacher's DDIM (trailing, last step onto x0, clipped): the
    # teacher route and the folder route agree; the perturbed export is another model
    assert by[("teacher", 1)] == by[("folder", 1)] and by[("exported", 1)] != by[("teacher", 1)]


def test_scheduler_sample_and_sample_teacher_on_a_dit(tmp_path):
    from lightning_distill.metrics import sample_teacher
    from lightning_distill.teacher import load_teacher

    folder = write_tiny_dit_teacher(tmp_path / "dit")
    teacher = load_teacher(str(folder))
    labels = torch.tensor([0, 3, 9])
    for steps in (1, 2):
        g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
        ours = sample_teacher(teacher, 3, steps, g(), labels)
        want = dit_pipeline_loop(tiny_dit().eval(), teacher_ddim(folder, clip=True), 3, steps, g(), labels)
        torch.testing.assert_close(ours, want, rtol=0, atol=0)
        # the Denoiser's sampler (the training-time path) draws the same images
        sched = teacher_ddim(folder, clip=True)
        x = randn_tensor((3, 1, H, H), generator=g())
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            x = sched.step(teacher.denoiser.network(x, t, class_labels=labels).float(), t, x).prev_sample
        torch.testing.assert_close(ours, x, rtol=0, atol=0)
    # a DiT without labels is refused in one line, naming the labels it takes
    with pytest.raises(ValueError, match="class-conditional: pass class_labels"):
        scheduler_sample(teacher.unet, teacher_ddim(folder, clip=True), 2, 1, torch.Generator().manual_seed(0))


def test_scheduler_sample_unet_call_is_unchanged():
    """A UNet is still called model(x, t, class_labels=...) with the scalar timestep (DDPMPipeline's call)."""
    unet = make_tiny_unet(8, num_class_embeds=4).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    labels = torch.tensor([0, 1, 3])
    ours = scheduler_sample(unet, sched, 3, 2, torch.Generator().manual_seed(2), labels)
    g = torch.Generator().manual_seed(2)
    x = randn_tensor((3, 1, 8, 8), generator=g)
    sched.set_timesteps(2)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t, class_labels=labels).sample, t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=0)


def test_scheduler_sample_refuses_a_text_conditional_network():
    from lightning_distill.errors import ConfigError

    from test_backbones import tiny_sd3

    with pytest.raises(ConfigError, match="SD3Transformer2DModel is text-conditional"):
        scheduler_sample(tiny_sd3(), DDIMScheduler(), 1, 1)


# --- latent DiT, exported as DiTPipeline -------------------------------------------------------------


def test_evaluate_latent_dit_teacher_and_dit_pipeline_folder(tmp_path):
    from diffusers import DiffusionPipeline, DiTPipeline

    from lightning_distill.evaluate import evaluate_models

    folder = write_tiny_latent_dit_teacher(tmp_path / "dit")
    net = tiny_net()
    rows = evaluate_models(str(folder), {"pipe": folder}, steps=[2], teacher_steps=[1, 2], image_size=H,
                           **_common(tmp_path, net))
    by = {(r["model"], r["steps"]): r["fd"] for r in rows}
    assert set(by) == {("teacher", 1), ("teacher", 2), ("pipe", 2)}

    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe, DiTPipeline)
    real = reference_features(net)
    for name, s, sched in (("teacher", 1, lambda: teacher_ddim(folder, clip=False)),
                           ("teacher", 2, lambda: teacher_ddim(folder, clip=False)),
                           ("pipe", 2, lambda: pipe.scheduler)):
        def sample(n, g, y, s=s, sched=sched):
            return dit_decode(pipe.vae, dit_pipeline_loop(pipe.transformer, sched(), n, s, g, y))

        with torch.no_grad():
            fake = hand_features(sample, net, 10, 5, 4, 10)
        # DiTPipeline decodes 1 / scaling_factor * z, evaluate z / scaling_factor: equal up to round-off
        _check_fd(by[(name, s)], fake, real, exact=False)
    # the hand loop is DiTPipeline's: its own images (clamped to [0, 1]) are ours
    with torch.no_grad():
        ours = dit_decode(pipe.vae, dit_pipeline_loop(pipe.transformer, pipe.scheduler, 3, 2,
                                                      torch.Generator().manual_seed(4), torch.tensor([1, 2, 3])))
    theirs = pipe(class_labels=[1, 2, 3], guidance_scale=1.0, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(4), output_type="pt").images
    torch.testing.assert_close(theirs, (ours / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)


# --- FID callback and DistillationReport on a DiT student ---------------------------------------------


def test_fid_callback_and_report_on_a_dit_student(tmp_path):
    """configs/consistency/debug.yaml on the tiny DiT teacher (class-conditional, 8x8) with FIDCallback (the
    teacher's FD too) and DistillationReport attached; the callback's FDs equal the DiTPipeline-way samples
    of the EMA copy (LCMScheduler, generator passed to step as DDPMPipeline does) and of the teacher (DDIM)."""
    from lightning_distill.callbacks.ema import EMA
    from lightning_distill.callbacks.fid import FIDCallback
    from lightning_distill.cli import cli_main

    from _method_configs import debug_config

    folder = write_tiny_dit_teacher(tmp_path / "dit")
    net = tiny_net()
    feat = save_feature_net(net, tmp_path / "feat")
    root = tmp_path / "run"
    cli = cli_main([
        "fit", "--config", str(debug_config("consistency")), "--data.teacher", str(folder),
        "--data.image_size", "8", "--data.class_conditional", "true",
        "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2",
        "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=lightning_distill.callbacks.fid.FIDCallback",
        "--trainer.callbacks.init_args.every_n_steps", "1", "--trainer.callbacks.init_args.num_samples", "10",
        "--trainer.callbacks.init_args.steps", "[1, 2]", "--trainer.callbacks.init_args.feature_net", str(feat),
        "--trainer.callbacks.init_args.log_teacher", "true", "--trainer.callbacks.init_args.chunk_size", "4",
        "--trainer.callbacks.init_args.kid_subsets", "2", "--trainer.callbacks.init_args.kid_subset_size", "4",
        "--trainer.callbacks.init_args.seed", "3", "--trainer.callbacks.init_args.cache_dir", str(tmp_path / "cache"),
        "--trainer.callbacks+=lightning_distill.callbacks.DistillationReport",
        "--trainer.callbacks.init_args.out_dir", str(root / "report"),
        "--trainer.callbacks.init_args.num_samples", "8", "--trainer.callbacks.init_args.steps", "[1]",
        "--trainer.callbacks.init_args.teacher_steps", "[1, 2]", "--trainer.callbacks.init_args.feature_net", str(feat),
    ])
    model, trainer = cli.model, cli.trainer
    assert trainer.global_step == 2 and type(model.student.unet).__name__ == "DiTTransformer2DModel"
    assert model.num_classes == 10
    fid = next(cb for cb in trainer.callbacks if isinstance(cb, FIDCallback))
    ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
    assert fid.last_eval_step == 2
    dit = ema.sampling_module(model).unet.eval()  # the EMA copy the callback samples
    assert any(not torch.equal(p, q) for p, q in zip(dit.parameters(), model.student.unet.parameters()))
    real = batched_features(net, trainer.datamodule.train_images())
    for s in (1, 2):
        def student(n, g, y, s=s):
            sched = model.sampling_scheduler(s)
            return dit_pipeline_loop(dit, sched, n, s, g, y, step_generator=True)

        def teacher(n, g, y, s=s):
            return dit_pipeline_loop(tiny_dit().eval(), teacher_ddim(folder, clip=True), n, s, g, y)

        for key, fn in ((f"fid/digits-feat/{s}step/n10", student), (f"fid/digits-feat/{s}step/n10/teacher", teacher)):
            _check_fd(fid.last_metrics[key], hand_features(fn, net, 10, 3, 4, 10), real)
    # the report scored the exported DiT (a DDPMPipeline folder holding the transformer) and the teacher
    rows = (root / "report" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 1 + 2 + 1  # header, real held-out, teacher x2, student x1
    assert all(np.isfinite(float(r.split(",")[3])) for r in rows[1:])
    assert json.loads((root / "student" / "model_index.json").read_text())["unet"][1] == "DiTTransformer2DModel"

    # evaluate on that run's checkpoint (EMA weights, model.sample through the Denoiser) and its export (the
    # same weights, scheduler_sample through the adapter): the same images, the same FD
    from lightning_distill.evaluate import evaluate_models

    ckpt = root / "checkpoints" / "last.ckpt"
    rows = evaluate_models(str(folder), {"ckpt": ckpt, "pipe": root / "student"}, steps=[1, 2], teacher_steps=[],
                           **_common(tmp_path, net))
    by = {(r["model"], r["steps"]): r["fd"] for r in rows}
    assert set(by) == {("ckpt", 1), ("ckpt", 2), ("pipe", 1), ("pipe", 2)}
    for s in (1, 2):
        assert by[("ckpt", s)] == pytest.approx(by[("pipe", s)], rel=1e-5)
