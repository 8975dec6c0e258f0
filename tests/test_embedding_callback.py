"""``EmbeddingProjector``: real Trainers, the files TensorBoard's projector reads, a real TensorBoard server."""

from __future__ import annotations

import glob
import importlib
import json
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_vis.callbacks import EmbeddingProjector

from tests.helpers import read_events

PACKAGES = []
for _name in ("lightning.pytorch", "pytorch_lightning"):
    try:
        PACKAGES.append(importlib.import_module(_name))
    except ImportError:  # pragma: no cover
        pass

CLASSES = ["cat", "dog", "owl"]


class Images(Dataset):
    """Generated images with class names, optionally with a random flip (an augmentation that uses the RNG)."""

    classes = CLASSES

    def __init__(self, n: int, seed: int, augment: bool = False, size: int = 12) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.augment and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.y[i]


def make_module(pl, *, dropout: float = 0.3, n_val: int = 24, fail_in_validation: bool = False):
    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(10, 3)  # registered first, called last: the default layer's input
            self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())  # fmt: skip
            self.embed = nn.Linear(16, 10)  # registered last, called first
            self.drop = nn.Dropout(dropout)
            self.example_input_array = torch.zeros(2, 3, 12, 12)

        def features(self, x):
            return F.relu(self.embed(self.conv(x).mean((2, 3))))

        def forward(self, x):
            return self.head(self.drop(self.features(x)))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            out = self(x)
            if fail_in_validation:
                raise RuntimeError("boom")
            self.log("val_loss", F.cross_entropy(out, y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self):
            return DataLoader(Images(32, 0, augment=True), batch_size=8, shuffle=True)

        def val_dataloader(self):
            return DataLoader(Images(n_val, 1), batch_size=8)

    return Tiny()


def fit(pl, tmp_path, callbacks, *, epochs=2, logger="tb", seed=0, module=None, ckpt_path=None, **kwargs):
    pl.seed_everything(seed, workers=True, verbose=False)
    model = module if module is not None else make_module(pl)
    if logger == "tb":
        logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    options = dict(max_epochs=epochs, limit_train_batches=3, log_every_n_steps=1, num_sanity_val_steps=0,
                   accelerator="cpu", deterministic=True, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False)  # fmt: skip
    options.update(kwargs)
    trainer = pl.Trainer(logger=logger, callbacks=callbacks, **options)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def _config(log_dir):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = ProjectorConfig()
    with open(os.path.join(log_dir, "projector_config.pbtxt")) as f:
        text_format.Parse(f.read(), config)
    return config


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("pl", PACKAGES, ids=[p.__name__ for p in PACKAGES])
def test_fit_writes_projector_snapshots_and_neighbours(pl, tmp_path):
    cb = EmbeddingProjector(num_samples=20, every_n_epochs=1)
    trainer, model = fit(pl, tmp_path, [cb])
    assert cb.layer_name == "head" and cb.feature_name == "head (input)"  # last Linear by execution, not by registration
    log_dir = trainer.logger.log_dir
    config = _config(log_dir)
    assert [e.tensor_name for e in config.embeddings] == ["head (input) @ epoch 1, step 3", "head (input) @ epoch 2, step 6"]
    last = config.embeddings[-1]
    assert list(last.tensor_shape) == [20, 10]
    # the features are the classifier's input for the first 20 validation images, as an independent forward computes them
    model.eval()
    val = Images(24, 1)
    with torch.no_grad():
        expected = model.features(val.x[:20])
    saved = np.loadtxt(os.path.join(log_dir, last.tensor_path), delimiter="\t")
    np.testing.assert_allclose(saved, expected.numpy(), rtol=2e-3, atol=1e-5)
    # metadata: class names and the sample index, header row first
    rows = open(os.path.join(log_dir, last.metadata_path)).read().splitlines()
    assert rows[0] == "label\tindex" and rows[1:] == [f"{CLASSES[int(y)]}\t{i}" for i, y in enumerate(val.y[:20])]
    # one shared sprite: square, 5 x 5 cells of 12 px (the images' size), within the projector's limit
    assert config.embeddings[0].sprite.image_path == last.sprite.image_path
    sprite = Image.open(os.path.join(log_dir, last.sprite.image_path))
    assert sprite.size == (60, 60) and list(last.sprite.single_image_dim) == [12, 12]
    assert len(glob.glob(os.path.join(log_dir, "embedding", "sprite_*.png"))) == 1
    acc = read_events(log_dir)
    events = acc.Images("embedding/neighbours")
    assert [e.step for e in events] == [3, 6]
    png = np.asarray(Image.open(__import__("io").BytesIO(events[-1].encoded_image_string)))
    assert png.ndim == 3 and png.std() > 10 and 300 < png.shape[1] < 700 and 0.7 < png.shape[0] / png.shape[1] < 1.4
    assert "nearest neighbours" in acc.SummaryMetadata("embedding/neighbours").summary_description
    agreement = acc.Scalars("embedding/neighbour_agreement")
    assert [s.step for s in agreement] == [3, 6] and all(0 <= s.value <= 1 for s in agreement)
    assert [s.step for s in acc.Scalars("embedding/neighbour_agreement_pixels")] == [3, 6]
    assert _no_hooks(model)


def test_bit_identical_weights_with_and_without_the_callback(tmp_path):
    """Dropout, BatchNorm, momentum, and a random flip in the data: the observer does not change the run."""
    pl = PACKAGES[0]
    _, plain = fit(pl, tmp_path / "a", [], epochs=3)
    _, watched = fit(pl, tmp_path / "b", [EmbeddingProjector(num_samples=16, every_n_epochs=1)], epochs=3)
    ref, got = plain.state_dict(), watched.state_dict()
    assert ref.keys() == got.keys()
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []
    assert len(_config(tmp_path / "b" / "run" / "version_0").embeddings) == 3


def test_every_n_epochs_and_a_named_spatial_layer(tmp_path):
    pl = PACKAGES[0]
    cb = EmbeddingProjector("conv.4", num_samples=10, every_n_epochs=2)
    trainer, model = fit(pl, tmp_path, [cb], epochs=4)
    log_dir = trainer.logger.log_dir
    config = _config(log_dir)
    assert [e.tensor_name for e in config.embeddings] == ["conv.4 @ epoch 2, step 6", "conv.4 @ epoch 4, step 12"]
    model.eval()
    with torch.no_grad():  # the conv output, globally average-pooled (before the ReLU that follows it)
        expected = model.conv[:5](Images(24, 1).x[:10]).mean((2, 3))
    saved = np.loadtxt(os.path.join(log_dir, config.embeddings[-1].tensor_path), delimiter="\t")
    np.testing.assert_allclose(saved, expected.numpy(), rtol=2e-3, atol=1e-5)


def test_resumed_run_keeps_every_snapshot_in_the_config(tmp_path):
    """A resumed run writes with a new SummaryWriter into the same directory: earlier snapshots stay listed."""
    pl = PACKAGES[0]
    cb = EmbeddingProjector(num_samples=12, every_n_epochs=1, num_queries=2)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    fit(pl, tmp_path, [cb, ckpt], epochs=2, enable_checkpointing=True)
    queries = cb._queries
    cb2 = EmbeddingProjector(num_samples=12, every_n_epochs=1, num_queries=2)
    trainer, model = fit(pl, tmp_path, [cb2, pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"))], epochs=4,
                         enable_checkpointing=True, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))  # fmt: skip
    assert cb2._queries == queries and cb2.layer_name == "head"  # restored from the checkpoint
    names = [e.tensor_name for e in _config(trainer.logger.log_dir).embeddings]
    assert names == [f"head (input) @ epoch {e}, step {3 * e}" for e in (1, 2, 3, 4)]
    # a user's add_embedding on the same writer afterwards does not drop ours either
    trainer.logger.experiment.add_embedding(torch.randn(5, 2), global_step=99, tag="mine")
    names_after = [e.tensor_name for e in _config(trainer.logger.log_dir).embeddings]
    assert names_after == [*names, "mine:00099"]
    assert len(glob.glob(os.path.join(trainer.logger.log_dir, "embedding", "sprite_*.png"))) == 1


def test_state_dict_state_key_and_pickle():
    a, b = EmbeddingProjector(), EmbeddingProjector(num_samples=256)
    assert a.state_key != b.state_key
    assert EmbeddingProjector("x").state_key != a.state_key
    a._layer_name, a._queries, a._last_step = "net.fc", [3, 1, 4], 42
    state = a.state_dict()
    c = EmbeddingProjector()
    c.load_state_dict(state)
    assert (c.layer_name, c._queries, c._last_step) == ("net.fc", [3, 1, 4], 42)
    d = pickle.loads(pickle.dumps(a))
    assert d.layer_name == "net.fc" and d._handle is None


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"num_samples=3. Must be an int in \[5, 10000\]"):
        EmbeddingProjector(num_samples=3)
    with pytest.raises(ValueError, match=r"num_samples=20000"):
        EmbeddingProjector(num_samples=20000)
    with pytest.raises(ValueError, match=r"every_n_epochs=0. Must be an int >= 1"):
        EmbeddingProjector(every_n_epochs=0)
    with pytest.raises(ValueError, match=r"every_n_epochs=None"):
        EmbeddingProjector(every_n_epochs=None)
    with pytest.raises(ValueError, match=r"num_neighbours=0"):
        EmbeddingProjector(num_neighbours=0)
    with pytest.raises(ValueError, match=r"num_queries=-1"):
        EmbeddingProjector(num_queries=-1)
    with pytest.raises(ValueError, match=r"metric='l1'. Must be one of 'euclidean', 'cosine'"):
        EmbeddingProjector(metric="l1")
    with pytest.raises(TypeError, match=r"layer must be a module name"):
        EmbeddingProjector(layer=["head"])


def _count_steps(pl):
    class Count(pl.Callback):
        steps = 0

        def on_train_batch_start(self, *args):
            Count.steps += 1

    return Count()


def test_bad_input_fails_before_the_first_step(tmp_path):
    pl = PACKAGES[0]
    counter = _count_steps(pl)
    with pytest.raises(ValueError, match=r"No module 'fc' in Tiny; modules are: 'head', 'conv', 'conv.0'"):
        fit(pl, tmp_path, [EmbeddingProjector("fc"), counter], logger=False)
    with pytest.raises(ValueError, match=r"layer='conv.\*' matches 6 modules"):
        fit(pl, tmp_path, [EmbeddingProjector("conv.*"), counter], logger=False)

    class NoLinear(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)
            self.unused = nn.Linear(3, 3)  # never called

        def forward(self, x):
            return self.conv(x).mean((2, 3))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(Images(8, 0), batch_size=4)

    with pytest.raises(ValueError, match=r"calls no torch.nn.Linear.*layer=\.\.\."):
        fit(pl, tmp_path, [EmbeddingProjector(), counter], logger=False, module=NoLinear())
    with pytest.raises(ValueError, match=r"never calls 'unused'"):
        fit(pl, tmp_path, [EmbeddingProjector("unused"), counter], logger=False, module=NoLinear())
    assert counter.steps == 0


def test_hooks_removed_after_an_exception_in_validation(tmp_path):
    pl = PACKAGES[0]
    model = make_module(pl, fail_in_validation=True)
    with pytest.raises(RuntimeError, match="boom"):
        fit(pl, tmp_path, [EmbeddingProjector(num_samples=8, every_n_epochs=1)], module=model)
    assert _no_hooks(model)


def test_csv_logger_only_warns_once_and_logs_the_scalar(tmp_path):
    pl = PACKAGES[0]
    cb = EmbeddingProjector(num_samples=16, every_n_epochs=1)
    csv = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(pl, tmp_path, [cb], logger=csv, epochs=2)
    ours = [w for w in caught if "no TensorBoardLogger" in str(w.message)]
    assert len(ours) == 1
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "embedding/neighbour_agreement" in metrics
    assert not glob.glob(str(tmp_path / "**" / "projector_config.pbtxt"), recursive=True)


def test_few_validation_samples_and_unlabelled_batches(tmp_path):
    pl = PACKAGES[0]

    class Unlabelled(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return self(batch).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return DataLoader(torch.randn(8, 3, 10, 6), batch_size=4)

        def val_dataloader(self):
            return DataLoader(torch.randn(9, 3, 10, 6), batch_size=4)  # non-square images, no labels

    cb = EmbeddingProjector(num_samples=9, every_n_epochs=1)
    trainer, _ = fit(pl, tmp_path, [cb], module=Unlabelled(), epochs=1)
    config = _config(trainer.logger.log_dir)
    info = config.embeddings[0]
    assert cb.layer_name == "net.4" and list(info.tensor_shape) == [9, 4]
    rows = open(os.path.join(trainer.logger.log_dir, info.metadata_path)).read().splitlines()
    assert rows == [str(i) for i in range(9)]  # one column: no header
    assert list(info.sprite.single_image_dim) == [10, 10]  # square cells: padded to max(H, W)
    assert Image.open(os.path.join(trainer.logger.log_dir, info.sprite.image_path)).size == (30, 30)
    assert "embedding/neighbour_agreement" not in read_events(trainer.logger.log_dir).Tags()["scalars"]
    with pytest.warns(UserWarning, match=r"only 4 validation samples"):
        fit(pl, tmp_path / "few", [EmbeddingProjector(num_samples=9, num_neighbours=4, every_n_epochs=1)],
            module=Unlabelled(), epochs=1, limit_val_batches=1)  # fmt: skip


# --------------------------------------------------------------------------- TensorBoard graph beside our callbacks
@pytest.mark.slow
def test_log_graph_works_beside_every_callback(tmp_path):
    """``TensorBoardLogger(log_graph=True)`` with ``example_input_array``: the graph is in the event file."""
    pl = PACKAGES[0]
    from lightning_vis import callbacks as vis

    classes = [getattr(vis, name) for name in vis.__all__]
    callbacks = [cls() for cls in classes if isinstance(cls, type) and cls is not EmbeddingProjector]
    callbacks.append(EmbeddingProjector(num_samples=16, every_n_epochs=1))
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="graph", log_graph=True)
    model = make_module(pl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, _ = fit(pl, tmp_path, callbacks, module=model, logger=logger, epochs=1)
    acc = read_events(trainer.logger.log_dir)
    assert acc.Tags()["graph"]
    nodes = [n.name for n in acc.Graph().node]
    assert any("head" in n for n in nodes) and any("conv" in n for n in nodes)
    assert "embedding/neighbours" in acc.Tags()["images"]
    assert _no_hooks(model)


# --------------------------------------------------------------------------- a real TensorBoard server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, **params) -> bytes:
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=20) as response:
        return response.read()


@pytest.mark.slow
def test_tensorboard_projector_serves_every_snapshot(tmp_path):
    pl = PACKAGES[0]
    logdir = tmp_path / "runs"
    cb = EmbeddingProjector(num_samples=20, every_n_epochs=1)
    trainer, _ = fit(pl, logdir, [cb], epochs=3)
    log_dir = trainer.logger.log_dir
    port = _free_port()
    exe = shutil.which("tensorboard")
    cmd = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    proc = subprocess.Popen(
        [*cmd, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        runs: list = []
        while time.monotonic() < deadline:
            try:
                runs = json.loads(_get(port, "/data/plugin/projector/runs"))
                if runs:
                    break
            except OSError:
                pass
            assert proc.poll() is None, "tensorboard exited"
            time.sleep(0.5)
        assert runs == ["run/version_0"]
        run = runs[0]
        info = json.loads(_get(port, "/data/plugin/projector/info", run=run))
        names = [e["tensorName"] for e in info["embeddings"]]
        assert names == [f"head (input) @ epoch {e}, step {3 * e}" for e in (1, 2, 3)]
        config = _config(log_dir)
        for entry, name in zip(config.embeddings, names):
            raw = _get(port, "/data/plugin/projector/tensor", run=run, name=name)
            served = np.frombuffer(raw, dtype=np.float32).reshape(20, 10)
            on_disk = np.loadtxt(os.path.join(log_dir, entry.tensor_path), delimiter="\t", dtype=np.float32)
            np.testing.assert_array_equal(served, on_disk)
        metadata = _get(port, "/data/plugin/projector/metadata", run=run, name=names[-1]).decode().splitlines()
        assert metadata[0] == "label\tindex" and len(metadata) == 21
        assert {row.split("\t")[0] for row in metadata[1:]} <= set(CLASSES)
        sprite = _get(port, "/data/plugin/projector/sprite_image", run=run, name=names[0])
        assert sprite[:8] == b"\x89PNG\r\n\x1a\n"
        image = Image.open(__import__("io").BytesIO(sprite))
        side = math.ceil(math.sqrt(20)) * info["embeddings"][0]["sprite"]["singleImageDim"][0]
        assert image.size == (side, side)
        # and the neighbours picture through the images plugin
        tags = json.loads(_get(port, "/data/plugin/images/tags"))[run]
        assert "embedding/neighbours" in tags
        samples = json.loads(_get(port, "/data/plugin/images/images", run=run, tag="embedding/neighbours"))
        assert [s["step"] for s in samples] == [3, 6, 9]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
