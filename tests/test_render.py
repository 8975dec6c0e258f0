"""Rendering as pure functions: filter grids, and every picture laid out for TensorBoard's image card."""

import math

import pytest
import torch

from lightning_vis.render import (
    CARD_WIDTH_PX,
    DEAD_RGB,
    UNIT_COLOURS,
    activity_heatmap,
    evolution_strip,
    filter_grid,
    projection_panel,
    to_uint8,
)
from lightning_vis.render._core import _panel_geometry


def _cells(img, n_rows, n_cols):
    return img.shape


def test_colour_filters_are_coloured_and_grey_filters_are_grey():
    torch.manual_seed(0)
    colour = filter_grid(torch.randn(4, 3, 5, 5), cell_px=10).float()
    grey = filter_grid(torch.randn(4, 2, 3, 3), cell_px=9).float()
    assert (colour[0] - colour[1]).abs().max() > 50  # channels differ somewhere
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_cell_count_and_upscaling():
    # 9 RGB filters 3x3, cell_px=12 -> factor 4: cells 12px + 2*1px frame = 14, grid 3x3 with padding 2
    img = filter_grid(torch.randn(9, 3, 3, 3), cell_px=12)
    assert img.shape == (3, 3 * (14 + 2) + 2, 3 * (14 + 2) + 2)
    img = filter_grid(torch.randn(9, 3, 3, 3), cell_px=12, nrow=9)
    assert img.shape == (3, 14 + 4, 9 * (14 + 2) + 2)


def test_grey_filters_show_one_tile_per_input_channel():
    one = filter_grid(torch.randn(1, 1, 3, 3), cell_px=3, nrow=1)
    four = filter_grid(torch.randn(1, 4, 3, 3), cell_px=3, nrow=1)
    # 4 tiles of 3px as a 2x2 mosaic with 1px gaps vs 1 tile: one tile and one gap more each way
    assert four.shape[2] - one.shape[2] == 3 + 1 and four.shape[1] - one.shape[1] == 3 + 1
    capped = filter_grid(torch.randn(1, 64, 3, 3), cell_px=3, nrow=1, max_inputs=4)
    assert capped.shape == four.shape
    # 16 inputs: a 4x4 mosaic; each tile holds its own input channel's weights, in reading order
    w = torch.arange(16.0).view(1, 16, 1, 1).expand(1, 16, 3, 3).clone()
    w[0, :, 0, 0] = -1.0  # every tile spans the same range: per-filter scaling keeps them comparable
    img = filter_grid(w, cell_px=3, nrow=1)
    assert img.shape == (3, 2 + 4 * 3 + 3, 2 + 4 * 3 + 3)
    centres = [img[0, 1 + 1 + r * 4, 1 + 1 + c * 4].item() for r in range(4) for c in range(4)]
    assert centres == sorted(centres) and len(set(centres)) == 16  # brightness rises with the channel index


def test_depthwise_and_max_filters():
    img = filter_grid(torch.randn(32, 1, 3, 3), cell_px=3, max_filters=8, nrow=8)
    assert img.shape[2] == 8 * (3 + 2 + 2) + 2


def test_dead_filters_get_red_frame_and_flat_grey():
    w = torch.randn(4, 3, 3, 3)
    w[1] = 0.0
    img = filter_grid(w, cell_px=9, nrow=4, dead=[3])
    red = torch.tensor([round(c * 255) for c in DEAD_RGB], dtype=torch.uint8).view(3, 1)
    cell = 9 + 2  # 3px * 3 + 2 * 1px frame
    top = img[:, 2, :]  # first frame row of every cell
    reds = [(top[:, 2 + i * (cell + 2) : 2 + i * (cell + 2) + cell] == red).all().item() for i in range(4)]
    assert reds == [False, True, False, True]
    inner = img[:, 3:12, 2 + (cell + 2) + 1 : 2 + (cell + 2) + 1 + 9]  # filter 1's pixels
    assert (inner == 128).all()  # zero filter: flat mid-grey


def test_layer_normalisation_shows_relative_strength():
    w = torch.randn(2, 3, 3, 3)
    w[1] = w[0] * 0.1
    per_filter = filter_grid(w, cell_px=3, nrow=2).float()
    per_layer = filter_grid(w, cell_px=3, nrow=2, normalize="layer").float()
    c0 = slice(3, 6)
    c1 = slice(3 + 7, 6 + 7)
    assert torch.allclose(per_filter[:, 3:6, c0], per_filter[:, 3:6, c1], atol=1)
    assert per_layer[:, 3:6, c1].std() < per_layer[:, 3:6, c0].std() / 3


def test_conv1d_and_conv3d_weights():
    assert filter_grid(torch.randn(4, 3, 5)).dtype == torch.uint8
    assert filter_grid(torch.randn(4, 3, 3, 5, 5)).dtype == torch.uint8


def test_input_not_modified_and_errors():
    w = torch.randn(4, 3, 3, 3)
    copy = w.clone()
    filter_grid(w, dead=[0])
    assert torch.equal(w, copy)
    with pytest.raises(ValueError, match="normalize='bad'.*'filter', 'layer'"):
        filter_grid(w, normalize="bad")
    with pytest.raises(ValueError, match="rank 3, 4 or 5"):
        filter_grid(torch.randn(4, 3))


def test_to_uint8_clips():
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 3.0])).tolist() == [0, 0, 255, 255]


# ----------------------------------------------------------------------------- legible in TensorBoard's card
# The Images tab draws every picture 350 px wide (`width: 100%`, `image-rendering: pixelated`): a wider
# picture loses whole pixel rows and columns, so thin frames and text vanish. Each picture must fit.
def _colours(img):
    return img.permute(1, 2, 0).reshape(-1, 3)


def _count(img, rgb):
    return int((_colours(img) == torch.tensor(rgb, dtype=torch.uint8)).all(1).sum())


def test_card_width_is_tensorboards():
    assert CARD_WIDTH_PX == 350


def test_filter_grid_fits_the_card_near_square_with_big_cells():
    for shape in [(32, 3, 5, 5), (64, 3, 7, 7), (16, 8, 3, 3), (64, 64, 3, 3)]:
        img = filter_grid(torch.randn(*shape))
        assert img.shape[2] <= CARD_WIDTH_PX, shape
        assert 0.8 <= img.shape[1] / img.shape[2] <= 1.25, shape  # near square
    # 64 RGB 7x7 filters: 8 x 8 cells, each still >= 24 px (the tiles shrank from 42 px to fit)
    img = filter_grid(torch.randn(64, 3, 7, 7))
    assert img.shape[2] >= 8 * 24
    assert filter_grid(torch.randn(64, 3, 7, 7), width_px=None).shape[2] > CARD_WIDTH_PX  # the old size


def test_projection_panel_fits_the_card_with_readable_cells():
    from lightning_vis.deconv import Projection

    g = torch.Generator().manual_seed(0)
    n, k = 4, 9
    images = torch.randn(n, 3, 32, 32, generator=g)
    proj = torch.zeros(n, k, 3, 32, 32)
    proj[:, :, :, 8:16, 8:16] = torch.randn(n, k, 3, 8, 8, generator=g)
    channels = torch.arange(n * k).view(n, k) * 3
    p = Projection(proj, channels, torch.zeros(n, k, 2, dtype=torch.long), torch.ones(n, k), "x", "deconvnet", "")
    img = projection_panel(images, p)
    geometry = _panel_geometry(n, k, 32, 32, cell_px=None, width_px=CARD_WIDTH_PX, gap=3, labels=True, font_px=None)
    assert img.shape == (3, geometry["height"], geometry["width"])
    assert img.shape[2] <= CARD_WIDTH_PX
    assert geometry["per_row"] == 3 and geometry["cell"] >= 28  # 9 units: 3 x 3 pairs, cells ~30 px
    assert geometry["img_h"] >= 4 * 32  # the image, enlarged at least 4x, with the fields boxed
    assert geometry["font"] >= 10
    for colour in UNIT_COLOURS[:k]:  # every unit's frame (and label and box) is drawn in its colour
        assert _count(img, colour) > 4 * geometry["cell"]
    # the old layout was one line of 1 + 2k cells: 19 cells wide for 9 units
    assert img.shape[2] < (1 + 2 * k) * geometry["cell"]


def test_evolution_strip_wraps_into_bands_within_the_card():
    g = torch.Generator().manual_seed(0)
    rows, cols = 4, 16
    # every thumbnail one distinct flat colour (not grey, unlike the anti-aliased text): find each one back
    colours = torch.randperm(250, generator=g)[: rows * cols].view(rows, cols) + 3
    rgb = torch.stack([colours, 255 - colours, torch.full_like(colours, 40)], dim=-1)  # [rows, cols, 3]
    thumbs = rgb.view(rows, cols, 3, 1, 1).expand(rows, cols, 3, 32, 32).to(torch.uint8)
    labels_r, labels_c = [f"ch {r}" for r in range(rows)], [f"ep {t + 1}" for t in range(cols)]
    img = evolution_strip(thumbs, labels_r, labels_c, cell_px=48)
    assert img.shape[2] <= CARD_WIDTH_PX
    assert img.shape[2] / img.shape[1] <= 1.5 and img.shape[1] / img.shape[2] <= 1.5  # near square
    for r in range(rows):
        for t in range(cols):  # each thumbnail drawn once, whole, at 32 px (1:1)
            assert _count(img, tuple(rgb[r, t].tolist())) == 32 * 32, (r, t)
    # a new snapshot only adds to the last band: the previous strip is the top-left corner of the new one,
    # but for the new column drawn on what was white
    previous = None
    for t in range(1, cols + 1):
        strip = evolution_strip(thumbs[:, :t], labels_r, labels_c[:t], cell_px=48)
        assert strip.shape[2] <= CARD_WIDTH_PX
        if previous is not None:
            corner = strip[:, : previous.shape[1], : previous.shape[2]]
            changed = (corner != previous).any(0)
            assert (previous[:, changed] == 255).all(), t
            assert changed.sum() <= 4 * (34 * 34) + 40 * 20, t  # one column of 4 cells and its label at most
        previous = strip
    # few snapshots: one band, as before
    assert evolution_strip(thumbs[:, :3], labels_r, labels_c[:3], cell_px=48).shape[1] < img.shape[1] / 2


def test_activity_heatmap_is_card_wide_near_square_with_visible_cells():
    sizes = {"net.features.2": 32, "net.features.6": 64, "net.features.10": 128, "net.features.14": 128}
    rates = {name: torch.full((c,), 0.5) for name, c in sizes.items()}
    rates["net.features.6"][[3, 17, 40]] = 0.0  # three dead channels
    img = activity_heatmap(rates, title="firing rate per channel, step 100")
    assert img.shape[2] == CARD_WIDTH_PX
    assert img.shape[1] <= 1.5 * img.shape[2]
    red = _count(img[:, :-32], tuple(round(c * 255) for c in DEAD_RGB))  # above the colour scale
    cell = math.isqrt(red // 3 + 1)
    assert red >= 3 * 12 * 11  # three dead cells, each >= 12 px (a white seam on the right)
    # every channel has its cell: the whole picture holds sum(C) cells of the 0.5 colour
    healthy = activity_heatmap({name: torch.full((c,), 0.5) for name, c in sizes.items()})
    values, counts = torch.unique(_colours(healthy[:, :-32]), dim=0, return_counts=True)
    cells = [(int(c), tuple(v.tolist())) for v, c in zip(values, counts) if v.tolist() not in ([255] * 3, [237] * 3)]
    mid = max(cells)[1]  # the most frequent colour besides white and the light-grey padding: rate 0.5
    assert _count(healthy[:, :-32], mid) >= sum(sizes.values()) * cell * (cell - 1) * 0.9
    # many channels still fit the card's width
    wide = activity_heatmap({f"s{i}": torch.rand(512) for i in range(4)})
    assert wide.shape[2] == CARD_WIDTH_PX
    with pytest.raises(ValueError, match=r"width_px=100\. Must be an int >= 200"):
        activity_heatmap(rates, width_px=100)


@pytest.mark.parametrize("images,top_n,size", [(4, 9, 32), (8, 9, 4), (4, 4, 16), (1, 16, 8)])
def test_feature_maps_panel_fits_the_card(images, top_n, size):
    from lightning_vis.render import feature_maps_panel
    from lightning_vis.units import FeatureMapsResult

    torch.manual_seed(0)
    maps = FeatureMapsResult(
        maps=torch.rand(images, top_n, size, size),
        channels=torch.arange(top_n).repeat(images, 1),
        means=torch.rand(images, top_n),
        layer="conv",
    )
    img = feature_maps_panel(torch.rand(images, 3, 32, 32), maps)
    assert img.shape[2] <= CARD_WIDTH_PX
    assert img.shape[1] < 5 * img.shape[2]  # not one long column where two fit
