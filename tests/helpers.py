"""Shared test utilities: tiny real models, real Trainers, event files read back."""

from __future__ import annotations

import glob
import importlib
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

PACKAGES = ["lightning.pytorch", "pytorch_lightning"]


def pl(package: str = "lightning.pytorch") -> Any:
    return importlib.import_module(package)


class Augmented(torch.utils.data.Dataset):
    """Images with a random flip and random noise drawn from the global torch RNG per item:
    anything that reads the dataset without restoring the RNG shifts the whole run."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x + 0.05 * torch.randn_like(x), self.y[i]


def make_module(net: nn.Module, package: str = "lightning.pytorch", *, n: int = 64, size: int = 16,
                channels: int = 3, classes: int = 4, batch_size: int = 16, lr: float = 0.05,
                seed: int = 0, augment: bool = False) -> Any:  # fmt: skip
    """A LightningModule around ``net`` with generated data (train and val).

    ``augment=True``: both datasets draw a random flip and noise per item (:class:`Augmented`).
    """
    dataset = Augmented if augment else TensorDataset
    base = pl(package).LightningModule

    class Tiny(base):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, channels, size, size, generator=g)
            self.y = torch.randint(0, classes, (n,), generator=g)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val/loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

        def train_dataloader(self):
            return DataLoader(dataset(self.x, self.y), batch_size=batch_size, shuffle=True)

        def val_dataloader(self):
            return DataLoader(dataset(self.x[:batch_size], self.y[:batch_size]), batch_size=batch_size)

    return Tiny()


def small_cnn(in_channels: int = 3, classes: int = 4, width: int = 8, dropout: float = 0.0) -> nn.Module:
    layers = [
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    ]  # fmt: skip
    if dropout:
        layers.insert(-1, nn.Dropout(dropout))
    return nn.Sequential(*layers)


def trainer(tmp_path, package: str = "lightning.pytorch", *, callbacks=(), logger: Any = "tb",
            **kwargs: Any) -> Any:  # fmt: skip
    """A small deterministic CPU Trainer logging to TensorBoard under ``tmp_path``."""
    lib = pl(package)
    if logger == "tb":
        logger = lib.loggers.TensorBoardLogger(str(tmp_path), name="run")
    options = dict(
        max_epochs=1, accelerator="cpu", devices=1, deterministic=True, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        num_sanity_val_steps=0,
    )  # fmt: skip
    options.update(kwargs)
    return lib.Trainer(logger=logger, callbacks=list(callbacks), default_root_dir=str(tmp_path), **options)


def read_events(logdir: str) -> Any:
    """TensorBoard's own reader over the single event file under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(str(logdir), "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no event file under {logdir}"
    acc = EventAccumulator(os.path.dirname(files[0]), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def fit_weights(tmp_path, make_net, callbacks=(), *, seed: int = 0, package: str = "lightning.pytorch",
                augment: bool = False, **kwargs: Any) -> dict[str, torch.Tensor]:  # fmt: skip
    """Seeded deterministic training; the final state_dict (``augment``: see :func:`make_module`)."""
    lib = pl(package)
    lib.seed_everything(seed, workers=True, verbose=False)
    module = make_module(make_net(), package, seed=seed, augment=augment)
    t = trainer(tmp_path, package, callbacks=callbacks, **kwargs)
    t.fit(module)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different}"
