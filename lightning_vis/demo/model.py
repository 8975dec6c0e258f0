"""The demo's small CNN and its LightningModule."""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_vis.demo.data import CLASSES, ShapesDataset

__all__ = ["DemoCNN", "DemoModule", "lightning_package"]


def lightning_package() -> Any:
    """``lightning.pytorch`` if installed, else ``pytorch_lightning``."""
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError:
        return importlib.import_module("pytorch_lightning")


class DemoCNN(nn.Module):
    """Four conv blocks (5×5 then 3×3 kernels), global average pooling, a linear head.

    ``features`` is an ``nn.Sequential`` as in torchvision's VGG/AlexNet, so layers are
    named ``features.0`` (first conv), ``features.4``… With ``batchnorm=False`` the
    blocks are conv → ReLU → pool (used by ``examples/dying_relu.py``).
    """

    def __init__(self, num_classes: int = len(CLASSES), *, width: int = 32, batchnorm: bool = True) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            k = 5 if i == 0 else 3
            layers.append(nn.Conv2d(chans[i], chans[i + 1], k, padding=k // 2, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(chans[i + 1]))
            layers.append(nn.ReLU(inplace=True))
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        if batchnorm:
            # BatchNorm makes the first filters' scale irrelevant to the forward pass; a small
            # start lets the learned structure (oriented edges, colour opponents) dominate the
            # random initial pattern within a few epochs.
            nn.init.normal_(self.features[0].weight, std=0.01)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


_pl = lightning_package()


class DemoModule(_pl.LightningModule):
    """Trains :class:`DemoCNN` on :class:`~lightning_vis.demo.data.ShapesDataset`.

    ``classes`` names the labels (as on the dataset), for callbacks that show class names.
    """

    classes = list(CLASSES)

    def __init__(
        self,
        *,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 64,
        train_size: int = 16384,
        val_size: int = 512,
        image_size: int = 32,
        batchnorm: bool = True,
        width: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = DemoCNN(width=width, batchnorm=batchnorm)
        self._train_set: ShapesDataset | None = None
        self._val_set: ShapesDataset | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if self.trainer is None or not self.trainer.max_epochs or self.trainer.max_epochs < 1:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": sched}

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if self._train_set is None:
            self._train_set = ShapesDataset(hp.train_size, size=hp.image_size, seed=hp.seed)
            self._val_set = ShapesDataset(hp.val_size, size=hp.image_size, seed=hp.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._train_set, batch_size=self.hparams.batch_size, shuffle=True,
                          num_workers=self.hparams.num_workers, drop_last=True)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._val_set, batch_size=256, num_workers=self.hparams.num_workers)
