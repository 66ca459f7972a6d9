"""The parametrisation layer against diffusers' DDIMScheduler and against closed forms.

Closed form used throughout: for Gaussian data x0 ~ N(mu, s^2 I) and x_t = alpha x0 + sigma eps,
  E[x0  | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)
  E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)
(jointly Gaussian, Cov(x0, x_t) = alpha s^2, Cov(eps, x_t) = sigma, Var(x_t) = alpha^2 s^2 + sigma^2).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from lightning_distill.parametrisation import (
    Denoiser,
    VPSchedule,
    ddim_step,
    expand_like,
    output_for,
    prediction_from_output,
    target_for,
)

KINDS = ("epsilon", "sample", "v_prediction")


def _sched(T: int = 1024, prediction_type: str = "epsilon", clip_sample: bool = False, beta="squaredcos_cap_v2"):
    return DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule=beta,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )


# --- conversions --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_conversions_round_trip(kind):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 3, 3, generator=g)
    eps = torch.randn(5, 2, 3, 3, generator=g)
    ac = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.01])
    a, s = ac.sqrt(), (1 - ac).sqrt()
    x_t = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
    v_true = a.view(-1, 1, 1, 1) * eps - s.view(-1, 1, 1, 1) * x0  # Salimans & Ho 2022, Sec. 4

    # the target of an ideal network turns back into (x0, eps, v)
    target = target_for(kind, x0, eps, a, s)
    pred = prediction_from_output(target, x_t, a, s, kind)
    torch.testing.assert_close(pred.x0, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred.eps, eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred.v, v_true, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred.get(kind), target)

    # output_for(x0) is the output that decodes to that x0 (any x0, not only the true one)
    other = torch.randn(5, 2, 3, 3, generator=g)
    out = output_for(kind, other, x_t, a, s)
    torch.testing.assert_close(prediction_from_output(out, x_t, a, s, kind).x0, other, atol=1e-4, rtol=1e-4)
    # x_t = alpha x0 + sigma eps holds for every decoded prediction
    p = prediction_from_output(out, x_t, a, s, kind)
    torch.testing.assert_close(a.view(-1, 1, 1, 1) * p.x0 + s.view(-1, 1, 1, 1) * p.eps, x_t, atol=1e-5, rtol=1e-5)


def test_hand_computed_conversion_values():
    # alpha = 0.6, sigma = 0.8, x_t = 1, network output 0.5
    a, s, x_t, out = torch.tensor([0.6]), torch.tensor([0.8]), torch.ones(1, 1), torch.full((1, 1), 0.5)
    eps_pred = prediction_from_output(out, x_t, a, s, "epsilon")
    assert eps_pred.x0.item() == pytest.approx((1 - 0.8 * 0.5) / 0.6)  # 1.0
    v_pred = prediction_from_output(out, x_t, a, s, "v_prediction")
    assert v_pred.x0.item() == pytest.approx(0.6 * 1 - 0.8 * 0.5)  # 0.2
    assert v_pred.eps.item() == pytest.approx(0.8 * 1 + 0.6 * 0.5)  # 1.1
    x_pred = prediction_from_output(out, x_t, a, s, "sample")
    assert x_pred.eps.item() == pytest.approx((1 - 0.6 * 0.5) / 0.8)  # 0.875
    clipped = prediction_from_output(torch.full((1, 1), 3.0), x_t, a, s, "sample", clip_x0=1.0)
    assert clipped.x0.item() == 1.0 and clipped.eps.item() == pytest.approx((1 - 0.6) / 0.8)
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        prediction_from_output(out, x_t, a, s, "x0")
    with pytest.raises(ValueError, match="choose one of"):
        target_for("eps", x_t, x_t, a, s)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        Denoiser(nn.Identity(), VPSchedule(torch.tensor([0.5])), "x0")


# --- schedule lookups ---------------------------------------------------------------------------


def test_alpha_sigma_snr_lookups():
    sched = _sched(1000, beta="linear")
    vp = VPSchedule.from_scheduler(sched)
    assert vp.num_train_timesteps == 1000
    t = torch.tensor([0, 1, 500, 999])
    ac = sched.alphas_cumprod[t]
    torch.testing.assert_close(vp.alpha(t), ac.sqrt())
    torch.testing.assert_close(vp.sigma(t), (1 - ac).sqrt())
    torch.testing.assert_close(vp.snr(t), ac / (1 - ac))
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones(4))
    # linear betas from 1e-4: alpha_bar_0 = 1 - 1e-4 by hand
    assert vp.alphas_cumprod(torch.tensor(0)).item() == pytest.approx(1 - 1e-4)
    # t = -1 is clean data
    assert vp.alpha(torch.tensor([-1])).item() == 1.0
    assert vp.sigma(torch.tensor([-1])).item() == 0.0
    # add_noise is the forward process
    x0, eps = torch.ones(4, 1, 2, 2), torch.full((4, 1, 2, 2), 2.0)
    expect = ac.sqrt().view(-1, 1, 1, 1) + 2 * (1 - ac).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(vp.add_noise(x0, eps, t), expect.expand(4, 1, 2, 2))
    for bad in (-2, 1000):
        with pytest.raises(ValueError, match=r"timesteps must lie in \[-1, 999\]"):
            vp.alpha(torch.tensor([bad]))
    with pytest.raises(ValueError, match=r"num_steps must lie in \[1, 1000\], got 0"):
        vp.trailing_timesteps(0)
    with pytest.raises(ValueError, match="got 1001"):
        vp.trailing_timesteps(1001)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPSchedule(torch.tensor([0.5, 0.0, 0.0]))  # only the last may be 0 (zero terminal SNR)


def test_public_table_copy_and_broadcast():
    sched = _sched(1000, beta="linear")
    vp = VPSchedule.from_scheduler(sched)
    torch.testing.assert_close(vp.alphas_cumprod_table, sched.alphas_cumprod.float())
    assert torch.equal(vp.alphas_cumprod_table, vp.alphas_cumprod(torch.arange(1000)))
    other = vp.copy()
    assert torch.equal(other._alphas_cumprod, vp._alphas_cumprod)
    other._alphas_cumprod.mul_(0.5)  # an independent copy: the original is untouched
    assert torch.equal(vp.alphas_cumprod_table, sched.alphas_cumprod.float())
    coef, batch = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.ones(2, 3, 4, 4, dtype=torch.float16)
    out = expand_like(coef, batch)
    assert out.shape == (2, 1, 1, 1) and out.dtype == torch.float16 and out.flatten().tolist() == [1.0, 2.0]


@pytest.mark.parametrize("T", [1000, 1024])
@pytest.mark.parametrize("N", [1, 2, 3, 4, 7, 8, 16, 50, 64, 100])
def test_trailing_timesteps_match_diffusers(T, N):
    sched = _sched(T)
    sched.set_timesteps(N)
    grid = VPSchedule.from_scheduler(sched).trailing_timesteps(N)
    assert grid.shape == (N + 1,)
    assert grid[-1].item() == -1 and grid[0].item() == T - 1
    assert torch.equal(grid[:-1], sched.timesteps.long())


def test_trailing_grid_nests():
    vp = VPSchedule.from_scheduler(_sched(1024))
    n = 1
    while n <= 512:
        assert torch.equal(vp.trailing_timesteps(n), vp.trailing_timesteps(2 * n)[::2]), n
        n *= 2
    # hand value: 4 steps on T = 1024 are 1023, 767, 511, 255, then clean
    assert vp.trailing_timesteps(4).tolist() == [1023, 767, 511, 255, -1]


# --- DDIM step vs diffusers ---------------------------------------------------------------------


class ToyNet(nn.Module):
    """Deterministic, nonlinear, timestep-dependent 'network' with the diffusers call signature."""

    def forward(self, x, t, return_dict=False):
        return (2 * torch.tanh(x) + (t.float() / 1024).view(-1, 1, 1, 1),)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("N", [4, 8])
def test_ddim_matches_diffusers_step(prediction_type, clip, N):
    T = 1024
    sched = _sched(T, prediction_type, clip_sample=clip)
    sched.set_timesteps(N)
    den = Denoiser(ToyNet(), VPSchedule.from_scheduler(sched), prediction_type, 1.0 if clip else None)
    grid = den.schedule.trailing_timesteps(N)
    g = torch.Generator().manual_seed(1)
    x = 1.5 * torch.randn(3, 1, 4, 4, generator=g)
    clipped_somewhere = False
    for t, s in zip(grid[:-1], grid[1:]):
        x_in = 1.5 * torch.randn(3, 1, 4, 4, generator=g)  # a fresh input at every level
        out = den.raw(x_in, t)
        # Denoiser re-derives eps from the clipped x0, i.e. diffusers' use_clipped_model_output=True.
        ref = sched.step(out, int(t), x_in, eta=0.0, use_clipped_model_output=clip).prev_sample
        ours = den.ddim(x_in, t, s)
        scale = ref.abs().max().clamp_min(1.0)
        torch.testing.assert_close(ours / scale, ref / scale, atol=2e-5, rtol=2e-5)
        clipped_somewhere |= bool((den(x_in, t).x0.abs() == 1.0).any())
        x = ours
    # the final step lands on the (clipped) x0 estimate: alpha_{-1} = 1, sigma_{-1} = 0
    assert grid[-1] == -1
    if clip:
        assert clipped_somewhere, "test input never triggered clipping"
        assert x.abs().max() <= 1.0


def test_ddim_step_pure_function_by_hand():
    x0, eps = torch.full((1, 1), 0.5), torch.full((1, 1), -1.0)
    assert ddim_step(x0, eps, torch.tensor([0.8]), torch.tensor([0.6])).item() == pytest.approx(0.8 * 0.5 - 0.6)


# --- closed form on Gaussian data ---------------------------------------------------------------

MU, S = 0.3, 0.5


class GaussianIdealNet(nn.Module):
    """The ideal network for x0 ~ N(MU, S^2 I): outputs E[eps|x_t] or E[v|x_t] from the closed forms."""

    def __init__(self, alphas_cumprod: torch.Tensor, kind: str) -> None:
        super().__init__()
        self.ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.kind = kind

    def forward(self, x_t, t, return_dict=False):
        ac = self.ac[t.long()].view(-1, 1, 1, 1)
        a, s = ac.sqrt(), (1 - ac).sqrt()
        x = x_t.double()
        var = a**2 * S**2 + s**2
        eps = s * (x - a * MU) / var
        if self.kind == "epsilon":
            out = eps
        else:
            x0 = MU + a * S**2 / var * (x - a * MU)
            out = a * eps - s * x0
        return (out.to(x_t.dtype),)


def posterior_mean(x_t, alpha, sigma):
    a, s = alpha.double().view(-1, 1, 1, 1), sigma.double().view(-1, 1, 1, 1)
    return MU + a * S**2 / (a**2 * S**2 + s**2) * (x_t.double() - a * MU)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_denoiser_x0_is_gaussian_posterior_mean(kind):
    sched = _sched(1024, kind)
    vp = VPSchedule.from_scheduler(sched)
    den = Denoiser(GaussianIdealNet(sched.alphas_cumprod, kind), vp, kind)
    # eps-prediction is ill-conditioned near t = T - 1 (x0 = (x - sigma eps) / alpha, alpha ~ 5e-5)
    ts = [0, 10, 255, 511, 900] + ([1023] if kind == "v_prediction" else [])
    g = torch.Generator().manual_seed(0)
    for t in ts:
        tt = torch.full((64,), t)
        x0 = MU + S * torch.randn(64, 1, 2, 2, generator=g)
        x_t = vp.add_noise(x0, torch.randn(64, 1, 2, 2, generator=g), tt)
        expect = posterior_mean(x_t, vp.alpha(tt), vp.sigma(tt)).float()
        torch.testing.assert_close(den(x_t, tt).x0, expect, atol=2e-4, rtol=2e-4)


def test_clip_switch_gives_the_clamped_or_the_plain_conversion():
    """clip=True clamps x0 to clip_x0 and re-derives eps (the sampler's view); clip=False is the plain conversion."""

    class Const(nn.Module):
        def forward(self, x, t, return_dict=False):
            return (torch.full_like(x, 3.0),)

    vp = VPSchedule(torch.tensor([0.36, 0.64]))  # alpha 0.6 / 0.8, sigma 0.8 / 0.6
    den = Denoiser(Const(), vp, "sample", clip_x0=1.0)
    x_t, t = torch.ones(2, 1, 1, 1), torch.tensor([0, 1])
    clipped, plain = den(x_t, t), den(x_t, t, clip=False)
    assert clipped.x0.flatten().tolist() == [1.0, 1.0] and plain.x0.flatten().tolist() == [3.0, 3.0]
    torch.testing.assert_close(clipped.eps.flatten(), torch.tensor([(1 - 0.6) / 0.8, (1 - 0.8) / 0.6]))
    torch.testing.assert_close(plain.eps.flatten(), torch.tensor([(1 - 1.8) / 0.8, (1 - 2.4) / 0.6]))
    # one timestep for the whole batch, and clip=False equals the bare conversion of the raw output
    raw = den.raw(x_t, torch.tensor(1))
    a, s = vp.alpha(torch.tensor([1, 1])), vp.sigma(torch.tensor([1, 1]))
    torch.testing.assert_close(den(x_t, torch.tensor(1), clip=False).x0, prediction_from_output(raw, x_t, a, s, "sample").x0)
    unclipped = Denoiser(Const(), vp, "sample", clip_x0=None)
    assert torch.equal(unclipped(x_t, t).x0, unclipped(x_t, t, clip=False).x0)


def test_ddim_trajectory_maps_noise_to_gaussian_data():
    kind = "v_prediction"
    sched = _sched(1024, kind)
    vp = VPSchedule.from_scheduler(sched)
    den = Denoiser(GaussianIdealNet(sched.alphas_cumprod, kind), vp, kind)
    grid = vp.trailing_timesteps(256)
    x = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for t, s in zip(grid[:-1], grid[1:]):
        x = den.ddim(x, t, s)
    # The probability-flow ODE of Gaussian data is an affine map: mean and std are transported exactly
    # in the continuum limit; the sample statistics carry Monte-Carlo error ~ 1/sqrt(16384) ~ 0.008.
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(S, abs=0.02)
    # and deterministic: the same noise gives the same samples
    y = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for t, s in zip(grid[:-1], grid[1:]):
        y = den.ddim(y, t, s)
    assert torch.equal(x, y)


# --- zero terminal SNR (Lin et al. 2023): alphas_cumprod[-1] == 0 exactly ----------------------------


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DDPMScheduler", "LCMScheduler"])
def test_zero_terminal_snr_schedule_keeps_its_exact_zero(cls):
    import diffusers

    sched = getattr(diffusers, cls)(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert float(sched.alphas_cumprod[-1]) == 0.0
    vp = VPSchedule.from_scheduler(sched)
    last = torch.tensor(999)
    # pure noise at T - 1, as the sampler has it: alpha = 0, sigma = 1, SNR = 0
    assert (vp.alpha(last).item(), vp.sigma(last).item(), vp.snr(last).item()) == (0.0, 1.0, 0.0)
    assert vp.zero_terminal_snr and not VPSchedule.from_scheduler(_sched()).zero_terminal_snr
    torch.testing.assert_close(vp.alphas_cumprod_table, sched.alphas_cumprod.float(), atol=0, rtol=0)
    for bad in ([0.5, 0.0, 0.0], [1.2, 0.5], [0.5, -1e-3]):  # a zero before the end, above 1, negative
        with pytest.raises(ValueError, match="alphas_cumprod must be"):
            VPSchedule(torch.tensor(bad))


def test_eps_prediction_is_refused_on_a_zero_terminal_snr_schedule():
    from lightning_distill.errors import ConfigError
    from lightning_distill.parametrisation import FlowSchedule

    zsnr = VPSchedule.from_scheduler(DDIMScheduler(rescale_betas_zero_snr=True))
    for schedule in (zsnr, FlowSchedule(1000)):  # the flow path ends at alpha = 0 too
        with pytest.raises(ConfigError, match=r"'epsilon' is undefined .*zero-terminal-SNR.*choose one of"):
            Denoiser(nn.Identity(), schedule, "epsilon")
    Denoiser(nn.Identity(), zsnr, "v_prediction")
    Denoiser(nn.Identity(), VPSchedule.from_scheduler(_sched()), "epsilon")  # alpha_bar[-1] > 0: fine


def test_zero_terminal_snr_diffusion_training_steps_and_samples_finite():
    """DiffusionTraining(rescale_betas_zero_snr=True) with v-prediction: the loss at T - 1 (alpha = 0, Min-SNR
    weighting there: SNR = 0) is finite and trains; the DDIM sampler starts at T - 1 and equals Denoiser.ddim."""
    from diffusers.utils.torch_utils import randn_tensor

    from conftest import make_tiny_unet
    from lightning_distill.methods import DiffusionTraining

    model = DiffusionTraining(unet=make_tiny_unet(8), rescale_betas_zero_snr=True, prediction_type="v_prediction",
                              min_snr_gamma=5.0, sample_steps=4, num_train_timesteps=1000, clip_sample=False)
    sched = model.student.schedule
    assert sched.alpha(torch.tensor(999)).item() == 0.0
    model.training_timesteps = lambda n, device: torch.tensor([999, 999, 500, 0])[:n]  # pure noise included
    opt = model.configure_optimizers()
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(0)
    loss = model.compute_loss({"x": x0, "label": torch.zeros(4, dtype=torch.long)}).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.student.parameters() if p.grad is not None)
    opt.step()
    out = model.sample(3, 4, torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all()
    assert model.sampling_scheduler(4).timesteps[0].item() == 999
    x = randn_tensor((3, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    grid = sched.trailing_timesteps(4)
    with torch.no_grad():
        for t, s in zip(grid[:-1], grid[1:]):
            x = model.student.ddim(x, t, s)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'epsilon' is undefined"):
        DiffusionTraining(unet=make_tiny_unet(8), rescale_betas_zero_snr=True, prediction_type="epsilon")


# --- the samplers each student type has ------------------------------------------------------------


def test_a_flow_velocity_student_of_a_vp_teacher_is_refused_at_construction(tiny_teacher_dir):
    from lightning_distill.errors import ConfigError
    from lightning_distill.methods import KnowledgeDistillation
    from lightning_distill.sampling import deterministic_scheduler
    from lightning_distill.teacher import load_teacher

    teacher = load_teacher(str(tiny_teacher_dir))
    with pytest.raises(ConfigError, match=r"epsilon, sample, v_prediction: student_prediction_type 'flow_prediction'"):
        KnowledgeDistillation(teacher, student_prediction_type="flow_prediction")
    with pytest.raises(ConfigError, match=r"epsilon, sample, v_prediction: prediction_type 'flow_prediction'"):
        deterministic_scheduler(teacher.scheduler_config, teacher.schedule, "flow_prediction", None)
    for kind in ("epsilon", "sample", "v_prediction"):
        assert KnowledgeDistillation(teacher, student_prediction_type=kind).student.prediction_type == kind
