"""``lightning-distill``: the Lightning CLI (fit / validate / test / predict) with OmegaConf interpolation.

``parser_mode="omegaconf"`` resolves ``${...}`` after command-line overrides are merged, so
``--data.image_size 32`` reaches every value that interpolates it. The teacher is loaded once by the
data module and linked into the method on instantiation.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .data import DataError, TeacherDataModule
from .methods.base import NonFiniteLossError
from .teacher import TeacherError


def _resolve_per_subcommand() -> None:
    """Make "omegaconf+" resolve ``${...}`` inside the chosen subcommand's config.

    jsonargparse applies OmegaConf on the root parser, whose keys carry the subcommand prefix
    ("fit.trainer...."), so ``${trainer.default_root_dir}`` in a config would not resolve. The wrapper
    resolves the subcommand's own sub-config with its own parser instead (after command-line overrides
    are merged, which is the point of "omegaconf+"). Tested in tests/test_cli.py.
    """
    import jsonargparse._core as core

    original = core.omegaconf_apply
    if getattr(original, "_per_subcommand", False):
        return

    def apply(parser, cfg):
        action = getattr(parser, "_subcommands_action", None)
        sub = cfg.get("subcommand") if action is not None else None
        if sub and sub in action._name_parser_map and cfg.get(sub) is not None:
            cfg[sub] = original(action._name_parser_map[sub], cfg[sub])
            return cfg
        return original(parser, cfg)

    apply._per_subcommand = True
    core.omegaconf_apply = apply


class DistillCLI(LightningCLI):
    """LightningCLI with the shared data module, teacher linking and project defaults."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.teacher", "model.init_args.teacher", apply_on="instantiate")


def default_trainer() -> dict:
    """TensorBoard logging unless a config says otherwise (Lightning adds a ModelCheckpoint itself;
    every shipped config configures one with ``save_last: true``)."""
    from jsonargparse import lazy_instance
    from lightning.pytorch.loggers import TensorBoardLogger

    from .checkpoint_io import AtomicCheckpointIO

    return {
        "logger": lazy_instance(TensorBoardLogger, save_dir="runs"),
        # Checkpoints are written to a temporary file beside the target, flushed, then renamed.
        "plugins": lazy_instance(AtomicCheckpointIO),
        "enable_progress_bar": True,
    }


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-distill`` console script."""
    cli_main(args)


@contextmanager
def one_line_errors(prog: str, errors: tuple[type[BaseException], ...]):
    """Turn ``errors`` raised inside the block into one stderr line naming the problem and exit status 2.

    Bad input (a bad config value, a missing teacher or student, unusable data) surfaces as one of
    these; LIGHTNING_DISTILL_TRACEBACK=1 shows the full traceback instead.
    """
    try:
        yield
    except errors as err:
        if os.environ.get("LIGHTNING_DISTILL_TRACEBACK") == "1":
            raise
        print(f"{prog}: error: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def cli_main(args: list[str] | None = None, run: bool = True) -> DistillCLI:
    """Build (and with ``run`` execute) the CLI; returns it for tests and notebooks."""
    _resolve_per_subcommand()
    # Bad input is reported before any training step wrote anything.
    with one_line_errors("lightning-distill", (TeacherError, DataError, NonFiniteLossError, ValueError)):
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


__all__ = ["DistillCLI", "main", "cli_main", "one_line_errors"]
