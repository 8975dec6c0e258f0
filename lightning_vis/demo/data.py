"""A seeded, procedural dataset of coloured shapes and oriented textures (no downloads).

Eight classes: gratings at 0°, 45°, 90° and 135°, and a filled disc, square, triangle
and ring. Every image has random colours, position, size, frequency and phase, and a
little noise: to tell the classes apart a network needs oriented-edge and colour
detectors, which is what its first-layer filters become.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["CLASSES", "ShapesDataset", "make_shapes"]

CLASSES = ("stripes 0°", "stripes 45°", "stripes 90°", "stripes 135°", "disc", "square", "triangle", "ring")
MEAN, STD = 0.5, 0.25


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = rng.uniform(0.0, 1.0, 3)
    b = rng.uniform(0.0, 1.0, 3)
    while np.abs(a - b).sum() < 0.9:  # keep foreground and background distinguishable
        b = rng.uniform(0.0, 1.0, 3)
    return a, b


def _draw(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    fg, bg = _colour_pair(rng)
    if label < 4:
        theta = np.deg2rad(45.0 * label + rng.normal(0, 4))
        freq = rng.uniform(3.0, 6.0)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
        mask = (wave > 0).astype(np.float32)
    else:
        cy, cx = rng.uniform(0.3, 0.7, 2)
        r = rng.uniform(0.18, 0.32)
        dy, dx = yy - cy, xx - cx
        if label == 4:
            mask = (dy**2 + dx**2 <= r**2).astype(np.float32)
        elif label == 5:
            mask = ((np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)).astype(np.float32)
        elif label == 6:
            mask = ((dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)).astype(np.float32)
        else:
            d = np.sqrt(dy**2 + dx**2)
            mask = ((d <= r) & (d >= r * 0.55)).astype(np.float32)
    img = mask[None] * fg[:, None, None] + (1 - mask[None]) * bg[:, None, None]
    img = img + rng.normal(0, 0.04, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def make_shapes(n: int, *, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, 3, size, size]`` (normalised to mean 0.5 / std 0.25) and labels.

    The same ``seed`` always gives the same data; classes are balanced and shuffled.

    Example::

        >>> x, y = make_shapes(16, size=24, seed=1)
        >>> x.shape, y.shape, int(y.max()) < len(CLASSES)
        (torch.Size([16, 3, 24, 24]), torch.Size([16]), True)
        >>> torch.equal(x, make_shapes(16, size=24, seed=1)[0])
        True
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    images = np.stack([_draw(int(label), size, rng) for label in labels])
    x = (torch.from_numpy(images) - MEAN) / STD
    return x, torch.from_numpy(labels).long()


class ShapesDataset(Dataset):
    """:func:`make_shapes` as a map-style dataset of ``(image, label)`` pairs."""

    def __init__(self, n: int = 4096, *, size: int = 32, seed: int = 0) -> None:
        self.images, self.labels = make_shapes(n, size=size, seed=seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]
