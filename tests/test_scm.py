"""sCD (continuous-time consistency distillation): TrigFlow conversions, the tangent against closed forms and
finite differences, the loss and its stabilisers. Training, kill-and-resume, bf16 and export of the debug
presets (VP and flow) are covered by the preset-wide tests (test_cli, test_fault_tolerance, test_precision,
test_export, test_flow_methods)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_distill.errors import ConfigError
from lightning_distill.methods.scm import (
    AdaptiveWeight,
    SCMDistillation,
    consistency_function,
    flow_time_of_trigflow,
    normalise_tangent,
    sample_trigflow_time,
    scm_loss,
    scm_tangent,
    tangent_warmup,
    trigflow_jvp,
    trigflow_output,
    trigflow_scale,
    trigflow_time,
)
from lightning_distill.parametrisation import Denoiser, FlowSchedule, VPSchedule

SIGMA_D = 0.5
MU, S = 0.3, 0.6  # Gaussian data x0 ~ N(MU, S^2 I)


def vp_schedule() -> VPSchedule:
    from diffusers import DDIMScheduler

    return VPSchedule.from_scheduler(DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))


@pytest.mark.parametrize("schedule", [vp_schedule(), FlowSchedule(1000, shift=3.0)], ids=["vp", "flow-shift3"])
def test_path_points_are_trigflow_points(schedule):
    """k x_p = cos(t) x0 + sin(t) sigma_d eps at tan(t) = sigma / (sigma_d alpha), and the time maps invert."""
    g = torch.Generator().manual_seed(0)
    ts = torch.tensor([0, 10, 300, 700, 999])
    x0, eps = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    x_p = schedule.add_noise(x0, eps, ts)
    lam = schedule.flow_time(ts)
    t = trigflow_time(lam, SIGMA_D)
    k = trigflow_scale(schedule.alpha(ts), schedule.sigma(ts), SIGMA_D).view(-1, 1, 1, 1)
    c, s = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(k * x_p, c * x0 + s * SIGMA_D * eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow_time_of_trigflow(t, SIGMA_D), lam, atol=1e-6, rtol=1e-6)
    inner = slice(0, -1)  # tan is ill-conditioned at t = 999 (t near pi/2; on the flow path alpha = 0)
    ratio = schedule.sigma(ts[inner]) / (SIGMA_D * schedule.alpha(ts[inner]))
    torch.testing.assert_close(torch.tan(t[inner]), ratio, rtol=1e-4, atol=1e-6)


class GaussianFlowTeacher(nn.Module):
    """The exact flow velocity of x0 ~ N(MU, S^2) on x_s = (1 - s) x0 + s eps, called with timestep s T."""

    def __init__(self, T: int = 1000) -> None:
        super().__init__()
        self.T = T
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, model_t, return_dict=False):
        s = (model_t / self.T).view(-1, 1, 1, 1)
        a = 1 - s
        x0 = MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)
        eps = (x - a * x0) / s
        return (eps - x0,)


class IdealConsistencyStudent(GaussianFlowTeacher):
    """A flow network whose x0 estimate x - s u is the exact consistency function of the Gaussian data,
    f*(x_t, t) = MU + S (x_t - cos(t) MU) / sqrt(cos^2 S^2 + sin^2 sigma_d^2) in TrigFlow coordinates
    (the probability-flow ODE of Gaussian data maps quantile to quantile)."""

    def forward(self, x, model_t, return_dict=False):
        s = (model_t / self.T).view(-1, 1, 1, 1)
        a = 1 - s
        t = trigflow_time(s, SIGMA_D)
        k = trigflow_scale(a, s, SIGMA_D)
        x_trig = k * x
        f = MU + S * (x_trig - torch.cos(t) * MU) / (torch.cos(t) ** 2 * S**2 + torch.sin(t) ** 2 * SIGMA_D**2).sqrt()
        return ((x - f) / s,)


def _gaussian_batch(n: int = 6):
    g = torch.Generator().manual_seed(1)
    x0 = MU + S * torch.randn(n, 1, 3, 3, generator=g)
    t = torch.linspace(0.2, 1.4, n)
    z = SIGMA_D * torch.randn(n, 1, 3, 3, generator=g)
    x_t = torch.cos(t).view(-1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1) * z
    return x_t, t


@pytest.mark.parametrize("mode", ["forward", "finite_difference"])
def test_tangent_vanishes_for_the_exact_consistency_function_of_gaussian_data(mode):
    """With the exact teacher velocity and the exact consistency function f*, df*/dt along the ODE is 0, so
    g = 0 (r = 1); the teacher's own x0 estimate (not a consistency function) gives g clearly non-zero."""
    schedule = FlowSchedule(1000)
    teacher = Denoiser(GaussianFlowTeacher(), schedule, "flow_prediction")
    x_t, t = _gaussian_batch()
    dxt_dt = SIGMA_D * trigflow_output(teacher, x_t, t, SIGMA_D)
    sizes = {}
    for name, net in {"ideal": IdealConsistencyStudent(), "teacher": GaussianFlowTeacher()}.items():
        student = Denoiser(net, schedule, "flow_prediction")
        F = lambda x, tt: trigflow_output(student, x, tt, SIGMA_D)  # noqa: E731
        F_minus, dF_dt = trigflow_jvp(F, x_t, t, dxt_dt, mode, step=1e-3)
        g = scm_tangent(F_minus, dF_dt, dxt_dt, x_t, t, SIGMA_D, warmup=1.0)
        sizes[name] = g.abs().max().item()
        if name == "ideal":
            f = consistency_function(x_t, t, F_minus, SIGMA_D)
            c, s = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
            ideal = MU + S * (x_t - c * MU) / (c**2 * S**2 + s**2 * SIGMA_D**2).sqrt()
            torch.testing.assert_close(f, ideal, atol=1e-5, rtol=1e-5)
    assert sizes["ideal"] < 2e-3, sizes
    assert sizes["teacher"] > 0.05, sizes


def test_teacher_velocity_is_the_trigflow_ode_of_gaussian_data():
    """sigma_d F_teacher equals d/dt of the exact ODE solution through x_t (a finite difference of f*'s inverse)."""
    schedule = FlowSchedule(1000)
    teacher = Denoiser(GaussianFlowTeacher(), schedule, "flow_prediction")
    x_t, t = _gaussian_batch()
    c, s = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    x0_star = MU + S * (x_t - c * MU) / (c**2 * S**2 + s**2 * SIGMA_D**2).sqrt()  # the trajectory's endpoint

    def along(tt):  # the same trajectory (same quantile) at time tt
        ct, st = torch.cos(tt).view(-1, 1, 1, 1), torch.sin(tt).view(-1, 1, 1, 1)
        return ct * MU + (ct**2 * S**2 + st**2 * SIGMA_D**2).sqrt() * (x0_star - MU) / S

    h = 1e-3
    numeric = (along(t + h) - along(t - h)) / (2 * h)
    torch.testing.assert_close(SIGMA_D * trigflow_output(teacher, x_t, t, SIGMA_D), numeric, atol=2e-4, rtol=1e-3)


def _attention_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    )


@pytest.mark.parametrize("path", ["vp", "flow"])
def test_forward_mode_jvp_through_an_attention_unet_matches_finite_differences(path):
    """torch.func.jvp (math attention kernel) and central differences agree on a UNet with attention, on
    both paths, away from the VP table's interpolation knots (t chosen between them)."""
    schedule = vp_schedule() if path == "vp" else FlowSchedule(1000, shift=2.0)
    kind = "v_prediction" if path == "vp" else "flow_prediction"
    den = Denoiser(_attention_unet(), schedule, kind)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.8, 1.3])
    dx = torch.randn(3, 1, 8, 8, generator=g)
    F = lambda xx, tt: trigflow_output(den, xx, tt, SIGMA_D)  # noqa: E731
    with torch.no_grad():
        out_f, d_forward = trigflow_jvp(F, x, t, dx, "forward")
        out_d, d_fd = trigflow_jvp(F, x, t, dx, "finite_difference", step=1e-4)
    torch.testing.assert_close(out_f, out_d)
    rel = (d_forward - d_fd).norm() / d_forward.norm()
    assert rel < 2e-2, rel


def test_tangent_is_cos_t_times_the_derivative_of_f_along_the_teacher_ode():
    """g (r = 1, unnormalised) = cos(t) df-/dt, df-/dt by central differences of f along dx_t/dt."""
    schedule = vp_schedule()
    student = Denoiser(_attention_unet(0), schedule, "v_prediction")
    teacher = Denoiser(_attention_unet(1), schedule, "v_prediction")
    g_ = torch.Generator().manual_seed(3)
    x_t = torch.randn(3, 1, 8, 8, generator=g_) * 0.7
    t = torch.tensor([0.4, 0.9, 1.2])
    with torch.no_grad():
        dxt_dt = SIGMA_D * trigflow_output(teacher, x_t, t, SIGMA_D)
        F = lambda xx, tt: trigflow_output(student, xx, tt, SIGMA_D)  # noqa: E731
        F_minus, dF_dt = trigflow_jvp(F, x_t, t, dxt_dt, "forward")
        g = scm_tangent(F_minus, dF_dt, dxt_dt, x_t, t, SIGMA_D, warmup=1.0)
        h = 1e-4  # the network's sinusoidal timestep embedding varies on the scale of one timestep
        f = lambda xx, tt: consistency_function(xx, tt, F(xx, tt), SIGMA_D)  # noqa: E731
        df_dt = (f(x_t + h * dxt_dt, t + h) - f(x_t - h * dxt_dt, t - h)) / (2 * h)
    expected = torch.cos(t).view(-1, 1, 1, 1) * df_dt
    assert ((g - expected).norm() / expected.norm()) < 2e-2
    # r = 0 keeps only the first term
    g0 = scm_tangent(F_minus, dF_dt, dxt_dt, x_t, t, SIGMA_D, warmup=0.0)
    torch.testing.assert_close(g0, -(torch.cos(t) ** 2).view(-1, 1, 1, 1) * (SIGMA_D * F_minus - dxt_dt))


def test_consistency_function_is_the_denoisers_x0_estimate():
    schedule = vp_schedule()
    den = Denoiser(_attention_unet(), schedule, "v_prediction")
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.05, 0.7, 1.5])
    with torch.no_grad():
        f = consistency_function(x, t, trigflow_output(den, x, t, SIGMA_D), SIGMA_D)
        lam = flow_time_of_trigflow(t, SIGMA_D)
        a, s, _ = schedule.at_flow_time(lam)
        x0 = den.at_flow_time(x / trigflow_scale(a, s, SIGMA_D).view(-1, 1, 1, 1), lam).x0
    torch.testing.assert_close(f, x0, atol=1e-4, rtol=1e-4)


def test_stabilisers_by_hand():
    g = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 0.0]]]])
    torch.testing.assert_close(normalise_tangent(g, 0.1), g / torch.tensor([5.1, 0.1]).view(-1, 1, 1, 1))
    assert [tangent_warmup(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert tangent_warmup(0, 0) == 1.0
    F, Fm, gg = torch.ones(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), torch.full((2, 1, 1, 2), 0.5)
    per, unweighted = scm_loss(F, Fm, gg)
    torch.testing.assert_close(per, torch.full((2,), 0.25))
    # e^{-w} m + w is minimised at w = log m: the adaptive weight learns the per-t loss scale
    w = torch.log(unweighted).requires_grad_(True)
    scm_loss(F, Fm, gg, w)[0].sum().backward()
    torch.testing.assert_close(w.grad, torch.zeros(2), atol=1e-6, rtol=0)


def test_adaptive_weight_starts_at_zero_and_time_sampler_is_log_normal():
    w = AdaptiveWeight(SIGMA_D)
    t = torch.linspace(0.01, 1.55, 7)
    assert torch.equal(w(t), torch.zeros(7))
    ts = sample_trigflow_time(20000, -0.8, 1.6, SIGMA_D, torch.Generator().manual_seed(0))
    assert bool(((ts > 0) & (ts < math.pi / 2)).all())
    log_ratio = torch.log(SIGMA_D * torch.tan(ts))
    assert abs(log_ratio.mean().item() + 0.8) < 0.05 and abs(log_ratio.std().item() - 1.6) < 0.05


def test_bad_arguments_are_config_errors(tiny_teacher_dir):
    from lightning_distill.teacher import load_teacher

    teacher = load_teacher(str(tiny_teacher_dir))
    with pytest.raises(ConfigError, match="jvp 'reverse'.*forward"):
        SCMDistillation(teacher, jvp="reverse")
    with pytest.raises(ConfigError, match="sigma_data"):
        SCMDistillation(teacher, sigma_data=0.0)
    with pytest.raises(ConfigError, match="tangent_norm_const"):
        SCMDistillation(teacher, tangent_norm_const=-1.0)
    with pytest.raises(ConfigError, match="needs a teacher"):
        SCMDistillation(None)
    method = SCMDistillation(teacher)
    ids = {id(p) for p in method.trainable_parameters()}
    assert all(id(p) in ids for p in method.adaptive_weight.parameters())
    assert all(id(p) in ids for p in method.student.parameters())
    assert SCMDistillation(teacher, adaptive_weighting=False).adaptive_weight is None


@pytest.mark.parametrize("schedule", [vp_schedule(), FlowSchedule(1000, shift=3.0)], ids=["vp", "flow-shift3"])
def test_continuous_levels_meet_the_integer_tables(schedule):
    """at_flow_time at an integer timestep's flow time gives that timestep's alpha, sigma and network input;
    between two, a timestep between theirs; beyond the table's ends, the end timesteps (VP)."""
    ts = torch.tensor([0, 1, 250, 998, 999])
    alpha, sigma, model_t = schedule.at_flow_time(schedule.flow_time(ts))
    torch.testing.assert_close(alpha, schedule.alpha(ts), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sigma, schedule.sigma(ts), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model_t, schedule.model_timestep(ts).float(), atol=1e-3, rtol=1e-5)
    mid = (schedule.flow_time(ts[1:3]) + schedule.flow_time(ts[1:3] + 1)) / 2
    between = schedule.at_flow_time(mid)[2]
    lo, hi = schedule.model_timestep(ts[1:3]).float(), schedule.model_timestep(ts[1:3] + 1).float()
    assert bool(((between > lo) & (between < hi)).all()), (lo, between, hi)
    if schedule.path == "vp":
        ends = schedule.at_flow_time(torch.tensor([0.0, 1.0]))[2]
        assert ends.tolist() == [0.0, 999.0]


def test_finite_differences_under_bf16_autocast_are_the_float32_ones():
    """bf16-mixed training: dF/dt by central differences subtracts two nearby outputs, so it runs with autocast
    off (in bf16 it was mostly rounding: 10% off at the presets' h = 0.02 rad, 12x at h = 1e-4)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 1, 3, padding=1))

    def F(x, t):
        return net(torch.cat([x, torch.sin(t).view(-1, 1, 1, 1).expand_as(x)], 1))

    x, dx = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0.3, 0.7, 1.0, 1.3])
    with torch.no_grad():
        ref_F, ref = trigflow_jvp(F, x, t, dx, "finite_difference", step=1e-3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_F, got = trigflow_jvp(F, x, t, dx, "finite_difference", step=1e-3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(got_F, ref_F, rtol=0, atol=0)


def test_times_stay_where_the_teachers_table_reaches():
    """SD 1.5's schedule ends at TrigFlow t = 1.537 (not pi/2): above it the network's timestep would pin at
    T - 1 while alpha keeps falling. trigflow_range gives its table's ends, and the finite differences stay
    inside them (one-sided at the ends)."""
    from diffusers import DDPMScheduler

    from lightning_distill.methods.scm import trigflow_range, trigflow_time
    from lightning_distill.parametrisation import schedule_from_scheduler

    sd = schedule_from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    lo, hi = trigflow_range(sd, 0.5)
    assert hi == pytest.approx(1.5366, abs=1e-4) and hi == pytest.approx(float(trigflow_time(sd.flow_time(torch.tensor(999)), 0.5)))
    assert lo == pytest.approx(float(trigflow_time(sd.flow_time(torch.tensor(0)), 0.5))) and 0 < lo < 0.1
    flow_lo, flow_hi = trigflow_range(FlowSchedule(1000), 0.5)
    assert flow_hi == pytest.approx(math.pi / 2 - 1e-6) and flow_lo == pytest.approx(math.atan2(0.001, 0.999 * 0.5), rel=1e-4)
    seen = []

    def F(x, t):
        seen.append(t.clone())
        return x * torch.sin(t).view(-1, 1)

    t = torch.tensor([lo, 0.8, hi])
    trigflow_jvp(F, torch.ones(3, 2), t, torch.ones(3, 2), "finite_difference", step=0.01, t_range=(lo, hi))
    seen = torch.stack(seen)
    assert float(seen.min()) == pytest.approx(lo) and float(seen.max()) == pytest.approx(hi)
