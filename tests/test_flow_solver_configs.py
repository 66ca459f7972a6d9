"""Flow-sigma solver configs: the ``DPMSolverMultistepScheduler`` SANA's folders ship and the ``UniPCMultistepScheduler``
Wan's ship (``use_flow_sigmas``, ``prediction_type: flow_prediction``, ``flow_shift``) are the rectified-flow path of
``FlowMatchEulerDiscreteScheduler(shift=flow_shift)`` (parametrisation.flow_matching_config):

* the levels and network timesteps diffusers' own schedulers report after ``set_timesteps(N)`` are the flow schedule's
  (the DPM-Solver ones on its table where N divides T - 1; UniPC's first level nudged to 1 - 1e-6 by UniPC itself);
* a first-order DPM-Solver step is the framework's Euler (DDIM) step on the same levels;
* a teacher folder with such a scheduler loads with no flag as the Euler folder's teacher, samples as it, and distils
  into an export that reproduces ``sample()``;
* what does not map is one line naming the supported configs.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_tiny_flow_teacher
from lightning_distill.parametrisation import (
    FlowSchedule,
    ddim_step,
    flow_shift,
    prediction_from_output,
    schedule_from_scheduler,
)
from lightning_distill.teacher import TeacherError, load_teacher

ROOT = Path(__file__).resolve().parents[1]
T, SHIFT = 1000, 3.0
SOLVERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


def flow_solver(name: str, **kwargs):
    """A flow-sigma solver as SANA (DPM-Solver) and Wan (UniPC) ship it, at flow_shift 3."""
    import diffusers

    return getattr(diffusers, name)(num_train_timesteps=T, use_flow_sigmas=True, flow_shift=SHIFT,
                                    prediction_type="flow_prediction", **kwargs)


def unshifted_levels(name: str, steps: int) -> np.ndarray:
    """The unshifted levels u each solver spaces its N steps at (diffusers 0.42.1 ``set_timesteps``, flow branch):
    DPM-Solver 1 - linspace(1, 1/T, N + 1), reversed, without its 0; UniPC linspace(1, 1/T, N + 1) without its last."""
    k = np.arange(steps, 0, -1) if name.startswith("DPM") else np.arange(steps)
    return k * (T - 1) / steps / T if name.startswith("DPM") else 1 - k * (T - 1) / steps / T


# --- (a) the levels and timesteps the stock schedulers visit are the flow schedule's ----------------------------


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 9, 10, 27, 37])
def test_solver_levels_and_timesteps_are_the_flow_schedules(name, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = flow_solver(name)
    schedule = schedule_from_scheduler(sched)
    assert type(schedule) is FlowSchedule and schedule.shift == SHIFT and schedule.num_train_timesteps == T
    sched.set_timesteps(steps)
    sigmas, timesteps = sched.sigmas, sched.timesteps
    assert sigmas[-1] == 0 == schedule.sigma(torch.tensor(-1))  # the last step lands on the data, t = -1
    u = unshifted_levels(name, steps)
    # the static shift of FlowMatchEuler: s = shift u / (1 + (shift - 1) u), exactly in float32
    expected = flow_shift(torch.from_numpy(u), SHIFT).float()
    nudged = name.startswith("UniPC")  # UniPC moves its s = 1 to 1 - 1e-6 (log(alpha) = log 0 in its update)
    if nudged:
        assert expected[0] == 1 and 0 < 1 - sigmas[0] <= 1.1e-6
    assert torch.equal(sigmas[int(nudged):-1], expected[int(nudged):])
    # ... the levels FlowMatchEulerDiscreteScheduler(shift=flow_shift) visits for the same u (float32 rounding apart)
    euler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=SHIFT)
    euler.set_timesteps(sigmas=u)
    torch.testing.assert_close(euler.sigmas[int(nudged):], sigmas[int(nudged):], rtol=0, atol=1.2e-7)
    # the network is fed s T (FlowMatchEuler and the framework: s T itself; the solvers: s T truncated to an integer)
    fed = sigmas[:-1].double() * T
    assert bool(((fed - timesteps) >= -1e-4).all() and ((fed - timesteps) < 1).all()), (fed, timesteps)
    if (T - 1) % steps == 0:  # every level is one of the schedule's integer timesteps i, s_i = shift((i + 1) / T)
        idx = torch.from_numpy(np.rint(u * T).astype(np.int64) - 1)
        assert torch.equal(schedule.sigma(idx)[int(nudged):], sigmas[int(nudged):-1])
        torch.testing.assert_close(schedule.alpha(idx), 1 - schedule.sigma(idx), rtol=0, atol=1e-7)  # the flow path
        assert torch.equal(schedule.model_timestep(idx).floor().long()[int(nudged):], timesteps[int(nudged):])
        if nudged:  # 999.999 truncated where the schedule feeds 1000
            assert timesteps[0] == T - 1 and schedule.model_timestep(idx[:1]).item() == T


# --- (b) a first-order DPM-Solver step is the framework's Euler / DDIM step ----------------------------------------


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("steps", [1, 3, 9, 27])
def test_first_order_solver_step_is_the_frameworks_euler_step(name, steps):
    """DPM-Solver++ of order 1 on the flow path is x_t' = (s'/s) x_t + (1 - s') (1 - e^-h) x0 with x0 = x_t - s u,
    which is x_t + (s' - s) u: the DDIM step alpha_s' x0 + sigma_s' eps on the flow path (the stock step goes
    through log / exp, hence float32 rounding). UniPC of order 1 without its corrector is the same predictor, from
    its nudged first level (1 - 1e-6, so |u| 1e-6 apart there)."""
    kwargs = {"solver_order": 1} if name.startswith("DPM") else {"solver_order": 1, "disable_corrector": list(range(steps))}
    sched = flow_solver(name, **kwargs)
    sched.set_timesteps(steps)
    schedule = schedule_from_scheduler(sched)
    idx = [int(i) for i in np.rint(unshifted_levels(name, steps) * T).astype(np.int64) - 1] + [-1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, generator=g)
    velocities = [torch.randn(2, 4, 4, 4, generator=g) for _ in range(steps)]  # a fixed fake velocity per step
    atol = 1e-6 if name.startswith("DPM") else 5e-6
    ours = theirs = x
    for k, t in enumerate(sched.timesteps):
        here, there = torch.tensor([idx[k]]), torch.tensor([idx[k + 1]])
        pred = prediction_from_output(velocities[k], theirs, schedule.alpha(here), schedule.sigma(here), "flow_prediction")
        one_step = ddim_step(pred.x0, pred.eps, schedule.alpha(there), schedule.sigma(there))
        theirs = sched.step(velocities[k], t, theirs).prev_sample
        torch.testing.assert_close(theirs, one_step, rtol=0, atol=atol)  # the same step from the same x
        pred = prediction_from_output(velocities[k], ours, schedule.alpha(here), schedule.sigma(here), "flow_prediction")
        euler = ours + (schedule.sigma(there) - schedule.sigma(here)) * velocities[k]  # x_s + (s' - s) u
        ours = ddim_step(pred.x0, pred.eps, schedule.alpha(there), schedule.sigma(there))
        torch.testing.assert_close(ours, euler, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=3 * atol)  # and the whole chain
    assert (ours - x).abs().max() > 0.5  # the steps moved the sample


# --- (c) a teacher folder with a flow-sigma solver loads as the Euler folder's teacher ----------------------------


def with_scheduler(folder: Path, target: Path, scheduler) -> Path:
    """A copy of a diffusers folder whose scheduler/ (and model_index.json entry) is ``scheduler``."""
    shutil.copytree(folder, target)
    shutil.rmtree(target / "scheduler")
    scheduler.save_pretrained(target / "scheduler")
    index = json.loads((target / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (target / "model_index.json").write_text(json.dumps(index))
    return target


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def info_lines():
    """The info lines the teacher logs (lightning's rank_zero_info logger)."""
    from lightning.pytorch.utilities import rank_zero_info  # noqa: F401 - sets the logger rank_zero_info writes to
    from lightning_utilities.core import rank_zero

    handler, logger = Lines(), rank_zero.log
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def euler_flow_dir(tmp_path_factory):
    return write_tiny_flow_teacher(tmp_path_factory.mktemp("flow") / "euler", shift=SHIFT)


@pytest.mark.parametrize("name", SOLVERS)
def test_flow_solver_teacher_loads_and_samples_as_the_euler_folder(name, euler_flow_dir, tmp_path, info_lines):
    from lightning_distill.metrics import sample_teacher

    folder = with_scheduler(euler_flow_dir, tmp_path / name, flow_solver(name))
    teacher, euler = load_teacher(str(folder)), load_teacher(str(euler_flow_dir))
    line = [m for m in info_lines if "read as FlowMatchEulerDiscreteScheduler" in m]
    assert line == [f"teacher {folder}: {name} (use_flow_sigmas, flow_shift=3) read as FlowMatchEulerDiscreteScheduler("
                    "num_train_timesteps=1000, shift=3), the same rectified-flow path; the framework samples it with "
                    "its flow Euler / FlowMatchLCM samplers"]
    assert teacher.schedule.path == "flow" and teacher.prediction_type == "flow_prediction" and teacher.denoiser.clip_x0 is None
    # kept as the Euler folder's scheduler: every sampler, export and promoted teacher built from it is a flow one
    assert teacher.scheduler_class == euler.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    assert teacher.scheduler_config == euler.scheduler_config
    t = torch.arange(-1, T)
    assert torch.equal(teacher.schedule.sigma(t), euler.schedule.sigma(t))
    assert torch.equal(teacher.schedule.model_timestep(t[1:]), euler.schedule.model_timestep(t[1:]))
    for steps in (1, 2, 4):
        ours = sample_teacher(teacher, 3, steps, torch.Generator().manual_seed(steps))
        assert torch.equal(ours, sample_teacher(euler, 3, steps, torch.Generator().manual_seed(steps))), steps
    assert not torch.equal(sample_teacher(teacher, 3, 1, torch.Generator().manual_seed(0)),
                           sample_teacher(teacher, 3, 1, torch.Generator().manual_seed(1)))


def test_flow_solver_folder_is_sampled_on_the_frameworks_flow_grid(euler_flow_dir, tmp_path):
    """A pipeline folder with a flow-sigma solver (evaluate's folders) is sampled as its teacher: at_steps rebuilds the
    solver as the FlowMatchEuler scheduler of its path, on the trailing grid (the solver's own grid would start at
    s = 0.99967 and feed the network truncated timesteps)."""
    from diffusers import DDPMPipeline

    from lightning_distill.metrics import sample_teacher, scheduler_sample
    from lightning_distill.sampling import at_steps

    folder = with_scheduler(euler_flow_dir, tmp_path / "dpm", flow_solver("DPMSolverMultistepScheduler"))
    pipe, teacher = DDPMPipeline.from_pretrained(folder), load_teacher(str(folder))
    for steps in (1, 2, 4):
        rebuilt = at_steps(pipe.scheduler, steps)
        assert type(rebuilt).__name__ == "FlowMatchEulerDiscreteScheduler" and rebuilt.config.shift == SHIFT
        theirs = scheduler_sample(pipe.unet, pipe.scheduler, 3, steps, torch.Generator().manual_seed(steps))
        assert torch.equal(theirs, sample_teacher(teacher, 3, steps, torch.Generator().manual_seed(steps))), steps


def test_flow_solver_teacher_distils_and_exports_a_pipeline_that_reproduces_sample(euler_flow_dir, tmp_path):
    """Consistency distillation's flow debug preset on the DPM-Solver folder: the FlowMatchLCMScheduler export
    reproduces sample() at the trained step count and at 1 step."""
    from diffusers import DiffusionPipeline

    from lightning_distill.cli import cli_main
    from lightning_distill.sampling import at_steps
    from test_export import assert_pipeline_reproduces_samples

    folder = with_scheduler(euler_flow_dir, tmp_path / "dpm", flow_solver("DPMSolverMultistepScheduler"))
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "consistency" / "debug_flow.yaml"),
                    "--data.teacher", str(folder), "--data.image_size", "8",
                    "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_model_summary", "false"])
    model = cli.model
    assert cli.trainer.global_step == 3 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert model.teacher.schedule.shift == SHIFT and model.student.schedule.shift == SHIFT
    pipe = DiffusionPipeline.from_pretrained(str(model.export(tmp_path / "student")))
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler" and pipe.scheduler.config.shift == SHIFT
    assert_pipeline_reproduces_samples(model, pipe, int(model.hparams.sample_steps))
    pipe.scheduler = at_steps(pipe.scheduler, 1)
    assert_pipeline_reproduces_samples(model, pipe, 1)


def test_sana_folder_with_its_shipped_dpm_solver_config_loads_and_samples_as_the_euler_folder(tmp_path):
    """The tiny SANA stack saved with SANA's shipped scheduler (DPMSolverMultistepScheduler, use_flow_sigmas, flow_shift
    3) loads with no flag and samples from prompts as the same stack with FlowMatchEulerDiscreteScheduler(shift=3)."""
    from _sana import write_tiny_sana

    from lightning_distill.metrics import sample_text_teacher

    dpm = load_teacher(str(write_tiny_sana(tmp_path / "dpm", scheduler=flow_solver("DPMSolverMultistepScheduler"))))
    euler = load_teacher(str(write_tiny_sana(tmp_path / "euler")))
    assert dpm.scheduler_config == euler.scheduler_config and dpm.schedule.shift == SHIFT
    prompts = ["a red cat", "a blue dog"]
    for steps in (1, 2, 4):
        ours = sample_text_teacher(dpm, prompts, steps, torch.Generator().manual_seed(steps))
        assert torch.equal(ours, sample_text_teacher(euler, prompts, steps, torch.Generator().manual_seed(steps)))


# --- (d) what does not map: one line naming the supported configs --------------------------------------------------


SUPPORTED = (r"supported flow-sigma configs: DPMSolverMultistepScheduler or UniPCMultistepScheduler with use_flow_sigmas, "
             r"prediction_type flow_prediction and a static flow_shift; flow-matching: FlowMatchEulerDiscreteScheduler")


@pytest.mark.parametrize(("name", "kwargs", "why"), [
    ("DEISMultistepScheduler", {}, "DEISMultistepScheduler with use_flow_sigmas is not supported"),
    ("DPMSolverMultistepScheduler", {"prediction_type": "epsilon"},
     r"DPMSolverMultistepScheduler with use_flow_sigmas and prediction_type 'epsilon' is not supported \(a flow teacher "
     r"predicts the velocity\)"),
    ("UniPCMultistepScheduler", {"use_dynamic_shifting": True, "time_shift_type": "linear"},
     r"UniPCMultistepScheduler with use_flow_sigmas and use_dynamic_shifting \(its shift comes from the pipeline's mu, "
     r"time_shift_type 'linear'\) is not supported"),
])
def test_unmappable_flow_sigma_configs_are_one_line_errors(name, kwargs, why, euler_flow_dir, tmp_path):
    import diffusers

    from lightning_distill.parametrisation import flow_matching_config

    kwargs = {"prediction_type": "flow_prediction", **kwargs}
    sched = getattr(diffusers, name)(use_flow_sigmas=True, flow_shift=SHIFT, **kwargs)
    with pytest.raises(ValueError, match=why + "; " + SUPPORTED) as err:
        flow_matching_config(name, sched.config)
    assert "\n" not in str(err.value)
    folder = with_scheduler(euler_flow_dir, tmp_path / name, sched)
    with pytest.raises(TeacherError, match=f"teacher {re.escape(str(folder))}: scheduler {why}; {SUPPORTED}") as err:
        load_teacher(str(folder))
    assert "\n" not in str(err.value)


def test_configs_without_flow_sigmas_are_read_as_before():
    """No ``use_flow_sigmas``: nothing to convert (a VP DPM-Solver stays VP); an unknown class still names them all."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    from lightning_distill.parametrisation import flow_matching_config

    assert flow_matching_config("DPMSolverMultistepScheduler", DPMSolverMultistepScheduler().config) is None
    assert flow_matching_config("FlowMatchEulerDiscreteScheduler", FlowMatchEulerDiscreteScheduler().config) is None
    assert schedule_from_scheduler(DPMSolverMultistepScheduler()).path == "vp"

    class OddScheduler:
        config = {"num_train_timesteps": 1000}

    with pytest.raises(ValueError, match=r"scheduler OddScheduler is not supported; flow-matching: "
                                         r"FlowMatchEulerDiscreteScheduler.*; variance-preserving: DDIMScheduler"):
        schedule_from_scheduler(OddScheduler())
