"""EMA callback against a hand computation: decay warm-up, update_every_n_steps, start_step, accumulation.

The module's loss is 0.5 ||theta||^2 over the student's parameters, so plain SGD with learning rate lr gives
theta_s = (1 - lr)^s theta_0 after s optimiser steps, with or without gradient accumulation (Lightning
divides each micro-batch's loss by the accumulation count). The expected average replays the schedule
the callback documents: the first update copies the weights (``AveragedModel``), update n > 0 (0-based)
does ema <- d ema + (1 - d) theta with d = min(decay, (1 + n) / (10 + n)) under warm-up, else decay.
A buffer (``seen``, set to the global step in ``training_step``) checks that buffers are averaged too.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill.callbacks.ema import EMA, ema_decay

LR = 0.25


class Quadratic(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Linear(3, 2)
        self.student.register_buffer("seen", torch.zeros(()))
        self.theta_0 = [p.detach().clone() for p in self.student.parameters()]

    def training_step(self, batch, batch_idx):
        self.student.seen.fill_(float(self.global_step))  # the step this micro-batch contributes to, minus 1
        return 0.5 * sum(p.square().sum() for p in self.student.parameters())

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=LR)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=1)


def expected(model: Quadratic, update_steps: list[int], decay: float, warmup: bool) -> list[torch.Tensor]:
    """Averaged (weight, bias, seen) after EMA updates at ``update_steps``, by hand."""
    ema = None
    for n, s in enumerate(update_steps):
        theta = [p * (1 - LR) ** s for p in model.theta_0] + [torch.tensor(float(s - 1))]
        if n == 0:
            ema = theta
        else:
            d = min(decay, (1 + n) / (10 + n)) if warmup else decay
            ema = [d * e + (1 - d) * t for e, t in zip(ema, theta)]
    return ema


def fit(tmp_path, ema: EMA, max_steps: int, accumulate: int = 1, ckpt_path=None, callbacks=()) -> Quadratic:
    model = Quadratic()
    trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, callbacks=[ema, *callbacks],
                        logger=False, enable_checkpointing=bool(callbacks), enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


def averaged(ema: EMA, model: Quadratic) -> list[torch.Tensor]:
    module = ema.sampling_module(model)
    return [*module.parameters(), module.seen]


def test_ema_decay_warmup_schedule():
    assert [ema_decay(n, 0.5, True) for n in (0, 1, 2)] == [0.1, 2 / 11, 0.25]
    assert ema_decay(0, 0.5, True) == 0.1 and ema_decay(8, 0.5, True) == 0.5  # 9 / 18 = 0.5: the cap
    assert ema_decay(100, 0.999, True) == pytest.approx(101 / 110)
    assert ema_decay(0, 0.3, False) == ema_decay(10**6, 0.3, False) == 0.3


@pytest.mark.parametrize(
    "decay, warmup, every, start, accumulate, max_steps, updates",
    [
        (0.9, True, 1, 0, 1, 5, [1, 2, 3, 4, 5]),  # warm-up: 2/11, 3/12, ... stay below 0.9
        (0.2, True, 1, 0, 1, 4, [1, 2, 3, 4]),  # the cap: 2/11 then 0.2
        (0.5, False, 2, 0, 1, 5, [2, 4]),
        (0.7, False, 1, 3, 1, 5, [3, 4, 5]),  # the first update (step 3) copies the weights
        (0.6, False, 2, 3, 1, 7, [4, 6]),
        # accumulation: once per optimiser step, and never before the first one
        (0.9, True, 1, 0, 3, 4, [1, 2, 3, 4]),
        (0.5, False, 2, 0, 2, 5, [2, 4]),
    ],
)
def test_averaged_weights_match_hand_computation(tmp_path, decay, warmup, every, start, accumulate, max_steps, updates):
    ema = EMA(decay=decay, warmup=warmup, update_every_n_steps=every, start_step=start)
    model = fit(tmp_path, ema, max_steps, accumulate)
    assert int(ema.averaged.n_averaged) == len(updates)
    want = expected(model, updates, decay, warmup)
    for name, got, w in zip(("weight", "bias", "seen"), averaged(ema, model), want):
        torch.testing.assert_close(got, w.to(got.dtype), msg=f"{name}: EMA after updates at steps {updates}")
    # the raw student went on: theta_max_steps
    torch.testing.assert_close(model.student.weight, model.theta_0[0] * (1 - LR) ** max_steps)


class ReadsTheAverage(L.Callback):
    """Listed before the EMA: reads the average in its on_train_batch_end, as FIDCallback / TeacherSwap do."""

    def __init__(self, ema: EMA) -> None:
        self.ema, self.seen = ema, []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        module = self.ema.sampling_module(pl_module)  # None in the micro-batches before the first step
        self.seen.append(None if module is None else [t.detach().clone() for t in averaged(self.ema, pl_module)])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_callback_before_the_ema_reads_the_current_average(tmp_path, accumulate):
    """It used to get the average one update behind (the EMA's own hook had not run yet at that step)."""
    ema = EMA(decay=0.9, warmup=True)
    probe = ReadsTheAverage(ema)
    model = Quadratic()
    L.Trainer(max_steps=3, accumulate_grad_batches=accumulate, callbacks=[probe, ema], logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path, accelerator="cpu").fit(model)
    assert int(ema.averaged.n_averaged) == 3  # read early, still averaged once per optimiser step
    for step in (1, 2, 3):
        got = probe.seen[step * accumulate - 1]  # the micro-batch that completes optimiser step `step`
        for name, g, w in zip(("weight", "bias", "seen"), got, expected(model, list(range(1, step + 1)), 0.9, True)):
            torch.testing.assert_close(g, w.to(g.dtype), msg=f"{name} at step {step}")


def test_nothing_to_sample_before_start_step(tmp_path):
    ema = EMA(decay=0.5, start_step=3)
    model = fit(tmp_path, ema, 2)
    assert ema.sampling_module(model) is None and int(ema.averaged.n_averaged) == 0


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_continues_the_average(tmp_path, accumulate):
    """Stopping after step 2 and resuming from its checkpoint gives the uninterrupted run's average
    (in particular the first micro-batch after the resume, still at global step 2, updates nothing)."""
    full = EMA(decay=0.9, warmup=True)
    fit(tmp_path / "full", full, 4, accumulate)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(tmp_path / "first", EMA(decay=0.9, warmup=True), 2, accumulate, callbacks=[ckpt])
    (path,) = (tmp_path / "ckpt").glob("*step=2.ckpt")
    resumed = EMA(decay=0.9, warmup=True)
    model = fit(tmp_path / "resumed", resumed, 4, accumulate, ckpt_path=path, callbacks=[ModelCheckpoint(dirpath=tmp_path / "c2")])
    assert int(resumed.averaged.n_averaged) == int(full.averaged.n_averaged) == 4
    for got, want in zip(averaged(resumed, model), averaged(full, model)):
        torch.testing.assert_close(got, want)


def test_posthoc_average_of_snapshots_reproduces_the_callback(tmp_path):
    """benchmarks/posthoc_ema.py: its ``cur`` profile over per-step snapshots equals the EMA callback's average
    (decay 0.995 with warm-up), and its ``raw`` profile is the last weights."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from posthoc_ema import Snapshots, average_snapshots, profile_weights

    ema = EMA(decay=0.995, warmup=True)
    model = fit(tmp_path, ema, 5, callbacks=[Snapshots(str(tmp_path / "snaps"), every=1)])
    got = average_snapshots(tmp_path / "snaps", "cur", prefix="")
    for (name, p), want in zip([*model.student.named_parameters(), ("seen", None)], averaged(ema, model)):
        torch.testing.assert_close(got[name], want, msg=name)
    raw = average_snapshots(tmp_path / "snaps", "raw", prefix="")
    torch.testing.assert_close(raw["weight"], model.student.weight.detach())
    for profile in ("cur", "pow2", "last3"):
        assert sum(profile_weights(profile, 5)) == pytest.approx(1.0)
