"""APT: initialisation from a consistency-distilled student, the 1-step generator equals the exported
sampler, the discriminator's noise is fixed per call, and the CLI preset (with resume)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_distill.export import load_student_state
from lightning_distill.gan import StepPlan
from lightning_distill.methods.apt import AdversarialPostTraining

from conftest import write_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from lightning_distill.teacher import load_teacher

    return load_teacher(write_tiny_teacher(tmp_path_factory.mktemp("apt") / "teacher"))


def data(n: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader([{"x": torch.rand(1, 8, 8, generator=g) * 2 - 1, "label": torch.tensor(0)} for _ in range(n)], batch_size=n)


@pytest.fixture(scope="module")
def consistency_run(teacher, tmp_path_factory):
    """A (two-step) consistency-distilled student with a sampling EMA: its .ckpt and exported folder."""
    from lightning_distill.callbacks import EMA
    from lightning_distill.methods.consistency import ConsistencyDistillation

    root = tmp_path_factory.mktemp("cd")
    torch.manual_seed(0)
    model = ConsistencyDistillation(teacher, original_inference_steps=32, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    ema = EMA(decay=0.5, warmup=False)
    tr = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0, default_root_dir=root, callbacks=[ema])
    tr.fit(model, data())
    tr.save_checkpoint(root / "cd.ckpt")
    model.export(root / "student")
    return model, ema, root


def test_init_from_a_consistency_checkpoint_and_an_exported_folder(teacher, consistency_run):
    cd, ema, root = consistency_run
    ema_sd = ema.averaged.module.unet.state_dict()
    online_sd = cd.student.unet.state_dict()
    key = "conv_in.weight"
    assert not torch.equal(ema_sd[key], online_sd[key])  # the two copies differ, so the choice is visible
    for init_from, use_ema, expected in [
        (root / "cd.ckpt", True, ema_sd),
        (root / "cd.ckpt", False, online_sd),
        (root / "student", True, ema_sd),  # the export holds the EMA weights
    ]:
        model = AdversarialPostTraining(teacher, init_from=str(init_from), init_use_ema=use_ema, head_hidden=8)
        for k, v in model.student.unet.state_dict().items():
            torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
        # the discriminator backbone starts from the teacher, not from the student
        torch.testing.assert_close(model.discriminator.backbone.unet.conv_in.weight, teacher.unet.conv_in.weight)
    sd, pred = load_student_state(root / "student")
    assert pred == "v_prediction" and key in sd
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AdversarialPostTraining(teacher, init_from=str(root / "missing.ckpt"))
    # a LoRA student's base is the teacher's tensors: init_from (a full student) is refused before any of it loads
    before = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    from lightning_distill.errors import ConfigError

    with pytest.raises(ConfigError, match="init_from .* loads a full student; it cannot be combined with student_lora"):
        AdversarialPostTraining(teacher, init_from=str(root / "cd.ckpt"), student_lora={"rank": 2}, head_hidden=8)
    assert all(torch.equal(v, before[k]) for k, v in teacher.unet.state_dict().items())


def test_generator_is_the_one_step_sampler(teacher):
    model = AdversarialPostTraining(teacher, head_hidden=8)
    batch = {"x": torch.zeros(3, 1, 8, 8), "label": torch.zeros(3, dtype=torch.long)}
    with torch.no_grad():
        fake = model.generate(batch, torch.Generator().manual_seed(7)).x
    sample = model.sample(3, 1, torch.Generator().manual_seed(7), denoiser=model.student)
    # the DDIM trailing 1-step sampler (and so the export) returns the clipped x0 of the same map
    torch.testing.assert_close(sample, fake.clamp(-1, 1), rtol=0, atol=1e-5)
    assert model.generator_timestep == 1023


def test_discriminator_sees_one_fixed_noisy_function_per_call(teacher):
    model = AdversarialPostTraining(teacher, head_hidden=8)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    d_fn = model.discriminate(x, None, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(d_fn(x), d_fn(x))  # same t and noise every evaluation
        other = model.discriminate(x, None, torch.Generator().manual_seed(1))(x)
    assert not torch.allclose(d_fn(x), other)  # a new draw is a different function
    assert d_fn(x).shape == (4, 3)  # one pooled logit per level: 2 down blocks + mid block
    # approximated R1 of that fixed function vanishes as sigma -> 0
    from lightning_distill.gan import approx_r1_penalty

    assert approx_r1_penalty(d_fn, x, sigma=0.0).item() == 0.0


def test_debug_preset_runs_and_resumes_through_the_cli(tmp_path):
    from lightning_distill.cli import cli_main

    teacher_dir = write_tiny_teacher(tmp_path / "teacher")
    root = tmp_path / "run"
    common = ["--config", str(ROOT / "configs/apt/debug.yaml"), "--data.teacher", str(teacher_dir),
              "--data.image_size", "8", "--trainer.default_root_dir", str(root)]
    cli = cli_main(["fit", *common])
    assert isinstance(cli.model, AdversarialPostTraining)
    assert int(cli.model.gan_iteration) == cli.trainer.global_step == 3  # max_steps counts iterations
    assert {"train/g_adv", "train/r1", "gan/d_acc_real", "gan/d_lr_scale"} <= set(cli.trainer.callback_metrics)
    last = root / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert len(ckpt["optimizer_states"]) == 2
    assert any(k.startswith("discriminator.backbone.unet.") for k in ckpt["state_dict"])  # trainable backbone saved
    assert any("DiscriminatorSchedule" in k for k in ckpt["callbacks"])
    cli = cli_main(["fit", *common, "--trainer.max_steps", "4", "--ckpt_path", str(last)])
    assert int(cli.model.gan_iteration) == cli.trainer.global_step == 4
    cli = cli_main(["--config", str(ROOT / "configs/apt/digits.yaml"), "--data.teacher", str(teacher_dir),
                    "--data.image_size", "8", "--model.init_args.init_from", "null",
                    "--trainer.default_root_dir", str(tmp_path / "digits")], run=False)
    assert isinstance(cli.model, AdversarialPostTraining)


def test_class_conditional_teacher(tmp_path):
    from lightning_distill.teacher import load_teacher

    teacher = load_teacher(write_tiny_teacher(tmp_path / "cond", num_class_embeds=10))
    model = AdversarialPostTraining(teacher, head_hidden=8)
    batch = {"x": torch.rand(4, 1, 8, 8) * 2 - 1, "label": torch.tensor([0, 3, 5, 9])}
    gen = torch.Generator().manual_seed(0)
    d_out = model.critic_loss(batch, gen, StepPlan()).loss  # r1_weight 100, APT's default
    g_out = model.generator_loss(batch, gen)
    assert torch.isfinite(d_out.loss) and torch.isfinite(g_out.loss) and "r1" in d_out.logs
    assert model.generate(batch, gen).class_labels is batch["label"]


def test_flow_teacher_generator_is_the_one_step_euler_sampler(tmp_path):
    """On a (shift-3) flow teacher G(z) is one step from pure noise at s = 1 (network timestep T): x0 = z - u,
    by hand from the bare UNet; the stock Euler sampler's one step z + (0 - 1) u is the same map; the
    discriminator backbone is fed the network timestep s_t * T of its noise level."""
    from conftest import write_tiny_flow_teacher
    from lightning_distill.teacher import load_teacher

    teacher = load_teacher(write_tiny_flow_teacher(tmp_path / "flow", shift=3.0))
    model = AdversarialPostTraining(teacher, head_hidden=8, d_t_min=10, d_t_max=400)
    assert model.student.path == "flow" and model.student.prediction_type == "flow_prediction"
    assert model.generator_timestep == 999
    batch = {"x": torch.zeros(3, 1, 8, 8), "label": torch.zeros(3, dtype=torch.long)}
    with torch.no_grad():
        fake = model.generate(batch, torch.Generator().manual_seed(7)).x
        z = torch.randn(batch["x"].shape, generator=torch.Generator().manual_seed(7))
        want = z - model.student.unet(z, torch.full((3,), 1000.0)).sample
    torch.testing.assert_close(fake, want, rtol=0, atol=1e-6)
    sampler = model.sampling_scheduler(1)
    assert type(sampler).__name__ == "FlowMatchEulerDiscreteScheduler"
    sample = model.sample(3, 1, torch.Generator().manual_seed(7), denoiser=model.student)
    torch.testing.assert_close(sample, fake, rtol=0, atol=1e-5)  # no clipping on a flow (latent-style) teacher

    fed = []
    backbone = model.discriminator.backbone.network
    hook = backbone.register_forward_pre_hook(lambda m, args: fed.append(args[1].clone()))
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    try:
        with torch.no_grad():
            model.discriminate(x, None, torch.Generator().manual_seed(0))(x)
    finally:
        hook.remove()
    t = torch.randint(10, 401, (4,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fed[0], teacher.schedule.model_timestep(t))
