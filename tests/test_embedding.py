"""Pure pieces of the embedding projector: pooling, sprites, neighbours (brute-force oracle), files, picture."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_vis import embedding as emb
from lightning_vis.render import neighbours_panel


# --------------------------------------------------------------------------- pooling
def test_pool_features_channels_first_and_last():
    x = torch.randn(3, 5, 4, 6)
    torch.testing.assert_close(emb.pool_features(x), x.mean(dim=(2, 3)))
    seq = torch.randn(3, 7, 5)  # a Linear's input [N, T, D]
    torch.testing.assert_close(emb.pool_features(seq, channel_dim=-1), seq.mean(dim=1))
    flat = torch.randn(4, 9, dtype=torch.float64)
    out = emb.pool_features(flat)
    assert out.dtype == torch.float32 and torch.equal(out, flat.float())
    volume = torch.randn(2, 3, 2, 2, 2)  # 3-d feature maps
    torch.testing.assert_close(emb.pool_features(volume), volume.mean(dim=(2, 3, 4)))
    with pytest.raises(ValueError, match=r"channel_dim=0. Must be 1 or -1"):
        emb.pool_features(x, channel_dim=0)
    with pytest.raises(ValueError, match="Expected features"):
        emb.pool_features(torch.zeros(3))


def test_pool_features_of_bf16_and_inference_tensors():
    with torch.inference_mode():
        x = torch.randn(2, 4, 3, 3).bfloat16()
        out = emb.pool_features(x)
    assert out.dtype == torch.float32 and out.shape == (2, 4)


# --------------------------------------------------------------------------- sprites
@pytest.mark.parametrize("n", [1, 2, 5, 100, 512, 1000, 4097, 10000])
@pytest.mark.parametrize("hw", [(32, 32), (224, 160), (17, 300), (1000, 1000)])
def test_sprite_limits_and_square_cells(n, hw):
    h, w = hw
    cell = emb.sprite_cell_px(n, h, w)
    assert 1 <= cell <= min(max(h, w), 64)
    per_side = math.ceil(math.sqrt(n))
    assert per_side * cell <= emb.MAX_SPRITE_PX
    if n <= 512:
        assert cell == min(max(h, w), 64)  # small sets: the image's size (capped), never shrunk for the limit


def test_sprite_cell_shrinks_for_many_samples():
    assert emb.sprite_cell_px(10000, 224, 224, max_cell=256) == 8192 // 100
    assert emb.sprite_cell_px(8192**2, 8, 8) == 1
    with pytest.raises(ValueError, match="do not fit a sprite"):
        emb.sprite_cell_px(8192**2 + 1, 8, 8)
    with pytest.raises(ValueError, match=r"n=0. Must be an int >= 1"):
        emb.sprite_cell_px(0, 8, 8)


def test_square_thumbnails_pad_with_the_larger_side():
    img = torch.zeros(1, 3, 10, 30)
    img[:, :, :, :] = torch.linspace(0, 1, 30)  # a horizontal ramp, not constant
    t = emb.square_thumbnails(img, 30)
    assert t.shape == (1, 3, 30, 30) and t.dtype == torch.uint8
    # padded above and below (10 px image centred in a 30 px square), nothing stretched
    assert int(t[0, :, :10].max()) == 0 and int(t[0, :, 20:].max()) == 0
    assert torch.equal(t[0, :, 10:20], (torch.linspace(0, 1, 30) * 255).round().to(torch.uint8).expand(3, 10, 30))
    tall = emb.square_thumbnails(torch.rand(2, 1, 40, 20), 16, pad_value=1.0)
    assert tall.shape == (2, 3, 16, 16) and int(tall[:, :, :, 0].min()) == 255  # grey image as RGB, white padding
    assert torch.equal(tall[:, 0], tall[:, 1])
    const = emb.square_thumbnails(torch.full((1, 3, 8, 8), 7.0), 8)
    assert torch.all(const == 128)  # constant image: flat mid-grey, no NaN


def test_square_thumbnails_do_not_modify_input():
    x = torch.randn(2, 3, 12, 12)
    before = x.clone()
    emb.square_thumbnails(x, 6)
    emb.pixel_vectors(x, max_px=4)
    assert torch.equal(x, before)


def test_make_sprite_layout_and_limits():
    thumbs = torch.stack([torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(1, 6)])  # 5 cells
    sprite = emb.make_sprite(thumbs)
    assert sprite.shape == (3, 12, 12)  # ceil(sqrt(5)) = 3 cells per side, square
    for i in range(5):  # row-major
        r, c = divmod(i, 3)
        assert torch.all(sprite[:, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] == i + 1)
    assert torch.all(sprite[:, 8:, 8:] == 0)  # unused cells black
    with pytest.raises(ValueError, match=r"would be 10 px per side; the projector allows 8. Use cells of at most 4"):
        emb.make_sprite(torch.zeros(4, 3, 5, 5, dtype=torch.uint8), max_side=8)
    with pytest.raises(ValueError, match="square RGB thumbnails"):
        emb.make_sprite(torch.zeros(4, 3, 4, 5, dtype=torch.uint8))


# --------------------------------------------------------------------------- neighbours
def _brute_force(v: torch.Tensor, queries, k, metric):
    out = []
    v64 = v.double()
    for q in queries:
        if metric == "euclidean":
            d = [float(((v64[q] - v64[j]) ** 2).sum().sqrt()) for j in range(len(v))]
        else:
            d = [1 - float(v64[q] @ v64[j] / (v64[q].norm() * v64[j].norm())) for j in range(len(v))]
        order = sorted((dist, j) for j, dist in enumerate(d) if j != q)
        out.append([j for _, j in order[:k]])
    return out


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_nearest_neighbours_match_brute_force(metric):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(70, 6, generator=g)
    queries = [0, 5, 69, 33]
    got = emb.nearest_neighbours(v, queries, 5, metric=metric, chunk=3)  # several chunks
    assert got.tolist() == _brute_force(v, queries, 5, metric)
    every = emb.nearest_neighbours(v, None, 3, metric=metric, chunk=16)
    assert every.shape == (70, 3)
    assert every.tolist() == _brute_force(v, range(70), 3, metric)


def test_nearest_neighbours_ties_duplicates_and_self():
    v = torch.tensor([[0.0], [1.0], [-1.0], [0.0], [1.0]])
    # row 0: row 3 is a duplicate (distance 0), never itself; ties between 1, 2 and 4 go to the lower index
    assert emb.nearest_neighbours(v, [0], 4).tolist() == [[3, 1, 2, 4]]
    assert emb.nearest_neighbours(v, [3], 2).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match=r"k=5. Must be an int in \[1, 4\] for 5 vectors"):
        emb.nearest_neighbours(v, [0], 5)
    with pytest.raises(ValueError, match=r"metric='manhattan'. Must be one of 'euclidean', 'cosine'"):
        emb.nearest_neighbours(v, [0], 1, metric="manhattan")
    with pytest.raises(ValueError, match=r"Query indices must be in \[0, 4\]"):
        emb.nearest_neighbours(v, [5], 1)


def test_neighbour_agreement_and_queries():
    labels = torch.tensor([0, 0, 1, 1])
    nn = torch.tensor([[1, 2], [0, 3], [3, 0], [2, 1]])
    assert emb.neighbour_agreement(nn, labels) == pytest.approx(0.5)
    assert emb.neighbour_agreement(nn[:1], labels, queries=torch.tensor([0])) == pytest.approx(0.5)
    # one query per class in turn, in order of first appearance; more than the classes wraps around
    labels = torch.tensor([3, 1, 3, 1, 2, 2, 0])
    assert emb.select_queries(labels, 7, 4) == [0, 1, 4, 6]
    assert emb.select_queries(labels, 7, 6) == [0, 1, 4, 6, 2, 3]
    assert emb.select_queries(labels, 3, 8) == [0, 1, 2]
    assert emb.select_queries(None, 5, 8) == [0, 1, 2, 3, 4]


def test_feature_space_finds_classes_pixel_space_finds_colour():
    """The CS231n point, on constructed data: features ignore colour, pixels do not."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(40) % 2
    colour = torch.rand(40, 3, 1, 1, generator=g) * 4  # colour dominates pixel distances
    shape = torch.zeros(40, 3, 8, 8)
    shape[labels == 1, :, 2:6, 2:6] = 0.5  # class 1: a faint square
    images = colour + shape
    features = torch.stack([labels.float() * 10, torch.zeros(40)], 1) + 0.01 * torch.randn(40, 2, generator=g)
    k = 3
    feat = emb.neighbour_agreement(emb.nearest_neighbours(features, None, k), labels)
    pix = emb.neighbour_agreement(emb.nearest_neighbours(emb.pixel_vectors(images), None, k), labels)
    assert feat == 1.0 and pix < 0.8


# --------------------------------------------------------------------------- files
def test_write_embedding_merges_the_config_on_disk(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    logdir = str(tmp_path)
    thumbs = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    sprite = emb.write_sprite(logdir, thumbs)
    assert emb.write_sprite(logdir, thumbs) == sprite  # same images: the same file, written once
    meta = emb.write_metadata(logdir, {"label": ["a", "b\tc", "a", "b", "a", "b"], "index": range(6)})
    lines = open(os.path.join(logdir, meta), encoding="utf-8").read().splitlines()
    assert lines[0] == "label\tindex" and lines[2] == "b c\t1" and len(lines) == 7
    single = emb.write_metadata(logdir, {"label": list("abcdef")})
    assert open(os.path.join(logdir, single)).read().splitlines()[0] == "a"  # one column: no header
    # a foreign writer's add_embedding first, then ours, then a second writer (a resumed run)
    first = SummaryWriter(logdir)
    first.add_embedding(torch.randn(6, 2), global_step=0, tag="theirs")
    first.close()
    feats = torch.randn(6, 3)
    emb.write_embedding(logdir, feats, tensor_name="ours @ 1", subdir="embedding/a/1", metadata_path=meta,
                        sprite_path=sprite, cell_px=8)  # fmt: skip
    config = emb.write_embedding(logdir, feats * 2, tensor_name="ours @ 2", subdir="embedding/a/2")
    names = [e.tensor_name for e in config.embeddings]
    assert names == ["theirs:00000", "ours @ 1", "ours @ 2"]
    again = emb.write_embedding(logdir, feats, tensor_name="ours @ 2", subdir="embedding/a/2")  # rewritten step
    assert [e.tensor_name for e in again.embeddings] == names
    saved = np.loadtxt(os.path.join(logdir, "embedding/a/1/tensors.tsv"), delimiter="\t")
    np.testing.assert_allclose(saved, feats.numpy(), rtol=1e-3, atol=1e-4)
    png = Image.open(os.path.join(logdir, sprite))
    assert png.size == (24, 24)  # 3 x 3 cells of 8 px
    with pytest.raises(ValueError, match="cell_px is required"):
        emb.write_embedding(logdir, feats, tensor_name="x", subdir="x", sprite_path=sprite)


def test_add_embedding_alone_drops_earlier_entries(tmp_path):
    """The behaviour write_embedding works around: a second writer forgets the first's snapshots."""
    from torch.utils.tensorboard import SummaryWriter

    a = SummaryWriter(str(tmp_path))
    a.add_embedding(torch.randn(4, 2), global_step=1)
    a.close()
    b = SummaryWriter(str(tmp_path))
    b.add_embedding(torch.randn(4, 2), global_step=2)
    b.close()
    text = open(tmp_path / "projector_config.pbtxt").read()
    assert "default:00002" in text and "default:00001" not in text


# --------------------------------------------------------------------------- picture
def test_neighbours_panel_layout_and_frames():
    n, k = 20, 4
    thumbs = torch.zeros(n, 3, 16, 16, dtype=torch.uint8)
    thumbs[:, 2] = 255  # all blue
    labels = torch.arange(n) % 2
    queries = [0, 1]
    feat = torch.tensor([[2, 4, 6, 8], [3, 5, 7, 9]])  # same class
    pix = torch.tensor([[1, 3, 5, 7], [0, 2, 4, 6]])  # other class
    img = neighbours_panel(thumbs, queries, feat, pix, labels=labels, class_names=["even", "odd"], cell_px=32)
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    h, w = img.shape[1:]
    assert 0.6 < h / w < 1.6 or len(queries) < 4  # close to square for 8 queries; here only 2 rows
    hwc = img.permute(1, 2, 0).reshape(-1, 3)
    colours = {tuple(c) for c in hwc.tolist()}
    assert (40, 160, 60) in colours and (210, 40, 40) in colours  # green and red frames
    # count frame pixels: 8 green-framed cells, 8 red-framed ones
    green = (hwc == torch.tensor([40, 160, 60], dtype=torch.uint8)).all(1).sum()
    red = (hwc == torch.tensor([210, 40, 40], dtype=torch.uint8)).all(1).sum()
    assert green > 0 and red > 0 and abs(int(green) - int(red)) < 0.2 * int(red)
    full = neighbours_panel(thumbs, list(range(8)), feat.repeat(4, 1), pix.repeat(4, 1), labels=labels)
    fh, fw = full.shape[1:]
    assert 0.8 < fh / fw < 1.3 and 300 <= fw <= 350  # 8 queries: close to square, within TensorBoard's 350-px card
    with pytest.raises(ValueError, match="must both be"):
        neighbours_panel(thumbs, queries, feat, pix[:, :2])
    with pytest.raises(ValueError, match="Got 3 queries but 2 rows"):
        neighbours_panel(thumbs, [0, 1, 2], feat, pix)
