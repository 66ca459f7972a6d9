"""``lightning-distill``: the Lightning CLI (fit / validate / test / predict) with OmegaConf interpolation.

``parser_mode="omegaconf+"`` resolves ``${...}`` after command-line overrides are merged, so
``--data.image_size 32`` reaches every value that interpolates it. The teacher is loaded once by the
data module and linked into the method on instantiation.

Bad input (a config value that cannot work, a missing teacher, unusable data, a loss that became NaN)
ends in one stderr line and exit status 2; any other exception is a bug and keeps its traceback.
Warnings from other libraries that a user can do nothing about are silenced by message while the CLI
runs (``quiet_third_party``); ours are fixed where they arise.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

from .callbacks import StepProgressBar
from .data import DataError, TeacherDataModule
from .errors import ConfigError
from .methods.base import NonFiniteLossError
from .teacher import TeacherError

#: The errors that mean bad input rather than a bug: reported in one line (jsonargparse reports its own
#: parse and type errors the same way).
INPUT_ERRORS = (ConfigError, TeacherError, DataError, NonFiniteLossError)

# (message regex, category, module regex) of third-party warnings, each matched narrowly.
THIRD_PARTY_WARNINGS = [
    # Lightning 2.6 builds torch's deprecated LeafSpec when it flattens logged values (torch >= 2.10).
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
]
# logger name -> start of the message, for third-party warnings sent through `logging`.
THIRD_PARTY_LOG_LINES = {
    # bitsandbytes is not used here, but diffusers imports it where installed, and on CPUs with AVX512-BF16
    # it then tries to fetch a kernel from the hub (offline: fails) and says so.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}
# Lightning's warning for any module in eval mode; silenced only when all of them are frozen networks.
EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


class _DropLines(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


@contextmanager
def quiet_third_party():
    """Silence :data:`THIRD_PARTY_WARNINGS` and :data:`THIRD_PARTY_LOG_LINES` inside the block only.

    Warning filters added inside the block (``DistillCLI.before_fit``) are dropped at its end too.
    """
    filters = [(logging.getLogger(name), _DropLines(start)) for name, start in THIRD_PARTY_LOG_LINES.items()]
    with warnings.catch_warnings():
        for message, category, module in THIRD_PARTY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        for logger, f in filters:
            logger.addFilter(f)
        try:
            yield
        finally:
            for logger, f in filters:
                logger.removeFilter(f)


def unexpected_eval_modules(model: nn.Module) -> list[str]:
    """Names of the modules in eval mode that are not (part of) a frozen network.

    A frozen network (it has parameters and none is trainable: the teacher, a feature net) is in eval
    mode on purpose; any other module in eval mode at the start of training (a student loaded in eval
    mode by ``from_pretrained``) would silently train without dropout, which Lightning's warning is for.
    """
    frozen = [
        name for name, m in model.named_modules()
        if not m.training and (params := list(m.parameters())) and not any(p.requires_grad for p in params)
    ]

    def inside_frozen(name: str) -> bool:
        return any(f == "" or name == f or name.startswith(f + ".") for f in frozen)

    return [name for name, m in model.named_modules() if not m.training and not inside_frozen(name)]


class DistillCLI(LightningCLI):
    """LightningCLI with the shared data module, teacher linking and project defaults.

    Beyond LightningCLI: the data module's teacher is linked into the method, the default progress bar
    is :class:`StepProgressBar`, and Lightning's eval-mode warning is kept only for modules that train.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.teacher", "model.init_args.teacher", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI next replaces the model's settings with a --ckpt_path checkpoint's hyperparameters:
        # the given ones are kept here to name what that drops (before_instantiate_classes)
        self._given_model = _flat(self._subcommand_config().get("model"))

    def _subcommand_config(self):
        return self.config[self.config["subcommand"]] if self.config.get("subcommand") else self.config

    def before_instantiate_classes(self) -> None:
        """Warn when a resume (``--ckpt_path``) replaced model settings that the config or command line gave
        with other values: LightningCLI builds the model from the checkpoint's hyperparameters, so e.g. a new
        learning rate or ``student_lora`` given for the resume is not used. (Settings given as null, which the
        method resolves itself, are not compared.)"""
        config = self._subcommand_config()
        given = getattr(self, "_given_model", {})
        if not config.get("ckpt_path") or not given:
            return
        used = _flat(config.get("model"))
        dropped = {k: (v, used.get(k)) for k, v in given.items() if v is not None and used.get(k) != v}
        if dropped:
            from lightning.pytorch.utilities import rank_zero_warn

            shown = "; ".join(f"model.{k}: {v!r} -> {c!r}" for k, (v, c) in sorted(dropped.items()))
            rank_zero_warn(
                f"resuming from {config['ckpt_path']}: the model is built from the checkpoint's settings, which replace "
                f"these given ones (given -> used): {shown}"
            )

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Adds :class:`StepProgressBar` unless the config turns the bar off or brings its own."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer") or {}
        callbacks = kwargs.get("callbacks", trainer.get("callbacks")) or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, StepProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        # The frozen teacher is in eval mode on purpose; Lightning cannot tell it from a mistake.
        if not unexpected_eval_modules(self.model):
            warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING, category=PossibleUserWarning)


def _flat(node, prefix: str = "") -> dict:
    """A parsed config subtree as {dotted key: plain value} (namespaces and dicts flattened)."""
    if hasattr(node, "as_dict"):
        node = node.as_dict()
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node} if prefix else {}


def default_trainer() -> dict:
    """Trainer defaults: atomic checkpoint writes and a progress bar.

    There is no ``logger`` default: Lightning's own (TensorBoard) writes under ``trainer.default_root_dir``,
    where a fixed ``save_dir`` would not follow ``--trainer.default_root_dir``. Lightning adds a
    ModelCheckpoint itself; every shipped config configures one with ``save_last: true``.
    """
    from jsonargparse import lazy_instance

    from .checkpoint_io import AtomicCheckpointIO

    return {
        # Checkpoints are written to a temporary file beside the target, flushed, then renamed.
        "plugins": lazy_instance(AtomicCheckpointIO),
        "enable_progress_bar": True,
    }


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-distill`` console script."""
    cli_main(args)


def _raised_from(err: BaseException, errors: tuple[type[BaseException], ...]) -> BaseException | None:
    """``err``, or an error it was raised from, that is one of ``errors``; None when there is none.

    jsonargparse re-raises a constructor's error as the cause of its own ValueError ("Does not
    validate against any of the Union subtypes"), so a ConfigError from a callback or a method sits
    one or more ``__cause__`` links down.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, errors):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


@contextmanager
def one_line_errors(prog: str, errors: tuple[type[BaseException], ...]):
    """Turn ``errors`` raised inside the block into one stderr line naming the problem and exit status 2.

    Bad input (a bad config value, a missing teacher or student, unusable data) surfaces as one of
    these, directly or as the cause of another error; every other exception keeps its traceback.
    LIGHTNING_DISTILL_TRACEBACK=1 shows the full traceback for bad input too.
    """
    try:
        yield
    except Exception as err:
        found = _raised_from(err, errors)
        if found is None or os.environ.get("LIGHTNING_DISTILL_TRACEBACK") == "1":
            raise
        print(f"{prog}: error: {type(found).__name__}: {found}", file=sys.stderr)
        raise SystemExit(2) from None


def cli_main(args: list[str] | None = None, run: bool = True) -> DistillCLI:
    """Build (and with ``run`` execute) the CLI; returns it for tests and notebooks."""
    # jsonargparse resolves ${...} on the root parser, whose keys carry the subcommand ("fit.trainer...");
    # relative paths make ${trainer.default_root_dir} in a config resolve inside its subcommand.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    # Bad input is reported before any training step wrote anything.
    with quiet_third_party(), one_line_errors("lightning-distill", INPUT_ERRORS):
        # Any LightningModule may be trained (methods, and plain modules such as the digits feature
        # classifier); a method with a `teacher` argument receives the data module's teacher.
        return DistillCLI(
            L.LightningModule,
            TeacherDataModule,
            subclass_mode_model=True,
            parser_kwargs={"parser_mode": "omegaconf+", "default_env": False},
            trainer_defaults=default_trainer(),
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


__all__ = ["DistillCLI", "INPUT_ERRORS", "main", "cli_main", "one_line_errors", "quiet_third_party",
           "unexpected_eval_modules"]
