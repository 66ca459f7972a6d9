"""The digits feature network behind "FD-digits": a small CNN classifier and its LightningModule.

Inception-v3 features mean little on 16x16 grayscale digits, so the digits default measures Fréchet
distance in the penultimate layer of a classifier trained on the digits train split (the role the
Inception network plays for ImageNet-like data). The network takes images in model space ([-1, 1],
(B, C, H, W)); other sizes are resized to its ``image_size`` (8x8 digits upsample to exactly the 16x16
training images, because the data module makes its 16x16 digits by the same bilinear upsampling),
RGB is averaged to gray.

Train it with the project CLI (the data module's val split is the held-out test split)::

    lightning-distill fit --config configs/evaluation/digits_classifier.yaml

which writes ``lightning_distill/assets/digits_classifier/`` (``model.safetensors`` + ``config.json``
with the measured test accuracy); :func:`load_digits_feature_net` reads it back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from .nn_utils import eval_mode

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_CLASSIFIER = ASSETS / "digits_classifier"


class DigitsFeatureNet(nn.Module):
    """Small CNN: two conv stages, a ``num_features``-wide penultimate layer, a linear classifier.

    ``forward`` returns the penultimate features (what FD uses); ``logits`` the class scores. Any
    ``nn.Module`` with ``num_features`` and this ``forward`` contract plugs into the metrics.

    Args:
        image_size: side the network works at; other inputs are resized to it.
        channels: input channels it was trained on (1 for digits).
        num_classes: classifier outputs.
        widths: channels of the two conv stages.
        num_features: width of the penultimate layer (the FD feature dimension).
        dropout: dropout before the classifier (training only).
        name: the feature network's name in metric tags (``fid/<name>/...``).
        feature_scale: features are multiplied by this constant (set when the classifier is exported so
            that the training images' features have unit mean variance per dimension: FD values are then
            on a fixed scale and KID's polynomial kernel sees O(1) inner products).

    Example::

        >>> net = DigitsFeatureNet()
        >>> net(torch.zeros(4, 1, 16, 16)).shape
        torch.Size([4, 64])
    """

    def __init__(
        self,
        image_size: int = 16,
        channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, int] = (32, 64),
        num_features: int = 64,
        dropout: float = 0.2,
        name: str = "digits-feat",
        feature_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two 2x poolings), got {image_size}")
        w1, w2 = widths
        self.image_size, self.channels, self.num_features, self.name = image_size, channels, num_features, name
        self.config = dict(
            image_size=image_size, channels=channels, num_classes=num_classes, widths=list(widths),
            num_features=num_features, dropout=dropout, name=name, feature_scale=feature_scale,
        )
        self.feature_scale = feature_scale
        self.body = nn.Sequential(
            nn.Conv2d(channels, w1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w1, w1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w1, w2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w2, w2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            # Features are taken before this layer's ReLU: after it, most units are dead on most
            # images (44 of 64 were, in a first version), which wastes the FD feature space.
            nn.Linear(w2 * (image_size // 4) ** 2, num_features),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(num_features, num_classes))

    def prepare(self, x: Tensor) -> Tensor:
        """Model-space images of any size / channel count -> what the network was trained on."""
        x = x.float().clamp(-1, 1)  # generated images can overshoot; real ones never leave [-1, 1]
        if x.shape[1] != self.channels:
            if self.channels == 1:
                x = x.mean(1, keepdim=True)
            elif x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            else:
                raise ValueError(f"{self.name}: cannot feed {x.shape[1]}-channel images to a {self.channels}-channel net")
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        return x

    def set_feature_scale(self, scale: float) -> None:
        self.feature_scale = float(scale)
        self.config["feature_scale"] = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.prepare(x)) * self.feature_scale

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.prepare(x)))


def save_feature_net(net: DigitsFeatureNet, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (constructor config plus ``extra``, e.g. accuracy)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"config": net.config, **(extra or {})}, indent=2) + "\n")
    return folder


def load_digits_feature_net(folder: str | os.PathLike | None = None) -> DigitsFeatureNet:
    """Load a saved feature net (default: the bundled digits classifier), frozen and in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else BUNDLED_CLASSIFIER
    weights, config = folder / "model.safetensors", folder / "config.json"
    missing = [str(p) for p in (weights, config) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"digits feature network incomplete: missing {', '.join(missing)} "
            "(train it with: lightning-distill fit --config configs/evaluation/digits_classifier.yaml)"
        )
    cfg = json.loads(config.read_text())["config"]
    cfg["widths"] = tuple(cfg["widths"])
    net = DigitsFeatureNet(**cfg)
    net.load_state_dict(load_file(weights))
    net.requires_grad_(False)
    return net.eval()


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills in): cheap augmentation."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def default_classifier_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)


class DigitsClassifier(L.LightningModule):
    """Trains a :class:`DigitsFeatureNet` on the data module's train split; reports val accuracy.

    The data module's val split (``split_seed`` 0, 10%) is never trained on and serves as the held-out
    test split. With ``export_dir`` set, fit end measures the accuracy on it over all images and writes
    the weights and a ``config.json`` stating it.

    Args:
        net: the network (default: ``DigitsFeatureNet()``).
        optimizer: optimiser factory.
        max_shift: random-translation augmentation in pixels (at the data's resolution).
        label_smoothing: cross-entropy label smoothing.
        export_dir: where to write ``model.safetensors`` + ``config.json`` at fit end (None: nowhere).

    Example::

        >>> model = DigitsClassifier(DigitsFeatureNet(image_size=16), export_dir="out/classifier")
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        optimizer: OptimizerCallable = default_classifier_optimizer,
        max_shift: int = 1,
        label_smoothing: float = 0.0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer"])
        self.net = net if net is not None else DigitsFeatureNet()
        self.optimizer_factory = optimizer
        self.test_accuracy: float | None = None

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.net.parameters())
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        if not total or total == float("inf"):
            return opt
        # Cosine decay to zero over the run: the last epochs settle instead of bouncing.
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = random_shift(batch["x"], self.hparams.max_shift)
        logits = self.net.logits(x)
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.net.logits(batch["x"])
        loss = F.cross_entropy(logits, batch["label"])
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        self.log_dict({"val/loss": loss, "val/acc": acc}, prog_bar=True, sync_dist=True, batch_size=batch["x"].shape[0])

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
        correct = 0
        with eval_mode(self.net):
            for i in range(0, images.shape[0], batch_size):
                x = images[i : i + batch_size].to(self.device)
                correct += int((self.net.logits(x).argmax(1).cpu() == labels[i : i + batch_size]).sum())
        return correct / images.shape[0]

    def on_fit_end(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "val_set"):
            return
        dm.setup("fit")
        val = dm.val_set
        labels = val.dataset.labels[val.indices]
        train_labels = dm.train_set.dataset.labels[dm.train_set.indices]
        self.test_accuracy = self.accuracy(dm.val_images(), labels)
        train_accuracy = self.accuracy(dm.train_images(), train_labels)
        if hasattr(self.net, "set_feature_scale"):
            with torch.no_grad():
                self.net.set_feature_scale(1.0)
                self.net.eval()
                feats = torch.cat([self.net(x.to(self.device)).double().cpu() for x in dm.train_images().split(512)])
                self.net.set_feature_scale(float(feats.var(0).mean().rsqrt()))
        if self.hparams.export_dir and self.trainer.is_global_zero:
            hp = dict(dm.hparams)
            save_feature_net(
                self.net,
                self.hparams.export_dir,
                {
                    "test_accuracy": self.test_accuracy,
                    "train_accuracy": train_accuracy,
                    "test_split": (
                        f"TeacherDataModule val split (data={hp.get('data')}, image_size={hp.get('image_size')}, "
                        f"val_fraction={hp.get('val_fraction')}, split_seed={hp.get('split_seed')}); "
                        f"{len(labels)} images never trained on"
                    ),
                    "num_test_images": len(labels),
                    "num_train_images": len(train_labels),
                    "global_step": self.global_step,
                },
            )


__all__ = [
    "DigitsFeatureNet",
    "DigitsClassifier",
    "save_feature_net",
    "load_digits_feature_net",
    "random_shift",
    "BUNDLED_CLASSIFIER",
]
