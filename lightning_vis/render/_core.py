"""Rendering: tensors in, uint8 CHW images out (what TensorBoard's ``add_image`` takes).

Pure functions, no Lightning: grids come from :func:`torchvision.utils.make_grid`, text
from Pillow, colour maps from matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torchvision.utils import make_grid

__all__ = [
    "CARD_WIDTH_PX",
    "activity_heatmap",
    "evolution_strip",
    "filter_grid",
    "projection_panel",
    "signed_thumbnail",
    "support_boxes",
    "to_uint8",
    "upscale",
]

#: Width in pixels of an image card in TensorBoard's Images tab (``tf-image-loader``: 350 px, the image
#: drawn at ``width: 100%`` with ``image-rendering: pixelated``). A wider picture is shrunk by dropping
#: pixel rows and columns, which erases thin lines and text; every picture here is laid out to fit it.
CARD_WIDTH_PX = 350

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


def _fit_factor(factor: int, width: Callable[[int], int], width_px: int | None) -> int:
    """The largest upscaling factor <= ``factor`` (and >= 1) whose picture is at most ``width_px`` wide."""
    while width_px is not None and factor > 1 and width(factor) > width_px:
        factor -= 1
    return factor


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
    width_px: int | None = CARD_WIDTH_PX,
) -> torch.Tensor:
    """A convolution's filters as one image: a framed cell per filter, in a near-square grid.

    Filters over 3 input channels are drawn in colour; other filters as a near-square
    mosaic of grey tiles, one per input channel in reading order (grouped and depthwise
    convolutions: the channels each filter sees). Tiles are upscaled (nearest) to about
    ``cell_px`` pixels so a 3×3 or 7×7 filter is visible, less where the grid would
    otherwise be wider than ``width_px`` (TensorBoard's Images card, which shrinks wider
    pictures by dropping pixels). Filters whose weight norm is (near) zero, and those
    listed in ``dead``, get a red frame; the others a dark one. A filter with constant
    weights is flat mid-grey.

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
        width_px: shrink the tiles (down to 1 pixel per weight) until the grid is at most
            this wide; ``None``: always ``cell_px``.

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
        >>> filter_grid(torch.randn(64, 3, 7, 7)).shape[2] <= CARD_WIDTH_PX  # fits the card
        True
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
    colour = c_in == 3
    k = 1 if colour else min(c_in, max_inputs)
    tiles_x = math.ceil(math.sqrt(k))
    tiles_y = math.ceil(k / tiles_x)

    def geometry(factor: int) -> tuple[int, int, int, int]:  # cell height, cell width, columns, grid width
        gap, frame = max(1, factor // 3), max(1, factor // 4)
        cell_h = tiles_y * kh * factor + (tiles_y - 1) * gap + 2 * frame
        cell_w = tiles_x * kw * factor + (tiles_x - 1) * gap + 2 * frame
        cols = nrow or max(1, math.ceil(math.sqrt(n * cell_h / cell_w)))
        return cell_h, cell_w, cols, min(cols, n) * (cell_w + 2) + 2

    factor = _fit_factor(max(1, round(cell_px / max(kh, kw))), lambda f: geometry(f)[3], width_px)
    if colour:
        cells = upscale(_scale(w, dims), factor)
    else:
        tiles = upscale(_scale(w[:, :k], dims), factor)  # [n, k, H, W]
        th, tw = tiles.shape[2], tiles.shape[3]
        gap = max(1, factor // 3)
        mosaic = torch.full((n, tiles_y * th + (tiles_y - 1) * gap, tiles_x * tw + (tiles_x - 1) * gap), _FRAME_RGB[0])
        for i in range(k):
            y, x = (i // tiles_x) * (th + gap), (i % tiles_x) * (tw + gap)
            mosaic[:, y : y + th, x : x + tw] = tiles[:, i]
        cells = mosaic.unsqueeze(1).expand(n, 3, *mosaic.shape[1:])
    framed = _framed(cells, is_dead, width=max(1, factor // 4))
    return to_uint8(make_grid(framed, nrow=geometry(factor)[2], padding=2, pad_value=1.0))


# --------------------------------------------------------------------------- feature evolution
def _font(size: int) -> object:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


#: Stand-ins for characters Pillow's default font (Aileron) draws as an empty box.
_SUBSTITUTES = {"\u2192": "->", "\u2190": "<-", "\u00d7": "x", "\u2014": "-", "\u2013": "-", "\u2026": "..."}


def _drawable(text: str, font: object) -> str:
    """``text`` with the characters ``font`` lacks (drawn as its empty box) spelled in ASCII.

    Example::

        >>> _drawable("conv1 \u2192 relu#0", _font(12))
        'conv1 -> relu#0'
    """
    if text.isascii():
        return text

    def glyph(ch: str) -> tuple:
        mask = font.getmask(ch)
        return mask.size, tuple(mask.histogram())

    missing = glyph("\ue000")  # a private-use code point: the font's "no glyph" box

    def ok(ch: str) -> bool:
        return ch.isascii() or glyph(ch) != missing

    return "".join(ch if ok(ch) else _SUBSTITUTES.get(ch, "?") for ch in text)


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
    width_px: int | None = CARD_WIDTH_PX,
) -> torch.Tensor:
    """Feature evolution as one image (Zeiler & Fergus 2014, Fig. 4): units × snapshots.

    One row per tracked unit, one column per snapshot; ``col_labels`` are drawn above the
    columns (e.g. ``"ep 5"``), ``row_labels`` left of the rows (e.g. ``"ch 12"``), with
    Pillow. Thumbnails are upscaled (nearest, integer factor) to about ``cell_px`` pixels;
    grey thumbnails (one channel) are drawn grey. The background is white. Columns are
    widened (cells centred) where a column label is wider than a cell, so labels never
    overlap.

    The strip stays at most ``width_px`` wide (TensorBoard's Images card): when the
    columns no longer fit, they wrap into bands stacked top to bottom, each band a full
    row of columns with its own labels (read the bands like lines of text). Cells shrink
    (never below the thumbnails' own size) until a band holds at least twice as many
    columns as there are rows (and 4), so 16 snapshots stay about square. A new column
    only adds to the last band: the earlier strip is the top-left corner of the new one,
    but for the new column drawn where it was white.

    Args:
        thumbnails: ``[R, T, C, h, w]`` (``C`` = 1 or 3), uint8, or float in [0, 1].
        row_labels: ``R`` labels (or none).
        col_labels: ``T`` labels (or none).
        cell_px: approximate size of a cell in pixels.
        gap: white pixels between cells.
        font_px: label font size (Pillow's default font).
        width_px: wrap the columns into bands to stay this narrow; ``None``: one band.

    Returns:
        uint8 tensor ``[3, H, W]``.

    Raises:
        ValueError: wrong shape, no rows or columns, or a label count that does not match.

    Example::

        >>> t = torch.zeros(2, 3, 3, 8, 8, dtype=torch.uint8)
        >>> img = evolution_strip(t, ["ch 0", "ch 5"], ["ep 1", "ep 2", "ep 5"], cell_px=16)
        >>> img.dtype, img.shape[0], img.shape[2] > 3 * 16
        (torch.uint8, 3, True)
        >>> long = evolution_strip(torch.zeros(4, 16, 3, 32, 32, dtype=torch.uint8), cell_px=48)
        >>> long.shape[2] <= CARD_WIDTH_PX < 16 * 48  # 16 snapshots wrap into bands
        True
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

    import numpy as np
    from PIL import Image, ImageDraw

    font = _font(font_px)
    row_labels, col_labels = [_drawable(t, font) for t in row_labels], [_drawable(t, font) for t in col_labels]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = {t: measure.textbbox((0, 0), t, font=font) for t in row_labels + col_labels}
    text_h = max((b[3] - b[1] for b in boxes.values()), default=0)
    top = text_h + 3 * gap if col_labels else gap
    left = max((boxes[t][2] - boxes[t][0] for t in row_labels), default=0) + 3 * gap if row_labels else gap
    label_w = max([boxes[t][2] - boxes[t][0] + 2 for t in col_labels], default=0)

    def per_band(factor: int) -> int:  # columns that fit in width_px
        pitch = max(w * factor, label_w)
        return cols if width_px is None else max(1, (width_px - left) // (pitch + gap))

    factor = max(1, round(cell_px / max(h, w)))
    # Cells shrink (never below the thumbnails' own size) until a band holds 2 columns per row, at
    # least 4: about square at 16 snapshots. It does not depend on the number of columns, so cells
    # keep their size as the strip grows.
    while width_px is not None and factor > 1 and per_band(factor) < max(4, 2 * rows):
        factor -= 1
    cells = upscale(cells, factor)
    ch, cw = h * factor, w * factor
    pitch = max(cw, label_w)  # labels never overlap
    pad = (pitch - cw) // 2
    band_cols = min(cols, per_band(factor))
    bands = math.ceil(cols / band_cols)
    band_h = top + rows * (ch + gap)
    sep = 3 * gap  # extra white between bands
    height, width = bands * band_h + (bands - 1) * sep, left + band_cols * (pitch + gap)
    canvas = torch.full((3, height, width), 255, dtype=torch.uint8)

    def origin(t: int) -> tuple[int, int]:  # top-left corner of column t's band row 0, and its x
        b, i = divmod(t, band_cols)
        return b * (band_h + sep), left + i * (pitch + gap)

    for t in range(cols):
        y0, x0 = origin(t)
        for r in range(rows):
            y = y0 + top + r * (ch + gap)
            canvas[:, y : y + ch, x0 + pad : x0 + pad + cw] = cells[r, t]
    image = Image.fromarray(canvas.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(image)
    for t, text in enumerate(col_labels):  # centred above its column
        y0, x = origin(t)
        x0, b0, x1, _ = boxes[text]
        draw.text((x + (pitch - (x1 - x0)) // 2 - x0, y0 + gap - b0), text, fill=(0, 0, 0), font=font)
    for b in range(bands):
        for r, text in enumerate(row_labels):  # vertically centred left of its row, in every band
            x0, y0, _, y1 = boxes[text]
            y = b * (band_h + sep) + top + r * (ch + gap) + (ch - (y1 - y0)) // 2
            draw.text((gap - x0, y - y0), text, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def activity_heatmap(
    rates: Mapping[str, torch.Tensor],
    *,
    title: str | None = None,
    floor: float = 1e-3,
    cmap: str = "viridis",
    max_channels: int = 512,
    width_px: int = CARD_WIDTH_PX,
) -> torch.Tensor:
    """Per-channel firing rates of several sites as one heatmap: a block of cells per site.

    Each site gets a heading (its name, channel count and how many channels are dead)
    and a block of cells, one per channel in reading order, wrapped into lines of
    ``per_line`` channels (a multiple of 8, the same for every site) with the first
    channel's index at the left of each line. Cells are coloured by firing rate on a log
    scale from ``floor`` to 1 (matplotlib colour map ``cmap``; a colour scale below);
    channels that never fired (rate 0: dead) are bright red, so dead channels stand out
    at a glance; the unused end of a site's last line is light grey. The line length is
    chosen so that the image is ``width_px`` wide (TensorBoard's Images card) and close
    to square: the largest cells that keep the height within 1.5 × the width. Drawn with
    Pillow (a few milliseconds), no matplotlib figure.

    Args:
        rates: site name -> ``[C]`` firing rates in [0, 1], in display order (top first).
        title: drawn above the map (e.g. the step).
        floor: lowest rate of the colour scale; smaller positive rates get its colour.
        cmap: a matplotlib colour map name.
        max_channels: show at most this many channels per site (the first ones).
        width_px: image width in pixels (at least 200).

    Returns:
        uint8 tensor ``[3, H, W]``.

    Raises:
        ValueError: ``rates`` is empty, ``floor`` is not in (0, 1), ``cmap`` is unknown,
            or ``width_px`` < 200.

    Example::

        >>> img = activity_heatmap({"features.1": torch.tensor([0.0, 0.5, 1.0]),
        ...                         "features.4": torch.tensor([1.0, 0.002])}, title="step 100")
        >>> img.dtype, img.shape[0], img.shape[2]
        (torch.uint8, 3, 350)
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
    if isinstance(width_px, bool) or not isinstance(width_px, int) or width_px < 200:
        raise ValueError(f"Invalid value for width_px={width_px!r}. Must be an int >= 200")
    lut = torch.from_numpy(matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3]).float()  # [256, 3]
    dead_rgb, pad_rgb = torch.tensor(DEAD_RGB), torch.tensor((0.93, 0.93, 0.93))

    def colours(values: torch.Tensor) -> torch.Tensor:  # rates -> RGB [..., 3]
        t = (values.clamp(floor, 1.0).log10() - math.log10(floor)) / -math.log10(floor)
        rgb = lut[(t * 255).round().long()]
        return torch.where((values <= 0).unsqueeze(-1), dead_rgb, rgb)

    rows = [rates[n].detach().float().cpu().flatten()[:max_channels] for n in rates]
    widest = max(max(r.numel() for r in rows), 1)
    font, small = _font(13), _font(10)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, head_h, line_gap = 6, 18, 1
    title_h = 22 if title else 0
    legend_h = 30  # the colour scale: the bottom 30 rows
    gutter = int(measure.textlength(str(8 * ((widest - 1) // 8)), font=small)) + 6  # line-start indices

    def layout(per_line: int) -> tuple[int, int]:  # cell side, image height
        cell = (width_px - 2 * pad - gutter) // per_line
        lines = sum(max(1, math.ceil(r.numel() / per_line)) for r in rows)
        return cell, pad + title_h + len(rows) * (head_h + 4) + lines * (cell + line_gap) + legend_h + pad

    candidates = [k for k in range(8, max(8, widest) + 8, 8) if layout(k)[0] >= 3] or [8]
    fitting = [k for k in candidates if layout(k)[1] <= 1.5 * width_px]
    per_line = min(fitting) if fitting else max(candidates)
    cell, height = layout(per_line)
    canvas = torch.ones(height, width_px, 3)
    x0 = pad + gutter
    y = pad + title_h
    labels = []  # (xy, text, font) drawn afterwards
    for name, r in zip(rates, rows):
        dead = int((r <= 0).sum())
        name = _drawable(name, font)
        heading = f"{name}: {r.numel()} ch, {dead} dead"
        while measure.textlength(heading, font=font) > width_px - 2 * pad and len(name) > 4:
            name = "…" + name[2:]
            heading = f"{name}: {r.numel()} ch, {dead} dead"
        labels.append(((pad, y + 2), heading, font))
        y += head_h + 4
        lines = max(1, math.ceil(r.numel() / per_line))
        slots = pad_rgb.expand(lines * per_line, 3).clone()
        slots[: r.numel()] = colours(r)
        for i in range(lines):
            block = slots[i * per_line : (i + 1) * per_line].repeat_interleave(cell, dim=0)  # [per_line * cell, 3]
            canvas[y : y + cell, x0 : x0 + per_line * cell] = block.unsqueeze(0)
            if cell >= 6:  # a white seam between cells
                canvas[y : y + cell, x0 + cell - 1 : x0 + per_line * cell : cell] = 1.0
            text = str(i * per_line)
            labels.append(((x0 - 4 - measure.textlength(text, font=small), y + (cell - 11) // 2), text, small))
            y += cell + line_gap
    # colour scale: a red "dead" box, then floor .. 1 on the log scale
    bar_top = height - pad - legend_h + 6
    canvas[bar_top : bar_top + 10, x0 : x0 + 20] = dead_rgb
    bar_w = width_px - x0 - 52 - pad - 62
    ramp = torch.logspace(math.log10(floor), 0, bar_w)
    canvas[bar_top : bar_top + 10, x0 + 52 : x0 + 52 + bar_w] = colours(ramp).unsqueeze(0)
    image = Image.fromarray((canvas * 255).round().to(torch.uint8).numpy())
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    for xy, text, f in labels:
        draw.text(xy, text, fill=(0, 0, 0), font=f)
    draw.text((x0, bar_top + 11), "dead", fill=(0, 0, 0), font=small)
    decades = int(round(-math.log10(floor)))
    for k in range(decades + 1):
        x = x0 + 52 + round(k / decades * (bar_w - 1))
        label = f"{10 ** (k - decades):g}"
        draw.text((x - measure.textlength(label, font=small) / 2, bar_top + 11), label, fill=(0, 0, 0), font=small)
    draw.text((x0 + 58 + bar_w, bar_top - 1), "firing rate", fill=(0, 0, 0), font=small)
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


def _panel_geometry(
    n: int, k: int, h: int, w: int, *, cell_px: int | None, width_px: int | None, gap: int, labels: bool,
    font_px: int | None,
) -> dict[str, int]:  # fmt: skip
    """Sizes in :func:`projection_panel` (see there) of ``n`` blocks of ``k`` units of ``h`` × ``w`` images."""

    def sizes(cell: int, per_row: int) -> dict[str, int]:
        font = font_px or min(14, max(10, round(cell * 0.36)))
        frame = max(1, cell // 24)
        text_h = font + 3 if labels else 0
        slot_h = text_h + cell + 2 * frame  # one line of pairs: labels above, framed cells
        lines = math.ceil(k / per_row)
        block_h = lines * slot_h + (lines - 1) * gap
        img_h = block_h - text_h
        img_w = max(1, round(img_h * w / h))
        pair_w = 2 * cell + 1 + 2 * frame
        width = gap + img_w + 2 * gap + per_row * (pair_w + gap)
        sep = 2 * gap + 1  # between blocks: white, a grey rule, white
        height = gap + n * block_h + (n - 1) * sep + gap
        return dict(
            cell=cell, per_row=per_row, font=font, frame=frame, text_h=text_h, slot_h=slot_h, lines=lines,
            block_h=block_h, img_h=img_h, img_w=img_w, pair_w=pair_w, width=width, sep=sep, height=height,
        )  # fmt: skip

    best = None
    for per_row in range(1, k + 1):
        if per_row > 1 and math.ceil(k / per_row) == math.ceil(k / (per_row - 1)):
            continue  # same lines, only wider
        if cell_px is not None:
            cell = cell_px
        else:
            cell = 64
            while cell > 12 and width_px is not None and sizes(cell, per_row)["width"] > width_px:
                cell -= 1
        g = sizes(cell, per_row)
        fits = width_px is None or g["width"] <= width_px
        # prefer: fits the card, then the largest cells, then the squarer panel
        key = (fits, cell, -abs(math.log(g["height"] / g["width"])))
        if best is None or key > best[0]:
            best = (key, g)
    return best[1]


def projection_panel(
    images: torch.Tensor,
    projection: object,
    *,
    cell_px: int | None = None,
    gap: int = 3,
    font_px: int | None = None,
    labels: bool = True,
    width_px: int | None = CARD_WIDTH_PX,
) -> torch.Tensor:
    """DeconvNet projections of one layer as one image (Zeiler & Fergus 2014, Fig. 2).

    One block per probe image, blocks stacked top to bottom (a grey rule between them).
    A block holds the image, enlarged, with the receptive field of each of its top-k
    units boxed (box colour = unit), and beside it a grid of the units, in order of
    activation, reading left to right: for each unit its projection beside the image
    patch under its receptive field, both cropped to that field and upscaled (nearest)
    to the cell size, framed in the unit's colour and labelled ``c<channel>`` above.
    Receptive fields are the support of each projection (:func:`support_boxes`), grown
    to a square. Projections are signed: zero is mid-grey, each scaled by its own max
    ``|value|`` (:func:`signed_thumbnail`); images are min-max scaled per image for
    display (they are usually normalised). A unit with an all-zero projection gets a
    flat grey cell beside the whole image and no box.

    The layout is made for TensorBoard's Images card (``width_px``, 350 px): the number
    of units per line and the cell size are chosen so the panel fits that width with the
    largest cells (about 3 pairs per line for 9 units), instead of a wide strip that the
    card would shrink until nothing can be read.

    Args:
        images: ``[N, C, H, W]`` the images that were projected.
        projection: a :class:`lightning_vis.deconv.Projection` of those images
            (``images [N, K, C, H, W]``, ``channels [N, K]``).
        cell_px: side of one cell in pixels; ``None``: the largest (12–64) that fits
            ``width_px``.
        gap: white pixels between cells.
        font_px: label font size; ``None``: about a third of the cell (10–14).
        labels: draw the ``c<channel>`` labels.
        width_px: the panel's largest width when ``cell_px`` is ``None``; ``None``: no
            limit (64-px cells).

    Returns:
        uint8 tensor ``[3, H, W]``.

    Raises:
        ValueError: ``images`` and ``projection`` do not match, or ``cell_px`` < 4.

    Example::

        >>> from lightning_vis.deconv import project
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
        >>> x = torch.randn(2, 3, 12, 12)
        >>> img = projection_panel(x, project(net, x, "2", top_k=3), cell_px=24)
        >>> img.dtype, img.shape[0], img.shape[1] >= 2 * 24
        (torch.uint8, 3, True)
        >>> projection_panel(x, project(net, x, "2", top_k=4)).shape[2] <= CARD_WIDTH_PX
        True
    """
    proj = projection.images.detach().float().cpu()
    chans = projection.channels.cpu()
    if images.ndim != 4 or proj.ndim != 5 or images.shape[0] != proj.shape[0] or images.shape[1:] != proj.shape[2:]:
        raise ValueError(
            f"images {tuple(images.shape)} do not match the projection's images {tuple(proj.shape)} "
            "(expected [N, C, H, W] and [N, K, C, H, W])"
        )
    if cell_px is not None and (isinstance(cell_px, bool) or not isinstance(cell_px, int) or cell_px < 4):
        raise ValueError(f"Invalid value for cell_px={cell_px!r}. Must be an int >= 4 or None")
    n, k, _, h, w = proj.shape
    pics = _scale(_as_rgb(images.detach().float().cpu()), (1, 2, 3))  # [N, 3, H, W] in [0, 1]
    thumbs = _as_rgb(signed_thumbnail(_as_rgb(proj) if proj.shape[2] not in (1, 3) else proj)).float() / 255
    boxes = support_boxes(proj).tolist()

    g = _panel_geometry(n, k, h, w, cell_px=cell_px, width_px=width_px, gap=gap, labels=labels, font_px=font_px)
    cell, frame, text_h, per_row = g["cell"], g["frame"], g["text_h"], g["per_row"]
    img_h, img_w, pair_w = g["img_h"], g["img_w"], g["pair_w"]
    sep = g["sep"]
    canvas = torch.ones(3, g["height"], g["width"])
    placed = []  # (kind, colour index, geometry) drawn afterwards with Pillow
    scale_y, scale_x = img_h / h, img_w / w
    box_w = max(1, round(min(scale_x, scale_y) / 3))
    for i in range(n):
        top = gap + i * (g["block_h"] + sep)
        if i:
            canvas[:, top - gap - 1, gap:-gap] = 0.75
        y_img = top + text_h
        canvas[:, y_img : y_img + img_h, gap : gap + img_w] = _resize(pics[i], (img_h, img_w))
        for j in range(k):
            line, col = divmod(j, per_row)
            y = top + line * (g["slot_h"] + gap) + text_h + frame
            x = gap + img_w + 2 * gap + col * (pair_w + gap) + frame
            t, lft, b, r = _square_box(boxes[i][j], h, w)
            canvas[:, y : y + cell, x : x + cell] = _resize(thumbs[i, j, :, t:b, lft:r], (cell, cell))
            x2 = x + cell + 1
            canvas[:, y : y + cell, x2 : x2 + cell] = _resize(pics[i, :, t:b, lft:r], (cell, cell))
            placed.append(("frame", j, (x - frame, y - frame, x2 + cell + frame - 1, y + cell + frame - 1)))
            if labels:
                placed.append(("text", j, (x - frame, y - frame - text_h, f"c{int(chans[i, j])}")))
            if boxes[i][j][0] >= 0:
                bt, bl, bb, br = boxes[i][j]
                box = (gap + bl * scale_x, y_img + bt * scale_y, gap + br * scale_x - 1, y_img + bb * scale_y - 1)
                placed.append(("box", j, box))

    import numpy as np
    from PIL import Image, ImageDraw

    image = Image.fromarray(to_uint8(canvas).permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(image)
    font = _font(g["font"]) if labels else None
    for kind, j, geom in placed:
        colour = UNIT_COLOURS[j % len(UNIT_COLOURS)]
        if kind == "frame":
            draw.rectangle(geom, outline=colour, width=frame)
        elif kind == "box":
            draw.rectangle(geom, outline=colour, width=box_w)
        else:
            x0, y0, _, _ = font.getbbox(geom[2])
            draw.text((geom[0] - x0, geom[1] - y0 + 1), geom[2], fill=colour, font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()
