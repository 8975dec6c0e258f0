"""All four callbacks under DDP with 2 CPU processes (gloo). Run by tests/test_production.py.

    python tests/ddp_script.py STRATEGY LOGDIR PACKAGE

Every rank writes ``rank<R>.json`` (its probes' checksums, the monitor's decisions) into
LOGDIR; only rank 0 may write event files. Each rank trains on different data, so the
statistics must be reduced across ranks to agree.
"""

import hashlib
import importlib
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

strategy, logdir, package = sys.argv[1], sys.argv[2], sys.argv[3]
pl = importlib.import_module(package)

from lightning_vis.callbacks import DeadNeuronMonitor, DeconvProjection, FeatureEvolution, FilterGrid  # noqa: E402


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
        )  # fmt: skip
        with torch.no_grad():
            self.net[1].bias[5] = -1e4  # channel 5 of the first site is dead on every rank

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=8)


def digest(t):
    return None if t is None else hashlib.sha1(t.detach().cpu().float().numpy().tobytes()).hexdigest()


class Report(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        deconv, monitor, evolution = (next(c for c in trainer.callbacks if isinstance(c, k))
                                      for k in (DeconvProjection, DeadNeuronMonitor, FeatureEvolution))  # fmt: skip
        report = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "deconv_probe": digest(deconv.probe_images),
            "evolution_probe": digest(evolution.probe_images),
            "dead": monitor.dead_channels,
        }
        with open(os.path.join(logdir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    callbacks = [
        FilterGrid(every_n_steps=1),
        DeconvProjection(top_k=2, every_n_epochs=1),
        DeadNeuronMonitor(every_n_steps=1, window=2),
        FeatureEvolution(top_k=2, num_probe=8),
        Report(),
    ]
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=2, max_epochs=2, limit_train_batches=4,
        logger=pl.loggers.TensorBoardLogger(logdir, name="ddp"), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        log_every_n_steps=1, deterministic=True,
    )  # fmt: skip
    trainer.fit(Net())
