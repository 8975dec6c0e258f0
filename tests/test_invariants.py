"""The observer does not change the experiment: every callback, alone and all together, gives
bit-identical weights to training without it — on a model with dropout and a dataset with a
random augmentation, so that an RNG draw we fail to restore changes the run (DESIGN
"Invariants")."""

from __future__ import annotations

import contextlib
from functools import partial

import pytest

import lightning_vis.callbacks._base as base
import lightning_vis.isolation as isolation
from lightning_vis.callbacks import DeadNeuronMonitor, DeconvProjection, FeatureEvolution, FilterGrid
from tests.helpers import PACKAGES, assert_bit_identical, fit_weights, read_events, small_cnn


def every_callback():
    """Each callback at a frequent setting, so it runs many times in a short fit."""
    return {
        "FilterGrid": lambda: FilterGrid(every_n_steps=1),
        "DeconvProjection": lambda: DeconvProjection(top_k=2, every_n_steps=1),
        "DeadNeuronMonitor": lambda: DeadNeuronMonitor(every_n_steps=1, window=2),
        "FeatureEvolution": lambda: FeatureEvolution(top_k=2, num_probe=8),
    }


NET = partial(small_cnn, dropout=0.3)
FIT = dict(max_epochs=2, limit_train_batches=3, augment=True)


@pytest.mark.parametrize("name", list(every_callback()))
def test_each_callback_alone(tmp_path, name):
    plain = fit_weights(tmp_path / "plain", NET, **FIT)
    watched = fit_weights(tmp_path / "watched", NET, [every_callback()[name]()], **FIT)
    assert_bit_identical(plain, watched)
    assert read_events(tmp_path / "watched").Tags()  # it did run and log


@pytest.mark.parametrize("package", PACKAGES)
def test_all_callbacks_together(tmp_path, package):
    plain = fit_weights(tmp_path / "plain", NET, package=package, **FIT)
    callbacks = [make() for make in every_callback().values()]
    watched = fit_weights(tmp_path / "watched", NET, callbacks, package=package, **FIT)
    assert_bit_identical(plain, watched)


@pytest.mark.parametrize("name", list(every_callback()))
def test_the_test_fails_without_rng_restoration(tmp_path, monkeypatch, name):
    """Without ``preserved_rng``, sampling probe images draws from the augmentation's RNG: weights differ."""
    monkeypatch.setattr(isolation, "preserved_rng", contextlib.nullcontext)
    monkeypatch.setattr(base, "preserved_rng", contextlib.nullcontext)
    plain = fit_weights(tmp_path / "plain", NET, **FIT)
    watched = fit_weights(tmp_path / "watched", NET, [every_callback()[name]()], **FIT)
    with pytest.raises(AssertionError, match="weights differ"):
        assert_bit_identical(plain, watched)
