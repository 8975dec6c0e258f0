"""Which convolution feeds each activation site, names users think in, and sites first seen in
training_step (issue #9, bugs 6-8). Each test failed before the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_vis.callbacks import DeadNeuronMonitor, FilterGrid
from lightning_vis.sites import find_activation_sites
from tests.helpers import pl, read_events, trainer


def _feeds(model, size=64):
    return {s.name: s.conv for s in find_activation_sites(model, torch.randn(2, 3, size, size))}


def test_resnet18_downsampling_block_sites_are_fed_by_the_residual_branch():  # bug 7
    feeds = _feeds(torchvision.models.resnet18(weights=None))
    assert feeds["relu"] == "conv1"
    for block in ("layer2.0", "layer3.0", "layer4.0", "layer1.1"):
        assert feeds[f"{block}.relu#0"] == f"{block}.conv1"
        assert feeds[f"{block}.relu#1"] == f"{block}.conv2"  # not the shortcut's downsample.0
    assert not any(conv and "downsample" in conv for conv in feeds.values())


@pytest.mark.slow
def test_densenet121_and_mobilenet_v3_small_sites():
    feeds = _feeds(torchvision.models.densenet121(weights=None))
    assert feeds["features.relu0"] == "features.conv0"
    # relu2 follows norm2(conv1); relu1 follows a concatenation of earlier layers: no single conv
    assert feeds["features.denseblock2.denselayer3.relu2"] == "features.denseblock2.denselayer3.conv1"
    assert feeds["features.denseblock2.denselayer3.relu1"] is None
    assert feeds["features.transition1.relu"] is None
    feeds = _feeds(torchvision.models.mobilenet_v3_small(weights=None))
    assert feeds["features.0.2"] == "features.0.0"
    assert feeds["features.4.block.1.2"] == "features.4.block.1.0"  # depthwise conv -> BN -> Hardswish
    assert feeds["features.4.block.2.activation"] == "features.4.block.2.fc1"  # squeeze-excitation
    assert feeds["features.4.block.2.scale_activation"] == "features.4.block.2.fc2"


class _Residual(nn.Module):
    """A downsampling residual block whose shortcut runs after the branch, like torchvision's."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), nn.BatchNorm2d(8))
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn2.bias[[1, 6]] = -1e4  # planted: dead after the residual add

    def forward(self, x):
        x = F.relu(self.stem(x))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.down(x)
        return self.fc(self.relu(out).mean(dim=(2, 3)))


class _Module(pl().LightningModule):
    def __init__(self, net, head=None):
        super().__init__()
        self.net, self.head = net, head
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(48, 3, 16, 16, generator=g), torch.randint(0, 4, (48,), generator=g)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        if self.head is not None:
            out = self.head(out[:, :, None, None]).flatten(1)
        return F.cross_entropy(out[:, :4], y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


def test_dead_filters_are_framed_on_the_residual_branch_conv(tmp_path):  # bug 7 end to end
    monitor = DeadNeuronMonitor(every_n_steps=1, window=3)
    grid = FilterGrid(layer="net.conv2", every_n_steps=100)
    trainer(tmp_path, callbacks=[monitor, grid]).fit(_Module(_Residual()))
    assert monitor.dead_channels["net.relu#1"] == [1, 6]
    assert monitor.dead_filters("net.conv2") == [1, 6]
    assert monitor.dead_filters("net.down.0") == []


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        with torch.no_grad():
            self.conv1.bias[:4] = -1e4  # 4 of 6 dead: an alert

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return x.mean(dim=(2, 3))


def test_sites_are_chosen_and_shown_by_the_convolution_that_feeds_them(tmp_path):  # bug 8
    monitor = DeadNeuronMonitor(layers=["net.conv1"], every_n_steps=1, window=3)
    with pytest.warns(UserWarning, match=r"site 'net.conv1 → net#0' are dead"):
        trainer(tmp_path, callbacks=[monitor]).fit(_Module(_Functional()))
    assert monitor.sites == ["net#0"] and monitor.dead_channels["net#0"] == [0, 1, 2, 3]
    assert any(t.startswith("dead/alert") for t in read_events(tmp_path).Tags()["tensors"])


def test_an_unknown_name_lists_sites_with_their_convolutions(tmp_path):
    monitor = DeadNeuronMonitor(layers=["conv9"], every_n_steps=1, window=3)
    with pytest.raises(ValueError, match=r"'conv9' names no activation site.*'net.conv1 → net#0', 'net.conv2 → net#1'"):
        trainer(tmp_path, callbacks=[monitor]).fit(_Module(_Functional()))


def test_sites_first_seen_in_training_step_are_watched(tmp_path):  # bug 6
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
    with torch.no_grad():
        head[0].weight.abs_()  # positive weights on positive (pooled ReLU) inputs: alive ...
        head[0].bias.fill_(0.1)
        head[0].bias[[0, 3, 5]] = -1e4  # ... but 3 of 8 channels of the head's ReLU are dead
    monitor = DeadNeuronMonitor(every_n_steps=1, window=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks=[monitor], max_epochs=2).fit(_Module(net, head))
    assert any("first seen during training" in str(w.message) and "head.1" in str(w.message) for w in caught)
    assert monitor.sites == ["net.1", "head.1"]
    assert monitor.dead_channels["head.1"] == [0, 3, 5]
    assert monitor.dead_channels["net.1"] == []
