"""``maximize`` / ``invert``: planted patterns, the demo's data as the bar, batch invariance, isolation."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_vis.demo import DemoCNN, make_shapes
from lightning_vis.synthesis import (
    color_decorrelation,
    invert,
    kmeans,
    maximize,
    total_variation,
)

NO_TRANSFORMS = dict(jitter=0, pad=0, rotate=0.0, scale=(1.0, 1.0))
DEMO_MEAN, DEMO_STD = 0.5, 0.25  # lightning_vis.demo.data normalisation


def _pattern(k: int = 7) -> torch.Tensor:
    """A smooth colour-opponent oriented grating under a Gaussian envelope, [3, k, k]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, k), torch.linspace(-1, 1, k), indexing="ij")
    envelope = torch.exp(-(xx**2 + yy**2))
    return torch.stack([torch.cos(3 * (xx + yy)), -torch.cos(3 * (xx + yy)), 0.5 * torch.sin(3 * (xx - yy))]) * envelope


def _planted(k: int = 7) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, k), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with torch.no_grad():
        net[0].weight.normal_(0, 0.1)
        net[0].weight[2] = _pattern(k)
        net[0].bias.zero_()
    return net


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB on the demo's [0, 1] pixel scale, per image."""
    mse = ((a - b) * DEMO_STD).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


# ----------------------------------------------------------------------------- pure helpers
def test_total_variation_known_image_height_and_width_not_channels():
    x = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]]])
    # positions (0,0): dx=1, dy=2 -> 5; (0,1): dx=2, dy=1 -> 5; (1,0): dx=0, dy=-2 -> 4; (1,1): dx=0, dy=-2 -> 4
    assert total_variation(x).tolist() == [18.0]
    assert torch.allclose(total_variation(x, beta=1.0), torch.tensor([2 * math.sqrt(5) + 4.0]), atol=1e-3)
    # channels that differ but are spatially constant have no variation (a channel-difference port gives 2)
    flat = torch.stack([torch.zeros(3, 3), torch.ones(3, 3)])[None]
    assert total_variation(flat).tolist() == [0.0]
    assert total_variation(torch.cat([x, x], 1)).tolist() == [36.0]  # summed over channels


def test_color_decorrelation_reproduces_the_covariance():
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.2, 0.3, 0.9]])
    x = torch.einsum("dc,nchw->ndhw", mix, torch.randn(16, 3, 16, 16, generator=g))
    m = color_decorrelation(x).double()
    cov = torch.cov(x.transpose(0, 1).reshape(3, -1).double())
    ratio = (m @ m.T) / cov
    assert torch.allclose(ratio, ratio[0, 0].expand(3, 3), rtol=1e-4)
    assert torch.allclose(m, m.T)


def test_kmeans_is_seeded_and_finds_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.cat([c + 0.3 * torch.randn(n, 2, generator=g) for c, n in zip(centres, (12, 8, 5))])
    labels, found = kmeans(pts, 3, seed=1)
    assert torch.bincount(labels).tolist() == [12, 8, 5]  # ordered by size
    assert torch.allclose(found, centres, atol=0.5)
    again, _ = kmeans(pts, 3, seed=1)
    assert torch.equal(labels, again)
    with pytest.raises(ValueError, match="k=4"):
        kmeans(pts[:3], 4)


# ----------------------------------------------------------------------------- maximize: correctness
@pytest.mark.parametrize("param", ["fourier", "pixel"])
def test_planted_unit_image_correlates_with_its_filter(param):
    k = 7
    res = maximize(_planted(k), "1", [2], size=32, steps=128, objective="center", l2=1.0, param=param,
                   mean=DEMO_MEAN, std=DEMO_STD, **NO_TRANSFORMS)  # fmt: skip
    o = (32 - k + 1) // 2  # the centre unit's receptive field starts here
    crop = res.images[0, :, o : o + k, o : o + k]
    corr = torch.corrcoef(torch.stack([crop.flatten(), _pattern(k).flatten()]))[0, 1]
    assert corr >= 0.9, float(corr)
    # the reached activation is the planted filter applied at the centre of the returned image
    direct = F.relu((crop * _pattern(k)).sum())
    assert torch.allclose(res.activations[0], direct, rtol=1e-4)


def test_images_stay_in_the_data_range_and_activation_is_measured_without_transforms():
    net = _planted()
    lo, hi = torch.tensor([-1.0, 0.0, -3.0]), torch.tensor([1.0, 2.0, 0.5])
    for param in ("fourier", "pixel"):
        res = maximize(net, "1", [0, 2], size=20, steps=12, value_range=(lo, hi), param=param)
        assert (res.images >= lo.view(1, 3, 1, 1) - 1e-6).all() and (res.images <= hi.view(1, 3, 1, 1) + 1e-6).all()
        with torch.no_grad():
            act = net[:2](res.images)
        assert torch.allclose(res.activations, act[[0, 1], [0, 2]].mean(dim=(1, 2)), atol=1e-5)
        assert res.curve.shape == (12, 2) and torch.isfinite(res.curve).all()


def test_batched_units_equal_single_calls_with_the_same_seed():
    torch.manual_seed(0)
    net = DemoCNN(width=32).eval()  # the demo's width: where oneDNN's rounding used to diverge
    chans = [0, 3, 5, 3]
    batched = maximize(net, "features.12", chans, size=32, steps=20, seed=3)
    singles = [maximize(net, "features.12", [c], size=32, steps=20, seed=3) for c in chans]
    # bit for bit on the CPU (convolutions run without oneDNN's batch-size-dependent kernels)
    assert torch.equal(batched.images, torch.cat([s.images for s in singles]))
    assert torch.equal(batched.activations, torch.cat([s.activations for s in singles]))
    assert torch.equal(batched.curve, torch.cat([s.curve for s in singles], 1))
    assert torch._C._get_mkldnn_enabled()  # the global flag is restored
    assert torch.equal(batched.images[1], batched.images[3])  # same unit, same seed: same image
    assert not torch.allclose(batched.images[0], batched.images[1])
    other_seed = maximize(net, "features.12", [3], size=32, steps=20, seed=4)
    assert not torch.allclose(other_seed.images[0], batched.images[1])
    chunked = maximize(net, "features.12", chans, size=32, steps=20, seed=3, max_batch=3)
    assert torch.equal(chunked.images, batched.images)


def test_redirected_relu_wakes_a_dead_start():
    net = nn.Sequential(nn.Conv2d(3, 1, 3), nn.ReLU(), nn.Conv2d(1, 1, 1))
    with torch.no_grad():
        net[0].weight.fill_(0.05)
        net[0].bias.fill_(-3.0)  # dead for every image in the [0, 1] range
        net[2].weight.fill_(1.0)
        net[2].bias.zero_()
    dead = maximize(net, "2", [0], size=12, steps=40, redirect_steps=0, lr=0.1)
    woken = maximize(net, "2", [0], size=12, steps=40, redirect_steps=40, lr=0.1, l2=0.0,
                     mean=0.5, std=0.01)  # fmt: skip  (a wide value range: the unit can fire)
    assert float(dead.activations[0]) == 0.0 and float(dead.curve.abs().max()) == 0.0
    assert float(woken.activations[0]) > 0.0


def test_objectives_and_linear_layers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    res = maximize(net, "4", [0, 2], size=16, steps=6)
    assert res.images.shape == (2, 3, 16, 16) and res.activations.shape == (2,)
    centre = maximize(net, "0", [1], size=16, steps=6, objective="center")
    assert centre.objective == "center"


def test_multifaceted_starts_from_cluster_means_and_is_batch_invariant():
    torch.manual_seed(0)
    net = DemoCNN(width=8).eval()
    x, _ = make_shapes(48, seed=2)
    res = maximize(net, "features.6", [1, 4], size=32, steps=10, facets=3, init=x)
    assert res.images.shape == (2, 3, 3, 32, 32)
    assert res.activations.shape == (2, 3) and res.curve.shape == (10, 2, 3)
    assert not torch.allclose(res.images[0, 0], res.images[0, 1], atol=1e-3)  # facets differ
    single = maximize(net, "features.6", [4], size=32, steps=10, facets=3, init=x)
    assert torch.equal(single.images[0], res.images[1])
    per_unit = maximize(net, "features.6", [1], size=32, steps=10, facets=2, init=x[None, :10])
    assert per_unit.images.shape == (1, 2, 3, 32, 32)


def test_facet_starts_are_the_cluster_mean_images():
    """Two kinds of images (red and blue squares): with 2 facets and no optimisation budget
    to speak of, each facet is close to the mean image of one kind."""
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3, 3).repeat(2, 1)[:4, :, None, None])
        net[0].bias.zero_()
    red = torch.zeros(6, 3, 16, 16)
    red[:, 0] = 0.9
    blue = torch.zeros(4, 3, 16, 16)
    blue[:, 2] = 0.9
    pool = torch.cat([red, blue]) + 0.02 * torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    res = maximize(net, "1", [3], steps=1, lr=1e-6, facets=2, init=pool[None], centre_bias=False,
                   blur_every=None, **NO_TRANSFORMS)  # fmt: skip
    means = [red.mean(0) + 0.01, blue.mean(0) + 0.01]
    assert (res.images[0, 0] - means[0]).abs().max() < 0.05  # the larger cluster first
    assert (res.images[0, 1] - means[1]).abs().max() < 0.05


# ----------------------------------------------------------------------------- isolation
def test_model_state_grads_rng_and_hooks_are_left_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Conv2d(4, 4, 3))
    net.train()
    sentinel = [torch.full_like(p, 7.0) for p in net.parameters()]
    for p, s in zip(net.parameters(), sentinel):
        p.grad = s
    net[4].weight.requires_grad_(False)
    buffers = [b.clone() for b in net.buffers()]
    images = torch.rand(2, 3, 12, 12)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with torch.inference_mode():
        maximize(net, "4", [0, 1], size=12, steps=5)
        invert(net, images, "4", steps=3)
    assert net.training and all(m.training for m in net.modules())
    assert all(p.grad is s for p, s in zip(net.parameters(), sentinel))
    assert [p.requires_grad for p in net.parameters()] == [True, True, True, True, False, True]
    assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers()))
    assert torch.equal(torch.get_rng_state(), rng[0]) and (np.random.get_state()[1] == rng[1]).all()
    assert random.getstate() == rng[2]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_hooks_removed_after_an_error_inside_the_loop():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    calls = [0]

    def forward(x):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("boom")
        return net(x)

    with pytest.raises(RuntimeError, match="boom"):
        maximize(net, "2", [0], size=12, steps=10, forward=forward)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    assert net.training


def test_bad_input_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 2))
    with pytest.raises(ValueError, match="objective='max'.*'mean', 'center'"):
        maximize(net, "0", [0], objective="max")
    with pytest.raises(ValueError, match=r"channels \[4\] out of range.*0\.\.3"):
        maximize(net, "0", [0, 4], size=16, steps=1)
    with pytest.raises(ValueError, match="No module 'conv9'"):
        maximize(net, "conv9", [0])
    with pytest.raises(ValueError, match="facets=k needs init"):
        maximize(net, "0", [0], facets=2)
    with pytest.raises(ValueError, match="Invalid value for size"):
        maximize(net, "0", [0], size=2)
    with pytest.raises(ValueError, match="either value_range"):
        maximize(net, "0", [0], value_range=(0, 1), mean=0.5)
    with pytest.raises(ValueError, match="canvas"):  # the Linear needs exactly 16x16 inputs
        maximize(net, "3", [0], size=40, steps=1, pad=0)
    with pytest.raises(ValueError, match="steps=0"):
        invert(net, torch.rand(1, 3, 16, 16), "0", steps=0)
    with pytest.raises(TypeError, match="float tensor"):
        invert(net, torch.zeros(1, 3, 16, 16, dtype=torch.long), "0")
    with pytest.raises(ValueError, match="lambda_tv_start=0"):
        invert(net, torch.rand(1, 3, 16, 16), "0", lambda_tv_start=0)


# ----------------------------------------------------------------------------- invert
def test_inverting_the_first_block_of_the_demo_cnn_at_init():
    """The demo CNN's first block (conv 5x5 -> BN -> ReLU -> max-pool) at initialisation."""
    torch.manual_seed(0)
    net = DemoCNN().eval()
    held_out, _ = make_shapes(6, seed=1234)
    res = invert(net, held_out, "features.3", mean=DEMO_MEAN, std=DEMO_STD)
    psnr = _psnr(res.images, held_out)
    assert (psnr >= 20).all(), psnr.tolist()
    assert (res.feature_error < 0.1).all(), res.feature_error.tolist()
    assert res.curve.shape == (256, 6) and res.curve[-1].mean() < res.curve[0].mean()


def test_invert_is_batched_over_images():
    torch.manual_seed(0)
    net = DemoCNN(width=8).eval()
    x, _ = make_shapes(3, seed=5)
    both = invert(net, x, "features.3", steps=15, mean=DEMO_MEAN, std=DEMO_STD)
    chunked = invert(net, x, "features.3", steps=15, mean=DEMO_MEAN, std=DEMO_STD, max_batch=2)
    assert torch.equal(both.images, chunked.images)


# ----------------------------------------------------------------------------- a trained demo CNN
@pytest.fixture(scope="module")
def trained_demo():
    """DemoCNN (width 16) trained for 150 SGD steps on the demo's generated shapes."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = DemoCNN(width=16)
    x, y = make_shapes(1200, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(150):
        idx = torch.randint(0, x.shape[0], (32,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.mark.slow
def test_reached_activation_beats_every_demo_image(trained_demo):
    from lightning_vis.synthesis import _forward_layer

    data, _ = make_shapes(1024, seed=77)
    decorrelation = color_decorrelation(data[:64] * DEMO_STD + DEMO_MEAN)
    for layer in ("features.6", "features.13"):
        with torch.no_grad():
            act = _forward_layer(trained_demo, data, layer, None).mean(dim=(2, 3))
        best = act.max(dim=0).values
        units = torch.sort(best, descending=True).indices[:4].tolist()  # the units the data drives hardest
        res = maximize(trained_demo, layer, units, size=32, steps=128, mean=DEMO_MEAN, std=DEMO_STD,
                       decorrelation=decorrelation)  # fmt: skip
        assert (res.activations > best[units]).all(), (layer, res.activations.tolist(), best[units].tolist())


@pytest.mark.slow
def test_inverting_the_first_block_of_a_trained_demo_cnn(trained_demo):
    held_out, _ = make_shapes(6, seed=4321)
    res = invert(trained_demo, held_out, "features.3", mean=DEMO_MEAN, std=DEMO_STD)
    psnr = _psnr(res.images, held_out)
    # every held-out image (the hardest carry pixel noise of sd ~0.12 that the block partly
    # discards); with the paper's constant TV weight (lambda_tv_start=None) one lands at ~19 dB
    assert (psnr >= 20).all(), psnr.tolist()
    assert (res.feature_error < 0.1).all(), res.feature_error.tolist()
    # the annealed TV weight is what gets there: the paper's constant weight, same steps
    constant = invert(trained_demo, held_out, "features.3", mean=DEMO_MEAN, std=DEMO_STD, lambda_tv=5e-3,
                      lambda_tv_start=None)  # fmt: skip
    assert _psnr(constant.images, held_out).min() < 20 and _psnr(constant.images, held_out).mean() < psnr.mean() - 1


def test_the_inner_adam_equals_torch_optim_adam():
    """``_Adam`` (Python step count, no device reads) gives torch.optim.Adam's single-tensor numbers."""
    from lightning_vis.synthesis import _Adam

    torch.manual_seed(0)
    ours = torch.randn(4, 3, 8, 8)
    ref = ours.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=0.05, foreach=False)
    mine = _Adam(ours, 0.05)
    for _ in range(20):
        g = torch.randn_like(ours)
        ref.grad = g.clone()
        opt.step()
        mine.step(g)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-6, atol=1e-7)
