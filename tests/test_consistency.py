"""Consistency distillation: boundary condition, closed-form target, solvers, losses, EMA, resume, export."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_distill.data import TeacherDataModule
from lightning_distill.errors import ConfigError
from lightning_distill.methods.consistency import (
    ConsistencyDistillation,
    consistency_function,
    consistency_loss,
    consistency_target,
    ema_update_,
    lcm_boundary_scalings,
    lognormal_interval_probabilities,
    skipped_timesteps,
    solve_ode,
    solver_step,
    substep_timesteps,
)
from lightning_distill.sampling import lcm_training_timesteps
from lightning_distill.parametrisation import Denoiser, Prediction, VPSchedule

from conftest import make_tiny_unet

ROOT = Path(__file__).resolve().parents[1]
MU, S = 0.3, 0.5  # x0 ~ N(MU, S^2 I)


def cosine_schedule(T: int = 1024) -> VPSchedule:
    from diffusers import LCMScheduler

    return VPSchedule.from_scheduler(LCMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2"))


class GaussianUNet(nn.Module):
    """The exact v-prediction of x0 ~ N(MU, S^2 I): E[x0 | x_t] = MU + a S^2 / (a^2 S^2 + s^2) (x_t - a MU)."""

    def __init__(self, schedule: VPSchedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, return_dict=False):
        a = self.schedule.alpha(t).view(-1, 1, 1, 1).double()
        s = self.schedule.sigma(t).view(-1, 1, 1, 1).double()
        x = x.double()
        x0 = MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)
        eps = (x - a * x0) / s
        return ((a * eps - s * x0).float(),)


def ideal_x0(x, a, s):
    return MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)


def test_boundary_scalings_are_lcm_schedulers_and_f_is_identity_at_zero():
    from diffusers import LCMScheduler

    sched = LCMScheduler(timestep_scaling=10.0)
    t = torch.tensor([0, 1, 5, 19, 500, 999])
    c_skip, c_out = lcm_boundary_scalings(t)
    for i, ti in enumerate(t):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert float(c_skip[i]) == pytest.approx(float(ref_skip), rel=1e-6)
        assert float(c_out[i]) == pytest.approx(float(ref_out), rel=1e-6)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    den = Denoiser(make_tiny_unet(), cosine_schedule(), "v_prediction", clip_x0=1.0)
    x = 3 * torch.randn(2, 1, 8, 8)  # outside [-1, 1]: no clipping may touch the boundary
    assert torch.equal(consistency_function(den, x, torch.zeros(2, dtype=torch.long)), x)


def test_training_grid_is_the_lcm_schedulers():
    from diffusers import LCMScheduler

    sched = LCMScheduler(num_train_timesteps=1024, original_inference_steps=32)
    grid = lcm_training_timesteps(1024, 32)
    sched.set_timesteps(32)
    assert torch.equal(grid.flip(0), sched.timesteps)
    assert grid[-1] == 1023 and grid[0] == 31
    sched.set_timesteps(4)
    assert set(sched.timesteps.tolist()) <= set(grid.tolist())
    assert skipped_timesteps(grid[:2], 32).tolist() == [0, 31]


def test_cd_target_equals_closed_form_on_gaussian_data():
    sch = cosine_schedule()
    den = Denoiser(GaussianUNet(sch), sch, "v_prediction")
    x = torch.randn(3, 1, 2, 2)
    t = torch.tensor([1023, 511, 63])
    s = skipped_timesteps(t, 32)
    predict = lambda x_, t_: den(x_, t_)  # noqa: E731
    x_hat, target = consistency_target(predict, den, sch, x, t, s, "ddim", 10.0)
    # by hand, in float64
    a_t, s_t = (v.double().view(-1, 1, 1, 1) for v in (sch.alpha(t), sch.sigma(t)))
    a_s, s_s = (v.double().view(-1, 1, 1, 1) for v in (sch.alpha(s), sch.sigma(s)))
    xd = x.double()
    x0_t = ideal_x0(xd, a_t, s_t)
    eps_t = (xd - a_t * x0_t) / s_t
    x_hat_ref = a_s * x0_t + s_s * eps_t
    scaled = s.double().view(-1, 1, 1, 1) * 10.0
    c_skip = 0.25 / (scaled**2 + 0.25)
    c_out = scaled / (scaled**2 + 0.25).sqrt()
    target_ref = c_skip * x_hat_ref + c_out * ideal_x0(x_hat_ref, a_s, s_s)
    torch.testing.assert_close(x_hat.double(), x_hat_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(target.double(), target_ref, atol=2e-5, rtol=1e-4)


def test_solvers_against_the_exact_gaussian_ode():
    """Along the PF-ODE of N(MU, S^2), x_t - a_t MU scales by sqrt(a^2 S^2 + s^2): exact steps to compare."""
    sch = cosine_schedule()
    den = Denoiser(GaussianUNet(sch), sch, "v_prediction")
    x = torch.randn(4, 1, 2, 2, dtype=torch.float32)

    def exact(t, s):
        a_t, s_t, a_s, s_s = (v.double().view(-1, 1, 1, 1) for v in (sch.alpha(t), sch.sigma(t), sch.alpha(s), sch.sigma(s)))
        return a_s * MU + ((a_s**2 * S**2 + s_s**2) / (a_t**2 * S**2 + s_t**2)).sqrt() * (x.double() - a_t * MU)

    def err(solver, t, s):
        t, s = torch.full((4,), t), torch.full((4,), s)
        return (solver_step(den, sch, x, t, s, solver).double() - exact(t, s)).abs().max().item()

    for solver in ("ddim", "heun"):
        assert err(solver, 512, 510) < 1e-4
    assert err("heun", 1023, 767) < 0.2 * err("ddim", 1023, 767)
    assert err("heun", 511, 447) < 0.2 * err("ddim", 511, 447)
    with pytest.raises(ValueError, match="choose one of"):
        solver_step(den, sch, x, torch.full((4,), 5), torch.full((4,), 1), "rk4")


def test_solver_substeps_approach_the_exact_ode():
    """solve_ode: one substep is solver_step; more substeps shrink the error on the exact Gaussian ODE
    (DDIM is first order, so 4 substeps cut its error over a long interval by well over 2x)."""
    sch = cosine_schedule()
    den = Denoiser(GaussianUNet(sch), sch, "v_prediction")
    x = torch.randn(4, 1, 2, 2, dtype=torch.float32)
    t, s = torch.tensor([1023, 767, 600, 9]), torch.tensor([767, 511, 400, 0])

    def exact(t, s):
        a_t, s_t, a_s, s_s = (v.double().view(-1, 1, 1, 1) for v in (sch.alpha(t), sch.sigma(t), sch.alpha(s), sch.sigma(s)))
        return a_s * MU + ((a_s**2 * S**2 + s_s**2) / (a_t**2 * S**2 + s_t**2)).sqrt() * (x.double() - a_t * MU)

    for solver in ("ddim", "heun"):
        torch.testing.assert_close(solve_ode(den, sch, x, t, s, solver, 1), solver_step(den, sch, x, t, s, solver))
        errs = [(solve_ode(den, sch, x, t, s, solver, m).double() - exact(t, s)).abs().max().item() for m in (1, 2, 4)]
        assert errs[2] < errs[1] < errs[0], (solver, errs)
        if solver == "ddim":
            assert errs[2] < 0.4 * errs[0], errs
    levels = substep_timesteps(torch.tensor([1000, 10]), torch.tensor([875, 8]), 4)
    assert [v.tolist() for v in levels] == [[1000, 10], [969, 10], [938, 9], [906, 8], [875, 8]]
    with pytest.raises(ValueError, match="solver_substeps must be >= 1"):
        solve_ode(den, sch, x, t, s, "ddim", 0)


def test_losses_by_hand():
    a = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    assert consistency_loss(a, b, "l2").tolist() == [12.5, 0.0]
    assert consistency_loss(a, b, "l1").tolist() == [3.5, 0.0]
    torch.testing.assert_close(consistency_loss(a, b, "pseudo_huber", 1.0), torch.tensor([26**0.5 - 1, 0.0]))
    ref = ((10.0**0.5 - 1) + (17**0.5 - 1)) / 2
    torch.testing.assert_close(consistency_loss(a, b, "pseudo_huber_elementwise", 1.0), torch.tensor([ref, 0.0]))


def test_lognormal_interval_probabilities_by_hand():
    """Edges at exp(P_mean) and exp(P_mean +- P_std): the normal's masses 0.5 and erf(1 / sqrt 2) / 2 = 0.3413;
    an infinite sigma (zero terminal SNR) closes the last interval."""
    import math

    m, s = -1.1, 2.0
    edges = torch.tensor([0.0, math.exp(m - s), math.exp(m), math.exp(m + s), float("inf")])
    p = lognormal_interval_probabilities(edges[:-1], edges[1:], m, s)
    c = math.erf(1 / math.sqrt(2)) / 2
    torch.testing.assert_close(p, torch.tensor([0.5 - c, c, c, 0.5 - c]))
    with pytest.raises(ConfigError, match="no mass"):
        lognormal_interval_probabilities(torch.tensor([0.0]), torch.tensor([0.0]), m, s)


@pytest.mark.parametrize("flow", [False, True])
def test_lognormal_timestep_sampling_draws_the_grid_intervals_masses(tiny_teacher_dir, tiny_flow_teacher_dir, flow):
    """Each grid point t_{n+k} is drawn with the log-normal mass of [sigma(t_n), sigma(t_{n+k})], EDM sigma computed
    here from alphas_cumprod (VP) or s / (1 - s) (flow); uniform sampling draws exactly as before (torch.randint)."""
    import math

    dm = TeacherDataModule(teacher=str(tiny_flow_teacher_dir if flow else tiny_teacher_dir), image_size=8, batch_size=4)
    method = ConsistencyDistillation(dm.teacher, original_inference_steps=8, timestep_sampling="lognormal")
    sched, grid = method.student.schedule, method.train_timesteps
    if flow:
        s = sched.sigma(grid).double().tolist()
        s_end = [sched.sigma(torch.zeros(1)).item()] + s[:-1]
        edm = lambda v: v / (1 - v) if v < 1 else float("inf")  # noqa: E731
    else:
        from diffusers import DDPMScheduler

        ac = DDPMScheduler.from_pretrained(str(tiny_teacher_dir), subfolder="scheduler").alphas_cumprod.double()
        s = [math.sqrt((1 - ac[t]) / ac[t]) for t in grid.tolist()]
        s_end = [math.sqrt((1 - ac[0]) / ac[0])] + s[:-1]
        edm = lambda v: v  # noqa: E731
    cdf = lambda v: 1.0 if v == float("inf") else math.erf((math.log(v) + 1.1) / (2.0 * math.sqrt(2)))  # noqa: E731
    expected = torch.tensor([cdf(edm(b)) - cdf(edm(a)) for a, b in zip(s_end, s)], dtype=torch.float32)
    torch.testing.assert_close(method.interval_probabilities, expected / expected.sum())
    torch.manual_seed(0)
    counts = torch.bincount(method.draw_intervals(40000, "cpu"), minlength=grid.numel()) / 40000
    torch.testing.assert_close(counts, method.interval_probabilities, atol=0.01, rtol=0)

    # all the mass on the lowest interval: every training step starts there
    inside = (math.log(edm(s_end[0])) + math.log(edm(s[0]))) / 2
    low = ConsistencyDistillation(dm.teacher, original_inference_steps=8, timestep_sampling="lognormal", p_mean=inside, p_std=0.01)
    dm.setup()
    out = low.compute_loss(next(iter(dm.train_dataloader())))
    assert out.logs["t_start"].item() == grid[0].item()

    uniform = ConsistencyDistillation(dm.teacher, original_inference_steps=8)
    assert uniform.interval_probabilities is None
    torch.manual_seed(1)
    drawn = uniform.draw_intervals(64, "cpu")
    torch.manual_seed(1)
    assert torch.equal(drawn, torch.randint(0, grid.numel(), (64,)))


def test_timestep_sampling_settings_are_checked(tiny_teacher_dir):
    teacher = TeacherDataModule(teacher=str(tiny_teacher_dir), image_size=8).teacher
    with pytest.raises(ConfigError, match=r"unknown timestep_sampling 'normal'.*uniform.*lognormal"):
        ConsistencyDistillation(teacher, timestep_sampling="normal")
    with pytest.raises(ConfigError, match="p_std"):
        ConsistencyDistillation(teacher, timestep_sampling="lognormal", p_std=0.0)


def test_ema_update_by_hand():
    online, target = nn.Linear(1, 1), nn.Linear(1, 1)
    with torch.no_grad():
        online.weight.fill_(1.0), target.weight.fill_(3.0)
    ema_update_(target, online, 0.75)
    assert target.weight.item() == pytest.approx(2.5)
    ema_update_(target, online, 0.0)
    assert target.weight.item() == 1.0


def test_online_and_target_share_dropout_masks(tiny_teacher_dir, monkeypatch):
    """With t_n = t_{n+k} and a DDIM step of zero length the target equals the online output exactly only
    if both passes draw the same dropout masks."""
    dm = TeacherDataModule(teacher=str(tiny_teacher_dir), image_size=8, batch_size=4)
    torch.manual_seed(0)
    student = make_tiny_unet()
    student.config.dropout = 0.5
    for m in student.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in student.modules())
    method = ConsistencyDistillation(dm.teacher, student=student, target_decay=0.0, original_inference_steps=32)
    import lightning_distill.methods.consistency as cd

    monkeypatch.setattr(cd, "previous_timesteps", lambda grid, t: t)  # t_n = t_{n+k}: a zero-length step
    method.train()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(1)
    assert method.compute_loss(batch).loss.item() < 1e-8
    # control: without the shared RNG state the two passes disagree
    x = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 511)
    a = consistency_function(method.student, x, t)
    assert (a - consistency_function(method.student, x, t)).abs().max() > 1e-3


# --- training with a Trainer ------------------------------------------------------------------------


class StepSeed(L.Callback):
    """Seeds the global RNG from the step, so a resumed run draws what the uninterrupted one drew."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1000 + trainer.global_step)


class FixedOrderData(TeacherDataModule):
    def train_dataloader(self):
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=False)


def _fit(teacher_dir, root, max_steps, ckpt_path=None, every=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_distill.callbacks import EMA

    dm = FixedOrderData(teacher=str(teacher_dir), image_size=8, batch_size=8)
    method = ConsistencyDistillation(
        dm.teacher, original_inference_steps=32, target_decay=0.9, solver="heun", loss="pseudo_huber",
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
    )
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every or max_steps, save_top_k=-1)
    ema = EMA(decay=0.5, warmup=False)
    trainer = L.Trainer(
        max_steps=max_steps, default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[StepSeed(), ema, ckpt], limit_val_batches=0, limit_train_batches=2,
        accelerator="cpu", devices=1,
    )
    trainer.fit(method, dm, ckpt_path=ckpt_path)
    return method, ema


def test_target_and_sampling_ema_differ_and_survive_resume(tiny_teacher_dir, tmp_path):
    full, ema = _fit(tiny_teacher_dir, tmp_path / "full", 4, every=2)
    student = dict(full.student.named_parameters())
    target = dict(full.theta_minus.named_parameters())
    averaged = dict(ema.sampling_module(full).named_parameters())
    name = "unet.conv_in.weight"
    assert not torch.allclose(target[name], averaged[name])
    assert not torch.allclose(target[name], student[name])
    assert not target[name].requires_grad
    opt_params = {id(p) for g in full.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in full.theta_minus.parameters()}
    mid = tmp_path / "full" / "ckpt" / "epoch=0-step=2.ckpt"
    assert mid.exists()
    assert any(k.startswith("theta_minus.") for k in torch.load(mid, weights_only=False)["state_dict"])
    resumed, ema2 = _fit(tiny_teacher_dir, tmp_path / "resumed", 4, ckpt_path=str(mid))
    for a, b in [(full.student, resumed.student), (full.theta_minus, resumed.theta_minus),
                 (ema.sampling_module(full), ema2.sampling_module(resumed))]:
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, msg=n)


def test_exported_pipeline_reproduces_sample(tiny_teacher_dir, tmp_path):
    from diffusers import DDPMPipeline, LCMScheduler

    dm = TeacherDataModule(teacher=str(tiny_teacher_dir), image_size=8)
    method = ConsistencyDistillation(dm.teacher, original_inference_steps=32)
    path = method.export(tmp_path / "student")
    pipe = DDPMPipeline.from_pretrained(path)
    assert isinstance(pipe.scheduler, LCMScheduler)
    for steps in (1, 2, 4):
        ours = method.sample(3, steps, torch.Generator().manual_seed(steps))
        theirs = pipe(3, torch.Generator().manual_seed(steps), steps, output_type="pt").images
        torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, rtol=0, atol=0)
    method.student_scheduler_config = {**method.student_scheduler_config, "beta_schedule": "linear"}
    with pytest.raises(ValueError, match="alphas_cumprod"):
        method.make_scheduler()


# --- configs ------------------------------------------------------------------------------------------


def test_debug_config_runs_and_digits_config_builds(tiny_teacher_dir, tmp_path):
    from lightning_distill.cli import cli_main

    root = tmp_path / "run"
    cli_main(["fit", "--config", str(ROOT / "configs/consistency/debug.yaml"), "--data.teacher", str(tiny_teacher_dir),
              "--data.image_size", "8", "--trainer.default_root_dir", str(root)])
    assert (root / "student" / "scheduler" / "scheduler_config.json").exists()
    assert (root / "checkpoints" / "last.ckpt").exists()
    cli = cli_main(["--config", str(ROOT / "configs/consistency/digits.yaml"), "--data.teacher", str(tiny_teacher_dir),
                    "--data.image_size", "8", "--trainer.default_root_dir", str(tmp_path / "digits")], run=False)
    assert isinstance(cli.model, ConsistencyDistillation)
    assert cli.model.make_scheduler().timesteps is not None


# --- flow-matching teachers (x_s = (1 - s) x + s eps, velocity u = eps - x) -----------------------------


class GaussianFlowUNet(nn.Module):
    """The exact velocity of x0 ~ N(MU, S^2 I) on the flow path, fed s T as FlowMatchEulerDiscreteScheduler feeds it."""

    def __init__(self, T: int = 1000) -> None:
        super().__init__()
        self.T = T
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, model_t, return_dict=False):
        s = (model_t.double() / self.T).view(-1, 1, 1, 1)
        a, x = 1 - s, x.double()
        x0 = ideal_x0(x, a, s)
        return (((x - a * x0) / s - x0).float(),)


def test_flow_consistency_function_is_the_x0_estimate_and_holds_the_boundary():
    from diffusers import FlowMatchLCMScheduler

    from lightning_distill.parametrisation import FlowSchedule
    from lightning_distill.sampling import x0_sampler_scalings

    sch = FlowSchedule(1000)
    torch.manual_seed(0)
    den = Denoiser(make_tiny_unet(), sch, "flow_prediction")
    x = 3 * torch.randn(4, 1, 8, 8)
    t = torch.tensor([999, 499, 39, 0])
    with torch.no_grad():
        u = den.raw(x, t)
        f = consistency_function(den, x, t)
    # no boundary scalings: f = x_s - s u (FlowMatchLCMScheduler's x0), whatever timestep_scaling says
    torch.testing.assert_close(f, x - sch.sigma(t).view(-1, 1, 1, 1) * u, rtol=0, atol=1e-6)
    assert torch.equal(consistency_function(den, x, t, timestep_scaling=123.0), f)
    c_skip, c_out = x0_sampler_scalings(sch, t, 10.0)
    assert c_skip.tolist() == [0.0] * 4 and c_out.tolist() == [1.0] * 4
    # the boundary f(x, s = 0) = x, exactly
    with torch.no_grad():
        assert torch.equal(consistency_function(den, x, torch.full((4,), -1)), x)
    # the stock sampler's 1-step output (s = 1 -> 0: no fresh noise survives) is f(x, 999)
    stock = FlowMatchLCMScheduler(num_train_timesteps=1000)
    stock.set_timesteps(1)
    out = stock.step(u[:1], stock.timesteps[0], x[:1], generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(out, f[:1], rtol=0, atol=1e-6)
    # the VP path keeps LCMScheduler's scalings
    vp_t = torch.tensor([0, 31, 1023])
    for a, b in zip(x0_sampler_scalings(cosine_schedule(), vp_t, 10.0), lcm_boundary_scalings(vp_t, 10.0)):
        assert torch.equal(a, b)


def test_flow_cd_target_and_solvers_on_gaussian_data():
    """On the flow path DDIM is the Euler step, the CD target is the exact x0 at the Euler point, and Heun is
    closer to the exact ODE (x_s - a_s MU scales by sqrt(a^2 S^2 + s^2), a = 1 - s, as on any Gaussian path)."""
    from lightning_distill.parametrisation import FlowSchedule

    sch = FlowSchedule(1000)
    den = Denoiser(GaussianFlowUNet(), sch, "flow_prediction")
    x = torch.randn(3, 1, 2, 2)
    t = torch.tensor([999, 499, 24])
    s = skipped_timesteps(t, 25)
    predict = lambda x_, t_: den(x_, t_)  # noqa: E731
    x_hat, target = consistency_target(predict, den, sch, x, t, s, "ddim")
    lvl = lambda i: ((i + 1).double() / 1000).view(-1, 1, 1, 1)  # noqa: E731  (shift 1: s_i = (i + 1) / T)
    s_t, s_s = lvl(t), lvl(s)
    xd = x.double()
    x0_t = ideal_x0(xd, 1 - s_t, s_t)
    u = (xd - (1 - s_t) * x0_t) / s_t - x0_t
    x_hat_ref = xd + (s_s - s_t) * u  # Euler, FlowMatchEulerDiscreteScheduler.step
    torch.testing.assert_close(x_hat.double(), x_hat_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(target.double(), ideal_x0(x_hat_ref, 1 - s_s, s_s), atol=2e-5, rtol=1e-4)

    def exact(t, s):
        a_t, s_t, a_s, s_s = (v.double().view(-1, 1, 1, 1) for v in (sch.alpha(t), sch.sigma(t), sch.alpha(s), sch.sigma(s)))
        return a_s * MU + ((a_s**2 * S**2 + s_s**2) / (a_t**2 * S**2 + s_t**2)).sqrt() * (x.double() - a_t * MU)

    def err(solver, t, s):
        t, s = torch.full((3,), t), torch.full((3,), s)
        return (solver_step(den, sch, x, t, s, solver).double() - exact(t, s)).abs().max().item()

    assert err("ddim", 500, 498) < 1e-4 and err("heun", 500, 498) < 1e-4
    assert err("heun", 999, 749) < 0.2 * err("ddim", 999, 749)
    assert err("heun", 499, 399) < 0.2 * err("ddim", 499, 399)


def test_flow_training_step_is_finite_and_export_reproduces_sample(tiny_flow_teacher_dir, tmp_path):
    from diffusers import DDPMPipeline, FlowMatchLCMScheduler

    from lightning_distill.sampling import at_steps
    from test_export import assert_pipeline_reproduces_samples

    dm = TeacherDataModule(teacher=str(tiny_flow_teacher_dir), image_size=8, batch_size=4)
    method = ConsistencyDistillation(dm.teacher, original_inference_steps=40, solver="heun", sample_steps=2)
    assert method.student.path == "flow"
    # the grid's levels are s = n / 40: every level the 1/2/4-step samplers visit is a trained one
    levels = method.student.schedule.sigma(method.train_timesteps)
    torch.testing.assert_close(levels, torch.arange(1, 41) / 40)
    dm.setup()
    torch.manual_seed(0)
    out = method.compute_loss(next(iter(dm.train_dataloader())))
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    grads = [p.grad for p in method.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in method.theta_minus.parameters())

    pipe = DDPMPipeline.from_pretrained(method.export(tmp_path / "student"))
    assert isinstance(pipe.scheduler, FlowMatchLCMScheduler)
    assert_pipeline_reproduces_samples(method, pipe, 2)  # the stock call at the trained step count
    stock = pipe.scheduler
    for steps in (1, 4):
        pipe.scheduler = at_steps(stock, steps)
        assert_pipeline_reproduces_samples(method, pipe, steps)


def test_sampler_off_the_training_grid_warns(tiny_flow_teacher_dir, tiny_teacher_dir):
    from lightning_distill.methods.consistency import off_grid_timesteps

    assert off_grid_timesteps(torch.tensor([1000.0, 500.0]), torch.tensor([500.0, 1000.0])) == []
    assert off_grid_timesteps(torch.tensor([1000.0, 666.5]), torch.tensor([500.0, 1000.0])) == [666.5]
    flow = TeacherDataModule(teacher=str(tiny_flow_teacher_dir), image_size=8).teacher
    # T = 1000, N = 32: the top grid level is s = 992 / 1000 and the sampler starts at s = 1; N = 50 puts
    # s = 1/4 between n / 50. The levels the 1 / 2 / 4-step and sample_steps samplers visit join the grid,
    # so those are trained; a 3-step sampler on N = 50 is not served and is warned about
    grid32 = ConsistencyDistillation(flow, original_inference_steps=32, sample_steps=2).train_timesteps
    assert 999 in grid32.tolist() and set(lcm_training_timesteps(1000, 32).tolist()) < set(grid32.tolist())
    assert 249 in ConsistencyDistillation(flow, original_inference_steps=50, sample_steps=4).train_timesteps.tolist()
    with pytest.warns(UserWarning, match=r"8-step sampler"):
        method = ConsistencyDistillation(flow, original_inference_steps=50, sample_steps=4)
        method.warn_if_sampler_leaves_grid(8)  # s = 7/8, 5/8, ... between n / 50
    vp = TeacherDataModule(teacher=str(tiny_teacher_dir), image_size=8).teacher
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ConsistencyDistillation(flow, original_inference_steps=40, sample_steps=4)
        ConsistencyDistillation(vp, original_inference_steps=30, sample_steps=4)  # LCMScheduler stays on its grid


def test_a_shifted_flow_grid_holds_the_levels_its_sampler_visits(tmp_path):
    """SD3's shift 3 (N = 40, T = 1000): the stock 4-step sampler visits levels between the LCM grid's
    (928 and 799 in network timesteps); they join the training grid, so the student trains where it samples,
    and each draw's t_n is the next lower grid level (t - k on the plain grid, as the LCM script). Unshifted,
    with K dividing N, the grid is the LCM grid."""
    from conftest import write_tiny_flow_teacher
    from lightning_distill.methods.consistency import consistency_grid, previous_timesteps, skipped_timesteps
    from lightning_distill.sampling import generator_timesteps

    shifted = TeacherDataModule(teacher=str(write_tiny_flow_teacher(tmp_path / "s3", shift=3.0)), image_size=8).teacher
    schedule = shifted.schedule
    grid = consistency_grid(schedule, 40, (1, 2, 4))
    plain = lcm_training_timesteps(1000, 40)
    visited = generator_timesteps(schedule, 4)
    assert set(visited.tolist()) <= set(grid.tolist()) and not set(visited.tolist()) <= set(plain.tolist())
    assert sorted(grid.tolist()) == grid.tolist() and set(plain.tolist()) <= set(grid.tolist())
    t = grid[torch.arange(len(grid))]
    prev = previous_timesteps(grid, t)
    assert prev[0] == 0 and torch.equal(prev[1:], grid[:-1])
    torch.testing.assert_close(previous_timesteps(plain, plain), skipped_timesteps(plain, 25), rtol=0, atol=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the 4-step sampler is now on the grid: no off-grid warning
        method = ConsistencyDistillation(shifted, original_inference_steps=40, sample_steps=4)
    assert torch.equal(method.train_timesteps, grid)
    unshifted = consistency_grid(TeacherDataModule(teacher=str(write_tiny_flow_teacher(tmp_path / "s1")), image_size=8).teacher.schedule, 40)
    assert torch.equal(unshifted, plain)


def test_flow_debug_and_digits_configs_build(tiny_flow_teacher_dir, tmp_path):
    from lightning_distill.cli import cli_main

    for name in ("debug_flow", "digits_flow"):
        cli = cli_main(["--config", str(ROOT / f"configs/consistency/{name}.yaml"), "--data.teacher",
                        str(tiny_flow_teacher_dir), "--data.image_size", "8",
                        "--trainer.default_root_dir", str(tmp_path / name)], run=False)
        assert isinstance(cli.model, ConsistencyDistillation) and cli.model.student.path == "flow"
        assert type(cli.model.make_scheduler()).__name__ == "FlowMatchLCMScheduler"
        assert cli.model.max_sample_steps() is None


@pytest.mark.parametrize("flow", [False, True])
def test_a_bf16_teacher_steps_the_ode_in_float32(tmp_path, flow):
    """A teacher held in bfloat16 (data.teacher_dtype) gets its network input in bf16, but its step
    z_s = alpha_s x0 + sigma_s eps is formed in float32: the step then differs from the float32 teacher's
    by the network output's rounding times the step, not by bf16's rounding of z itself (about a quarter
    of a 20-timestep step before)."""
    from conftest import write_tiny_flow_teacher, write_tiny_teacher
    from lightning_distill.teacher import load_teacher

    folder = (write_tiny_flow_teacher if flow else write_tiny_teacher)(tmp_path / "teacher")
    steps = {}
    for dtype in ("float32", "bfloat16"):
        teacher = load_teacher(str(folder), dtype=dtype)
        method = ConsistencyDistillation(teacher, original_inference_steps=50)
        _, predict = method.conditioning({"x": torch.zeros(4, 1, 8, 8), "label": torch.zeros(4, dtype=torch.long)}, 4)
        x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        t, s = torch.full((64,), 499), torch.full((64,), 479)
        x_t = teacher.schedule.add_noise(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(1)), t)
        steps[dtype] = (x_t, solver_step(predict, teacher.schedule, x_t, t, s))
    x_t, ref = steps["float32"]
    assert steps["bfloat16"][1].dtype == torch.float32
    err = (steps["bfloat16"][1] - ref).norm() / (ref - x_t).norm()
    assert err < 0.05, f"bf16 teacher's step is off by {err:.3f} of the step"
