"""Training: DiffusionTraining runs, exact resume (EMA included), the teacher checkpoint rule, finite-loss guard."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_distill.callbacks import EMA
from lightning_distill.data import TeacherDataModule
from lightning_distill.methods.base import DistillationMethod, LossOutput, NonFiniteLossError, check_finite
from lightning_distill.losses import denoising_loss
from lightning_distill.methods.diffusion import DiffusionTraining
from lightning_distill.parametrisation import Denoiser, VPSchedule
from lightning_distill.teacher import DiffusionTeacher, load_teacher

from conftest import make_tiny_unet


def _trainer(root, max_steps, callbacks=(), **kw):
    return L.Trainer(
        max_steps=max_steps,
        default_root_dir=root,
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        **kw,
    )


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- DiffusionTraining --------------------------------------------------------------------------


def test_denoising_loss_hand_values():
    """A network that outputs zeros has loss E[target^2]: eps^2 (eps-pred) or (alpha eps - sigma x0)^2 (v-pred)."""

    class Zero(torch.nn.Module):
        def forward(self, x, t, return_dict=False):
            return (torch.zeros_like(x),)

    ac = torch.tensor([0.36, 0.64])  # alpha = 0.6 / 0.8, sigma = 0.8 / 0.6
    x0, eps, t = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), 1.0), torch.tensor([0, 1])
    eps_loss = denoising_loss(Denoiser(Zero(), VPSchedule(ac), "epsilon"), x0, t, eps)
    assert eps_loss.item() == pytest.approx(1.0)
    v_loss = denoising_loss(Denoiser(Zero(), VPSchedule(ac), "v_prediction"), x0, t, eps)
    # (0.6 - 0.8 * 2)^2 = 1.0, (0.8 - 0.6 * 2)^2 = 0.16
    assert v_loss.item() == pytest.approx((1.0 + 0.16) / 2)


def test_diffusion_training_on_digits(tmp_path):
    L.seed_everything(0)
    dm = TeacherDataModule(teacher=None, data="digits", image_size=8, batch_size=8)
    model = DiffusionTraining(unet=make_tiny_unet(8, 1), num_train_timesteps=1024, sample_steps=2, optimizer=_adam)
    before = _params(model.student)
    ema = EMA(decay=0.5)
    trainer = _trainer(tmp_path, 3, [ema])
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    after = _params(model.student)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert int(ema.averaged.n_averaged) == 3
    x = model.sample(2, 2, torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and bool(torch.isfinite(x).all())


def test_diffusion_training_on_image_folder(tmp_path, image_folder):
    L.seed_everything(0)
    dm = TeacherDataModule(teacher=None, data=str(image_folder), image_size=8, channels=3, batch_size=4)
    model = DiffusionTraining(unet=make_tiny_unet(8, 3), num_train_timesteps=1024, optimizer=_adam)
    before = _params(model.student)
    trainer = _trainer(tmp_path, 2)
    trainer.fit(model, dm)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(before[k], v) for k, v in _params(model.student).items())


# --- exact resume -------------------------------------------------------------------------------


def _resume_run(root, folder, max_steps, ckpt_path=None):
    """11 train images, batch 3, drop_last: 3 steps per epoch, so 4 steps cross an epoch boundary."""
    L.seed_everything(0)
    dm = TeacherDataModule(teacher=None, data=str(folder), image_size=8, channels=1, batch_size=3, val_fraction=0.1)
    model = DiffusionTraining(unet=make_tiny_unet(8, 1), num_train_timesteps=1024, optimizer=_adam)
    ema = EMA(decay=0.8, warmup=False)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = _trainer(root, max_steps, [ema, ckpt])
    # Default (weights-only) loading: networks in hparams are stored as class path + config, not pickled.
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return model, ema


def test_resume_matches_uninterrupted_run(tmp_path, image_folder):
    full, full_ema = _resume_run(tmp_path / "full", image_folder, 4)
    ckpts = sorted((tmp_path / "full" / "ckpt").glob("*.ckpt"))
    assert [p.name for p in ckpts] == [f"step={k}.ckpt" for k in (1, 2, 3, 4)]
    step2 = torch.load(tmp_path / "full" / "ckpt" / "step=2.ckpt", map_location="cpu", weights_only=False)
    step2_student = {k[len("student."):]: v for k, v in step2["state_dict"].items() if k.startswith("student.")}
    # the run moved after step 2, so matching at step 4 is not trivially true
    assert any(not torch.allclose(step2_student[k], v) for k, v in _params(full.student).items())

    # train 2 steps, stop, resume to 4 from that run's step-2 checkpoint (mid-epoch) ...
    _resume_run(tmp_path / "short", image_folder, 2)
    mid, mid_ema = _resume_run(tmp_path / "resumed", image_folder, 4, tmp_path / "short" / "ckpt" / "step=2.ckpt")
    # ... and from the end-of-epoch checkpoint (step 3) of the uninterrupted run
    end, end_ema = _resume_run(tmp_path / "resumed_end", image_folder, 4, tmp_path / "full" / "ckpt" / "step=3.ckpt")

    ref, ref_ema = _params(full.student), _params(full_ema.averaged.module)
    for name, model, ema in (("mid-epoch", mid, mid_ema), ("end-of-epoch", end, end_ema)):
        for k, v in _params(model.student).items():
            torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=1e-5, msg=f"{name} resume: student {k}")
        for k, v in _params(ema.averaged.module).items():
            torch.testing.assert_close(v, ref_ema[k], atol=1e-6, rtol=1e-5, msg=f"{name} resume: EMA {k}")


# --- teacher in checkpoints ---------------------------------------------------------------------


class TeacherX0Regression(DistillationMethod):
    """Trivial distillation for the test: regress the student's x0 onto the teacher's at a random t."""

    def compute_loss(self, batch):
        x0 = batch["x"]
        t = torch.randint(0, self.student.schedule.num_train_timesteps, (x0.shape[0],))
        x_t = self.student.schedule.add_noise(x0, torch.randn_like(x0), t)
        with torch.no_grad():
            target = self.teacher.denoiser(x_t, t).x0
        loss = F.mse_loss(self.student(x_t, t).x0, target)
        return LossOutput(loss, {"mse": loss})


def test_reloadable_teacher_left_out_of_checkpoints(tmp_path, tiny_teacher_dir):
    L.seed_everything(0)
    dm = TeacherDataModule(teacher=str(tiny_teacher_dir), data="digits", image_size=8, batch_size=4)
    model = TeacherX0Regression(teacher=dm.teacher, optimizer=_adam)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, 2, [ckpt_cb])
    trainer.fit(model, dm)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    assert any(k.startswith("student.") for k in ckpt["state_dict"])
    assert ckpt["teacher_source"]["source"] == str(tiny_teacher_dir)
    # the teacher is frozen: training did not move it away from its source
    source = load_teacher(str(tiny_teacher_dir))
    for k, v in source.state_dict().items():
        torch.testing.assert_close(model.teacher.state_dict()[k], v)

    # resume: the teacher comes from the source, the student from the checkpoint
    L.seed_everything(0)
    dm2 = TeacherDataModule(teacher=str(tiny_teacher_dir), data="digits", image_size=8, batch_size=4)
    model2 = TeacherX0Regression(teacher=dm2.teacher, optimizer=_adam)
    with torch.no_grad():  # scramble the new student so only the checkpoint can restore it
        for p in model2.student.parameters():
            p.add_(1.0)
    trainer2 = _trainer(tmp_path / "r", 2)  # already at max_steps: loads, then stops
    trainer2.fit(model2, dm2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for k, v in _params(model.student).items():
        torch.testing.assert_close(model2.student.state_dict()[k], v)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(model2.teacher.state_dict()[k], v)


def test_teacher_without_source_is_saved_in_full(tmp_path):
    from diffusers import DDIMScheduler

    teacher = DiffusionTeacher(make_tiny_unet(8, 1), DDIMScheduler(num_train_timesteps=1024), "v_prediction")
    assert not teacher.reloadable
    L.seed_everything(0)
    dm = TeacherDataModule(teacher=None, data="digits", image_size=8, batch_size=4)
    model = TeacherX0Regression(teacher=teacher, optimizer=_adam)
    trainer = _trainer(tmp_path, 1, [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(model, dm)
    sd = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    teacher_keys = {k[len("teacher."):] for k in sd if k.startswith("teacher.")}
    assert teacher_keys == set(teacher.state_dict())


# --- finite-loss guard --------------------------------------------------------------------------


def test_check_finite_names_term_and_step():
    check_finite(LossOutput(torch.tensor(1.0), {"a": torch.tensor(2.0)}), 5)
    with pytest.raises(NonFiniteLossError, match=r"'kl' at global step 7"):
        check_finite(LossOutput(torch.tensor(1.0), {"kl": torch.tensor(float("nan"))}), 7)
    with pytest.raises(NonFiniteLossError, match=r"'loss' at global step 0"):
        check_finite(LossOutput(torch.tensor(float("inf"))), 0)


class NaNAtStep(TeacherX0Regression):
    def compute_loss(self, batch):
        out = super().compute_loss(batch)
        if self.global_step == 1:
            out.logs["regulariser"] = torch.tensor(float("nan"))
        return out


def test_nan_loss_stops_training_with_named_term(tmp_path, tiny_teacher_dir):
    L.seed_everything(0)
    dm = TeacherDataModule(teacher=str(tiny_teacher_dir), data="digits", image_size=8, batch_size=4)
    model = NaNAtStep(teacher=dm.teacher, optimizer=_adam)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    trainer = _trainer(tmp_path, 4, [ckpt])
    with pytest.raises(NonFiniteLossError, match=r"'regulariser' at global step 1"):
        trainer.fit(model, dm)
    # the last good checkpoint (step 1) is kept
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 1
