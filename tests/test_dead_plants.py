"""Plants harder than a -1e4 bias (issue #9): a channel dead only *on the data* (it fires for
other inputs), and a rare-but-alive channel (fires on ~1% of images) that must never be
called dead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_vis.callbacks import DeadNeuronMonitor
from tests.helpers import PACKAGES, pl, trainer

N, SIZE, MARKED = 512, 12, 5  # 5 of 512 images (~1%) carry a bright marker pixel


def planted_net() -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )  # fmt: skip
    conv = net[0]
    with torch.no_grad():
        # channel 0: 0.4 - mean(patch). The data lies in [0.5, 1] (plus rare markers): never fires on it,
        # but any darker input (a black image) makes it fire: dead on the data, not dead by construction.
        conv.weight[0] = -1.0 / 27
        conv.bias[0] = 0.4
        # channel 1: fires only where the red centre tap sees the marker (> 2): rare but alive
        conv.weight[1] = 0.0
        conv.weight[1, 0, 1, 1] = 1.0
        conv.bias[1] = -2.0
        # channels 2, 3: ordinary positive detectors, alive everywhere
        conv.weight[2:].abs_()
        conv.bias[2:] = 0.0
    return net


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = 0.5 + 0.5 * torch.rand(N, 3, SIZE, SIZE, generator=g)
    marked = torch.randperm(N, generator=g)[:MARKED]
    x[marked, 0, SIZE // 2, SIZE // 2] = 5.0
    return TensorDataset(x, torch.randint(0, 2, (N,), generator=g))


def frozen(package: str = "lightning.pytorch"):
    """lr = 0: the plants stay as planted while the monitor watches real training batches."""

    class Frozen(pl(package).LightningModule):
        def __init__(self):
            super().__init__()
            self.net = planted_net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self):
            return DataLoader(data(), batch_size=64, shuffle=True)

    return Frozen()


def test_the_plants_are_what_they_claim():
    net, x = planted_net(), data().tensors[0]
    with torch.no_grad():
        pre = net[0](x)
        assert (pre[:, 0] <= 0).all()  # never on the data ...
        assert (net[0](torch.zeros(1, 3, SIZE, SIZE))[:, 0] > 0).all()  # ... but on a dark image
        fires = (pre[:, 1] > 0).flatten(1).any(1)
        assert int(fires.sum()) == MARKED  # ~1% of the images
        assert (pre[:, 2:] > 0).flatten(2).any(2).all()


@pytest.mark.parametrize("package", PACKAGES)
def test_dead_on_the_data_is_found_and_rare_but_alive_is_never_dead(tmp_path, package):
    # one window = one epoch = 8 batches of 64 = every image once, so every window sees the 5 markers
    monitor = DeadNeuronMonitor(every_n_steps=1, window=8, alert_fraction=0.5)
    trainer(tmp_path, package, callbacks=[monitor], max_epochs=3).fit(frozen(package))
    assert monitor.windows_completed == 3
    assert monitor.dead_channels == {"net.1": [0]}
    assert monitor.dying_channels["net.1"] == [1]  # fires on 5/512 < 1% of samples: dying, not dead
    rate = monitor.activity["net.1"]
    assert rate[0] == 0 and 0 < rate[1] < 0.02 and (rate[2:] > 0.99).all()
