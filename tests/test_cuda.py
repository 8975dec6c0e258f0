"""Checks that need a CUDA device (skipped without one): exact probes, equal counts, bf16, memory bounds.

Run them on a GPU machine with the package on ``PYTHONPATH``:
``python -m pytest tests/test_cuda.py -q -p no:cacheprovider``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_vis import project
from lightning_vis.callbacks.evolution import probe_layers
from lightning_vis.isolation import full_fp32, isolated
from lightning_vis.sites import find_activation_sites, intercept_activations
from lightning_vis.stats import ActivityAccumulator, ActivityCounts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _vgg_like(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    ).eval()  # fmt: skip


@pytest.fixture
def tf32_on():
    """PyTorch's fast defaults on a GPU: TF32 for cuDNN and cuBLAS (what project() must switch off)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("method", ["deconvnet", "guided", "saliency"])
@pytest.mark.parametrize("layer", ["4", "7"])
def test_project_on_cuda_equals_cpu(tf32_on, method, layer):
    net = _vgg_like()
    x = torch.randn(4, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    cpu = project(net, x, layer, top_k=5, method=method)
    gpu = project(copy.deepcopy(net).cuda(), x.cuda(), layer, top_k=5, method=method)
    assert torch.equal(gpu.channels.cpu(), cpu.channels)
    assert torch.equal(gpu.locations.cpu(), cpu.locations)
    torch.testing.assert_close(gpu.activations.cpu(), cpu.activations, rtol=1e-4, atol=1e-6)
    scale = cpu.images.abs().amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-12)
    assert float(((gpu.images.cpu() - cpu.images).abs() / scale).max()) <= 1e-4
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored


def _counts_of(net: nn.Module, x: torch.Tensor, autocast: bool = False) -> dict:
    sites = find_activation_sites(net, x[:2])
    counts = {s.key: ActivityCounts.zeros(s.channels, s.kind, device=x.device) for s in sites}
    acc = ActivityAccumulator()

    def handle(call):
        out = call.run()
        acc.add(counts[call.key], out)
        return out

    with torch.no_grad(), full_fp32(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        with intercept_activations(net, handle):
            net(x)
    acc.flush()
    return {k: [t.cpu() for t in (c.samples, c.elements, c.fired, c.magnitude, c.saturated)] for k, c in counts.items()}


def test_monitor_counts_on_cuda_equal_cpu():
    net = _vgg_like().train()
    with torch.no_grad():
        net[0].bias[3] = -1e4  # a dead channel
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cpu = _counts_of(net, x)
    net_gpu = copy.deepcopy(net).cuda().to(memory_format=torch.channels_last)
    gpu = _counts_of(net_gpu, x.cuda().contiguous(memory_format=torch.channels_last))
    assert cpu.keys() == gpu.keys()
    for key in cpu:
        samples, elements, fired, magnitude, saturated = cpu[key]
        g = gpu[key]
        assert torch.equal(g[0], samples) and torch.equal(g[1], elements) and torch.equal(g[4], saturated)
        assert torch.equal(g[2], fired), key
        torch.testing.assert_close(g[3], magnitude, rtol=1e-4, atol=1e-3)
    assert int(cpu[("m", "2", 0)][2][3]) == 0


def test_bf16_autocast_counts_and_projects_in_fp32():
    net = _vgg_like().cuda().train()
    with torch.no_grad():
        net[0].bias[3] = -1e4
    x = torch.randn(16, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    counts = _counts_of(net, x, autocast=True)
    fired = counts[("m", "2", 0)][2]
    assert fired[3] == 0 and fired.sum() > 0
    assert all(c[3].dtype == torch.float32 and torch.isfinite(c[3]).all() for c in counts.values())
    with torch.autocast("cuda", dtype=torch.bfloat16):  # project() runs its pass in fp32 regardless
        p = project(net, x[:2], "4", top_k=3)
    ref = project(net, x[:2], "4", top_k=3)
    assert p.images.dtype == torch.float32
    torch.testing.assert_close(p.images, ref.images)


def test_probe_pass_peak_memory_is_bounded():
    import torchvision

    model = torchvision.models.resnet18(weights=None).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(64, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (64,), device="cuda")

    def train_step():
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_step()
    torch.cuda.synchronize()
    train_peak = torch.cuda.max_memory_allocated()
    probe = torch.randn(64, 3, 224, 224, device="cuda")
    layers = ["conv1", "layer2.0.conv1", "layer3.0.conv1", "layer4.1.conv2"]
    torch.cuda.reset_peak_memory_stats()
    with isolated(model):
        stats = probe_layers(model, probe, layers)
        for layer in layers:
            peaks = stats[layer][1]
            channels = torch.sort(peaks.mean(0), descending=True, stable=True).indices[:4]
            project(model, probe[peaks[:, channels].argmax(0).cuda()], layer, channels=channels[:, None])
    torch.cuda.synchronize()
    probe_peak = torch.cuda.max_memory_allocated()
    assert probe_peak <= train_peak + max(0.1 * train_peak, 256 * 2**20), (probe_peak / 2**20, train_peak / 2**20)
