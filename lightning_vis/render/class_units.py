"""Pictures and tables of class-level unit statistics (:mod:`lightning_vis.class_stats`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from lightning_vis.render._core import _font

__all__ = ["similarity_heatmap", "units_markdown"]

_NAN_RGB = (0.85, 0.85, 0.85)


def _label(k: int, names: Sequence[str] | None, width: int = 18) -> str:
    name = names[k] if names is not None and k < len(names) else ""
    text = f"{k} {name}".strip()
    return text if len(text) <= width else text[: width - 1] + "…"


def similarity_heatmap(
    similarity: torch.Tensor,
    names: Sequence[str] | None = None,
    *,
    title: str | None = None,
    cmap: str = "viridis",
    max_px: int = 270,
) -> torch.Tensor:
    """A class × class similarity matrix as a labelled heatmap (Shang et al., Table 3 as a picture).

    One square cell per pair of classes, coloured by cosine similarity (matplotlib
    colour map ``cmap``, from the smallest value (rounded down to 0.1) to 1, with a colour scale
    below); each cell shows its value when cells are large enough (>= 28 px). Rows are
    labelled with the class index and name, columns with the index. A NaN (a class
    without samples) is a light-grey cell. Close to square, so it stays legible at
    TensorBoard's card size.

    Args:
        similarity: ``[K, K]`` values (cosine similarity: in [-1, 1]).
        names: class names, shown beside the row indices.
        title: drawn above the map.
        cmap: a matplotlib colour map name.
        max_px: the matrix's side in pixels at most (cells are 24-64 px).

    Returns:
        uint8 tensor ``[3, H, W]``.

    Raises:
        ValueError: ``similarity`` is not square, or ``cmap`` is unknown.

    Example::

        >>> img = similarity_heatmap(torch.tensor([[1.0, 0.2], [0.2, 1.0]]), ["cat", "dog"], title="epoch 3")
        >>> img.dtype, img.shape[0], img.shape[1] > 2 * 24, bool(img.float().std() > 0)
        (torch.uint8, 3, True, True)
    """
    import matplotlib
    import numpy as np
    from PIL import Image, ImageDraw

    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1] or similarity.shape[0] < 1:
        raise ValueError(f"similarity must be a square matrix [K, K], got {tuple(similarity.shape)}")
    if cmap not in matplotlib.colormaps:
        raise ValueError(f"Unknown colour map cmap={cmap!r}; e.g. 'viridis', 'magma', 'cividis'")
    values = similarity.detach().double().cpu()
    k = values.shape[0]
    finite = values[~torch.isnan(values)]
    # the colour range starts at the smallest value (rounded down to 0.1), so the usual
    # all-positive similarities of rectified units are not squeezed into the top of the map
    low = min(0.8, math.floor(float(finite.min()) * 10) / 10) if finite.numel() else 0.0
    high = max(1.0, float(finite.max())) if finite.numel() else 1.0
    lut = matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3]

    def colour(v: float) -> tuple[int, int, int]:
        if math.isnan(v):
            rgb = _NAN_RGB
        else:
            rgb = lut[int(round((v - low) / (high - low) * 255))]
        return tuple(int(round(c * 255)) for c in rgb)

    cell = max(24, min(64, max_px // k))
    font = _font(max(10, min(14, cell // 3)))
    small = _font(11)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [_label(i, names) for i in range(k)]
    label_w = int(max(measure.textlength(t, font=font) for t in labels)) + 10
    pad = 8
    top = pad + (20 if title else 0) + 16  # title, then column indices
    grid = cell * k
    bar_top = top + grid + 12
    height = bar_top + 12 + 18 + pad
    width = max(label_w + grid + pad, label_w + 240 + pad)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    for j in range(k):
        text = str(j)
        x = label_w + j * cell + (cell - measure.textlength(text, font=small)) / 2
        draw.text((x, top - 15), text, fill=(0, 0, 0), font=small)
    for i in range(k):
        y = top + i * cell
        draw.text((label_w - 6 - measure.textlength(labels[i], font=font), y + cell / 2 - 7), labels[i],
                  fill=(0, 0, 0), font=font)  # fmt: skip
        for j in range(k):
            v = float(values[i, j])
            x = label_w + j * cell
            rgb = colour(v)
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=rgb)
            if cell >= 28:
                text = "n/a" if math.isnan(v) else _short(v)
                luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
                ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
                tw = measure.textlength(text, font=small)
                draw.text((x + (cell - 2 - tw) / 2, y + (cell - 2) / 2 - 6), text, fill=ink, font=small)
    # colour scale
    bar_w = max(160, min(grid, 320))
    for t in range(bar_w):
        v = low + (high - low) * t / (bar_w - 1)
        draw.line([label_w + t, bar_top, label_w + t, bar_top + 10], fill=colour(v))
    for v in dict.fromkeys([low, *(t for t in (0.0, 0.5, 1.0) if low + 0.15 <= t <= high)]):
        x = label_w + (v - low) / (high - low) * (bar_w - 1)
        text = f"{v:g}"
        draw.text((x - measure.textlength(text, font=small) / 2, bar_top + 12), text, fill=(0, 0, 0), font=small)
    draw.text((label_w + bar_w + 8, bar_top - 2), "cosine", fill=(0, 0, 0), font=small)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def _short(v: float) -> str:
    """Two decimals without the leading zero (``.73``, ``-.05``); ``1.0`` for values that round to one."""
    text = f"{v:.2f}"
    if text in ("1.00", "-1.00"):
        return text[:-1]
    return text.replace("0.", ".", 1)


def _channels(channels: Sequence[int], limit: int = 40) -> str:
    shown = ", ".join(str(c) for c in list(channels)[:limit])
    if len(channels) > limit:
        shown += f", … ({len(channels) - limit} more)"
    return shown or "—"


def units_markdown(
    tops: Mapping[int, Sequence[int]],
    shared: Sequence[int],
    specific: Mapping[int, Sequence[int]],
    names: Sequence[str] | None = None,
    *,
    layer: str = "",
) -> str:
    """Shared and class-specific units as a Markdown table (TensorBoard's Text tab renders it).

    Args:
        tops: class -> its top-n channels, strongest first.
        shared: channels in every class's top-n.
        specific: class -> channels in its top-n only.
        names: class names.
        layer: the layer's name, for the heading.

    Example::

        >>> print(units_markdown({0: [1, 0], 1: [0, 3]}, [0], {0: [1], 1: [3]}, ["cat", "dog"], layer="conv4"))
        **conv4**: 1 unit shared by every class: 0; 2 class-specific units.
        <BLANKLINE>
        | class | top units (strongest first) | class-specific units |
        |---|---|---|
        | 0 cat | 1, 0 | 1 |
        | 1 dog | 0, 3 | 3 |
    """
    n_specific = sum(len(v) for v in specific.values())
    heading = f"**{layer}**: " if layer else ""
    lines = [
        f"{heading}{len(shared)} unit{'s' * (len(shared) != 1)} shared by every class: {_channels(shared)}; "
        f"{n_specific} class-specific unit{'s' * (n_specific != 1)}.",
        "",
        "| class | top units (strongest first) | class-specific units |",
        "|---|---|---|",
    ]
    for k, row in tops.items():
        label = _label(k, names, width=40)
        lines.append(f"| {label} | {_channels(row)} | {_channels(specific.get(k, []))} |")
    return "\n".join(lines)
