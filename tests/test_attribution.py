"""``lightning_vis.attribute``: CAM, Grad-CAM, Grad-CAM++, Score-CAM, saliency, guided, occlusion.

Oracles: Captum (``LayerGradCam``, ``Occlusion``, ``Saliency``, ``GuidedBackprop``,
``GuidedGradCam``), pytorch-grad-cam (``pip install grad-cam``: ``GradCAMPlusPlus``,
``ScoreCAM``), brute-force loops, hand-computed numbers. Where an oracle's definition
differs from the paper, the difference itself is tested.
"""

from __future__ import annotations

import gc
import re
import tracemalloc

import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop, GuidedGradCam, LayerAttribution, LayerGradCam, Occlusion, Saliency
from torch import nn

from lightning_vis import Attribution, attribute
from lightning_vis.attribution import CAM_METHODS, METHODS, default_cam_layer, gradcam_plus_plus_weights

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
ALL = list(METHODS)


# ----------------------------------------------------------------------------- models
def plain_net(classes: int = 5, scale: float = 1.0, seed: int = 0) -> nn.Sequential:
    """conv, ReLU, pool, conv, ReLU, conv, ReLU, GAP, Linear (nn.ReLU modules, as Captum needs)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )  # fmt: skip
    with torch.no_grad():
        net[9].weight.mul_(scale)
    return net.eval()


class FormsNet(nn.Module):
    """The same parameters as :func:`plain_net`, rectifiers called in another form."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        src = plain_net()
        self.conv1, self.pool, self.conv2, self.conv3, self.fc = src[0], src[2], src[3], src[5], src[9]
        self.relu = nn.ReLU(inplace=True)

    def act(self, x, i):
        if self.form == "reused":
            return self.relu(x)
        if self.form == "functional":
            return [lambda t: F.relu(t, inplace=True), torch.relu, lambda t: t.relu_()][i](x)
        return [lambda t: t.relu(), F.relu, lambda t: torch.relu_(t)][i](x)

    def forward(self, x):
        x = self.pool(self.act(self.conv1(x), 0))
        x = self.act(self.conv3(self.act(self.conv2(x), 1)), 2)
        return self.fc(x.mean((2, 3)))


def images(n: int = 4, h: int = 16, w: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


TARGETS = torch.tensor([0, 1, 2, 3])


def minmax(m: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's per-image normalisation (``scale_cam_image``)."""
    m = m - m.amin((1, 2), keepdim=True)
    return m / (m.amax((1, 2), keepdim=True) + 1e-7)


def hook_count(net: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in net.modules()
    )


def pgc(cls, net, layer, x, targets):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with cls(net, [layer]) as cam:
        return torch.from_numpy(cam(x, [ClassifierOutputTarget(int(t)) for t in targets]))


# ----------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("layer", ["3", "5", "6"])
def test_gradcam_equals_captum_layergradcam_with_relu_and_bilinear(layer):
    net, x = plain_net(), images()
    got = attribute(net, x, targets=TARGETS, method="gradcam", layer=layer)
    lgc = LayerGradCam(net, net[int(layer)]).attribute(x, target=TARGETS, relu_attributions=True)
    ref = LayerAttribution.interpolate(lgc, (16, 20), "bilinear")[:, 0]
    assert got.maps.shape == (4, 16, 20)  # non-square: H and W are not swapped
    torch.testing.assert_close(got.maps, ref, rtol=1e-5, atol=1e-9)
    assert got.layer == layer and got.method == "gradcam" and torch.equal(got.targets, TARGETS)


def test_captum_layergradcam_default_omits_the_papers_relu():
    """Captum's default relu_attributions=False keeps negative evidence; ours rectifies (Selvaraju et al.)."""
    net, x = plain_net(), images()
    got = attribute(net, x, targets=TARGETS, method="gradcam", layer="3")
    default = LayerGradCam(net, net[3]).attribute(x, target=TARGETS)  # relu_attributions=False
    assert (default < 0).any()
    assert (got.maps >= 0).all()
    ref = LayerAttribution.interpolate(default.clamp(min=0), (16, 20), "bilinear")[:, 0]
    torch.testing.assert_close(got.maps, ref, rtol=1e-5, atol=1e-9)  # ReLU at the layer, then upsample
    assert not torch.allclose(got.maps, LayerAttribution.interpolate(default, (16, 20), "bilinear")[:, 0])


def test_gradcam_plus_plus_weights_hand_computed():
    # one channel, 2×2 map: ΣA = 4; α = g²/(2g² + 4g³)
    g = torch.tensor([[[[1.0, -1.0], [0.0, 2.0]]]])
    a = torch.tensor([[[[1.0, 0.0], [2.0, 1.0]]]])
    # (1,1): α = 1/6, ReLU(g)=1 → 1/6 ; (1,-1): ReLU(g)=0 ; g=0: α=0 ; g=2: α = 4/(8+32) = 0.1 → 0.2
    torch.testing.assert_close(gradcam_plus_plus_weights(g, a), torch.tensor([[1 / 6 + 0.2]]))
    # all-zero gradient: α = 0 (no 0/0), weight 0
    assert gradcam_plus_plus_weights(torch.zeros(1, 1, 2, 2), a).tolist() == [[0.0]]
    # denominator 0 with g != 0 (ΣA·g = -2): α = 0, not inf
    w = gradcam_plus_plus_weights(torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[-1.0, -1.0]]]]))
    assert w.tolist() == [[0.0]]
    # two channels, two images: each weight on its own (torch-cam's denominator bug would mix these)
    g2 = torch.tensor([[[[0.5]], [[1.0]]], [[[2.0]], [[-3.0]]]])
    a2 = torch.tensor([[[[2.0]], [[3.0]]], [[[1.0]], [[1.0]]]])
    expected = [[0.25 / (0.5 + 2 * 0.125) * 0.5, 1 / (2 + 3) * 1.0], [4 / (8 + 8) * 2.0, 0.0]]
    torch.testing.assert_close(gradcam_plus_plus_weights(g2, a2), torch.tensor(expected))


def test_gradcam_plus_plus_end_to_end_against_separately_computed_gradients():
    net, x = plain_net(), images()
    got = attribute(net, x, targets=TARGETS, method="gradcam++", layer="3")
    head = net[4:]
    a = net[:4](x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(head(a).gather(1, TARGETS[:, None]).sum(), a)
    g2, g3 = g**2, g**3
    alpha = g2 / (2 * g2 + a.detach().sum((2, 3), keepdim=True) * g3)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    w = (alpha * g.clamp(min=0)).sum((2, 3))
    cam = (w[:, :, None, None] * a.detach()).sum(1).clamp(min=0)
    ref = F.interpolate(cam[:, None], (16, 20), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(got.maps, ref, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("layer", ["3", "5"])
def test_gradcam_plus_plus_equals_pytorch_grad_cam(layer):
    from pytorch_grad_cam import GradCAMPlusPlus

    net, x = plain_net(scale=1000.0), images()  # large gradients: the oracle's eps=1e-6 is negligible
    got = attribute(net, x, targets=TARGETS, method="gradcam++", layer=layer)
    ref = pgc(GradCAMPlusPlus, net, net[int(layer)], x, TARGETS)
    torch.testing.assert_close(minmax(got.maps), ref, rtol=0, atol=2e-4)


def test_pytorch_grad_cam_gradcam_plus_plus_epsilon_differs_from_eq19():
    """pytorch-grad-cam adds 1e-6 to eq. 19's denominator: with small gradients it dominates α."""
    from pytorch_grad_cam import GradCAMPlusPlus

    net, x = plain_net(), images()  # gradients ~1e-3: g² is comparable to the epsilon
    got = attribute(net, x, targets=TARGETS, method="gradcam++", layer="3")
    ref = pgc(GradCAMPlusPlus, net, net[3], x, TARGETS)
    assert (minmax(got.maps) - ref).abs().max() > 0.05
    # the oracle is eq. 19 with +1e-6 in the denominator
    a = net[:4](x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(net[4:](a).gather(1, TARGETS[:, None]).sum(), a)
    alpha = g**2 / (2 * g**2 + a.detach().sum((2, 3), keepdim=True) * g**3 + 1e-6)
    w = (torch.where(g != 0, alpha, 0.0) * g.clamp(min=0)).sum((2, 3))
    cam = (w[:, :, None, None] * a.detach()).sum(1).clamp(min=0)
    eps_version = F.interpolate(cam[:, None], (16, 20), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(minmax(eps_version), ref, rtol=0, atol=2e-4)


def test_scorecam_equals_pytorch_grad_cam_at_input_resolution():
    """At the input's resolution no mask is upsampled: identical definitions (softmax of logits, no baseline)."""
    from pytorch_grad_cam import ScoreCAM

    net, x = plain_net(scale=30.0), images()
    got = attribute(net, x, targets=TARGETS, method="scorecam", layer="1")
    ref = pgc(ScoreCAM, net, net[1], x, TARGETS)
    torch.testing.assert_close(minmax(got.maps), ref, rtol=0, atol=1e-5)


def brute_scorecam(net, layer, x, targets, align_corners):
    """One masked forward at a time (pytorch-grad-cam's loop), masks upsampled with ``align_corners``."""
    acts = {}
    handle = net[layer].register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach().clone()))
    with torch.no_grad():
        net(x)
    handle.remove()
    out = []
    for n in range(x.shape[0]):
        scores = []
        for k in range(acts["a"].shape[1]):
            a = acts["a"][n : n + 1, k : k + 1]
            m = F.interpolate(a, x.shape[-2:], mode="bilinear", align_corners=align_corners)[0, 0]
            m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else torch.zeros_like(m)
            with torch.no_grad():
                scores.append(net(x[n : n + 1] * m)[0, targets[n]])
        w = torch.softmax(torch.stack(scores), 0)
        cam = (w[:, None, None] * acts["a"][n]).sum(0).clamp(min=0)
        out.append(F.interpolate(cam[None, None], x.shape[-2:], mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(out)


def test_scorecam_masks_use_align_corners_false_where_pytorch_grad_cam_uses_true():
    from pytorch_grad_cam import ScoreCAM

    net, x = plain_net(scale=1000.0), images()
    got = attribute(net, x, targets=TARGETS, method="scorecam", layer="3")
    torch.testing.assert_close(got.maps, brute_scorecam(net, 3, x, TARGETS, False), rtol=1e-4, atol=1e-7)
    ref = pgc(ScoreCAM, net, net[3], x, TARGETS)  # nn.UpsamplingBilinear2d: align_corners=True
    torch.testing.assert_close(minmax(brute_scorecam(net, 3, x, TARGETS, True)), ref, rtol=0, atol=1e-4)
    assert (minmax(got.maps) - ref).abs().max() > 0.05


def test_scorecam_is_batched_in_chunks_and_nan_safe():
    net, x = plain_net(), images(3)
    with torch.no_grad():  # dead channels (all-zero maps) and a constant channel after the first ReLU
        net[0].weight[:3] = 0
        net[0].bias[:2] = -1.0
        net[0].bias[2] = 0.5
    ref = attribute(net, x, method="scorecam", layer="1")
    assert torch.isfinite(ref.maps).all()
    for size in (1, 7, 100):
        got = attribute(net, x, method="scorecam", layer="1", batch_size=size)
        torch.testing.assert_close(got.maps, ref.maps, rtol=1e-5, atol=1e-8)
    alone = attribute(net, x[1:2], method="scorecam", layer="1")  # independent of batch-mates
    torch.testing.assert_close(alone.maps[0], ref.maps[1], rtol=1e-5, atol=1e-8)


def test_scorecam_scores_the_blank_image_once_for_all_constant_channels():
    """Dead and constant channels mask to the blank image: one forward of one image serves them all."""
    net, x = plain_net(), images(3)
    with torch.no_grad():
        net[0].weight[:3] = 0
        net[0].bias[:2] = -1.0  # dead after the ReLU
        net[0].bias[2] = 0.5  # constant 0.5
    rows = []
    handle = net.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        got = attribute(net, x, method="scorecam", layer="1")
    finally:
        handle.remove()
    k = net[0].out_channels
    with torch.no_grad():
        a = net[1](net[0](x))
    live = int((a.amax((2, 3)) > a.amin((2, 3))).sum())
    assert live == 3 * (k - 3)
    assert rows[0] == 3 and sum(rows[1:]) == 1 + live  # the images, the blank image, the live masks
    torch.testing.assert_close(got.maps, brute_scorecam(net, 1, x, got.targets, False), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "patch,stride,baseline",
    [((4, 6), (2, 3), 0.0), (5, (3, 2), 0.3), ((16, 7), (1, 4), "tensor")],
)
def test_occlusion_equals_captum(patch, stride, baseline):
    net, x = plain_net(), images(3, 16, 22)  # non-square; strides that do not divide the size
    if baseline == "tensor":
        baseline = torch.randn(3, 1, 1)
    got = attribute(net, x, targets=TARGETS[:3], method="occlusion", patch=patch, stride=stride, baseline=baseline)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ref = Occlusion(net).attribute(
        x, target=TARGETS[:3], sliding_window_shapes=(3, ph, pw), strides=(3, sh, sw), baselines=baseline
    )
    assert got.maps.shape == (3, 16, 22)
    torch.testing.assert_close(got.maps, ref[:, 0], rtol=0, atol=1e-4)
    assert (got.maps - ref[:, 0]).abs().max() < 1e-5
    # chunked windows: the same
    small = attribute(net, x, targets=TARGETS[:3], method="occlusion", patch=patch, stride=stride,
                      baseline=baseline, batch_size=5)  # fmt: skip
    torch.testing.assert_close(small.maps, got.maps, rtol=0, atol=1e-6)


def test_saliency_and_guided_equal_captum():
    net, x = plain_net(), images()
    sal = attribute(net, x, targets=TARGETS, method="saliency")
    torch.testing.assert_close(sal.maps, Saliency(net).attribute(x, target=TARGETS).amax(1))
    guided = attribute(net, x, targets=TARGETS, method="guided")
    ref = GuidedBackprop(net).attribute(x, target=TARGETS)
    torch.testing.assert_close(guided.pixels, ref)
    torch.testing.assert_close(guided.maps, ref.abs().amax(1))
    assert not torch.allclose(guided.pixels, sal.pixels)  # the guided rule matters here


@pytest.mark.parametrize("form", ["reused", "functional", "tensor"])
def test_guided_applies_to_every_rectifier_call_form(form):
    """Captum hooks only nn.ReLU modules; ours sees F.relu, torch.relu, in-place and reused ReLUs too."""
    x = images()
    ref = GuidedBackprop(plain_net()).attribute(x, target=TARGETS)
    got = attribute(FormsNet(form).eval(), x, targets=TARGETS, method="guided")
    torch.testing.assert_close(got.pixels, ref)
    ggc = attribute(FormsNet(form).eval(), x, targets=TARGETS, method="guided-gradcam", layer="conv2")
    ref_ggc = attribute(plain_net(), x, targets=TARGETS, method="guided-gradcam", layer="3")
    torch.testing.assert_close(ggc.pixels, ref_ggc.pixels)


def test_guided_gradcam_equals_captum_with_bilinear_interpolation():
    net, x = plain_net(), images()
    got = attribute(net, x, targets=TARGETS, method="guided-gradcam", layer="5")
    ref = GuidedGradCam(net, net[5]).attribute(x, target=TARGETS, interpolate_mode="bilinear")
    torch.testing.assert_close(got.pixels, ref, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got.maps, ref.abs().amax(1), rtol=1e-5, atol=1e-12)


def test_gradcam_uses_plain_gradients_not_guided_ones():
    """tf-explain #146: guided gradients in Grad-CAM give the same map for every class."""
    net, x = plain_net(), images(2)
    a = attribute(net, x, targets=0, method="gradcam", layer="3")
    b = attribute(net, x, targets=1, method="gradcam", layer="3")
    assert not torch.allclose(minmax(a.maps), minmax(b.maps), atol=1e-3)


def test_cam_equals_gradcam_times_positive_factor_on_gap_linear_head():
    net, x = plain_net(), images()
    cam = attribute(net, x, method="cam")
    assert cam.layer == "6"  # the layer whose average feeds the linear head (after the last ReLU)
    grad = attribute(net, x, method="gradcam", layer=cam.layer)
    assert torch.equal(cam.targets, grad.targets)
    mask = grad.maps > 1e-3 * grad.maps.amax((1, 2), keepdim=True)
    ratio = cam.maps[mask] / grad.maps[mask]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 8 * 10.0), rtol=1e-4, atol=0)  # h·w of the layer
    assert torch.equal(cam.maps > 0, grad.maps > 0)


def test_cam_requires_a_gap_linear_head():
    torch.manual_seed(0)
    flat_head = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 20, 3))
    with pytest.raises(ValueError, match=r"'cam' needs a global-average-pool -> linear head.*use method='gradcam'"):
        attribute(flat_head, images(), method="cam")
    with pytest.raises(ValueError, match=r"not the global average of the layer's output"):
        attribute(flat_head, images(), method="cam", layer="1")
    no_linear = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"calls no torch.nn.Linear"):
        attribute(no_linear, images(), method="cam")
    after = nn.Sequential(*plain_net(), nn.LogSoftmax(dim=1))
    with pytest.raises(ValueError, match=r"class scores are not the output of the last Linear"):
        attribute(after, images(), method="cam", layer="6")


# ----------------------------------------------------------------------------- layers, targets, scores
def test_default_cam_layer_by_execution_order():
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 48)
    assert default_cam_layer(resnet, x) == "layer4"
    got = attribute(resnet, x, method="gradcam")
    assert got.layer == "layer4" and got.maps.shape == (2, 64, 48)
    # registration order is not execution order; a 1×1 output is not spatial
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Conv2d(8, 8, 3, padding=1)
            self.early = nn.Conv2d(3, 8, 3, padding=1)
            self.squash = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1))  # 1×1: not spatial
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.squash(self.late(self.early(x))).flatten(1))

    assert default_cam_layer(Net(), images()) == "late"
    flat = plain_net()
    assert default_cam_layer(flat, images()) == "5"  # the last convolution (the cam default differs, see above)
    with pytest.raises(ValueError, match=r"has no convolution"):
        default_cam_layer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 20, 2)), images())


def test_reused_module_call_is_named_and_attributable():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.block = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = self.block(self.stem(x).relu())
            return self.fc(self.block(x.relu()).relu().mean((2, 3)))

    torch.manual_seed(0)
    net, x = Reuse().eval(), images(2)
    assert default_cam_layer(net, x) == "block#1"
    first = attribute(net, x, method="gradcam", layer="block#0")
    second = attribute(net, x, method="gradcam")
    assert second.layer == "block#1" and not torch.allclose(first.maps, second.maps)


def test_targets_forms_and_predicted_class():
    net, x = plain_net(), images()
    pred = net(x).argmax(1)
    a = attribute(net, x)
    assert torch.equal(a.targets, pred) and a.layer == "5"
    torch.testing.assert_close(a.scores, net(x).gather(1, pred[:, None])[:, 0].detach())
    torch.testing.assert_close(a.logits, net(x).detach())
    for targets in (2, [2, 2, 2, 2], torch.tensor([2, 2, 2, 2]), torch.tensor(2)):
        assert attribute(net, x, targets=targets).targets.tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match=r"targets \[5, 7\] out of range: the model has 5 classes \(0..4\)"):
        attribute(net, x, targets=[0, 5, 1, 7])
    with pytest.raises(ValueError, match=r"targets must have one class per image: expected 4, got shape \(3,\)"):
        attribute(net, x, targets=[0, 1, 2])
    with pytest.raises(TypeError, match="targets must be integers"):
        attribute(net, x, targets=[0.5, 1, 2, 3])
    with pytest.raises(TypeError, match="targets must be an int"):
        attribute(net, x, targets=True)
    with pytest.raises(ValueError, match=r"out of range"):
        attribute(net, x, targets=-1, method="occlusion")


def test_score_callable_and_forward_callable():
    net, x = plain_net(), images()

    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return {"logits": self.net(x), "aux": 0}

    wrapped = Dict()
    ref = {m: attribute(net, x, targets=TARGETS, method=m) for m in ("gradcam", "occlusion", "saliency")}
    with pytest.raises(ValueError, match=r"The output of Dict is dict, not class scores \[N, classes\].*pass score="):
        attribute(wrapped, x)
    for m, r in ref.items():
        got = attribute(wrapped, x, targets=TARGETS, method=m, score=lambda o: o["logits"],
                        layer="net.5" if m == "gradcam" else None)  # fmt: skip
        torch.testing.assert_close(got.maps, r.maps)
    # segmentation-like output [N, classes, H, W]: the callable reduces it
    seg = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1))
    with pytest.raises(ValueError, match=r"not class scores \[N, classes\] = \[4, classes\]"):
        attribute(seg, x, method="scorecam")
    got = attribute(seg, x, method="scorecam", score=lambda o: o.mean((2, 3)))
    assert got.maps.shape == (4, 16, 20) and got.logits.shape == (4, 3)
    with pytest.raises(ValueError, match=r"score\(output\) must return class scores"):
        attribute(seg, x, score=lambda o: o)
    # forward= replaces model(x)
    calls = []

    def forward(images):
        calls.append(images.shape[0])
        return net(images)

    got = attribute(net, x, targets=TARGETS, method="occlusion", forward=forward, batch_size=50)
    torch.testing.assert_close(got.maps, ref["occlusion"].maps)
    assert calls[0] == 4 and max(calls) <= 50


def test_bad_input_errors():
    net, x = plain_net(), images()
    listed = re.escape(", ".join(repr(m) for m in METHODS))
    with pytest.raises(ValueError, match=rf"Invalid value for method='grad-cam'. Must be one of {listed}"):
        attribute(net, x, method="grad-cam")
    with pytest.raises(TypeError, match=r"method='gradcam' takes no option 'patch'.*'occlusion': patch, stride"):
        attribute(net, x, method="gradcam", patch=4)
    with pytest.raises(ValueError, match=r"method='saliency' takes no layer"):
        attribute(net, x, method="saliency", layer="3")
    with pytest.raises(ValueError, match=r"No module '99' in Sequential; convolutions are: '0', '3', '5'"):
        attribute(net, x, layer="99")
    with pytest.raises(ValueError, match=r"Layer '9' has no spatial output.*got \(4, 5\)"):
        attribute(net, x, layer="9")
    with pytest.raises(ValueError, match=r"Layer '8' has no spatial output.*got \(4, 16\)"):
        attribute(net, x, method="scorecam", layer="8")
    with pytest.raises(ValueError, match=r"patch=\(17, 4\): larger than the images \(16, 20\)"):
        attribute(net, x, method="occlusion", patch=(17, 4))
    with pytest.raises(ValueError, match=r"stride=\(5, 5\): must be <= patch \(4, 4\)"):
        attribute(net, x, method="occlusion", patch=4, stride=5)
    with pytest.raises(ValueError, match=r"Invalid value for patch=0"):
        attribute(net, x, method="occlusion", patch=0)
    with pytest.raises(ValueError, match=r"batch_size=0"):
        attribute(net, x, method="scorecam", batch_size=0)
    with pytest.raises(TypeError, match="images must be a float tensor"):
        attribute(net, x.to(torch.uint8))
    with pytest.raises(ValueError, match=r"images must have shape \[N, C, H, W\]"):
        attribute(net, x[0])
    with pytest.raises(ValueError, match=r"do the images fit the model\?"):
        attribute(net, torch.randn(2, 4, 16, 16))
    with pytest.raises(ValueError, match=r"does not broadcast"):
        attribute(net, x, method="occlusion", baseline=torch.zeros(2, 2))


# ----------------------------------------------------------------------------- isolation
class BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.drop(self.features(x).mean((2, 3))))


@pytest.mark.parametrize("method", ALL)
def test_state_restored_and_no_hooks_left(method):
    net = BNDropNet().train()
    net.features[1].train(False)  # a mixed-mode model: every flag comes back as it was
    x = images(2)
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.25)
    net.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    rng = torch.get_rng_state()
    x_before = x.clone()
    got = attribute(net, x, method=method, **({"patch": 4, "stride": 2} if method == "occlusion" else {}))
    assert got.maps.shape == (2, 16, 20) and torch.isfinite(got.maps).all()
    if method in CAM_METHODS:
        assert (got.maps >= 0).all() and got.layer == "features"
    assert [m.training for m in net.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN buffers too
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in net.parameters())
    assert not net.fc.weight.requires_grad and net.fc.bias.requires_grad
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(x, x_before) and x.grad is None
    assert hook_count(net) == 0 and torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "guided", "occlusion"])
def test_hooks_removed_after_an_exception(method):
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = plain_net()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.net(x)
            if self.calls >= {"gradcam": 1, "scorecam": 2, "guided": 1, "occlusion": 2}[method]:
                raise KeyError("boom")
            return out

    net = Boom()
    with pytest.raises(KeyError, match="boom"):
        attribute(net, images(), method=method, **({"batch_size": 2} if method in ("scorecam", "occlusion") else {}))
    assert hook_count(net) == 0 and torch._C._len_torch_function_stack() == 0
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("method", ALL)
def test_works_under_inference_mode_and_frozen_weights(method):
    net, x = plain_net(), images(2)
    ref = attribute(net, x, method=method)
    with torch.inference_mode():
        got = attribute(net, x.clone(), method=method)
    torch.testing.assert_close(got.maps, ref.maps)
    for p in net.parameters():
        p.requires_grad_(False)
    frozen = attribute(net, x, method=method)
    torch.testing.assert_close(frozen.maps, ref.maps)
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())


def test_maps_do_not_depend_on_batch_mates():
    net, x = BNDropNet().train(), images(3)
    for method in ("gradcam++", "occlusion", "guided-gradcam", "cam"):
        batch = attribute(net, x, method=method)
        alone = attribute(net, x[2:], method=method)
        torch.testing.assert_close(alone.maps[0], batch.maps[2], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_memory_flat_over_repeated_calls():
    """No hooks, graphs or tensors pile up (pytorch-grad-cam #132/#483, torch-cam #390)."""
    net, x = BNDropNet(), images(1, 8, 8)

    def live() -> tuple[int, int]:
        gc.collect()
        objects = gc.get_objects()
        return len(objects), sum(1 for o in objects if issubclass(type(o), torch.Tensor))

    def run():
        for method in ("gradcam", "scorecam", "guided-gradcam", "occlusion"):
            attribute(net, x, method=method)

    for _ in range(3):
        run()
    objects, tensors = live()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(5):
            run()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown
    for _ in range(20):
        run()
    after_objects, after_tensors = live()
    assert after_tensors == tensors
    assert after_objects - objects < 50, after_objects - objects
    assert hook_count(net) == 0


def test_result_repr_and_type():
    got = attribute(plain_net(), images(2), method="occlusion")
    assert isinstance(got, Attribution)
    assert repr(got) == "Attribution(method='occlusion', layer=None, images=2, size=(16, 20))"
    assert got.pixels is None
