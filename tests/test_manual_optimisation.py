"""Manual optimisation shared by ADD, APT and DMD2: clipping after the GradScaler unscales (16-mixed),
several optimisers from one backward, and per-rank random streams under DDP."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader

from lightning_distill.data import TeacherDataModule, TensorImageDataset
from lightning_distill.gan import StepPlan, iteration_generator
from lightning_distill.methods.add import AdversarialDiffusionDistillation
from lightning_distill.methods.manual_optimisation import ManualOptimisation
from lightning_distill.methods.dmd2 import DMD2

CLIP = 1e-2  # far below these networks' gradient norms, so the clip binds on every step


def _loader(n=4):
    images = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return DataLoader(TensorImageDataset(images, torch.zeros(n, dtype=torch.long)), batch_size=n)


def _fp16_trainer(tmp_path, max_steps):
    # 16-mixed with a real GradScaler on the CPU (the Trainer flag refuses fp16 on CPU; the plugin does not)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    return L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, enable_checkpointing=False, default_root_dir=tmp_path,
                     accelerator="cpu", plugins=[plugin])


def _record_grad_norms():
    """Norm of each optimiser's gradients at the moment it steps (after unscaling and clipping)."""
    norms: dict[int, list[float]] = {}

    def hook(opt, args, kwargs):
        grads = [p.grad.float() for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.setdefault(id(opt), []).append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    return norms, register_optimizer_step_pre_hook(hook)


def _models(teacher_dir):
    dm = TeacherDataModule(teacher=str(teacher_dir), image_size=8, batch_size=4)
    torch.manual_seed(0)
    add = AdversarialDiffusionDistillation(dm.teacher, num_student_steps=2, head_hidden=8,
                                           generator_grad_clip=CLIP, discriminator_grad_clip=CLIP)
    dmd2 = DMD2(teacher=dm.teacher, generator_every=1, gan=True, generator_grad_clip=CLIP,
                fake_score_grad_clip=CLIP, discriminator_grad_clip=CLIP)
    return {"add": add, "dmd2": dmd2}


@pytest.mark.parametrize("method", ["add", "dmd2"])
def test_16_mixed_clips_the_unscaled_gradients(tiny_teacher_dir, tmp_path, method):
    """Under 16-mixed the clip limits the gradient the optimiser applies. Clipping before the plugin
    unscales would leave norms of CLIP / 65536 (~1.5e-7) instead of CLIP."""
    model = _models(tiny_teacher_dir)[method]
    norms, handle = _record_grad_norms()
    try:
        _fp16_trainer(tmp_path, max_steps=4).fit(model, _loader())
    finally:
        handle.remove()
    ids = {id(o.optimizer) for o in model.optimizers()}
    stepped = {k: v for k, v in norms.items() if k in ids}
    assert len(stepped) == len(ids)  # every network stepped at least once (overflow steps are skipped)
    for values in stepped.values():
        assert all(v <= CLIP * 1.001 for v in values) and max(values) > CLIP * 0.5, values


def test_optimisers_of_one_backward_follow_a_changed_loss_scale():
    """When the scaler's update after the first step changes the scale, the optimisers still to step get
    their gradients rescaled to it (the plugin unscales them by the new scale); earlier ones untouched."""
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    opts = [torch.optim.SGD([p], lr=1.0) for p in params]
    for p in params:
        p.grad = torch.full((3,), 8.0)
    scaler = SimpleNamespace(scale=4.0)
    scaler.get_scale = lambda: scaler.scale

    def step(opt, clip, counted):
        if opt is opts[0]:
            scaler.scale = 2.0  # an overflow halved the scale after the first step

    fake = SimpleNamespace(trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler)), step_optimizer=step)
    ManualOptimisation.step_optimizers(fake, [(o, None, False) for o in opts])
    assert params[0].grad.tolist() == [8.0] * 3
    assert params[1].grad.tolist() == params[2].grad.tolist() == [4.0] * 3
    # without a scaler (fp32, bf16) nothing is rescaled
    fake.trainer.precision_plugin = SimpleNamespace()
    fake.step_optimizer = lambda *a: None
    ManualOptimisation.step_optimizers(fake, [(o, None, False) for o in opts])
    assert params[1].grad.tolist() == [4.0] * 3


def test_iteration_streams_differ_by_rank_and_never_replay_evaluation_noise():
    """Each (seed, step, rank) its own stream, none an evaluation chunk's (metrics.chunk_seed): the previous
    seed * 1_000_003 + step was chunk_seed(seed, step), so APT's input noise at iteration c was evaluation
    chunk c's first rows."""
    from lightning_distill.metrics import chunk_seed

    draw = lambda seed=3, step=17, **kw: torch.randn(4, generator=iteration_generator(seed, step, torch.device("cpu"), **kw))  # noqa: E731
    torch.testing.assert_close(draw(rank=1), draw(rank=1))
    assert not torch.allclose(draw(rank=0), draw(rank=1))
    for seed in range(3):
        chunks = [torch.randn(4, generator=torch.Generator().manual_seed(chunk_seed(seed, c))) for c in range(8)]
        for step in range(8):
            assert not any(torch.allclose(draw(seed, step), c) for c in chunks), (seed, step)


@pytest.mark.parametrize("method", ["add", "dmd2"])
def test_methods_draw_their_iteration_noise_per_rank(tiny_teacher_dir, method):
    """Under DDP each rank generates its own fake batch: the method's stream follows ``global_rank``."""
    model = _models(tiny_teacher_dir)[method]
    draws = []
    for rank in (0, 1):
        model._trainer = SimpleNamespace(global_rank=rank)
        draws.append(torch.randn(4, generator=model.step_generator(5)))
    model._trainer = None
    torch.testing.assert_close(draws[0], torch.randn(4, generator=iteration_generator(0, 5, torch.device("cpu"))))
    assert not torch.allclose(draws[0], draws[1])


# --- the GAN losses are wired the right way round -------------------------------------------------
# A small gradient step on each network's loss must move the discriminator's logits in its favour:
# a D step raises real logits against fake ones, a G step (D fixed) raises the fakes' logits. Swapping
# real and fake in the D loss, or the sign of the G term, turns these around.


def _sgd_step(loss, params, lr):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p -= lr * g


def _gan_models(teacher_dir):
    dm = TeacherDataModule(teacher=str(teacher_dir), image_size=8, batch_size=4)
    torch.manual_seed(0)
    add = AdversarialDiffusionDistillation(dm.teacher, num_student_steps=2, head_hidden=8, distill_weight=0.0)
    dmd2 = DMD2(teacher=dm.teacher, gan=True, gan_generator_weight=1e4, gan_discriminator_weight=1.0)
    return add, dmd2


def _critic(model, batch, gen):
    """(loss, real logits, fake logits) of one critic update without R1."""
    out = model.critic_loss(batch, gen, StepPlan(r1_scale=0.0))
    return out.loss, out.real_logits, out.fake_logits


def _batch():
    return {"x": torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1,
            "label": torch.zeros(4, dtype=torch.long)}


def test_add_steps_move_the_logits_each_network_wants(tiny_teacher_dir):
    model = _gan_models(tiny_teacher_dir)[0]
    batch, gen = _batch(), lambda: iteration_generator(0, 3, torch.device("cpu"))
    d_params = [p for p in model.discriminator.parameters() if p.requires_grad]
    g_params = [p for p in model.student.parameters() if p.requires_grad]
    out, real0, fake0 = _critic(model, batch, gen())
    _sgd_step(out.loss, d_params, lr=1e-2)
    _, real1, fake1 = _critic(model, batch, gen())
    assert (real1 - fake1).mean() > (real0 - fake0).mean()
    _sgd_step(model.generator_loss(batch, gen()).loss, g_params, lr=1e-3)
    _, _, fake2 = _critic(model, batch, gen())
    assert fake2.mean() > fake1.mean()


def test_dmd2_steps_move_the_logits_each_network_wants(tiny_teacher_dir):
    model = _gan_models(tiny_teacher_dir)[1]
    batch, gen = _batch(), lambda: iteration_generator(0, 3, torch.device("cpu"))
    head = list(model.discriminator_head.parameters())
    out, real0, fake0 = _critic(model, batch, gen())
    _sgd_step(out.loss, head, lr=1e-2)  # the head alone: the fake score's denoising loss moves nothing here
    _, real1, fake1 = _critic(model, batch, gen())
    assert (real1 - fake1).mean() > (real0 - fake0).mean()
    _sgd_step(model.generator_loss(batch, gen()).loss, list(model.student.parameters()), lr=1e-6)
    _, _, fake2 = _critic(model, batch, gen())
    assert fake2.mean() > fake1.mean()


def test_true_r1_runs_outside_fp16_autocast():
    """R1's inner input gradient is not loss-scaled, so it is taken in fp32 even inside fp16 autocast."""
    from lightning_distill.gan import r1_penalty

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    d = lambda x: torch.tanh(conv(x)).flatten(1)
    x = torch.randn(4, 1, 8, 8)
    exact = r1_penalty(d, x)
    with torch.autocast("cpu", dtype=torch.float16):
        half = r1_penalty(d, x)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, exact, rtol=1e-6, atol=0.0)


def test_add_true_r1_trains_under_16_mixed(tiny_teacher_dir, tmp_path):
    dm = TeacherDataModule(teacher=str(tiny_teacher_dir), image_size=8, batch_size=4)
    model = AdversarialDiffusionDistillation(dm.teacher, num_student_steps=2, head_hidden=8, r1="true", r1_weight=1.0)
    trainer = _fp16_trainer(tmp_path, max_steps=2)
    trainer.fit(model, _loader())
    assert torch.isfinite(trainer.callback_metrics["train/r1"]) and trainer.callback_metrics["train/r1"] > 0
