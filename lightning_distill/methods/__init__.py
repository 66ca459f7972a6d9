"""Distillation methods: one LightningModule per file."""

from .base import DistillationMethod, LossOutput, NonFiniteLossError
from .diffusion import DiffusionTraining

__all__ = ["DistillationMethod", "LossOutput", "NonFiniteLossError", "DiffusionTraining"]
