"""Test worker: the ``lightning-distill`` CLI plus test-only callbacks chosen by environment variables.

Run as ``python tests/_ddp_worker.py fit --config ...``. Lightning's DDP launcher starts the other
local ranks by re-running this same command line, so every rank gets the same callbacks. Tests may
also call :func:`main` in-process.

Environment:
  LD_TEST_OUT          folder for ``rank{r}.pt``: every trained network, optimiser and callback state at
                       the end of training, plus what DDP reduces and what the optimiser holds.
  LD_TEST_CKPT_EVERY   add a ModelCheckpoint(dirpath=$LD_TEST_CKPT_DIR, every_n_train_steps=N, save_last).
  LD_TEST_KILL_AT      SIGKILL this process in the middle of optimiser step k+1 (after backward, before
                       the update), i.e. once step k has been checkpointed.
  LD_TEST_NAN_AT       from this global step on, the student network outputs NaN.
  LD_TEST_NO_NETWORK   "1": any socket connection to a non-loopback address raises OSError.
  LD_TEST_LOGS         file for a JSON list, one entry per training batch, of the ``train/*`` values the
                       method logged in that batch (the redesign guard, tests/test_guard.py).
"""

from __future__ import annotations

import os
import signal
import socket
import sys

import lightning as L
import torch


#: Non-loopback connections attempted while the network was disabled (host, port).
BLOCKED: list = []


def disable_network() -> None:
    """Make every connection to a non-loopback address fail (the DDP rendezvous on 127.0.0.1 still works)."""
    original = socket.socket.connect
    original_ex = socket.socket.connect_ex

    def allowed(sock, address) -> bool:
        host = address[0] if isinstance(address, tuple) else address
        return sock.family == socket.AF_UNIX or host in ("127.0.0.1", "localhost", "::1")

    def connect(self, address):
        if allowed(self, address):
            return original(self, address)
        BLOCKED.append(address)
        raise OSError(f"network disabled by the test: connect to {address!r}")

    def connect_ex(self, address):
        if allowed(self, address):
            return original_ex(self, address)
        BLOCKED.append(address)
        return 111  # ECONNREFUSED

    original_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host in (None, "127.0.0.1", "localhost", "::1", "0.0.0.0", "") or str(host).startswith("127."):
            return original_getaddrinfo(host, *args, **kwargs)
        BLOCKED.append((host, args[0] if args else None))
        raise socket.gaierror(f"network disabled by the test: name lookup of {host!r}")

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo


def _teacher(pl_module):
    return getattr(pl_module, "teacher", None)


def _trained_state(pl_module) -> dict:
    """Every tensor of the module that is not the frozen teacher (student, target nets, discriminators)."""
    return {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if not k.startswith("teacher.")}


class RecordState(L.Callback):
    """At the end of training, every rank writes what the tests compare (see module docstring)."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.teacher_dtype_at_start = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # at the start: progressive distillation later promotes the (float32) student to teacher
        teacher = _teacher(pl_module)
        params = list(teacher.parameters()) if teacher is not None else []
        self.teacher_dtype_at_start = str(params[0].dtype) if params else None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        teacher = _teacher(pl_module)
        teacher_params = list(teacher.parameters()) if teacher is not None else []
        teacher_ids = {id(p) for p in teacher_params}
        opt_ids = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        reduced_ids: set[int] | None = None
        wrapped = trainer.strategy.model
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            reduced_ids = {id(p) for p in wrapped._build_params_for_reducer()[0]}
        callbacks = {}
        for cb in trainer.callbacks:
            name = type(cb).__name__
            if name in ("RecordState", "KillAt", "ModelCheckpoint", "SaveConfigCallback"):
                continue
            sd = cb.state_dict()
            if sd:
                callbacks[name] = sd
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "trained": _trained_state(pl_module),
            "optimizers": [opt.state_dict() for opt in trainer.optimizers],
            "callbacks": callbacks,
            "teacher_params": len(teacher_params),
            "teacher_requires_grad": sum(p.requires_grad for p in teacher_params),
            "teacher_in_optimizer": len(teacher_ids & opt_ids),
            "teacher_dtype": self.teacher_dtype_at_start,
            "ddp": reduced_ids is not None,
            "ddp_reduced": len(reduced_ids) if reduced_ids is not None else 0,
            "teacher_reduced_by_ddp": len(teacher_ids & reduced_ids) if reduced_ids is not None else 0,
            "precision": str(trainer.precision),
        }
        os.makedirs(self.out, exist_ok=True)
        torch.save(record, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


class RecordLogs(L.Callback):
    """Every ``train/*`` value the method logs, batch by batch, written as JSON at the end of training.

    Wraps the module's ``log_dict`` / ``log`` (this instance only): logged values are the loss terms
    themselves, before Lightning's reductions, and a key logged in one batch is not repeated in the next.
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.batches: list[dict[str, float]] = []
        self._current: dict[str, float] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        log, log_dict = pl_module.log, pl_module.log_dict

        def record(name, value):
            if self._current is not None and name.startswith("train/"):
                self._current[name] = float(torch.as_tensor(value).detach().double().cpu())

        def new_log(name, value, *args, **kwargs):
            record(name, value)
            return log(name, value, *args, **kwargs)

        def new_log_dict(values, *args, **kwargs):
            for name, value in values.items():
                record(name, value)
            return log_dict(values, *args, **kwargs)

        pl_module.log, pl_module.log_dict = new_log, new_log_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._current = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(self._current or {})
        self._current = None

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        if trainer.global_rank == 0:
            with open(self.out, "w") as f:
                json.dump(self.batches, f)


class KillAt(L.Callback):
    """A real crash: SIGKILL (no cleanup, no exception handlers) during optimiser step ``step + 1``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step >= self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class InjectNaN(L.Callback):
    """From global step ``step`` on, the student network outputs NaN (a diverged network, any method).

    A forward hook on ``pl_module.student`` registered at train start, after the EMA callback copied
    the student, so sampling copies stay clean; every loss term computed from the student turns NaN.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.trainer = None

    def on_train_start(self, trainer, pl_module) -> None:
        def hook(module, args, out):
            if not (module.training and trainer.global_step >= self.step):
                return out
            nan = float("nan")
            if isinstance(out, tuple):
                return (out[0] * nan, *out[1:])
            if isinstance(out, torch.Tensor):
                return out * nan
            if hasattr(out, "sample"):  # return_dict=True
                out.sample = out.sample * nan
            return out

        pl_module.student.unet.register_forward_hook(hook)


def test_callbacks() -> list[L.Callback]:
    env = os.environ
    cbs: list[L.Callback] = []
    if env.get("LD_TEST_CKPT_EVERY"):
        from lightning.pytorch.callbacks import ModelCheckpoint

        cbs.append(
            ModelCheckpoint(
                dirpath=env["LD_TEST_CKPT_DIR"],
                every_n_train_steps=int(env["LD_TEST_CKPT_EVERY"]),
                save_last=True,
                save_top_k=-1,
                filename="{step}",
            )
        )
    if env.get("LD_TEST_OUT"):
        cbs.append(RecordState(env["LD_TEST_OUT"]))
    if env.get("LD_TEST_LOGS"):
        cbs.append(RecordLogs(env["LD_TEST_LOGS"]))
    if env.get("LD_TEST_KILL_AT"):
        cbs.append(KillAt(int(env["LD_TEST_KILL_AT"])))
    if env.get("LD_TEST_NAN_AT"):
        cbs.append(InjectNaN(int(env["LD_TEST_NAN_AT"])))
    return cbs


def main(argv: list[str]) -> None:
    import lightning_distill.cli as cli

    if os.environ.get("LD_TEST_NO_NETWORK") == "1":
        disable_network()
    original = cli.default_trainer

    def default_trainer() -> dict:
        defaults = original()
        defaults["callbacks"] = test_callbacks()
        return defaults

    cli.default_trainer = default_trainer
    try:
        cli.main(argv)
    finally:
        cli.default_trainer = original


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("LD_TEST_THREADS", "1")))
    main(sys.argv[1:])
