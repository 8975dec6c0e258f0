"""Layer resolution: names, globs, execution order, errors that list the candidates."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_vis.layers import conv_layers, execution_order, first_conv, resolve_layers, unwrap_model


class LateFirst(nn.Module):
    """The first registered convolution is not the first one applied."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(8, 4, 1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(F.relu(self.stem(x))))


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = LateFirst()

    def forward(self, x):
        return self.net(x)


def test_conv_layers_in_registration_order():
    assert list(conv_layers(Wrapper())) == ["net.head", "net.stem", "net.body.0"]


def test_first_conv_follows_execution_not_registration():
    x = torch.randn(2, 3, 8, 8)
    assert first_conv(Wrapper(), x) == "net.stem"
    assert execution_order(Wrapper(), x, list(conv_layers(Wrapper()))) == ["net.stem", "net.body.0", "net.head"]


def test_execution_order_leaves_model_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    rng = torch.get_rng_state()
    execution_order(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_names_and_globs():
    model = Wrapper()
    convs = list(conv_layers(model))
    assert resolve_layers(model, "net.stem", convs) == ["net.stem"]
    assert resolve_layers(model, "net.*", convs) == convs
    assert resolve_layers(model, ["net.body.*", "net.head"], convs) == ["net.head", "net.body.0"]
    # duplicates collapse, order follows the candidates
    assert resolve_layers(model, ["net.stem", "net.s*"], convs) == ["net.stem"]


def test_unknown_name_lists_candidates():
    model = Wrapper()
    with pytest.raises(ValueError, match=r"No module 'net\.nope' in Wrapper; convolutions are: 'net\.head', 'net\.stem', 'net\.body\.0'"):
        resolve_layers(model, "net.nope", list(conv_layers(model)))


def test_glob_matching_nothing_lists_candidates():
    model = Wrapper()
    with pytest.raises(ValueError, match=r"Pattern 'net\.layer\*' matches nothing.*'net\.stem'"):
        resolve_layers(model, "net.layer*", list(conv_layers(model)))


def test_existing_module_of_wrong_kind_is_named():
    model = Wrapper()
    with pytest.raises(ValueError, match=r"Module 'net\.body\.1' \(ReLU\) cannot be used here; convolutions are"):
        resolve_layers(model, "net.body.1", list(conv_layers(model)))


def test_bad_pattern_types():
    with pytest.raises(TypeError, match="must be strings"):
        resolve_layers(Wrapper(), [3])
    with pytest.raises(ValueError, match="No layers given"):
        resolve_layers(Wrapper(), [])


def test_model_without_convolution():
    with pytest.raises(ValueError, match="has no convolution"):
        first_conv(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))


def test_unwrap_compiled_and_dataparallel():
    net = LateFirst()
    assert unwrap_model(nn.DataParallel(net)) is net
    compiled = torch.compile(net)
    assert unwrap_model(compiled) is net
