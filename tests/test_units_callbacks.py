"""``TopActivations`` and ``FeatureMaps``: real ``Trainer.fit`` runs (both Lightning packages),
TensorBoard read back, results equal to the pure functions, bit-identical training, DDP merge."""

from __future__ import annotations

import threading
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_vis.callbacks import FeatureMaps, TopActivations
from lightning_vis.units import TopActivationCollector, receptive_field, top_activations, top_feature_maps
from tests.helpers import PACKAGES, pl, read_events


class Flipped(Dataset):
    """Random horizontal flips drawn from the global RNG: RNG restoration matters."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), self.y[i]


def make_module(package, *, fail_validation=False, upsample=False):
    lib = pl(package)

    class Net(lib.LightningModule):
        def __init__(self):
            super().__init__()
            layers = [nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 10, 3, stride=2, padding=1), nn.ReLU()]  # fmt: skip
            if upsample:
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear"))
                layers.append(nn.Conv2d(10, 10, 1))
            self.net = nn.Sequential(*layers)
            self.drop = nn.Dropout(0.3)
            self.head = nn.Linear(10, 3)

        def forward(self, x):
            return self.head(self.drop(self.net(x).mean((2, 3))))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            if fail_validation and batch_idx == 1:
                raise RuntimeError("boom")
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            return DataLoader(Flipped(torch.randn(24, 3, 12, 12, generator=g), torch.randint(0, 3, (24,), generator=g)),
                              batch_size=8, shuffle=True)  # fmt: skip

        def val_dataloader(self):
            return DataLoader(TensorDataset(*val_data()), batch_size=7)

    return Net()


def val_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(20, 3, 12, 12, generator=g), torch.randint(0, 3, (20,), generator=g)


def fit(package, tmp_path, callbacks, *, epochs=2, logger="tb", seed=0, **module_kwargs):
    lib = pl(package)
    lib.seed_everything(seed, workers=True, verbose=False)
    model = make_module(package, **module_kwargs)
    if logger == "tb":
        logger = lib.loggers.TensorBoardLogger(str(tmp_path), name="run")
    trainer = lib.Trainer(
        max_epochs=epochs, limit_train_batches=3, log_every_n_steps=1, num_sanity_val_steps=2, logger=logger,
        callbacks=callbacks, accelerator="cpu", deterministic=True, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        trainer.fit(model)
    return trainer, model


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("package", PACKAGES)
def test_fit_logs_grids_equal_to_the_pure_functions(package, tmp_path):
    top = TopActivations(top_k=4, units=5)
    maps = FeatureMaps(top_n=4, num_probe=3)
    trainer, model = fit(package, tmp_path, [top, maps])
    assert top.layer_names == maps.layer_names == ["net.0", "net.4", "net.6"]
    acc = read_events(tmp_path)
    tags = sorted(t for t in acc.Tags()["images"] if t.startswith(("top_activations/", "feature_maps/")))
    assert tags == sorted([f"{kind}/{layer}" for kind in ("top_activations", "feature_maps")
                           for layer in ("net.0", "net.4", "net.6")])  # fmt: skip
    for tag in tags:
        events = acc.Images(tag)
        assert [e.step for e in events] == [3, 6]  # after each epoch's validation, no sanity-check run
        from PIL import Image
        import io

        pixels = torch.tensor(__import__("numpy").array(Image.open(io.BytesIO(events[-1].encoded_image_string))))
        assert 100 < events[-1].width < 700 and 100 < events[-1].height < 700
        assert pixels.float().std() > 10  # not a blank picture
    assert "receptive field" in acc.SummaryMetadata("top_activations/net.4").summary_description
    # the last validation ran on the final weights: the callback's top-k is the pure function's
    images, _ = val_data()
    for layer, result in top.results.items():
        oracle = top_activations(model, [images[:7], images[7:14], images[14:]], layer, top_k=4, max_patch=48)
        rows = result.channels
        assert result.count == 20 and result.values.shape == (5, 4)
        torch.testing.assert_close(result.values, oracle.values[rows])
        assert torch.equal(result.image_index, oracle.image_index[rows])
        assert torch.equal(result.locations, oracle.locations[rows])
        torch.testing.assert_close(result.patches, oracle.patches[rows])
        means = oracle.values.mean(1)
        assert means[rows].tolist() == sorted(means.tolist(), reverse=True)[:5]  # the most active units
    probe = maps.probe_images
    assert torch.equal(probe, images[:3])
    expected = top_feature_maps(model, probe, "net.4", top_n=4)
    assert expected.channels.shape == (3, 4)
    assert no_hooks(model) and torch._C._len_torch_function_stack() == 0


@pytest.mark.slow
@pytest.mark.parametrize("package", PACKAGES)
def test_training_is_bit_identical(package, tmp_path):
    _, plain = fit(package, tmp_path / "a", [])
    _, watched = fit(package, tmp_path / "b", [TopActivations(top_k=3), FeatureMaps(top_n=3)])
    ref, got = plain.state_dict(), watched.state_dict()
    assert ref.keys() == got.keys()
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []


def test_explicit_channels_and_cadence(tmp_path):
    top = TopActivations(layers="net.[46]", channels=[7, 1], top_k=3, every_n_epochs=2)
    fit(PACKAGES[0], tmp_path, [top], epochs=3)
    assert top.layer_names == ["net.4", "net.6"]
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images("top_activations/net.6")] == [6]  # epoch 2 only
    assert top.results["net.6"].channels.tolist() == [7, 1]


def test_state_round_trip_and_keys():
    a = TopActivations(layers=["net.0"], top_k=3)
    a._last_step, a._layer_names = 12, ["net.0"]
    b = TopActivations(layers=["net.0"], top_k=3)
    b.load_state_dict(a.state_dict())
    assert b._last_step == 12 and b.layer_names == ["net.0"]
    assert a.state_key != TopActivations(layers=["net.4"]).state_key
    f = FeatureMaps(top_n=3)
    f._last_step, f._probe, f._layer_names = 5, torch.ones(2, 3, 4, 4), ["net.4"]
    g = FeatureMaps(top_n=3)
    g.load_state_dict(f.state_dict())
    assert g._last_step == 5 and torch.equal(g.probe_images, f._probe) and g.layer_names == ["net.4"]
    assert f.state_key != FeatureMaps(top_n=4).state_key


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k=0"):
        TopActivations(top_k=0)
    with pytest.raises(ValueError, match="channels=\\[-1\\]"):
        TopActivations(channels=[-1])
    with pytest.raises(ValueError, match="every_n_epochs=0"):
        TopActivations(every_n_epochs=0)
    with pytest.raises(ValueError, match="units=0"):
        TopActivations(units=0)
    with pytest.raises(ValueError, match="top_n=0"):
        FeatureMaps(top_n=0)
    with pytest.raises(ValueError, match="probe must have shape"):
        FeatureMaps(probe=torch.zeros(3, 4))


class StepCounter(pl("lightning.pytorch").Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


@pytest.mark.parametrize(
    "callback, match, kwargs",
    [
        (lambda: TopActivations(layers=["net.9"]), "No module 'net.9'.*convolutions are: 'net.0', 'net.4'", {}),
        (lambda: TopActivations(channels=[9]), r"layer 'net.0'.*channels \[9\] out of range", {}),
        (lambda: TopActivations(layers=["net.9"]), "no fixed receptive field.*interpolate", {"upsample": True}),
        (lambda: FeatureMaps(top_n=7), "top_n=7: layer 'net.0' has 6 channels", {}),
        (lambda: FeatureMaps(probe=torch.zeros(2, 5, 12, 12)), r"probe of shape \(2, 5, 12, 12\) does not fit", {}),
    ],
)
def test_bad_input_fails_before_the_first_step(tmp_path, callback, match, kwargs):
    counter = StepCounter()
    with pytest.raises(ValueError, match=match):
        fit("lightning.pytorch", tmp_path, [callback(), counter], **kwargs)
    assert counter.steps == 0


def test_hooks_removed_after_an_exception_in_validation(tmp_path):
    top = TopActivations(top_k=2)
    lib = pl("lightning.pytorch")
    model = make_module("lightning.pytorch", fail_validation=True)
    trainer = lib.Trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, logger=False,
                          callbacks=[top], enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model)
    assert no_hooks(model) and top._handles == []


def test_csv_logger_warns_once_and_runs(tmp_path):
    lib = pl("lightning.pytorch")
    with pytest.warns(UserWarning, match="no TensorBoardLogger") as record:
        fit("lightning.pytorch", tmp_path, [TopActivations(top_k=2), FeatureMaps(top_n=2)],
            logger=lib.loggers.CSVLogger(str(tmp_path)))  # fmt: skip
    assert sum("no TensorBoardLogger" in str(w.message) for w in record) == 1


# ============================================================================ DDP merge, simulated
class _Strategy:
    """Two ranks in two threads: ``all_gather`` stacks what every rank contributes to the same call."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world)
        self.slots: dict[int, dict[int, torch.Tensor]] = {}
        self.calls = [0] * world
        self.root_device = torch.device("cpu")

    def for_rank(self, rank: int):
        def all_gather(t):
            call = self.calls[rank]
            self.calls[rank] += 1
            self.slots.setdefault(call, {})[rank] = t.clone()
            self.barrier.wait()
            out = torch.stack([self.slots[call][r] for r in sorted(self.slots[call])])
            self.barrier.wait()
            return out

        return SimpleNamespace(all_gather=all_gather, root_device=self.root_device)


def test_merge_across_ranks_equals_one_process():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(5, 6, 3))
    images = torch.randn(19, 2, 14, 14)
    field = receptive_field(net, "3", (2, 14, 14))
    whole = top_activations(net, [images], "3", top_k=4)
    strategy = _Strategy(2)
    results = [None, None]

    def rank(r):
        cb = TopActivations(top_k=4, units=3)
        cb._fields, cb._in_channels = {"3": field}, 2
        collector = TopActivationCollector(6, 4, field, max_patch=cb.max_patch)
        mine = torch.arange(r, 19, 2)  # as DistributedSampler deals them
        with torch.no_grad():
            for chunk in mine.split(3):
                act = net[:4](images[chunk])
                collector.update(act, images[chunk], chunk)
        trainer = SimpleNamespace(world_size=2, strategy=strategy.for_rank(r))
        results[r] = cb._merge_ranks(trainer, collector, "3")

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    a, b = results
    rows = a.channels
    assert torch.equal(a.values, b.values) and torch.equal(a.patches, b.patches)  # every rank agrees
    torch.testing.assert_close(a.values, whole.values[rows])
    assert torch.equal(a.image_index, whole.image_index[rows])
    assert torch.equal(a.locations, whole.locations[rows])
    torch.testing.assert_close(a.patches, whole.patches[rows])
    assert a.count == 19
