"""DMD2: the distribution-matching gradient against Gaussian closed forms, the update ratio, resume, CLI.

Closed form: for Gaussian data x0 ~ N(mu, s^2 I) and x_t = alpha x0 + sigma eps, the marginal is
x_t ~ N(alpha mu, (alpha^2 s^2 + sigma^2) I), its score is score(x_t) = -(x_t - alpha mu) / (alpha^2 s^2
+ sigma^2), and Tweedie's formula gives the ideal denoiser E[x0 | x_t] = (x_t + sigma^2 score(x_t)) / alpha.
So with two Gaussians (real and fake), p_real - p_fake = D_fake - D_real = sigma^2 (score_fake -
score_real) / alpha, a route independent of the posterior-mean formula the analytic modules implement.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_distill.data import TeacherDataModule, TensorImageDataset
from lightning_distill.gan import BottleneckClassifier, StepPlan, bottleneck_features
from lightning_distill.methods.adversarial import frozen
from lightning_distill.methods.dmd2 import DMD2, distribution_matching_loss, dm_gradient, dm_surrogate_loss
from lightning_distill.sampling import backward_simulation, generator_timesteps
from lightning_distill.parametrisation import Denoiser, VPSchedule, output_for

REPO = Path(__file__).resolve().parents[1]


def _schedule(T: int = 1024) -> VPSchedule:
    from diffusers import DDIMScheduler

    return VPSchedule.from_scheduler(DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2"))


class GaussianUNet(nn.Module):
    """The ideal denoiser of N(mu, s^2 I) data with a UNet's call signature, outputting ``kind``."""

    def __init__(self, mu: float, s: float, schedule: VPSchedule, kind: str) -> None:
        super().__init__()
        self.mu, self.s, self.schedule, self.kind = mu, s, schedule, kind

    def forward(self, x_t, t, return_dict=False, **_):
        a = self.schedule.alpha(t).view(-1, 1, 1, 1).double()
        sg = self.schedule.sigma(t).view(-1, 1, 1, 1).double()
        x_t64 = x_t.double()
        x0 = self.mu + a * self.s**2 / (a**2 * self.s**2 + sg**2) * (x_t64 - a * self.mu)
        out = output_for(self.kind, x0, x_t64, a.flatten(), sg.flatten())
        return (out.to(x_t.dtype),)


def _gaussian_denoiser(mu, s, schedule, kind):
    return Denoiser(GaussianUNet(mu, s, schedule, kind), schedule, kind, clip_x0=None)


def _score(x_t, a, sg, mu, s):
    return -(x_t - a * mu) / (a**2 * s**2 + sg**2)


def _closed_form_grad(x, t, noise, schedule, real, fake):
    (mu_r, s_r), (mu_f, s_f) = real, fake
    a = schedule.alpha(t).view(-1, 1, 1, 1).double()
    sg = schedule.sigma(t).view(-1, 1, 1, 1).double()
    x, noise = x.double(), noise.double()
    x_t = a * x + sg * noise
    score_r, score_f = _score(x_t, a, sg, mu_r, s_r), _score(x_t, a, sg, mu_f, s_f)
    d_real = (x_t + sg**2 * score_r) / a  # Tweedie
    diff = sg**2 * (score_f - score_r) / a
    weight = (x - d_real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    return (diff / weight).float()


# --- maths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sample", "epsilon", "v_prediction"])
def test_dm_gradient_matches_gaussian_closed_form(kind):
    sched = _schedule()
    g = torch.Generator().manual_seed(0)
    real, fake = (0.3, 0.5), (-0.4, 0.8)
    x = torch.randn(6, 2, 3, 3, generator=g) * 0.7 + 0.1
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([20, 100, 300, 500, 700, 1000])
    expected = _closed_form_grad(x, t, noise, sched, real, fake)

    d_real, d_fake = _gaussian_denoiser(*real, sched, kind), _gaussian_denoiser(*fake, sched, kind)
    x_t = sched.add_noise(x, noise, t)
    grad = dm_gradient(x, d_real(x_t, t).x0, d_fake(x_t, t).x0)
    torch.testing.assert_close(grad, expected, atol=1e-3, rtol=1e-3)

    # The surrogate's autograd gradient is that same grad (scaled by 1 / numel for "mean").
    for reduction, scale in (("sum", 1.0), ("mean", 1.0 / x.numel())):
        xx = x.clone().requires_grad_(True)
        out = distribution_matching_loss(xx, d_real, d_fake, t, noise, reduction=reduction)
        out.loss.backward()
        torch.testing.assert_close(xx.grad, expected * scale, atol=1e-3 * scale, rtol=1e-3)


def test_dm_gradient_is_unclamped_by_default_on_a_clamping_pixel_teacher():
    """Scores that clamp x0 at 1 (the bundled VP teacher's clip_sample): generator samples beyond the data range
    (at 1.6, real data near 0.9) get the closed-form gradient back into range by default, as in DMD2's code;
    with clip=True (dm_clip_x0, the measured VP presets) both clamped estimates sit at 1 and the gradient
    nearly vanishes."""
    sched = _schedule()
    g = torch.Generator().manual_seed(2)
    real, fake = (0.9, 0.1), (1.6, 0.1)
    d_real = Denoiser(GaussianUNet(*real, sched, "sample"), sched, "sample", clip_x0=1.0)
    d_fake = Denoiser(GaussianUNet(*fake, sched, "sample"), sched, "sample", clip_x0=1.0)
    x = torch.full((8, 1, 4, 4), 1.6)
    noise = torch.randn(x.shape, generator=g)
    t = torch.full((8,), 100)
    expected = _closed_form_grad(x, t, noise, sched, real, fake)
    grads = {}
    for clip in (False, True):
        xx = x.clone().requires_grad_(True)
        kwargs = {"clip": True} if clip else {}  # the default is unclamped
        distribution_matching_loss(xx, d_real, d_fake, t, noise, reduction="sum", **kwargs).loss.backward()
        grads[clip] = xx.grad
    torch.testing.assert_close(grads[False], expected, atol=1e-3, rtol=1e-3)
    assert grads[False].mean() > 0.5 and grads[True].abs().mean() < 0.1 * grads[False].mean()


def test_dm_gradient_sign_and_fixed_point():
    """Descent moves samples of the fake Gaussian towards the real mean; equal distributions give 0."""
    sched = _schedule()
    g = torch.Generator().manual_seed(1)
    d_real = _gaussian_denoiser(0.5, 0.3, sched, "sample")
    d_fake = _gaussian_denoiser(-0.5, 0.3, sched, "sample")
    x = torch.randn(64, 1, 4, 4, generator=g) * 0.3 - 0.5
    t = torch.full((64,), 400)
    x_t = sched.add_noise(x, torch.randn(x.shape, generator=g), t)
    grad = dm_gradient(x, d_real(x_t, t).x0, d_fake(x_t, t).x0)
    assert (x - 0.1 * grad).mean() > x.mean() + 0.01
    same = dm_gradient(x, d_real(x_t, t).x0, d_real(x_t, t).x0)
    assert same.abs().max() == 0


def test_dm_gradient_guards_zero_denominator_and_surrogate_reduction():
    x = torch.randn(2, 1, 2, 2)
    grad = dm_gradient(x, x, x + 1.0)  # p_real = 0: the normaliser would be 0
    assert torch.isfinite(grad).all()
    xx = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    dm_surrogate_loss(xx, g, "sum").backward()
    torch.testing.assert_close(xx.grad, g)
    with pytest.raises(ValueError, match="reduction"):
        dm_surrogate_loss(xx, g, "max")


def test_generator_timesteps_and_backward_simulation():
    sched = _schedule()
    assert generator_timesteps(sched, 1).tolist() == [1023]
    assert generator_timesteps(sched, 4).tolist() == [1023, 767, 511, 255]
    den = _gaussian_denoiser(0.2, 0.5, sched, "v_prediction")
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    grid = generator_timesteps(sched, 4)
    assert torch.equal(backward_simulation(den, z, grid, 0), z)
    # two steps by hand: x0 estimate at 1023, fresh noise to 767, x0 estimate there, fresh noise to 511
    rng = torch.Generator().manual_seed(5)
    e1, e2 = torch.randn(z.shape, generator=rng), torch.randn(z.shape, generator=rng)
    x1 = sched.add_noise(den(z, grid[0]).x0, e1, grid[1].expand(3))
    want = sched.add_noise(den(x1, grid[1]).x0, e2, grid[2].expand(3))
    got = backward_simulation(den, z, grid, 2, rng=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want)
    # not DDIM: the deterministic step would re-use the x0 estimate's own noise
    assert not torch.allclose(got, den.ddim(den.ddim(z, grid[0], grid[1]), grid[1], grid[2]), atol=1e-3)


def test_bottleneck_features_stop_at_mid_block(tiny_teacher_dir):
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(tiny_teacher_dir, subfolder="unet")
    calls = []
    unet.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    feats = bottleneck_features(unet, torch.randn(2, 1, 8, 8), torch.tensor([5, 500]))
    assert feats.shape == (2, unet.config.block_out_channels[-1], 4, 4)
    assert not calls  # the decoder never ran
    assert BottleneckClassifier(feats.shape[1])(feats).shape == (2,)


# --- the LightningModule -------------------------------------------------------------------------


def _model(teacher_dir, seed=0, **kwargs):
    torch.manual_seed(seed)
    dm = TeacherDataModule(teacher=str(teacher_dir), image_size=8, batch_size=2)
    kwargs.setdefault("generator_every", 3)
    return DMD2(teacher=dm.teacher, **kwargs)


def _loader(n=4, batch=2):
    # Every batch holds the same images: Lightning replays an interrupted epoch's batches in another
    # order on resume (its data-loader position is not restored), which must not be what is tested.
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 1, 8, 8, generator=g) * 2 - 1).repeat(n // batch, 1, 1, 1)
    return DataLoader(TensorImageDataset(images, torch.zeros(n, dtype=torch.long)), batch_size=batch, shuffle=False)


def _trainer(tmp_path, max_steps, **kwargs):
    return L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        accelerator="cpu",
        **kwargs,
    )


def test_multistep_sampler_feeds_the_backward_simulated_inputs(tiny_teacher_dir):
    """The exported sampler of a K-step generator visits its grid and, step by step, gives the network
    exactly the inputs backward simulation trains it on (same noise draws)."""
    from diffusers.utils.torch_utils import randn_tensor

    model = _model(tiny_teacher_dir, generator_steps=2)
    with torch.no_grad():  # a generator different from the teacher
        for p in model.student.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = model.make_scheduler()
    sched.set_timesteps(2)
    grid = generator_timesteps(model.student.schedule, 2)
    assert sched.timesteps.tolist() == grid.tolist() == [1023, 511]
    got = model.sample(5, 2, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    z = randn_tensor((5, *model.sample_shape), generator=g)
    with torch.no_grad():
        x1 = backward_simulation(model.student, z, grid, 1, rng=g)
        want = model.student(x1, grid[1]).x0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_generator_step_leaves_critic_gradients_empty(tiny_teacher_dir):
    model = _model(tiny_teacher_dir)
    batch = next(iter(_loader()))
    # as the adversarial loop's generator update does: every critic network frozen around loss and backward
    with frozen(model.critic_parameters()):
        model.generator_loss(batch, model.step_generator(0)).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    for module in (model.fake_score, model.discriminator_head, model.teacher):
        assert all(p.grad is None for p in module.parameters())


def test_gan_inputs_are_noised_within_gan_t_range(tiny_teacher_dir):
    """gan_t_range bounds the noise level of every GAN input: the D loss's real and fake, the G loss's fake."""
    model = _model(tiny_teacher_dir, gan_t_range=(0.1, 0.25))
    seen = []
    original = model.discriminator_logits

    def spy(x, t, noise, *args, **kwargs):
        seen.append(t.clone())
        return original(x, t, noise, *args, **kwargs)

    model.discriminator_logits = spy
    batch = next(iter(_loader()))
    model.critic_loss(batch, model.step_generator(0), StepPlan())
    model.generator_loss(batch, model.step_generator(1))
    t = torch.cat(seen)
    assert len(seen) == 3 and int(t.min()) >= int(0.1 * 1024) and int(t.max()) < int(0.25 * 1024)
    with pytest.raises(ValueError, match="gan_t_range"):
        _model(tiny_teacher_dir, gan_t_range=(0.5, 0.5))



def test_generator_lr_schedule_steps_once_per_generator_update(tiny_teacher_dir, tmp_path):
    model = _model(tiny_teacher_dir, generator_every=3, gan=False,
                   lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    trainer = _trainer(tmp_path, max_steps=7, enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=_loader())
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == math.ceil(7 / 3)  # generator updates at iterations 0, 3, 6
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4 * 0.5 ** 3)  # the generator's
    assert trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(1e-4)  # the fake score's, untouched


def test_critic_warmup_delays_the_generator(tiny_teacher_dir, tmp_path):
    model = _model(tiny_teacher_dir, generator_every=3, critic_warmup=2, gan=False)
    trainer = _trainer(tmp_path, max_steps=7, enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=_loader())
    steps = [int(next(iter(opt.state.values()))["step"]) for opt in trainer.optimizers]
    assert steps == [2, 7]  # generator updates at iterations 2 and 5; the fake score every iteration
    with pytest.raises(ValueError, match="critic_warmup"):
        _model(tiny_teacher_dir, critic_warmup=-1)


def test_discriminator_schedule_plugs_in(tiny_teacher_dir, tmp_path):
    from lightning_distill.callbacks.discriminator import DiscriminatorSchedule

    model = _model(tiny_teacher_dir, r1_weight=1.0)
    schedule = DiscriminatorSchedule(d_warmup_steps=1, d_updates_per_g=2)
    trainer = _trainer(tmp_path, max_steps=3, enable_checkpointing=False, callbacks=[schedule])
    trainer.fit(model, train_dataloaders=_loader())
    steps = [int(next(iter(opt.state.values()))["step"]) for opt in trainer.optimizers]
    # iteration 0 is D warm-up (no G); then 2 critic updates + 1 generator update per iteration
    assert steps == [2, 6, 6]
    assert trainer.global_step == schedule.iterations == 3
    assert (schedule.g_updates, schedule.d_updates) == (2, 6)
    assert "train/r1" in trainer.callback_metrics


def test_freezing_the_critic_is_refused(tiny_teacher_dir, tmp_path):
    from lightning_distill.callbacks.discriminator import DiscriminatorSchedule

    trainer = _trainer(tmp_path, max_steps=3, enable_checkpointing=False, callbacks=[DiscriminatorSchedule(freeze_d_after=2)])
    with pytest.raises(ValueError, match="freeze_d_after"):
        trainer.fit(_model(tiny_teacher_dir), train_dataloaders=_loader())


def test_resume_restores_every_network_and_optimiser(tiny_teacher_dir, tmp_path):
    # uninterrupted: 8 steps
    full = _model(tiny_teacher_dir, seed=0)
    full_trainer = _trainer(tmp_path / "full", max_steps=8, enable_checkpointing=False)
    full_trainer.fit(full, train_dataloaders=_loader())

    # killed after 4 steps, then resumed in a fresh Trainer
    first = _model(tiny_teacher_dir, seed=0)
    first_trainer = _trainer(tmp_path / "a", max_steps=4, enable_checkpointing=False)
    first_trainer.fit(first, train_dataloaders=_loader())
    ckpt = tmp_path / "mid.ckpt"
    first_trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert len(saved["optimizer_states"]) == 3
    assert int(saved["state_dict"]["gan_iteration"]) == 4
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])
    assert any(k.startswith("fake_score.") for k in saved["state_dict"])
    assert any(k.startswith("discriminator_head.") for k in saved["state_dict"])

    resumed = _model(tiny_teacher_dir, seed=123)  # another head initialisation ...
    with torch.no_grad():  # ... and every trainable weight moved: only the checkpoint can restore them
        for p in list(resumed.student.parameters()) + list(resumed.fake_score.parameters()):
            p.add_(0.01)
    resumed_trainer = _trainer(tmp_path / "b", max_steps=8, enable_checkpointing=False)
    resumed_trainer.fit(resumed, train_dataloaders=_loader(), ckpt_path=ckpt)

    assert resumed_trainer.global_step == full_trainer.global_step == 8
    for name in ("student", "fake_score", "discriminator_head"):
        a, b = getattr(full, name).state_dict(), getattr(resumed, name).state_dict()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=f"{name}.{key}")
    for opt_a, opt_b in zip(full_trainer.optimizers, resumed_trainer.optimizers):
        for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
            assert int(sa["step"]) == int(sb["step"])
            torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], atol=1e-9, rtol=1e-4)


# --- the CLI with the debug preset ---------------------------------------------------------------


@pytest.mark.parametrize("gan", ["true", "false"])
def test_debug_preset_runs_through_cli(tiny_teacher_dir, tmp_path, gan):
    from lightning_distill.cli import cli_main

    root = tmp_path / "run"
    cli_main(
        [
            "fit",
            "--config",
            str(REPO / "configs/dmd2/debug.yaml"),
            "--data.teacher",
            str(tiny_teacher_dir),
            "--data.image_size",
            "8",
            "--trainer.default_root_dir",
            str(root),
            "--model.init_args.gan",
            gan,
        ]
    )
    ckpt = torch.load(root / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert len(ckpt["optimizer_states"]) == (3 if gan == "true" else 2)
    assert (root / "student/model_index.json").is_file()
    # the export is a stock 1-step pipeline
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(root / "student")
    images = pipe(batch_size=1, num_inference_steps=1, output_type="np").images
    assert images.shape == (1, 8, 8, 1)


def test_generator_starts_from_a_trained_student(tiny_teacher_dir, tmp_path):
    """init_from: the generator takes an exported student's weights; the fake score stays the teacher's."""
    donor = _model(tiny_teacher_dir, seed=1)
    with torch.no_grad():
        for p in donor.student.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    donor.export(tmp_path / "donor")
    model = _model(tiny_teacher_dir, init_from=str(tmp_path / "donor"))
    for (name, p), q in zip(model.student.unet.named_parameters(), donor.student.unet.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    for p, q in zip(model.fake_score.unet.parameters(), model.teacher.unet.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _model(tiny_teacher_dir, init_from=str(tmp_path / "missing"))


def test_critic_r1_reuses_the_real_logits(tiny_teacher_dir):
    model = _model(tiny_teacher_dir, r1_weight=1.0)
    calls = []
    model.discriminator_head.register_forward_hook(lambda m, i, o: calls.append(1))
    batch = next(iter(_loader()))
    out = model.critic_loss(batch, torch.Generator().manual_seed(0), StepPlan()).loss  # r1_weight 1.0
    assert len(calls) == 3  # real, fake, perturbed real: the penalty shares the D loss's D(real)
    assert out.logs["r1"].item() > 0


@pytest.mark.parametrize("r1", ["true", "approx"])
def test_a_frozen_d_backbone_trains_only_the_head_and_keeps_r1(tiny_teacher_dir, r1):
    """DiscriminatorSchedule's frozen backbone (StepPlan(train_d_backbone=False)): the GAN and R1 terms give the
    head gradients and the fake score's weights none (its gradients are the denoising loss's alone, as with
    those terms weighted 0), and R1 still differentiates D in the real image (the true R1 failed before: the
    backbone's features were detached from the image)."""
    batch = next(iter(_loader()))
    grads = {}
    for weight in (1.0, 0.0):
        model = _model(tiny_teacher_dir, r1=r1, r1_weight=weight, gan_discriminator_weight=weight)
        out = model.critic_loss(batch, torch.Generator().manual_seed(0), StepPlan(train_d_backbone=False)).loss
        out.loss.backward()
        grads[weight] = [p.grad.clone() for p in model.fake_score.parameters() if p.grad is not None]
        if weight:
            assert out.logs["r1"].item() > 0
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.discriminator_head.parameters())
            assert all(p.requires_grad for p in model.fake_score.parameters())  # unfrozen again after the call
    assert len(grads[1.0]) == len(grads[0.0]) > 0
    for a, b in zip(grads[1.0], grads[0.0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("preset", ["dmd2", "add"])
def test_teacher_samples_as_the_real_set(tiny_teacher_dir, tmp_path, preset):
    """With ``data.pairs`` the batches' ``x`` are cached teacher samples, and the adversarial loop's critic
    takes them as its real images (LADD's unlimited real set, issue 21): the GAN head never sees data."""
    from lightning_distill.cli import cli_main
    from lightning_distill.teacher_pairs import load_pairs

    pairs = tmp_path / "pairs"
    cli = cli_main(
        ["--config", str(REPO / f"configs/{preset}/debug.yaml"), "--data.teacher", str(tiny_teacher_dir),
         "--data.image_size", "8", "--trainer.default_root_dir", str(tmp_path / "run"),
         "--data.pairs.dir", str(pairs), "--data.pairs.num_pairs", "24", "--data.pairs.num_steps", "2",
         "--data.pairs.time_grid", "trailing", "--data.pairs.progress", "false"],
        run=False,
    )
    model, seen = cli.model, []
    original = model.critic_loss

    def spy(batch, gen, plan):
        seen.append(batch["x"].clone())
        return original(batch, gen, plan)

    model.critic_loss = spy
    cli.trainer.fit(model, datamodule=cli.datamodule)
    samples = load_pairs(pairs)["sample"]
    assert seen and all(any(torch.equal(x, s) for s in samples) for batch in seen for x in batch)
    real = cli.datamodule.train_images()  # the FID reference stays the real data
    assert not any(torch.equal(seen[0][0], r) for r in real)


# --- flow-matching teachers (issue 22) -------------------------------------------------------------


class FlowGaussianUNet(nn.Module):
    """The ideal denoiser of N(mu, s^2 I) data on the rectified-flow path, outputting the velocity u = eps - x0.

    It is fed the network timestep s * T, as a flow UNet is, and reads its level s from that alone.
    """

    def __init__(self, mu: float, s: float, T: int) -> None:
        super().__init__()
        self.mu, self.s, self.T = mu, s, T

    def forward(self, x_t, t, return_dict=False, **_):
        lvl = (t.double() / self.T).view(-1, 1, 1, 1)
        a, sg, x_t64 = 1 - lvl, lvl, x_t.double()
        x0 = self.mu + a * self.s**2 / (a**2 * self.s**2 + sg**2) * (x_t64 - a * self.mu)
        eps = (x_t64 - a * x0) / sg
        return ((eps - x0).to(x_t.dtype),)


def test_dm_gradient_on_the_flow_path_matches_gaussian_closed_form():
    """On x_s = (1 - s) x + s n with velocity networks the gradient is the same closed form as on VP:
    (D_fake - D_real) / mean|x - D_real|, D from Tweedie's formula on the flow path's alpha = 1 - s, sigma = s."""
    from lightning_distill.parametrisation import FlowSchedule

    sched = FlowSchedule(1000, shift=3.0)  # shifted: integer timestep, level and network timestep all differ
    g = torch.Generator().manual_seed(0)
    real, fake = (0.3, 0.5), (-0.4, 0.8)
    x = torch.randn(6, 2, 3, 3, generator=g) * 0.7 + 0.1
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([20, 100, 300, 500, 700, 900])
    expected = _closed_form_grad(x, t, noise, sched, real, fake)
    d_real, d_fake = (Denoiser(FlowGaussianUNet(*p, 1000), sched, "flow_prediction") for p in (real, fake))
    for reduction, scale in (("sum", 1.0), ("mean", 1.0 / x.numel())):
        xx = x.clone().requires_grad_(True)
        distribution_matching_loss(xx, d_real, d_fake, t, noise, reduction=reduction).loss.backward()
        torch.testing.assert_close(xx.grad, expected * scale, atol=1e-3 * scale, rtol=1e-3)


@pytest.fixture
def flow_teacher_dir(tmp_path):
    from conftest import write_tiny_flow_teacher

    return write_tiny_flow_teacher(tmp_path / "flow_teacher", shift=3.0)


def test_flow_teacher_scores_are_velocity_networks(flow_teacher_dir):
    """Real and fake scores read velocities (x0 = x_s - s u, by hand from the bare UNets), the fake score
    regresses u = n - x, and the GAN head's backbone is fed the network timestep s * T, not the index."""
    model = _model(flow_teacher_dir)
    for den in (model.student, model.fake_score, model.teacher.denoiser):
        assert den.path == "flow" and den.prediction_type == "flow_prediction" and den.clip_x0 is None
    sched = model.teacher.schedule
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g).clamp(-1, 1)
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([30, 300, 600, 900])
    s = sched.sigma(t).view(-1, 1, 1, 1)
    x_t = (1 - s) * x + s * noise
    with torch.no_grad():  # a fake score that differs from the teacher, so the gradient is not zero
        for p in model.fake_score.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        x0_real = x_t - s * model.teacher.unet(x_t, sched.model_timestep(t)).sample
        x0_fake = x_t - s * model.fake_score.unet(x_t, sched.model_timestep(t)).sample
    xx = x.clone().requires_grad_(True)
    distribution_matching_loss(xx, model.teacher.denoiser, model.fake_score, t, noise, reduction="sum").loss.backward()
    want = (x0_fake - x0_real) / (x - x0_real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(xx.grad, want, atol=1e-5, rtol=1e-4)
    assert xx.grad.abs().max() > 0

    from lightning_distill.losses import denoising_loss

    with torch.no_grad():
        u = model.fake_score.unet(x_t, sched.model_timestep(t)).sample
        by_hand = ((u - (noise - x)) ** 2).mean()
    torch.testing.assert_close(denoising_loss(model.fake_score, x, t, noise), by_hand)

    fed = []
    hook = model.fake_score.unet.register_forward_pre_hook(lambda m, args: fed.append(args[1].clone()))
    model.discriminator_logits(x, t, noise)
    hook.remove()
    torch.testing.assert_close(fed[0], sched.model_timestep(t))  # shift 3: 2.99..., not the index 30


def test_flow_teacher_two_step_generator_trains_and_exports(flow_teacher_dir, tmp_path):
    """A 2-step generator on a flow teacher: finite losses over a few iterations; its grid is s = 1, 1/2,
    the levels the exported FlowMatchLCMScheduler visits; the sampler feeds the backward-simulated inputs;
    the stock pipeline reproduces sample() at 2 steps (its default call) and at 1; 3 steps are refused."""
    from diffusers import DiffusionPipeline
    from diffusers.utils.torch_utils import randn_tensor

    from lightning_distill.sampling import at_steps
    from test_export import assert_pipeline_reproduces_samples

    from conftest import write_tiny_flow_teacher

    teacher_dir = write_tiny_flow_teacher(tmp_path / "teacher_shift1")  # shift 1: the trailing grid is exact
    model = _model(teacher_dir, generator_steps=2, generator_every=1)
    trainer = _trainer(tmp_path, max_steps=3, enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=_loader())
    logged = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert {"train/dm_loss", "train/fake_score_loss", "train/g_gan", "train/d_gan"} <= set(logged)
    assert all(torch.isfinite(v).all() for v in logged.values()), logged

    grid = generator_timesteps(model.student.schedule, 2)
    assert grid.tolist() == [999, 499]
    sched = model.sampling_scheduler(2)
    sched.set_timesteps(2)
    assert type(sched).__name__ == "FlowMatchLCMScheduler"
    torch.testing.assert_close(sched.timesteps, model.student.schedule.model_timestep(grid))  # s * T = 1000, 500
    got = model.sample(5, 2, torch.Generator().manual_seed(1), denoiser=model.student)
    g = torch.Generator().manual_seed(1)
    z = randn_tensor((5, *model.sample_shape), generator=g)
    with torch.no_grad():
        x1 = backward_simulation(model.student, z, grid, 1, rng=g)
        want = model.student(x1, grid[1]).x0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"1\.\.2 steps"):
        model.sample(2, 3)

    pipe = DiffusionPipeline.from_pretrained(str(model.export(tmp_path / "student", use_ema=False)))
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    assert_pipeline_reproduces_samples(model, pipe, 2)
    pipe.scheduler = at_steps(pipe.scheduler, 1)
    assert_pipeline_reproduces_samples(model, pipe, 1)


def test_the_validation_stream_is_not_a_training_iterations_stream_on_the_cpu(tiny_teacher_dir):
    """Validation draws from a fixed stream; a CPU generator keeps only a seed's low 32 bits, so that stream
    must differ there from every training iteration's (step 2**40 replayed iteration 0's draws)."""
    from lightning_distill.gan.plan import iteration_generator

    model = _model(tiny_teacher_dir)
    used = []
    original = model.step_generator
    model.step_generator = lambda step: used.append(original(step)) or used[-1]
    model.compute_loss(next(iter(_loader())))
    low = used[0].initial_seed() & 0xFFFFFFFF
    assert len(used) == 1 and all(
        iteration_generator(model.hparams.seed, k, "cpu").initial_seed() & 0xFFFFFFFF != low for k in range(10_000)
    )


def test_a_teacher_with_dropout_gives_a_dropout_free_fake_score_and_d_backbone(tiny_teacher_dir):
    """A teacher trained with dropout (p = 0.1 here) runs in eval mode; its trained copies queried beside it (the
    fake score, a trainable D backbone) have dropout off, so at initialisation the fake score equals the teacher
    and the DM gradient is ~0 (with dropout it was pure mask noise, norm ~8 on this teacher)."""
    from lightning_distill.gan.features import UNetEncoderFeatures

    dm = TeacherDataModule(teacher=str(tiny_teacher_dir), image_size=8, batch_size=2)
    dropouts = [m for m in dm.teacher.unet.modules() if isinstance(m, nn.Dropout)]
    assert dropouts
    for m in dropouts:
        m.p = 0.1
    torch.manual_seed(0)
    model = DMD2(teacher=dm.teacher, generator_every=1, gan=False)
    model.train()
    assert all(m.p == 0.0 for m in model.fake_score.modules() if isinstance(m, nn.Dropout))
    assert all(m.p == 0.1 for m in dm.teacher.unet.modules() if isinstance(m, nn.Dropout))  # the teacher's own
    out = model.generator_loss(next(iter(_loader())), torch.Generator().manual_seed(0))
    assert out.logs["dm_grad_norm"] < 1e-3
    copy_ = UNetEncoderFeatures.trainable_copy(dm.teacher.unet)
    assert all(m.p == 0.0 for m in copy_.network.modules() if isinstance(m, nn.Dropout))
