"""ADD: the distillation term by hand, the student timesteps and sampler, what each step trains, the CLI preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_distill.gan import StepPlan
from lightning_distill.methods.add import AdversarialDiffusionDistillation, add_distillation_loss, distillation_weight
from lightning_distill.parametrisation import Denoiser, VPSchedule

from conftest import write_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]


class ZeroV(nn.Module):
    """A v-prediction network that always outputs 0: its x0 estimate is alpha_t x_t."""

    def forward(self, x, t, return_dict=False, **_):
        return (torch.zeros_like(x),)


def test_distillation_loss_by_hand():
    ac = torch.linspace(0.99, 0.01, 10)
    teacher = Denoiser(ZeroV(), VPSchedule(ac), "v_prediction")
    torch.manual_seed(0)
    x0 = torch.randn(3, 1, 2, 2, requires_grad=True)
    eps = torch.randn(3, 1, 2, 2)
    s = torch.tensor([0, 4, 9])
    a, sg = ac[s].sqrt().view(-1, 1, 1, 1), (1 - ac[s]).sqrt().view(-1, 1, 1, 1)
    target = a * (a * x0.detach() + sg * eps)  # teacher x0 of the re-noised student output
    per_sample = (x0.detach() - target).pow(2).flatten(1).mean(1)
    expected = (a.flatten() * per_sample).mean()  # c(t) = alpha_t
    loss = add_distillation_loss(x0, teacher, s, eps, "alpha")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    # stop-gradient target: d loss / d x0 = 2 c(s) (x0 - target) / (B * pixels)
    torch.testing.assert_close(x0.grad, 2 * a * (x0.detach() - target) / (3 * 4))
    assert distillation_weight(torch.tensor([0.5]), "alpha_squared").item() == 0.25
    with pytest.raises(ValueError, match="choose"):
        distillation_weight(torch.tensor([0.5]), "bogus")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from lightning_distill.teacher import load_teacher

    return load_teacher(write_tiny_teacher(tmp_path_factory.mktemp("add") / "teacher"))


def test_student_timesteps_are_the_grid_the_sampler_visits(teacher):
    model = AdversarialDiffusionDistillation(teacher, num_student_steps=4, head_hidden=8)
    assert model.student_timesteps.tolist() == [1023, 767, 511, 255]
    sched = model.make_scheduler()
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == model.student_timesteps.tolist()
    for k in (1, 2, 3):  # fewer sampling steps visit a subset of the trained timesteps
        sched.set_timesteps(k)
        assert set(sched.timesteps.tolist()) <= {1023, 767, 511, 255} and len(sched.timesteps) == k
    assert model.hparams.sample_steps == 4
    assert model.max_sample_steps() == 4
    with pytest.raises(ValueError, match=r"samples with 1\.\.4 steps"):
        model.sample(2, 8)  # steps beyond the training grid: a clear error, not diffusers' strength message
    # the generator's inputs: real images noised to exactly those timesteps
    seen = []
    hook = model.student.unet.register_forward_pre_hook(lambda m, args: seen.extend(args[1].tolist()))
    batch = {"x": torch.rand(16, 1, 8, 8) * 2 - 1, "label": torch.zeros(16, dtype=torch.long)}
    with torch.no_grad():
        fake = model.generate(batch, torch.Generator().manual_seed(0))
    hook.remove()
    assert set(seen) <= {1023, 767, 511, 255} and len(set(seen)) > 1
    assert fake.x.shape == batch["x"].shape
    with pytest.raises(ValueError, match="student timesteps"):
        AdversarialDiffusionDistillation(teacher, num_student_steps=9)


def test_sampler_renoises_the_x0_estimate_with_fresh_noise(teacher):
    """Multi-step sampling feeds the student what it was trained on: its x0 estimate plus fresh noise.

    Reproduced by hand: x0 = f(z, 1023); x_511 = sqrt(abar) x0 + sqrt(1 - abar) z' with a new draw z'
    from the same generator (not DDIM's re-use of the student's own noise estimate); x0' = f(x_511, 511).
    """
    from diffusers.utils.torch_utils import randn_tensor


    torch.manual_seed(0)
    model = AdversarialDiffusionDistillation(teacher, num_student_steps=4, head_hidden=8)
    with torch.no_grad():  # move the student away from the teacher so the two samplers differ visibly
        for p in model.student.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    n = 6
    got = model.sample(n, 2, torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    clip = model.student.clip_x0
    abar = model.student.schedule.alphas_cumprod_table
    with torch.no_grad():
        x = randn_tensor((n, *model.sample_shape), generator=g)
        x0 = model.student(x, torch.tensor(1023), clip=False).x0
        x0 = x0.clamp(-clip, clip) if clip is not None else x0
        z = randn_tensor(x.shape, generator=g)
        x = abar[511].sqrt() * x0 + (1 - abar[511]).sqrt() * z
        want = model.student(x, torch.tensor(511), clip=False).x0
        want = want.clamp(-clip, clip) if clip is not None else want
        ddim_x = abar[511].sqrt() * x0 + (1 - abar[511]).sqrt() * (
            (randn_tensor(x.shape, generator=torch.Generator().manual_seed(3)) - (abar[1023].sqrt()) * x0)
            / (1 - abar[1023]).sqrt())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(x, ddim_x, atol=1e-2)  # the input of step 2 is not DDIM's


def test_backward_simulation_feeds_later_steps_the_sampler_state(teacher):
    """backward_simulation=1: a sample at the second timestep gets the student's own first step from pure
    noise, re-noised with fresh noise to 511 (reproduced by hand from the same random stream); the
    first-step samples still get noised real images; 0 (the default) feeds noised real images to both."""

    torch.manual_seed(0)
    model = AdversarialDiffusionDistillation(teacher, num_student_steps=2, head_hidden=8, backward_simulation=1.0)
    with torch.no_grad():
        for p in model.student.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    n = 8
    batch = {"x": torch.rand(n, 1, 8, 8) * 2 - 1}
    with torch.no_grad():
        got = model.generate(batch, torch.Generator().manual_seed(5)).x
        g = torch.Generator().manual_seed(5)
        grid = model.student_timesteps  # [1023, 511]
        idx = torch.randint(0, 2, (n,), generator=g)
        eps = torch.randn(batch["x"].shape, generator=g)
        torch.rand(idx.shape, generator=g)  # the per-sample pick (all picked at probability 1)
        z = torch.randn(batch["x"].shape, generator=g)
        rows = (idx == 1).nonzero().flatten()
        assert 0 < rows.numel() < n  # both kinds of sample in the batch
        x_t = model.student.schedule.add_noise(batch["x"], eps, grid[idx])
        first = model.student(z[rows], grid[0]).x0  # the sampler's (clipped) first step
        x_t[rows] = model.student.schedule.add_noise(first, torch.randn(first.shape, generator=g), grid[1].expand(len(rows)))
        want = model.student(x_t, grid[idx], clip=False).x0
        torch.testing.assert_close(got, want)
        model.hparams.backward_simulation = 0.0
        plain = model.generate(batch, torch.Generator().manual_seed(5)).x
    assert torch.allclose(plain[idx == 0], got[idx == 0])
    assert not torch.allclose(plain[rows], got[rows], atol=1e-3)
    with pytest.raises(ValueError, match="backward_simulation"):
        AdversarialDiffusionDistillation(teacher, head_hidden=8, backward_simulation=1.5)


def test_discriminator_on_noised_inputs(teacher):
    """discriminator_t_range: real and fake are noised with one (t, noise) draw, and the encoder gets t."""
    model = AdversarialDiffusionDistillation(teacher, head_hidden=8, discriminator_t_range=[100, 600])
    assert model.hparams.discriminator_t_range == [100, 600]
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    d_fn = model.discriminate(x, None, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.randint(100, 601, (4,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        want = model.discriminator(model.student.schedule.add_noise(x, noise, t), t)
        torch.testing.assert_close(d_fn(x), want)
        torch.testing.assert_close(d_fn(x), d_fn(x))  # one fixed function of the image
        assert not torch.allclose(d_fn(x), model.discriminator(x))
    assert 100 <= int(t.min()) and int(t.max()) <= 600
    with pytest.raises(ValueError, match="discriminator_t_range"):
        AdversarialDiffusionDistillation(teacher, head_hidden=8, discriminator_t_range=[600, 100])



def test_steps_train_only_their_network_and_the_teacher_is_not_saved_twice(teacher, tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = AdversarialDiffusionDistillation(
        teacher, num_student_steps=2, head_hidden=8, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        discriminator_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    # the default discriminator is the teacher's own (frozen) encoder plus trainable heads
    assert model.discriminator.backbone.network is teacher.unet
    assert all(n.startswith("heads.") for n, _ in model.discriminator.named_parameters())
    teacher0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    heads0 = [p.detach().clone() for p in model.discriminator.heads.parameters()]
    student0 = [p.detach().clone() for p in model.student.parameters()]
    data = [{"x": torch.rand(1, 8, 8) * 2 - 1, "label": torch.tensor(0)} for _ in range(4)]
    from lightning_distill.callbacks.discriminator import DiscriminatorSchedule

    tr = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   default_root_dir=tmp_path, callbacks=[DiscriminatorSchedule(d_warmup_steps=1)])
    tr.fit(model, DataLoader(data, batch_size=4))
    changed = lambda ps, qs: [not torch.equal(p, q) for p, q in zip(ps, qs)]
    assert any(changed(model.discriminator.heads.parameters(), heads0))
    assert not any(changed(model.student.parameters(), student0))  # D warm-up iteration: G untouched
    # one more iteration with G updates (the schedule's warm-up is over); the teacher never changes
    tr = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   default_root_dir=tmp_path)
    tr.fit(model, DataLoader(data, batch_size=4))
    assert any(changed(model.student.parameters(), student0))
    assert all(torch.equal(v, teacher0[k]) for k, v in teacher.state_dict().items())
    path = tmp_path / "m.ckpt"
    tr.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert not any(k.startswith(("teacher.", "discriminator.backbone.")) for k in ckpt["state_dict"])
    assert len(ckpt["optimizer_states"]) == 2
    # a second stage starts from this student (no EMA callback ran: its raw weights), not from the teacher
    stage2 = AdversarialDiffusionDistillation(teacher, init_from=str(path), num_student_steps=2, head_hidden=8)
    for (name, p), q in zip(stage2.student.unet.named_parameters(), model.student.unet.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert any(changed(stage2.student.parameters(), student0))


def test_without_the_distillation_loss_the_generator_step_makes_no_teacher_pass(teacher):
    """LADD (distill_weight 0): the generator loss is the adversarial term alone, with one teacher network
    call fewer than with the distillation loss (the default discriminator reads the teacher's own encoder)."""
    batch = {"x": torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, "label": torch.zeros(4, dtype=torch.long)}
    calls, out = {}, {}
    for w in (0.0, 2.5):
        model = AdversarialDiffusionDistillation(teacher, num_student_steps=2, head_hidden=8, distill_weight=w)
        n = []
        hook = teacher.unet.register_forward_hook(lambda *_: n.append(1))
        try:
            out[w] = model.generator_loss(batch, torch.Generator().manual_seed(1))
        finally:
            hook.remove()
        calls[w] = len(n)
    assert calls[2.5] == calls[0.0] + 1
    assert "distill" not in out[0.0].logs and "distill" in out[2.5].logs
    assert torch.equal(out[0.0].loss, out[0.0].logs["g_adv"])
    torch.testing.assert_close(out[2.5].loss, out[2.5].logs["g_adv"] + 2.5 * out[2.5].logs["distill"])


def test_trainable_feature_network_is_a_trained_copy_of_the_teacher(teacher, tmp_path):
    """train_features: the D backbone is a copy of the teacher UNet that the D step trains and checkpoints."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_distill.callbacks.discriminator import DiscriminatorSchedule

    torch.manual_seed(0)
    model = AdversarialDiffusionDistillation(
        teacher, num_student_steps=2, head_hidden=8, train_features=True, discriminator_t_range=[0, 250],
        r1="approx", r1_weight=1.0, discriminator_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    backbone = model.discriminator.backbone.network
    assert backbone is not teacher.unet and all(p.requires_grad for p in backbone.parameters())
    assert any(n.startswith("backbone.") for n, _ in model.discriminator.named_parameters())
    teacher0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    backbone0 = {k: v.clone() for k, v in backbone.state_dict().items()}
    data = [{"x": torch.rand(1, 8, 8) * 2 - 1, "label": torch.tensor(0)} for _ in range(4)]
    tr = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   default_root_dir=tmp_path, callbacks=[DiscriminatorSchedule(d_warmup_steps=1)])
    tr.fit(model, DataLoader(data, batch_size=4))
    assert any(not torch.equal(v, backbone0[k]) for k, v in backbone.state_dict().items())
    assert all(torch.equal(v, teacher0[k]) for k, v in teacher.state_dict().items())
    path = tmp_path / "td.ckpt"
    tr.save_checkpoint(path)
    assert any(k.startswith("discriminator.backbone.") for k in torch.load(path, weights_only=False)["state_dict"])
    with pytest.raises(ValueError, match="train_features"):
        AdversarialDiffusionDistillation(teacher, head_hidden=8, train_features=True, feature_network=torch.nn.Identity())


def test_debug_preset_runs_through_the_cli(tmp_path):
    from lightning_distill.cli import cli_main

    teacher_dir = write_tiny_teacher(tmp_path / "teacher")
    root = tmp_path / "run"
    cli = cli_main(["fit", "--config", str(ROOT / "configs/add/debug.yaml"), "--data.teacher", str(teacher_dir),
                    "--data.image_size", "8", "--trainer.default_root_dir", str(root)])
    assert isinstance(cli.model, AdversarialDiffusionDistillation)
    assert int(cli.model.gan_iteration) == cli.trainer.global_step == 3  # max_steps counts iterations
    metrics = cli.trainer.callback_metrics
    assert {"train/distill", "train/d_loss", "train/r1", "gan/d_acc_real", "gan/d_acc_fake"} <= set(metrics)
    assert (root / "student" / "unet" / "config.json").exists() and (root / "checkpoints" / "last.ckpt").exists()
    cli = cli_main(["--config", str(ROOT / "configs/add/digits.yaml"), "--data.teacher", str(teacher_dir),
                    "--data.image_size", "8", "--trainer.default_root_dir", str(tmp_path / "digits")], run=False)
    assert isinstance(cli.model, AdversarialDiffusionDistillation)


def test_class_conditional_teacher(tmp_path):
    from lightning_distill.teacher import load_teacher

    teacher = load_teacher(write_tiny_teacher(tmp_path / "cond", num_class_embeds=10))
    model = AdversarialDiffusionDistillation(teacher, num_student_steps=2, head_hidden=8)
    assert model.discriminator.heads.class_embed is not None and model.discriminator.backbone_cond
    batch = {"x": torch.rand(4, 1, 8, 8) * 2 - 1, "label": torch.tensor([0, 3, 5, 9])}
    gen = torch.Generator().manual_seed(0)
    critic = model.critic_loss(batch, gen, StepPlan(r1_scale=1.0 / model.hparams.r1_weight))
    d_out, real_logits = critic.loss, critic.real_logits
    g_out = model.generator_loss(batch, gen)
    assert torch.isfinite(d_out.loss) and torch.isfinite(g_out.loss) and "distill" in g_out.logs
    # the label reaches D: another label, another logit
    x = batch["x"]
    other = model.discriminator(x, class_labels=torch.tensor([1, 3, 5, 9]))
    torch.testing.assert_close(other[1:], model.discriminator(x, class_labels=batch["label"])[1:])
    assert not torch.allclose(other[0], model.discriminator(x, class_labels=batch["label"])[0])


def test_a_frozen_user_feature_network_stays_in_eval_mode(teacher):
    """Lightning puts the module in train mode; a frozen feature network must keep its BN statistics."""

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x, t=None, **_):
            return [self.bn(self.conv(x))]

    feats = Features()
    model = AdversarialDiffusionDistillation(teacher, num_student_steps=2, feature_network=feats, head_hidden=8)
    model.train()
    assert model.discriminator.heads.training and not feats.bn.training
    stats = feats.bn.running_mean.clone()
    model.discriminator(torch.randn(2, 1, 8, 8))
    torch.testing.assert_close(feats.bn.running_mean, stats)


# --- flow-matching teachers (issue 22) -------------------------------------------------------------


class ZeroU(nn.Module):
    """A flow network that always outputs velocity 0: its x0 estimate is x_s itself."""

    def forward(self, x, t, return_dict=False, **_):
        return (torch.zeros_like(x),)


def test_distillation_loss_by_hand_on_the_flow_path():
    """Re-noising is x_s = (1 - s) x + s eps and c(t) = alpha_t = 1 - s."""
    from lightning_distill.parametrisation import FlowSchedule

    teacher = Denoiser(ZeroU(), FlowSchedule(10), "flow_prediction")
    torch.manual_seed(0)
    x0 = torch.randn(3, 1, 2, 2, requires_grad=True)
    eps = torch.randn(3, 1, 2, 2)
    t = torch.tensor([0, 4, 9])
    s = ((t + 1) / 10).view(-1, 1, 1, 1)  # levels 0.1, 0.5, 1.0
    target = (1 - s) * x0.detach() + s * eps  # the teacher's x0 of its input is that input
    expected = ((1 - s).flatten() * (x0.detach() - target).pow(2).flatten(1).mean(1)).mean()
    loss = add_distillation_loss(x0, teacher, t, eps, "alpha")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("T", [1000, 1024])
def test_flow_student_timesteps_are_the_levels_the_flow_lcm_sampler_visits(T):
    """generator_timesteps on the flow path against the stock FlowMatchLCMScheduler set up for K steps:
    the same levels s = n / K when K divides T (fewer steps N visit a subset when N divides K); otherwise
    the first (s = 1, pure noise) and the last level agree exactly and the interior ones within one level."""
    from lightning_distill.parametrisation import FlowSchedule
    from lightning_distill.sampling import at_steps, flow_scheduler, generator_timesteps

    fs = FlowSchedule(T)
    stock = flow_scheduler("x0", fs)
    assert type(stock).__name__ == "FlowMatchLCMScheduler"

    def visits(n):
        sched = at_steps(stock, n, fs)
        sched.set_timesteps(n)
        return sched.timesteps.double()

    for K in range(1, 9):
        trained = fs.model_timestep(generator_timesteps(fs, K)).double()
        got = visits(K)
        assert got[0] == trained[0] == T and got[-1] == trained[-1], (K, got, trained)
        if T % K == 0:
            torch.testing.assert_close(got, trained, rtol=0, atol=1e-3, msg=f"K={K}")
            torch.testing.assert_close(trained, T * torch.arange(K, 0, -1, dtype=torch.float64) / K)
            for n in (n for n in range(1, K) if K % n == 0):
                assert all((trained - v).abs().min() < 1e-3 for v in visits(n)), (K, n)
        else:
            assert (got - trained).abs().max() <= 1.0, (K, got, trained)


def test_shifted_flow_student_timesteps_are_the_nearest_levels_to_what_the_sampler_visits():
    """With a shift (SD3's 3) the stock FlowMatchLCMScheduler's K >= 3 grid is not shift(1 - k/K): the student
    trains at the training level nearest to each level the sampler feeds the network (none of its
    neighbours is closer), not at shift(1 - k/K), which is 28-50 timesteps away at K = 4."""
    from lightning_distill.parametrisation import FlowSchedule
    from lightning_distill.sampling import at_steps, flow_scheduler, generator_timesteps

    fs = FlowSchedule(1000, shift=3.0)
    levels = fs.model_timestep(torch.arange(1000)).double()
    for K in range(1, 9):
        sched = at_steps(flow_scheduler("x0", fs), K, fs)
        sched.set_timesteps(K)
        visits = sched.timesteps.double()
        trained = generator_timesteps(fs, K)
        for i, v in zip(trained.tolist(), visits.tolist()):
            near = [j for j in (i - 1, i + 1) if 0 <= j < 1000]
            assert all(abs(levels[i] - v) <= abs(levels[j] - v) for j in near), (K, i, v)
        assert (levels[trained] - visits).abs().max() < 1.5, (K, levels[trained], visits)
    shifted_trailing = fs.model_timestep(fs.trailing_timesteps(4)[:-1]).double()
    sched = at_steps(flow_scheduler("x0", fs), 4, fs)
    sched.set_timesteps(4)
    assert (shifted_trailing - sched.timesteps.double()).abs().max() > 25  # the grid trained on before


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    from conftest import write_tiny_flow_teacher
    from lightning_distill.teacher import load_teacher

    return load_teacher(write_tiny_flow_teacher(tmp_path_factory.mktemp("add_flow") / "teacher", shift=3.0))


def test_flow_teacher_student_sampler_and_discriminator_timesteps(flow_teacher):
    """On a (shift-3) flow teacher: the student is trained and sampled at the same network timesteps
    (s * T = 1000, 750), more steps than K are refused, and the teacher-encoder discriminator is fed the
    network timestep of its level (clean images: feature_timestep 0; LADD option: the drawn t)."""
    sched = flow_teacher.schedule
    model = AdversarialDiffusionDistillation(flow_teacher, num_student_steps=2, head_hidden=8)
    assert model.student.path == "flow" and model.student.prediction_type == "flow_prediction"
    assert model.student_timesteps.tolist() == [999, 499]
    sampler = model.sampling_scheduler(2)
    sampler.set_timesteps(2)
    assert type(sampler).__name__ == "FlowMatchLCMScheduler"
    torch.testing.assert_close(sampler.timesteps, sched.model_timestep(model.student_timesteps))
    torch.testing.assert_close(sampler.timesteps, torch.tensor([1000.0, 750.0]))
    with pytest.raises(ValueError, match=r"samples with 1\.\.2 steps"):
        model.sample(2, 3)
    seen = []
    hook = model.student.unet.register_forward_pre_hook(lambda m, args: seen.extend(args[1].tolist()))
    batch = {"x": torch.rand(16, 1, 8, 8) * 2 - 1, "label": torch.zeros(16, dtype=torch.long)}
    with torch.no_grad():
        model.generate(batch, torch.Generator().manual_seed(0))
    hook.remove()
    assert set(seen) == {1000.0, 750.0}

    fed = []
    hook = flow_teacher.unet.register_forward_pre_hook(lambda m, args: fed.append(args[1].clone()))
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    ladd = AdversarialDiffusionDistillation(flow_teacher, head_hidden=8, discriminator_t_range=[100, 600])
    try:
        with torch.no_grad():
            fed.clear()
            model.discriminate(x, None, torch.Generator().manual_seed(0))(x)
            clean = fed[-1]
            ladd.discriminate(x, None, torch.Generator().manual_seed(7))(x)
            noised = fed[-1]
    finally:
        hook.remove()
    torch.testing.assert_close(clean, sched.model_timestep(torch.zeros(4, dtype=torch.long)))  # 2.99..., not 0
    g = torch.Generator().manual_seed(7)
    torch.testing.assert_close(noised, sched.model_timestep(torch.randint(100, 601, (4,), generator=g)))


def test_approximate_r1_on_a_reduced_precision_teacher_backbone_is_refused(teacher):
    """The approximated R1 is E(D(x) - D(x + sigma n))^2 ~ sigma^2 ||grad D||^2, far below a bf16 backbone's
    rounding (a review measured 1,650x the float32 value at sigma 1e-4): ADD's frozen teacher-feature
    discriminator in bf16 with r1 approx is refused; true R1, or a float32 copy (train_features), is not."""
    from lightning_distill.errors import ConfigError
    from lightning_distill.teacher import load_teacher

    bf16 = load_teacher(teacher.source, dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"r1: approx .* torch.bfloat16 teacher network .* use r1: true"):
        AdversarialDiffusionDistillation(bf16, num_student_steps=2, r1="approx")
    AdversarialDiffusionDistillation(bf16, num_student_steps=2, r1="true")
    AdversarialDiffusionDistillation(bf16, num_student_steps=2, r1="approx", train_features=True)
    AdversarialDiffusionDistillation(teacher, num_student_steps=2, r1="approx")
