"""Callbacks that own cross-cutting training state (imported as ``lightning_distill.callbacks``)."""

from .ema import EMA, ema_decay
from .export import PipelineExport

__all__ = ["EMA", "ema_decay", "PipelineExport"]
