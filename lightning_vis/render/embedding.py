"""The ``embedding/neighbours`` picture: nearest neighbours in feature space and in pixel space."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_vis.render._core import _font

__all__ = ["neighbours_panel"]

_SAME = (40, 160, 60)
_OTHER = (210, 40, 40)
_NEUTRAL = (120, 120, 120)
_QUERY = (20, 20, 20)


def _fit(text: str, font: object, width: int, draw: object) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def neighbours_panel(
    thumbnails: torch.Tensor,
    queries: Sequence[int],
    feature_neighbours: torch.Tensor,
    pixel_neighbours: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    cell_px: int = 28,
    font_px: int = 11,
    agreement: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Query images, each followed by its nearest neighbours in feature space, then in pixel space.

    The CS231n figure (Krizhevsky et al. 2012, Fig. 4): images close in a late layer's
    feature space share their class even where their pixels differ; pixel-space
    neighbours share colour and layout instead. One row per query: the query (dark
    frame), its ``k`` feature-space neighbours, a divider, its ``k`` pixel-space
    neighbours. With labels, each cell is captioned with its class and a neighbour's frame
    is green when it shares the query's class, red when not.

    Args:
        thumbnails: ``[N, 3, S, S]`` uint8 images of all samples.
        queries: ``Q`` row indices of the queries.
        feature_neighbours: ``[Q, k]`` indices, nearest first.
        pixel_neighbours: ``[Q, k]`` indices, nearest first.
        labels: ``[N]`` integer labels (optional).
        class_names: names for the labels (optional; numbers otherwise).
        cell_px: side of one cell in pixels.
        font_px: caption font size.
        agreement: the share of same-class neighbours (features, pixels), shown in the
            headers (e.g. from :func:`lightning_vis.embedding.neighbour_agreement`).

    Returns:
        uint8 tensor ``[3, H, W]``.

    Raises:
        ValueError: shapes that do not match.

    Example::

        >>> thumbs = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
        >>> nn = torch.tensor([[1, 2], [0, 2]])
        >>> img = neighbours_panel(thumbs, [0, 1], nn, nn.flip(1), labels=torch.tensor([0, 0, 1, 1, 0, 1]))
        >>> img.dtype, img.shape[0], img.shape[1] > 2 * 52
        (torch.uint8, 3, True)
    """
    if thumbnails.ndim != 4 or thumbnails.shape[1] != 3:
        raise ValueError(f"Expected thumbnails [N, 3, S, S], got shape {tuple(thumbnails.shape)}")
    queries = [int(q) for q in queries]
    if feature_neighbours.ndim != 2 or feature_neighbours.shape != pixel_neighbours.shape:
        raise ValueError(
            f"feature_neighbours {tuple(feature_neighbours.shape)} and pixel_neighbours "
            f"{tuple(pixel_neighbours.shape)} must both be [Q, k]"
        )
    if feature_neighbours.shape[0] != len(queries):
        raise ValueError(f"Got {len(queries)} queries but {feature_neighbours.shape[0]} rows of neighbours")
    if isinstance(cell_px, bool) or not isinstance(cell_px, int) or cell_px < 8:
        raise ValueError(f"Invalid value for cell_px={cell_px!r}. Must be an int >= 8")
    if labels is not None and labels.shape[0] != thumbnails.shape[0]:
        raise ValueError(f"Got {labels.shape[0]} labels for {thumbnails.shape[0]} thumbnails")

    import numpy as np
    from PIL import Image, ImageDraw

    thumbs = thumbnails.detach().cpu()
    if thumbs.dtype != torch.uint8:
        thumbs = (thumbs.float().clamp(0, 1) * 255).round().to(torch.uint8)
    cells = torch.nn.functional.interpolate(thumbs.float(), size=(cell_px, cell_px), mode="bilinear", antialias=True,
                                            align_corners=False).clamp(0, 255)  # fmt: skip
    q, k = feature_neighbours.shape
    frame = max(2, cell_px // 20)
    gap = 3
    divider = 4 * gap
    box = cell_px + 2 * frame
    font = _font(font_px)
    head_font = _font(font_px + 1)
    caption_h = font_px + 3 if labels is not None else 0
    header_h = font_px + 8
    row_h = box + caption_h + gap
    block_w = k * (box + gap)
    width = gap + box + 2 * gap + block_w + divider + block_w
    height = header_h + q * row_h + gap
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x_query = gap
    x_feat = x_query + box + 2 * gap
    x_pix = x_feat + block_w + divider
    placed = []  # (x, y, index, colour)
    for r, query in enumerate(queries):
        y = header_h + r * row_h
        placed.append((x_query, y, query, _QUERY))
        for block_x, nbrs in ((x_feat, feature_neighbours), (x_pix, pixel_neighbours)):
            for j in range(k):
                idx = int(nbrs[r, j])
                if labels is None:
                    colour = _NEUTRAL
                else:
                    colour = _SAME if int(labels[idx]) == int(labels[query]) else _OTHER
                placed.append((block_x + j * (box + gap), y, idx, colour))
    for x, y, idx, colour in placed:
        canvas[y : y + box, x : x + box] = colour
        canvas[y + frame : y + frame + cell_px, x + frame : x + frame + cell_px] = (
            cells[idx].permute(1, 2, 0).round().to(torch.uint8).numpy()
        )
    # the divider between the two blocks
    mid = x_pix - divider // 2
    canvas[header_h : height - gap, mid - 1 : mid + 1] = 150

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    heads = ["nearest by features", "nearest by pixels"]
    if agreement is not None:
        heads = [f"{h} · {a:.0%} same class" for h, a in zip(heads, agreement)]
    for text, x0, x1 in (("query", x_query, x_query + box), (heads[0], x_feat, x_feat + block_w),
                         (heads[1], x_pix, x_pix + block_w)):  # fmt: skip
        text = _fit(text, head_font, x1 - x0, draw)
        tw = draw.textlength(text, font=head_font)
        draw.text((x0 + (x1 - x0 - tw) / 2, 2), text, fill=(0, 0, 0), font=head_font)
    if labels is not None:
        for x, y, idx, colour in placed:
            label = int(labels[idx])
            name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
            text = _fit(name, font, box + gap, draw)
            tw = draw.textlength(text, font=font)
            ink = (0, 0, 0) if colour in (_QUERY, _NEUTRAL) else colour
            draw.text((x + (box - tw) / 2, y + box + 1), text, fill=ink, font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()
