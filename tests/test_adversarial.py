"""Shared adversarial machinery: losses and both R1 forms by hand, the schedule's plan, heads and feature
networks, update counts per optimiser, and kill-and-resume equality of a GAN run."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_distill.callbacks.discriminator import DiscriminatorSchedule, lr_scale_at, ramp
from lightning_distill.gan import (
    AdversarialSchedule,
    ModuleFeatures,
    MultiLevelHeads,
    StepPlan,
    UNetEncoderFeatures,
    approx_r1_penalty,
    d_updates_at,
    discriminator_accuracy,
    hinge_d_loss,
    hinge_g_loss,
    ns_d_loss,
    ns_g_loss,
    r1_penalty,
)

from conftest import make_tiny_unet

# --- losses by hand ----------------------------------------------------------------------------------

REAL = torch.tensor([0.5, -2.0])
FAKE = torch.tensor([1.5, -0.5])


def sp(v: float) -> float:
    return math.log1p(math.exp(v))


def test_hinge_losses_by_hand():
    # D: mean(relu(1 - [0.5, -2])) + mean(relu(1 + [1.5, -0.5])) = (0.5 + 3) / 2 + (2.5 + 0.5) / 2
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(1.75 + 1.5)
    assert hinge_g_loss(FAKE).item() == pytest.approx(-0.5)


def test_non_saturating_losses_by_hand():
    d = (sp(-0.5) + sp(2.0)) / 2 + (sp(1.5) + sp(-0.5)) / 2
    assert ns_d_loss(REAL, FAKE).item() == pytest.approx(d, rel=1e-6)
    assert ns_g_loss(FAKE).item() == pytest.approx((sp(-1.5) + sp(0.5)) / 2, rel=1e-6)
    # -log sigmoid(z) = softplus(-z): the G loss is the logistic loss of labelling fakes real
    assert ns_g_loss(FAKE).item() == pytest.approx(-torch.log(torch.sigmoid(FAKE)).mean().item(), rel=1e-6)


def test_discriminator_accuracy():
    acc_real, acc_fake = discriminator_accuracy(REAL, FAKE)
    assert acc_real.item() == 0.5 and acc_fake.item() == 0.5


class Linear(nn.Module):
    """D(x) = w . x (flattened): grad_x D = w for every x."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return x.flatten(1) @ self.w.flatten()


def test_true_r1_of_a_linear_discriminator_is_w_squared():
    torch.manual_seed(0)
    w = torch.randn(1, 3, 3)
    d = Linear(w)
    x = torch.randn(5, 1, 3, 3)
    penalty = r1_penalty(d, x)
    assert penalty.item() == pytest.approx(w.pow(2).sum().item(), rel=1e-6)
    # double backward: d/dw ||w||^2 = 2 w (R1 trains D, so its graph must reach the parameters)
    penalty.backward()
    torch.testing.assert_close(d.w.grad, 2 * w)


def test_true_r1_of_a_quadratic_discriminator_and_multi_logit_convention():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    # D(x) = 0.5 ||x||^2: grad = x, R1 = mean ||x||^2 = (5 + 10) / 2
    assert r1_penalty(lambda v: 0.5 * v.pow(2).sum(1), x).item() == pytest.approx(7.5)
    # two logits per sample [a . x, b . x]: D(x) is their mean, grad = (a + b) / 2
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 4.0])
    penalty = r1_penalty(lambda v: torch.stack([v @ a, v @ b], 1), x)
    assert penalty.item() == pytest.approx(0.25 + 4.0)


def test_approx_r1_by_hand_and_against_true_r1():
    torch.manual_seed(0)
    w = torch.randn(1, 2, 2)
    d = Linear(w)
    x = torch.randn(3, 1, 2, 2)
    n = torch.randn(3, 1, 2, 2)
    sigma = 0.1
    # D(x) - D(x + sigma n) = -sigma w . n exactly for a linear D
    expected = (sigma * (n.flatten(1) @ w.flatten())).pow(2).mean()
    assert approx_r1_penalty(d, x, sigma, noise=n).item() == pytest.approx(expected.item(), rel=1e-5)
    # E_n[(w . n)^2] = ||w||^2: with many directions approx R1 / sigma^2 estimates true R1 (rel. sd 0.6%)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(50_000, 1, 2, 2, generator=g)
    ns = torch.randn(50_000, 1, 2, 2, generator=g)
    est = approx_r1_penalty(d, xs, sigma, noise=ns) / sigma**2
    assert est.item() == pytest.approx(r1_penalty(d, xs[:8]).item(), rel=0.03)


def test_approx_r1_reuses_the_d_losss_real_logits():
    torch.manual_seed(0)
    d = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, n = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    calls = []
    counted = lambda v: calls.append(v) or d(v)
    fresh = approx_r1_penalty(counted, x, 0.1, noise=n)
    g_fresh = torch.autograd.grad(fresh, list(d.parameters()))
    assert len(calls) == 2
    calls.clear()
    reused = approx_r1_penalty(counted, x, 0.1, noise=n, real_logits=d(x))
    g_reused = torch.autograd.grad(reused, list(d.parameters()))
    assert len(calls) == 1  # only the perturbed images go through D again
    torch.testing.assert_close(reused, fresh)
    for a, b in zip(g_reused, g_fresh):
        torch.testing.assert_close(a, b)  # the penalty's gradient still flows through D(x)


def test_approx_r1_under_bf16_autocast_is_the_float32_penalty():
    """D(x) - D(x + sigma n) is about sigma ||grad D||, below bf16's three digits: under bf16-mixed the
    penalty must still be the float32 one (both passes with autocast off, the D loss's bf16 logits not reused),
    not rounding noise (about 10x too large before)."""
    torch.manual_seed(0)
    d = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1), nn.SiLU(),
                      nn.Flatten(), nn.Linear(16 * 8 * 8, 1))
    x, n = torch.randn(32, 1, 8, 8), torch.randn(32, 1, 8, 8)
    exact = approx_r1_penalty(d, x, 0.01, noise=n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed_logits = d(x)
        assert mixed_logits.dtype == torch.bfloat16
        got = approx_r1_penalty(d, x, 0.01, noise=n, real_logits=mixed_logits)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(exact.item(), rel=1e-4)


# --- the schedule ------------------------------------------------------------------------------------


def test_d_updates_at_keeps_the_running_ratio():
    for ratio in (5, 1, 0.5, 1 / 3, 2.5):
        counts = [d_updates_at(i, ratio) for i in range(30)]
        assert all(sum(counts[: n + 1]) == math.floor((n + 1) * ratio + 1e-9) for n in range(30))
    assert [d_updates_at(i, 0.5) for i in range(4)] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="ratio"):
        d_updates_at(0, -1)


def test_schedule_plan():
    s = DiscriminatorSchedule(
        d_warmup_steps=2, d_updates_per_g=0.5, ratio_milestones={6: 3}, r1_scale=1.0, r1_scale_end=0.0,
        r1_ramp_steps=10, d_lr_warmup_steps=4, d_lr_decay="linear", total_steps=14, freeze_backbone_steps=3,
        freeze_d_after=12,
    )
    assert isinstance(s, AdversarialSchedule)
    plans = [s.plan(i) for i in range(14)]
    assert [p.update_g for p in plans[:3]] == [False, False, True]
    # warm-up forces at least one D step; ratio 0.5 then alternates; from 6 on, 3 per step; none from 12
    assert [p.d_updates for p in plans] == [1, 1, 0, 1, 0, 1, 3, 3, 3, 3, 3, 3, 0, 0]
    assert [p.train_d_backbone for p in plans[:4]] == [False, False, False, True]
    assert plans[5].r1_scale == pytest.approx(0.5) and plans[12].r1_scale == 0.0
    assert [plans[i].d_lr_scale for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert plans[9].d_lr_scale == pytest.approx(0.5)  # linear decay over steps 4..14
    assert lr_scale_at(3, 0, None, "cosine") == 1.0 and ramp(5, 2.0, 4.0, 10, "cosine") == pytest.approx(3.0)
    with pytest.raises(ValueError, match="total_steps"):
        DiscriminatorSchedule(d_lr_decay="cosine")


# --- heads and feature networks ----------------------------------------------------------------------


def test_multi_level_heads_shapes_and_projection():
    torch.manual_seed(0)
    feats = [torch.randn(3, 8, 4, 4), torch.randn(3, 5, 6), torch.randn(3, 7)]  # map, tokens (B, N, C), vector
    heads = MultiLevelHeads([8, 6, 7], [4, 3, 2], hidden=8, spatial=True)
    assert heads(feats).shape == (3, 16 + 5 + 1)
    pooled = MultiLevelHeads([8, 6, 7], [4, 3, 2], hidden=8, spatial=False)
    assert pooled(feats).shape == (3, 3)
    cond = MultiLevelHeads([8, 6, 7], [4, 3, 2], hidden=8, spatial=False, num_classes=10)
    with pytest.raises(ValueError, match="class_labels"):
        cond(feats)
    a = cond(feats, class_labels=torch.tensor([0, 1, 2]))
    b = cond(feats, class_labels=torch.tensor([3, 1, 2]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])  # the label moves its own sample only


def test_unet_encoder_features_match_the_blocks_and_skip_the_decoder():
    unet = make_tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    seen = {}
    hooks = [unet.down_blocks[i].register_forward_hook(lambda m, i_, o, k=i: seen.__setitem__(k, o[0])) for i in range(2)]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i_, o: seen.__setitem__(-1, o)))
    ran_up = []
    hooks.append(unet.up_blocks[0].register_forward_hook(lambda *a: ran_up.append(1)))
    with torch.no_grad():
        unet(x, t)
    ran_up.clear()
    frozen = UNetEncoderFeatures(unet, levels=[1, -1], trainable=False)
    out = frozen(x, t)
    assert not ran_up  # the decoder never ran
    torch.testing.assert_close(out[0], seen[1])
    torch.testing.assert_close(out[1], seen[-1])
    assert len(list(frozen.parameters())) == 0  # a frozen reference is neither trained nor saved
    assert len(list(UNetEncoderFeatures(unet, trainable=True).parameters())) > 0
    with pytest.raises(ValueError, match="levels"):
        UNetEncoderFeatures(unet, levels=[5])
    for h in hooks:
        h.remove()


def test_module_features_wraps_any_network():
    from lightning_distill.feature_net import DigitsFeatureNet

    net = DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=6)
    last = f"body.{len(net.body) - 1}"  # the penultimate (feature) layer
    feats = ModuleFeatures(net, layers=["body.3", "body.8", last])
    out = feats(torch.randn(2, 1, 8, 8))
    assert [tuple(f.shape) for f in out] == [(2, 4, 8, 8), (2, 8, 4, 4), (2, 6)]
    assert not any(p.requires_grad for p in net.parameters())

    class Pyramid(nn.Module):  # a user network that returns its own list of maps
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, stride=2, padding=1)

        def forward(self, x):
            h = self.a(x)
            return [h, self.b(h)]

    out = ModuleFeatures(Pyramid(), repeat_channels=3, resize_to=16, mean=[0.5] * 3, std=[0.5] * 3)(torch.randn(2, 1, 8, 8))
    assert [tuple(f.shape) for f in out] == [(2, 4, 16, 16), (2, 5, 8, 8)]
    with pytest.raises(ValueError, match="no block named"):
        ModuleFeatures(net, layers=["nope"])


def test_hf_vision_features_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lightning_distill.gan import HFVisionFeatures

    cfg = transformers.Dinov2Config(
        hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, image_size=16, patch_size=8
    )
    transformers.Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    feats = HFVisionFeatures(str(tmp_path / "dino"), hidden_layers=[1, 2], resize_to=16)
    out = feats(torch.randn(2, 1, 8, 8))
    assert [tuple(f.shape) for f in out] == [(2, 5, 8), (2, 5, 8)]  # 4 patches + CLS, width 8


# --- a GAN run: update counts and resume -------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import write_tiny_teacher
    from lightning_distill.teacher import load_teacher

    return load_teacher(write_tiny_teacher(tmp_path_factory.mktemp("adv") / "teacher"))


def loader(n: int = 8, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    data = [{"x": x[i], "label": torch.tensor(0)} for i in range(n)]
    return DataLoader(data, batch_size=batch_size, shuffle=False)  # fixed order: resume sees the same batches


def apt(teacher, **kw):
    from lightning_distill.methods.apt import AdversarialPostTraining

    torch.manual_seed(0)
    kw.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=1e-3))
    kw.setdefault("discriminator_optimizer", lambda p: torch.optim.AdamW(p, lr=1e-3))
    return AdversarialPostTraining(teacher, head_hidden=8, **kw)


def trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    return L.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=callbacks, deterministic=True, **kw
    )


def opt_steps(opt: torch.optim.Optimizer) -> int:
    """Steps an Adam-family optimiser has taken (its per-parameter step counter)."""
    p = next(p for g in opt.param_groups for p in g["params"] if p in opt.state)
    return int(opt.state[p]["step"])


def test_warmup_and_ratio_are_obeyed(teacher, tmp_path):
    model = apt(teacher)
    schedule = DiscriminatorSchedule(d_warmup_steps=2, d_updates_per_g=2)
    tr = trainer(tmp_path, [schedule], max_steps=4, enable_checkpointing=False)
    tr.fit(model, loader())
    g_opt, d_opt = tr.optimizers
    # 4 iterations: 2 warm-up (2 D steps each), then 2 x (2 D + 1 G); global_step counts iterations
    assert opt_steps(d_opt) == 8 and opt_steps(g_opt) == 2
    assert tr.global_step == 4 and int(model.gan_iteration) == 4
    assert (schedule.d_updates, schedule.g_updates, schedule.iterations) == (8, 2, 4)
    assert schedule.acc_real is not None and "gan/d_acc_real" in tr.callback_metrics


def test_fractional_ratio_without_a_schedule_and_backbone_freeze(teacher, tmp_path):
    model = apt(teacher, critic_updates=0.5)
    tr = trainer(tmp_path, [], max_steps=4, enable_checkpointing=False)
    tr.fit(model, loader())
    g_opt, d_opt = tr.optimizers
    assert opt_steps(g_opt) == 4 and opt_steps(d_opt) == 2  # D every other iteration

    model = apt(teacher)
    backbone0 = [p.detach().clone() for p in model.discriminator.backbone.parameters()]
    heads0 = [p.detach().clone() for p in model.discriminator.heads.parameters()]
    student0 = [p.detach().clone() for p in model.student.parameters()]
    tr = trainer(tmp_path, [DiscriminatorSchedule(d_warmup_steps=2, freeze_backbone_steps=2)], max_steps=2, enable_checkpointing=False)
    tr.fit(model, loader())
    same = lambda ps, qs: all(torch.equal(p, q) for p, q in zip(ps, qs))
    assert same(model.discriminator.backbone.parameters(), backbone0)  # frozen backbone: only heads moved
    assert not same(model.discriminator.heads.parameters(), heads0)
    assert same(model.student.parameters(), student0)  # D warm-up: the generator is untouched


def test_d_step_with_approx_r1_runs_d_three_times(teacher):
    model = apt(teacher, r1="approx", r1_weight=1.0)
    calls = []
    model.discriminator.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    batch = {"x": torch.rand(4, 1, 8, 8) * 2 - 1}
    out = model.critic_loss(batch, torch.Generator().manual_seed(0), StepPlan()).loss
    assert len(calls) == 3  # real, fake, perturbed real: D(real) is shared by the loss and the penalty
    assert out.logs["r1"].item() > 0


def test_schedule_warns_when_the_backbone_it_would_unfreeze_is_never_trained(teacher, tmp_path):
    schedule = DiscriminatorSchedule(freeze_backbone_steps=2)
    with pytest.warns(UserWarning, match="train_d_backbone=False"):
        schedule.setup(trainer(tmp_path, [], max_steps=1), apt(teacher, train_d_backbone=False), "fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trainable backbone: freezing it for a while is meaningful
        schedule.setup(trainer(tmp_path, [], max_steps=1), apt(teacher), "fit")
        DiscriminatorSchedule().setup(trainer(tmp_path, [], max_steps=1), apt(teacher, train_d_backbone=False), "fit")


def test_kill_and_resume_equals_an_uninterrupted_run(teacher, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_distill.callbacks import EMA

    def run(root, ckpt_path=None):
        model = apt(teacher)
        sched = DiscriminatorSchedule(d_warmup_steps=3, d_updates_per_g=1.5, d_lr_warmup_steps=5)
        ema = EMA(decay=0.5, warmup=False)
        ckpt = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
        tr = trainer(root, [sched, ema, ckpt], max_epochs=3)
        tr.fit(model, loader(), ckpt_path=ckpt_path)
        return model, sched, ema, tr

    full, sched_a, ema_a, tr_a = run(tmp_path / "full")
    # "kill" after epoch 2 (iteration 4, inside the D warm-up-to-ratio change), resume in a fresh Trainer
    resumed, sched_b, ema_b, tr_b = run(tmp_path / "resumed", ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    assert int(resumed.gan_iteration) == int(full.gan_iteration) == 6
    assert tr_a.global_step == tr_b.global_step
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"{name} differs after resume")
    for oa, ob in zip(tr_a.optimizers, tr_b.optimizers):
        sa, sb = oa.state_dict(), ob.state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        for k in sa["state"]:
            for key in sa["state"][k]:
                torch.testing.assert_close(sa["state"][k][key], sb["state"][k][key], rtol=0, atol=1e-6)
    assert sched_a.state_dict() == sched_b.state_dict()
    for a, b in zip(ema_a.averaged.parameters(), ema_b.averaged.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_step_plan_is_a_value():
    assert StepPlan() == StepPlan(True, 1, 1.0, 1.0, True)


def test_digits_classifier_features_default_layers():
    from lightning_distill.feature_net import BUNDLED_CLASSIFIER

    if not (BUNDLED_CLASSIFIER / "model.safetensors").is_file():
        pytest.skip("bundled digits classifier not trained yet")
    from lightning_distill.gan import DigitsClassifierFeatures

    feats = DigitsClassifierFeatures()
    out = feats(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert [f.ndim for f in out] == [4, 4, 2] and out[-1].shape == (2, feats.module.num_features)



def test_one_loop_and_one_settings_path_serve_every_adversarial_method(teacher):
    """ADD, APT and DMD2 share AdversarialMethod's training step; each declares only its own arguments,
    and the hyper-parameters (saved once, in the base class) hold every setting with subclass defaults."""
    from lightning_distill.methods.adversarial import AdversarialMethod
    from lightning_distill.methods.add import AdversarialDiffusionDistillation
    from lightning_distill.methods.apt import AdversarialPostTraining
    from lightning_distill.methods.dmd2 import DMD2

    for cls in (AdversarialDiffusionDistillation, AdversarialPostTraining, DMD2):
        assert cls.training_step is AdversarialMethod.training_step
        assert cls.plan is AdversarialMethod.plan and cls.configure_optimizers is AdversarialMethod.configure_optimizers
    add = AdversarialDiffusionDistillation(teacher, num_student_steps=2, head_hidden=8)
    assert add.hparams.sample_steps == 2 and add.hparams.r1_weight == 1e-2 and add.hparams.seed == 0
    assert add.hparams.gan_loss == "hinge" and add.hparams.critic_updates == 1.0
    dmd2 = DMD2(teacher, generator_steps=3, gan=False)
    assert dmd2.hparams.sample_steps == 3 and dmd2.hparams.generator_every == 5 and dmd2.hparams.gan_loss == "non_saturating"
    assert apt(teacher).hparams.r1 == "approx"
    for model in (add, dmd2):  # factories and networks stay out of the checkpoint's hyper-parameters
        assert not {"teacher", "optimizer", "discriminator_optimizer", "fake_score_optimizer", "feature_network"} & set(model.hparams)


def test_an_iteration_without_updates_is_refused(teacher, tmp_path):
    """max_steps counts iterations only if each takes an optimiser step: plans that update nothing are bad input."""
    from lightning_distill.errors import ConfigError

    with pytest.raises(ConfigError, match="critic_updates"):
        apt(teacher, critic_updates=0.5, critic_warmup=2)
    model = apt(teacher)
    tr = trainer(tmp_path, [DiscriminatorSchedule(d_warmup_steps=3, freeze_d_after=1)], max_steps=3, enable_checkpointing=False)
    with pytest.raises(ConfigError, match="iteration 1 would update no network"):
        tr.fit(model, loader())
