"""The demo's generated data: seeded, named classes, the right shapes, and not trivially separable."""

from __future__ import annotations

import pytest
import torch

from lightning_vis.demo.data import CLASSES, MEAN, STD, ShapesDataset, make_shapes


def test_deterministic_with_seed_and_different_across_seeds():
    a = make_shapes(30, size=16, seed=3)
    b = make_shapes(30, size=16, seed=3)
    c = make_shapes(30, size=16, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_shapes_value_range_and_balanced_classes():
    x, y = make_shapes(40, size=24, seed=0)
    assert x.shape == (40, 3, 24, 24) and x.dtype == torch.float32
    assert y.shape == (40,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=len(CLASSES)).tolist() == [4] * len(CLASSES)  # balanced
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert float(x.min()) >= lo and float(x.max()) <= hi  # pixels in [0, 1] before normalisation
    assert x.std(dim=(1, 2, 3)).min() > 0.1  # no blank images
    assert make_shapes(0, size=16)[0].shape == (0, 3, 16, 16)
    with pytest.raises(ValueError, match=r"size=4. Must be an int >= 8"):
        make_shapes(4, size=4)
    with pytest.raises(ValueError, match=r"n=-1. Must be an int >= 0"):
        make_shapes(-1)


def test_class_names_on_the_dataset_and_the_module():
    assert len(CLASSES) == 10 and len(set(CLASSES)) == 10
    ds = ShapesDataset(12, size=16, seed=0)
    assert ds.classes == list(CLASSES)
    x, y = ds[3]
    assert x.shape == (3, 16, 16) and 0 <= int(y) < 10
    from lightning_vis.callbacks._base import class_names
    from lightning_vis.demo import DemoModule

    module = DemoModule(train_size=64, val_size=16, image_size=16, width=8)
    assert module.classes == list(CLASSES)
    assert module.net.classifier.out_features == len(CLASSES)
    assert class_names(None, module) == list(CLASSES)


def test_every_class_differs_from_the_others_on_average():
    """Each class has its own look: no two classes are generated alike."""
    x, y = make_shapes(400, size=16, seed=5)
    # colours and positions are random, so compare the classes' mean amplitude spectra (orientation, shape)
    spectra = torch.stack([torch.fft.rfft2(x[y == c]).abs().mean(0).flatten() for c in range(len(CLASSES))])
    d = torch.cdist(spectra, spectra)
    assert (d + torch.eye(len(CLASSES)) * 1e9).min() > 0.5


def test_a_linear_probe_on_raw_pixels_is_far_from_solving_it():
    """Ridge regression on the raw pixels (a linear classifier, closed form) stays near chance on held-out
    images: the task needs features (oriented edges, shapes), not a pixel template. Chance is 10%."""
    xtr, ytr = make_shapes(600, size=16, seed=10)
    xte, yte = make_shapes(200, size=16, seed=11)

    def design(x):
        return torch.cat([x.flatten(1), torch.ones(len(x), 1)], 1).double()

    a = design(xtr)
    targets = torch.nn.functional.one_hot(ytr, len(CLASSES)).double()
    w = torch.linalg.solve(a.T @ a + 100.0 * torch.eye(a.shape[1], dtype=torch.double), a.T @ targets)
    train_acc = float(((a @ w).argmax(1) == ytr).double().mean())
    test_acc = float(((design(xte) @ w).argmax(1) == yte).double().mean())
    assert train_acc > 0.9  # the probe can fit (memorise) the training images ...
    assert test_acc < 0.35  # ... but does not generalise: not linearly separable in pixel space
