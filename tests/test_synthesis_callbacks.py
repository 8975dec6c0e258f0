"""``ActivationMaximization`` / ``FeatureInversion``: real Trainers, event files read back, bit-identical training."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lightning_vis.callbacks import ActivationMaximization, FeatureInversion
from tests.helpers import PACKAGES, assert_bit_identical, pl, read_events, trainer

FAST_AM = dict(steps=4, num_units=2, every_n_epochs=1)
FAST_INV = dict(steps=4, num_probe=2, every_n_epochs=1)


class _Flipped(Dataset):
    """Random horizontal flips drawn from the global RNG: RNG restoration matters."""

    def __init__(self, n: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 12, 12, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), self.y[i]


def make_module(package: str = "lightning.pytorch", fail_at: int | None = None):
    class Tiny(pl(package).LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
            )  # fmt: skip
            self.drop = nn.Dropout(0.3)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.drop(self.net(x).mean((2, 3))))

        def training_step(self, batch, batch_idx):
            if fail_at is not None and self.global_step == fail_at:
                raise RuntimeError("planned failure")
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self):
            return DataLoader(_Flipped(32, 0), batch_size=8, shuffle=True)

        def val_dataloader(self):
            return DataLoader(_Flipped(16, 1), batch_size=8)

    return Tiny()


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


@pytest.mark.parametrize("package", PACKAGES)
def test_fit_logs_panels_strips_and_scalars(tmp_path, package):
    am = ActivationMaximization(layers="net.*", **FAST_AM)
    inv = FeatureInversion(layers=["net.0", "net.4"], **FAST_INV)
    module = make_module(package)
    t = trainer(tmp_path, package, callbacks=[am, inv], max_epochs=2)
    t.fit(module)
    acc = read_events(tmp_path)
    tags = set(acc.Tags()["images"])
    for layer in ("net.0", "net.4"):
        assert f"maximization/{layer}" in tags and f"inversion/{layer}" in tags
        assert f"maximization/{layer}/evolution" in tags and f"inversion/{layer}/evolution" in tags
        for tag in (f"maximization/{layer}", f"inversion/{layer}"):
            events = acc.Images(tag)
            assert [e.step for e in events] == [4, 8]  # end of epochs 1 and 2
            img = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)))
            assert img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 64 and img.std() > 5
        scalars = set(acc.Tags()["scalars"])
        assert f"maximization/{layer}/activation" in scalars and f"inversion/{layer}/feature_error" in scalars
    assert set(am.units) == {"net.0", "net.4"} and all(len(u) == 2 for u in am.units.values())
    assert _hooks(module) == 0


def test_defaults_pick_layers_and_units(tmp_path):
    am = ActivationMaximization(every_n_epochs=1, steps=3)
    inv = FeatureInversion(every_n_epochs=1, steps=3)
    t = trainer(tmp_path, callbacks=[am, inv], max_epochs=1)
    t.fit(make_module())
    assert am.layer_names == ["net.4"]  # the last convolution
    assert inv.layer_names == ["net.0", "net.4"]  # first and middle (of two)
    assert len(am.units["net.4"]) == 6 and inv.probe_images.shape == (4, 3, 12, 12)
    tags = set(read_events(tmp_path).Tags()["images"])
    assert {"maximization/net.4", "inversion/net.0", "inversion/net.4"} <= tags


def test_training_is_bit_identical_with_the_callbacks(tmp_path):
    def fit(callbacks, sub):
        pl().seed_everything(0, workers=True, verbose=False)
        module = make_module()
        trainer(tmp_path / sub, callbacks=callbacks, max_epochs=2).fit(module)
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    plain = fit([], "plain")
    watched = fit([ActivationMaximization(**FAST_AM), FeatureInversion(**FAST_INV)], "watched")
    assert_bit_identical(plain, watched)


def test_state_round_trip_and_distinct_keys(tmp_path):
    am = ActivationMaximization(layers="net.4", **FAST_AM)
    inv = FeatureInversion(layers="net.0", **FAST_INV)
    trainer(tmp_path, callbacks=[am, inv], max_epochs=2).fit(make_module())
    for cb, cls, kwargs in ((am, ActivationMaximization, dict(layers="net.4", **FAST_AM)),
                            (inv, FeatureInversion, dict(layers="net.0", **FAST_INV))):  # fmt: skip
        state = cb.state_dict()
        fresh = cls(**kwargs)
        fresh.load_state_dict(state)
        assert fresh.layer_names == cb.layer_names and fresh._last_step == cb._last_step
        assert [lbl for lbl, _ in fresh._history[cb.layer_names[0]]] == ["ep 1", "ep 2"]
    restored = ActivationMaximization(layers="net.4", **FAST_AM)
    restored.load_state_dict(am.state_dict())
    assert restored.units == am.units
    keys = {ActivationMaximization(layers="a").state_key, ActivationMaximization(layers="b").state_key,
            ActivationMaximization(channels=[1]).state_key, FeatureInversion(layers="a").state_key,
            FeatureInversion(steps=9).state_key}  # fmt: skip
    assert len(keys) == 5


def test_bad_arguments_fail_in_init():
    with pytest.raises(ValueError, match="every_n_epochs=0"):
        ActivationMaximization(every_n_epochs=0)
    with pytest.raises(ValueError, match="objective='max'"):
        ActivationMaximization(objective="max")
    with pytest.raises(ValueError, match="channels=\\[-1\\]"):
        ActivationMaximization(channels=[-1])
    with pytest.raises(ValueError, match="Invalid value for size"):
        ActivationMaximization(size=1)
    with pytest.raises(ValueError, match="lambda_tv=-1"):
        FeatureInversion(lambda_tv=-1)
    with pytest.raises(ValueError, match="lambda_tv_start=0"):
        FeatureInversion(lambda_tv_start=0)
    with pytest.raises(ValueError, match="steps=0"):
        FeatureInversion(steps=0)


@pytest.mark.parametrize(
    "callback, match",
    [
        (lambda: ActivationMaximization(layers="net.9", **FAST_AM), "net.9"),
        (lambda: ActivationMaximization(layers="net.4", channels=[8], **FAST_AM), "channels=\\[8\\].*0..7"),
        (lambda: FeatureInversion(layers="nope*", **FAST_INV), "nope"),
        (lambda: FeatureInversion(probe=torch.rand(2, 5, 12, 12), **FAST_INV), "probe"),
    ],
)
def test_bad_input_fails_before_the_first_step(tmp_path, callback, match):
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, callbacks=[callback()], max_epochs=1).fit(module)
    assert_bit_identical(before, module.state_dict())  # no training step ran
    assert _hooks(module) == 0


def test_hooks_removed_after_an_exception(tmp_path):
    module = make_module(fail_at=5)
    cbs = [ActivationMaximization(**FAST_AM), FeatureInversion(**FAST_INV)]
    with pytest.raises(RuntimeError, match="planned failure"):
        trainer(tmp_path, callbacks=cbs, max_epochs=3).fit(module)
    assert _hooks(module) == 0


def test_csv_logger_only_warns_once_and_gets_scalars(tmp_path):
    lib = pl()
    logger = lib.loggers.CSVLogger(str(tmp_path), name="csv")
    cbs = [ActivationMaximization(layers="net.4", **FAST_AM), FeatureInversion(layers="net.4", **FAST_INV)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks=cbs, logger=logger, max_epochs=1).fit(make_module())
    ours = [w for w in caught if "TensorBoardLogger" in str(w.message)]
    assert len(ours) == 1
    import csv
    import glob

    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "csv" / "**" / "metrics.csv"), recursive=True)[0])))
    assert any(r.get("maximization/net.4/activation") for r in rows)
    assert any(r.get("inversion/net.4/feature_error") for r in rows)


def test_only_rank_zero_optimises(tmp_path, monkeypatch):
    """Under DDP the other ranks compute nothing (and call no collective)."""
    import lightning_vis.callbacks.synthesis as mod

    calls = []
    monkeypatch.setattr(mod, "maximize", lambda *a, **k: calls.append("max"))
    monkeypatch.setattr(mod, "invert", lambda *a, **k: calls.append("inv"))
    am, inv = ActivationMaximization(**FAST_AM), FeatureInversion(**FAST_INV)
    for cb in (am, inv):
        cb._ready = True
        cb._layer_names = ["net.0"]

    class FakeTrainer:
        is_global_zero = False
        sanity_checking = False
        current_epoch = 0
        global_step = 4
        loggers = [object()]

    for cb in (am, inv):
        cb.on_train_epoch_end(FakeTrainer(), make_module())
    assert calls == [] and am._last_step == 4
