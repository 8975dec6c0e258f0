"""``lightning_vis.project``: DeconvNet / guided / saliency projections, and their rendering."""

from __future__ import annotations

import copy
import gc
import random
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import NeuronDeconvolution, NeuronGradient, NeuronGuidedBackprop
from torch import nn

from lightning_vis import project
from lightning_vis.deconv import METHODS, Projection
from lightning_vis.render import CARD_WIDTH_PX, projection_panel, support_boxes
from lightning_vis.render._core import _panel_geometry

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum.*")

CAPTUM = {"deconvnet": NeuronDeconvolution, "guided": NeuronGuidedBackprop, "saliency": NeuronGradient}


# ----------------------------------------------------------------------------- models
class Net(nn.Module):
    """conv → ReLU → overlapping ceil-mode max-pool → stride-2 conv → BN → ReLU → grouped conv
    → ReLU → 1×1 conv.

    ``form`` picks how the rectifiers are called; the parameters are the same for every
    form, so one state dict fits all.
    """

    def __init__(self, form: str = "module"):
        super().__init__()
        self.form = form
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv4 = nn.Conv2d(8, 10, 1)
        if form == "module":
            self.r1, self.r2, self.r3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        elif form == "reused":
            self.relu = nn.ReLU(inplace=True)

    def act(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.form == "module":
            return (self.r1, self.r2, self.r3)[i](x)
        if self.form == "reused":
            return self.relu(x)
        if self.form == "functional":
            return [lambda t: F.relu(t, inplace=True), torch.relu, lambda t: t.relu_()][i](x)
        if self.form == "tensor":
            return [lambda t: t.relu(), F.relu, lambda t: torch.relu_(t)][i](x)
        raise AssertionError(self.form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x), 0))
        x = self.act(self.bn(self.conv2(x)), 1)
        x = self.act(self.conv3(x), 2)
        return self.conv4(x).mean((2, 3))


def make_net(form: str = "module", seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net(form)
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.1, 0.3)
    return net


def images(n: int = 3, h: int = 15, w: int = 17, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def hook_count(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            total += len(getattr(m, attr))
        total += len(getattr(m, "_forward_hooks_always_called", {}))
    return total


# ----------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("method", list(METHODS))
def test_matches_captum_per_unit(method):
    """Every projected unit equals Captum's neuron attribution × the seed (nn.ReLU modules)."""
    net, x = make_net("module"), images(3)
    p = project(net, x, "conv4", top_k=4, method=method)
    assert p.images.shape == (3, 4, 3, 15, 17)
    assert (p.activations > 0).all()  # positive seeds: the rules are homogeneous in the seed
    oracle = CAPTUM[method](net.eval(), net.conv4)
    for n in range(3):
        for k in range(4):
            c, (r, col) = int(p.channels[n, k]), p.locations[n, k].tolist()
            ref = oracle.attribute(x[n : n + 1], neuron_selector=(c, r, col))[0]
            assert ref.abs().max() > 0
            assert rel_err(p.images[n, k] / p.activations[n, k], ref) <= 1e-4, (method, n, k)


class PoolNet(nn.Module):
    """Average, adaptive-average and max pooling, a grouped stride-2 conv, a residual addition."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.r1 = nn.ReLU()
        self.avg = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2, groups=4)
        self.r2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.r3 = nn.ReLU()
        self.adapt = nn.AdaptiveAvgPool2d(3)
        self.max = nn.MaxPool2d(2, stride=1)
        self.conv4 = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        x = self.r2(self.conv2(self.avg(self.r1(self.conv1(x)))))
        x = self.r3(self.conv3(x) + x)
        return self.conv4(self.max(self.adapt(x)))


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
def test_pooling_and_residual_match_captum(method):
    torch.manual_seed(4)
    net, x = PoolNet().eval(), images(2, 14, 14)
    with torch.no_grad():
        net.conv4.bias.add_(0.5)  # positive seeds: the rules are homogeneous in the seed
    p = project(net, x, "conv4", top_k=3, method=method)
    assert (p.activations > 0).all()
    oracle = CAPTUM[method](net, net.conv4)
    for n in range(2):
        for k in range(3):
            c, (r, col) = int(p.channels[n, k]), p.locations[n, k].tolist()
            ref = oracle.attribute(x[n : n + 1], neuron_selector=(c, r, col))[0]
            assert rel_err(p.images[n, k] / p.activations[n, k], ref) <= 1e-4


@pytest.mark.parametrize("form", ["reused", "functional", "tensor"])
@pytest.mark.parametrize("method", list(METHODS))
def test_call_forms_give_identical_projections(form, method):
    """nn.ReLU modules, a reused in-place module, F.relu(inplace), torch.relu, x.relu_(), Tensor.relu."""
    ref_net = make_net("module")
    net = make_net(form)
    net.load_state_dict(ref_net.state_dict())
    x = images(2)
    ref = project(ref_net, x, "conv4", top_k=5, method=method)
    got = project(net, x, "conv4", top_k=5, method=method)
    assert torch.equal(got.channels, ref.channels) and torch.equal(got.locations, ref.locations)
    torch.testing.assert_close(got.images, ref.images, rtol=1e-6, atol=1e-7)


def test_methods_differ_hand_computed():
    """1×1 conv (w=1) → ReLU → 3×3 conv with one negative weight: the three rules differ, as computed by hand."""
    net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU(), nn.Conv2d(1, 1, 3, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[2].weight.copy_(torch.tensor([[1.0, 1, 1], [1, 1, 1], [1, 1, -1]]).view(1, 1, 3, 3))
    x = torch.tensor([[1.0, -1, 0], [0, 2, 0], [0, 0, 0.5]]).view(1, 1, 3, 3)
    seed = 1 + 2 - 0.5
    got = {m: project(net, x, "2", top_k=1, method=m) for m in METHODS}
    for p in got.values():
        assert p.activations.item() == pytest.approx(seed) and p.locations.tolist() == [[[0, 0]]]
    deconv = seed * torch.tensor([[1.0, 1, 1], [1, 1, 1], [1, 1, 0]])  # max(R, 0), mask ignored
    guided = seed * torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0]])  # max(R, 0) and x > 0
    saliency = seed * torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, -1]])  # R · [x > 0]
    torch.testing.assert_close(got["deconvnet"].images[0, 0, 0], deconv)
    torch.testing.assert_close(got["guided"].images[0, 0, 0], guided)
    torch.testing.assert_close(got["saliency"].images[0, 0, 0], saliency)


def test_methods_differ_on_a_real_net():
    net, x = make_net("reused"), images(2)
    out = [project(net, x, "conv4", top_k=3, method=m).images for m in METHODS]
    for i in range(3):
        for j in range(i + 1, 3):
            assert rel_err(out[i], out[j]) > 1e-2


# ----------------------------------------------------------------------------- other activations
class _Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


ACTIVATIONS = {
    "LeakyReLU": nn.LeakyReLU(0.1),
    "leaky_relu_inplace": _Act(lambda x: F.leaky_relu(x, 0.1, inplace=True)),
    "ReLU6": nn.ReLU6(),
    "relu6_functional": _Act(F.relu6),
    "Hardswish": nn.Hardswish(),
    "GELU": nn.GELU(),
    "gelu_functional": _Act(F.gelu),
    "SiLU": nn.SiLU(),
    "silu_inplace": _Act(lambda x: F.silu(x, inplace=True)),
    "ELU": nn.ELU(),
    "Mish": nn.Mish(),
    "PReLU": nn.PReLU(init=0.3),
}


def _act_net(act: nn.Module) -> nn.Sequential:
    net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), act, nn.Conv2d(1, 1, 3, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[2].weight.copy_(torch.tensor([[1.0, -1, 1], [1, 2, 1], [-1, 1, 1]]).view(1, 1, 3, 3))
    return net


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_rectifier_rules_for_other_activations(name):
    """Documented rules: deconvnet = max(R, 0) for every rectifier; guided = max(R, 0)·f'(x)·[x > 0]."""
    act = ACTIVATIONS[name]
    net = _act_net(act)
    x = torch.tensor([[2.0, -1.5, 0.5], [-0.3, 7.0, 1.0], [4.0, -2.0, 0.2]]).view(1, 1, 3, 3)
    w2 = net[2].weight[0, 0].detach()
    deconv = project(net, x, "2", top_k=1, method="deconvnet")
    seed = deconv.activations.item()
    assert seed > 0
    torch.testing.assert_close(deconv.images[0, 0, 0], seed * w2.clamp(min=0))
    xx = x[0, 0].clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(act(xx.clone()).sum(), xx)
    guided = project(net, x, "2", top_k=1, method="guided")
    torch.testing.assert_close(guided.images[0, 0, 0], seed * w2.clamp(min=0) * slope * (x[0, 0] > 0))
    saliency = project(net, x, "2", top_k=1, method="saliency")
    torch.testing.assert_close(saliency.images[0, 0, 0], seed * w2 * slope)


@pytest.mark.parametrize("act", [nn.Tanh(), nn.Sigmoid()])
def test_bounded_non_rectifiers_use_the_plain_gradient(act):
    net = _act_net(act)
    x = images(1, 5, 5)[:, :1]
    ref = project(net, x, "2", top_k=1, method="saliency").images
    for method in ("deconvnet", "guided"):
        torch.testing.assert_close(project(net, x, "2", top_k=1, method=method).images, ref)


# ----------------------------------------------------------------------------- resnet18
class _RefDeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0)


class _RefGuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp(min=0) * (x > 0)


class _RefReLU(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


def _reference_projections(model, x, layer, k, rule):
    """Independent reference: ReLU modules replaced, one forward + backward per unit, top-k by hand."""
    ref = copy.deepcopy(model).eval()
    for name, module in list(ref.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, _RefReLU(rule))
    target = dict(ref.named_modules())[layer]
    out = []
    for n in range(x.shape[0]):
        xn = x[n : n + 1].clone().requires_grad_(True)
        saved = []
        handle = target.register_forward_hook(lambda m, a, o: saved.append(o))
        ref(xn)
        handle.remove()
        a = saved[0][0]
        peaks = a.detach().flatten(1).amax(1)
        chans = sorted(range(a.shape[0]), key=lambda c: (-float(peaks[c]), c))[:k]
        row = []
        for c in chans:
            pos = int(a[c].flatten().argmax())
            r, col = divmod(pos, a.shape[2])
            (g,) = torch.autograd.grad(a[c, r, col] * a[c, r, col].detach(), xn, retain_graph=True)
            row.append((c, (r, col), g[0]))
        out.append(row)
    return out


@pytest.mark.parametrize("method, rule", [("deconvnet", _RefDeconvReLU), ("guided", _RefGuidedReLU)])
def test_resnet18_matches_independent_reference(method, rule):
    """torchvision resnet18: reused in-place ReLUs, residual additions, BN, overlapping max-pool, stride 2."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    x = images(2, 64, 64, seed=3)
    layer = "layer2.1.conv2"
    p = project(model, x, layer, top_k=3, method=method)
    ref = _reference_projections(model, x, layer, 3, rule)
    for n in range(2):
        for k in range(3):
            c, loc, g = ref[n][k]
            assert int(p.channels[n, k]) == c and tuple(p.locations[n, k].tolist()) == loc
            assert rel_err(p.images[n, k], g) <= 1e-4


def test_reused_module_call_index():
    """``name#k`` projects from the k-th call of a reused module (ResNet's ``relu``)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    x = images(1, 32, 32)
    first = project(model, x, "layer1.0.relu#0", top_k=2)
    second = project(model, x, "layer1.0.relu#1", top_k=2)
    assert first.layer == "layer1.0.relu#0"
    assert not torch.allclose(first.activations, second.activations)
    with pytest.raises(ValueError, match=r"'layer1.0.relu#2' was not reached: the forward pass called 'layer1.0.relu' 2"):
        project(model, x, "layer1.0.relu#2")


# ----------------------------------------------------------------------------- batching
def test_automatic_row_chunking(monkeypatch):
    import lightning_vis.deconv as deconv

    net, x = make_net("reused"), images(3)
    ref = project(net, x, "conv4", top_k=5)
    monkeypatch.setattr(deconv, "_ROW_BUDGET", 1)  # one row per backward
    torch.testing.assert_close(project(net, x, "conv4", top_k=5).images, ref.images, rtol=1e-5, atol=1e-7)


def test_batched_equals_single_projections():
    net, x = make_net("reused"), images(3)
    p = project(net, x, "conv4", top_k=4)
    for n in range(3):
        for k in range(4):
            single = project(net, x[n : n + 1], "conv4", channels=[int(p.channels[n, k])])
            assert single.locations[0, 0].tolist() == p.locations[n, k].tolist()
            torch.testing.assert_close(single.images[0, 0], p.images[n, k], rtol=1e-5, atol=1e-6)
    chunked = project(net, x, "conv4", top_k=4, max_rows=1)
    torch.testing.assert_close(chunked.images, p.images, rtol=1e-5, atol=1e-6)


def test_projection_does_not_depend_on_batch_mates():
    net, x = make_net("module"), images(3)
    alone = project(net, x[:1], "conv4", top_k=3)
    others = torch.cat([x[:1], images(4, seed=9)])
    mixed = project(net, others, "conv4", top_k=3)
    assert torch.equal(mixed.channels[0], alone.channels[0])
    torch.testing.assert_close(mixed.images[0], alone.images[0], rtol=1e-5, atol=1e-6)


def test_channels_argument():
    net, x = make_net(), images(2)
    p = project(net, x, "conv4", channels=[7, 2])
    assert p.channels.tolist() == [[7, 2], [7, 2]]
    q = project(net, x, "conv4", channels=torch.tensor([[1], [5]]))
    assert q.channels.tolist() == [[1], [5]] and q.images.shape == (2, 1, 3, 15, 17)


# ----------------------------------------------------------------------------- geometry
def test_geometry_stride2_conv_receptive_field_and_no_bias():
    """A stride-2 conv unit projects to exactly its (seeded) weights on its 3×3 window; the bias never enters."""
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.bias.fill_(5.0)
    net = nn.Sequential(conv)
    x = images(1, 9, 10)[:, :2]
    p = project(net, x, "0", top_k=3)
    for k in range(3):
        c, (r, col), s = int(p.channels[0, k]), p.locations[0, k].tolist(), p.activations[0, k]
        expected = torch.zeros(2, 11, 12)  # padded input frame
        expected[:, 2 * r : 2 * r + 3, 2 * col : 2 * col + 3] = s * conv.weight[c].detach()
        torch.testing.assert_close(p.images[0, k], expected[:, 1:10, 1:11])


def test_geometry_overlapping_ceil_mode_pool_and_odd_sizes():
    """Overlapping 3×3/2 ceil-mode max-pool + stride-2 conv on odd sizes: shapes right, support inside the field."""
    net, x = make_net("module"), images(2, 13, 11)
    p = project(net, x, "conv2", top_k=4)
    assert p.images.shape == (2, 4, 3, 13, 11)
    boxes = support_boxes(p.images)
    for n in range(2):
        for k in range(4):
            r, c = p.locations[n, k].tolist()
            # conv2 unit (r, c) sees pool rows 2r-1..2r+1, i.e. input rows 4r-2-1 .. 4r+2+2+1 (3×3 conv1, pad 1)
            top, left, bottom, right = boxes[n, k].tolist()
            assert top >= max(0, 4 * r - 3) and bottom <= min(13, 4 * r + 6)
            assert left >= max(0, 4 * c - 3) and right <= min(11, 4 * c + 6)
            assert bottom > top and right > left


def test_ties_and_all_zero_maps_are_deterministic_without_nan():
    net = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.ReLU(), nn.Conv2d(6, 5, 3, bias=False))
    with torch.no_grad():
        net[2].weight.zero_()
    x = images(2, 8, 8)
    for method in METHODS:
        p = project(net, x, "2", top_k=5, method=method)
        assert p.channels.tolist() == [[0, 1, 2, 3, 4]] * 2  # ties: lower channel first
        assert p.locations.tolist() == [[[0, 0]] * 5] * 2  # ties: first position
        assert torch.equal(p.activations, torch.zeros(2, 5))
        assert torch.isfinite(p.images).all() and not p.images.any()
    img = projection_panel(x, p, cell_px=16)
    assert img.dtype == torch.uint8
    # identical channels tie too: duplicated filters come out in channel order
    with torch.no_grad():
        net[2].weight.normal_()
        net[2].weight[3] = net[2].weight[1]
    p = project(net, x, "2", top_k=5)
    order = p.channels[0].tolist()
    assert order.index(1) < order.index(3) and order.index(1) + 1 == order.index(3)
    assert torch.equal(project(net, x, "2", top_k=5).images, p.images)


# ----------------------------------------------------------------------------- isolation
def test_state_is_restored_exactly():
    net = make_net("reused").train()
    net.bn.momentum = 0.9
    net.conv1.weight.grad = torch.ones_like(net.conv1.weight)
    net.conv4.weight.requires_grad_(False)
    net.conv3.eval()  # a mixed-mode model stays mixed
    training = {name: m.training for name, m in net.named_modules()}
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    x = images(2).requires_grad_(True)
    x.grad = torch.full_like(x, 3.0)
    x_before = x.detach().clone()
    state = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    p = project(net, x, "conv4", top_k=2, method="guided")
    assert {name: m.training for name, m in net.named_modules()} == training
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k]), k
    assert torch.equal(net.conv1.weight.grad, torch.ones_like(net.conv1.weight))
    assert all(p.grad is None for n, p in net.named_parameters() if n != "conv1.weight")
    assert not net.conv4.weight.requires_grad and net.conv1.weight.requires_grad
    assert torch.equal(x.grad, torch.full_like(x, 3.0)) and torch.equal(x.detach(), x_before)
    assert torch.equal(torch.get_rng_state(), state[0])
    assert np.array_equal(np.random.get_state()[1], state[1]) and random.getstate() == state[2]
    assert not p.images.requires_grad


class _Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_hooks_and_modes_removed_after_success_and_error():
    net = make_net("functional")
    before = hook_count(net)
    project(net, images(1), "conv4", top_k=2)
    assert hook_count(net) == before == 0
    assert torch._C._len_torch_function_stack() == 0
    net.bn = nn.Sequential(net.bn, _Boom())
    net.train()
    with pytest.raises(ValueError, match="boom"):
        project(net, images(1), "conv4")
    assert hook_count(net) == 0 and torch._C._len_torch_function_stack() == 0
    assert all(m.training for m in net.modules())
    net = make_net("functional")
    with pytest.raises(ValueError, match="was not reached"):
        project(net, images(1), "conv1#3")
    assert hook_count(net) == 0 and torch._C._len_torch_function_stack() == 0


def test_works_inside_inference_mode_and_autocast():
    net, x = make_net("functional"), images(2)
    ref = project(net, x, "conv4", top_k=3)
    with torch.inference_mode():
        xi = x.clone()
        got = project(net, xi, "conv4", top_k=3)
    torch.testing.assert_close(got.images, ref.images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = project(net, x, "conv4", top_k=3)
    assert got.images.dtype == torch.float32
    torch.testing.assert_close(got.images, ref.images)


def test_channels_last():
    net, x = make_net("reused"), images(2)
    ref = project(net, x, "conv4", top_k=3)
    net = net.to(memory_format=torch.channels_last)
    got = project(net, x.to(memory_format=torch.channels_last), "conv4", top_k=3)
    assert torch.equal(got.channels, ref.channels)
    torch.testing.assert_close(got.images, ref.images, rtol=1e-5, atol=1e-7)


def test_wrapped_models_are_unwrapped():
    net, x = make_net(), images(1)
    for wrapped in (nn.DataParallel(net), torch.compile(net)):
        # the reference after wrapping: with one GPU present, DataParallel moves the net to cuda:0
        ref = project(net, x, "conv4", top_k=2)
        torch.testing.assert_close(project(wrapped, x, "conv4", top_k=2).images, ref.images)


def test_memory_flat_over_200_calls():
    """No hooks, graphs, tensors or other objects pile up (pytorch-grad-cam #132/#483, torch-cam #390)."""
    net, x = make_net("reused"), images(1, 8, 8)

    def live() -> tuple[int, int]:
        gc.collect()
        objects = gc.get_objects()
        return len(objects), sum(1 for o in objects if issubclass(type(o), torch.Tensor))

    for _ in range(10):
        project(net, x, "conv4", top_k=2)
    objects, tensors = live()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(10):
            project(net, x, "conv4", top_k=2)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 32 * 1024, grown
    for _ in range(190):
        project(net, x, "conv4", top_k=2)
    after_objects, after_tensors = live()
    assert after_tensors == tensors
    assert after_objects - objects < 50, after_objects - objects
    assert hook_count(net) == 0


# ----------------------------------------------------------------------------- errors
def test_bad_input_errors():
    net, x = make_net(), images(1)
    with pytest.raises(ValueError, match=r"method='deconv'.*'deconvnet', 'guided', 'saliency'"):
        project(net, x, "conv4", method="deconv")
    with pytest.raises(ValueError, match=r"No module 'conv9' in Net; convolutions are: 'conv1', 'conv2', 'conv3', 'conv4'"):
        project(net, x, "conv9")
    with pytest.raises(ValueError, match=r"top_k=0\. Must be an int >= 1"):
        project(net, x, "conv4", top_k=0)
    with pytest.raises(ValueError, match=r"top_k=11\. Layer 'conv4' has 10 channels"):
        project(net, x, "conv4", top_k=11)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\].*\(3, 15, 17\)"):
        project(net, x[0], "conv4")
    with pytest.raises(TypeError, match="float tensor"):
        project(net, x.long(), "conv4")
    with pytest.raises(ValueError, match=r"forward pass of Net on images of shape \(1, 4, 15, 17\) failed"):
        project(net, torch.randn(1, 4, 15, 17), "conv4")
    with pytest.raises(ValueError, match=r"channels \[10\] out of range: the layer has 10 channels"):
        project(net, x, "conv4", channels=[3, 10])
    with pytest.raises(ValueError, match=r"max_rows=0"):
        project(net, x, "conv4", max_rows=0)
    with pytest.raises(ValueError, match=r"must output a tensor \[N, C, H, W\] or \[N, C\], got \(1, 10, 13, 15, 1\)"):
        project(nn.Sequential(nn.Conv2d(3, 10, 3), _Act(lambda t: t[..., None])), x, "1")


# ----------------------------------------------------------------------------- rendering
def test_projection_panel_shape_and_mid_grey_zero():
    net, x = make_net(), images(2, 16, 16)
    p = project(net, x, "conv4", top_k=3)
    img = projection_panel(x, p, cell_px=20, gap=3)
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
    assert img.shape[1] >= 2 * 20 and img.shape[2] >= 20 + 2 * 20  # per image a block: image + >= 1 pair per line
    zero = Projection(torch.zeros_like(p.images), p.channels, p.locations, torch.zeros(2, 3), "conv4", "deconvnet", "")
    flat = projection_panel(x, zero, cell_px=20, gap=3, labels=False)
    g = _panel_geometry(2, 3, 16, 16, cell_px=20, width_px=CARD_WIDTH_PX, gap=3, labels=False, font_px=None)
    assert flat.shape[1:] == (g["height"], g["width"])
    for i in range(2):  # every projection cell (block i, unit j) is flat mid-grey
        for j in range(3):
            line, col = divmod(j, g["per_row"])
            y = 3 + i * (g["block_h"] + g["sep"]) + line * (g["slot_h"] + 3) + g["frame"]
            x0 = 3 + g["img_w"] + 2 * 3 + col * (g["pair_w"] + 3) + g["frame"]
            assert (flat[:, y : y + 20, x0 : x0 + 20] == 128).all()
    with pytest.raises(ValueError, match="do not match"):
        projection_panel(x[:1], p)


def test_support_boxes_find_the_field():
    p = torch.zeros(2, 3, 10, 10)
    p[0, 1, 2:5, 3:9] = torch.randn(3, 6).abs() + 0.1
    assert support_boxes(p).tolist() == [[2, 3, 5, 9], [-1, -1, -1, -1]]
