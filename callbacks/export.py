"""Export the student as a diffusers pipeline folder at the end of fit (rank 0 writes it)."""

from __future__ import annotations

import copy

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from lightning_distill import sharding


class PipelineExport(L.Callback):
    """Write ``pl_module.export(dirpath)`` when fit ends (EMA weights when an EMA callback is attached).

    Args:
        dirpath: target folder; written atomically (see ``lightning_distill.export``).
        use_ema: export the sampling-EMA weights when present.
        from_best: export the student of the best checkpoint of the (first) ``ModelCheckpoint`` that
            monitors a metric, instead of the final weights: for methods that get worse when run too
            long (APT), where the best FD checkpoint is the result. Its EMA weights when stored and
            ``use_ema``; the final weights when no best checkpoint was written.

    Example::

        >>> trainer = L.Trainer(callbacks=[EMA(), PipelineExport("outputs/student")])
    """

    def __init__(self, dirpath: str, use_ema: bool = True, from_best: bool = False) -> None:
        self.dirpath = dirpath
        self.use_ema = use_ema
        self.from_best = from_best
        self.exported_to: str | None = None
        self.exported_from: str | None = None

    @staticmethod
    def best_checkpoint(trainer: L.Trainer) -> str | None:
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
                return cb.best_model_path
        return None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # FSDP2 (sharding.py): every rank gathers its shards of the exported networks; rank 0 exports
        # unsharded copies holding the full weights
        den = pl_module.sampling_denoiser() if self.use_ema else pl_module.student
        with sharding.unsharded(den, pl_module.student if self.from_best else None, rank_zero=trainer.is_global_zero):
            self._export(trainer, pl_module)
        trainer.strategy.barrier("pipeline_export")

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            best = self.best_checkpoint(trainer) if self.from_best else None
            if best is None:
                if self.from_best:
                    rank_zero_info("PipelineExport(from_best=True): no monitored best checkpoint; exporting the final weights")
                path = pl_module.export(self.dirpath, use_ema=self.use_ema)
            else:
                from lightning_distill.export import export_pipeline, load_student_state

                state, _ = load_student_state(best, self.use_ema)
                unet = copy.deepcopy(pl_module.student.unet)
                unet.load_state_dict(state)
                path = export_pipeline(unet, pl_module.sampling_scheduler(pl_module.hparams.sample_steps), self.dirpath)
                self.exported_from = best
            self.exported_to = str(path)
            rank_zero_info(f"Exported diffusers pipeline to {path}" + (f" (from {best})" if best else ""))
