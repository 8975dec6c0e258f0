"""Pictures of units: the dataset patches that drive them, and the most active feature maps."""

from __future__ import annotations

import math

import numpy as np
import torch

from lightning_vis.render._core import (
    CARD_WIDTH_PX,
    UNIT_COLOURS,
    _as_rgb,
    _font,
    _resize,
    _scale,
    to_uint8,
)

__all__ = ["feature_maps_panel", "top_activations_grid"]

_OUTSIDE_RGB = (0.82, 0.82, 0.82)  # patch pixels outside the image: light grey hatch
_HATCH_RGB = (0.7, 0.7, 0.7)


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def _hatch(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    stripe = ((yy + xx) % 6 < 2).float()
    a, b = torch.tensor(_OUTSIDE_RGB).view(3, 1, 1), torch.tensor(_HATCH_RGB).view(3, 1, 1)
    return a * (1 - stripe) + b * stripe


def top_activations_grid(
    result: object,
    *,
    rows: torch.Tensor | list[int] | None = None,
    cell_px: int = 30,
    font_px: int = 10,
    gap: int = 3,
) -> torch.Tensor:
    """Units × top-k patches (CS231n "maximally activating patches", Zeiler & Fergus Fig. 2).

    One row per unit (labelled ``c<channel>`` on the left), one column per rank: the
    receptive-field patch of the unit's k-th strongest image, upscaled to ``cell_px``,
    framed in the row's colour and labelled below with its activation. Each patch is
    min-max scaled on its own (over the pixels inside the image); pixels where the field
    leaves the image are drawn as a light grey hatch. Empty slots (fewer images than
    ``top_k``) stay white.

    Args:
        result: a :class:`lightning_vis.units.TopActivationsResult` with patches.
        rows: which rows of the result to draw, in order (default: all).
        cell_px: side of a patch cell in pixels (the longer side of non-square fields).
        font_px: label font size.
        gap: white pixels between cells.

    Returns:
        uint8 tensor ``[3, H, W]``.

    Raises:
        ValueError: the result has no patches, or ``cell_px`` < 8.

    Example::

        >>> from lightning_vis.units import top_activations
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        >>> res = top_activations(net, [torch.randn(6, 3, 10, 10)], "1", top_k=3)
        >>> img = top_activations_grid(res, cell_px=24)
        >>> img.dtype, img.shape[0]
        (torch.uint8, 3)
    """
    from PIL import Image, ImageDraw

    if result.patches is None:
        raise ValueError("top_activations_grid needs a result with patches")
    if isinstance(cell_px, bool) or not isinstance(cell_px, int) or cell_px < 8:
        raise ValueError(f"Invalid value for cell_px={cell_px!r}. Must be an int >= 8")
    rows = list(range(result.values.shape[0])) if rows is None else [int(r) for r in rows]
    patches = result.patches.detach().float().cpu()
    values = result.values.detach().float().cpu()
    index = result.image_index.cpu()
    inside = result.inside().cpu()
    k = values.shape[1]
    ph, pw = patches.shape[-2:]
    scale = cell_px / max(ph, pw)
    ch_, cw_ = max(1, round(ph * scale)), max(1, round(pw * scale))
    frame = 1
    font = _font(font_px)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(measure.textlength(f"c{int(result.channels[r])}", font=font) for r in rows) if rows else 0
    left = gap + int(label_w) + gap
    text_h = font_px + 3
    pitch_x, pitch_y = cw_ + 2 * frame + gap, ch_ + 2 * frame + text_h + gap
    width = left + k * pitch_x + gap
    height = gap + len(rows) * pitch_y
    canvas = torch.ones(3, height, width)
    hatch = _hatch(ch_, cw_)
    texts = []
    for r_i, r in enumerate(rows):
        y = gap + r_i * pitch_y + frame
        colour = torch.tensor(UNIT_COLOURS[r_i % len(UNIT_COLOURS)]).float().view(3, 1, 1) / 255
        texts.append(((gap, y + (ch_ - font_px) // 2), f"c{int(result.channels[r])}", (0, 0, 0)))
        for j in range(k):
            if int(index[r, j]) == torch.iinfo(torch.int64).max:
                continue
            x = left + j * pitch_x + frame
            rgb = _as_rgb(patches[r, j])
            mask = inside[r, j]
            if mask.any():
                lo = rgb[:, mask].amin()
                hi = rgb[:, mask].amax()
                rgb = (rgb - lo) / (hi - lo) if hi > lo else torch.full_like(rgb, 0.5)
            cell = _resize(rgb.clamp(0, 1), (ch_, cw_))
            m = _resize(mask[None].float(), (ch_, cw_)) > 0.5
            canvas[:, y - frame : y + ch_ + frame, x - frame : x + cw_ + frame] = colour
            canvas[:, y : y + ch_, x : x + cw_] = torch.where(m, cell, hatch)
            texts.append(((x, y + ch_ + frame + 1), _fmt(float(values[r, j])), (0, 0, 0)))
    image = Image.fromarray(to_uint8(canvas).permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(image)
    for xy, text, fill in texts:
        draw.text(xy, text, fill=fill, font=font)
    return _to_tensor(image)


def feature_maps_panel(
    images: torch.Tensor,
    maps: object,
    *,
    cell_px: int | None = None,
    font_px: int = 10,
    gap: int = 3,
    cmap: str = "viridis",
) -> torch.Tensor:
    """Per image, the image beside its top-n feature maps on one shared colour scale.

    A block per image: the image on the left (min-max scaled), the maps in a grid close
    to square on the right, each labelled ``c<channel>`` above; all maps of one image
    share one colour scale (matplotlib ``cmap`` from the lowest to the highest value among
    them), written under the image as ``lo … hi``. Blocks are laid out in a grid close
    to square, at most :data:`CARD_WIDTH_PX` wide where it can be (automatic cells shrink
    to 22 px first, then fewer blocks go in a row).

    Args:
        images: ``[N, C, H, W]`` the probe images.
        maps: a :class:`lightning_vis.units.FeatureMapsResult` of those images
            (``maps [N, n, h, w]``, ``channels [N, n]``).
        cell_px: side of one map cell (default: the map size upscaled by an integer
            factor to about 36 px, at most 64, smaller if the panel would not fit the card).
        font_px: label font size.
        gap: white pixels between cells.
        cmap: a matplotlib colour map name.

    Returns:
        uint8 tensor ``[3, H, W]``.

    Raises:
        ValueError: ``images`` and ``maps`` do not match, or ``cmap`` is unknown.

    Example::

        >>> from lightning_vis.units import top_feature_maps
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        >>> x = torch.randn(2, 3, 12, 12)
        >>> img = feature_maps_panel(x, top_feature_maps(net, x, "1", top_n=4))
        >>> img.dtype, img.shape[0]
        (torch.uint8, 3)
    """
    import matplotlib
    from PIL import Image, ImageDraw

    fm = maps.maps.detach().float().cpu()
    chans = maps.channels.cpu()
    if images.ndim != 4 or fm.ndim != 4 or images.shape[0] != fm.shape[0]:
        raise ValueError(
            f"images {tuple(images.shape)} do not match the feature maps {tuple(fm.shape)} "
            "(expected [N, C, H, W] and [N, n, h, w])"
        )
    if cmap not in matplotlib.colormaps:
        raise ValueError(f"Unknown colour map cmap={cmap!r}; e.g. 'viridis', 'magma', 'cividis'")
    lut = torch.from_numpy(matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3]).float()
    n, top_n, mh, mw = fm.shape
    cols = math.ceil(math.sqrt(top_n))
    grid_rows = math.ceil(top_n / cols)
    text_h = font_px + 3
    bar_h = 5

    def layout(cell: int, per_row: int | None = None) -> tuple:
        scale = cell / max(mh, mw)
        ch_, cw_ = max(1, round(mh * scale)), max(1, round(mw * scale))
        grid_w = cols * (cw_ + gap)
        grid_h = grid_rows * (text_h + ch_ + gap)
        img_h = max(ch_, grid_h - 2 * text_h - bar_h - gap)
        img_w = max(1, round(img_h * images.shape[-1] / images.shape[-2]))
        block_w = img_w + gap + grid_w + 2 * gap
        block_h = max(grid_h, 2 * text_h + img_h + bar_h + gap) + gap
        if per_row is None:
            per_row = max(1, min(n, round(math.sqrt(n * block_h / block_w))))
        per_row = max(1, math.ceil(n / max(1, math.ceil(n / per_row))))
        return ch_, cw_, img_h, img_w, block_w, block_h, per_row, gap + per_row * block_w

    auto = cell_px is None
    if auto:
        cell_px = min(64, max(mh, mw) * max(1, round(36 / max(mh, mw))))
    # fit TensorBoard's card: the most blocks per row (up to the square layout's) for which
    # a cell between the default and 22 px fits, the largest such cell
    first = layout(cell_px)
    cells = range(cell_px, min(cell_px, 22) - 1, -2) if auto else (cell_px,)
    fits = (
        (c, p)
        for p in range(first[6], 0, -1)
        for c in cells
        if layout(c, p)[7] <= CARD_WIDTH_PX
    )
    cell_px, per_row = next(fits, (cells[-1], 1))
    ch_, cw_, img_h, img_w, block_w, block_h, per_row, width = layout(cell_px, per_row)
    block_rows = math.ceil(n / per_row)
    height = gap + block_rows * block_h
    canvas = torch.ones(3, height, width)
    pics = _scale(_as_rgb(images.detach().float().cpu()), (1, 2, 3))
    texts = []
    for i in range(n):
        bx = gap + (i % per_row) * block_w
        by = gap + (i // per_row) * block_h
        canvas[:, by + text_h : by + text_h + img_h, bx : bx + img_w] = _resize(pics[i], (img_h, img_w))
        lo, hi = float(fm[i].min()), float(fm[i].max())
        span = hi - lo if hi > lo else 1.0
        texts.append(((bx, by), f"#{i}", (0, 0, 0)))
        texts.append(((bx, by + text_h + img_h + bar_h + 1), f"{_fmt(lo)} … {_fmt(hi)}", (0, 0, 0)))
        for j in range(top_n):
            x = bx + img_w + gap + (j % cols) * (cw_ + gap)
            y = by + (j // cols) * (text_h + ch_ + gap)
            t = ((fm[i, j] - lo) / span).clamp(0, 1)
            rgb = lut[(t * 255).round().long()].permute(2, 0, 1)
            canvas[:, y + text_h : y + text_h + ch_, x : x + cw_] = _resize(rgb, (ch_, cw_))
            texts.append(((x, y), f"c{int(chans[i, j])}", (0, 0, 0)))
        # a thin colour bar under the image: the shared scale, its ends written below
        bar_y = by + text_h + img_h + 2
        bar = lut[torch.linspace(0, 255, img_w).round().long()].T[:, None, :].expand(3, bar_h - 1, img_w)
        canvas[:, bar_y : bar_y + bar_h - 1, bx : bx + img_w] = bar
    image = Image.fromarray(to_uint8(canvas).permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(image)
    font = _font(font_px)
    for xy, text, fill in texts:
        draw.text(xy, text, fill=fill, font=font)
    return _to_tensor(image)
