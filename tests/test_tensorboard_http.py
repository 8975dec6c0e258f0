"""The real thing: `tensorboard --logdir` serves our images and scalars over its HTTP data API."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from lightning_vis import callbacks as vis
from lightning_vis.demo import run_demo

# what each callback must show in TensorBoard: (plugin, tag prefix)
EXPECTED = {
    "FilterGrid": [("images", "filters/")],
    "DeconvProjection": [("images", "deconv/")],
    "DeadNeuronMonitor": [("scalars", "dead/total")],
    "FeatureEvolution": [("images", "evolution/"), ("scalars", "cka/")],
    "ClassAttribution": [("images", "attribution/")],
    "FeatureMaps": [("images", "feature_maps/")],
    "TopActivations": [("images", "top_activations/")],
    "ClassUnitStatistics": [("images", "class_units/similarity"), ("scalars", "class_units/accuracy@")],
    "EmbeddingProjector": [("images", "embedding/neighbours"), ("scalars", "embedding/neighbour_agreement")],
    "ActivationMaximization": [("images", "maximization/")],
    "FeatureInversion": [("images", "inversion/")],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, **params) -> bytes:
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@pytest.mark.slow
def test_tensorboard_serves_every_callbacks_output(tmp_path):
    logdir = tmp_path / "runs"
    callbacks = vis.suite(options={
        "FilterGrid": {"every_n_steps": 8}, "DeconvProjection": {"top_k": 4}, "DeadNeuronMonitor": {"window": 2},
        "FeatureEvolution": {"top_k": 2}, "EmbeddingProjector": {"every_n_epochs": 1, "num_samples": 64},
        "ActivationMaximization": {"every_n_epochs": 1, "steps": 4}, "FeatureInversion": {"every_n_epochs": 1, "steps": 4},
    })  # fmt: skip
    assert sorted(type(cb).__name__ for cb in callbacks) == sorted(EXPECTED)  # every callback is in the suite
    run_demo(str(logdir), epochs=2, train_size=256, batch_size=16, callbacks=callbacks, enable_progress_bar=False)
    port = _free_port()
    exe = shutil.which("tensorboard")
    cmd = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    proc = subprocess.Popen(
        [*cmd, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        runs: list = []
        while time.monotonic() < deadline:
            try:
                runs = json.loads(_get(port, "/data/runs"))
                if runs:
                    break
            except OSError:
                pass
            assert proc.poll() is None, "tensorboard exited"
            time.sleep(0.5)
        assert runs == ["demo/version_0"]
        run = runs[0]
        tags = {plugin: json.loads(_get(port, f"/data/plugin/{plugin}/tags"))[run] for plugin in ("images", "scalars")}
        assert "train/loss" in tags["scalars"]
        for name in (type(cb).__name__ for cb in callbacks):
            for plugin, prefix in EXPECTED[name]:
                assert any(t.startswith(prefix) for t in tags[plugin]), f"{name}: no {prefix} in {sorted(tags[plugin])}"
        # read one image of each kind back, as the browser does
        for tag in tags["images"]:
            samples = json.loads(_get(port, "/data/plugin/images/images", run=run, tag=tag))
            assert samples
            png = _get(port, "/data/plugin/images/individualImage?" + samples[-1]["query"])
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
        loss = json.loads(_get(port, "/data/plugin/scalars/scalars", run=run, tag="train/loss"))
        assert len(loss) >= 2 and all(len(row) == 3 for row in loss)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
