"""Class-level unit statistics (``lightning_vis.class_stats``): hand-computed answers and brute-force oracles."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_vis.class_stats import (
    ClassChannelStats,
    ablation_accuracy,
    channel_means,
    channel_order,
    class_means,
    class_similarity,
    collect_class_stats,
    inactive_fraction,
    mean_off_diagonal,
    measurement_layer,
    shared_units,
    sparsity,
    specific_units,
    top_units,
    zeroed_count,
)

F64 = torch.float64


def hand_batch():
    """Two samples, two channels, 2×2 positions (values chosen by hand)."""
    acts = torch.tensor(
        [
            [[[1.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]],  # label 1: ch0 mean 1 (2 zeros); ch1 mean 0, inactive
            [[[-1.0, -1.0], [-2.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]],  # label 0: ch0 mean -1, inactive; ch1 mean 2
        ]
    )
    return acts, torch.tensor([1, 0])


def test_hand_computed_statistics():
    acts, labels = hand_batch()
    stats = ClassChannelStats.empty(3, 2)
    stats.update(acts, labels)
    means = class_means(stats)
    torch.testing.assert_close(means[:2], torch.tensor([[-1.0, 2.0], [1.0, 0.0]], dtype=F64))
    assert torch.isnan(means[2]).all()  # class 2 has no sample
    torch.testing.assert_close(sparsity(stats), torch.tensor([6 / 8, 4 / 8], dtype=F64))
    torch.testing.assert_close(inactive_fraction(stats), torch.tensor([0.5, 0.5], dtype=F64))
    torch.testing.assert_close(channel_means(stats), torch.tensor([0.0, 1.0], dtype=F64))
    assert float(stats.positions) == 8 and float(stats.samples) == 2 and float(stats.ignored) == 0


def test_flat_activations_and_ignored_labels():
    stats = ClassChannelStats.empty(2, 2)
    stats.update(torch.tensor([[1.0, 0.0], [3.0, -1.0], [7.0, 7.0]]), torch.tensor([0, 0, -100]))
    torch.testing.assert_close(class_means(stats)[0], torch.tensor([2.0, -0.5], dtype=F64))
    assert torch.isnan(class_means(stats)[1]).all()
    assert float(stats.ignored) == 1
    torch.testing.assert_close(channel_means(stats), torch.tensor([11 / 3, 6 / 3], dtype=F64))  # all samples
    torch.testing.assert_close(sparsity(stats), torch.tensor([0.0, 2 / 3], dtype=F64))


def brute_force(batches, num_classes):
    """Concatenate everything, then compute each statistic with loops."""
    acts = torch.cat([a for a, _ in batches]).double()
    labels = torch.cat([y for _, y in batches])
    n, c = acts.shape[:2]
    per_sample = acts.flatten(2).mean(2)
    means = torch.full((num_classes, c), float("nan"), dtype=F64)
    for k in range(num_classes):
        rows = [per_sample[i] for i in range(n) if labels[i] == k]
        if rows:
            means[k] = torch.stack(rows).mean(0)
    zero = (acts <= 0).double().flatten(2)
    sparse = torch.stack([zero[:, j].mean() for j in range(c)])
    inactive = torch.stack([(acts[:, j].flatten(1).amax(1) <= 0).double().mean() for j in range(c)])
    return means, sparse, inactive, per_sample.mean(0)


def random_batches(seed, count=5, classes=4, channels=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = 3 + i  # uneven batch sizes
        acts = F.relu(torch.randn(n, channels, 3, 5, generator=g))
        acts[:, 2] = 0.0  # a dead channel
        out.append((acts, torch.randint(0, classes, (n,), generator=g)))
    return out


def test_streaming_equals_brute_force_oracle():
    batches = random_batches(0)
    stats = ClassChannelStats.empty(4, 6)
    for acts, labels in batches:
        stats.update(acts, labels)
    means, sparse, inactive, overall = brute_force(batches, 4)
    torch.testing.assert_close(class_means(stats), means, equal_nan=True)
    torch.testing.assert_close(sparsity(stats), sparse)
    torch.testing.assert_close(inactive_fraction(stats), inactive)
    torch.testing.assert_close(channel_means(stats), overall)
    assert float(sparsity(stats)[2]) == 1.0 and float(inactive_fraction(stats)[2]) == 1.0


def test_merge_and_pack_equal_one_stream():
    """Two shards (two DDP ranks) merged, or summed as packed tensors, equal one stream over everything."""
    batches = random_batches(1, count=6)
    whole, a, b = (ClassChannelStats.empty(4, 6) for _ in range(3))
    for i, (acts, labels) in enumerate(batches):
        whole.update(acts, labels)
        (a if i % 2 else b).update(acts, labels)
    reduced = ClassChannelStats.unpack(a.pack() + b.pack(), 4, 6)  # what all_reduce(SUM) gives
    a.merge(b)
    for got in (a, reduced):
        for x, y in zip(got._tensors(), whole._tensors()):
            torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match=r"Cannot merge statistics of 3 classes × 6 channels into 4 classes"):
        whole.merge(ClassChannelStats.empty(3, 6))
    with pytest.raises(ValueError, match="packed statistics have 3 values"):
        ClassChannelStats.unpack(torch.zeros(3), 4, 6)


def test_update_in_inference_mode_and_bf16():
    acts, labels = hand_batch()
    stats = ClassChannelStats.empty(2, 2)
    with torch.inference_mode():
        stats.update(acts.to(torch.bfloat16), labels)
    torch.testing.assert_close(class_means(stats), torch.tensor([[-1.0, 2.0], [1.0, 0.0]], dtype=F64))


def test_bad_updates():
    stats = ClassChannelStats.empty(2, 3)
    with pytest.raises(ValueError, match=r"activations have 2 channels \(shape \(4, 2, 3, 3\)\); these statistics count 3"):
        stats.update(torch.zeros(4, 2, 3, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"activations must have shape \[N, C, ...\], got \(4,\)"):
        stats.update(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="3 labels for a batch of 4 samples"):
        stats.update(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor \[N\]"):
        stats.update(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"num_classes=0. Must be an int >= 1"):
        ClassChannelStats.empty(0, 3)


def test_similarity_hand_computed():
    sim = class_similarity(torch.tensor([[3.0, 4.0], [4.0, 3.0], [0.0, 0.0], [-3.0, -4.0]]))
    expected = torch.tensor(
        [[1.0, 0.96, 0.0, -1.0], [0.96, 1.0, 0.0, -0.96], [0.0, 0.0, 0.0, 0.0], [-1.0, -0.96, 0.0, 1.0]]
    )
    torch.testing.assert_close(sim, expected)
    off = torch.tensor([[1.0, 0.5, float("nan")], [0.5, 1.0, float("nan")], [float("nan")] * 3])
    assert mean_off_diagonal(off) == 0.5  # NaN (absent classes) left out
    assert mean_off_diagonal(torch.ones(1, 1)) != mean_off_diagonal(torch.ones(1, 1))  # NaN: nothing off-diagonal


def test_top_shared_specific_hand_computed():
    means = torch.tensor(
        [
            [5.0, 4.0, 3.0, 0.0, 0.0],  # top-3 {0, 1, 2}
            [5.0, 0.0, 3.0, 4.0, 0.0],  # top-3 {0, 3, 2}
            [5.0, 0.0, 0.0, 3.0, 4.0],  # top-3 {0, 4, 3}
            [float("nan")] * 5,  # no samples: skipped
        ]
    )
    assert top_units(means, 3).tolist() == [[0, 1, 2], [0, 3, 2], [0, 4, 3], [-1, -1, -1]]
    assert shared_units(means, 3) == [0]
    assert specific_units(means, 3) == {0: [1], 1: [], 2: [4]}
    assert shared_units(means, 5) == [0, 1, 2, 3, 4] and specific_units(means, 5) == {0: [], 1: [], 2: []}
    # ties go to the lower channel index, deterministically
    assert top_units(torch.tensor([[1.0, 2.0, 2.0, 2.0]]), 2).tolist() == [[1, 2]]
    # one class: its top-n is both shared and specific
    assert shared_units(means[:1], 2) == [0, 1] and specific_units(means[:1], 2) == {0: [0, 1]}
    with pytest.raises(ValueError, match=r"top_n=6. Must be an int in \[1, 5\]"):
        top_units(means, 6)


def test_channel_order_and_zeroed_count():
    means = torch.tensor([0.5, 0.0, 2.0, 0.0, 1.0])
    assert channel_order(means).tolist() == [1, 3, 0, 4, 2]
    assert channel_order(means, most_active_first=True).tolist() == [2, 4, 0, 1, 3]
    assert [zeroed_count(p, 10) for p in (0.0, 0.1, 0.25, 0.3, 1.0)] == [0, 1, 3, 3, 10]
    with pytest.raises(ValueError, match=r"means must have shape \[C\]"):
        channel_order(torch.zeros(2, 2))


# ---------------------------------------------------------------------- passes through a model
def test_ablation_hand_computed():
    """The layer's output is the logits themselves: zeroing a channel zeroes a class score."""
    model = nn.Sequential(nn.Identity())
    x = torch.tensor([[2.0, 1.0], [1.0, 3.0], [0.0, 5.0]])
    y = torch.tensor([0, 1, 1])
    result = ablation_accuracy(model, [(x, y)], "0", torch.tensor([1, 0]), (0.5, 1.0))
    # nothing zeroed: all right; channel 1 zeroed: every prediction is class 0 (ties go to index 0)
    assert result.accuracy == {0.0: 1.0, 0.5: pytest.approx(1 / 3), 1.0: pytest.approx(1 / 3)}
    assert result.zeroed == (0, 1, 2) and int(result.total) == 3
    assert len(model[0]._forward_hooks) == 0


class ConvNet(nn.Module):
    def __init__(self, channels=6, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(5, channels, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        h = self.relu2(self.conv2(F.max_pool2d(self.relu1(self.bn(self.conv1(x))), 2)))
        return self.head(self.drop(h.mean((2, 3))))


def data(seed=0, n=24, classes=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, classes, (8,), generator=g)) for _ in range(n // 8)]


def test_ablation_equals_zeroed_weights_oracle():
    """Zeroing conv2's rectified output = zeroing conv2's filters and biases of those channels (an independent model)."""
    torch.manual_seed(0)
    model = ConvNet().train()
    batches = data()
    order = torch.tensor([4, 1, 5, 0, 3, 2])
    fractions = (0.2, 0.5, 1.0)
    result = ablation_accuracy(model, batches, "relu2", order, fractions, chunk_rows=8, replicate="input")
    assert not result.at_layer
    for kwargs in ({}, {"chunk_rows": 8}, {"replicate": "layer"}, {"replicate": "input", "chunk_rows": 64}):
        other = ablation_accuracy(model, batches, "relu2", order, fractions, **kwargs)
        assert torch.equal(other.correct, result.correct), kwargs
        assert other.at_layer == (kwargs.get("replicate", "auto") != "input")  # auto: the layer path is valid here
    for p, k in zip(result.fractions, result.zeroed):
        oracle = copy.deepcopy(model).eval()
        with torch.no_grad():
            oracle.conv2.weight[order[:k]] = 0
            oracle.conv2.bias[order[:k]] = 0
            right = sum(int((oracle(x).argmax(1) == y).sum()) for x, y in batches)
        assert result.accuracy[p] == right / 24, p
    assert model.training and all(len(m._forward_hooks) == 0 for m in model.modules())


class Skip(nn.Module):
    """A skip connection around the masked layer: repeating its output alone cannot work."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head((self.relu(self.conv(x)) + x).mean((2, 3)))


def test_ablation_falls_back_to_input_replication():
    torch.manual_seed(2)
    model, batches, order = Skip(), data(3), torch.tensor([2, 0, 1])
    result = ablation_accuracy(model, batches, "relu", order, (0.34, 1.0))
    assert not result.at_layer
    for p, k in zip(result.fractions, result.zeroed):
        oracle = copy.deepcopy(model)
        with torch.no_grad():
            oracle.conv.weight[order[:k]] = 0
            oracle.conv.bias[order[:k]] = 0
            right = sum(int((oracle(x).argmax(1) == y).sum()) for x, y in batches)
        assert result.accuracy[p] == right / 24, p
    with pytest.raises(RuntimeError):
        ablation_accuracy(model, batches, "relu", order, (0.34,), replicate="layer")
    assert len(model.relu._forward_hooks) == 0
    with pytest.raises(ValueError, match=r"replicate='x'. Must be one of 'auto', 'layer', 'input'"):
        ablation_accuracy(model, batches, "relu", order, replicate="x")


def test_ablation_restores_state_and_removes_hook_on_error():
    model = ConvNet().train()
    running = model.bn.running_mean.clone()
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"the channel order has 4 channels"):
        ablation_accuracy(model, data(), "relu2", torch.arange(4))
    with pytest.raises(ValueError, match=r"Invalid fraction 1.5"):
        ablation_accuracy(model, data(), "relu2", torch.arange(6), (0.1, 1.5))
    with pytest.raises(ValueError, match=r"No module 'nope' in ConvNet; modules are: 'conv1', 'bn'"):
        ablation_accuracy(model, data(), "nope", torch.arange(6))
    ablation_accuracy(model, data(), "relu2", torch.arange(6))
    assert model.training and torch.equal(model.bn.running_mean, running)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_collect_equals_brute_force():
    torch.manual_seed(1)
    model = ConvNet().train()
    batches = data(2)
    stats = collect_class_stats(model, batches, "relu2", 3)
    trunk = copy.deepcopy(model).eval()
    with torch.no_grad():
        acts = [
            (trunk.relu2(trunk.conv2(F.max_pool2d(trunk.relu1(trunk.bn(trunk.conv1(x))), 2))), y)
            for x, y in batches
        ]
    means, sparse, inactive, _ = brute_force(acts, 3)
    torch.testing.assert_close(class_means(stats), means, equal_nan=True)
    torch.testing.assert_close(sparsity(stats), sparse)
    torch.testing.assert_close(inactive_fraction(stats), inactive)
    assert model.training and all(len(m._forward_hooks) == 0 for m in model.modules())


def test_measurement_layer():
    x = torch.randn(1, 3, 8, 8)
    assert measurement_layer(ConvNet(), x) == ("conv2", "relu2")  # last conv -> the ReLU it feeds
    assert measurement_layer(ConvNet(), x, "conv1") == ("conv1", "relu1")  # past BatchNorm
    assert measurement_layer(ConvNet(), x, "bn") == ("bn", "bn")  # any module, as named

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.relu = nn.ReLU()
            self.tail = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = F.relu(self.conv(x))  # functional: the convolution's own output is measured
            return self.relu(self.relu(self.tail(h))).mean((2, 3))

    assert measurement_layer(Functional(), x, "conv") == ("conv", "conv")
    assert measurement_layer(Functional(), x) == ("tail", "tail")  # its ReLU is called twice
    with pytest.raises(ValueError, match=r"Module 'relu' \(ReLU\) is called 2 times per forward pass"):
        measurement_layer(Functional(), x, "relu")

    class Tuple(nn.Module):
        def forward(self, x):
            return x.sum(), x

    net = nn.Sequential(nn.Conv2d(3, 2, 1), Tuple())
    with pytest.raises(ValueError, match=r"Module '1' \(Tuple\) has no channels"):
        measurement_layer(net, x, "1")
    with pytest.raises(ValueError, match="has no convolution"):
        measurement_layer(nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), x)


# ---------------------------------------------------------------------- pictures and tables
def test_similarity_heatmap_and_units_table():
    from lightning_vis.render import similarity_heatmap, units_markdown

    sim = torch.tensor([[1.0, 0.3, float("nan")], [0.3, 1.0, float("nan")], [float("nan")] * 3])
    img = similarity_heatmap(sim, ["a", "b", "c"], title="t")
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    assert 3 * 48 <= img.shape[2] <= 600 and 0.6 < img.shape[1] / img.shape[2] < 1.6  # close to square
    grey = (img[0] == 217) & (img[1] == 217) & (img[2] == 217)  # NaN cells: light grey
    assert int(grey.sum()) >= 5 * 40 * 40
    yellow = (img[0] > 240) & (img[1] > 220) & (img[2] < 60)  # viridis' top (1.0) on the diagonal
    assert int(yellow.sum()) >= 2 * 40 * 40
    with pytest.raises(ValueError, match=r"similarity must be a square matrix \[K, K\], got \(2, 3\)"):
        similarity_heatmap(torch.zeros(2, 3))
    text = units_markdown({0: [4, 1], 2: [1, 7]}, [1], {0: [4], 2: [7]}, layer="conv")
    assert text.splitlines()[0] == "**conv**: 1 unit shared by every class: 1; 2 class-specific units."
    assert "| 0 | 4, 1 | 4 |" in text and "| 2 | 1, 7 | 7 |" in text
