"""Rendering: tensors in, uint8 CHW images out (what TensorBoard's ``add_image`` takes).

Pure functions, no Lightning: grids come from :func:`torchvision.utils.make_grid`, text
from Pillow, colour maps from matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torchvision.utils import make_grid

__all__ = ["filter_grid", "to_uint8", "upscale"]

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
