"""Shared fixtures: offline, single-threaded, tiny teachers written as diffusers folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)


def make_tiny_unet(sample_size: int = 8, channels: int = 1, num_class_embeds: int | None = None, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )


def write_tiny_teacher(
    path,
    sample_size: int = 8,
    channels: int = 1,
    prediction_type: str = "v_prediction",
    num_train_timesteps: int = 1024,
    num_class_embeds: int | None = None,
):
    """Save a randomly initialised tiny UNet2DModel + DDIMScheduler as a diffusers teacher folder."""
    from diffusers import DDIMScheduler, DDPMPipeline

    unet = make_tiny_unet(sample_size, channels, num_class_embeds)
    sched = DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
    )
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    return path


def write_lcm_student(teacher_dir, path, original_inference_steps: int = 2):
    """A copy of a tiny VP teacher folder whose scheduler is an ``LCMScheduler`` with a grid of
    ``original_inference_steps`` (what a CD / ADD / DMD2 export is): it samples with at most that many steps."""
    import json
    import shutil

    from diffusers import DDIMScheduler, LCMScheduler

    shutil.copytree(teacher_dir, path)
    cfg = DDIMScheduler.from_pretrained(path, subfolder="scheduler").config
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    LCMScheduler(**{k: cfg[k] for k in keys}, prediction_type=cfg["prediction_type"],
                 original_inference_steps=original_inference_steps).save_pretrained(path / "scheduler")
    index = json.loads((path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def write_tiny_flow_teacher(path, sample_size: int = 8, channels: int = 1, num_train_timesteps: int = 1000,
                            shift: float = 1.0, num_class_embeds: int | None = None, **scheduler_kwargs):
    """Save a randomly initialised tiny UNet2DModel + FlowMatchEulerDiscreteScheduler (a flow-matching
    teacher: velocity output, no prediction_type in the scheduler config) as a diffusers folder."""
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler

    unet = make_tiny_unet(sample_size, channels, num_class_embeds)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift, **scheduler_kwargs)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    return path


@pytest.fixture
def tiny_flow_teacher_dir(tmp_path):
    """A flow-matching 8x8 grayscale teacher folder (unet/ + FlowMatchEulerDiscreteScheduler)."""
    return write_tiny_flow_teacher(tmp_path / "flow_teacher")


@pytest.fixture
def tiny_teacher_dir(tmp_path):
    """A v-prediction 8x8 grayscale teacher folder (unet/ + scheduler/)."""
    return write_tiny_teacher(tmp_path / "teacher")


@pytest.fixture
def tiny_eps_teacher_dir(tmp_path):
    return write_tiny_teacher(tmp_path / "teacher_eps", prediction_type="epsilon")


def write_image_folder(root):
    """Twelve small PNGs (12 x 10, RGB, seeded) in two class sub-folders ``a/`` and ``b/``; returns ``root``."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def write_captions(root):
    """``metadata.jsonl`` for :func:`write_image_folder`'s folder: a caption per image; returns ``root``."""
    import json

    rows = [{"file_name": f"{c}/{i}.png", "text": f"a photo of {'cat' if c == 'a' else 'dog'} {i}"}
            for c in ("a", "b") for i in range(6)]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


@pytest.fixture
def image_folder(tmp_path):
    """Twelve small PNGs in two class sub-folders."""
    return write_image_folder(tmp_path / "images")


def one_line_error(entry, prog: str, argv: list[str], monkeypatch, capsys) -> str:
    """Run a ``python -m lightning_distill.<prog>`` entry point (``module._entry``) on ``argv``; assert it exits
    with status 2 and exactly one stderr line, and return that line."""
    monkeypatch.delenv("LIGHTNING_DISTILL_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", [prog, *argv])
    with pytest.raises(SystemExit) as exc:
        entry()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]
