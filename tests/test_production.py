"""All four callbacks together in real training setups (issue 6).

Distributed, mixed precision, channels_last, torch.compile, many architectures, every
kind of logger, and bad input caught before the first step.
"""

import csv
import glob
import io
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from lightning_vis.callbacks import DeadNeuronMonitor, DeconvProjection, FeatureEvolution, FilterGrid
from tests.helpers import (
    PACKAGES,
    assert_bit_identical,
    fit_weights,
    make_module,
    pl,
    read_events,
    small_cnn,
    trainer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def most_frequent():
    """Every callback at its most frequent setting."""
    return [
        FilterGrid(every_n_steps=1),
        DeconvProjection(top_k=2, every_n_epochs=1, every_n_steps=1),
        DeadNeuronMonitor(every_n_steps=1, window=2),
        FeatureEvolution(top_k=2, every_n_epochs=1, num_probe=8),
    ]


def _pixels(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))


def assert_everything_logged(events, *, dead: bool = True):
    """Every tag is there, and what it holds makes sense (not only that it exists)."""
    tags = events.Tags()
    for prefix in ("filters/", "deconv/", "evolution/"):
        found = [t for t in tags["images"] if t.startswith(prefix)]
        assert found, (prefix, tags["images"])
        for tag in found:
            image = _pixels(events.Images(tag)[-1])
            assert image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 16, (tag, image.shape)
            assert image.std() > 1.0, f"{tag} is a constant picture"
    cka = [t for t in tags["scalars"] if t.startswith("cka/")]
    assert cka, tags["scalars"]
    # unbiased (U-centred) CKA is a cosine: within [-1, 1], negative only by chance on tiny probes
    assert all(-1 - 1e-6 <= e.value <= 1 + 1e-6 for t in cka for e in events.Scalars(t))
    if dead:
        assert "dead/total" in tags["scalars"], tags["scalars"]
        fractions = [e.value for t in tags["scalars"] if t.startswith("dead/") for e in events.Scalars(t)]
        assert fractions and all(0.0 <= v <= 1.0 for v in fractions), fractions


@pytest.mark.parametrize("package", PACKAGES)
def test_all_four_together_observe_without_changing_the_experiment(tmp_path, package):
    plain = fit_weights(tmp_path / "plain", small_cnn, package=package, max_epochs=2, limit_train_batches=3)
    watched = fit_weights(tmp_path / "watched", small_cnn, most_frequent(), package=package, max_epochs=2,
                          limit_train_batches=3)  # fmt: skip
    assert_bit_identical(plain, watched)
    assert_everything_logged(read_events(tmp_path / "watched"))


def test_csv_logger_alone_gets_the_scalars_and_one_warning(tmp_path):
    lib = pl()
    t = trainer(tmp_path, callbacks=most_frequent(), logger=lib.loggers.CSVLogger(str(tmp_path), name="csv"),
                max_epochs=2, limit_train_batches=3)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(make_module(small_cnn()))
    said = [str(w.message) for w in caught if "no TensorBoardLogger" in str(w.message)]
    assert len(said) == 1, said
    assert "FilterGrid" in said[0] and "DeconvProjection" in said[0]
    (path,) = glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))
    with open(path) as f:
        columns = next(csv.reader(f))
    assert "dead/total" in columns and "train/loss" in columns
    assert any(c.startswith("cka/") for c in columns), columns


def test_several_loggers_at_once(tmp_path):
    lib = pl()
    loggers = [lib.loggers.TensorBoardLogger(str(tmp_path), name="tb"), lib.loggers.CSVLogger(str(tmp_path), name="csv")]
    t = trainer(tmp_path, callbacks=most_frequent(), logger=loggers, max_epochs=2, limit_train_batches=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(make_module(small_cnn()))
    assert not [w for w in caught if "TensorBoardLogger" in str(w.message)]
    assert_everything_logged(read_events(tmp_path / "tb"))
    (path,) = glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))
    with open(path) as f:
        assert "dead/total" in next(csv.reader(f))


def test_logger_false_trains_and_warns_once(tmp_path):
    callbacks = most_frequent()
    t = trainer(tmp_path, callbacks=callbacks, logger=False, max_epochs=2, limit_train_batches=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(make_module(small_cnn()))
    assert sum("no logger" in str(w.message) for w in caught) == 1
    monitor = callbacks[2]  # results are still there to read
    assert monitor.windows_completed >= 2 and set(monitor.dead_channels) == set(monitor.sites) == {"net.2", "net.5"}


# --------------------------------------------------------------------------- architectures
ARCHITECTURES = [
    "resnet18",
    "vgg11_bn",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "squeezenet1_1",
    "shufflenet_v2_x0_5",
    "convnext_tiny",
]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:DeadNeuronMonitor at step")  # tiny random nets do lose channels
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_any_torchvision_cnn(tmp_path, arch):
    net = getattr(torchvision.models, arch)(weights=None, num_classes=4)
    module = make_module(net, n=8, size=32, batch_size=4)
    callbacks = most_frequent()
    trainer(tmp_path, callbacks=callbacks, max_epochs=2, limit_train_batches=2, limit_val_batches=1).fit(module)
    # efficientnet (SiLU) and convnext (GELU) have no ReLU: SiLU and GELU are watched all the same
    assert_everything_logged(read_events(tmp_path))
    assert callbacks[2].sites and callbacks[2].windows_completed >= 1


class OneByOne(nn.Module):
    """Feature maps that end at 1x1."""

    def __init__(self, in_channels):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 4), nn.ReLU(),  # 4x4 -> 1x1
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("channels", [1, 4])
def test_one_and_four_channel_inputs_and_1x1_maps(tmp_path, channels):
    module = make_module(OneByOne(channels), channels=channels, size=16)
    trainer(tmp_path, callbacks=most_frequent(), max_epochs=2, limit_train_batches=2).fit(module)
    assert_everything_logged(read_events(tmp_path))


# --------------------------------------------------------------------------- precision and layout
def planted_cnn() -> nn.Module:
    """small_cnn with dead channels planted: ``net.2`` {2, 5} (BatchNorm shift), ``net.5`` {3}."""
    net = small_cnn()
    with torch.no_grad():
        net[1].bias[[2, 5]] = -1e4
        net[4].bias[3] = -1e4
    return net


def assert_projections_inside_receptive_fields(module) -> None:
    """Units of ``net.4`` (conv3 -> pool2 -> conv3, padding 1) see rows/cols 2i-3 ... 2i+4."""
    from lightning_vis import project

    probe = module.x[:4].float().contiguous()
    result = project(module, probe, "net.4", top_k=3)
    support = result.images.abs().sum(dim=2) > 0  # [N, K, H, W]
    assert support.any()
    for n in range(probe.shape[0]):
        for k in range(3):
            i, j = result.locations[n, k].tolist()
            rows, cols = support[n, k].nonzero(as_tuple=True)
            if rows.numel():
                assert rows.min() >= 2 * i - 3 and rows.max() <= 2 * i + 4, (n, k, i, rows)
                assert cols.min() >= 2 * j - 3 and cols.max() <= 2 * j + 4, (n, k, j, cols)


@pytest.mark.parametrize("setting", ["fp32", "bf16-mixed", "channels_last"])
def test_precision_and_memory_format_give_the_same_findings(tmp_path, setting):
    module = make_module(planted_cnn())
    options = {"precision": "bf16-mixed"} if setting == "bf16-mixed" else {}
    if setting == "channels_last":
        module = module.to(memory_format=torch.channels_last)
        module.x = module.x.contiguous(memory_format=torch.channels_last)
    callbacks = most_frequent()
    trainer(tmp_path, callbacks=callbacks, max_epochs=2, limit_train_batches=2, **options).fit(module)
    assert_everything_logged(read_events(tmp_path))
    monitor = callbacks[2]
    assert monitor.dead_channels == {"net.2": [2, 5], "net.5": [3]}, monitor.dead_channels
    assert monitor.dead_filters("net.0") == [2, 5] and monitor.dead_filters("net.4") == [3]
    assert_projections_inside_receptive_fields(module)


@pytest.mark.slow
def test_torch_compile(tmp_path):
    module = make_module(small_cnn())
    compiled = torch.compile(module)
    t = trainer(tmp_path, callbacks=most_frequent(), max_epochs=2, limit_train_batches=2)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        t.fit(compiled)
    events = read_events(tmp_path)
    tags = events.Tags()
    assert any(t.startswith("filters/") for t in tags["images"])
    assert any(t.startswith("deconv/") for t in tags["images"])


# --------------------------------------------------------------------------- distributed
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp"])
def test_ddp_two_cpu_processes(tmp_path, strategy):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "ddp_script.py"), strategy, str(tmp_path), "lightning.pytorch"],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    # identical probes and identical (reduced) decisions on both ranks
    assert reports[0]["deconv_probe"] == reports[1]["deconv_probe"] is not None
    assert reports[0]["evolution_probe"] == reports[1]["evolution_probe"] is not None
    assert reports[0]["dead"] == reports[1]["dead"]
    assert reports[0]["dead"]["net.2"] == [5]
    # exactly one writer
    files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    assert_everything_logged(read_events(tmp_path))


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: FilterGrid(every_n_steps=-1), ValueError, r"every_n_steps=-1"),
        (lambda: DeconvProjection(top_k=0), ValueError, r"top_k=0"),
        (lambda: DeconvProjection(every_n_epochs=0), ValueError, r"every_n_epochs=0"),
        (lambda: DeconvProjection(method="lrp"), ValueError, r"'deconvnet'.*'guided'.*'saliency'"),
        (lambda: DeconvProjection(probe=torch.zeros(3, 3)), ValueError, r"probe"),
        (lambda: DeadNeuronMonitor(every_n_steps=0), ValueError, r"every_n_steps=0"),
        (lambda: DeadNeuronMonitor(alert_fraction=1.5), ValueError, r"alert_fraction=1.5"),
        (lambda: DeadNeuronMonitor(window=0), ValueError, r"window=0"),
        (lambda: FeatureEvolution(top_k=0), ValueError, r"top_k=0"),
        (lambda: FeatureEvolution(every_n_epochs=-2), ValueError, r"every_n_epochs=-2"),
    ],
)
def test_bad_arguments_fail_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize(
    "callback, message",
    [
        (FilterGrid(layer="net.8"), r"Module 'net\.8' \(Linear\) cannot be used here; convolutions are"),
        (DeconvProjection(layers=["net.nope"]), r"No module 'net\.nope'.*'net\.0', 'net\.4'"),
        (DeconvProjection(layers="conv*"), r"Pattern 'conv\*' matches nothing"),
        (DeconvProjection(top_k=64), r"top_k=64"),
        (DeconvProjection(probe=torch.randn(2, 1, 16, 16)), r"probe.*\(2, 1, 16, 16\).*3 channels"),
        (DeadNeuronMonitor(layers="net.nope"), r"net\.nope.*net\.2"),
        (FeatureEvolution(layers="nope*"), r"Pattern 'nope\*' matches nothing"),
        (FeatureEvolution(top_k=99), r"top_k=99"),
    ],
)
def test_bad_input_fails_before_the_first_step(tmp_path, callback, message):
    module = make_module(small_cnn())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, callbacks=[callback], limit_train_batches=2).fit(module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()), "trained before failing"


@pytest.mark.parametrize("make", [FilterGrid, DeconvProjection, FeatureEvolution])
def test_model_without_convolution_fails_before_the_first_step(tmp_path, make):
    module = make_module(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)))
    with pytest.raises(ValueError, match="no convolution"):
        trainer(tmp_path, callbacks=[make()], limit_train_batches=2).fit(module)
