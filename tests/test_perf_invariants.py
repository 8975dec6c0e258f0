"""What issue #10 changed for speed and memory keeps the results: fused counting, global hooks,
full-fp32 probes, chunked probe passes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_vis.callbacks.evolution import PROBE_CHUNK, probe_layers
from lightning_vis.cka import StreamingGram, gram_matrices
from lightning_vis.isolation import full_fp32, isolated
from lightning_vis.sites import find_activation_sites, intercept_activations
from lightning_vis.stats import ActivityAccumulator, ActivityCounts, update_activity


def _reference(counts: ActivityCounts, x: torch.Tensor) -> None:
    """The counting as first written (one site at a time, masks and all): the oracle."""
    x = x.detach()
    spatial = tuple(range(2, x.ndim))
    dims = (0, *spatial)
    peak = x.amax(dim=spatial) if spatial else x
    counts.fired += (peak > 0).sum(0)
    mag = x if counts.kind in ("relu", "relu6", "sigmoid", "hardsigmoid") else x.abs()
    counts.magnitude += mag.sum(dim=dims, dtype=torch.float32)
    if counts.region is not None:
        lo, hi = counts.region
        counts.saturated += ((x <= lo) | (x >= hi)).sum(dim=dims)
    counts.samples += x.shape[0]
    counts.elements += x[0, 0].numel() * x.shape[0]


@pytest.mark.parametrize("kind, fn", [("relu", torch.relu), ("relu6", F.relu6), ("silu", F.silu),
                                      ("tanh", torch.tanh), ("leaky_relu", F.leaky_relu)])  # fmt: skip
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "rank2"])
def test_fused_counting_equals_the_reference(kind, fn, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, 6, 7, generator=g) * 4 - 1
    x[:, 1] = -5.0  # a channel that never fires
    x[3:, 2] = -5.0  # fires on 3 samples only
    if layout == "rank2":
        x = x[:, :, 0, 0]
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = fn(x)
    ours, ref = ActivityCounts.zeros(5, kind), ActivityCounts.zeros(5, kind)
    for _ in range(3):
        update_activity(ours, y)
        _reference(ref, y)
    for name in ("samples", "elements", "fired", "saturated"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    torch.testing.assert_close(ours.magnitude, ref.magnitude, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, fn(x))  # input untouched


def test_accumulator_batches_several_sites_and_a_repeated_one():
    g = torch.Generator().manual_seed(1)
    outs = [torch.relu(torch.randn(4, 3, 5, 5, generator=g)), F.silu(torch.randn(4, 6, 2, 2, generator=g)),
            torch.relu(torch.randn(4, 3, 5, 5, generator=g))]  # fmt: skip
    a, b = ActivityCounts.zeros(3), ActivityCounts.zeros(6, "silu")
    ra, rb = ActivityCounts.zeros(3), ActivityCounts.zeros(6, "silu")
    acc = ActivityAccumulator()
    for counts, ref, y in ((a, ra, outs[0]), (b, rb, outs[1]), (a, ra, outs[2])):  # `a` twice in one forward
        acc.add(counts, y)
        _reference(ref, y)
    acc.flush()
    for got, want in ((a, ra), (b, rb)):
        assert torch.equal(got.fired, want.fired) and torch.equal(got.samples, want.samples)
        torch.testing.assert_close(got.magnitude, want.magnitude, rtol=1e-5, atol=1e-5)
    acc.add(a, outs[0])
    acc.clear()
    acc.flush()
    assert torch.equal(a.fired, ra.fired)  # cleared: not counted


def test_interceptor_hooks_are_global_and_removed_also_on_error():
    from torch.nn.modules import module as module_mod

    before = (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks))
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    other = nn.ReLU()  # a module outside the model: not a site owner
    seen = []

    def record(call):
        seen.append(call.key)
        return call.run()

    with intercept_activations(net, record):
        net(torch.randn(1, 3, 8, 8))
        other(torch.randn(2))
    assert seen == [("m", "1", 0), ("m", "3", 0)]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with intercept_activations(net, record):
            raise RuntimeError("boom")
    assert (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks)) == before
    assert [s.name for s in find_activation_sites(net, torch.randn(1, 3, 8, 8))] == ["1", "3"]


def test_full_fp32_inside_isolated_and_restored_also_on_error():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")  # TF32 for matmuls
        net = nn.Conv2d(3, 3, 1)
        with pytest.raises(ValueError, match="inside"):
            with isolated(net):
                assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
                assert torch.get_float32_matmul_precision() == "highest"
                raise ValueError("inside")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        with full_fp32():
            torch.set_float32_matmul_precision("medium")  # changed inside: still restored
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved[2])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_streaming_gram_equals_the_whole_batch_gram():
    X = torch.relu(torch.randn(37, 4, 5, 5, generator=torch.Generator().manual_seed(3)))
    (want,) = gram_matrices(X)
    for keep in (0, 2**24):  # chunks in host memory / kept on the device
        acc = StreamingGram(37, keep_elements=keep)
        for part in X.split(16):
            acc.add(part)
        torch.testing.assert_close(acc.compute(), want, rtol=1e-5, atol=1e-3)


def test_probe_pass_is_chunked_and_gives_the_unchunked_grams():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(inplace=True), nn.Conv2d(6, 5, 3), nn.ReLU()).train()
    x = torch.randn(2 * PROBE_CHUNK + 5, 3, 10, 10)
    batches = []
    net.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    out = probe_layers(net, x, ["0", "2"])
    assert max(batches) <= PROBE_CHUNK and sum(batches) == x.shape[0]
    with torch.no_grad():
        net.eval()
        a0 = net[0](x)
        a2 = net[2](torch.relu(a0))
    for name, act in (("0", a0), ("2", a2)):
        (gram,), peaks = out[name]
        torch.testing.assert_close(gram, gram_matrices(act)[0], rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(peaks, act.flatten(2).amax(2))
