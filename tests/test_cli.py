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
(conftest.write_tiny_teacher), ``{tiny_eps_teacher}`` the same with eps-prediction, ``{tiny_flow_teacher}`` an 8x8
flow-matching teacher (FlowMatchEulerDiscreteScheduler, T = 1000), ``{tmp}`` a
temporary folder. ``--trainer.default_root_dir {tmp}/run`` is always added, so nothing is written
under the repository. Arguments are split with ``shlex``.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ProgressBar
from torch import nn

from lightning_distill.callbacks import StepProgressBar
from lightning_distill.cli import cli_main, quiet_third_party, unexpected_eval_modules

from _method_configs import subprocess_env
from conftest import write_tiny_flow_teacher, write_tiny_teacher

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
        "tiny_flow_teacher": write_tiny_flow_teacher(root / "flow"),
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


def test_interpolation_uses_public_jsonargparse_settings():
    """``${trainer.default_root_dir}`` inside a subcommand resolves through jsonargparse's public
    ``omegaconf_absolute_to_relative_paths`` setting, not a patch of its private ``omegaconf_apply``
    (the resolution itself is checked by test_print_config_is_resolved and test_fit_validate_test_predict)."""
    import jsonargparse._core as core
    import jsonargparse._optionals as optionals
    from jsonargparse._common import get_parsing_setting

    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", DEBUG_CONFIG, "--print_config"])
    assert core.omegaconf_apply is optionals.omegaconf_apply
    assert get_parsing_setting("omegaconf_absolute_to_relative_paths") is True


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


def test_a_resume_names_the_given_model_settings_the_checkpoint_replaces(tmp_path):
    """LightningCLI builds a resumed model from the checkpoint's hyperparameters, so a model setting given for
    the resume (here num_log_samples; e.g. student_lora) is silently not used: the CLI warns, naming the key,
    the given and the used value. A resume that gives the checkpoint's own settings says nothing."""
    root = tmp_path / "run"
    common = ["--config", DEBUG_CONFIG, "--trainer.default_root_dir", str(root)]
    cli_main(["fit", *common])
    last = str(root / "checkpoints" / "last.ckpt")
    with warnings.catch_warnings(record=True) as same:
        warnings.simplefilter("always")
        cli_main(["validate", *common, "--ckpt_path", last])
    assert not [w for w in same if "resuming from" in str(w.message)]
    with pytest.warns(UserWarning, match=r"resuming from .*last\.ckpt: .*model\.init_args\.num_log_samples: 9 -> 4"):
        cli = cli_main(["validate", *common, "--ckpt_path", last, "--model.init_args.num_log_samples", "9"])
    assert cli.model.hparams.num_log_samples == 4


def test_a_resume_warns_when_the_checkpoints_optimiser_state_replaces_a_new_learning_rate(tmp_path):
    """The optimiser is not a checkpoint hyperparameter: a resume builds it from the given settings, and then
    Lightning restores its state, the old learning rate included. The new lr was silently not used; now a
    warning names it. A resume with the configured lr trains on without the warning."""
    root = tmp_path / "run"
    common = ["--config", DEBUG_CONFIG, "--trainer.default_root_dir", str(root), "--trainer.enable_checkpointing", "true"]
    cli_main(["fit", *common, "--trainer.max_steps", "2"])
    last = str(root / "checkpoints" / "last.ckpt")
    with warnings.catch_warnings(record=True) as same:
        warnings.simplefilter("always")
        cli_main(["fit", *common, "--ckpt_path", last, "--trainer.max_steps", "3"])
    assert not [w for w in same if "optimiser state replaces" in str(w.message)]
    with pytest.warns(UserWarning, match=r"optimiser state replaces .*optimizer 0 group 0 lr: 0\.0001 -> 0\.001"):
        cli = cli_main(["fit", *common, "--ckpt_path", last, "--trainer.max_steps", "4",  # last.ckpt: step 3 now
                        "--model.init_args.optimizer.init_args.lr", "1e-4"])
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 1e-3  # what Lightning does: the checkpoint's


def _debug_variant(tmp_path: Path, old: str, new: str) -> str:
    """DEBUG_CONFIG with ``old`` replaced by ``new``, written under tmp_path."""
    text = Path(DEBUG_CONFIG).read_text()
    assert old in text
    path = tmp_path / "variant.yaml"
    path.write_text(text.replace(old, new))
    return str(path)


LOGGER_SECTION = """  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args:
      save_dir: ${trainer.default_root_dir}
      name: logs
"""


# --- errors: one line for bad input, a traceback for a bug -----------------------------------------


def test_bad_setting_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_DISTILL_TRACEBACK", raising=False)
    config = _debug_variant(tmp_path, "decay: 0.9", "decay: 1.5")
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", config, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "lightning-distill: error: ConfigError: EMA decay must lie in [0, 1), got 1.5"
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.init_args.generator_steps", "0"], "ConfigError: generator_steps must be >= 1, got 0"),
        (["--model.init_args.init_from", "/nonexistent/student"], "MissingInputError: student '/nonexistent/student' does not exist"),
    ],
)
def test_bad_method_setting_is_one_line(tmp_path, capsys, monkeypatch, override, message):
    """A method constructor's check (here DMD2's) is bad input too: one line naming it, exit 2, nothing written."""
    from conftest import write_tiny_teacher

    monkeypatch.delenv("LIGHTNING_DISTILL_TRACEBACK", raising=False)
    teacher = write_tiny_teacher(tmp_path / "teacher")
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(REPO / "configs/dmd2/debug.yaml"), "--data.teacher", str(teacher),
                  "--data.image_size", "8", "--trainer.default_root_dir", str(tmp_path / "run"), *override])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lightning-distill: error: {message}"), err[-3:]
    assert not (tmp_path / "run").exists()


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """A ValueError from inside training is a bug, not bad input: it propagates, traceback and all."""
    from lightning_distill.methods import DiffusionTraining

    def broken(self, batch, batch_idx):
        raise ValueError("a bug deep inside training")

    monkeypatch.setattr(DiffusionTraining, "training_step", broken)
    with pytest.raises(ValueError, match="a bug deep inside training"):
        cli_main(["fit", "--config", DEBUG_CONFIG, "--trainer.default_root_dir", str(tmp_path / "run")])


# --- defaults: logger under default_root_dir, a step progress bar ------------------------------------


def test_default_logger_and_progress_bar(tmp_path, monkeypatch, capsys):
    """Without a logger section, TensorBoard logs go under --trainer.default_root_dir (not the working
    directory), and the default bar counts global steps to max_steps across epochs."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = _debug_variant(tmp_path, LOGGER_SECTION, "")
    root = tmp_path / "run"
    cli = cli_main(["fit", "--config", config, "--trainer.default_root_dir", str(root),
                    "--trainer.enable_progress_bar", "true", "--trainer.limit_train_batches", "2"])
    assert cli.trainer.global_step == 3 and cli.trainer.current_epoch >= 1  # 3 steps over 2 epochs
    assert list(root.rglob("events.out.tfevents*"))
    assert not list(cwd.iterdir())
    bars = [c for c in cli.trainer.callbacks if isinstance(c, StepProgressBar)]
    assert len(bars) == 1
    assert (bars[0].train_progress_bar.n, bars[0].train_progress_bar.total) == (3, 3)
    out = capsys.readouterr().out
    assert "3/3" in out and "Epoch" not in out


def test_progress_bar_is_added_only_where_wanted(tmp_path):
    common = ["--config", DEBUG_CONFIG, "--trainer.default_root_dir", str(tmp_path / "run")]

    def bars(*extra):
        cli = cli_main([*common, *extra], run=False)
        return [type(c).__name__ for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]

    assert bars() == []  # the debug preset turns the bar off
    assert bars("--trainer.enable_progress_bar", "true") == ["StepProgressBar"]
    own = ["--trainer.enable_progress_bar", "true",
           "--trainer.callbacks+", "lightning.pytorch.callbacks.TQDMProgressBar"]
    assert bars(*own) == ["TQDMProgressBar"]


# --- a quiet log ------------------------------------------------------------------------------------


def test_unexpected_eval_modules():
    """Frozen networks (the teacher) are in eval mode on purpose; a trainable module in eval mode is not."""
    model = nn.Module()
    model.teacher = nn.Sequential(nn.Linear(2, 2), nn.SiLU()).requires_grad_(False).eval()
    model.student = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    assert unexpected_eval_modules(model) == []
    model.student[1].eval()
    assert unexpected_eval_modules(model) == ["student.1"]
    model.student.eval()
    assert unexpected_eval_modules(model) == ["student", "student.0", "student.1"]


def test_quiet_third_party_drops_only_the_named_messages():
    from lightning.pytorch.utilities._pytree import _tree_flatten

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_third_party():
                _tree_flatten(1.0)  # Lightning builds torch's deprecated LeafSpec
                log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "offline")
                log.warning("another bitsandbytes message")
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated (our own code)", FutureWarning)
            log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: after the CLI")
    finally:
        log.removeHandler(handler)
    assert seen == ["another bitsandbytes message", "Failed to load CPU gemm_4bit_forward from kernels-community: after the CLI"]
    assert [str(w.message) for w in caught] == ["`isinstance(treespec, LeafSpec)` is deprecated (our own code)"]


def _digits_presets() -> list[Path]:
    """Configs that train on the bundled digits images (not on teacher pairs)."""
    import yaml

    found = []
    for path in CONFIGS:
        cfg = yaml.safe_load(path.read_text()) or {}
        data = cfg.get("data") or {}
        # strategy snippets (configs/strategies/, a second --config) have no model and train on nothing
        if "model" in cfg and data.get("data", "digits") == "digits" and not data.get("pairs"):
            found.append(path)
    return found


@pytest.mark.parametrize("path", _digits_presets(), ids=[p.relative_to(REPO / "configs").as_posix() for p in _digits_presets()])
def test_log_interval_fits_an_epoch(path):
    """Lightning warns when ``log_every_n_steps`` exceeds the batches of an epoch (its default is 50)."""
    import yaml

    from lightning_distill.data import TeacherDataModule

    cfg = yaml.safe_load(path.read_text())
    data = cfg.get("data") or {}
    settings = {k: data[k] for k in ("batch_size", "val_fraction", "split_seed") if k in data}
    dm = TeacherDataModule(teacher=None, data="digits", image_size=8, **settings)
    dm.setup("fit")
    batches = len(dm.train_dataloader())
    assert (cfg.get("trainer") or {}).get("log_every_n_steps", 50) <= batches, f"an epoch is {batches} batches"


# Fragments of the warnings that issue #20 found in the main job's console and fixed.
FIXED_WARNINGS = [
    "`accelerate`",  # diffusers: "... strongly recommended to install `accelerate` ..."
    "gemm_4bit",  # bitsandbytes, on CPUs with AVX512-BF16
    "LeafSpec",  # torch's deprecation, triggered by Lightning
    "in eval mode at the start of training",  # Lightning, for the frozen teacher
    "smaller than the logging interval",  # Lightning, log_every_n_steps above the epoch length
    "Epoch",  # the progress bar: "Epoch 66/-2" instead of step / max_steps
]


def test_debug_run_prints_none_of_the_fixed_warnings(tmp_path):
    """A debug preset run as a user runs it (a fresh process, warnings on): none of the fixed warnings."""
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_distill", "fit", "--config", str(REPO / "configs/consistency/debug.yaml"),
         "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "true"],
        cwd=tmp_path, env=subprocess_env(PYTHONWARNINGS=""), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "3/3" in proc.stdout  # the step bar reached max_steps
    printed = [f for f in FIXED_WARNINGS if f in proc.stdout]
    assert not printed, f"{printed} in:\n{proc.stdout[-4000:]}"
