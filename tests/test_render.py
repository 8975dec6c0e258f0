"""Rendering as pure functions: filter grids."""

import pytest
import torch

from lightning_vis.render import DEAD_RGB, filter_grid, to_uint8


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
    # 4 tiles of 3px + 3 gaps of 1px vs 1 tile
    assert four.shape[2] - one.shape[2] == 3 * 3 + 3
    capped = filter_grid(torch.randn(1, 64, 3, 3), cell_px=3, nrow=1, max_inputs=4)
    assert capped.shape == four.shape


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
