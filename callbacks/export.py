"""Export the student as a diffusers pipeline folder at the end of fit (rank 0 only)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class PipelineExport(L.Callback):
    """Write ``pl_module.export(dirpath)`` when fit ends (EMA weights when an EMA callback is attached).

    Args:
        dirpath: target folder; written atomically (see ``lightning_distill.export``).
        use_ema: export the sampling-EMA weights when present.

    Example::

        >>> trainer = L.Trainer(callbacks=[EMA(), PipelineExport("outputs/student")])
    """

    def __init__(self, dirpath: str, use_ema: bool = True) -> None:
        self.dirpath = dirpath
        self.use_ema = use_ema
        self.exported_to: str | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            path = pl_module.export(self.dirpath, use_ema=self.use_ema)
            self.exported_to = str(path)
            rank_zero_info(f"Exported diffusers pipeline to {path}")
        trainer.strategy.barrier("pipeline_export")
