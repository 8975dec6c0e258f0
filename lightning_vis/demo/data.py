"""A seeded, procedural dataset of coloured shapes and oriented textures (no downloads).

Ten classes: gratings at 0°, 45°, 90° and 135°, a checkerboard, and a disc, square,
triangle, ring and cross. Each image is a random scene: a cluttered background (colour
blobs, sometimes a faint grating of any orientation), one to three smaller distractor
shapes, and the object that gives the label, with random colours and contrast (some
low), position, scale and rotation. Shapes are sometimes filled with a texture, gratings
sometimes cover only part of the image, and every image gets sensor noise of random
strength. To tell the classes apart a network needs oriented-edge and colour detectors,
which is what its first-layer filters become; the clutter keeps it learning for many
epochs, and some images are hard enough that validation accuracy stays below 100%.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["CLASSES", "ShapesDataset", "make_shapes"]

CLASSES = (
    "stripes 0°",
    "stripes 45°",
    "stripes 90°",
    "stripes 135°",
    "checker",
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
)
MEAN, STD = 0.5, 0.25
_SHAPES = ("disc", "square", "triangle", "ring", "cross")
_FIRST_SHAPE = CLASSES.index("disc")


def _colour_pair(rng: np.random.Generator, min_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours at least ``min_distance`` apart (L1); small distances are hard cases."""
    a = rng.uniform(0.0, 1.0, 3)
    for _ in range(100):
        b = rng.uniform(0.0, 1.0, 3)
        if np.abs(a - b).sum() >= min_distance:
            break
    return a, b


def _soft(signed_distance: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (negative inside), about one pixel wide."""
    return np.clip(0.5 - signed_distance * size, 0.0, 1.0)


def _shape_sdf(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float,
               rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """Signed distance (in image units) to a shape of radius ``r`` rotated by ``angle``."""
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == "disc":
        return np.sqrt(dy**2 + dx**2) - r
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    if kind == "triangle":  # equilateral, centroid at the centre: three half-planes
        normals = [angle + np.pi / 2 + k * 2 * np.pi / 3 for k in range(3)]
        return np.max([dx * np.cos(t) + dy * np.sin(t) for t in normals], axis=0) - 0.55 * r
    if kind == "ring":
        width = rng.uniform(0.22, 0.4) * r
        return np.abs(np.sqrt(dy**2 + dx**2) - (r - width / 2)) - width / 2
    if kind == "cross":
        arm = rng.uniform(0.22, 0.36) * r
        bar1 = np.maximum(np.abs(u) - r, np.abs(v) - arm)
        bar2 = np.maximum(np.abs(v) - r, np.abs(u) - arm)
        return np.minimum(bar1, bar2)
    raise ValueError(f"unknown shape {kind!r}")  # pragma: no cover


def _grating(yy: np.ndarray, xx: np.ndarray, theta: float, rng: np.random.Generator) -> np.ndarray:
    """A grating in [0, 1] at orientation ``theta`` (the stripes run along it), random frequency,
    phase and edge sharpness (from sine-like to square-wave)."""
    freq = rng.uniform(2.5, 6.5)
    phase = rng.uniform(0, 2 * np.pi)
    sharp = rng.uniform(0.6, 4.0)
    wave = np.sin(2 * np.pi * freq * (-xx * np.sin(theta) + yy * np.cos(theta)) + phase)
    return np.clip(0.5 + sharp * wave / 2, 0.0, 1.0)


def _checker(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, np.pi / 2)
    freq = rng.uniform(2.0, 4.5)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    phase = rng.uniform(0, 2 * np.pi, 2)
    return (np.sin(2 * np.pi * freq * u + phase[0]) * np.sin(2 * np.pi * freq * v + phase[1]) > 0).astype(np.float32)


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray | np.ndarray) -> np.ndarray:
    """Alpha-blend ``colour`` (RGB, or an RGB image) into ``img`` where ``mask`` covers."""
    colour = colour if colour.ndim == 3 else colour[:, None, None]
    return img * (1 - mask[None]) + colour * mask[None]


def _background(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(0.0, 1.0, 3)
    img = np.broadcast_to(base[:, None, None], (3, *yy.shape)).copy()
    for _ in range(rng.integers(1, 4)):  # soft colour blobs
        cy, cx = rng.uniform(-0.1, 1.1, 2)
        s = rng.uniform(0.15, 0.45)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)) * rng.uniform(0.3, 0.8)
        img = _paint(img, blob, rng.uniform(0.0, 1.0, 3))
    if rng.random() < 0.35:  # a faint grating of any orientation: texture clutter
        g = _grating(yy, xx, rng.uniform(0, np.pi), rng)
        img = img + rng.uniform(0.08, 0.2) * (g[None] - 0.5)
    return img


def _textured(yy: np.ndarray, xx: np.ndarray, fg: np.ndarray, bg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fill of two colours along a grating of random orientation."""
    g = _grating(yy, xx, rng.uniform(0, np.pi), rng)[None]
    return g * fg[:, None, None] + (1 - g) * bg[:, None, None]


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    yy.setflags(write=False)  # shared by every image of this size
    xx.setflags(write=False)
    return yy, xx


def _draw(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = _grid(size)
    img = _background(yy, xx, rng)
    # distractors: small shapes of any kind, drawn before the object (it may cover them)
    for _ in range(rng.integers(1, 4)):
        kind = _SHAPES[rng.integers(len(_SHAPES))]
        cy, cx = rng.uniform(0.05, 0.95, 2)
        sdf = _shape_sdf(kind, yy, xx, cy, cx, rng.uniform(0.06, 0.12), rng.uniform(0, np.pi), rng)
        img = _paint(img, _soft(sdf, size), rng.uniform(0.0, 1.0, 3))
    fg, bg = _colour_pair(rng, rng.uniform(0.45, 1.4))
    if label < _FIRST_SHAPE:  # a texture over the whole image or a large region of it
        if label < 4:
            pattern = _grating(yy, xx, np.deg2rad(45.0 * label + rng.normal(0, 7)), rng)
        else:
            pattern = _checker(yy, xx, rng)
        fill = pattern[None] * fg[:, None, None] + (1 - pattern[None]) * bg[:, None, None]
        if rng.random() < 0.5:
            region = np.ones_like(yy)
        else:  # a large rotated rectangle, at least about half the image
            cy, cx = rng.uniform(0.3, 0.7, 2)
            h, w = rng.uniform(0.32, 0.5, 2)
            a = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
            v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
            region = _soft(np.maximum(np.abs(u) - w, np.abs(v) - h), size)
        img = _paint(img, region * rng.uniform(0.75, 1.0), fill)
    else:
        kind = CLASSES[label]
        cy, cx = rng.uniform(0.28, 0.72, 2)
        sdf = _shape_sdf(kind, yy, xx, cy, cx, rng.uniform(0.17, 0.36), rng.uniform(0, 2 * np.pi), rng)
        colour = _textured(yy, xx, fg, bg, rng) if rng.random() < 0.3 else fg
        img = _paint(img, _soft(sdf, size), colour)
    img = img * rng.uniform(0.7, 1.15) + rng.uniform(-0.12, 0.12, 3)[:, None, None]  # exposure, colour cast
    img = img + rng.normal(0, rng.uniform(0.02, 0.12), img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def make_shapes(n: int, *, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, 3, size, size]`` (normalised to mean 0.5 / std 0.25) and labels.

    The same ``seed`` always gives the same data; classes are balanced and shuffled.
    Label ``i`` is the class ``CLASSES[i]``.

    Example::

        >>> x, y = make_shapes(20, size=24, seed=1)
        >>> x.shape, y.shape, int(y.max()) < len(CLASSES)
        (torch.Size([20, 3, 24, 24]), torch.Size([20]), True)
        >>> torch.equal(x, make_shapes(20, size=24, seed=1)[0])
        True
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"Invalid value for n={n!r}. Must be an int >= 0")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"Invalid value for size={size!r}. Must be an int >= 8")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    images = np.stack([_draw(int(label), size, rng) for label in labels]) if n else np.zeros((0, 3, size, size))
    x = (torch.from_numpy(images.astype(np.float32)) - MEAN) / STD
    return x, torch.from_numpy(labels).long()


class ShapesDataset(Dataset):
    """:func:`make_shapes` as a map-style dataset of ``(image, label)`` pairs.

    ``classes`` holds the class names (label ``i`` is ``classes[i]``), as torchvision's
    datasets do, so callbacks can show names instead of numbers.

    Example::

        >>> ds = ShapesDataset(10, size=16)
        >>> len(ds), ds.classes[int(ds[0][1])] in CLASSES
        (10, True)
    """

    classes = list(CLASSES)

    def __init__(self, n: int = 4096, *, size: int = 32, seed: int = 0) -> None:
        self.images, self.labels = make_shapes(n, size=size, seed=seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]
