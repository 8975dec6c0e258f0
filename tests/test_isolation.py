"""``isolated()``: every buffer comes back exactly, whatever happened to it inside."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_vis.isolation import isolated


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.BatchNorm2d(2))
    net.register_buffer("table", torch.arange(6.0, dtype=torch.float64).view(2, 3))
    return net.train()


def _buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.named_buffers()}


def _assert_same(net: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = dict(net.named_buffers())
    assert now.keys() == before.keys()
    for k, v in before.items():
        assert now[k].dtype == v.dtype and now[k].shape == v.shape, k
        assert torch.equal(now[k], v), k


def test_training_forward_inside_is_undone_in_every_dtype():
    net = _net()
    before = _buffers(net)
    with isolated(net, eval_mode=False):
        net(torch.randn(4, 3, 8, 8))  # updates running stats (float32) and num_batches_tracked (int64)
        assert not torch.equal(net[1].running_mean, before["1.running_mean"])
        assert int(net[4].num_batches_tracked) == 1
    _assert_same(net, before)
    assert net.training


def test_changes_through_data_resize_and_an_error_are_undone():
    net = _net()
    before = _buffers(net)
    with pytest.raises(RuntimeError, match="boom"), isolated(net):
        net[1].running_var.data.mul_(3)  # .data bypasses the version counter
        net.table.resize_(4)
        net.table.fill_(-1)
        raise RuntimeError("boom")
    _assert_same(net, before)


def test_untouched_buffers_are_not_written():
    net = _net()
    versions = {k: v._version for k, v in net.named_buffers()}
    with isolated(net):
        net(torch.randn(2, 3, 8, 8))  # eval mode: running stats read, not written
    assert {k: v._version for k, v in net.named_buffers()} == versions


def test_a_buffer_converted_inside_comes_back_in_its_dtype():
    net = _net()
    before = _buffers(net)
    with isolated(net):
        net.table.data = net.table.data.float()
        net[1].running_mean.data = net[1].running_mean.data.half()
    _assert_same(net, before)
