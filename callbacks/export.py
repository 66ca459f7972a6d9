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
            ``use_ema``; the final weights when no best checkpoint was written. Written by the method's own
            ``export`` (SD3 / LCM pipelines, a LoRA student fused with its adapter file beside it), on the
            checkpoint's weights with what it left out (LoRA base, teacher) restored as on resume.

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
                path = self.export_checkpoint(pl_module, best)
                self.exported_from = best
            self.exported_to = str(path)
            rank_zero_info(f"Exported diffusers pipeline to {path}" + (f" (from {best})" if best else ""))

    def export_checkpoint(self, pl_module: L.LightningModule, path: str):
        """``pl_module.export(dirpath)`` of the student stored in checkpoint ``path`` (its EMA weights when stored
        and ``use_ema``); ``pl_module`` is left as it was.

        The checkpoint's state dict gets what ``on_save_checkpoint`` left out (a reloadable teacher, the frozen
        base of a LoRA student) from ``pl_module.restore_left_out_weights``, the resume path; a copy of the student
        network loads its ``student.unet.`` weights strictly and stands in for the student during the export.
        """
        import torch

        from lightning_distill.export import ema_state_from_checkpoint

        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        sd = dict(ckpt["state_dict"])
        ema = ema_state_from_checkpoint(ckpt) if self.use_ema else None
        sd.update({f"student.{k}": v for k, v in (ema or {}).items()})  # EMA adapters over the base from sd
        pl_module.restore_left_out_weights(sd)
        prefix = "student.unet."
        network = copy.deepcopy(pl_module.student.unet)
        network.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        live, pl_module.student.unet = pl_module.student.unet, network
        try:
            return pl_module.export(self.dirpath, use_ema=False)
        finally:
            pl_module.student.unet = live
