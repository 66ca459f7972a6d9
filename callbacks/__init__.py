"""Callbacks that own cross-cutting training state (imported as ``lightning_distill.callbacks``)."""

from .discriminator import DiscriminatorSchedule
from .ema import EMA, ema_decay
from .export import PipelineExport
from .fid import FIDCallback
from .progress_bar import StepProgressBar
from .progressive import TeacherSwap
from .report import DistillationReport

__all__ = ["EMA", "ema_decay", "PipelineExport", "DistillationReport", "FIDCallback", "TeacherSwap", "DiscriminatorSchedule",
           "StepProgressBar"]
