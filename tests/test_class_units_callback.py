"""``ClassUnitStatistics``: real ``Trainer.fit`` runs in both Lightning packages, events read back, invariants."""

from __future__ import annotations

import csv
import glob
import importlib
import io
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_vis.callbacks import ClassUnitStatistics
from lightning_vis.class_stats import (
    ablation_accuracy,
    channel_means,
    channel_order,
    class_means,
    collect_class_stats,
    sparsity,
)
from tests.helpers import read_events

PACKAGES = []
for _name in ("lightning.pytorch", "pytorch_lightning"):
    try:
        PACKAGES.append(importlib.import_module(_name))
    except ImportError:  # pragma: no cover
        pass
IDS = [p.__name__ for p in PACKAGES]
CLASSES = ["red", "green", "blue"]


class Blobs(Dataset):
    """Three classes (which colour channel is bright), with a random flip: an augmentation that draws from the RNG."""

    classes = CLASSES

    def __init__(self, n, seed, augment=False, labels=True):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 3, 12, 12, generator=g) * 0.5
        self.x[torch.arange(n), self.y] += 1.0
        self.augment, self.labels = augment, labels

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if self.augment and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x, self.y[i]) if self.labels else x


def make_module(pl, *, labels=True, fail_at_val_batch=None, head=True):
    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            )  # fmt: skip
            self.drop = nn.Dropout(0.3)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            if not head:  # feature maps, no class scores
                return self.net(x)
            return self.head(self.drop(self.net(x).mean((2, 3))))

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self(x)
            return F.cross_entropy(out if out.ndim == 2 else out.mean((2, 3))[:, :3], y)

        def validation_step(self, batch, batch_idx):
            if fail_at_val_batch is not None and batch_idx == fail_at_val_batch:
                raise RuntimeError("planted failure")
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self(x)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self):
            return DataLoader(Blobs(48, 0, augment=True), batch_size=8, shuffle=True)

        def val_dataloader(self):
            return DataLoader(Blobs(30, 1, labels=labels), batch_size=8)

    return Tiny()


def fit(pl, tmp_path, callbacks, *, epochs=2, logger="tb", seed=0, **module_kwargs):
    pl.seed_everything(seed, workers=True, verbose=False)
    model = make_module(pl, **module_kwargs)
    if logger == "tb":
        logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    elif logger == "csv":
        logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = pl.Trainer(
        max_epochs=epochs, limit_train_batches=3, log_every_n_steps=1, num_sanity_val_steps=0, logger=logger,
        callbacks=callbacks, accelerator="cpu", deterministic=True, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model)
    return trainer, model


def no_hooks(model):
    return all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize("pl", PACKAGES, ids=IDS)
def test_fit_logs_statistics_equal_to_the_pure_functions(pl, tmp_path):
    cb = ClassUnitStatistics(top_n=3, ablate=(0.25, 0.5), ablate_batches=2)
    trainer, model = fit(pl, tmp_path, [cb])
    assert (cb.layer_name, cb.site) == ("net.4", "net.6")  # last conv -> the ReLU it feeds, past BatchNorm
    assert cb.samples == 30 and cb._names == CLASSES
    # the validation loop's own forward gives what a separate pass over the data gives, on the final weights
    val = list(model.val_dataloader())
    oracle = collect_class_stats(model, val, "net.6", 3)
    torch.testing.assert_close(cb.class_means, class_means(oracle).float())
    torch.testing.assert_close(cb.sparsity, sparsity(oracle).float())
    order = channel_order(channel_means(oracle).float())
    expected = ablation_accuracy(model, val[:2], "net.6", order, (0.25, 0.5)).accuracy  # the first 2 batches
    assert cb.accuracy == pytest.approx(expected) and list(cb.accuracy) == [0.0, 0.25, 0.5]
    assert cb.similarity.shape == (3, 3) and torch.allclose(cb.similarity.diagonal(), torch.ones(3))
    assert set(cb.specific) == {0, 1, 2} and all(len(row) == 3 for row in cb.tops.values())
    assert no_hooks(model)

    acc = read_events(trainer.logger.log_dir)
    events = acc.Images("class_units/similarity")
    assert [e.step for e in events] == [3, 6]  # each epoch's validation, at the optimizer step
    pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(events[-1].encoded_image_string))))
    assert pixels.shape[0] >= 3 * 24 and pixels.shape[1] >= 3 * 24 and pixels.float().std() > 10
    assert "Cosine similarity" in acc.SummaryMetadata("class_units/similarity").summary_description
    for tag in ("similarity_offdiag", "shared", "specific", "sparsity_mean", "accuracy@0", "accuracy@0.25",
                "accuracy@0.5"):  # fmt: skip
        assert [e.step for e in acc.Scalars(f"class_units/{tag}")] == [3, 6], tag
    assert acc.Scalars("class_units/accuracy@0.5")[-1].value == pytest.approx(cb.accuracy[0.5])
    assert acc.Scalars("class_units/shared")[-1].value == len(cb.shared)
    assert {"class_units/sparsity", "class_units/inactive"} <= set(acc.Tags()["histograms"])
    text = acc.Tensors("class_units/units/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| 0 red |" in text and "shared by every class" in text


def test_every_n_epochs_and_no_ablation(tmp_path):
    pl = PACKAGES[0]
    cb = ClassUnitStatistics(layer="net.0", top_n=2, every_n_epochs=2, ablate=())
    trainer, _ = fit(pl, tmp_path, [cb], epochs=4)
    assert (cb.layer_name, cb.site) == ("net.0", "net.2")
    assert cb.accuracy == {} and cb.class_means.shape == (3, 6)
    acc = read_events(trainer.logger.log_dir)
    assert [e.step for e in acc.Scalars("class_units/shared")] == [6, 12]
    assert not [t for t in acc.Tags()["scalars"] if "accuracy" in t]


@pytest.mark.slow
@pytest.mark.parametrize("pl", PACKAGES, ids=IDS)
def test_training_is_bit_identical(pl, tmp_path):
    """Seeded deterministic CPU run with and without the callback (BN, dropout, random flips): identical weights."""
    _, plain = fit(pl, tmp_path / "a", [])
    cb = ClassUnitStatistics(top_n=2, ablate=(0.2, 0.5, 1.0), ablate_batches=4, chunk_rows=8)
    _, watched = fit(pl, tmp_path / "b", [cb])
    assert cb.accuracy  # the ablation passes ran
    ref, got = plain.state_dict(), watched.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


def test_state_round_trip_and_state_key(tmp_path):
    pl = PACKAGES[0]
    cb = ClassUnitStatistics(top_n=3)
    fit(pl, tmp_path, [cb], epochs=1)
    state = cb.state_dict()
    other = ClassUnitStatistics(top_n=3)
    other.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert other.layer_name == "net.4" and other.site == "net.6" and other._last_step == 3
    assert torch.equal(other.class_means, cb.class_means) and torch.equal(other.similarity, cb.similarity)
    assert (other.shared, other.specific, other.accuracy) == (cb.shared, cb.specific, cb.accuracy)
    copy = pickle.loads(pickle.dumps(cb))  # picklable after a run: configuration and small results only
    assert copy.accuracy == cb.accuracy and copy._handle is None
    keys = {ClassUnitStatistics().state_key, ClassUnitStatistics(top_n=5).state_key,
            ClassUnitStatistics(layer="net.0").state_key, ClassUnitStatistics(ablate=(0.5,)).state_key}  # fmt: skip
    assert len(keys) == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"top_n=0. Must be an int >= 1"):
        ClassUnitStatistics(top_n=0)
    with pytest.raises(ValueError, match=r"every_n_epochs=None. Must be an int >= 1"):
        ClassUnitStatistics(every_n_epochs=None)
    with pytest.raises(ValueError, match=r"ablate=\(0.1, 1.5\). Must be fractions in \(0, 1\]"):
        ClassUnitStatistics(ablate=(0.1, 1.5))
    with pytest.raises(ValueError, match=r"ablate='0.1'"):
        ClassUnitStatistics(ablate="0.1")
    with pytest.raises(ValueError, match=r"ablate_batches=0"):
        ClassUnitStatistics(ablate_batches=0)
    with pytest.raises(TypeError, match="layer must be a module name"):
        ClassUnitStatistics(layer=["net.0"])
    assert ClassUnitStatistics(ablate=0.2).ablate == (0.2,)


def _steps_callback(pl, seen):
    class Count(pl.Callback):
        def on_train_batch_start(self, *args):
            seen.append(1)

    return Count()


@pytest.mark.parametrize(
    ("kwargs", "module_kwargs", "error"),
    [
        ({"layer": "net.9"}, {}, r"No module 'net.9' in Tiny; modules are: 'net', 'net.0'"),
        ({"layer": "net.*"}, {}, r"layer='net.\*' matches 7 modules \('net.0', 'net.1'"),
        ({}, {"labels": False}, r"needs class labels: the validation batches have no integer tensor \[N\]"),
        ({"top_n": 9}, {}, r"top_n=9: 'net.6' has 8 channels. Must be <= 8"),
        ({"layer": "head", "top_n": 5}, {}, r"top_n=5: 'head' has 3 channels. Must be <= 3"),
        ({"top_n": 3}, {"head": False}, r"the model's output must hold class scores \[N=2, classes\], got \(2, 8, 6, 6\)"),
    ],
)
def test_bad_input_fails_before_step_one(tmp_path, kwargs, module_kwargs, error):
    pl = PACKAGES[0]
    seen = []
    with pytest.raises(ValueError, match=error):
        fit(pl, tmp_path, [ClassUnitStatistics(**kwargs), _steps_callback(pl, seen)], logger=False,
                       **module_kwargs)  # fmt: skip
    assert seen == []


def test_model_without_convolution(tmp_path):
    pl = PACKAGES[0]

    class NoConv(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

    with pytest.raises(ValueError, match="NoConv has no convolution"):
        ClassUnitStatistics().setup(pl.Trainer(logger=False), NoConv(), "fit")


def test_hooks_removed_after_an_exception(tmp_path):
    pl = PACKAGES[0]
    cb = ClassUnitStatistics()
    pl.seed_everything(0, verbose=False)
    model = make_module(pl, fail_at_val_batch=1)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, logger=False,
                         callbacks=[cb], accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    with pytest.raises(RuntimeError, match="planted failure"):
        trainer.fit(model)
    assert cb._capture is not None and cb._handle is None  # it was collecting when the error came
    assert no_hooks(model)


def test_csv_logger_only(tmp_path):
    pl = PACKAGES[0]
    cb = ClassUnitStatistics(top_n=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(pl, tmp_path, [cb], epochs=1, logger="csv")
    ours = [w for w in caught if "no TensorBoardLogger" in str(w.message)]
    assert len(ours) == 1 and "ClassUnitStatistics" in str(ours[0].message)
    files = glob.glob(os.path.join(str(tmp_path), "csv", "**", "metrics.csv"), recursive=True)
    with open(files[0]) as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"class_units/accuracy@0", "class_units/accuracy@0.3", "class_units/similarity_offdiag",
            "class_units/shared", "class_units/specific"} <= logged  # fmt: skip
    value = next(float(r["class_units/accuracy@0"]) for r in rows if r.get("class_units/accuracy@0"))
    assert value == pytest.approx(cb.accuracy[0.0])


# ---------------------------------------------------------------------- DDP (2 CPU processes, gloo)
_lib = PACKAGES[0]


class SplitVal(_lib.LightningModule):
    """Each rank validates on different data (no distributed sampler); lr=0 keeps the weights as seeded."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())  # fmt: skip
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.net(x).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(Blobs(16, 0), batch_size=4)

    def val_dataloader(self):
        return DataLoader(Blobs(12 + 6 * self.global_rank, 10 + self.global_rank), batch_size=4)


class _Report(_lib.Callback):
    def __init__(self, cb, path):
        self.cb, self.path = cb, path

    def on_train_end(self, trainer, pl_module):
        torch.save({"means": self.cb.class_means, "accuracy": self.cb.accuracy, "samples": self.cb.samples},
                   os.path.join(self.path, f"rank{trainer.global_rank}.pt"))  # fmt: skip


def _fit_ddp(tmp_path):
    cb = ClassUnitStatistics(top_n=3, ablate=(0.5,), ablate_batches=2)
    trainer = _lib.Trainer(
        strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=1, callbacks=[cb, _Report(cb, str(tmp_path))],
        logger=_lib.loggers.TensorBoardLogger(str(tmp_path)), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, use_distributed_sampler=False, num_sanity_val_steps=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(SplitVal())


@pytest.mark.slow
def test_ddp_sums_over_ranks_and_rank_zero_writes(tmp_path):
    from torch.multiprocessing.spawn import ProcessExitedException

    try:
        _fit_ddp(tmp_path)
    except ProcessExitedException as err:  # rare start-up abort of a spawned child (see test_dead_ddp.py)
        if "SIGABRT" not in str(err):
            raise
        tmp_path = tmp_path / "retry"
        tmp_path.mkdir()
        _fit_ddp(tmp_path)
    reports = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    model = SplitVal()
    rank_data = [list(DataLoader(Blobs(12 + 6 * r, 10 + r), batch_size=4)) for r in (0, 1)]
    oracle = collect_class_stats(model, rank_data[0] + rank_data[1], "net.4", 3)
    order = channel_order(channel_means(oracle).float())
    accuracy = ablation_accuracy(model, rank_data[0][:2] + rank_data[1][:2], "net.4", order, (0.5,)).accuracy
    for report in reports:  # every rank holds the statistics of both ranks' data
        assert report["samples"] == 30
        torch.testing.assert_close(report["means"], class_means(oracle).float())
        assert report["accuracy"] == pytest.approx(accuracy)
    files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1  # one writer: global rank 0
    assert [e.step for e in read_events(tmp_path).Images("class_units/similarity")] == [4]
