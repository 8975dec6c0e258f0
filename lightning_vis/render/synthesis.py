"""Pictures of synthesised images: what units want to see, what a layer keeps of an image.

Pure functions: tensors in, uint8 CHW out (grids laid out here, text drawn with Pillow).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lightning_vis.render._core import _as_rgb, _font, _resize, to_uint8

__all__ = ["inversion_panel", "labelled_grid", "maximization_panel", "to_display"]


def to_display(images: torch.Tensor, value_range: tuple | None = None) -> torch.Tensor:
    """Images in model-input units as float RGB in [0, 1] for display.

    With ``value_range=(lo, hi)`` (floats or per-channel sequences) the data's range is
    mapped to [0, 1] (faithful colours); without it each image is min-max scaled.

    Example::

        >>> to_display(torch.tensor([[[[-2.0, 0.0, 2.0]]]]), (-2.0, 2.0)).shape
        torch.Size([1, 3, 1, 3])
        >>> to_display(torch.tensor([[[[-2.0, 0.0, 2.0]]]]), (-2.0, 2.0))[0, 0, 0].tolist()
        [0.0, 0.5, 1.0]
    """
    x = images.detach().float().cpu()
    if value_range is not None:
        c = x.shape[-3]
        lo, hi = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in value_range)
        lo = lo.expand(c) if lo.numel() == 1 else lo
        hi = hi.expand(c) if hi.numel() == 1 else hi
        x = (x - lo.view(c, 1, 1)) / (hi - lo).view(c, 1, 1)
    else:
        flat = x.reshape(*x.shape[:-3], -1)
        lo = flat.amin(-1)[..., None, None, None]
        hi = flat.amax(-1)[..., None, None, None]
        x = torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), torch.full_like(x, 0.5))
    return _as_rgb(x.clamp(0, 1))


def labelled_grid(
    cells: torch.Tensor,
    labels: Sequence[str] = (),
    *,
    ncol: int | None = None,
    cell_px: int = 64,
    gap: int = 4,
    font_px: int = 11,
    title: str | None = None,
) -> torch.Tensor:
    """Cells ``[N, 3, h, w]`` (float in [0, 1]) on a white grid, each with a label above.

    ``ncol`` defaults to a near-square grid. Cells are resized (nearest) to ``cell_px``
    on their longer side. Returns uint8 ``[3, H, W]``.

    Example::

        >>> img = labelled_grid(torch.rand(5, 3, 8, 8), [f"c{i}" for i in range(5)], cell_px=24)
        >>> img.dtype, img.shape[0], img.shape[2] >= 3 * 24
        (torch.uint8, 3, True)
    """
    n, _, h, w = cells.shape
    labels = list(labels)
    if labels and len(labels) != n:
        raise ValueError(f"Got {len(labels)} labels for {n} cells")
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    ch, cw = (cell_px, max(1, round(cell_px * w / h))) if h >= w else (max(1, round(cell_px * h / w)), cell_px)

    import numpy as np
    from PIL import Image, ImageDraw

    font = _font(font_px)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = max((measure.textbbox((0, 0), t, font=font)[3] for t in labels), default=0)
    text_h = text_h + 2 if labels else 0
    title_h = font_px + 6 if title else 0
    pitch_w = max([cw] + [measure.textbbox((0, 0), t, font=font)[2] + 2 for t in labels])
    width = gap + ncol * (pitch_w + gap)
    height = title_h + gap + nrow * (text_h + ch + gap)
    canvas = torch.ones(3, height, width)
    for i in range(n):
        r, c = divmod(i, ncol)
        y = title_h + gap + r * (text_h + ch + gap) + text_h
        x = gap + c * (pitch_w + gap) + (pitch_w - cw) // 2
        canvas[:, y : y + ch, x : x + cw] = _resize(cells[i].float().cpu(), (ch, cw))
    image = Image.fromarray(to_uint8(canvas).permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((gap, 2), title, fill=(0, 0, 0), font=_font(font_px + 1))
    for i, text in enumerate(labels):
        r, c = divmod(i, ncol)
        x0, y0, x1, _ = measure.textbbox((0, 0), text, font=font)
        x = gap + c * (pitch_w + gap) + (pitch_w - (x1 - x0)) // 2
        y = title_h + gap + r * (text_h + ch + gap)
        draw.text((x - x0, y - y0), text, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def maximization_panel(
    result: object,
    *,
    value_range: tuple | None = None,
    cell_px: int = 64,
    font_px: int = 11,
    title: str | None = None,
) -> torch.Tensor:
    """What each unit wants to see: a :class:`lightning_vis.synthesis.Maximization` as one image.

    One cell per unit (near-square grid), labelled ``c<channel> <reached activation>``;
    with facets, one row per unit and one column per facet (each labelled with its own
    reached activation). Colours are the data's (``value_range`` mapped to [0, 1]) when
    given, else each image is min-max scaled.

    Example::

        >>> from torch import nn
        >>> from lightning_vis.synthesis import maximize
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> img = maximization_panel(maximize(net, "1", [0, 1, 2], size=12, steps=2), value_range=(0, 1))
        >>> img.dtype, img.shape[0]
        (torch.uint8, 3)
    """
    images = result.images
    acts = result.activations
    chans = result.channels.tolist()
    if images.ndim == 5:  # facets: units x facets
        u, k = images.shape[:2]
        cells = to_display(images.reshape(u * k, *images.shape[2:]), value_range)
        labels = [f"c{chans[i]}·f{j}: {float(acts[i, j]):.3g}" for i in range(u) for j in range(k)]
        return labelled_grid(cells, labels, ncol=k, cell_px=cell_px, font_px=font_px, title=title)
    cells = to_display(images, value_range)
    labels = [f"c{c}: {float(a):.3g}" for c, a in zip(chans, acts.tolist())]
    return labelled_grid(cells, labels, cell_px=cell_px, font_px=font_px, title=title)


def inversion_panel(
    originals: torch.Tensor,
    result: object,
    *,
    value_range: tuple | None = None,
    cell_px: int = 64,
    font_px: int = 11,
) -> torch.Tensor:
    """Originals beside their reconstructions from one layer (:class:`lightning_vis.synthesis.Inversion`).

    Pairs ``image | reconstruction`` in a near-square grid, labelled ``image`` and
    ``err <relative feature error>``, under a title naming the layer.

    Example::

        >>> from torch import nn
        >>> from lightning_vis.synthesis import invert
        >>> x = torch.rand(2, 3, 8, 8)
        >>> img = inversion_panel(x, invert(nn.Sequential(nn.Conv2d(3, 8, 3)), x, "0", steps=2), value_range=(0, 1))
        >>> img.dtype, img.shape[0]
        (torch.uint8, 3)
    """
    n = originals.shape[0]
    if result.images.shape != originals.shape:
        raise ValueError(f"originals {tuple(originals.shape)} do not match the reconstructions {tuple(result.images.shape)}")
    a, b = to_display(originals, value_range), to_display(result.images, value_range)
    cells = torch.stack([a, b], 1).reshape(2 * n, *a.shape[1:])
    labels = [t for e in result.feature_error.tolist() for t in ("image", f"err {e:.3f}")]
    pairs_per_row = max(1, math.ceil(math.sqrt(n / 2)))
    return labelled_grid(
        cells, labels, ncol=2 * pairs_per_row, cell_px=cell_px, font_px=font_px, title=f"{result.layer}: image | inverted"
    )
