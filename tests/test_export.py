"""Export: a diffusers folder that loads offline and reproduces ``method.sample``; atomic writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DiffusionPipeline

from lightning_distill.callbacks import EMA
from lightning_distill.data import TeacherDataModule
from lightning_distill import export
from lightning_distill.export import atomic_write_dir
from lightning_distill.methods.diffusion import DiffusionTraining

from conftest import make_tiny_unet


def _fit_tiny(root, max_steps: int, callbacks: list, **trainer_kwargs) -> DiffusionTraining:
    """A tiny DiffusionTraining model fitted on the digits for ``max_steps`` steps (Adam lr 1e-2)."""
    L.seed_everything(0)
    dm = TeacherDataModule(teacher=None, data="digits", image_size=8, batch_size=8)
    model = DiffusionTraining(
        unet=make_tiny_unet(8, 1),
        num_train_timesteps=1024,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        default_root_dir=root,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(model, dm)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DiffusionTraining model after 2 steps with a fast EMA (so EMA and raw weights differ)."""
    ema = EMA(decay=0.5, warmup=False)
    model = _fit_tiny(tmp_path_factory.mktemp("run"), 2, [ema], enable_checkpointing=False)
    return model, ema


def _to_np(x: torch.Tensor) -> np.ndarray:
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


@pytest.mark.parametrize("steps", [1, 4])
def test_export_reloads_and_reproduces_samples(trained, tmp_path, steps):
    model, ema = trained
    folder = model.export(tmp_path / "student")
    assert (folder / "model_index.json").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    pipe = DiffusionPipeline.from_pretrained(str(folder))  # HF_HUB_OFFLINE=1 (conftest): local only
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing" and pipe.scheduler.config.set_alpha_to_one
    # the exported weights are the EMA copy, not the raw student
    ema_sd = ema.sampling_module(model).unet.state_dict()
    raw_sd = model.student.unet.state_dict()
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, ema_sd[k])
    assert any(not torch.equal(ema_sd[k], raw_sd[k]) for k in raw_sd)

    assert_pipeline_reproduces_samples(model, pipe, steps)


def assert_pipeline_reproduces_samples(model, pipe, steps: int, seeds=(0, 7)) -> None:
    """The reloaded pipeline draws ``model.sample``'s images from the same generator (two seeds, whose
    images differ: the comparison is not between constants)."""
    for seed in seeds:
        ours = _to_np(model.sample(3, steps, torch.Generator().manual_seed(seed)))
        theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                      output_type="np").images
        assert theirs.shape == ours.shape == (3, *model.sample_shape[1:], model.sample_shape[0])
        np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-5, err_msg=f"{steps} steps, seed {seed}")
    assert not np.allclose(_to_np(model.sample(3, steps, torch.Generator().manual_seed(seeds[0]))),
                           _to_np(model.sample(3, steps, torch.Generator().manual_seed(seeds[1]))))


# Every distillation method whose export is not checked elsewhere (teacher training: above; CD, data
# distillation, LCM: their own test files), trained for its debug preset's few steps on the tiny teacher,
# with the step counts its sampler takes. DMD2 once with a 1-step and once with a 2-step generator.
EXPORTED_METHODS = {
    "add": ([], [1, 2]),
    "apt": ([], [1]),
    "dmd2": ([], [1]),
    "dmd2-2step": (["--model.init_args.generator_steps", "2"], [1, 2]),
    "progressive": ([], [1, 2]),
    "knowledge": ([], [1, 2]),
    "scm": ([], [1, 2, 4]),
}


@pytest.fixture(scope="module")
def method_fixtures(tmp_path_factory):
    from _method_configs import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("export_fixtures"))


@pytest.mark.parametrize("name", sorted(EXPORTED_METHODS))
def test_trained_method_export_reloads_and_reproduces_samples(name, method_fixtures, tmp_path):
    from _method_configs import debug_config, preset_args, skip_reason

    from lightning_distill.cli import cli_main

    preset = name.split("-")[0]
    if not debug_config(preset).is_file():
        pytest.skip(skip_reason(preset))
    extra, step_counts = EXPORTED_METHODS[name]
    cli = cli_main(["fit", *preset_args(preset, tmp_path / "run", method_fixtures), *extra])
    model = cli.model
    assert cli.trainer.global_step > 0
    folder = model.export(tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(str(folder))  # HF_HUB_OFFLINE=1 (conftest): local only
    # the export holds the sampling weights (the EMA copy), which training moved away from the raw student
    exported, sampling = pipe.unet.state_dict(), model.sampling_denoiser().unet.state_dict()
    for k, v in exported.items():
        torch.testing.assert_close(v, sampling[k], rtol=0, atol=0, msg=k)
    assert model.sampling_denoiser() is not model.student
    for steps in step_counts:
        assert_pipeline_reproduces_samples(model, pipe, steps)


def test_sample_runs_in_eval_mode_and_restores_the_mode(trained):
    """sample() toggles train -> eval -> train, and leaves an eval-mode network untouched."""
    model, _ = trained
    den = model.student
    seen = []
    hook = den.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(m.training))
    try:
        den.train()
        model.sample(2, 2, torch.Generator().manual_seed(0), denoiser=den)
        assert den.training and all(m.training for m in den.modules())
        den.eval()
        model.sample(2, 2, torch.Generator().manual_seed(0), denoiser=den)
        assert not any(m.training for m in den.modules())
    finally:
        hook.remove()
        den.train()
    assert seen == [False] * 4


def test_export_without_ema(trained, tmp_path):
    model, _ = trained
    folder = model.export(tmp_path / "raw", use_ema=False)
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, model.student.unet.state_dict()[k])


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_interrupted_export_keeps_previous(trained, tmp_path, monkeypatch):
    model, _ = trained
    target = tmp_path / "student"
    model.export(target)
    before = _snapshot(target)
    assert "model_index.json" in before

    original = DDPMPipeline.save_pretrained

    def crash_midway(self, save_directory, *args, **kwargs):
        original(self, save_directory, *args, **kwargs)  # a complete write ...
        (save_directory / "model_index.json").write_text("{half")  # ... then a partial overwrite
        raise KeyboardInterrupt("simulated crash during export")

    monkeypatch.setattr(DDPMPipeline, "save_pretrained", crash_midway)
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        model.export(target, use_ema=False)
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temp or .old folder left
    DiffusionPipeline.from_pretrained(str(target))  # still loads

    # a crash with nothing at the target leaves nothing behind
    with pytest.raises(KeyboardInterrupt):
        model.export(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_a_failed_rename_into_place_puts_the_previous_folder_back(tmp_path, monkeypatch):
    from lightning_distill import export

    target = tmp_path / "out"
    atomic_write_dir(target, lambda tmp: (tmp / "a.txt").write_text("A"))
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append(Path(src).name)
        if len(calls) == 2:  # the first moves the previous folder aside, the second puts the new one in place
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_dir(target, lambda tmp: (tmp / "b.txt").write_text("B"))
    assert len(calls) == 3 and calls[0] == "out"  # aside, the failed one, back
    assert _snapshot(target) == {"a.txt": b"A"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or .old folder left


def test_atomic_write_dir_is_on_disk_before_it_is_published(tmp_path, monkeypatch):
    """Every file and folder of the new export is fsynced before the rename, the parent after it."""
    events = []
    real_fsync, real_replace = os.fsync, export.os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(export.os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))

    def write(tmp):
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_text("A")
        (tmp / "sub" / "b.txt").write_text("B")

    target = atomic_write_dir(tmp_path / "out", write)
    first_rename = events.index(("replace", str(target)))
    synced = [Path(p).name for kind, p in events[:first_rename] if kind == "fsync"]
    assert sorted(synced[:2]) == ["a.txt", "b.txt"] and synced[2] == "sub" and synced[3].startswith(".out.tmp-")
    assert events[first_rename + 1:] == [("fsync", str(tmp_path))]


def test_atomic_write_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out"

    def write_a(tmp):
        (tmp / "a.txt").write_text("A")

    def write_b(tmp):
        (tmp / "b.txt").write_text("B")

    assert atomic_write_dir(target, write_a) == target.resolve()
    assert _snapshot(target) == {"a.txt": b"A"}
    umask = os.umask(0o022)  # the folder gets a plain mkdir's mode, not mkdtemp's private 0700
    try:
        atomic_write_dir(target, write_a)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    atomic_write_dir(target, write_b)  # replaced, not merged
    assert _snapshot(target) == {"b.txt": b"B"}

    def write_fail(tmp):
        (tmp / "c.txt").write_text("C")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(target, write_fail)
    assert _snapshot(target) == {"b.txt": b"B"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_pipeline_export_from_best_checkpoint(tmp_path):
    """PipelineExport(from_best=True) exports the EMA student of the best monitored checkpoint, not the final one."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_distill.callbacks import PipelineExport

    class Score(L.Callback):  # a metric that is best (lowest) after step 2 of 4
        def on_train_batch_end(self, trainer, pl_module, *args):
            pl_module.log("score", abs(trainer.global_step - 2.0))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="score", mode="min", save_top_k=1, every_n_train_steps=1)
    export = PipelineExport(str(tmp_path / "student"), from_best=True)
    model = _fit_tiny(tmp_path, 4, [Score(), EMA(decay=0.5, warmup=False), ckpt, export])
    assert export.exported_from == ckpt.best_model_path and "step=2" in ckpt.best_model_path
    saved = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)
    averaged = next(s["averaged"] for s in saved["callbacks"].values() if isinstance(s, dict) and "averaged" in s)
    exported = DiffusionPipeline.from_pretrained(str(tmp_path / "student")).unet.state_dict()
    final = model.sampling_denoiser().unet.state_dict()
    for k, v in exported.items():
        torch.testing.assert_close(v, averaged[f"module.unet.{k}"])
    assert any(not torch.equal(v, final[k]) for k, v in exported.items())  # not the final EMA weights


def test_the_export_copy_goes_straight_to_the_cpu_in_float32(monkeypatch):
    """``cpu_float_copy``: every tensor is copied once, to a float32 CPU tensor (non-float buffers keep their
    dtype), weights tied in the network stay tied, and nothing is shared with the original. No parameter or
    buffer goes through ``deepcopy`` (which would copy it on its own device first: a second GPU copy of the
    network at export time; on this CPU-only machine that is what the patched ``__deepcopy__`` detects)."""
    from lightning_distill import lora
    from lightning_distill.export import cpu_float_copy

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 3)).to(torch.bfloat16)
    net[1].weight = torch.nn.Parameter(net[0].weight.detach().t().contiguous())  # an extra parameter object
    net.register_buffer("steps", torch.arange(3))
    lora.add_lora(net, {"rank": 2, "target_modules": ["0"]}, seed=0)
    net.extra = net[1]  # the same module twice: its weights are one set of tensors

    def refuse(self, memo):
        raise AssertionError("a tensor went through deepcopy")

    monkeypatch.setattr(torch.Tensor, "__deepcopy__", refuse)
    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", refuse)
    plain = cpu_float_copy(net)
    monkeypatch.undo()
    assert plain.extra is plain[1] and plain.extra.weight is plain[1].weight and lora.has_lora(plain)
    pairs = list(zip(net.state_dict(keep_vars=True).items(), plain.state_dict(keep_vars=True).items()))
    for (key, old), (key2, new) in pairs:
        assert key == key2 and new.device.type == "cpu" and new.data_ptr() != old.data_ptr()
        assert new.dtype == (torch.float32 if old.is_floating_point() else old.dtype)
        assert torch.equal(new, old.to(new.dtype)) and type(new) is type(old)
        assert new.requires_grad == old.requires_grad
