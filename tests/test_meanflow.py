"""MeanFlow distillation: the identity's target against finite differences and a closed form, the
zero-initialised student, the (r, t) sampler, argument checks, the flow-map sampler and its export."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_distill.errors import ConfigError
from lightning_distill.methods.meanflow import (
    MeanFlowDistillation,
    adaptive_weighted_loss,
    average_velocity,
    flow_interpolate,
    flow_velocity,
    logit_normal,
    meanflow_target,
    path_point,
    sample_interval,
    total_derivative,
)
from lightning_distill.flow_map import flow_map_intervals, flow_map_sample, is_flow_map_unet
from lightning_distill.nn_utils import forward_ad_attention
from lightning_distill.teacher import load_teacher

from conftest import write_tiny_flow_teacher, write_tiny_teacher

PATHS = ("vp", "flow")


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("meanflow_teachers")
    return {"vp": write_tiny_teacher(root / "vp"), "flow": write_tiny_flow_teacher(root / "flow")}


def _method(teacher_dirs, path: str, **kwargs) -> MeanFlowDistillation:
    return MeanFlowDistillation(load_teacher(str(teacher_dirs[path])), **kwargs)


def _perturb_interval_input(method: MeanFlowDistillation, seed: int = 0) -> None:
    """Give the zero-initialised interval embedding weights, so that u depends on r (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.student.unet.class_embedding.linear_2.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def _batch(seed: int = 0, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(n, 1, 8, 8, generator=g).clamp(-1, 1), torch.randn(n, 1, 8, 8, generator=g)
    return x0, eps


# --- the MeanFlow identity -----------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_jvp_total_derivative_matches_finite_differences(teacher_dirs, path):
    """torch.func.jvp through the tiny UNet (math attention) = central differences, in float64."""
    method = _method(teacher_dirs, path)
    _perturb_interval_input(method)
    student, teacher = method.student.double(), method.teacher.denoiser.double()
    # UNet2DModel hands its class embedding a float32 sinusoid whatever the model's dtype
    student.unet.class_embedding.register_forward_pre_hook(lambda m, args: (args[0].to(torch.float64),))
    x0, eps = (a.double() for a in _batch())
    t = torch.tensor([0.3, 0.62, 0.85], dtype=torch.float64)
    r = torch.tensor([0.1, 0.62, 0.4], dtype=torch.float64)
    z = flow_interpolate(x0, eps, t)
    with torch.no_grad():
        v = flow_velocity(teacher, z, t)

    def u_fn(z_, t_):
        return average_velocity(student, z_, r, t_)

    u, du_fwd = total_derivative(u_fn, z, t, v, "forward")
    # The sinusoidal time embeddings oscillate up to once per timestep unit (period ~ 2 pi / T in flow
    # time) and diffusers computes them in float32, so no single step is accurate: h = 2e-4 and 1e-4 with
    # Richardson extrapolation cancel the O(h^2) truncation (~(T h)^2 / 6); float32 rounding stays ~1e-3.
    u_fd, du_2h = total_derivative(u_fn, z, t, v, "finite_difference", step=2e-4)
    _, du_h = total_derivative(u_fn, z, t, v, "finite_difference", step=1e-4)
    du_fd = (4 * du_h - du_2h) / 3
    torch.testing.assert_close(u, u_fd, rtol=1e-10, atol=1e-10)
    err = (du_fwd - du_fd).flatten(1).norm(dim=1) / du_fwd.flatten(1).norm(dim=1)
    assert du_fwd.abs().max() > 1.0 and bool((err < 2e-3).all()), err  # not a comparison between zeros
    # a wrong tangent (the z part alone, (v, 0)) is far off: the check can fail
    with forward_ad_attention(z.device.type):
        _, du_z = torch.func.jvp(u_fn, (z, t), (v, torch.zeros_like(t)))
    assert bool(((du_z - du_fd).flatten(1).norm(dim=1) / du_fd.flatten(1).norm(dim=1) > 0.1).all())
    assert u.requires_grad and not du_fwd.requires_grad  # u trains, du/dt only enters the target


def _gaussian_flow(s: float):
    """Data x ~ N(0, s^2) per pixel: z_t ~ N(0, sd_t^2), sd_t^2 = (1 - t)^2 s^2 + t^2, the PF-ODE is
    z_t = (sd_t / sd_r) z_r, so v = z sd_t' / sd_t and u(z, r, t) = z (1 - sd_r / sd_t) / (t - r)."""

    def sd(t):
        return ((1 - t) ** 2 * s**2 + t**2).sqrt()

    def v(z, t):
        return z * ((t - (1 - t) * s**2) / sd(t) ** 2).view(-1, 1, 1, 1)

    def u(z, r, t):
        return z * ((1 - sd(r) / sd(t)) / (t - r)).view(-1, 1, 1, 1)

    return v, u


@pytest.mark.parametrize("mode", ["forward", "finite_difference"])
def test_identity_holds_for_the_closed_form_average_velocity_of_gaussian_data(mode):
    v_fn, u_true = _gaussian_flow(s=0.5)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.5, 0.35], dtype=torch.float64)
    r = torch.tensor([0.1, 0.3, 0.45, 0.0], dtype=torch.float64)
    v = v_fn(z, t)
    u, du_dt = total_derivative(lambda z_, t_: u_true(z_, r, t_), z, t, v, mode, step=1e-6)
    target = meanflow_target(v, du_dt, r, t)
    torch.testing.assert_close(target, u_true(z, r, t), rtol=1e-7, atol=1e-8)
    # the identity is not a tautology: the instantaneous velocity (a wrong u) misses its own target
    u_wrong, du_wrong = total_derivative(lambda z_, t_: v_fn(z_, t_), z, t, v, mode, step=1e-6)
    assert (meanflow_target(v, du_wrong, r, t) - u_wrong).abs().max() > 1e-2


def test_finite_differences_stay_inside_the_interval_and_are_float32_under_bf16_autocast():
    """t - h never goes below the interval's start r (u at a negative interval is untrained) nor to 0: the
    difference is one-sided there and still first-order right; a zero-width one (t = r = t_max) is 0, not NaN.
    Under bf16 autocast the difference runs in float32."""
    v_fn, u_true = _gaussian_flow(s=0.5)
    z = torch.randn(3, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5, 0.3, 1.0])
    r = torch.tensor([0.495, 0.0, 1.0])  # t - h below r; r = 0 (t - h would be fine); t = r = t_max
    seen, r_net = [], torch.tensor([0.2, 0.0, 0.5])  # the network's own r (fixed); r above only bounds t - h

    def u_fn(z_, t_):
        seen.append(t_.clone())
        return u_true(z_, r_net, t_)

    v = v_fn(z, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, du = total_derivative(u_fn, z, t, v, "finite_difference", step=0.01, r=r)
    lowest = torch.stack(seen).min(0).values
    assert bool((lowest >= r).all()) and float(lowest[1]) == pytest.approx(0.29)
    assert du.dtype == torch.float32 and torch.isfinite(du).all() and du[2].abs().max() == 0
    _, exact = total_derivative(u_fn, z, t, v, "forward")
    torch.testing.assert_close(du[:2], exact[:2], rtol=0.05, atol=1e-3)


def test_target_at_r_equals_t_is_the_teacher_velocity():
    v, du_dt = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = torch.tensor([0.3, 0.8])
    torch.testing.assert_close(meanflow_target(v, du_dt, t, t), v, rtol=0, atol=0)
    assert not torch.allclose(meanflow_target(v, du_dt, t - 0.2, t), v)


@pytest.mark.parametrize("power", [0.0, 1.0])  # the default (plain L2) and the paper's adaptive weight
@pytest.mark.parametrize("path", PATHS)
def test_loss_with_r_equal_t_is_flow_matching_on_the_teacher(teacher_dirs, path, power):
    """ratio_r_neq_t = 0: compute_loss is the (adaptive-weighted) loss of u_theta(z, t, t) against the teacher's v."""
    method = _method(teacher_dirs, path, ratio_r_neq_t=0.0, adaptive_power=power)
    batch = {"x": _batch(1, 4)[0]}
    torch.manual_seed(3)
    # at step 0 the student is the teacher (up to the JVP's math attention kernel against the teacher's)
    assert float(method.compute_loss(batch).loss) < 1e-6
    _perturb_interval_input(method)
    with torch.no_grad():
        method.student.unet.conv_out.bias.add_(0.1)  # r = t no longer reproduces the teacher
    torch.manual_seed(3)
    out = method.compute_loss(batch)
    torch.manual_seed(3)
    x0 = batch["x"]
    r, t = sample_interval(4, -0.4, 1.0, 0.0)
    t = t.clamp(max=method.t_max)
    z = flow_interpolate(x0, torch.randn_like(x0), t)
    assert torch.equal(r, t)
    with torch.no_grad():
        u = average_velocity(method.student, z, t, t)
        v = flow_velocity(method.teacher.denoiser, z, t)
    expected = adaptive_weighted_loss(u - v, power, 1e-3)[0].mean()
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert float(out.loss) > 0


def test_adaptive_weight_uses_the_summed_squared_norm():
    delta = torch.full((2, 1, 2, 2), 0.5)
    loss, sq = adaptive_weighted_loss(delta, power=1.0, c=1e-3)
    torch.testing.assert_close(sq, torch.tensor([1.0, 1.0]))  # 4 pixels x 0.25
    torch.testing.assert_close(loss, torch.tensor([1.0 / 1.001] * 2))
    delta.requires_grad_(True)
    adaptive_weighted_loss(delta, 1.0, 1e-3)[0].sum().backward()
    torch.testing.assert_close(delta.grad, torch.full_like(delta, 2 * 0.5 / 1.001))  # weight under stop-grad


# --- the student ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_zero_initialised_student_equals_the_teacher_for_any_r(teacher_dirs, path):
    method = _method(teacher_dirs, path)
    unet = method.student.unet
    assert is_flow_map_unet(unet) and unet.config.class_embed_type == "timestep"
    assert not is_flow_map_unet(method.teacher.unet)
    teacher_sd = method.teacher.unet.state_dict()
    for k, val in unet.state_dict().items():
        if k.startswith("class_embedding."):
            continue
        torch.testing.assert_close(val, teacher_sd[k], rtol=0, atol=0, msg=k)
    x0, eps = _batch(2, 4)
    t = torch.tensor([0.95, 0.6, 0.3, 0.05])
    z = flow_interpolate(x0, eps, t)
    with torch.no_grad():
        v = flow_velocity(method.teacher.denoiser, z, t)
        for r in (torch.zeros(4), torch.rand(4, generator=torch.Generator().manual_seed(0)) * t, t):
            torch.testing.assert_close(average_velocity(method.student, z, r, t), v, rtol=0, atol=0)
    # and the teacher-path point is consistent with the path: x_p = alpha x0 + sigma eps
    alpha, sigma, _ = method.teacher.schedule.at_flow_time(t)
    torch.testing.assert_close(path_point(method.teacher.schedule, z, t),
                               alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps)


@pytest.mark.parametrize("path", PATHS)
def test_lora_base_shared_and_copy_build_and_train_the_same_student(teacher_dirs, path):
    """student_lora.base shared and copy on a float32 teacher (lora.LoraSpec: "with a float32 teacher they train
    identically"): the interval input's first layer, which trains in full, was drawn from the method's seed in
    the shared rebuild and from the global generator in the copied one (max difference 0.65 on the tiny UNet,
    and another draw for every global seed); the copy's rebuild also advanced the global generator, moving every
    later training draw. Now both start from the same student, leave the global generator where it was, and
    take the same training steps."""
    from lightning_distill import lora

    runs = {}
    for base in ("shared", "copy"):
        for global_seed in (0, 1):
            torch.manual_seed(global_seed)
            method = _method(teacher_dirs, path, seed=3, student_lora={"rank": 2, "alpha": 2, "base": base})
            after_build = torch.rand(1)
            torch.manual_seed(global_seed)
            assert torch.equal(after_build, torch.rand(1)), f"{base}: building the student drew from the global generator"
            runs[base, global_seed] = method
    trainable = {key: {n: p.detach().clone() for n, p in m.student.unet.named_parameters() if p.requires_grad}
                 for key, m in runs.items()}
    linear_1 = "class_embedding.linear_1.modules_to_save.default.weight"
    assert linear_1 in trainable["shared", 0] and lora.shared_tensors(runs["shared", 0].student.unet, runs["shared", 0].teacher.unet)
    for key in runs:
        assert trainable[key].keys() == trainable["shared", 0].keys()
        for name, value in trainable[key].items():
            torch.testing.assert_close(value, trainable["shared", 0][name], rtol=0, atol=0, msg=f"{key} {name}")

    x0 = _batch(5, 4)[0]
    losses = {}
    for base in ("shared", "copy"):
        method = runs[base, 0]
        opt = torch.optim.Adam(method.trainable_parameters(), lr=1e-2)
        torch.manual_seed(7)
        losses[base] = []
        for _ in range(3):
            loss = method.compute_loss({"x": x0}).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[base].append(float(loss))
    assert losses["shared"] == losses["copy"], losses
    assert losses["shared"][0] != losses["shared"][2]  # the steps moved the student


def test_interval_sampler_orders_and_mixes():
    g = torch.Generator().manual_seed(0)
    r, t = sample_interval(20000, -0.4, 1.0, 0.25, generator=g)
    assert bool((t >= r).all()) and bool(((r > 0) & (t < 1)).all())
    assert abs(float((r < t).float().mean()) - 0.25) < 0.015
    same = r == t
    # r = t pairs keep the larger draw: their t is distributed as the r != t pairs' t
    assert abs(float(t[same].mean()) - float(t[~same].mean())) < 0.02
    x = torch.logit(logit_normal(20000, -0.4, 1.0, generator=g))
    assert abs(float(x.mean()) + 0.4) < 0.03 and abs(float(x.std()) - 1.0) < 0.03
    r0, t0 = sample_interval(1000, ratio_r_neq_t=0.0, generator=g)
    assert torch.equal(r0, t0)
    r1, t1 = sample_interval(1000, ratio_r_neq_t=1.0, generator=g)
    assert bool((r1 < t1).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"jvp": "backward"}, "forward"),
        ({"ratio_r_neq_t": 1.5}, "ratio_r_neq_t"),
        ({"time_std": 0.0}, "time_std"),
        ({"adaptive_c": 0.0}, "adaptive_c"),
        ({"adaptive_power": -1.0}, "adaptive_power"),
        ({"finite_difference_step": 0.0}, "finite_difference_step"),
    ],
)
def test_bad_arguments_raise_config_error(teacher_dirs, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _method(teacher_dirs, "flow", **kwargs)


def test_class_conditional_teacher_is_refused(tmp_path):
    folder = write_tiny_teacher(tmp_path / "cond", num_class_embeds=3)
    with pytest.raises(ConfigError, match="class-conditional"):
        MeanFlowDistillation(load_teacher(str(folder)))
    with pytest.raises(ConfigError, match="teacher"):
        MeanFlowDistillation(None)


# --- sampling and export -------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 3])  # 3 does not divide T = 1024
def test_vp_step_is_the_flow_map_step(teacher_dirs, steps):
    """On the VP path the sampler's step with the student's output = (alpha_r + sigma_r)(z_t - (t - r) u),
    from each grid level t to the next one r (the last to r = 0)."""
    method = _method(teacher_dirs, "vp")
    _perturb_interval_input(method)
    sched = method.sampling_scheduler(steps)
    sched.set_timesteps(steps)
    schedule = method.student.schedule
    T = schedule.num_train_timesteps
    grid = schedule.trailing_timesteps(steps)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for k, (t_step, interval) in enumerate(flow_map_intervals(sched)):
            assert int(t_step) == int(grid[k])
            lam_t, lam_r = schedule.flow_time(grid[k].expand(2)), schedule.flow_time(grid[k + 1].expand(2))
            torch.testing.assert_close(interval.float(), lam_t[0] - lam_r[0], rtol=1e-5, atol=1e-6)
            out = method.student.unet(x, t_step, class_labels=(interval * T).float().expand(2)).sample
            step = sched.step(out, t_step, x).prev_sample
            alpha_t, sigma_t, _ = schedule.at_flow_time(lam_t)
            z = x / (alpha_t + sigma_t).view(-1, 1, 1, 1)
            u = average_velocity(method.student, z, lam_r, lam_t)
            alpha_r, sigma_r, _ = schedule.at_flow_time(lam_r)
            flow_map = (alpha_r + sigma_r).view(-1, 1, 1, 1) * (z - (lam_t - lam_r).view(-1, 1, 1, 1) * u)
            torch.testing.assert_close(step, flow_map, rtol=1e-4, atol=1e-5)
            x = step


def test_a_ddim_folder_exported_before_samples_as_the_stepped_ddim_where_n_divides_t(teacher_dirs):
    """A VP folder exported with ``DDIMScheduler`` (before the DPM-Solver sampler) still samples: read as its
    table, it gives sample()'s images, and where N divides T (1024) those are DDIM's own steps."""
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    from lightning_distill.sampling import deterministic_scheduler

    method = _method(teacher_dirs, "vp")
    _perturb_interval_input(method)
    unet, schedule = method.sampling_denoiser().unet, method.student.schedule
    ddim = deterministic_scheduler(method.student_scheduler_config, schedule, method.student.prediction_type, None)
    assert type(ddim) is DDIMScheduler
    T = schedule.num_train_timesteps
    for steps in (2, 3):
        ours = method.sample(2, steps, torch.Generator().manual_seed(0))
        torch.testing.assert_close(flow_map_sample(unet, ddim, 2, steps, torch.Generator().manual_seed(0)), ours,
                                   rtol=0, atol=1e-5)
    ddim.set_timesteps(4)  # the stock DDIM loop, its intervals t -> t - T // 4
    x = randn_tensor((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in ddim.timesteps:
            interval = schedule.flow_time(t) - schedule.flow_time((t - T // 4).clamp_min(-1))
            out = unet(x, t, class_labels=(interval * T).float().expand(2)).sample
            x = ddim.step(out, t, x).prev_sample
    torch.testing.assert_close(x, method.sample(2, 4, torch.Generator().manual_seed(0)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_export_loads_with_stock_classes_and_reproduces_sample(teacher_dirs, path, tmp_path):
    from diffusers import DPMSolverMultistepScheduler, FlowMapEulerDiscreteScheduler, UNet2DModel

    from lightning_distill.metrics import scheduler_sample

    method = _method(teacher_dirs, path)
    _perturb_interval_input(method)  # the interval input matters: a wrong label would show
    folder = method.export(tmp_path / "student")
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    sched_cls = FlowMapEulerDiscreteScheduler if path == "flow" else DPMSolverMultistepScheduler
    sched = sched_cls.from_pretrained(folder, subfolder="scheduler")
    assert type(method.sampling_scheduler(1)) is sched_cls
    if path == "flow":
        assert sched.config.shift == method.teacher.schedule.shift
    else:
        assert sched.config.solver_order == 1 and sched.config.final_sigmas_type == "zero"
        assert not sched.config.thresholding and sched.config.timestep_spacing == "trailing"
    for steps in (1, 2, 3, 4):  # 3 does not divide T = 1024
        ours = method.sample(3, steps, torch.Generator().manual_seed(steps))
        theirs = flow_map_sample(unet, sched, 3, steps, torch.Generator().manual_seed(steps))
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5, msg=f"{path}, {steps} steps")
        # the evaluation path (metrics.scheduler_sample) dispatches a flow-map folder to the same loop
        evaluated = scheduler_sample(unet, sched, 3, steps, torch.Generator().manual_seed(steps))
        torch.testing.assert_close(evaluated, ours, rtol=0, atol=1e-5)
    # evaluate's loader of a pipeline folder (DiffusionPipeline.from_pretrained, then scheduler_sample)
    from lightning_distill.evaluate import load_sampler

    sampler = load_sampler("meanflow", folder, None, torch.device("cpu"))
    torch.testing.assert_close(sampler.sample(3, 2, torch.Generator().manual_seed(2), None),
                               method.sample(3, 2, torch.Generator().manual_seed(2)), rtol=0, atol=1e-5)
    a, b = (method.sample(3, 2, torch.Generator().manual_seed(s)) for s in (0, 1))
    assert not torch.allclose(a, b)
    assert not torch.allclose(method.sample(3, 1, torch.Generator().manual_seed(0)), a)  # steps matter


@pytest.mark.parametrize("path", PATHS)
def test_a_few_training_steps_give_finite_losses_and_train_the_interval_input(teacher_dirs, path, tmp_path):
    from lightning_distill.data import TeacherDataModule

    L.seed_everything(0)
    dm = TeacherDataModule(teacher=str(teacher_dirs[path]), data="digits", image_size=8, batch_size=4)
    method = MeanFlowDistillation(dm.teacher, ratio_r_neq_t=0.5, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, *args):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(max_steps=3, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[Record()])
    trainer.fit(method, dm)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert method.student.unet.class_embedding.linear_2.weight.abs().max() > 0  # the interval input learns
    assert torch.isfinite(method.sample(2, 2, torch.Generator().manual_seed(0))).all()


@pytest.mark.parametrize("path", PATHS)
def test_interval_error_diagnostic(teacher_dirs, path):
    """benchmarks/meanflow_interval_error.py: a zero-initialised student is the teacher's velocity on every
    interval, a trained interval input is not, and one step of the teacher's ODE reference is its x0 estimate."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from meanflow_interval_error import interval_errors, teacher_trajectory

    method = _method(teacher_dirs, path).eval()
    rows = interval_errors(method, n=4, seed=0, ode_steps=8, times=[1.0, 0.5, 0.0])
    assert [(r["t"] > r["r"]) for r in rows] == [True] * 3 and rows[0]["t"] == round(method.t_max, 5)
    for row in rows:
        assert row["student"] == row["teacher_velocity"] > 0
    _perturb_interval_input(method)
    assert all(r["student"] != r["teacher_velocity"] for r in interval_errors(method, 4, 0, 8, [1.0, 0.5, 0.0]))

    # one ODE step from t_max lands on the teacher's x0 estimate there (z - t v = x0_hat in flow coordinates)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    den, t_max = method.teacher.denoiser, torch.full((4,), method.t_max)
    with torch.no_grad():
        end = teacher_trajectory(den, z, method.t_max, 1)[1][-1]
        x0_hat = den.at_flow_time(path_point(den.schedule, z, t_max), t_max).x0
    torch.testing.assert_close(end, x0_hat, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_gradient_checkpointing_with_the_forward_jvp_trains_as_without_it(teacher_dirs, path):
    """gradient_checkpointing with jvp: forward: the checkpointed blocks cannot replay a forward-mode pass in
    their recomputation (it failed with CheckpointError), so the JVP runs without a graph and u is a separate
    call; loss and gradients equal the unchecked run's."""
    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)  # the interval input's first layer is drawn from the global generator
        method = _method(teacher_dirs, path, gradient_checkpointing=ckpt)
        _perturb_interval_input(method)
        method.train()
        torch.manual_seed(5)
        loss = method.compute_loss({"x": _batch(2, 4)[0]}).loss
        loss.backward()
        grads[ckpt] = (loss.detach(), [p.grad.clone() for p in method.student.parameters() if p.requires_grad])
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-5, atol=1e-7)
    scale = max(float(g.abs().max()) for g in grads[False][1])
    for a, b in zip(grads[True][1], grads[False][1]):  # (u by the default attention kernel, not the math one)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * scale)


# --- N not dividing T: the VP sampler's grid -----------------------------------------------------


@pytest.fixture(scope="module")
def vp_teacher_1000(tmp_path_factory):
    """A VP teacher with T = 1000 (the bundled one has T = 1024): 3 and 6 steps do not divide it."""
    return write_tiny_teacher(tmp_path_factory.mktemp("meanflow_t1000") / "vp", num_train_timesteps=1000)


def _recorded_calls(unet) -> tuple[list, object]:
    """(timestep, class_labels) of each call of ``unet``, and the hook's handle."""
    calls = []

    def hook(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((float(torch.as_tensor(t).flatten()[0]), float(kwargs["class_labels"].flatten()[0])))

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("steps", [3, 6, 4, 1])  # 3 and 6 do not divide T = 1000 (4 and 1 do)
def test_vp_sampler_steps_the_intervals_it_calls_the_network_with(vp_teacher_1000, steps, tmp_path):
    """Each network call's (r, t) is the step taken: its t is the level the state is at (the previous call's
    r, T - 1 first), its r the next level of the trailing grid, and the last r is the clean end (0): a
    stepped DDIM (t -> t - T // N) read the state one timestep off and stopped at t = 0 (sigma_0 = 0.006 of
    noise) for N = 6. The samples are the flow-map chain z_r = z_t - (t - r) u(z_t, r, t) on that grid, and
    the exported folder reproduces them."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DModel
    from diffusers.utils.torch_utils import randn_tensor

    from lightning_distill.evaluate import load_sampler

    method = MeanFlowDistillation(load_teacher(str(vp_teacher_1000)))
    _perturb_interval_input(method)
    schedule, den = method.student.schedule, method.sampling_denoiser()
    T = schedule.num_train_timesteps
    assert T == 1000
    calls, handle = _recorded_calls(den.unet)
    ours = method.sample(2, steps, torch.Generator().manual_seed(0))
    handle.remove()

    grid = schedule.trailing_timesteps(steps)  # T - 1, ..., -1 (the clean end, flow time 0)
    levels = schedule.flow_time(grid).double()
    assert [c[0] for c in calls] == grid[:-1].tolist()
    for k, (t_step, label) in enumerate(calls):
        r = float(levels[k]) - label / T  # where the interval the network is told ends: the next call's level
        assert r == pytest.approx(float(levels[k + 1]), abs=1e-6), (k, t_step, r)

    # the flow-map chain in flow coordinates, written out by hand
    x = randn_tensor((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    lam = levels.float()
    alpha, sigma, _ = schedule.at_flow_time(lam[:1])
    z = x / (alpha + sigma)
    with torch.no_grad():
        for k in range(steps):
            t, r = lam[k].expand(2), lam[k + 1].expand(2)
            z = z - (t - r).view(-1, 1, 1, 1) * average_velocity(den, z, r, t)
    torch.testing.assert_close(ours, z, rtol=0, atol=2e-4)

    folder = method.export(tmp_path / "student")
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    sched = DPMSolverMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    torch.testing.assert_close(flow_map_sample(unet, sched, 2, steps, torch.Generator().manual_seed(0)), ours,
                               rtol=0, atol=1e-5)
    sampler = load_sampler("meanflow", folder, None, torch.device("cpu"))
    torch.testing.assert_close(sampler.sample(2, steps, torch.Generator().manual_seed(0), None), ours,
                               rtol=0, atol=1e-5)
