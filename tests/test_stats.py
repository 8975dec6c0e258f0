"""Per-channel activity counters and the dead / dying / saturated decision (pure torch)."""

import pytest
import torch

from lightning_vis.stats import ActivityCounts, classify_channels, flat_region, update_activity, watches_firing


def _counts(fired, magnitude=None, *, samples=1000, per_sample=16, kind="relu"):
    c = ActivityCounts.zeros(len(fired), kind)
    c.samples.fill_(samples)
    c.elements.fill_(samples * per_sample)
    c.fired.copy_(torch.tensor(fired))
    if magnitude is None:
        magnitude = [f * per_sample * 0.5 for f in fired]
    c.magnitude.copy_(torch.tensor(magnitude, dtype=torch.float32))
    return c


def test_counts_by_hand_rank_2_3_4_5():
    # [N=2, C=3]: linear layer outputs
    c = ActivityCounts.zeros(3)
    update_activity(c, torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]))
    assert (int(c.samples), int(c.elements)) == (2, 2)
    assert c.fired.tolist() == [1, 0, 2] and c.magnitude.tolist() == [1.0, 0.0, 5.0]
    for shape in [(4, 3, 5), (4, 3, 5, 6), (4, 3, 2, 5, 6)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).abs() + 0.1
        x[:, 1] = 0
        x[1:, 2] = 0
        c = ActivityCounts.zeros(3)
        update_activity(c, x)
        assert c.fired.tolist() == [4, 0, 1]
        assert int(c.elements) == x[:, 0].numel()
        torch.testing.assert_close(c.magnitude, x.sum(dim=[d for d in range(x.ndim) if d != 1]))


def test_counters_are_fixed_size_updated_in_place_and_input_untouched():
    c = ActivityCounts.zeros(4)
    tensors = [c.samples, c.elements, c.fired, c.magnitude, c.saturated]
    ptrs = [t.data_ptr() for t in tensors]
    x = torch.relu(torch.randn(8, 4, 6, 6))
    before = x.clone()
    for _ in range(50):
        update_activity(c, x)
    assert [t.data_ptr() for t in (c.samples, c.elements, c.fired, c.magnitude, c.saturated)] == ptrs
    assert all(a is b for a, b in zip(tensors, (c.samples, c.elements, c.fired, c.magnitude, c.saturated)))
    assert c.fired.shape == (4,) and int(c.samples) == 400
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_fp32_and_int64(dtype):
    c = ActivityCounts.zeros(2)
    x = torch.ones(64, 2, 16, 16, dtype=dtype)
    x[:, 1] = 0
    for _ in range(40):  # 40 * 16384 = 655360 ones: far beyond fp16/bf16 integer range
        update_activity(c, x)
    assert c.fired.dtype == torch.int64 and c.magnitude.dtype == torch.float32
    assert c.fired.tolist() == [2560, 0]
    assert c.magnitude.tolist() == [655360.0, 0.0]


def test_channels_last_counts_like_contiguous():
    x = torch.relu(torch.randn(6, 5, 7, 7, generator=torch.Generator().manual_seed(2)) - 1.5)
    a, b = ActivityCounts.zeros(5), ActivityCounts.zeros(5)
    update_activity(a, x)
    update_activity(b, x.to(memory_format=torch.channels_last))
    assert torch.equal(a.fired, b.fired) and torch.equal(a.elements, b.elements)
    torch.testing.assert_close(a.magnitude, b.magnitude)


def test_saturation_counted_in_the_flat_region_of_bounded_activations():
    x = torch.tensor([[[-5.0, 0.0, 5.0, 9.0], [0.1, 0.2, 0.3, 0.4]]])  # [1, 2, 4]
    cases = {
        "relu6": (torch.nn.functional.relu6(x), [3, 0]),  # 0, 0, 6 ... flat; 5 is not
        "tanh": (torch.tanh(x), [3, 0]),
        "sigmoid": (torch.sigmoid(x), [3, 0]),  # sigmoid(-5)=0.0067, sigmoid(5)=0.9933, sigmoid(9); not 0.5
    }
    for kind, (y, expected) in cases.items():
        c = ActivityCounts.zeros(2, kind)
        update_activity(c, y)
        assert c.saturated.tolist() == expected, kind
    c = ActivityCounts.zeros(2, "hardtanh", region=flat_region("hardtanh", -2.0, 2.0))
    update_activity(c, torch.nn.functional.hardtanh(x, -2.0, 2.0))
    assert c.saturated.tolist() == [3, 0]
    assert ActivityCounts.zeros(2, "relu").region is None


def test_pack_unpack_round_trip_and_state():
    c = _counts([0, 5, 15, 600])
    c.saturated.copy_(torch.tensor([1, 2, 3, 4]))
    d = ActivityCounts.zeros(4)
    d.unpack_(c.pack())
    for name in ("samples", "elements", "fired", "magnitude", "saturated"):
        assert torch.equal(getattr(c, name), getattr(d, name)), name
    e = ActivityCounts.zeros(4)
    e.load_state(c.state())
    assert torch.equal(e.fired, c.fired)
    with pytest.raises(ValueError, match="packed counts have 6 values, expected 14 for 4 channels"):
        d.unpack_(torch.zeros(6))
    c.reset()
    assert int(c.samples) == 0 and int(c.fired.sum()) == 0


def test_dead_dying_healthy_sparse():
    # dead; 0.5% firing (dying); 1.5% firing with a normal mean (healthy sparse); busy; dormant (ReDo)
    c = _counts([0, 5, 15, 600, 800], [0.0, 40.0, 1000.0, 9000.0, 50.0])
    s = classify_channels(c)
    assert s.dead.tolist() == [True, False, False, False, False]
    assert s.dying.tolist() == [False, True, False, False, True]
    assert s.saturated.tolist() == [False] * 5
    assert s.dead_fraction == 0.2
    assert s.flagged.tolist() == [True, True, False, False, True]


def test_hysteresis_dying_flag_clears_only_above_two_percent():
    previous = None
    flags = []
    for fired in (5, 15, 19, 25, 15):  # 0.5%, 1.5%, 1.9%, 2.5%, 1.5% of 1000 samples
        s = classify_channels(_counts([fired, 600]), previous)
        previous = s.flagged
        flags.append(bool(s.dying[0]))
    assert flags == [True, True, True, False, False]
    # a dead channel that revives to 1.5% is still dying; above 2% it is healthy
    s = classify_channels(_counts([15, 600]), classify_channels(_counts([0, 600])).flagged)
    assert s.dying.tolist() == [True, False] and not s.dead.any()
    s = classify_channels(_counts([30, 600]), s.flagged)
    assert not s.dying.any()


def test_saturated_and_non_rectifiers():
    c = _counts([1000, 1000, 0], kind="tanh")
    c.saturated.copy_(torch.tensor([16000, 15000, 16000]))
    s = classify_channels(c)
    assert s.saturated.tolist() == [True, False, True]
    assert not s.dead.any() and not s.dying.any()  # tanh channels are not "dead"
    c = _counts([0, 1000], kind="relu6")
    c.saturated.copy_(torch.tensor([16000, 16000]))  # the dead channel sits at 0: dead, not saturated
    s = classify_channels(c)
    assert s.dead.tolist() == [True, False] and s.saturated.tolist() == [False, True]
    assert watches_firing("gelu") and not watches_firing("sigmoid")


def test_no_samples_and_nonfinite_flag_nothing():
    s = classify_channels(ActivityCounts.zeros(3))
    assert not (s.dead | s.dying | s.saturated).any()
    c = _counts([0, 0, 600], [float("nan"), 0.0, 100.0])
    s = classify_channels(c)
    assert s.dead.tolist() == [False, True, False] and s.nonfinite.tolist() == [True, False, False]


def test_bad_input():
    with pytest.raises(ValueError, match=r"channels=0\. Must be an int >= 1"):
        ActivityCounts.zeros(0)
    c = ActivityCounts.zeros(3)
    with pytest.raises(ValueError, match=r"shape \[N, C, \.\.\.\], got shape \(3,\)"):
        update_activity(c, torch.zeros(3))
    with pytest.raises(ValueError, match="Activation has 4 channels, the counters 3"):
        update_activity(c, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"dying_rate=1\.5\. Must be in \[0, 1\]"):
        classify_channels(c, dying_rate=1.5)
    with pytest.raises(ValueError, match="revive_rate=0.005 must be >= dying_rate=0.01"):
        classify_channels(c, revive_rate=0.005)
    with pytest.raises(ValueError, match=r"previous must have shape \(3,\), got \(2,\)"):
        classify_channels(c, torch.zeros(2, dtype=torch.bool))
