"""Class attribution pictures: each image beside its heat-map overlay, captioned."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_vis.render._core import _as_rgb, _font, _resize, _scale, to_uint8

__all__ = ["attribution_panel", "heat_overlay"]

#: Caption colours (RGB 0-255): right or unknown, wrong prediction.
_TEXT_RGB = (20, 20, 20)
_WRONG_RGB = (215, 25, 28)


def _heat(maps: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` → ``[N, H, W]`` in [0, 1]: the positive part divided by each map's max (no NaN)."""
    pos = maps.detach().float().clamp(min=0)
    peak = pos.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, pos / peak.clamp_min(1e-30), torch.zeros_like(pos))


def heat_overlay(
    images: torch.Tensor, maps: torch.Tensor, *, cmap: str = "inferno", alpha: float = 0.55
) -> torch.Tensor:
    """Attribution maps as a colour map blended over the images, float ``[N, 3, H, W]`` in [0, 1].

    Each image is min-max scaled for display; each map's positive part is divided by its
    maximum (an all-zero or all-negative map shows the image under the colour map's low
    end), coloured with the matplotlib colour map ``cmap`` and blended:
    ``(1 − alpha)·image + alpha·colour``.

    Example::

        >>> out = heat_overlay(torch.rand(2, 3, 8, 6), torch.rand(2, 8, 6))
        >>> out.shape, bool(out.min() >= 0), bool(out.max() <= 1)
        (torch.Size([2, 3, 8, 6]), True, True)
    """
    import matplotlib

    if images.ndim != 4 or maps.ndim != 3 or images.shape[0] != maps.shape[0] or images.shape[-2:] != maps.shape[-2:]:
        raise ValueError(
            f"images {tuple(images.shape)} and maps {tuple(maps.shape)} must be [N, C, H, W] and [N, H, W]"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Invalid value for alpha={alpha!r}. Must be in [0, 1]")
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as err:
        raise ValueError(f"Unknown matplotlib colour map cmap={cmap!r}, e.g. 'inferno', 'turbo', 'viridis'") from err
    pics = _scale(_as_rgb(images.detach().float().cpu()), (1, 2, 3))
    heat = _heat(maps.cpu())
    colours = torch.from_numpy(colormap(heat.numpy())[..., :3]).float().permute(0, 3, 1, 2)
    return (1 - alpha) * pics + alpha * colours


def attribution_panel(
    images: torch.Tensor,
    maps: torch.Tensor,
    captions: Sequence[Sequence[str]] | None = None,
    *,
    wrong: Sequence[bool] | None = None,
    cell_px: int = 96,
    cmap: str = "inferno",
    alpha: float = 0.55,
    font_px: int = 12,
    gap: int = 6,
) -> torch.Tensor:
    """One picture of class attribution maps: per image, the image and its heat-map overlay.

    Pairs (image | overlay) are laid out in a grid close to square; above each pair its
    caption lines (e.g. the predicted class with its probability and the true label),
    drawn red where ``wrong`` is set. Small images are enlarged to ``cell_px`` (nearest
    neighbour for the image, bilinear for the map).

    Args:
        images: ``[N, C, H, W]`` the images (any range; min-max scaled per image).
        maps: ``[N, H, W]`` their attribution maps (see :func:`heat_overlay`).
        captions: per image, up to a few short lines of text.
        wrong: per image, ``True`` to draw its caption in red.
        cell_px: height of one cell in pixels (width follows the aspect ratio).
        cmap: matplotlib colour map of the overlay (perceptual: ``"inferno"``, ``"turbo"``…).
        alpha: weight of the colour map in the overlay.
        font_px: caption font size.
        gap: white pixels between pairs.

    Returns:
        uint8 tensor ``[3, H, W]``.

    Example::

        >>> img = attribution_panel(torch.rand(4, 3, 16, 16), torch.rand(4, 16, 16), [["cat 93%"]] * 4,
        ...                         wrong=[False, True, False, False], cell_px=48)
        >>> img.dtype, img.shape[0], img.shape[2] >= 4 * 48
        (torch.uint8, 3, True)
    """
    n, _, h, w = images.shape
    if isinstance(cell_px, bool) or not isinstance(cell_px, int) or cell_px < 24:
        raise ValueError(f"Invalid value for cell_px={cell_px!r}. Must be an int >= 24")
    captions = [list(c) for c in captions] if captions is not None else [[] for _ in range(n)]
    wrong = list(wrong) if wrong is not None else [False] * n
    if len(captions) != n or len(wrong) != n:
        raise ValueError(f"captions ({len(captions)}) and wrong ({len(wrong)}) must have one entry per image ({n})")
    cell_h, cell_w = cell_px, max(24, round(cell_px * w / h))
    big = F.interpolate(maps.detach().float().cpu()[:, None], size=(cell_h, cell_w), mode="bilinear",
                        align_corners=False)[:, 0]  # fmt: skip
    pics = torch.stack([_resize(p, (cell_h, cell_w)) for p in images.detach().float().cpu()])
    overlays = heat_overlay(pics, big, cmap=cmap, alpha=alpha)
    pics = _scale(_as_rgb(pics), (1, 2, 3))

    lines = max((len(c) for c in captions), default=0)
    text_h = lines * (font_px + 3) + (2 if lines else 0)
    pair_w, pair_h = 2 * cell_w + 2, text_h + cell_h
    cols = max(1, min(n, round(math.sqrt(n * pair_h / pair_w))))
    rows = math.ceil(n / cols)
    width, height = gap + cols * (pair_w + gap), gap + rows * (pair_h + gap)
    canvas = torch.ones(3, height, width)
    origins = []
    for i in range(n):
        x0 = gap + (i % cols) * (pair_w + gap)
        y0 = gap + (i // cols) * (pair_h + gap)
        y = y0 + text_h
        canvas[:, y : y + cell_h, x0 : x0 + cell_w] = pics[i]
        canvas[:, y : y + cell_h, x0 + cell_w + 2 : x0 + 2 * cell_w + 2] = overlays[i]
        origins.append((x0, y0))

    import numpy as np
    from PIL import Image, ImageDraw

    image = Image.fromarray(to_uint8(canvas).permute(1, 2, 0).contiguous().numpy())
    if lines:
        draw = ImageDraw.Draw(image)
        font = _font(font_px)
        for (x0, y0), caption, bad in zip(origins, captions, wrong):
            for j, line in enumerate(caption):
                text = _fit(draw, str(line), font, pair_w)
                draw.text((x0 + 1, y0 + j * (font_px + 3)), text, fill=_WRONG_RGB if bad else _TEXT_RGB, font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def _fit(draw: object, text: str, font: object, width: int) -> str:
    """``text`` shortened with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
