"""One probe policy for every callback (issue #9, bugs 1-5): each test failed before it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_vis.callbacks import DeadNeuronMonitor, DeconvProjection, FeatureEvolution, FilterGrid
from lightning_vis.callbacks._base import ProbeBatch, _VisMonitor, class_names, find_labels, spread, to_model
from tests.helpers import make_module, pl, read_events, small_cnn, trainer


def _all_four(**evolution):
    return [
        FilterGrid(every_n_steps=2),
        DeconvProjection(top_k=2, num_probe=2),
        DeadNeuronMonitor(every_n_steps=1, window=2),
        FeatureEvolution(num_probe=8, top_k=2, **evolution),
    ]


def _images(acc, prefix):
    return {t: acc.Images(t) for t in acc.Tags()["images"] if t.startswith(prefix)}


def _assert_all_logged(tmp_path):
    acc = read_events(tmp_path)
    for prefix in ("filters/", "deconv/", "evolution/"):
        assert _images(acc, prefix), f"nothing logged under {prefix}"
    assert any(t.startswith("dead/") for t in acc.Tags()["scalars"])


def test_spread_one_layer_is_the_deepest_and_zero_is_refused():
    assert spread(["a", "b", "c"], 1) == ["c"]
    with pytest.raises(ValueError, match="k=0. Must be >= 1"):
        spread(["a"], 0)


def test_feature_evolution_max_layers_one(tmp_path):  # bug 1: ZeroDivisionError
    cb = FeatureEvolution(max_layers=1, num_probe=8, top_k=2)
    trainer(tmp_path, callbacks=[cb]).fit(make_module(small_cnn()))
    assert cb.layers == ["net.4"]
    assert list(_images(read_events(tmp_path), "evolution/")) == ["evolution/net.4"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision(tmp_path, precision):  # bug 2: probes not cast to the model's dtype
    if precision == "16-true":  # fp16 convolutions on the CPU are not implemented everywhere
        try:
            nn.Conv2d(3, 2, 3).half()(torch.zeros(1, 3, 4, 4, dtype=torch.half))
        except RuntimeError as err:
            pytest.skip(f"fp16 convolution not available on this CPU build: {err}")
    module = make_module(small_cnn(), n=32, batch_size=8)
    trainer(tmp_path, callbacks=_all_four(), precision=precision, max_epochs=2).fit(module)
    _assert_all_logged(tmp_path)
    grid = next(iter(_images(read_events(tmp_path), "filters/").values()))[-1]
    assert grid.width > 8 and grid.height > 8


class _TwoArgs(pl().LightningModule):
    """``forward(x, scale)``: the probe must reuse the training batch's call (bug 3)."""

    def __init__(self):
        super().__init__()
        self.net = small_cnn()
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 4, (32,), generator=g)

    def forward(self, x, scale):
        return self.net(x * scale)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x, 0.5), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)


def test_forward_with_an_extra_argument(tmp_path):  # bug 3: FilterGrid TypeError at train start
    callbacks = _all_four()
    with pytest.warns(UserWarning, match="does not take a bare image tensor"):
        trainer(tmp_path, callbacks=callbacks, max_epochs=2).fit(_TwoArgs())
    assert callbacks[0].layer_name == "net.0"
    assert callbacks[1].layer_names and callbacks[3].layers
    _assert_all_logged(tmp_path)


class _Stream(IterableDataset):
    """A streaming dataset that defines ``__len__`` (bug 4: indexing raised NotImplementedError)."""

    def __init__(self, n=32):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __iter__(self):
        return iter(zip(self.x, self.y))


def test_iterable_dataset_with_len(tmp_path):
    module = make_module(small_cnn())
    module.train_dataloader = lambda: DataLoader(_Stream(), batch_size=8)
    module.val_dataloader = lambda: DataLoader(_Stream(16), batch_size=8)
    callbacks = _all_four()
    trainer(tmp_path, callbacks=callbacks, max_epochs=2).fit(module)
    assert torch.equal(callbacks[1].probe_images, _Stream(16).x[:2])
    _assert_all_logged(tmp_path)


class _Gray(nn.Module):
    """1-channel data expanded to the 3 channels the network expects (bug 5)."""

    def __init__(self):
        super().__init__()
        self.net = small_cnn(in_channels=3)

    def forward(self, x):
        return self.net(x.expand(-1, 3, -1, -1))


def test_one_channel_data_expanded_in_forward(tmp_path):
    module = make_module(_Gray(), channels=1)
    probe = torch.randn(2, 1, 16, 16)
    cb = DeconvProjection(probe=probe, top_k=2)
    trainer(tmp_path, callbacks=[cb, DeconvProjection(top_k=2, layers="net.net.4")]).fit(module)
    assert _images(read_events(tmp_path), "deconv/")


def test_a_probe_that_does_not_fit_names_shape_and_model(tmp_path):
    cb = DeconvProjection(probe=torch.randn(2, 5, 16, 16))
    with pytest.raises(ValueError, match=r"DeconvProjection: probe of shape \(2, 5, 16, 16\) does not fit Tiny"):
        trainer(tmp_path, callbacks=[cb]).fit(make_module(small_cnn()))


def test_probe_batch_has_labels_and_class_names(tmp_path):
    module = make_module(small_cnn())
    module.classes = ["a", "b", "c", "d"]
    t = trainer(tmp_path, max_steps=1)
    seen = {}

    class Peek(_VisMonitor):
        def on_train_start(self, trainer, pl_module):
            seen["probe"] = self._take_probe(trainer, pl_module, None, 5)
            seen["names"] = class_names(trainer, pl_module)

    t.callbacks.append(Peek())
    t.fit(module)
    probe = seen["probe"]
    assert isinstance(probe, ProbeBatch)
    assert torch.equal(probe.images, module.x[:5]) and torch.equal(probe.labels, module.y[:5])
    assert seen["names"] == ["a", "b", "c", "d"]


def test_find_labels_and_to_model():
    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([2, 0, 1])
    assert torch.equal(find_labels({"image": x, "target": y}), y)
    assert find_labels((x, torch.rand(3))) is None
    assert find_labels((x, y), n=4) is None
    net = nn.Conv2d(1, 1, 1).to(torch.bfloat16)
    assert to_model(net, x).dtype == torch.bfloat16


def test_fast_dev_run_does_not_warn_about_a_missing_tensorboard_logger(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks=_all_four(), fast_dev_run=True).fit(make_module(small_cnn()))
    assert not [w for w in caught if "TensorBoardLogger" in str(w.message) or "DummyLogger" in str(w.message)]
