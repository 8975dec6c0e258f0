"""Receptive fields, top activations, feature maps: pure functions against hand-computed
answers, the literature, gradient support and brute-force oracles."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_vis import receptive_field, top_activations
from lightning_vis.units import (
    EMPTY_INDEX,
    ReceptiveField,
    TopActivationCollector,
    crop_patches,
    merge_top_activations,
    top_feature_maps,
)


# ============================================================================ receptive fields: hand-built
def rf(net, layer, shape=(1, 17, 17)):
    r = receptive_field(net, layer, shape)
    return r.size, r.stride, r.offset


@pytest.mark.filterwarnings("ignore:Using padding=.same")
def test_single_conv_padding_stride_dilation():
    assert rf(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1)), "0") == ((3, 3), (1, 1), (-1, -1))
    assert rf(nn.Sequential(nn.Conv2d(1, 1, (5, 3), stride=(2, 1), padding=(2, 0))), "0") == ((5, 3), (2, 1), (-2, 0))
    # k3 s2 p1, then k3 d2 p2: size 3 + 2*2*2 = 11, stride 2, offset -1 - 2*2 = -5
    net = nn.Sequential(nn.Conv2d(1, 1, 3, 2, 1), nn.Conv2d(1, 1, 3, padding=2, dilation=2))
    assert rf(net, "1") == ((11, 11), (2, 2), (-5, -5))
    same = nn.Sequential(nn.Conv2d(1, 1, 4, padding="same"))  # PyTorch pads 1 left, 2 right
    assert rf(same, "0") == ((4, 4), (1, 1), (-1, -1))


def test_overlapping_and_ceil_mode_pooling():
    # conv k3 p1 (size 3, offset -1), then maxpool 3x3 s2 p1 ceil_mode on an odd map
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
                        nn.AvgPool2d(2, ceil_mode=True))  # fmt: skip
    r = receptive_field(net, "1", (1, 17, 17))
    assert (r.size, r.stride, r.offset, r.output_size) == ((5, 5), (2, 2), (-2, -2), (9, 9))
    r = receptive_field(net, "2", (1, 17, 17))
    assert (r.size, r.stride, r.offset, r.output_size) == ((7, 7), (4, 4), (-2, -2), (5, 5))
    assert r.box(4, 4) == (14, 14, 21, 21)  # the ceil-mode window reaches past the 17-px image
    dilated = nn.Sequential(nn.MaxPool2d(3, stride=1, dilation=2))
    assert rf(dilated, "0") == ((5, 5), (1, 1), (0, 0))


class Functional(nn.Module):
    """Every step functional, inside forward: conv2d, relu, max_pool2d, pad, slicing."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2, 1, 3, 3))
        self.out = nn.Identity()

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w, stride=1, padding=1))  # size 3, offset -1
        y = F.max_pool2d(y, 2)  # size 4, stride 2, offset -1
        y = F.pad(y, (1, 0, 2, 0))  # 1 column left, 2 rows top: offset shifts by pad * stride
        y = y[:, :, 1:, :]  # drop one row: offset + 1 * stride
        return self.out(y)


def test_functional_pad_and_slicing():
    assert rf(Functional(), "out", (1, 16, 16)) == ((4, 4), (2, 2), (-1 - 4 + 2, -1 - 2))


class Residual(nn.Module):
    """y = conv_b(pad_topleft(x)) + x, and a concatenating path."""

    def __init__(self, cat=False):
        super().__init__()
        self.cat = cat
        self.conv_b = nn.Conv2d(1, 1, 3)
        self.conv_c = nn.Conv2d(1, 1, 5, padding=2)
        self.out = nn.Identity()

    def forward(self, x):
        branch = self.conv_b(F.pad(x, (2, 0, 2, 0)))  # field rows -2..0 for unit 0: up and left
        if self.cat:
            return self.out(torch.cat([branch, self.conv_c(x)], dim=1))  # fields -2..2
        out = branch.clone()
        out += x  # in place, like torchvision's BasicBlock
        return self.out(out.relu_())


def test_residual_and_concatenation_take_the_union():
    assert rf(Residual(), "out") == ((3, 3), (1, 1), (-2, -2))  # union of [-2, 1) and [0, 1)
    assert rf(Residual(cat=True), "out") == ((5, 5), (1, 1), (-2, -2))  # union of [-2, 1) and [-2, 3)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, 4, 1)
        self.out = nn.Identity()

    def forward(self, x):
        y = self.conv(x)
        gate = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        return self.out(y * gate)


def test_broadcast_global_gate_sees_the_whole_image():
    r = receptive_field(SqueezeExcite(), "out", (1, 10, 12))
    assert r.stride == (0, 0) and r.offset == (-1, -1) and r.size == (12, 14)
    assert r.box(3, 5) == r.box(0, 0) == (-1, -1, 11, 13)


def test_literature_vgg16_and_resnet18():
    # Araujo et al. (Distill 2019), table: VGG 16 pool5 r = 212, S = 32, effective padding 90
    vgg16 = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    assert rf(vgg16, "30", (3, 64, 64)) == ((212, 212), (32, 32), (-90, -90))
    assert rf(vgg16, "29", (3, 64, 64)) == ((196, 196), (16, 16), (-90, -90))  # conv5_3 + ReLU
    resnet = torchvision.models.resnet18(weights=None)
    assert rf(resnet, "layer4", (3, 64, 64)) == ((435, 435), (32, 32), (-217, -217))


def test_errors():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Upsample(scale_factor=2, mode="bilinear"), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no fixed receptive field.*interpolate maps a spatial size 6 to 12"):
        receptive_field(net, "1", (1, 8, 8))
    with pytest.raises(ValueError, match="must output a feature map"):
        receptive_field(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), "1", (1, 8, 8))
    with pytest.raises(ValueError, match="No module 'nope'.*convolutions are: '0'"):
        receptive_field(net, "nope", (1, 8, 8))
    with pytest.raises(ValueError, match="input_shape must be"):
        receptive_field(net, "0", (8, 8))
    unequal = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(4))
    with pytest.raises(ValueError, match="adaptive_avg_pool2d from 7 to 4"):
        receptive_field(unequal, "1", (1, 9, 9))
    assert rf(unequal, "1", (1, 10, 10)) == ((4, 4), (2, 2), (0, 0))  # 8 -> 4: equal bins of 2


def test_receptive_field_leaves_the_model_alone():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.5)).train()
    before = copy.deepcopy(net.state_dict())
    state = torch.get_rng_state()
    with torch.inference_mode():
        receptive_field(net, "2", (1, 8, 8))
    assert net.training and torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


# ============================================================================ receptive fields: gradient support
def positive_copy(model: nn.Module) -> nn.Module:
    """Same geometry, every path positive (so a unit's input gradient is nonzero on its whole
    field): max-pools become avg-pools with the same window, convolutions average their input,
    BatchNorm is the identity; float64."""
    m = copy.deepcopy(model).double().eval()
    for mod in list(m.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(mod, cname, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.fill_(1.0 / mod.weight[0].numel())
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.fill_(1), mod.bias.zero_(), mod.running_mean.zero_(), mod.running_var.fill_(1)
    return m


def gradient_supports(model: nn.Module, layers: list[str], shape, units: dict) -> dict:
    """Per layer, the bounding box (clipped to the image) of the nonzero input gradient of each of
    its units (summed over channels): one forward of the positive copy, one backward per layer."""
    m = positive_copy(model)
    modules = dict(m.named_modules())
    seen, handles = {}, []
    for layer in layers:
        handles.append(modules[layer].register_forward_hook(lambda mod, a, o, name=layer: seen.setdefault(name, o)))
    x = torch.ones(max(len(u) for u in units.values()), *shape, dtype=torch.float64, requires_grad=True)
    try:
        m(x)
    finally:
        for h in handles:
            h.remove()
    boxes = {}
    for layer in layers:
        out = seen[layer]
        score = sum(out[n, :, i, j].sum() for n, (i, j) in enumerate(units[layer]))
        (grad,) = torch.autograd.grad(score, x, retain_graph=True)
        boxes[layer] = []
        for n in range(len(units[layer])):
            nz = (grad[n].abs().sum(0) > 0).nonzero()
            boxes[layer].append((int(nz[:, 0].min()), int(nz[:, 1].min()), int(nz[:, 0].max()) + 1, int(nz[:, 1].max()) + 1))
    return boxes


def _vgg11():
    """torchvision's VGG-11 feature extractor (cfg "A"), without the 100M-parameter head."""
    return nn.Sequential(OrderedDict(features=torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"])))


@pytest.mark.parametrize(
    "make, layers",
    [
        (lambda: torchvision.models.resnet18(weights=None),
         ["maxpool", "layer1.0.conv1", "layer1", "layer2.0", "layer2.1.conv2", "layer3", "layer4"]),
        (_vgg11, ["features.2", "features.7", "features.15", "features.20"]),
        (lambda: torchvision.models.densenet121(weights=None),
         ["features.pool0", "features.denseblock1", "features.transition1", "features.denseblock2.denselayer3",
          "features.denseblock3"]),
    ],
    ids=["resnet18", "vgg11", "densenet121"],
)  # fmt: skip
def test_against_gradient_support(make, layers):
    torch.manual_seed(0)
    model = make().eval()
    shape = (3, 54, 50)  # non-square, odd after some strides: ceil/floor matter
    fields, units, expected = {}, {}, {}
    for layer in layers:
        field = fields[layer] = receptive_field(model, layer, shape)
        oh, ow = field.output_size
        units[layer] = [(0, 0), (oh - 1, ow - 1), (oh // 2, ow // 2), (0, ow - 1), (oh - 1, 0)]
        expected[layer] = []
        for i, j in units[layer]:
            t, left, b, r = field.box(i, j)
            expected[layer].append((max(t, 0), max(left, 0), min(b, shape[1]), min(r, shape[2])))
    assert gradient_supports(model, layers, shape, units) == expected


# ============================================================================ patches
def test_crop_patches_pads_outside_and_shrinks():
    img = torch.arange(2 * 25.0).view(2, 1, 5, 5)
    field = ReceptiveField(size=(3, 4), stride=(2, 2), offset=(-1, -2))
    got = crop_patches(img, torch.tensor([1, 0]), torch.tensor([[0, 0], [2, 2]]), field, fill=-1.0)
    padded = F.pad(img, (2, 4, 1, 4), value=-1.0)  # independent: pad, then slice
    assert torch.equal(got[0], padded[1, :, 0:3, 0:4])
    assert torch.equal(got[1], padded[0, :, 4:7, 4:8])
    still = ReceptiveField(size=(3, 4), stride=(0, 0), offset=(-1, -2))  # a fixed field (after a global gate)
    got = crop_patches(img, torch.tensor([1, 0]), torch.tensor([[0, 0], [2, 2]]), still, fill=-1.0)
    assert torch.equal(got[0], padded[1, :, 0:3, 0:4]) and torch.equal(got[1], padded[0, :, 0:3, 0:4])
    small = crop_patches(img, torch.tensor([0]), torch.tensor([[1, 1]]), ReceptiveField((4, 4), (1, 1), (0, 0)), max_patch=2)
    assert torch.allclose(small[0], F.avg_pool2d(img[0:1, :, 1:5, 1:5], 2)[0])


# ============================================================================ top activations
def brute_force(net, images, layer, top_k, field, channels=None):
    """Everything at once, Python sorting: per channel the top_k (value desc, index asc)."""
    with torch.no_grad():
        acts = {}
        h = dict(net.named_modules())[layer].register_forward_hook(lambda m, a, o: acts.setdefault("a", o))
        net.eval()(images)
        h.remove()
    act = acts["a"]
    chans = range(act.shape[1]) if channels is None else channels
    pad = max(field.size) + abs(min(field.offset)) + 8
    padded = F.pad(images, (pad,) * 4)
    out = []
    for c in chans:
        entries = []
        for n in range(images.shape[0]):
            flat = act[n, c].flatten().tolist()
            best = max(flat)
            pos = flat.index(best)  # first maximum
            entries.append((-best, n, pos))
        entries.sort()
        rows = []
        for neg, n, pos in entries[:top_k]:
            i, j = divmod(pos, act.shape[3])
            t, left, b, r = field.box(i, j)
            rows.append((-neg, n, (i, j), padded[n, :, t + pad : b + pad, left + pad : r + pad]))
        out.append(rows)
    return out


def tie_net():
    """Integer weights (exact in float32 whatever the batch size, many ties), an all-zero
    channel (2) and a negative one (3)."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, stride=2))
    with torch.no_grad():
        for conv in (net[0], net[3]):
            conv.weight.copy_(torch.randint(-1, 2, conv.weight.shape))
            conv.bias.copy_(torch.randint(-1, 2, conv.bias.shape))
        net[3].weight[2] = 0.0
        net[3].bias[2] = 0.0
        net[3].weight[3] = -net[3].weight[3].abs()
        net[3].bias[3] = -1.0
    return net


@pytest.mark.parametrize("batch_size", [1, 5, 40])
def test_top_activations_equal_brute_force(batch_size):
    torch.manual_seed(0)
    net = tie_net()
    images = torch.randint(0, 3, (23, 2, 15, 13)).float()  # integers: ties everywhere
    batches = [images[i : i + batch_size] for i in range(0, 23, batch_size)]
    res = top_activations(net, batches, "3", top_k=6)
    field = receptive_field(net, "3", (2, 15, 13))
    assert res.field == field and res.count == 23
    oracle = brute_force(net, images, "3", 6, field)
    for c, rows in enumerate(oracle):
        assert res.values[c].tolist() == pytest.approx([r[0] for r in rows], abs=0)
        assert res.image_index[c].tolist() == [r[1] for r in rows]
        assert [tuple(loc) for loc in res.locations[c].tolist()] == [r[2] for r in rows]
        for k, r in enumerate(rows):
            assert torch.equal(res.patches[c, k], r[3])
    assert res.values[2].eq(0).all() and res.image_index[2].tolist() == list(range(6))  # all-zero: first images


def test_channels_top_k_larger_than_data_and_dataloader_batches():
    torch.manual_seed(1)
    net = tie_net()
    images = torch.randn(4, 2, 12, 12)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(4)), batch_size=3)
    res = top_activations(net, loader, "1", channels=[3, 0], top_k=9)
    assert res.values.shape == (2, 4) and res.channels.tolist() == [3, 0]
    oracle = brute_force(net, images, "1", 9, receptive_field(net, "1", (2, 12, 12)), channels=[3, 0])
    assert res.image_index.tolist() == [[r[1] for r in rows] for rows in oracle]
    assert res.inside().shape == (2, 4, 3, 3)


def test_max_patch_bounds_memory():
    net = nn.Sequential(*[nn.Conv2d(1, 1, 5, padding=2) for _ in range(6)])  # field 25
    res = top_activations(net, [torch.randn(3, 1, 20, 20)], "5", top_k=2, max_patch=10)
    assert res.field.size == (25, 25) and res.patches.shape == (1, 2, 1, 10, 10)


def test_merge_of_shards_equals_whole():
    torch.manual_seed(2)
    net = tie_net()
    images = torch.randint(0, 3, (17, 2, 15, 13)).float()
    whole = top_activations(net, [images], "3", top_k=5)
    field = whole.field
    parts = []
    for rows in (torch.arange(0, 17, 2), torch.arange(1, 17, 2)):  # interleaved, as DDP ranks
        collector = TopActivationCollector(4, 5, field)
        with torch.no_grad():
            acts = {}
            h = net[3].register_forward_hook(lambda m, a, o: acts.setdefault("a", o))
            net(images[rows])
            h.remove()
        collector.update(acts["a"][:4], images[rows][:4], rows[:4])
        collector.update(acts["a"][4:], images[rows][4:], rows[4:])
        parts.append(collector.result(trim=False))
    merged = merge_top_activations(parts)
    for name in ("values", "image_index", "locations", "patches"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    assert merged.count == 17


def test_collector_memory_is_fixed():
    field = ReceptiveField((3, 3), (1, 1), (-1, -1), output_size=(8, 8))
    collector = TopActivationCollector(4, 3, field)
    shapes = None
    for step in range(20):
        collector.update(torch.randn(6, 4, 8, 8), torch.randn(6, 1, 8, 8))
        now = [t.shape for t in (collector._values, collector._index, collector._where, collector._slot, collector._patches)]
        assert shapes in (None, now)
        shapes = now
    assert collector.count == 120 and (collector.result().image_index != EMPTY_INDEX).all()


def test_top_activations_errors_and_isolation():
    net = tie_net().train()
    with pytest.raises(ValueError, match="top_k=0"):
        top_activations(net, [torch.randn(2, 2, 8, 8)], "3", top_k=0)
    with pytest.raises(ValueError, match=r"channels \[7\] out of range"):
        top_activations(net, [torch.randn(2, 2, 8, 8)], "3", channels=[7])
    with pytest.raises(ValueError, match="no batches"):
        top_activations(net, [], "3")
    with pytest.raises(ValueError, match="all images must have the size"):
        top_activations(net, [torch.randn(2, 2, 8, 8), torch.randn(2, 2, 9, 9)], "3")
    with pytest.raises(TypeError, match="image tensor"):
        top_activations(net, [("a", "b")], "3")
    with torch.inference_mode():
        top_activations(net, [torch.randn(2, 2, 8, 8)], "3")
    assert net.training and not any(m._forward_hooks for m in net.modules())


# ============================================================================ feature maps
def test_top_feature_maps_against_oracle_with_ties():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU())
    with torch.no_grad():
        net[0].bias[[1, 4]] = 5.0  # equal, large constant means on two channels (a tie: 1 before 4)
        net[0].weight[[1, 4]] = 0.0
    images = torch.randn(3, 3, 9, 9)
    fm = top_feature_maps(net, images, "1", top_n=4)
    act = net(images).detach()
    for n in range(3):
        means = act[n].mean((1, 2)).tolist()
        order = sorted(range(6), key=lambda c: (-means[c], c))[:4]
        assert fm.channels[n].tolist() == order and order[:2] == [1, 4]
        assert torch.allclose(fm.maps[n], act[n, order])
        assert fm.means[n].tolist() == pytest.approx([means[c] for c in order])
    with pytest.raises(ValueError, match="top_n=7.*6 channels"):
        top_feature_maps(net, images, "1", top_n=7)
