"""``DeconvProjection``: real ``Trainer.fit`` runs, TensorBoard read back, bit-identical training."""

from __future__ import annotations

import importlib
import pickle

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_vis.callbacks import DeconvProjection

PACKAGES = []
for _name in ("lightning.pytorch", "pytorch_lightning"):
    try:
        PACKAGES.append(importlib.import_module(_name))
    except ImportError:  # pragma: no cover
        pass


def make_module(pl, *, batchnorm: bool = True, dropout: float = 0.2):
    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            layers = [nn.Conv2d(3, 6, 3, padding=1)]
            layers += [nn.BatchNorm2d(6)] if batchnorm else []
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1)]
            layers += [nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 10, 1)]
            self.net = nn.Sequential(*layers)
            self.drop = nn.Dropout(dropout)
            self.head = nn.Linear(10, 3)

        def forward(self, x):
            return self.head(self.drop(F.relu(self.net(x)).mean((2, 3))))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def _loader(self, seed, shuffle):
            g = torch.Generator().manual_seed(seed)
            data = TensorDataset(torch.randn(32, 3, 12, 12, generator=g), torch.randint(0, 3, (32,), generator=g))
            return DataLoader(data, batch_size=8, shuffle=shuffle)

        def train_dataloader(self):
            return self._loader(0, True)

        def val_dataloader(self):
            return self._loader(1, False)

    return Tiny()


def fit(pl, tmp_path, callbacks, *, seed=0, epochs=2, logger=True, **module_kwargs):
    pl.seed_everything(seed, workers=True, verbose=False)
    model = make_module(pl, **module_kwargs)
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="run") if logger else False,
        callbacks=callbacks,
        accelerator="cpu",
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model)
    return trainer, model


def read_images(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("pl", PACKAGES, ids=[p.__name__ for p in PACKAGES])
def test_fit_logs_deconv_images(pl, tmp_path):
    cb = DeconvProjection(top_k=4, every_n_epochs=1)
    trainer, model = fit(pl, tmp_path, [cb])
    assert cb.layer_names == ["net.0", "net.4", "net.6", "net.8"]  # every convolution, in execution order
    assert cb.probe_images.shape == (4, 3, 12, 12)
    g = torch.Generator().manual_seed(1)
    torch.testing.assert_close(cb.probe_images, torch.randn(32, 3, 12, 12, generator=g)[:4])  # first val images
    acc = read_images(trainer.logger.log_dir)
    tags = sorted(t for t in acc.Tags()["images"] if t.startswith("deconv/"))
    assert tags == ["deconv/net.0", "deconv/net.4", "deconv/net.6", "deconv/net.8"]
    events = acc.Images("deconv/net.4")
    assert [e.step for e in events] == [3, 6]  # end of each epoch, at the optimizer step
    assert events[0].width > 4 * 48 and events[0].height >= 4 * 48
    assert "max(R, 0)" in acc.SummaryMetadata("deconv/net.4").summary_description
    # the network is unchanged and no hook is left behind
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("pl", PACKAGES, ids=[p.__name__ for p in PACKAGES])
def test_training_is_bit_identical(pl, tmp_path):
    """Seeded deterministic CPU run with and without the callback (BN, dropout, momentum): identical weights."""
    _, plain = fit(pl, tmp_path / "a", [])
    cb = DeconvProjection(top_k=3, every_n_epochs=1, every_n_steps=1, method="guided")
    _, watched = fit(pl, tmp_path / "b", [cb])
    ref, got = plain.state_dict(), watched.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    events = read_images(tmp_path / "b" / "run" / "version_0").Images("deconv/net.0")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]  # every step; the epoch ends do not repeat them


def test_explicit_probe_layers_and_step_cadence(tmp_path):
    pl = PACKAGES[0]
    probe = torch.rand(2, 3, 16, 16)
    cb = DeconvProjection(probe, layers=["net.[46]", "net.5"], top_k=8, every_n_epochs=None, every_n_steps=2)
    trainer, _ = fit(pl, tmp_path, [cb], epochs=1)
    assert cb.layer_names == ["net.4", "net.6", "net.5"]
    assert torch.equal(cb.probe_images, probe)
    acc = read_images(trainer.logger.log_dir)
    assert sorted(t for t in acc.Tags()["images"] if t.startswith("deconv/")) == [
        "deconv/net.4",
        "deconv/net.5",
        "deconv/net.6",
    ]
    assert [e.step for e in acc.Images("deconv/net.6")] == [2]


def test_state_dict_and_state_key():
    a, b = DeconvProjection(), DeconvProjection(method="guided")
    assert a.state_key != b.state_key
    probe = torch.rand(3, 3, 8, 8)
    c = DeconvProjection(probe, layers="net.0")
    state = c.state_dict()
    d = DeconvProjection(layers="net.0")
    d.load_state_dict(state)
    assert torch.equal(d.probe_images, probe)
    e = pickle.loads(pickle.dumps(c))  # picklable: configuration and tensors only
    assert torch.equal(e.probe_images, probe) and e.layers == ["net.0"]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"method='deconv'. Must be one of 'deconvnet', 'guided', 'saliency'"):
        DeconvProjection(method="deconv")
    with pytest.raises(ValueError, match=r"top_k=0. Must be an int >= 1"):
        DeconvProjection(top_k=0)
    with pytest.raises(ValueError, match=r"every_n_epochs=0"):
        DeconvProjection(every_n_epochs=0)
    with pytest.raises(ValueError, match=r"every_n_steps=-1"):
        DeconvProjection(every_n_steps=-1)
    with pytest.raises(ValueError, match="never logs"):
        DeconvProjection(every_n_epochs=None)
    with pytest.raises(ValueError, match=r"num_probe=0"):
        DeconvProjection(num_probe=0)
    with pytest.raises(ValueError, match=r"probe must have shape \[N, C, H, W\].*\(2, 3, 8, 8, 1\)"):
        DeconvProjection(torch.zeros(2, 3, 8, 8, 1))
    with pytest.raises(TypeError, match="probe must be a float tensor"):
        DeconvProjection(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_setup_errors(tmp_path):
    pl = PACKAGES[0]
    with pytest.raises(ValueError, match=r"No module 'net.9' in Tiny; convolutions are: 'net.0', 'net.4', 'net.6', 'net.8'"):
        fit(pl, tmp_path, [DeconvProjection(layers=["net.9"])], logger=False)
    with pytest.raises(ValueError, match=r"Pattern 'head\*' matches nothing in Tiny; convolutions are: 'net.0'"):
        fit(pl, tmp_path, [DeconvProjection(layers="head*")], logger=False)
    with pytest.raises(ValueError, match=r"probe of shape \(2, 4, 12, 12\) does not fit Tiny"):
        fit(pl, tmp_path, [DeconvProjection(torch.zeros(2, 4, 12, 12))], logger=False)

    class NoConv(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

    with pytest.raises(ValueError, match="NoConv has no convolution"):
        DeconvProjection().setup(pl.Trainer(logger=False), NoConv(), "fit")


def test_project_runs_a_compiled_lightning_module_eagerly():
    """Lightning's ``from_compiled`` swaps in the compiled forward; ``project`` uses the eager one, then restores it."""
    pl = PACKAGES[0]
    from lightning_vis import project

    compile_utils = importlib.import_module(f"{pl.__name__}.utilities.compile")
    module = make_module(pl)
    x = torch.randn(2, 3, 12, 12)
    ref = project(module, x, "net.4", top_k=3, method="guided")
    compiled = compile_utils.from_compiled(torch.compile(module))
    compiled_forward = compiled.forward
    got = project(compiled, x, "net.4", top_k=3, method="guided")
    assert torch.equal(got.images, ref.images)
    assert compiled.forward is compiled_forward
