"""The flow-matching path of the parametrisation layer, against diffusers' FlowMatch schedulers and
closed forms; flow teachers (training, loading, errors).

Closed form: for Gaussian data x0 ~ N(MU, S^2 I) and x_s = (1 - s) x0 + s eps,
  E[x0 | x_s] = MU + a S^2 / (a^2 S^2 + s^2) (x_s - a MU),  a = 1 - s,
and the ideal velocity is E[eps - x0 | x_s]; the flow ODE transports N(0, I) onto the data exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler
from torch import nn

from lightning_distill.parametrisation import (
    PREDICTION_TYPES,
    Denoiser,
    FlowSchedule,
    VPSchedule,
    dynamic_shift,
    flow_shift,
    prediction_from_output,
    schedule_from_scheduler,
    target_for,
)
from lightning_distill.sampling import at_steps

MU, S = 0.3, 0.5
REPO = Path(__file__).resolve().parents[1]


# --- the schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_table_is_diffusers_training_table(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ours = FlowSchedule.from_scheduler(sched)
    t = torch.arange(1000)
    # diffusers stores the table high to low: index i of ours is entry T - 1 - i of theirs
    torch.testing.assert_close(ours.sigma(t), sched.sigmas.flip(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.model_timestep(t), sched.timesteps.flip(0), atol=1e-3, rtol=0)
    torch.testing.assert_close(ours.alpha(t) + ours.sigma(t), torch.ones(1000))
    assert ours.sigma(torch.tensor(-1)).item() == 0.0 and ours.alpha(torch.tensor(-1)).item() == 1.0
    s = ours.sigma(t[:-1])
    torch.testing.assert_close(ours.snr(t[:-1]), ((1 - s) / s) ** 2)


def test_shift_by_hand_and_dynamic_shift_equals_diffusers():
    assert flow_shift(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 3 * .5 / (1 + 2 * .5)
    cfg = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **cfg)
    seq = 1024
    mu = 0.5 + (1.15 - 0.5) * (seq - 256) / (4096 - 256)
    assert dynamic_shift(seq, dict(sched.config)) == pytest.approx(math.exp(mu))
    sched.set_timesteps(8, mu=mu)  # diffusers' resolution-dependent shift of the 8-step grid
    unshifted = torch.linspace(1, 1 / 1000, 8, dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas[:-1].double(), flow_shift(unshifted, math.exp(mu)), atol=1e-6, rtol=0)
    assert FlowSchedule.from_scheduler(sched, seq).shift == pytest.approx(math.exp(mu))
    with pytest.raises(ValueError, match="image token count"):
        FlowSchedule.from_scheduler(sched)


def test_schedule_from_scheduler_recognises_the_path_and_names_the_supported_ones():
    from diffusers import CMStochasticIterativeScheduler, DDIMScheduler

    assert isinstance(schedule_from_scheduler(FlowMatchEulerDiscreteScheduler()), FlowSchedule)
    assert isinstance(schedule_from_scheduler(FlowMatchLCMScheduler()), FlowSchedule)
    assert isinstance(schedule_from_scheduler(DDIMScheduler()), VPSchedule)
    with pytest.raises(ValueError, match=r"CMStochasticIterativeScheduler is not supported; flow-matching: FlowMatchEulerDiscreteScheduler"):
        schedule_from_scheduler(CMStochasticIterativeScheduler())


# --- conversions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PREDICTION_TYPES)  # v too: its inversion divides by alpha^2 + sigma^2 (not 1 here)
def test_conversions_round_trip_on_the_flow_path(kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    s = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99])
    a = 1 - s
    x_s = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
    target = target_for(kind, x0, eps, a, s)
    pred = prediction_from_output(target, x_s, a, s, kind)
    torch.testing.assert_close(pred.x0, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred.eps, eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred.flow, eps - x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred.get(kind), target)


def test_flow_prediction_by_hand():
    # x_s = 0.5 at s = 0.25 with u = 2: x0 = x_s - s u = 0, eps = u + x0 = 2
    pred = prediction_from_output(torch.tensor([[2.0]]), torch.tensor([[0.5]]), torch.tensor([0.75]),
                                  torch.tensor([0.25]), "flow_prediction")
    assert pred.x0.item() == pytest.approx(0.0) and pred.eps.item() == pytest.approx(2.0)
    assert "flow_prediction" in PREDICTION_TYPES
    with pytest.raises(ValueError, match="choose one of"):
        target_for("velocity", torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1))


class IdealVelocity(nn.Module):
    """E[eps - x0 | x_s] for x0 ~ N(MU, S^2 I), called with diffusers' timestep s * 1000."""

    def forward(self, x, model_t, return_dict=False):
        s = (model_t.double() / 1000).view(-1, 1, 1, 1)
        a = 1 - s
        var = a**2 * S**2 + s**2
        x0 = MU + a * S**2 / var * (x.double() - a * MU)
        eps = s * (x.double() - a * MU) / var
        return ((eps - x0).to(x.dtype),)


def test_denoiser_x0_is_the_gaussian_posterior_mean():
    fs = FlowSchedule(1000)
    den = Denoiser(IdealVelocity(), fs, "flow_prediction")
    g = torch.Generator().manual_seed(0)
    for t in (0, 100, 500, 900, 999):
        tt = torch.full((64,), t)
        x0 = MU + S * torch.randn(64, 1, 2, 2, generator=g)
        x_s = fs.add_noise(x0, torch.randn(64, 1, 2, 2, generator=g), tt)
        a, s = fs.alpha(tt).double().view(-1, 1, 1, 1), fs.sigma(tt).double().view(-1, 1, 1, 1)
        expect = MU + a * S**2 / (a**2 * S**2 + s**2) * (x_s.double() - a * MU)
        torch.testing.assert_close(den(x_s, tt).x0, expect.float(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_ddim_step_is_flow_match_euler_step(steps):
    """Denoiser.ddim on the flow path == FlowMatchEulerDiscreteScheduler.step, on its own grid."""
    fs = FlowSchedule(1000)
    den = Denoiser(IdealVelocity(), fs, "flow_prediction")
    sched = at_steps(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), steps)
    sched.set_timesteps(steps)
    grid = fs.trailing_timesteps(steps)
    torch.testing.assert_close(fs.model_timestep(grid[:-1]), sched.timesteps, atol=1e-3, rtol=0)
    x = y = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for k, model_t in enumerate(sched.timesteps):
        u = den.network(y, model_t)
        y = sched.step(u, model_t, y).prev_sample
        x = den.ddim(x, grid[k], grid[k + 1])
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_euler_trajectory_maps_noise_to_gaussian_data():
    fs = FlowSchedule(1000)
    den = Denoiser(IdealVelocity(), fs, "flow_prediction")
    grid = fs.trailing_timesteps(250)
    x = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for t, s in zip(grid[:-1], grid[1:]):
        x = den.ddim(x, t, s)
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(S, abs=0.02)
    # one Euler step from s = 1 lands on the data mean (x0 estimate at pure noise), not the data spread
    y = den.ddim(torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(1)), grid[0], grid[-1])
    assert y.std().item() < 0.05


def test_flow_sampler_grids():
    """diffusers' default 2-step grid is (1, 0.001); at_steps gives 1, 1/2, 0 and Flux's uniform grid for any N."""
    stock = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    stock.set_timesteps(2)
    assert stock.sigmas[1].item() == pytest.approx(0.001)
    for n in (1, 2, 3, 4, 8, 50):
        sched = at_steps(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), n)
        sched.set_timesteps(n)
        expect = torch.tensor([1 - k / n for k in range(n + 1)])
        torch.testing.assert_close(sched.sigmas, expect, atol=1e-3 if n == 3 else 1e-6, rtol=0)
    lcm = at_steps(FlowMatchLCMScheduler(num_train_timesteps=1000), 4)
    lcm.set_timesteps(4)
    torch.testing.assert_close(lcm.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # VP schedulers are left alone
    from diffusers import DDIMScheduler

    d = DDIMScheduler()
    assert at_steps(d, 4) is d


# --- flow teachers ----------------------------------------------------------------------------------


def test_flow_teacher_is_recognised_without_a_flag(tiny_flow_teacher_dir):
    from lightning_distill.teacher import load_teacher

    teacher = load_teacher(str(tiny_flow_teacher_dir))
    assert teacher.schedule.path == "flow" and teacher.prediction_type == "flow_prediction"
    assert teacher.denoiser.clip_x0 is None  # flow samplers never clamp
    assert teacher.schedule.num_train_timesteps == 1000


def test_unsupported_scheduler_is_a_one_line_error_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    from conftest import write_tiny_teacher

    from lightning_distill.cli import cli_main

    monkeypatch.delenv("LIGHTNING_DISTILL_TRACEBACK", raising=False)
    folder = write_tiny_teacher(tmp_path / "teacher")
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "CMStochasticIterativeScheduler"
    cfg_path.write_text(json.dumps(cfg))

    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(REPO / "configs/consistency/debug.yaml"), "--data.teacher", str(folder),
                  "--data.image_size", "8", "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error" in line.lower()]) == 1, err[-5:]
    assert "CMStochasticIterativeScheduler is not supported" in err[-1]
    assert "FlowMatchEulerDiscreteScheduler" in err[-1] and "DDIMScheduler" in err[-1]
    assert not (tmp_path / "run").exists()


def test_flow_training_recipe(tmp_path):
    """Velocity MSE with logit-normal levels: the loss is || u_theta - (eps - x0) ||^2 at levels drawn
    from sigmoid(N(m, std)); the flow teacher refuses VP-only settings."""
    from conftest import make_tiny_unet

    from lightning_distill.errors import ConfigError
    from lightning_distill.methods import DiffusionTraining

    model = DiffusionTraining(unet=make_tiny_unet(), path="flow", prediction_type="flow_prediction",
                              timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0)
    assert model.student.path == "flow" and model.student.clip_x0 is None
    torch.manual_seed(0)
    t = model.training_timesteps(20000, "cpu")
    u = (t.float() + 0.5) / 1000
    logit = torch.log(u / (1 - u))
    assert logit.mean().item() == pytest.approx(0.0, abs=0.03) and logit.std().item() == pytest.approx(1.0, abs=0.03)
    # the loss equals the velocity MSE computed by hand, from the same random draws
    x0 = torch.randn(4, 1, 8, 8)
    torch.manual_seed(1)
    loss = model.compute_loss({"x": x0, "label": torch.zeros(4, dtype=torch.long)}).loss
    torch.manual_seed(1)
    t = model.training_timesteps(4, "cpu")
    eps = torch.randn_like(x0)
    s = model.student.schedule.sigma(t).view(-1, 1, 1, 1)
    x_s = (1 - s) * x0 + s * eps
    u_hat = model.student.unet(x_s, s.flatten() * 1000).sample
    torch.testing.assert_close(loss, ((u_hat - (eps - x0)) ** 2).mean())
    with pytest.raises(ConfigError, match="flow_prediction needs path: flow"):
        DiffusionTraining(unet=make_tiny_unet(), prediction_type="flow_prediction")
    with pytest.raises(ConfigError, match="logit_normal"):
        DiffusionTraining(unet=make_tiny_unet(), timestep_sampling="logit_normal")
    with pytest.raises(ConfigError, match="set prediction_type to flow_prediction"):
        DiffusionTraining(unet=make_tiny_unet(), path="flow", prediction_type="epsilon")


def test_teacher_sampler_is_euler_on_the_trailing_grid(tiny_flow_teacher_dir):
    """evaluate's teacher sampler (metrics.sample_teacher) takes N Euler steps s = 1, (N-1)/N, ..., 0."""
    from diffusers.utils.torch_utils import randn_tensor

    from lightning_distill.metrics import sample_teacher
    from lightning_distill.teacher import load_teacher

    teacher = load_teacher(str(tiny_flow_teacher_dir))
    for steps in (1, 2, 4):
        ours = sample_teacher(teacher, 3, steps, torch.Generator().manual_seed(5))
        x = randn_tensor((3, 1, 8, 8), generator=torch.Generator().manual_seed(5))
        grid = teacher.schedule.trailing_timesteps(steps)
        for t, s in zip(grid[:-1], grid[1:]):
            x = teacher.denoiser.ddim(x, t, s)
        torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_a_non_velocity_student_of_a_flow_teacher_is_refused_at_construction(tiny_flow_teacher_dir):
    from lightning_distill.errors import ConfigError
    from lightning_distill.methods import KnowledgeDistillation
    from lightning_distill.teacher import load_teacher

    teacher = load_teacher(str(tiny_flow_teacher_dir))
    with pytest.raises(ConfigError, match="predicts the velocity .'flow_prediction'.: student_prediction_type 'sample'"):
        KnowledgeDistillation(teacher, student_prediction_type="sample")
    assert KnowledgeDistillation(teacher).student.prediction_type == "flow_prediction"


def test_a_flow_teacher_refuses_another_prediction_type_at_load():
    from lightning_distill.teacher import TeacherError, load_teacher

    for kind in ("v_prediction", "epsilon", "sample"):
        with pytest.raises(TeacherError, match=rf"prediction_type must be 'flow_prediction' \(or unset\), not '{kind}'"):
            load_teacher("bundled:digits-flow", prediction_type=kind)
    assert load_teacher("bundled:digits-flow", prediction_type="flow_prediction").prediction_type == "flow_prediction"


# --- how N steps are set: the teacher's pipeline family ---------------------------------------------

FLUX_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096)


class RecordingVelocity(nn.Module):
    """A flow network of no diffusers class at 64 x 64 = 4096 tokens that records the timesteps it is fed."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.1))
        self.config = {"sample_size": 64, "in_channels": 1}
        self.fed: list[float] = []

    def forward(self, x, t, return_dict=False, **cond):
        self.fed.append(float(t.flatten()[0]))
        return (self.w * x,)


@pytest.mark.parametrize("K", [2, 4])
def test_flux_family_samples_and_trains_where_flux_pipeline_samples(K):
    """A use_dynamic_shifting (Flux) scheduler: FluxPipeline calls set_timesteps(sigmas=linspace(1, 1/K, K), mu=mu).
    The framework's sampler (deterministic and x0), the levels its x0-sampler students train at and the trailing
    grid all equal those sigmas; set_timesteps(K) would visit 1, 0.933, 0.810, 0.513 at K = 4 instead."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    from lightning_distill.methods import KnowledgeDistillation
    from lightning_distill.methods.consistency import consistency_grid
    from lightning_distill.sampling import flow_scheduler, generator_timesteps, lcm_training_timesteps, sampler_grid_gap
    from lightning_distill.teacher import DiffusionTeacher

    mu = calculate_shift(4096, 256, 4096, 0.5, 1.15)
    ref = FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    ref_t, _ = retrieve_timesteps(ref, K, sigmas=np.linspace(1.0, 1 / K, K), mu=mu)
    want = ref.sigmas.double()
    teacher = DiffusionTeacher(RecordingVelocity(), FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG))
    schedule = teacher.schedule
    assert schedule.shift == pytest.approx(math.exp(mu))
    close = dict(atol=1e-5, rtol=0)
    # framework sample(): the scheduler it steps with and the timesteps the network is fed
    model = KnowledgeDistillation(teacher, sample_steps=K)
    model.sample(1, K, torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.sampling_scheduler(K).sigmas.double(), want, **close)
    torch.testing.assert_close(torch.tensor(model.student.unet.fed, dtype=torch.float64), ref_t.double(), atol=1e-2, rtol=0)
    # the levels x0-sampler students (ADD, DMD2, consistency) train at, and their sampler
    torch.testing.assert_close(schedule.sigma(generator_timesteps(schedule, K)).double(), want[:-1], **close)
    from lightning_distill.sampling import set_pipeline_steps

    assert schedule.linspace_sigmas
    x0_sampler = set_pipeline_steps(at_steps(flow_scheduler("x0", schedule), K, schedule), K, schedule)
    torch.testing.assert_close(x0_sampler.sigmas.double(), want, **close)
    # progressive distillation's trailing grid is that grid: no gap; consistency needs no levels beyond its own grid
    torch.testing.assert_close(schedule.sigma(schedule.trailing_timesteps(K)).double(), want, **close)
    assert sampler_grid_gap(flow_scheduler("ddim", schedule), schedule, K) < 1e-6
    assert torch.equal(consistency_grid(schedule, 40, (1, 2, 4)), lcm_training_timesteps(1000, 40))
    # the teacher's own (dynamically shifting) scheduler, through the same helper, gives them too
    own = set_pipeline_steps(FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG), K, schedule)
    torch.testing.assert_close(own.sigmas.double(), want, **close)


def test_pipeline_family_follows_the_network_and_leaves_sd3_and_unet_folders_alone():
    """FluxPipeline passes the linspace sigmas whatever its config; DDPMPipeline (a UNet flow folder, also with a
    use_dynamic_shifting config) and StableDiffusion3Pipeline call set_timesteps(N): their grid is unchanged."""
    from test_backbones import tiny_flux

    from lightning_distill.sampling import flow_scheduler, set_pipeline_steps
    from lightning_distill.teacher import DiffusionTeacher
    from conftest import make_tiny_unet

    assert DiffusionTeacher(tiny_flux(), FlowMatchEulerDiscreteScheduler(shift=3.0)).schedule.linspace_sigmas
    unet = make_tiny_unet(8)
    assert not DiffusionTeacher(unet, FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)).schedule.linspace_sigmas
    sd3 = FlowSchedule(1000, 3.0)  # SD3: static shift 3, no dynamic shifting
    assert not sd3.linspace_sigmas and not sd3.copy().linspace_sigmas
    assert FlowSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG), 4096).copy().linspace_sigmas
    for K in (1, 2, 4):
        plain = at_steps(flow_scheduler("ddim", sd3), K, sd3)
        plain.set_timesteps(K)
        ours = set_pipeline_steps(at_steps(flow_scheduler("ddim", sd3), K, sd3), K, sd3)
        assert torch.equal(ours.sigmas, plain.sigmas) and torch.equal(ours.timesteps, plain.timesteps)
    # the documented SD3 grid at K = 4 (sampling.generator_timesteps): 1000, 928, 799, 500
    assert [round(v) for v in set_pipeline_steps(at_steps(flow_scheduler("ddim", sd3), 4, sd3), 4, sd3).timesteps.tolist()] == [1000, 928, 799, 500]
