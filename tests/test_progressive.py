"""Progressive distillation: x_tilde and the loss in closed form, one round on toy data, the TeacherSwap
callback's hooks and kill-and-resume equality, the debug preset, and the unreachable-final-steps error.

Closed form used throughout (as in test_parametrisation.py): for Gaussian data x0 ~ N(mu, s^2 I) and
z_t = alpha x0 + sigma eps, the ideal denoiser is E[x0 | z_t] = mu + k_t (z_t - alpha_t mu) with
k_t = alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2). Every DDIM step is then affine in z, so the teacher's
two-step result and x_tilde are affine in z_t too: x_tilde = A z_t + B with A, B computed below by hand.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_distill.callbacks import EMA
from lightning_distill.callbacks.progressive import TeacherSwap
from lightning_distill.methods.progressive import (
    sampler_grid_gap,
    ProgressiveDistillation,
    check_halving,
    progressive_loss,
    round_lr_factor,
    student_timesteps,
    two_step_target,
    x_tilde,
)
from lightning_distill.parametrisation import ddim_step, output_for
from lightning_distill.teacher import DiffusionTeacher, load_teacher
from lightning_distill.errors import ConfigError

from conftest import write_tiny_teacher

T = 1024
REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = REPO / "configs" / "progressive" / "debug.yaml"


def _scheduler(prediction_type: str = "v_prediction") -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )


ALPHAS_CUMPROD = _scheduler().alphas_cumprod.double()


def _alpha_sigma(t: int) -> tuple[float, float]:
    ac = 1.0 if t < 0 else float(ALPHAS_CUMPROD[t])
    return math.sqrt(ac), math.sqrt(1.0 - ac)


# --- networks with the UNet call signature --------------------------------------------------------


class AnalyticGaussianNet(nn.Module):
    """The ideal denoiser of x0 ~ N(mu, s^2 I) (mu per class when ``class_mus`` is given), as v / eps / x0."""

    def __init__(self, mu: float, s: float, kind: str = "v_prediction", size: int = 4, class_mus=None) -> None:
        super().__init__()
        self.mu, self.s, self.kind = mu, s, kind
        self.register_buffer("ac", ALPHAS_CUMPROD.float().clone())
        self.class_mus = None if class_mus is None else torch.tensor(class_mus)
        n_cls = None if class_mus is None else len(class_mus)
        self.config = SimpleNamespace(sample_size=size, in_channels=1, num_class_embeds=n_cls)

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        ac = self.ac[timestep.long()]
        a, sg = ac.sqrt().view(-1, 1, 1, 1), (1 - ac).sqrt().view(-1, 1, 1, 1)
        mu = torch.full_like(a, self.mu)
        if self.class_mus is not None:
            if class_labels is None:
                raise TypeError("class-conditional net called without class_labels")
            mu = self.class_mus[class_labels].view(-1, 1, 1, 1).to(sample)
        k = a * self.s**2 / (a**2 * self.s**2 + sg**2)
        x0 = mu + k * (sample - a * mu)
        return (output_for(self.kind, x0, sample, a.flatten(), sg.flatten()),)


class AffineNet(nn.Module):
    """out = scale[t] * x + shift[t, class]: a per-timestep affine map (enough for Gaussian data)."""

    def __init__(self, size: int = 4, num_classes: int | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(T))
        self.shift = nn.Parameter(torch.zeros(T, num_classes or 1))
        self.config = SimpleNamespace(sample_size=size, in_channels=1, num_class_embeds=num_classes)

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        t = timestep.long()
        c = torch.zeros_like(t) if class_labels is None else class_labels
        return (self.scale[t].view(-1, 1, 1, 1) * sample + self.shift[t, c].view(-1, 1, 1, 1),)


def gaussian_teacher(mu=0.3, s=0.4, kind="v_prediction", class_mus=None) -> DiffusionTeacher:
    net = AnalyticGaussianNet(mu, s, kind, class_mus=class_mus)
    return DiffusionTeacher(net, _scheduler(kind), source=None, clip_x0=None)


def closed_form_target(mu: float, s: float, t: int, m: int, u: int) -> tuple[float, float]:
    """(A, B) with x_tilde = A z_t + B, by hand: two affine DDIM steps t -> m -> u, then Algorithm 2."""

    def ddim_affine(t_from: int, t_to: int) -> tuple[float, float]:
        a, sg = _alpha_sigma(t_from)
        a2, sg2 = _alpha_sigma(t_to)
        k = a * s**2 / (a**2 * s**2 + sg**2)
        # x_hat = mu (1 - k a) + k z ; z_to = P x_hat + Q z with P = a2 - sg2 a / sg, Q = sg2 / sg
        P, Q = a2 - sg2 * a / sg, sg2 / sg
        return P * k + Q, P * mu * (1 - k * a)

    g1, h1 = ddim_affine(t, m)
    g2, h2 = ddim_affine(m, u)
    gz, hz = g2 * g1, g2 * h1 + h2  # z_u = gz z_t + hz
    a_t, sg_t = _alpha_sigma(t)
    a_u, sg_u = _alpha_sigma(u)
    den = a_u - sg_u / sg_t * a_t
    return (gz - sg_u / sg_t) / den, hz / den


def oracle_student(mu: float, s: float, n_steps: int, kind: str, class_mus=None, delta: float = 0.0) -> AffineNet:
    """An AffineNet whose x0 prediction is x_tilde (+ delta) exactly at every student grid point."""
    net = AffineNet(num_classes=None if class_mus is None else len(class_mus))
    grid = [int(g) for g in gaussian_teacher().schedule.trailing_timesteps(2 * n_steps)]
    mus = [mu] if class_mus is None else list(class_mus)
    with torch.no_grad():
        for i in range(n_steps):
            t, m, u = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
            a, sg = _alpha_sigma(t)
            for c, mu_c in enumerate(mus):
                A, B = closed_form_target(mu_c, s, t, m, u)
                B += delta
                if kind == "sample":
                    net.scale[t], net.shift[t, c] = A, B
                else:  # v = (alpha z - x0) / sigma
                    net.scale[t], net.shift[t, c] = (a - A) / sg, -B / sg
    return net


# --- maths -----------------------------------------------------------------------------------------


def test_x_tilde_makes_one_ddim_step_land_on_the_target():
    g = torch.Generator().manual_seed(0)
    z_t, z_teacher = torch.randn(6, 1, 2, 2, generator=g), torch.randn(6, 1, 2, 2, generator=g)
    t = torch.tensor([1023, 800, 500, 200, 63, 10])
    s = torch.tensor([900, 700, 300, 100, 31, -1])
    sched = gaussian_teacher().schedule
    a_t, sg_t, a_s, sg_s = sched.alpha(t), sched.sigma(t), sched.alpha(s), sched.sigma(s)
    x = x_tilde(z_teacher, z_t, a_t, sg_t, a_s, sg_s)
    eps = (z_t - a_t.view(-1, 1, 1, 1) * x) / sg_t.view(-1, 1, 1, 1)
    torch.testing.assert_close(ddim_step(x, eps, a_s, sg_s), z_teacher, atol=1e-4, rtol=1e-4)
    # the clean endpoint s = -1 (sigma_s = 0): x_tilde is the teacher's result itself
    torch.testing.assert_close(x[-1], z_teacher[-1])


def test_point_mass_data_gives_x_tilde_equal_to_the_point():
    # s = 0: the ideal teacher always predicts mu, DDIM is exact, so the target is mu at every step.
    teacher = gaussian_teacher(mu=0.7, s=0.0)
    z = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for n in (1, 2, 8):
        i = torch.arange(8) % n
        t, m, u = student_timesteps(teacher.schedule, n, i)
        target = two_step_target(teacher.denoiser, z, t, m, u)
        torch.testing.assert_close(target, torch.full_like(z, 0.7), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon", "sample"])
def test_two_step_target_matches_closed_form(kind):
    mu, s, n = 0.3, 0.4, 4
    teacher = gaussian_teacher(mu, s, kind)
    z = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    i = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    t, m, u = student_timesteps(teacher.schedule, n, i)
    grid = teacher.schedule.trailing_timesteps(2 * n)
    assert t.tolist() == grid[2 * i].tolist() and u.tolist()[3] == -1
    target = two_step_target(teacher.denoiser, z, t, m, u)
    # An eps teacher's x0 = (z - sigma eps) / alpha loses float32 digits at t = T-1 (alpha ~ 0.0016).
    tol = 2e-3 if kind == "epsilon" else 2e-4
    for b in range(8):
        A, B = closed_form_target(mu, s, int(t[b]), int(m[b]), int(u[b]))
        torch.testing.assert_close(target[b], A * z[b] + B, atol=tol, rtol=tol)


def test_student_grid_is_what_the_stock_sampler_visits_and_off_grid_rounds_warn(recwarn):
    """The N-step student trains from point 2i onto point 2i + 2 of the 2N-step grid (the N-step grid). Where N
    divides T (T = 1024 here), diffusers' DDIM, built as the student's sampler, steps from exactly those
    timesteps onto exactly those (checked on DDIMScheduler's own timesteps and its t - T // N step), and
    nothing warns. With T = 1000 (SD / DDPM) N = 32 and 16 land between the trained levels and N = 6 stops
    at t = 0 with noise left (its N = 3 round is off too); on a shift-3 flow teacher every N >= 3 samples off the trailing grid: the
    method warns before training, naming those N."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    teacher = gaussian_teacher()
    sched = teacher.schedule
    for n in (8, 4, 2, 1):
        t, _, u = student_timesteps(sched, n, torch.arange(n))
        ddim = ProgressiveDistillation(teacher, num_student_steps=n, num_log_samples=0).make_scheduler()
        ddim.set_timesteps(n)
        visited = ddim.timesteps.long()
        assert t.tolist() == visited.tolist()
        assert u.tolist() == (visited - T // n).clamp_min(-1).tolist()
        assert sampler_grid_gap(ddim, sched, n) == 0.0
    assert not [w for w in recwarn if "off the grid" in str(w.message)]

    t1000 = DiffusionTeacher(AnalyticGaussianNet(0.3, 0.4), DDIMScheduler(num_train_timesteps=1000), source=None)
    with pytest.warns(UserWarning, match=r"at N = \[32, 16\] steps the stock sampler visits noise levels up to"):
        ProgressiveDistillation(t1000, num_student_steps=32, num_log_samples=0)
    with pytest.warns(UserWarning, match=r"at N = \[6, 3\] steps.*T = 1000"):
        ProgressiveDistillation(t1000, num_student_steps=6, num_log_samples=0)
    flow = DiffusionTeacher(
        AnalyticGaussianNet(0.3, 0.4, "flow_prediction"), FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0),
        source=None,
    )
    with pytest.warns(UserWarning, match=r"at N = \[8, 4\] steps.*flow shift"):
        ProgressiveDistillation(flow, num_student_steps=8, num_log_samples=0)


def test_loss_weighting_closed_form():
    x_hat = torch.zeros(3, 1, 2, 2)
    target = torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    snr = torch.tensor([0.25, 4.0, 1.0])
    # per-sample squared errors 1, 4, 0.25
    assert progressive_loss(x_hat, target, snr).item() == pytest.approx((1 * 1 + 4 * 4 + 0.25 * 1) / 3)
    assert progressive_loss(x_hat, target, snr, "snr_plus_one").item() == pytest.approx(
        (1 * 1.25 + 4 * 5 + 0.25 * 2) / 3
    )
    with pytest.raises(ValueError, match="truncated_snr"):
        progressive_loss(x_hat, target, snr, "snr")


def test_round_lr_factor_and_halving():
    assert [round_lr_factor(k, 4) for k in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert round_lr_factor(10, None) == 1.0
    assert check_halving(64, 1) == 6 and check_halving(8, 8) == 0
    with pytest.raises(ValueError, match=r"final_steps=3 is not reachable .* \[64, 32, 16, 8, 4, 2, 1\]"):
        check_halving(64, 3)
    with pytest.raises(ValueError, match="final_steps=16"):
        check_halving(8, 16)


# --- the method's loss -----------------------------------------------------------------------------


def _batch(n=16, labels=None):
    x = 0.3 + 0.4 * torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    return {"x": x, "label": torch.zeros(n, dtype=torch.long) if labels is None else labels}


@pytest.mark.parametrize("student_kind", ["v_prediction", "sample"])
@pytest.mark.parametrize("teacher_kind", ["v_prediction", "epsilon"])
def test_oracle_student_has_zero_loss(student_kind, teacher_kind):
    teacher = gaussian_teacher(0.3, 0.4, teacher_kind)
    for n in (1, 4):
        student = oracle_student(0.3, 0.4, n, student_kind)
        model = ProgressiveDistillation(teacher, student=student, num_student_steps=n, student_prediction_type=student_kind)
        assert model.compute_loss(_batch()).loss.item() < 1e-6  # float32 round-off (eps teacher at t = T-1)
        # an x0 error of delta at t = T-1 (N = 1, SNR < 1 so the weight is 1) costs exactly delta^2
    off = oracle_student(0.3, 0.4, 1, student_kind, delta=0.1)
    model = ProgressiveDistillation(teacher, student=off, num_student_steps=1, student_prediction_type=student_kind)
    assert model.compute_loss(_batch()).loss.item() == pytest.approx(0.01, rel=1e-3)


def test_class_conditional_oracle_has_zero_loss():
    mus = [-0.5, 0.2, 0.6]
    teacher = gaussian_teacher(0.0, 0.3, class_mus=mus)
    student = oracle_student(0.0, 0.3, 2, "v_prediction", class_mus=mus)
    model = ProgressiveDistillation(teacher, student=student, num_student_steps=2)
    assert model.is_class_conditional
    labels = torch.arange(16) % 3
    assert model.compute_loss(_batch(labels=labels)).loss.item() < 1e-8
    # the labels matter: the same student scored against shuffled labels is far off
    wrong = oracle_student(0.0, 0.3, 2, "v_prediction", class_mus=mus[::-1])
    model_wrong = ProgressiveDistillation(teacher, student=wrong, num_student_steps=2)
    assert model_wrong.compute_loss(_batch(labels=labels)).loss.item() > 1e-3


def test_constructor_errors():
    teacher = gaussian_teacher()
    with pytest.raises(ValueError, match="epsilon.*choose one of"):
        ProgressiveDistillation(teacher, student=AffineNet(), student_prediction_type="epsilon")
    with pytest.raises(ValueError, match="num_student_steps"):
        ProgressiveDistillation(teacher, student=AffineNet(), num_student_steps=T)


# --- one round on toy data -------------------------------------------------------------------------


class FixedBatches(L.LightningDataModule):
    """One fixed batch per epoch (no shuffling), so a resumed run sees exactly the same data."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = x

    def train_dataloader(self):
        class _DS(Dataset):
            def __len__(_self):
                return self.x.shape[0]

            def __getitem__(_self, i):
                return {"x": self.x[i], "label": torch.tensor(0)}

        return DataLoader(_DS(), batch_size=self.x.shape[0], shuffle=False)


def _trainer(callbacks, tmp_path, **kw):
    return L.Trainer(
        accelerator="cpu",
        max_epochs=-1,
        max_steps=kw.pop("max_steps", 1000),
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        **kw,
    )


def test_one_round_makes_a_one_step_student_match_the_two_step_teacher(tmp_path):
    from diffusers.utils.torch_utils import randn_tensor

    torch.manual_seed(0)
    teacher = gaussian_teacher(0.3, 0.4)
    model = ProgressiveDistillation(
        teacher, student=AffineNet(), num_student_steps=1, optimizer=lambda p: torch.optim.Adam(p, lr=0.05)
    )
    x = 0.3 + 0.4 * torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(4))

    def both():
        noise = randn_tensor((64, 1, 4, 4), generator=torch.Generator().manual_seed(5))
        grid = teacher.schedule.trailing_timesteps(2)
        z = teacher.denoiser.ddim(noise, grid[0], grid[1])
        z = teacher.denoiser.ddim(z, grid[1], grid[2])  # the teacher's 2-step DDIM sample
        student = model.sample(64, 1, torch.Generator().manual_seed(5), denoiser=model.student)  # diffusers loop
        return student, z

    s0, t0 = both()
    assert (s0 - t0).abs().max() > 0.1  # the untrained student does not match
    swap = TeacherSwap(steps_per_round=150, final_steps=1)
    trainer = _trainer([swap], tmp_path)
    trainer.fit(model, FixedBatches(x))
    assert trainer.global_step == 150 and swap.finished and model.num_student_steps == 1
    s1, t1 = both()
    torch.testing.assert_close(s1, t1, atol=0.02, rtol=0)
    # ... and it was the 2-step teacher it matched, not the data: its spread is the teacher's
    assert abs(s1.std().item() - t1.std().item()) < 0.01


# --- TeacherSwap: hooks, kill-and-resume -----------------------------------------------------------


class Probe(L.Callback):
    """Records, after every optimiser step, what the swap must have changed."""

    def __init__(self) -> None:
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        opt = trainer.optimizers[0]
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        self.rows.append(
            dict(
                step=trainer.global_step,
                n=pl_module.num_student_steps,
                sample_steps=pl_module.hparams.sample_steps,
                opt=id(opt),
                opt_state=len(opt.state),
                lr=opt.param_groups[0]["lr"],
                ema_n=int(ema.averaged.n_averaged),
                teacher_is_student=all(
                    torch.equal(a, b) for a, b in zip(pl_module.teacher.unet.parameters(), pl_module.student.unet.parameters())
                ),
            )
        )


def _progressive_run(teacher_dir, root, ckpt_path=None, max_steps=1000, probe=None, steps_per_round=3, promote="student",
                     first=None):
    """4 -> 2 -> 1 steps, 3 optimiser steps per round (or ``steps_per_round``), on a tiny UNet teacher;
    checkpoint every step. ``probe`` runs after every other callback, ``first`` before them."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    teacher = load_teacher(str(teacher_dir))
    model = ProgressiveDistillation(teacher, num_student_steps=4, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    swap = TeacherSwap(steps_per_round=steps_per_round, final_steps=1, promote=promote)
    ema = EMA(decay=0.9)
    callbacks = ([first] if first else []) + [swap, ema, ckpt] + ([probe] if probe else [])
    trainer = _trainer(callbacks, root, max_steps=max_steps, enable_checkpointing=True)
    trainer.fit(model, FixedBatches(x), ckpt_path=ckpt_path)
    return trainer, model, swap, ema


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("progressive_run")
    teacher_dir = write_tiny_teacher(root / "teacher")
    probe = Probe()
    trainer, model, swap, ema = _progressive_run(teacher_dir, root / "full", probe=probe)
    return SimpleNamespace(root=root, teacher_dir=teacher_dir, trainer=trainer, model=model, swap=swap, ema=ema, probe=probe)


def test_swap_hook_behaviour(uninterrupted):
    run = uninterrupted
    rows = {r["step"]: r for r in run.probe.rows}
    assert run.trainer.global_step == 9 and run.swap.finished  # 3 rounds of 3 steps, stopped at N = 1
    assert [rows[k]["n"] for k in range(1, 10)] == [4, 4, 2, 2, 2, 1, 1, 1, 1]
    assert [rows[k]["n"] for k in range(1, 10)] == [rows[k]["sample_steps"] for k in range(1, 10)]
    # at a swap (steps 3 and 6) the teacher is a copy of the student, with its own tensors
    assert rows[3]["teacher_is_student"] and rows[6]["teacher_is_student"] and not rows[2]["teacher_is_student"]
    assert run.model.teacher.unet is not run.model.student.unet
    assert not run.model.teacher.reloadable and not any(p.requires_grad for p in run.model.teacher.parameters())
    assert not run.model.teacher.training
    # a fresh optimiser (empty state) and a fresh linearly annealed LR schedule every round
    assert rows[2]["opt"] == rows[1]["opt"] and rows[3]["opt"] != rows[2]["opt"] and rows[3]["opt_state"] == 0
    assert [round(rows[k]["lr"] / 1e-3, 6) for k in range(1, 10)] == pytest.approx(
        [2 / 3, 1 / 3, 1, 2 / 3, 1 / 3, 1, 2 / 3, 1 / 3, 0]
    )
    # the sampling EMA restarts at every swap
    assert rows[2]["ema_n"] == 2 and rows[3]["ema_n"] <= 1 and rows[6]["ema_n"] <= 1 and rows[5]["ema_n"] == 3


def test_teacher_in_checkpoints_follows_the_base_rule(uninterrupted):
    ckpts = uninterrupted.root / "full" / "ckpt"
    early = torch.load(ckpts / "step=2.ckpt", map_location="cpu", weights_only=False)
    mid = torch.load(ckpts / "step=7.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("teacher.") for k in early["state_dict"])  # reloadable round-0 teacher
    assert any(k.startswith("teacher.") for k in mid["state_dict"])  # promoted teacher: saved in full
    assert mid["progressive"]["round"] == 2 and mid["progressive"]["num_student_steps"] == 1
    swap_state = next(v for k, v in mid["callbacks"].items() if k.startswith("TeacherSwap"))
    assert swap_state["round"] == 2 and swap_state["num_student_steps"] == 1 and swap_state["round_start_step"] == 6
    # the evaluator's loader rebuilds a mid-run checkpoint: N, round and the promoted teacher come back
    from lightning_distill.evaluate import load_checkpoint_model

    path = ckpts / "step=7.ckpt"
    model, _ = load_checkpoint_model(path, load_teacher(str(uninterrupted.teacher_dir)),
                                     class_path="lightning_distill.methods.progressive.ProgressiveDistillation")
    assert (model.round_index, model.num_student_steps, model.hparams.sample_steps) == (2, 1, 1)
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, mid["state_dict"][f"teacher.{k}"])


def test_kill_mid_round_3_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
    run = uninterrupted
    ckpt = run.root / "full" / "ckpt" / "step=7.ckpt"  # inside round 3 (index 2), teacher = round-3 teacher
    trainer, model, swap, ema = _progressive_run(run.teacher_dir, tmp_path / "resumed", ckpt_path=str(ckpt))
    assert trainer.global_step == 9 and swap.finished
    assert (model.round_index, model.num_student_steps) == (2, 1) and swap.state_dict()["round"] == 2
    assert not model.teacher.reloadable  # saved again in the next checkpoint
    for name, a, b in [
        ("student", model.student.state_dict(), run.model.student.state_dict()),
        ("teacher", model.teacher.state_dict(), run.model.teacher.state_dict()),
        ("ema", ema.averaged.state_dict(), run.ema.averaged.state_dict()),
    ]:
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(a[k], b[k], msg=f"{name}.{k}")
    # the resumed teacher is not the original teacher
    original = load_teacher(str(run.teacher_dir))
    assert not all(torch.equal(a, b) for a, b in zip(original.unet.parameters(), model.teacher.unet.parameters()))
    ref, got = run.swap.state_dict(), swap.state_dict()
    assert {k: got[k] for k in ("round", "num_student_steps", "round_start_step", "finished")} == {
        k: ref[k] for k in ("round", "num_student_steps", "round_start_step", "finished")
    }
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(run.trainer.optimizers[0].param_groups[0]["lr"])


class WeightProbe(L.Callback):
    """After every optimiser step: copies of the student's, the teacher's and the EMA's networks."""

    def __init__(self) -> None:
        self.rows = {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        copy = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
        self.rows[trainer.global_step] = dict(
            student=copy(pl_module.student.unet), teacher=copy(pl_module.teacher.unet), ema=copy(ema.averaged.module.unet),
            n=int(ema.averaged.n_averaged),
        )


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_promote_ema_makes_the_average_the_next_teacher_and_student_and_resumes_exactly(tmp_path):
    """promote="ema": at the swaps (steps 3 and 6) the new teacher and the student both hold the EMA with the
    swap step's own update averaged in, although TeacherSwap runs before EMA here (it read the average one
    update behind before), not the raw student; the default promotes the raw student. A kill inside round 3
    resumes to the same weights."""
    from lightning_distill.callbacks.ema import ema_decay

    class RawStudent(L.Callback):  # listed first: the raw student of every step, before any swap
        rows = {}

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.rows[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.student.unet.state_dict().items()}

    teacher_dir = write_tiny_teacher(tmp_path / "teacher")
    probe, raw_student = WeightProbe(), RawStudent()
    trainer, model, swap, ema = _progressive_run(teacher_dir, tmp_path / "full", probe=probe, promote="ema", first=raw_student)
    assert trainer.global_step == 9 and swap.finished
    rows = probe.rows
    for k in (3, 6):
        before = rows[k - 1]
        assert not _equal(before["ema"], before["student"])  # the average and the raw weights differ
        d = ema_decay(before["n"], 0.9, True)  # the EMA's update at step k (its n-th), taken before the swap
        for name, v in rows[k]["teacher"].items():  # the promoted teacher is the average, step k included
            if v.is_floating_point():
                torch.testing.assert_close(v, d * before["ema"][name] + (1 - d) * raw_student.rows[k][name], msg=name)
        assert _equal(rows[k]["student"], rows[k]["teacher"])  # and the next round's student starts from it
    # the default promotes the raw student (the teacher differs from the EMA before the swap)
    raw = WeightProbe()
    _progressive_run(teacher_dir, tmp_path / "raw", probe=raw, max_steps=3)
    assert not _equal(raw.rows[3]["teacher"], raw.rows[2]["ema"])
    # kill-and-resume inside round 3 reproduces the uninterrupted run
    _, resumed, _, ema2 = _progressive_run(
        teacher_dir, tmp_path / "resumed", ckpt_path=str(tmp_path / "full" / "ckpt" / "step=7.ckpt"), promote="ema"
    )
    for a, b in [(resumed.student, model.student), (resumed.teacher, model.teacher), (ema2.averaged, ema.averaged)]:
        for k, v in a.state_dict().items():
            torch.testing.assert_close(v, b.state_dict()[k], msg=k)


def test_promote_ema_without_an_ema_callback_fails_at_setup(tmp_path):
    model = ProgressiveDistillation(gaussian_teacher(0.0, 1.0), student=AffineNet(), num_student_steps=2)
    trainer = _trainer([TeacherSwap(steps_per_round=2, final_steps=1, promote="ema")], tmp_path)
    with pytest.raises(ConfigError, match="needs an EMA callback"):
        trainer.fit(model, FixedBatches(torch.zeros(4, 1, 4, 4)))
    with pytest.raises(ConfigError, match=r"promote must be one of \['student', 'ema'\], got 'average'"):
        TeacherSwap(promote="average")


def test_per_round_step_budgets_end_rounds_anneal_and_resume(tmp_path):
    """steps_per_round=[2, 3, 4]: rounds end at steps 2, 5 and 9, each anneals its rate over its own
    budget, and a resume inside the last round (restored after the method's round) keeps that budget."""
    teacher_dir = write_tiny_teacher(tmp_path / "teacher")
    probe = Probe()
    trainer, model, swap, ema = _progressive_run(teacher_dir, tmp_path / "full", probe=probe, steps_per_round=[2, 3, 4])
    rows = {r["step"]: r for r in probe.rows}
    assert trainer.global_step == 9 and swap.finished
    assert [rows[k]["n"] for k in range(1, 10)] == [4, 2, 2, 2, 1, 1, 1, 1, 1]
    assert [rows[k]["lr"] / 1e-3 for k in range(1, 10)] == pytest.approx([1 / 2, 1, 2 / 3, 1 / 3, 1, 3 / 4, 2 / 4, 1 / 4, 0])
    ckpt = tmp_path / "full" / "ckpt" / "step=6.ckpt"  # one step into the 4-step round
    probe2 = Probe()
    trainer2, model2, swap2, ema2 = _progressive_run(
        teacher_dir, tmp_path / "resumed", ckpt_path=str(ckpt), probe=probe2, steps_per_round=[2, 3, 4]
    )
    assert trainer2.global_step == 9 and swap2.finished and model2.round_length == 4
    assert [r["lr"] / 1e-3 for r in probe2.rows] == pytest.approx([2 / 4, 1 / 4, 0])
    for k, v in model.student.state_dict().items():
        torch.testing.assert_close(model2.student.state_dict()[k], v, msg=k)


def test_per_round_budgets_of_a_chain_continued_from_a_later_round_start_at_its_first_round(tmp_path):
    """A module restored in round 1 (N = 2) by load_from_checkpoint and trained by a fresh Trainer with
    steps_per_round=[3, 2] (its rounds 2 -> 1): the first entry is its first round's budget (indexing by the
    absolute round read entry 2 of 2: IndexError), and a resume of that run keeps the same offset."""
    teacher_dir = write_tiny_teacher(tmp_path / "teacher")
    _progressive_run(teacher_dir, tmp_path / "full", steps_per_round=[2, 3, 4])
    ckpt = tmp_path / "full" / "ckpt" / "step=2.ckpt"  # the swap step: round 1, N = 2

    def continued(root, ckpt_path=None):
        from lightning.pytorch.callbacks import ModelCheckpoint

        model = ProgressiveDistillation.load_from_checkpoint(ckpt, teacher=load_teacher(str(teacher_dir)))
        assert (model.round_index, model.num_student_steps) == (1, 2)
        probe = Probe()
        swap = TeacherSwap(steps_per_round=[3, 2], final_steps=1)
        saver = ModelCheckpoint(dirpath=root / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
        trainer = _trainer([swap, EMA(decay=0.9), saver, probe], root, enable_checkpointing=True)
        trainer.fit(model, FixedBatches(torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1),
                    ckpt_path=ckpt_path)
        return trainer, probe, swap

    trainer, probe, swap = continued(tmp_path / "second")
    rows = {r["step"]: r for r in probe.rows}
    assert swap.finished and trainer.global_step == 3 + 2  # (a fresh Trainer counts from 0)
    assert [rows[k]["n"] for k in range(1, 6)] == [2, 2, 1, 1, 1]  # (a row shows N after its step's swap)
    trainer2, probe2, swap2 = continued(tmp_path / "resumed", ckpt_path=str(tmp_path / "second" / "ckpt" / "step=4.ckpt"))
    assert swap2.finished and trainer2.global_step == 5 and swap2.first_round == 1
    assert [r["n"] for r in probe2.rows] == [1]


def test_export_rounds_keeps_every_rounds_student_as_a_pipeline_before_the_swap(tmp_path):
    """TeacherSwap(export_rounds=...) writes <N>step/ for each round as it ends, before the swap: the round's
    sampling EMA (with promote="ema" the 4- and 2-step exports are exactly the round 1 and 2 teachers), each a
    folder that DiffusionPipeline loads and that samples with N steps. The round-end checkpoint holds the
    state after the swap (the next N, the EMA restarted), which is why the exports exist."""
    from diffusers import DiffusionPipeline
    from lightning.pytorch.callbacks import ModelCheckpoint

    teacher_dir = write_tiny_teacher(tmp_path / "teacher")
    teachers = {}

    class Teachers(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            teachers[pl_module.num_student_steps] = {k: v.clone() for k, v in pl_module.teacher.unet.state_dict().items()}

    model = ProgressiveDistillation(load_teacher(str(teacher_dir)), num_student_steps=4,
                                    optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    swap = TeacherSwap(steps_per_round=3, final_steps=1, promote="ema", export_rounds=str(tmp_path / "rounds"))
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = _trainer([swap, EMA(decay=0.9), saver, Teachers()], tmp_path, enable_checkpointing=True)
    trainer.fit(model, FixedBatches(torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1))
    assert sorted(p.name for p in (tmp_path / "rounds").iterdir()) == ["1step", "2step", "4step"]
    pipes = {n: DiffusionPipeline.from_pretrained(tmp_path / "rounds" / f"{n}step") for n in (4, 2, 1)}
    for n, promoted_at in ((4, 2), (2, 1)):  # the N-step round's EMA became the N/2 round's teacher
        for k, v in pipes[n].unet.state_dict().items():
            torch.testing.assert_close(v, teachers[promoted_at][k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(v, pipes[2].unet.state_dict()[k]) for k, v in pipes[4].unet.state_dict().items())
    images = pipes[4](batch_size=1, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 8, 8, 1)
    after_swap = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=False)
    assert after_swap["progressive"]["num_student_steps"] == 2  # the checkpoint at the round's last step


def test_per_round_step_budgets_must_match_the_rounds(tmp_path):
    model = ProgressiveDistillation(gaussian_teacher(), student=AffineNet(), num_student_steps=8)
    trainer = _trainer([TeacherSwap(steps_per_round=[100, 100], final_steps=2)], tmp_path)
    with pytest.raises(ValueError, match=r"steps_per_round lists 2 rounds, but 8 -> 2 student steps takes 3"):
        trainer.fit(model, FixedBatches(torch.zeros(4, 1, 4, 4)))
    assert trainer.global_step == 0
    with pytest.raises(ValueError, match=r"steps_per_round must be >= 1 .*got \[100, 0\]"):
        TeacherSwap(steps_per_round=[100, 0])


def test_unreachable_final_steps_fails_before_training(tmp_path):
    teacher = gaussian_teacher()
    model = ProgressiveDistillation(teacher, student=AffineNet(), num_student_steps=8)
    trainer = _trainer([TeacherSwap(steps_per_round=2, final_steps=3)], tmp_path)
    with pytest.raises(ValueError, match=r"final_steps=3 is not reachable .*reachable step counts: \[8, 4, 2, 1\]"):
        trainer.fit(model, FixedBatches(torch.zeros(4, 1, 4, 4)))
    assert trainer.global_step == 0


def test_plateau_tracking_counts_steps_without_relative_improvement():
    swap = TeacherSwap(steps_per_round=None, plateau_patience=3, plateau_min_delta=0.1, plateau_smoothing=0.0)
    counts = []
    for loss in [1.0, 0.5, 0.45, 0.46, 0.455, 0.30]:
        swap._track(loss)
        counts.append(swap._plateau_steps)
    # 0.45 is not 10% below the best 0.5 (0.45 < 0.45 fails); 0.30 is, and resets the count
    assert counts == [0, 0, 1, 2, 3, 0]
    trainer = SimpleNamespace(global_step=5)
    swap.round_start_step = 0
    for loss in [0.5, 0.5, 0.5]:
        swap._track(loss)
    assert swap._plateau_steps == 3 and swap.should_end_round(trainer, None)
    swap.min_steps_per_round = 6  # a plateau never ends a round before min_steps_per_round
    assert not swap.should_end_round(trainer, None)
    # smoothing: the bias-corrected moving average of a constant loss is that constant
    smooth = TeacherSwap(steps_per_round=None, plateau_patience=1, plateau_smoothing=0.9)
    for _ in range(4):
        smooth._track(2.0)
    assert smooth._loss_avg / (1 - 0.9**4) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="steps_per_round, plateau_patience, or both"):
        TeacherSwap(steps_per_round=None)


def test_rounds_end_on_a_plateau_with_a_constant_learning_rate(tmp_path):
    """Plateau-only rounds: min_delta = 1 makes every step after a round's first a plateau step."""
    teacher = gaussian_teacher()
    model = ProgressiveDistillation(teacher, student=AffineNet(), num_student_steps=4,
                                    optimizer=lambda p: torch.optim.SGD(p, lr=1e-3))
    swap = TeacherSwap(steps_per_round=None, final_steps=1, plateau_patience=2, plateau_min_delta=1.0)
    lrs, ns = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
            ns.append(pl_module.num_student_steps)

    trainer = _trainer([swap, Record()], tmp_path)
    trainer.fit(model, FixedBatches(torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))))
    assert swap.finished and trainer.global_step == 9
    assert ns == [4, 4, 2, 2, 2, 1, 1, 1, 1]  # each round: one improving step, then two plateau steps
    assert lrs == [1e-3] * 9  # no step budget: the rate is not annealed


# --- the debug preset through the CLI --------------------------------------------------------------


def test_debug_preset_runs_two_rounds_and_exports(tmp_path):
    import json

    from lightning_distill.cli import cli_main

    teacher_dir = write_tiny_teacher(tmp_path / "teacher")
    root = tmp_path / "run"
    cli = cli_main(["fit", "--config", str(DEBUG_CONFIG), "--data.teacher", str(teacher_dir),
                    "--data.image_size", "8", "--trainer.default_root_dir", str(root)])
    assert cli.trainer.global_step == 4 and cli.model.num_student_steps == 1 and cli.model.round_index == 1
    sched = json.loads((root / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["timestep_spacing"] == "trailing"
    assert (root / "checkpoints" / "last.ckpt").is_file()


def test_unreachable_final_steps_in_a_config_fails_at_start(tmp_path, capsys):
    from lightning_distill.cli import cli_main

    bad = tmp_path / "bad.yaml"
    bad.write_text(DEBUG_CONFIG.read_text().replace("final_steps: 1", "final_steps: 3"))
    teacher_dir = write_tiny_teacher(tmp_path / "teacher")
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(bad), "--data.teacher", str(teacher_dir), "--data.image_size", "8",
                  "--trainer.default_root_dir", str(root)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # One line naming the problem (the CLI turns config errors into a one-line message).
    assert "final_steps=3 is not reachable by halving the student's 2 steps" in err[-1]
    assert not (root / "checkpoints").exists()


def test_base_settings_reach_the_hparams_and_are_used(tmp_path):
    """The base class's settings (saved once, for the whole class hierarchy) are in hparams, and the grid,
    predict and round code read them there (a digits run once crashed at its first logged grid)."""
    teacher = load_teacher(write_tiny_teacher(tmp_path / "teacher"))
    model = ProgressiveDistillation(teacher, num_student_steps=4, sample_every_n_steps=3, num_log_samples=5, seed=7)
    hp = model.hparams
    assert (hp.sample_steps, hp.sample_every_n_steps, hp.num_log_samples, hp.seed) == (4, 3, 5, 7)
    assert not {"teacher", "optimizer", "lr_scheduler"} & set(hp)
    # Every saved hyper-parameter is a constructor argument (load_from_checkpoint and a CLI resume re-apply them).
    again = ProgressiveDistillation(teacher, **hp)
    assert dict(again.hparams) == dict(hp)
    # predict samples with hparams.sample_steps from the batch's stream (offset_seed(seed, batch_idx) on one
    # process), as sample() does by hand.
    from lightning_distill.resume import offset_seed

    got = model.predict_step({"x": torch.zeros(2, 1, 8, 8), "label": torch.zeros(2, dtype=torch.long)}, 1)
    assert torch.equal(got, model.sample(2, 4, torch.Generator().manual_seed(offset_seed(7, 1))))
    # A round's N becomes the step count of grids and predict (and is what a checkpoint records).
    model.set_round(1, 2)
    assert model.hparams.sample_steps == 2 and model.sample(2, None, torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)


def test_cli_shows_and_saves_the_base_settings(tmp_path, capsys):
    """The base settings reach --print_config through **kwargs (lr_scheduler does not: rounds anneal the
    rate), and under the CLI, whose hparams are the parsed config, hold the resolved step count."""
    import yaml

    from lightning_distill.cli import cli_main

    teacher_dir = write_tiny_teacher(tmp_path / "teacher")
    args = ["fit", "--config", str(DEBUG_CONFIG), "--data.teacher", str(teacher_dir), "--data.image_size", "8",
            "--trainer.default_root_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit):
        cli_main([*args, "--print_config"])
    init_args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert {"num_student_steps", "sample_steps", "student", "sample_every_n_steps", "num_log_samples", "seed"} <= set(init_args)
    assert init_args["sample_steps"] is None and "lr_scheduler" not in init_args
    cli = cli_main(args[1:], run=False)
    assert cli.model.hparams.sample_steps == cli.model.hparams.num_student_steps == 2


# --- flow-matching teachers (METHODS.md section 7) -------------------------------------------------

FLOW_T = 1000


class FlowGaussianNet(nn.Module):
    """The ideal velocity u = eps - x0 of x0 ~ N(mu, s^2 I) on x_s = (1 - s) x0 + s eps, fed s * T as the
    stock flow schedulers feed it (so it also runs inside FlowMatchEulerDiscreteScheduler's loop)."""

    def __init__(self, mu: float, s: float, size: int = 4) -> None:
        super().__init__()
        self.mu, self.s = mu, s
        self.config = SimpleNamespace(sample_size=size, in_channels=1, num_class_embeds=None)

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        level = (timestep.double() / FLOW_T).view(-1, 1, 1, 1)
        a, sg = 1 - level, level
        k = a * self.s**2 / (a**2 * self.s**2 + sg**2)
        x0 = self.mu + k * (sample.double() - a * self.mu)
        return ((sample.double() - x0) / sg - x0).to(sample.dtype),  # u = eps - x0, eps = (x_s - a x0) / s


class FlowAffineNet(AffineNet):
    """AffineNet indexed by the fed timestep s * T rounded (1 .. T), the flow network's call."""

    def __init__(self, size: int = 4) -> None:
        super().__init__(size)
        self.scale, self.shift = nn.Parameter(torch.zeros(FLOW_T + 1)), nn.Parameter(torch.zeros(FLOW_T + 1, 1))

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        return super().forward(sample, timestep.round(), class_labels, return_dict)


def flow_gaussian_teacher(mu=0.3, s=0.4, size=4, **scheduler_kwargs) -> DiffusionTeacher:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=FLOW_T, **scheduler_kwargs)
    return DiffusionTeacher(FlowGaussianNet(mu, s, size), scheduler, source=None)


def _stock_euler_grid(teacher: DiffusionTeacher, steps: int):
    """(sigmas, timesteps) of the stock flow Euler sampler set up for ``steps`` steps, as the student samples."""
    from lightning_distill.sampling import at_steps, flow_scheduler

    sched = at_steps(flow_scheduler("ddim", teacher.schedule), steps, teacher.schedule)
    sched.set_timesteps(steps)
    return sched.sigmas.double(), sched.timesteps


def test_flow_target_is_what_two_stock_euler_steps_imply():
    """On the flow path x_tilde is the x0 whose velocity (z - x0) / s takes ONE stock Euler step of the
    N-step sampler exactly where TWO stock Euler steps of the teacher's 2N-step sampler land."""
    teacher = flow_gaussian_teacher()
    assert teacher.schedule.path == "flow" and teacher.prediction_type == "flow_prediction"
    n = 4
    z = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(6))
    i = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    t, m, u = student_timesteps(teacher.schedule, n, i)
    target = two_step_target(teacher.denoiser, z, t, m, u).double()
    sig2, ts2 = _stock_euler_grid(teacher, 2 * n)
    sig1, _ = _stock_euler_grid(teacher, n)
    net = teacher.unet
    for b in range(8):
        k = 2 * int(i[b])
        # the levels PD trains on are the stock samplers' levels (T = 1000 divisible by N and 2N)
        assert float(teacher.schedule.sigma(t[b])) == pytest.approx(float(sig2[k]), abs=1e-6)
        assert float(teacher.schedule.sigma(u[b])) == pytest.approx(float(sig2[k + 2]), abs=1e-6)
        assert float(sig1[int(i[b])]) == pytest.approx(float(sig2[k]), abs=1e-6)
        assert float(sig1[int(i[b]) + 1]) == pytest.approx(float(sig2[k + 2]), abs=1e-6)
        x = z[b : b + 1].double()
        for j in (k, k + 1):  # two Euler steps x <- x + (s' - s) u(x, s), by hand on the stock grid
            x = x + (sig2[j + 1] - sig2[j]) * net(x.float(), ts2[j : j + 1])[0].double()
        s_t, s_u = sig2[k], sig2[k + 2]
        # Algorithm 2's x_tilde on alpha = 1 - s, sigma = s: (s_t z_teacher - s_u z_t) / (s_t - s_u)
        by_hand = (s_t * x - s_u * z[b : b + 1].double()) / (s_t - s_u)
        torch.testing.assert_close(target[b : b + 1], by_hand, atol=2e-5, rtol=2e-5)
        # the student's one Euler step with the velocity that x_tilde encodes lands on the teacher's result
        v = (z[b : b + 1].double() - target[b : b + 1]) / s_t
        torch.testing.assert_close(z[b : b + 1].double() + (s_u - s_t) * v, x, atol=2e-5, rtol=2e-5)


def test_flow_student_defaults_to_the_velocity_and_refuses_what_euler_cannot_step_with():
    model = ProgressiveDistillation(flow_gaussian_teacher(), student=FlowAffineNet(), num_student_steps=2)
    assert model.student.path == "flow" and model.student.prediction_type == "flow_prediction"
    assert model.hparams.student_prediction_type == "flow_prediction"
    assert type(model.sampling_scheduler(2)).__name__ == "FlowMatchEulerDiscreteScheduler"
    # the VP default is unchanged: v-prediction
    assert ProgressiveDistillation(gaussian_teacher(), student=AffineNet()).student.prediction_type == "v_prediction"
    for kind in ("v_prediction", "sample"):  # no stock flow sampler steps with v or x0
        with pytest.raises(ValueError, match="flow_prediction"):
            ProgressiveDistillation(flow_gaussian_teacher(), student=FlowAffineNet(), student_prediction_type=kind)
    with pytest.raises(ValueError, match="epsilon.*choose one of"):
        ProgressiveDistillation(flow_gaussian_teacher(), student=FlowAffineNet(), student_prediction_type="epsilon")


def test_flow_one_round_makes_a_one_step_euler_student_match_the_two_step_teacher(tmp_path):
    from diffusers.utils.torch_utils import randn_tensor

    torch.manual_seed(0)
    teacher = flow_gaussian_teacher(0.3, 0.4)
    model = ProgressiveDistillation(
        teacher, student=FlowAffineNet(), num_student_steps=1, optimizer=lambda p: torch.optim.Adam(p, lr=0.05)
    )
    x = 0.3 + 0.4 * torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(4))

    def both():
        noise = randn_tensor((64, 1, 4, 4), generator=torch.Generator().manual_seed(5))
        grid = teacher.schedule.trailing_timesteps(2)  # s = 1, 1/2, 0
        z = teacher.denoiser.ddim(noise, grid[0], grid[1])
        z = teacher.denoiser.ddim(z, grid[1], grid[2])  # the teacher's 2-step Euler sample
        # the student's stock 1-step FlowMatchEulerDiscreteScheduler loop
        student = model.sample(64, 1, torch.Generator().manual_seed(5), denoiser=model.student)
        return student, z

    s0, t0 = both()
    assert (s0 - t0).abs().max() > 0.1
    trainer = _trainer([TeacherSwap(steps_per_round=150, final_steps=1)], tmp_path)
    trainer.fit(model, FixedBatches(x))
    s1, t1 = both()
    torch.testing.assert_close(s1, t1, atol=0.02, rtol=0)
    assert abs(s1.std().item() - t1.std().item()) < 0.01


@pytest.mark.parametrize("scheduler_kwargs", [{"shift": 3.0}, {"use_dynamic_shifting": True}])
def test_promoted_flow_student_keeps_its_flow_path(scheduler_kwargs):
    """The promoted teacher is a flow velocity model on the student's own levels, also when a
    resolution-dependent shift would come out differently for the student network's size."""
    teacher = flow_gaussian_teacher(size=4, **scheduler_kwargs)
    student = FlowAffineNet(size=16)  # another size: a dynamic shift re-read from it would differ
    with torch.no_grad():
        student.scale.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    model = ProgressiveDistillation(teacher, student=student, num_student_steps=2)
    model.promote_student()
    promoted = model.teacher
    assert model.num_student_steps == 1 and promoted is not teacher
    assert promoted.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    assert promoted.prediction_type == "flow_prediction"
    assert promoted.schedule.path == "flow" and promoted.denoiser.clip_x0 is None
    levels = torch.arange(-1, FLOW_T)
    torch.testing.assert_close(promoted.schedule.sigma(levels), teacher.schedule.sigma(levels), rtol=0, atol=0)
    torch.testing.assert_close(promoted.schedule.sigma(levels), model.student.schedule.sigma(levels), rtol=0, atol=0)
    # its DDIM step is the Euler step of the promoted network: x + (s' - s) u
    z = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t, s = torch.tensor(999), torch.tensor(499)
    u = model.student.raw(z, t)
    expected = z + (promoted.schedule.sigma(s) - promoted.schedule.sigma(t)) * u
    torch.testing.assert_close(promoted.denoiser.ddim(z, t, s), expected)


def test_resumed_promoted_teacher_keeps_the_configured_teacher_precision(tmp_path):
    """data.teacher_dtype bfloat16: the promoted teacher is a bf16 copy of the student, and the checkpoint's
    round >= 1 teacher comes back as bf16 too (rebuilt as the student's float32 copy, the resumed run's teacher
    would compute in float32 while the uninterrupted run's computes in bf16)."""
    teacher_dir = write_tiny_teacher(tmp_path / "teacher")

    def method() -> ProgressiveDistillation:
        return ProgressiveDistillation(load_teacher(str(teacher_dir), dtype="bfloat16"), num_student_steps=4)

    model = method()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.promote_student()
    assert {p.dtype for p in model.teacher.parameters()} == {torch.bfloat16}
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)

    resumed = method()
    resumed.on_load_checkpoint(ckpt)  # Lightning's order: the hook, then the state dict
    resumed.load_state_dict(ckpt["state_dict"])
    assert (resumed.round_index, resumed.num_student_steps) == (1, 2)
    assert {p.dtype for p in resumed.teacher.parameters()} == {torch.bfloat16}
    for (name, a), b in zip(resumed.teacher.unet.named_parameters(), model.teacher.unet.parameters()):
        assert torch.equal(a, b), name


def test_an_offloaded_teacher_stays_offloaded_when_promoted_and_when_resumed(tmp_path):
    """teacher_offload: the round >= 1 teacher (a copy of the student) is offloaded like the configured one,
    both when promoted and when a checkpoint rebuilds it (before, it sat on the device whole from round 1)."""
    from lightning_distill import memory

    teacher_dir = write_tiny_teacher(tmp_path / "teacher")

    def method() -> ProgressiveDistillation:
        return ProgressiveDistillation(load_teacher(str(teacher_dir)), num_student_steps=4, teacher_offload=True)

    model = method()
    memory.offload_between_calls(model.teacher.unet)  # what setup does for the configured teacher
    model.promote_student()
    assert memory.is_offloaded(model.teacher.unet)
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    resumed = method()
    resumed.on_load_checkpoint(ckpt)
    resumed.load_state_dict(ckpt["state_dict"])
    assert resumed.round_index == 1 and memory.is_offloaded(resumed.teacher.unet)


def test_a_clamped_student_sampler_still_trains_on_its_unclamped_x0():
    """student_clip_x0 clamps the student's sampler, not its training: x_tilde often lies outside [-1, 1],
    and a clamped estimate gives those pixels no gradient (before, a third of them were stuck)."""
    teacher = gaussian_teacher(mu=0.9, s=0.6)
    grads = {}
    for clip in (None, 1.0):
        torch.manual_seed(0)
        model = ProgressiveDistillation(teacher, student=AffineNet(), num_student_steps=2, student_clip_x0=clip,
                                        num_log_samples=0)
        with torch.no_grad():
            model.student.unet.scale.fill_(0.5)
            model.student.unet.shift.fill_(3.0)  # x0 estimates far above 1
        model.train()
        model.compute_loss(_batch()).loss.backward()
        grads[clip] = model.student.unet.shift.grad.abs().sum()
    assert grads[1.0] > 0 and torch.equal(grads[1.0], grads[None])


def test_the_student_sampler_drops_a_teachers_dynamic_thresholding():
    """A teacher that ships DDIM with dynamic thresholding (DeepFloyd IF): the student's (and teacher's) stock
    sampler has it off, so its step stays the linear DDIM step sample() takes and x_tilde assumes."""
    net = AnalyticGaussianNet(0.3, 0.4)
    teacher = DiffusionTeacher(net, DDIMScheduler.from_config(_scheduler().config, thresholding=True), source=None)
    scheduler = ProgressiveDistillation(teacher, num_student_steps=2, num_log_samples=0).make_scheduler()
    assert teacher.scheduler_config["thresholding"] and not scheduler.config.thresholding


def test_an_exported_student_continued_as_a_teacher_keeps_its_unclamped_x0(tmp_path):
    """A chain continued as a new job: the exported student's DDIM says clip_sample false, and load_teacher
    reads the clamp from the scheduler config, so the new job's teacher is the unclamped one the run promoted
    (it was clamped at 1 before). The bundled teacher's config clips at 1; an explicit clip_x0 still wins."""
    teacher_dir = write_tiny_teacher(tmp_path / "teacher")
    model = ProgressiveDistillation(load_teacher(str(teacher_dir)), num_student_steps=4, num_log_samples=0)
    model.promote_student()
    model.export(tmp_path / "student")
    assert model.teacher.denoiser.clip_x0 is None
    assert load_teacher(str(tmp_path / "student")).denoiser.clip_x0 is None
    assert load_teacher(str(tmp_path / "student"), clip_x0=1.0).denoiser.clip_x0 == 1.0
    assert load_teacher("bundled:digits").denoiser.clip_x0 == 1.0
