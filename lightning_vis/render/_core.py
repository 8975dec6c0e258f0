"""Rendering: tensors in, uint8 CHW images out (what TensorBoard's ``add_image`` takes).

Pure functions, no Lightning: grids come from :func:`torchvision.utils.make_grid`, text
from Pillow, colour maps from matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torchvision.utils import make_grid

__all__ = [
    "activity_heatmap",
    "evolution_strip",
    "filter_grid",
    "projection_panel",
    "signed_thumbnail",
    "support_boxes",
    "to_uint8",
    "upscale",
]

#: Frame colour of filters marked dead (RGB in [0, 1]).
DEAD_RGB = (0.9, 0.1, 0.1)
_FRAME_RGB = (0.15, 0.15, 0.15)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A float image in [0, 1] as uint8 (values outside are clipped).

    Example::

        >>> to_uint8(torch.tensor([[[0.0, 0.5, 1.0, 2.0]]]))
        tensor([[[  0, 128, 255, 255]]], dtype=torch.uint8)
    """
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def upscale(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour upscaling of the last two dimensions by an integer ``factor``."""
    if factor <= 1:
        return image
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def _scale(values: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Min-max scale to [0, 1] over ``dims``; constant blocks become flat mid-grey."""
    lo = values.amin(dim=dims, keepdim=True)
    hi = values.amax(dim=dims, keepdim=True)
    span = hi - lo
    flat = span <= 1e-12 * hi.abs().clamp_min(1.0)
    out = (values - lo) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.full_like(out, 0.5), out)


def _framed(cells: torch.Tensor, dead: torch.Tensor, width: int) -> torch.Tensor:
    """Surround each cell with a frame: red for dead filters, dark grey otherwise."""
    n, _, h, w = cells.shape
    out = torch.empty(n, 3, h + 2 * width, w + 2 * width)
    normal = torch.tensor(_FRAME_RGB).view(1, 3, 1, 1)
    red = torch.tensor(DEAD_RGB).view(1, 3, 1, 1)
    out[:] = torch.where(dead.view(n, 1, 1, 1), red, normal)
    out[:, :, width : width + h, width : width + w] = cells
    return out


def filter_grid(
    weight: torch.Tensor,
    *,
    normalize: str = "filter",
    dead: Iterable[int] = (),
    cell_px: int = 40,
    max_filters: int = 256,
    max_inputs: int = 16,
    nrow: int | None = None,
    zero_tol: float = 1e-6,
) -> torch.Tensor:
    """A convolution's filters as one image: a framed cell per filter.

    Filters over 3 input channels are drawn in colour; other filters as a row of grey
    tiles, one per input channel (grouped and depthwise convolutions: the channels each
    filter sees). Cells are upscaled (nearest) to about ``cell_px`` pixels so a 3×3 or
    7×7 filter is visible. Filters whose weight norm is (near) zero, and those listed in
    ``dead``, get a red frame; the others a dark one. A filter with constant weights is
    flat mid-grey.

    Args:
        weight: ``[out, in/groups, kH, kW]`` (Conv1d ``[out, in, k]`` and Conv3d, whose
            middle depth slice is shown, are accepted too).
        normalize: ``"filter"`` scales each filter to its own range (shows its pattern);
            ``"layer"`` uses one range for the layer (shows relative strength).
        dead: indices of filters to mark dead.
        cell_px: target size of one filter tile in pixels.
        max_filters: draw at most this many filters (the first ones).
        max_inputs: for grey filters, draw at most this many input channels.
        nrow: cells per grid row; default: about a square grid.
        zero_tol: a filter is zero when its norm is at most ``zero_tol`` × the largest norm.

    Returns:
        uint8 tensor ``[3, H, W]``.

    Raises:
        ValueError: ``weight`` has the wrong rank, or ``normalize`` is unknown.

    Example::

        >>> w = torch.randn(8, 3, 5, 5)
        >>> w[2] = 0
        >>> img = filter_grid(w, cell_px=10)
        >>> img.dtype, img.shape
        (torch.uint8, torch.Size([3, 44, 44]))
    """
    if normalize not in ("filter", "layer"):
        raise ValueError(f"Invalid value for normalize={normalize!r}. Must be one of 'filter', 'layer'")
    w = weight.detach().float().cpu()
    if w.ndim == 3:
        w = w.unsqueeze(2)
    elif w.ndim == 5:
        w = w[:, :, w.shape[2] // 2]
    if w.ndim != 4:
        raise ValueError(f"Expected a convolution weight of rank 3, 4 or 5, got shape {tuple(weight.shape)}")
    norms = w.flatten(1).norm(dim=1)
    is_dead = norms <= zero_tol * norms.max().clamp_min(1e-30)
    for index in dead:
        if 0 <= index < len(is_dead):
            is_dead[index] = True
    w, is_dead = w[:max_filters], is_dead[:max_filters]
    n, c_in, kh, kw = w.shape
    dims = (1, 2, 3) if normalize == "filter" else (0, 1, 2, 3)
    factor = max(1, round(cell_px / max(kh, kw)))
    if c_in == 3:
        cells = upscale(_scale(w, dims), factor)
    else:
        tiles = upscale(_scale(w[:, :max_inputs], dims), factor)  # [n, k, H, W]
        k, th, tw = tiles.shape[1], tiles.shape[2], tiles.shape[3]
        gap = max(1, factor // 3)
        row = torch.full((n, th, k * tw + (k - 1) * gap), _FRAME_RGB[0])
        for i in range(k):
            row[:, :, i * (tw + gap) : i * (tw + gap) + tw] = tiles[:, i]
        cells = row.unsqueeze(1).expand(n, 3, *row.shape[1:])
    framed = _framed(cells, is_dead, width=max(1, factor // 4))
    nrow = nrow or max(1, math.ceil(math.sqrt(n * framed.shape[2] / framed.shape[3])))
    return to_uint8(make_grid(framed, nrow=nrow, padding=2, pad_value=1.0))


# --------------------------------------------------------------------------- feature evolution
def _font(size: int) -> object:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def signed_thumbnail(projection: torch.Tensor, *, max_px: int | None = None) -> torch.Tensor:
    """A signed image (a projection) as uint8: zero at mid-grey, scaled by its max ``|value|``.

    Each image is scaled on its own (``value / (2·max|value|) + 0.5``), so its strongest
    pixel is black or white and the sign is kept; an all-zero image is flat mid-grey (no
    NaN). With ``max_px``, an image larger than that is first shrunk by area averaging
    (an integer factor), which keeps stored thumbnails small.

    Args:
        projection: ``[C, H, W]`` or a batch ``[..., C, H, W]`` of signed float images.
        max_px: largest side in pixels of the result; ``None`` keeps the size.

    Returns:
        uint8 tensor of the same leading shape (on the CPU).

    Example::

        >>> signed_thumbnail(torch.tensor([[[-2.0, 0.0, 1.0, 2.0]]]))
        tensor([[[  0, 128, 191, 255]]], dtype=torch.uint8)
        >>> signed_thumbnail(torch.zeros(3, 64, 64), max_px=16).shape
        torch.Size([3, 16, 16])
    """
    if projection.ndim < 3:
        raise ValueError(f"Expected an image [C, H, W] or a batch [..., C, H, W], got shape {tuple(projection.shape)}")
    if max_px is not None and (isinstance(max_px, bool) or not isinstance(max_px, int) or max_px < 1):
        raise ValueError(f"Invalid value for max_px={max_px!r}. Must be an int >= 1 or None")
    x = projection.detach().float().cpu()
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    x = x.reshape(-1, c, h, w)
    if max_px is not None and max(h, w) > max_px:
        factor = math.ceil(max(h, w) / max_px)
        x = torch.nn.functional.avg_pool2d(x, factor, ceil_mode=True)
    peak = x.abs().amax(dim=(1, 2, 3), keepdim=True)
    scaled = torch.where(peak > 0, x / (2 * peak.clamp_min(1e-30)), torch.zeros_like(x)) + 0.5
    out = to_uint8(scaled)
    return out.reshape(*lead, *out.shape[-3:])


def evolution_strip(
    thumbnails: torch.Tensor,
    row_labels: Iterable[str] = (),
    col_labels: Iterable[str] = (),
    *,
    cell_px: int = 48,
    gap: int = 2,
    font_px: int = 11,
) -> torch.Tensor:
    """Feature evolution as one image (Zeiler & Fergus 2014, Fig. 4): units × snapshots.

    One row per tracked unit, one column per snapshot; ``col_labels`` are drawn above the
    columns (e.g. ``"ep 5"``), ``row_labels`` left of the rows (e.g. ``"ch 12"``), with
    Pillow. Thumbnails are upscaled (nearest, integer factor) to about ``cell_px`` pixels;
    grey thumbnails (one channel) are drawn grey. The background is white. Columns are
    widened (cells centred) where a column label is wider than a cell, so labels never
    overlap; otherwise adding a column only appends to the right.

    Args:
        thumbnails: ``[R, T, C, h, w]`` (``C`` = 1 or 3), uint8, or float in [0, 1].
        row_labels: ``R`` labels (or none).
        col_labels: ``T`` labels (or none).
        cell_px: approximate size of a cell in pixels.
        gap: white pixels between cells.
        font_px: label font size (Pillow's default font).

    Returns:
        uint8 tensor ``[3, H, W]``.

    Raises:
        ValueError: wrong shape, no rows or columns, or a label count that does not match.

    Example::

        >>> t = torch.zeros(2, 3, 3, 8, 8, dtype=torch.uint8)
        >>> img = evolution_strip(t, ["ch 0", "ch 5"], ["ep 1", "ep 2", "ep 5"], cell_px=16)
        >>> img.dtype, img.shape[0], img.shape[2] > 3 * 16
        (torch.uint8, 3, True)
    """
    if thumbnails.ndim != 5 or thumbnails.shape[2] not in (1, 3):
        raise ValueError(
            f"thumbnails must have shape [rows, columns, C, h, w] with C in (1, 3), got {tuple(thumbnails.shape)}"
        )
    rows, cols, c, h, w = thumbnails.shape
    if rows < 1 or cols < 1:
        raise ValueError(f"thumbnails must hold at least one row and one column, got shape {tuple(thumbnails.shape)}")
    row_labels, col_labels = list(row_labels), list(col_labels)
    if row_labels and len(row_labels) != rows:
        raise ValueError(f"Got {len(row_labels)} row_labels for {rows} rows")
    if col_labels and len(col_labels) != cols:
        raise ValueError(f"Got {len(col_labels)} col_labels for {cols} columns")
    cells = thumbnails if thumbnails.dtype == torch.uint8 else to_uint8(thumbnails)
    cells = cells.cpu()
    if c == 1:
        cells = cells.expand(rows, cols, 3, h, w)
    factor = max(1, round(cell_px / max(h, w)))
    cells = upscale(cells, factor)
    ch, cw = h * factor, w * factor

    import numpy as np
    from PIL import Image, ImageDraw

    font = _font(font_px)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = {t: measure.textbbox((0, 0), t, font=font) for t in row_labels + col_labels}
    text_h = max((b[3] - b[1] for b in boxes.values()), default=0)
    top = text_h + 3 * gap if col_labels else gap
    left = max((boxes[t][2] - boxes[t][0] for t in row_labels), default=0) + 3 * gap if row_labels else gap
    pitch = max([cw] + [boxes[t][2] - boxes[t][0] + 2 for t in col_labels])  # labels never overlap
    pad = (pitch - cw) // 2
    canvas = torch.full((3, top + rows * (ch + gap), left + cols * (pitch + gap)), 255, dtype=torch.uint8)
    for r in range(rows):
        for t in range(cols):
            y, x = top + r * (ch + gap), left + t * (pitch + gap) + pad
            canvas[:, y : y + ch, x : x + cw] = cells[r, t]
    image = Image.fromarray(canvas.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(image)
    for t, text in enumerate(col_labels):  # centred above its column
        x0, y0, x1, _ = boxes[text]
        x = left + t * (pitch + gap) + (pitch - (x1 - x0)) // 2
        draw.text((x - x0, gap - y0), text, fill=(0, 0, 0), font=font)
    for r, text in enumerate(row_labels):  # vertically centred left of its row
        x0, y0, _, y1 = boxes[text]
        y = top + r * (ch + gap) + (ch - (y1 - y0)) // 2
        draw.text((gap - x0, y - y0), text, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def activity_heatmap(
    rates: Mapping[str, torch.Tensor],
    *,
    title: str | None = None,
    floor: float = 1e-3,
    cmap: str = "viridis",
    max_channels: int = 512,
    width_px: int = 800,
) -> torch.Tensor:
    """Per-channel firing rates of several sites as one heatmap: sites × channels.

    One row per site (labelled), one cell per channel, coloured by firing rate on a log
    scale from ``floor`` to 1 (matplotlib colour map ``cmap``; a colour scale below).
    Channels that never fired (rate 0: dead) are bright red, so dead channels stand out
    at a glance; rows shorter than the widest site are padded with light grey. Drawn
    with Pillow (a few milliseconds), no matplotlib figure.

    Args:
        rates: site name -> ``[C]`` firing rates in [0, 1], in display order (top first).
        title: drawn above the map (e.g. the step).
        floor: lowest rate of the colour scale; smaller positive rates get its colour.
        cmap: a matplotlib colour map name.
        max_channels: show at most this many channels per site (the first ones).
        width_px: approximate image width in pixels.

    Returns:
        uint8 tensor ``[3, H, W]``.

    Raises:
        ValueError: ``rates`` is empty, ``floor`` is not in (0, 1), or ``cmap`` is unknown.

    Example::

        >>> img = activity_heatmap({"features.1": torch.tensor([0.0, 0.5, 1.0]),
        ...                         "features.4": torch.tensor([1.0, 0.002])}, title="step 100")
        >>> img.dtype, img.shape[0]
        (torch.uint8, 3)
        >>> red = (img[0] == 230) & (img[1] == 26) & (img[2] == 26)  # dead: DEAD_RGB
        >>> bool(red.any())
        True
    """
    import matplotlib
    import numpy as np
    from PIL import Image, ImageDraw

    if not rates:
        raise ValueError("activity_heatmap needs at least one site, got an empty mapping")
    if not 0.0 < floor < 1.0:
        raise ValueError(f"Invalid value for floor={floor!r}. Must be in (0, 1)")
    if cmap not in matplotlib.colormaps:
        raise ValueError(f"Unknown colour map cmap={cmap!r}; e.g. 'viridis', 'magma', 'cividis'")
    lut = torch.from_numpy(matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3]).float()  # [256, 3]
    dead_rgb, pad_rgb = torch.tensor(DEAD_RGB), torch.tensor((0.93, 0.93, 0.93))

    def colours(values: torch.Tensor) -> torch.Tensor:  # rates -> RGB [..., 3]
        t = (values.clamp(floor, 1.0).log10() - math.log10(floor)) / -math.log10(floor)
        rgb = lut[(t * 255).round().long()]
        return torch.where((values <= 0).unsqueeze(-1), dead_rgb, rgb)

    names = [n if len(n) <= 28 else "…" + n[-27:] for n in rates]
    rows = [rates[n].detach().float().cpu().flatten()[:max_channels] for n in rates]
    channels = max(max(r.numel() for r in rows), 1)
    font = _font(12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(measure.textlength(n, font=font)) for n in names) + 12
    cell_w = max(1, min(24, (width_px - label_w - 16) // channels))
    row_h, gap, pad = 16, 2, 8
    top = pad + (20 if title else 0)
    grid_w = cell_w * channels
    grid_h = len(rows) * (row_h + gap) - gap
    bar_top = top + grid_h + 10
    height = bar_top + 10 + 22
    width = max(label_w + grid_w + pad, label_w + 260 + pad)
    canvas = torch.ones(height, width, 3)
    for i, r in enumerate(rows):
        y = top + i * (row_h + gap)
        line = pad_rgb.expand(channels, 3).clone()
        line[: r.numel()] = colours(r)
        cells = line.repeat_interleave(cell_w, dim=0)  # [grid_w, 3]
        canvas[y : y + row_h, label_w : label_w + grid_w] = cells.unsqueeze(0)
    # colour scale: a red "dead" box, then floor .. 1 on the log scale
    bar_w = max(160, min(grid_w, 400) - 40)
    canvas[bar_top : bar_top + 10, label_w : label_w + 24] = dead_rgb
    ramp = torch.logspace(math.log10(floor), 0, bar_w)
    canvas[bar_top : bar_top + 10, label_w + 44 : label_w + 44 + bar_w] = colours(ramp).unsqueeze(0)
    image = Image.fromarray((canvas * 255).round().to(torch.uint8).numpy())
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((label_w, pad), title, fill=(0, 0, 0), font=font)
    for i, n in enumerate(names):
        y = top + i * (row_h + gap) + 1
        draw.text((label_w - 6 - measure.textlength(n, font=font), y), n, fill=(0, 0, 0), font=font)
    small = _font(10)
    draw.text((label_w, bar_top + 11), "dead", fill=(0, 0, 0), font=small)
    decades = int(round(-math.log10(floor)))
    for k in range(decades + 1):
        x = label_w + 44 + round(k / decades * (bar_w - 1))
        label = f"{10 ** (k - decades):g}"
        draw.text((x - measure.textlength(label, font=small) / 2, bar_top + 11), label, fill=(0, 0, 0), font=small)
    draw.text((label_w + 50 + bar_w, bar_top - 2), "firing rate", fill=(0, 0, 0), font=small)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------- DeconvNet projections
#: Colours of the top-k units' boxes and frames in :func:`projection_panel` (tab10).
UNIT_COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


def support_boxes(projections: torch.Tensor, *, rel_tol: float = 1e-6) -> torch.Tensor:
    """The receptive field each projection reached: the bounding box of its support.

    A unit's projection is exactly zero outside the input pixels its backward signal
    reached (no bias enters the backward), so the box of ``|p| > rel_tol · max|p|`` is the
    part of its receptive field that drives it, computed rather than guessed.

    Args:
        projections: ``[..., C, H, W]`` signed projections.
        rel_tol: pixels below this fraction of the projection's peak count as zero.

    Returns:
        long tensor ``[..., 4]``: ``(top, left, bottom, right)``, bottom/right exclusive;
        all ``-1`` for an all-zero projection.

    Example::

        >>> p = torch.zeros(1, 6, 6)
        >>> p[0, 1:3, 2:5] = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 0.0]])
        >>> support_boxes(p).tolist()
        [1, 2, 3, 5]
        >>> support_boxes(torch.zeros(2, 1, 4, 4)).tolist()
        [[-1, -1, -1, -1], [-1, -1, -1, -1]]
    """
    if projections.ndim < 3:
        raise ValueError(f"Expected projections [..., C, H, W], got shape {tuple(projections.shape)}")
    mag = projections.detach().abs().amax(dim=-3)  # [..., H, W]
    peak = mag.flatten(-2).amax(-1)[..., None, None]
    mask = (mag > rel_tol * peak) & (peak > 0)
    h, w = mask.shape[-2:]
    rows, cols = mask.any(-1), mask.any(-2)  # [..., H], [..., W]
    r_idx, c_idx = torch.arange(h, device=mask.device), torch.arange(w, device=mask.device)
    top = torch.where(rows, r_idx, h).amin(-1)
    bottom = torch.where(rows, r_idx, -1).amax(-1) + 1
    left = torch.where(cols, c_idx, w).amin(-1)
    right = torch.where(cols, c_idx, -1).amax(-1) + 1
    boxes = torch.stack([top, left, bottom, right], dim=-1).long()
    return torch.where(rows.any(-1, keepdim=True), boxes, torch.full_like(boxes, -1)).cpu()


def _square_box(box: list[int], h: int, w: int) -> tuple[int, int, int, int]:
    """``box`` grown to a square (as far as the image allows), for undistorted crops."""
    top, left, bottom, right = box
    if top < 0:
        return 0, 0, h, w
    side = min(max(bottom - top, right - left), h, w)

    def fit(lo: int, hi: int, size: int) -> int:
        start = lo - (side - (hi - lo)) // 2
        return min(max(start, 0), size - side)

    t, lft = fit(top, bottom, h), fit(left, right, w)
    return t, lft, t + side, lft + side


def _as_rgb(x: torch.Tensor) -> torch.Tensor:
    """``[..., C, H, W]`` as three channels: RGB kept, one channel repeated, others averaged."""
    c = x.shape[-3]
    if c == 3:
        return x
    if c != 1:
        x = x.mean(dim=-3, keepdim=True)
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:])


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.interpolate(x[None].float(), size=size, mode="nearest-exact")[0]


def projection_panel(
    images: torch.Tensor,
    projection: object,
    *,
    cell_px: int = 48,
    gap: int = 3,
    font_px: int = 10,
    labels: bool = True,
) -> torch.Tensor:
    """DeconvNet projections of one layer as one image (Zeiler & Fergus 2014, Fig. 2).

    One row per probe image: the image with the receptive field of each of its top-k
    units boxed (box colour = unit), then for each unit its projection beside the image
    patch under its receptive field, both cropped to that field and upscaled to the cell
    size, framed in the unit's colour and labelled ``c<channel>`` above. Receptive
    fields are the support of each projection (:func:`support_boxes`), grown to a square.
    Projections are signed: zero is mid-grey, each scaled by its own max ``|value|``
    (:func:`signed_thumbnail`); images are min-max scaled per image for display (they
    are usually normalised). A unit with an all-zero projection gets a flat grey cell
    beside the whole image and no box.

    Args:
        images: ``[N, C, H, W]`` the images that were projected.
        projection: a :class:`lightning_vis.deconv.Projection` of those images
            (``images [N, K, C, H, W]``, ``channels [N, K]``).
        cell_px: side of one cell in pixels.
        gap: white pixels between cells.
        font_px: label font size.
        labels: draw the ``c<channel>`` labels.

    Returns:
        uint8 tensor ``[3, H, W]``.

    Raises:
        ValueError: ``images`` and ``projection`` do not match.

    Example::

        >>> from lightning_vis.deconv import project
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
        >>> x = torch.randn(2, 3, 12, 12)
        >>> img = projection_panel(x, project(net, x, "2", top_k=3), cell_px=24)
        >>> img.dtype, img.shape[0], img.shape[1] >= 2 * 24
        (torch.uint8, 3, True)
    """
    proj = projection.images.detach().float().cpu()
    chans = projection.channels.cpu()
    if images.ndim != 4 or proj.ndim != 5 or images.shape[0] != proj.shape[0] or images.shape[1:] != proj.shape[2:]:
        raise ValueError(
            f"images {tuple(images.shape)} do not match the projection's images {tuple(proj.shape)} "
            "(expected [N, C, H, W] and [N, K, C, H, W])"
        )
    if isinstance(cell_px, bool) or not isinstance(cell_px, int) or cell_px < 4:
        raise ValueError(f"Invalid value for cell_px={cell_px!r}. Must be an int >= 4")
    n, k, _, h, w = proj.shape
    pics = _scale(_as_rgb(images.detach().float().cpu()), (1, 2, 3))  # [N, 3, H, W] in [0, 1]
    thumbs = _as_rgb(signed_thumbnail(_as_rgb(proj) if proj.shape[2] not in (1, 3) else proj)).float() / 255
    boxes = support_boxes(proj).tolist()

    img_h, img_w = cell_px, max(1, round(cell_px * w / h))
    frame = max(1, cell_px // 24)
    pair_w = 2 * cell_px + 2 * frame + 1
    text_h = font_px + 2 if labels else 0
    row_h = text_h + cell_px + 2 * frame
    width = gap + img_w + 2 * frame + k * (pair_w + gap) + gap
    height = gap + n * (row_h + gap)
    canvas = torch.ones(3, height, width)
    placed = []  # (kind, colour index, xy box) drawn afterwards with Pillow
    for i in range(n):
        y = gap + i * (row_h + gap) + text_h + frame
        canvas[:, y : y + img_h, gap + frame : gap + frame + img_w] = _resize(pics[i], (img_h, img_w))
        for j in range(k):
            x = gap + img_w + 2 * frame + gap + j * (pair_w + gap) + frame
            t, lft, b, r = _square_box(boxes[i][j], h, w)
            canvas[:, y : y + cell_px, x : x + cell_px] = _resize(thumbs[i, j, :, t:b, lft:r], (cell_px, cell_px))
            x2 = x + cell_px + 1
            canvas[:, y : y + cell_px, x2 : x2 + cell_px] = _resize(pics[i, :, t:b, lft:r], (cell_px, cell_px))
            placed.append(("frame", j, (x - frame, y - frame, x2 + cell_px + frame - 1, y + cell_px + frame - 1)))
            if labels:
                placed.append(("text", j, (x, y - frame - text_h, f"c{int(chans[i, j])}")))
            if boxes[i][j][0] >= 0:
                bt, bl, bb, br = boxes[i][j]
                sy, sx = img_h / h, img_w / w
                x0 = gap + frame
                placed.append(("box", j, (x0 + bl * sx, y + bt * sy, x0 + br * sx - 1, y + bb * sy - 1)))

    import numpy as np
    from PIL import Image, ImageDraw

    image = Image.fromarray(to_uint8(canvas).permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(image)
    font = _font(font_px) if labels else None
    for kind, j, geom in placed:
        colour = UNIT_COLOURS[j % len(UNIT_COLOURS)]
        if kind == "frame":
            draw.rectangle(geom, outline=colour, width=frame)
        elif kind == "box":
            draw.rectangle(geom, outline=colour, width=1)
        else:
            draw.text(geom[:2], geom[2], fill=colour, font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()
