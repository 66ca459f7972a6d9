"""The ``lightning-distill`` CLI: every shipped config instantiates, interpolation, and the four subcommands.

Config convention (read by :func:`test_every_config_instantiates`): every YAML under ``configs/``
(recursively, so a new method's configs are covered as soon as they are added) is instantiated with
``cli_main(["--config", path, *overrides], run=False)``. A config that needs extra arguments to stay
cheap or offline in a test declares them in a comment line of its own::

    # test-overrides: --data.teacher {tiny_teacher} --data.image_size 8 --model.init_args.rounds 1

The line may appear anywhere among the file's leading comment lines (several such lines are joined).
A config that cannot be instantiated offline at all (a hub-only teacher such as Stable Diffusion)
declares ``# test-parse-only: <reason>`` instead: it is then parsed, type-checked and resolved with
``fit --print_config`` (which validates every key and type but instantiates nothing).

Placeholders: ``{tiny_teacher}`` is an 8x8 grayscale v-prediction teacher folder with T = 1024
(conftest.write_tiny_teacher), ``{tiny_eps_teacher}`` the same with eps-prediction, ``{tmp}`` a
temporary folder. ``--trainer.default_root_dir {tmp}/run`` is always added, so nothing is written
under the repository. Arguments are split with ``shlex``.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

from lightning_distill.cli import cli_main

from conftest import write_tiny_teacher

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(REPO.glob("configs/**/*.yaml")) + sorted(REPO.glob("configs/**/*.yml"))
DEBUG_CONFIG = str(REPO / "configs" / "teacher" / "debug.yaml")


def _directives(path: Path, key: str) -> list[str]:
    """The bodies of ``# <key>: ...`` lines among a config's leading comment lines."""
    found = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped.startswith("#") and stripped:
            break
        body = stripped.lstrip("#").strip()
        if body.startswith(f"{key}:"):
            found.append(body[len(key) + 1:].strip())
    return found


def test_overrides(path: Path, tmp: Path, teachers: dict[str, Path]) -> list[str]:
    """The ``# test-overrides:`` arguments of a config, placeholders filled in."""
    args = [a for body in _directives(path, "test-overrides") for a in shlex.split(body)]
    subs = {"tmp": str(tmp), **{k: str(v) for k, v in teachers.items()}}
    return [a.format(**subs) for a in args]


test_overrides.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {
        "tiny_teacher": write_tiny_teacher(root / "v"),
        "tiny_eps_teacher": write_tiny_teacher(root / "eps", prediction_type="epsilon"),
    }


def test_configs_are_found():
    names = {p.relative_to(REPO).as_posix() for p in CONFIGS}
    assert {"configs/teacher/debug.yaml", "configs/teacher/digits.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(REPO / "configs").as_posix() for p in CONFIGS])
def test_every_config_instantiates(path, tmp_path, teachers, capsys):
    args = ["--config", str(path), "--trainer.default_root_dir", str(tmp_path / "run")]
    args += test_overrides(path, tmp_path, teachers)
    if _directives(path, "test-parse-only"):
        with pytest.raises(SystemExit) as exc:
            cli_main(["fit", *args, "--print_config"])
        out, err = capsys.readouterr()
        assert exc.value.code in (0, None), err[-2000:]
        assert "class_path" in out and "${" not in out
        return
    try:
        cli = cli_main(args, run=False)
    except SystemExit as exc:
        pytest.fail(f"{path.relative_to(REPO)} did not instantiate (exit {exc.code}): {capsys.readouterr().err[-2000:]}")
    assert isinstance(cli.model, torch.nn.Module)
    assert cli.datamodule is not None and cli.trainer is not None
    # the teacher link: a method that takes a teacher receives the data module's object itself
    if getattr(cli.datamodule, "teacher", None) is not None and hasattr(cli.model, "teacher"):
        assert cli.model.teacher is cli.datamodule.teacher
    assert "${" not in repr(cli.config.as_dict())  # every interpolation resolved


def test_override_reaches_interpolations(tmp_path):
    cli = cli_main(["--config", DEBUG_CONFIG, "--data.image_size", "12", "--trainer.default_root_dir", str(tmp_path)],
                   run=False)
    assert cli.datamodule.image_size == 12
    assert cli.model.student.unet.config.sample_size == 12  # sample_size: ${data.image_size}
    ckpt = [c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint"]
    assert ckpt and ckpt[0].dirpath == f"{tmp_path}/checkpoints"  # ${trainer.default_root_dir}/checkpoints


def test_print_config_is_resolved(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", DEBUG_CONFIG, "--data.image_size", "12",
                  "--trainer.default_root_dir", str(tmp_path), "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "${" not in out
    assert f"dirpath: {tmp_path}/checkpoints" in out
    assert f"dirpath: {tmp_path}/teacher" in out
    assert "sample_size: 12" in out and "image_size: 12" in out
    assert "lightning_distill.methods.DiffusionTraining" in out


def test_fit_validate_test_predict(tmp_path):
    root = tmp_path / "run"
    common = ["--config", DEBUG_CONFIG, "--trainer.default_root_dir", str(root)]
    cli = cli_main(["fit", *common])
    assert cli.trainer.global_step == 3  # max_steps of the debug preset
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert (root / "teacher" / "model_index.json").is_file()  # PipelineExport at the end of fit
    assert any((root / "logs").rglob("events.out.tfevents*"))  # TensorBoard logger

    cli = cli_main(["validate", *common, "--ckpt_path", str(last)])
    assert "val/loss" in cli.trainer.callback_metrics
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])

    cli = cli_main(["test", *common, "--ckpt_path", str(last), "--trainer.limit_test_batches", "1"])
    assert torch.isfinite(cli.trainer.callback_metrics["test/loss"])

    cli = cli_main(["predict", *common, "--ckpt_path", str(last), "--trainer.limit_predict_batches", "2"])
    preds = cli.trainer.predict_loop.predictions
    assert len(preds) == 2 and preds[0].shape == (16, 1, 8, 8)
    assert bool(torch.isfinite(preds[0]).all())
    # the loaded weights are the checkpoint's: the student matches the saved state dict
    sd = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    for k, v in cli.model.state_dict().items():
        torch.testing.assert_close(v, sd[k])
    # predict samples with the EMA weights restored from the checkpoint, not with the raw student
    ema = next(c for c in cli.trainer.callbacks if type(c).__name__ == "EMA")
    ema_den = ema.sampling_module(cli.model)
    assert ema_den is not None
    seed = cli.model.hparams.seed
    expect = cli.model.sample(16, 2, torch.Generator().manual_seed(seed), denoiser=ema_den)
    torch.testing.assert_close(preds[0], expect)
    raw = cli.model.sample(16, 2, torch.Generator().manual_seed(seed), denoiser=cli.model.student)
    assert not torch.allclose(preds[0], raw)
