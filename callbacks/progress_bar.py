"""A progress bar that counts global steps towards ``max_steps``, the unit every preset is sized in (optimiser
steps; iterations for the adversarial methods ADD, APT and DMD2, whose loop counts one step per batch)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, but over ``trainer.global_step`` / ``trainer.max_steps`` for the whole run.

    Lightning's bars count the batches of the current epoch and name the epoch ("Epoch 66", or
    "Epoch 66/-2" from the Rich bar when ``max_epochs`` is -1), which says nothing about how far a run
    sized in steps has got. With ``max_steps`` set, this bar is one bar for the run, across epochs,
    with the time left; a resumed run starts at its checkpoint's step, and its rate and time left
    count only this run's steps. Without ``max_steps`` (a run ended by epochs or by a callback, such as
    progressive distillation's ``TeacherSwap``) it is Lightning's epoch bar unchanged.

    The CLI adds it unless a config turns the bar off or brings its own.

    Example::

        >>> trainer = L.Trainer(max_steps=800, callbacks=[StepProgressBar()])
        Training:  45%|████▌     | 360/800 [02:10<02:40, 2.76it/s, v_num=0, train/loss=0.0121]
    """

    @staticmethod
    def _by_steps(trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not self._by_steps(trainer):
            return
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        # tqdm's rate (and so the time left) is (n - initial) / elapsed: only this run's steps count.
        bar.initial = bar.n = trainer.global_step
        bar.set_description(self.train_description)
        bar.refresh()

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._by_steps(trainer):
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._by_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar, step = self.train_progress_bar, trainer.global_step
        if not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._by_steps(trainer):
            super().on_train_epoch_end(trainer, pl_module)
        elif not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


__all__ = ["StepProgressBar"]
