"""FeatureEvolution: strips, CKA, settling, schedule, checkpoint resume, invariants."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lightning_vis.callbacks import FeatureEvolution
from lightning_vis.callbacks.evolution import (
    crop_to_field,
    drop_column,
    field_side,
    log_epochs,
    probe_layers,
    snapshot_due,
)
from lightning_vis.cka import gram_matrices
from lightning_vis.deconv import project
from lightning_vis.render import evolution_strip, signed_thumbnail
from tests.helpers import PACKAGES, assert_bit_identical, fit_weights, make_module, pl, read_events, small_cnn, trainer


def _decode(event) -> torch.Tensor:
    """An image event from TensorBoard as uint8 [3, H, W]."""
    array = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _probe(n: int = 8, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _dropout_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.Dropout(0.3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


# --------------------------------------------------------------------------- pure pieces
def test_signed_thumbnail_puts_zero_at_mid_grey_and_keeps_the_sign():
    x = torch.zeros(2, 1, 4, 4)
    x[0, 0, 0, 0], x[0, 0, 1, 1] = 3.0, -1.5
    out = signed_thumbnail(x)
    assert out.dtype == torch.uint8 and out.shape == (2, 1, 4, 4)
    assert out[0, 0, 0, 0] == 255 and out[0, 0, 1, 1] == 64 and out[0, 0, 2, 2] == 128
    assert torch.all(out[1] == 128)  # all-zero projection: flat grey, no NaN
    big = signed_thumbnail(torch.randn(3, 64, 48), max_px=16)
    assert big.shape == (3, 16, 12)
    with pytest.raises(ValueError, match=r"Invalid value for max_px=0"):
        signed_thumbnail(x, max_px=0)


def test_evolution_strip_layout_one_row_per_unit_one_column_per_snapshot():
    g = torch.Generator().manual_seed(0)
    thumbs = torch.randint(0, 256, (3, 4, 3, 8, 8), generator=g, dtype=torch.uint8)
    rows, cols = ["ch 0", "ch 7", "ch 12"], ["ep 1", "ep 2", "ep 5", "ep 10"]
    img = evolution_strip(thumbs, rows, cols, cell_px=48, gap=2)
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    fewer = evolution_strip(thumbs[:, :3], rows, cols[:3], cell_px=48, gap=2)
    # one more column adds exactly one cell (48 px) and one gap, and nothing else changes
    assert img.shape[1] == fewer.shape[1] and img.shape[2] - fewer.shape[2] == 48 + 2
    assert torch.equal(img[:, :, : fewer.shape[2]], fewer)
    # the cells hold the (upscaled) thumbnails, row r / column t
    bare = evolution_strip(thumbs, cell_px=16, gap=2)
    assert bare.shape == (3, 2 + 3 * 18, 2 + 4 * 18)
    cell = bare[:, 2 + 18 : 2 + 18 + 16, 2 + 2 * 18 : 2 + 2 * 18 + 16]
    assert torch.equal(cell, thumbs[1, 2].repeat_interleave(2, 1).repeat_interleave(2, 2))
    # labels are drawn: the labelled strip has a header band and a left band with dark text
    assert img.shape[1] > bare.shape[1] and img.shape[2] > bare.shape[2]
    header = img[:, : img.shape[1] - 3 * 50, :]
    assert (header < 100).any()
    # a label wider than its cell widens the columns instead of running into the next label
    narrow = evolution_strip(thumbs, rows, ["epoch 1", "epoch 2", "epoch 5", "epoch 10"], cell_px=8)
    assert narrow.shape[2] > evolution_strip(thumbs, rows, ["1", "2", "5", "10"], cell_px=8).shape[2]
    grey = evolution_strip(thumbs[:, :, :1], cell_px=8)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_evolution_strip_errors():
    with pytest.raises(ValueError, match=r"shape \[rows, columns, C, h, w\] with C in \(1, 3\), got \(2, 3, 8, 8\)"):
        evolution_strip(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"at least one row and one column"):
        evolution_strip(torch.zeros(2, 0, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"Got 1 row_labels for 2 rows"):
        evolution_strip(torch.zeros(2, 1, 3, 8, 8, dtype=torch.uint8), ["ch 0"])
    with pytest.raises(ValueError, match=r"Got 2 col_labels for 1 columns"):
        evolution_strip(torch.zeros(2, 1, 3, 8, 8, dtype=torch.uint8), col_labels=["ep 1", "ep 2"])


def test_log_spaced_schedule_and_thinning():
    assert log_epochs(64) == [1, 2, 5, 10, 20, 50, 64]
    assert log_epochs(1) == [1]
    kept: list[int] = []
    for epoch in range(1, 201):
        kept.append(epoch)
        if len(kept) > 8:
            del kept[drop_column(kept)]
    assert len(kept) == 8 and kept[0] == 1 and kept[-1] == 200
    ratios = [b / a for a, b in zip(kept, kept[1:])]
    assert max(ratios) < 5 * min(ratios)  # roughly log-spaced, not bunched at one end
    with pytest.raises(ValueError, match=r"at least 3 snapshots"):
        drop_column([1, 2])


def test_snapshot_schedule_rules():
    due = lambda *args: [e for e in range(1, 101) if snapshot_due(e, *args)]  # noqa: E731
    assert due(None, "log", 64)[:7] == [1, 2, 5, 10, 20, 50, 64]
    assert due(None, "log", -1) == [1, 2, 5, 10, 20, 50, 100]  # open-ended: no "last epoch"
    assert due(None, "log", None) == [1, 2, 5, 10, 20, 50, 100]
    assert due(30, None, 100) == [30, 60, 90]
    assert due(1, [3, 7], 100) == [3, 7]


def test_crop_to_the_receptive_field():
    p = torch.zeros(3, 3, 16, 16)
    p[0, :, 0:3, 0:3] = torch.randn(3, 3, 3)  # at the corner
    p[1, 1, 10:12, 13:16] = 1.0  # smaller support near the right edge
    assert field_side(p) == 3  # the all-zero third projection does not count
    crops = crop_to_field(p, 3)
    assert crops.shape == (3, 3, 3, 3)
    assert torch.equal(crops[0], p[0, :, 0:3, 0:3])
    assert torch.equal(crops[1].abs().sum(), p[1].abs().sum())  # the whole support is inside the window
    assert torch.equal(crops[2], torch.zeros(3, 3, 3))
    assert field_side(torch.zeros(2, 1, 5, 7)) == 7
    assert crop_to_field(p, 40).shape == (3, 3, 16, 16)


def test_probe_layers_keeps_grams_and_peaks_and_leaves_no_hooks():
    torch.manual_seed(0)
    net = small_cnn().train()
    x = _probe(12)
    out = probe_layers(net, x, ["0", "4"], batch_size=6)
    with torch.no_grad():
        net.eval()
        a0 = net[0](x)
        a4 = net[4](net[3](net[2](net[1](a0))))
        net.train()
    for name, act in (("0", a0), ("4", a4)):
        grams, peaks = out[name]
        assert len(grams) == 2
        for got, want in zip(grams, gram_matrices(act, batch_size=6)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(peaks, act.flatten(2).amax(2))
    assert net.training and all(not m._forward_hooks for m in net.modules())
    unused = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    unused.forward = lambda x: unused[0](x)
    with pytest.raises(ValueError, match=r"Layers \['1'\] were not called by the forward pass"):
        probe_layers(unused, x, ["0", "1"])
    assert all(not m._forward_hooks for m in unused.modules())


# --------------------------------------------------------------------------- in a Trainer
@pytest.mark.parametrize("package", PACKAGES)
def test_strips_grow_one_column_per_snapshot_with_cka_scalars(tmp_path, package):
    cb = FeatureEvolution(top_k=2)
    t = trainer(tmp_path, package, callbacks=[cb], max_epochs=3, limit_train_batches=2)
    t.fit(make_module(small_cnn(), package))
    assert cb.layers == ["net.0", "net.4"]  # both convolutions, in execution order
    assert cb.epochs == [1, 2, 3] and cb.steps == [2, 4, 6]
    assert torch.equal(cb.probe_images, t.lightning_module.x[:16])  # the validation set's first images
    assert all(len(cb.tracked[name]) == 2 for name in cb.layers)
    events = read_events(tmp_path)
    for name in cb.layers:
        images = events.Images(f"evolution/{name}")
        assert [im.step for im in images] == [2, 4, 6]
        widths = [im.width for im in images]
        assert widths[1] - widths[0] == widths[2] - widths[1] > 0  # one column more each time
        assert len({im.height for im in images}) == 1  # same rows
        assert torch.equal(_decode(images[-1]), cb.strip(name))
        for prefix in ("cka", "cka_first"):
            scalars = events.Scalars(f"{prefix}/{name}")
            assert [s.step for s in scalars] == [4, 6]  # from the second snapshot on
            assert all(0.0 < s.value <= 1.0 + 1e-6 for s in scalars)
        assert [round(c, 5) for _, c, _ in cb.cka[name]] == [round(s.value, 5) for s in events.Scalars(f"cka/{name}")]
    for name in cb.layers:  # settled = two consecutive CKAs to the previous snapshot >= threshold
        both = all(c >= cb.threshold for _, c, _ in cb.cka[name])
        assert cb.settled[name] == (2 if both else None), (name, cb.cka[name], cb.settled)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in t.lightning_module.modules())


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    kwargs = dict(max_epochs=2, limit_train_batches=3)
    without = fit_weights(tmp_path / "a", _dropout_cnn, **kwargs)
    cb = FeatureEvolution(every_n_epochs=1, top_k=3)
    with_cb = fit_weights(tmp_path / "b", _dropout_cnn, callbacks=[cb], **kwargs)
    assert cb.epochs == [1, 2]  # the callback did its work
    assert_bit_identical(without, with_cb)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resumed_run_continues_the_same_strips(tmp_path):
    lib = pl()
    ckpt_dir = tmp_path / "ckpt"
    first = FeatureEvolution(top_k=2, layers="net.*")
    saver = lib.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=-1, filename="{epoch}")
    lib.seed_everything(0, verbose=False)
    t1 = trainer(tmp_path / "run1", callbacks=[first, saver], enable_checkpointing=True, max_epochs=2,
                 limit_train_batches=2)  # fmt: skip
    t1.fit(make_module(small_cnn()))
    before = {name: _decode(read_events(tmp_path / "run1").Images(f"evolution/{name}")[-1]) for name in first.layers}

    second = FeatureEvolution(top_k=2, layers="net.*")
    t2 = trainer(tmp_path / "run2", callbacks=[second], max_epochs=3, limit_train_batches=2)
    t2.fit(make_module(small_cnn()), ckpt_path=str(ckpt_dir / "epoch=1.ckpt"))
    assert second.epochs == [1, 2, 3]
    assert second.tracked == first.tracked
    events = read_events(tmp_path / "run2")
    for name in first.layers:
        images = events.Images(f"evolution/{name}")
        assert [im.step for im in images] == [6]  # the resumed run logs once, at epoch 3 ...
        after = _decode(images[0])
        width = before[name].shape[2]
        assert after.shape[2] > width and after.shape[1] == before[name].shape[1]
        assert torch.equal(after[:, :, :width], before[name])  # ... a strip that holds epochs 1 and 2
        # CKA continues against the restored previous snapshot
        assert [s.step for s in events.Scalars(f"cka/{name}")] == [6]
        assert [e for e, _, _ in second.cka[name]] == [2, 3]


def test_max_columns_keeps_a_bounded_log_spaced_history(tmp_path):
    cb = FeatureEvolution(top_k=1, max_columns=3, layers="net.0")
    trainer(tmp_path, callbacks=[cb], max_epochs=5, limit_train_batches=1).fit(make_module(small_cnn()))
    assert len(cb.epochs) == 3 and cb.epochs[0] == 1 and cb.epochs[-1] == 5
    assert len(cb.state_dict()["thumbs"]["net.0"]) == 3
    widths = [im.width for im in read_events(tmp_path).Images("evolution/net.0")]
    assert len(widths) == 5 and widths[2] == widths[3] == widths[4] > widths[1] > widths[0]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"every_n_epochs": 2}, [2, 4]), ({"epochs": [1, 3]}, [1, 3]), ({"epochs": "log"}, [1, 2, 4])],
)
def test_schedule(tmp_path, kwargs, expected):
    cb = FeatureEvolution(top_k=1, layers="net.0", **kwargs)
    trainer(tmp_path, callbacks=[cb], max_epochs=4, limit_train_batches=1).fit(make_module(small_cnn()))
    assert cb.epochs == expected
    assert [im.step for im in read_events(tmp_path).Images("evolution/net.0")] == expected


def test_tracked_units_are_the_most_active_channels_and_a_frozen_net_settles(tmp_path):
    net = nn.Sequential(  # no BatchNorm: with lr=0 nothing at all changes between snapshots
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Identity(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    with torch.no_grad():  # channel c of the first conv responds (c + 1) times as strongly
        base = net[0].weight[:1].clone()
        net[0].weight.copy_(torch.cat([(c + 1) * base for c in range(8)]))
        net[0].bias.zero_()
    probe = _probe(8)
    cb = FeatureEvolution(probe=probe, top_k=3, layers=["net.0", "net.4"])
    module = make_module(net, lr=0.0)  # nothing changes: CKA to the previous snapshot is 1
    t = trainer(tmp_path, callbacks=[cb], max_epochs=3, limit_train_batches=1)
    t.fit(module)
    assert cb.tracked["net.0"] == [7, 6, 5]
    # each row shows the unit's strongest projection over the probe set
    with torch.no_grad():
        peaks = module.net[0](probe).flatten(2).amax(2)
    best = peaks[:, [7, 6, 5]].argmax(0)
    expected = project(module, probe[best], "net.0", channels=torch.tensor([[7], [6], [5]])).images[:, 0]
    thumbs = cb.state_dict()["thumbs"]
    assert thumbs["net.0"][0].shape == (3, 3, 3, 3)  # cropped to the 3x3 receptive field of the first conv
    assert torch.equal(thumbs["net.0"][0], signed_thumbnail(crop_to_field(expected, 3)))
    # conv 3x3, pool 2, conv 3x3: an 8x8 receptive field, of which max-pool switches pass a part
    assert 3 < thumbs["net.4"][0].shape[-1] <= 8 and thumbs["net.4"][0].shape[-1] == thumbs["net.4"][0].shape[-2]
    for name in cb.layers:
        assert [c for _, c, _ in cb.cka[name]] == pytest.approx([1.0, 1.0], abs=1e-9)
    assert cb.settled == {"net.0": 2, "net.4": 2}
    events = read_events(tmp_path)
    text = events.Tensors("evolution/settled/text_summary")
    assert [e.step for e in text] == [3]
    message = text[0].tensor_proto.string_val[0].decode()
    assert "`net.0` settled at epoch 2" in message and "`net.4` settled at epoch 2" in message


def test_no_tensorboard_logger_warns_and_still_snapshots(tmp_path):
    lib = pl()
    cb = FeatureEvolution(top_k=1, layers="net.0")
    csv = lib.loggers.CSVLogger(str(tmp_path), name="csv")
    with pytest.warns(UserWarning, match=r"no TensorBoardLogger"):
        trainer(tmp_path, callbacks=[cb], logger=csv, max_epochs=2, limit_train_batches=1).fit(
            make_module(small_cnn())
        )
    assert cb.epochs == [1, 2]
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "cka/net.0" in metrics


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, r"Invalid value for top_k=0\. Must be an int >= 1"),
        ({"every_n_epochs": 0}, r"Invalid value for every_n_epochs=0"),
        ({"every_n_epochs": None}, r"every_n_epochs=None without epochs"),
        ({"epochs": "linear"}, r"Invalid value for epochs='linear'\. Must be 'log', a list of epochs >= 1"),
        ({"epochs": [0, 2]}, r"Invalid value for epochs=\[0, 2\]"),
        ({"epochs": [2], "every_n_epochs": 3}, r"Give either every_n_epochs=3 or epochs=\[2\], not both"),
        ({"num_probe": 2}, r"Invalid value for num_probe=2\. Must be an int >= 4"),
        ({"max_columns": 1}, r"Invalid value for max_columns=1\. Must be an int >= 2"),
        ({"threshold": 1.5}, r"Invalid value for threshold=1\.5\. Must be a number in \(0, 1\]"),
        ({"method": "lrp"}, r"Invalid value for method='lrp'\. Must be one of 'deconvnet', 'guided', 'saliency'"),
        ({"cka_batch_size": 2}, r"Invalid value for cka_batch_size=2\. Must be an int >= 4 or None"),
        ({"probe": torch.zeros(8, 8)}, r"probe must have shape \[N, C, H, W\]"),
        ({"probe": torch.zeros(2, 3, 8, 8)}, r"at least 4 images for CKA, got shape \(2, 3, 8, 8\)"),
        ({"layers": []}, r"layers must name at least one layer"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeatureEvolution(**kwargs)


@pytest.mark.parametrize(
    ("net", "kwargs", "match"),
    [
        (small_cnn, {"layers": "net.9"}, r"No module 'net.9' in Tiny; convolutions are: 'net.0', 'net.4'"),
        (small_cnn, {"layers": "net.8"}, r"Module 'net.8' \(Linear\) cannot be used here; convolutions are"),
        (small_cnn, {"layers": "net.0", "top_k": 9}, r"top_k=9: layer 'net.0' has 8 channels\. Must be <= 8"),
        (small_cnn, {"probe": torch.zeros(4, 1, 16, 16)}, r"probe of shape \(4, 1, 16, 16\) does not fit Tiny"),
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(768, 4)), {}, r"FeatureEvolution: Tiny has no convolution"),
    ],
)
def test_bad_model_input_fails_at_setup_before_any_step(tmp_path, net, kwargs, match):
    module = make_module(net())
    t = trainer(tmp_path, callbacks=[FeatureEvolution(**kwargs)], max_epochs=1, limit_train_batches=1)
    with pytest.raises(ValueError, match=match):
        t.fit(module)
    assert t.global_step == 0


def test_strip_before_any_snapshot_names_the_layers():
    with pytest.raises(ValueError, match=r"No snapshot of layer 'net.0'; layers with snapshots: \(none yet\)"):
        FeatureEvolution().strip("net.0")


def test_state_key_tells_configurations_apart():
    assert FeatureEvolution(layers="a").state_key != FeatureEvolution(layers="b").state_key
    assert FeatureEvolution(top_k=2).state_key != FeatureEvolution(top_k=3).state_key
    assert pickle.loads(pickle.dumps(FeatureEvolution(probe=_probe(4)))).probe.shape == (4, 3, 16, 16)
    fresh = FeatureEvolution()
    fresh.load_state_dict(FeatureEvolution().state_dict())  # an empty state round-trips
    assert fresh.epochs == [] and fresh.settled == {}


# --------------------------------------------------------------------------- DDP
_DDP_SCRIPT = textwrap.dedent(
    """
    import glob, hashlib, json, os, sys
    import torch, torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import lightning.pytorch as pl
    from lightning_vis.callbacks import FeatureEvolution

    logdir = sys.argv[1]

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):  # each rank trains on different samples
            g = torch.Generator().manual_seed(1)
            x, y = torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
            return DataLoader(TensorDataset(x, y), batch_size=8)

    def digest(t):
        return hashlib.sha1(t.detach().cpu().float().numpy().tobytes()).hexdigest()

    class Report(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            ev = next(c for c in trainer.callbacks if isinstance(c, FeatureEvolution))
            state = ev.state_dict()
            report = {"probe": digest(ev.probe_images), "epochs": ev.epochs, "cka": ev.cka, "settled": ev.settled,
                      "tracked": ev.tracked, "thumbs": {k: [digest(t) for t in v] for k, v in state["thumbs"].items()},
                      "grams": {k: [digest(g) for g in v] for k, v in state["grams_prev"].items()}}
            with open(os.path.join(logdir, f"rank{trainer.global_rank}.json"), "w") as f:
                json.dump(report, f)

    if __name__ == "__main__":
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(
            strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=3, limit_train_batches=2,
            logger=pl.loggers.TensorBoardLogger(logdir, name="ddp"),
            callbacks=[FeatureEvolution(top_k=2, num_probe=8), Report()], enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, deterministic=True)
        trainer.fit(Net())
    """
)


@pytest.mark.slow
def test_ddp_ranks_hold_the_same_snapshots_and_only_rank_zero_writes(tmp_path):
    script = tmp_path / "evolution_ddp.py"
    script.write_text(_DDP_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["epochs"] == [1, 2, 3]
    assert rank0 == rank1  # probe, tracked units, thumbnails, Gram matrices, CKA, settled: all identical
    events = list(tmp_path.glob("**/events.out.tfevents.*"))
    assert len(events) == 1
    acc = read_events(str(events[0].parent))
    assert {"evolution/net.0", "evolution/net.4"} <= set(acc.Tags()["images"])
    assert "cka/net.4" in acc.Tags()["scalars"]
