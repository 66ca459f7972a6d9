"""lightning-distill: distil diffusion teachers into few-step or smaller students with PyTorch Lightning."""

from .data import TeacherDataModule
from .parametrisation import Denoiser, Prediction, VPSchedule
from .teacher import DiffusionTeacher, TeacherError, load_teacher

__version__ = "0.1.0"
__all__ = ["TeacherDataModule", "Denoiser", "Prediction", "VPSchedule", "DiffusionTeacher", "TeacherError", "load_teacher"]
