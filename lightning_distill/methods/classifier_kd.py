"""Knowledge distillation of a classifier with temperature (Hinton et al. 2015; METHODS.md section 0).

A frozen teacher classifier (by default the bundled digits feature classifier of
:mod:`lightning_distill.feature_net`) is distilled into a smaller student classifier:

    loss = alpha * CE(z_s, y) + (1 - alpha) * T^2 KL(softmax(z_t / T) || softmax(z_s / T))

with T > 1 so that the teacher's small probabilities ("this 7 looks a bit like a 1") carry signal.
Both networks' accuracies on the data module's val split are logged (``val/student_acc``,
``val/teacher_acc``) and, at fit end, measured over the whole split and written to ``result_path``.

Trained with the same CLI and :class:`~lightning_distill.data.TeacherDataModule` (``data.teacher:
null``: the diffusion teacher is not needed; the classifier teacher is ``teacher_classifier``).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import classifier_kd_loss, temperature_kd_loss
from ..nn_utils import eval_mode


def _logits(net: nn.Module, x: Tensor) -> Tensor:
    """Class scores of a network: its ``logits`` method when it has one (feature nets), else its output."""
    return net.logits(x) if hasattr(net, "logits") else net(x)


def default_kd_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)


@torch.no_grad()
def all_logits(net: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Logits of ``net`` (in eval mode for the measurement) for a whole image tensor, on the CPU."""
    device = next(net.parameters()).device
    with eval_mode(net):
        return torch.cat([_logits(net, images[i : i + batch_size].to(device)).float().cpu()
                          for i in range(0, images.shape[0], batch_size)])


def accuracy(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``net`` on a labelled image tensor."""
    return float((all_logits(net, images, batch_size).argmax(1) == labels).float().mean())


class ClassifierKD(L.LightningModule):
    """Distil a frozen teacher classifier into a smaller student with temperature-scaled soft targets.

    Args:
        student: the student classifier (``logits(x)`` method or logits as output). None: a
            ``DigitsFeatureNet`` with a quarter of the bundled classifier's conv widths.
        teacher_classifier: folder of a saved feature net (``model.safetensors`` + ``config.json``);
            None: the bundled digits classifier. Named so the CLI does not link the diffusion teacher.
        temperature: T of the soft targets (T > 1 flattens them).
        alpha: weight of the hard-label cross-entropy; 0 = soft targets only, 1 = no distillation.
        max_shift: random-translation augmentation in pixels, applied to the input both nets see.
        optimizer, lr_scheduler: optimiser factory for the student (and optional step-wise scheduler).
        result_path: JSON file receiving the final teacher / student accuracies (None: not written).

    Example::

        >>> model = ClassifierKD(student=DigitsFeatureNet(widths=(8, 16), num_features=32), temperature=4.0)
    """

    def __init__(
        self,
        student: nn.Module | None = None,
        teacher_classifier: str | None = None,
        temperature: float = 4.0,
        alpha: float = 0.1,
        max_shift: int = 1,
        optimizer: OptimizerCallable = default_kd_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        result_path: str | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
        self.save_hyperparameters(ignore=["student", "optimizer", "lr_scheduler"])
        from ..feature_net import DigitsFeatureNet, load_digits_feature_net

        self.teacher = load_digits_feature_net(teacher_classifier)
        self.teacher.requires_grad_(False)
        self.student = student if student is not None else DigitsFeatureNet(widths=(8, 16), num_features=32)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.results: dict[str, float] = {}

    def train(self, mode: bool = True) -> "ClassifierKD":
        super().train(mode)
        self.teacher.eval()  # a frozen teacher with active dropout would give noisy soft targets
        return self

    def configure_callbacks(self):
        # the shift augmentation's random state in checkpoints (a resume continues the draws) and reseeded per
        # rank under DDP (each rank shifts its own images differently), as in every DistillationMethod
        from ..resume import ResumeRNG

        return [ResumeRNG()]

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.student.parameters())
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        from ..feature_net import random_shift

        x = random_shift(batch["x"], self.hparams.max_shift)
        with torch.no_grad():
            z_t = _logits(self.teacher, x)
        z_s = _logits(self.student, x)
        out = classifier_kd_loss(z_s, z_t, batch["label"], self.hparams.temperature, self.hparams.alpha)
        acc = (z_s.argmax(1) == batch["label"]).float().mean()
        self.log_dict({**{f"train/{k}": v for k, v in out.logs.items()}, "train/acc": acc}, prog_bar=True,
                      batch_size=x.shape[0])
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x, y = batch["x"], batch["label"]
        z_t, z_s = _logits(self.teacher, x), _logits(self.student, x)
        out = classifier_kd_loss(z_s, z_t, y, self.hparams.temperature, self.hparams.alpha)
        logs = {
            "val/loss": out.loss,
            "val/kl": out.logs["kl"],
            "val/student_acc": (z_s.argmax(1) == y).float().mean(),
            "val/teacher_acc": (z_t.argmax(1) == y).float().mean(),
            "val/agreement": (z_s.argmax(1) == z_t.argmax(1)).float().mean(),
        }
        self.log_dict(logs, prog_bar=True, sync_dist=True, batch_size=x.shape[0])

    def on_fit_end(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "val_images"):
            return
        val = dm.image_val_set if hasattr(dm, "image_val_set") else dm.val_set
        images, labels = dm.val_images(), val.dataset.labels[val.indices]
        z_t, z_s = all_logits(self.teacher, images), all_logits(self.student, images)
        self.results = {
            "teacher_accuracy": float((z_t.argmax(1) == labels).float().mean()),
            "student_accuracy": float((z_s.argmax(1) == labels).float().mean()),
            "agreement": float((z_s.argmax(1) == z_t.argmax(1)).float().mean()),
            "kl_T1": float(temperature_kd_loss(z_s, z_t, 1.0)),
            "student_nll": float(torch.nn.functional.cross_entropy(z_s, labels)),
            "teacher_parameters": sum(p.numel() for p in self.teacher.parameters()),
            "student_parameters": sum(p.numel() for p in self.student.parameters()),
            "num_val_images": int(labels.numel()),
            "temperature": self.hparams.temperature,
            "alpha": self.hparams.alpha,
            "global_step": self.global_step,
        }
        if self.hparams.result_path and self.trainer.is_global_zero:
            path = Path(self.hparams.result_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.results, indent=2) + "\n")


__all__ = ["ClassifierKD", "accuracy", "all_logits"]
