"""Activation sites: every call of an activation function during a forward pass, named.

A *site* is one call of an activation during the forward pass, module or functional,
named after the module it belongs to (DESIGN "Activation site"):

* an activation module called once per forward (``nn.ReLU`` at ``features.1``) is named
  ``features.1``; one called several times within its parent's forward (ResNet's reused
  ``self.relu``) gives ``layer1.0.relu#0``, ``layer1.0.relu#1``;
* a functional call (``F.relu``, ``torch.relu``, ``x.relu_()``…) inside a module's
  ``forward`` is named ``<module>#0``, ``<module>#1``… in call order; inside the root
  module's own ``forward`` it is ``forward#0``….

All call forms are seen the same way: a :class:`torch.overrides.TorchFunctionMode` sees
every functional call (``nn.ReLU`` itself calls ``F.relu``), and forward pre/post hooks on
every module keep the stack of modules being executed, which ties each call to its owner
(the pattern of brevitas' ``FunctionalInterceptor``). Everything is removed on exit, also
when the forward raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

__all__ = [
    "ActivationCall",
    "BOUNDED",
    "RECTIFIERS",
    "Site",
    "find_activation_sites",
    "intercept_activations",
    "name_sites",
]

#: Activations with a rectifier rule and a notion of "firing" (output > 0).
RECTIFIERS = frozenset({"relu", "relu6", "leaky_relu", "prelu", "elu", "gelu", "silu", "hardswish", "mish"})
#: Bounded activations: watched for saturation (outputs in the flat region).
BOUNDED = frozenset({"relu6", "hardtanh", "tanh", "sigmoid", "hardsigmoid"})

# func -> (kind, position of the `inplace` argument or None, always in place)
_FUNCS: dict[Callable, tuple[str, int | None, bool]] = {
    F.relu: ("relu", 1, False),
    torch.relu: ("relu", None, False),
    torch.relu_: ("relu", None, True),
    torch.Tensor.relu: ("relu", None, False),
    torch.Tensor.relu_: ("relu", None, True),
    F.relu6: ("relu6", 1, False),
    F.hardtanh: ("hardtanh", 3, False),
    F.leaky_relu: ("leaky_relu", 2, False),
    F.prelu: ("prelu", None, False),
    F.elu: ("elu", 2, False),
    F.gelu: ("gelu", None, False),
    F.silu: ("silu", 1, False),
    F.hardswish: ("hardswish", 1, False),
    F.mish: ("mish", 1, False),
    F.hardsigmoid: ("hardsigmoid", 1, False),
    torch.tanh: ("tanh", None, False),
    torch.tanh_: ("tanh", None, True),
    torch.Tensor.tanh: ("tanh", None, False),
    torch.Tensor.tanh_: ("tanh", None, True),
    F.tanh: ("tanh", None, False),
    torch.sigmoid: ("sigmoid", None, False),
    torch.sigmoid_: ("sigmoid", None, True),
    torch.Tensor.sigmoid: ("sigmoid", None, False),
    torch.Tensor.sigmoid_: ("sigmoid", None, True),
    F.sigmoid: ("sigmoid", None, False),
}

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish,
    nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid,
)  # fmt: skip

#: A site before naming: ("m", module name, call index) for an activation module's own
#: call, ("f", owner name, functional call index) for a functional call.
SiteKey = tuple[str, str, int]


@dataclass
class ActivationCall:
    """One activation call seen by :func:`intercept_activations`.

    ``run()`` performs the original call; a handler returns its result, or a replacement.
    """

    key: SiteKey
    kind: str
    func: Callable
    args: tuple
    kwargs: dict
    inplace: bool
    last_conv: str | None

    @property
    def input(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["input"]

    def run(self) -> torch.Tensor:
        return self.func(*self.args, **self.kwargs)


class _Frame:
    """One module call on the interceptor's stack (slotted: one is made per module call)."""

    __slots__ = ("name", "module", "call_index", "children", "functional_calls", "own_call_taken")

    def __init__(self, name: str, module: nn.Module | None, call_index: int = 0) -> None:
        self.name = name
        self.module = module
        self.call_index = call_index
        self.children: dict[str, int] = {}
        self.functional_calls = 0
        self.own_call_taken = False


def _classify(func: Callable, args: tuple, kwargs: dict) -> tuple[str, bool] | None:
    entry = _FUNCS.get(func)
    if entry is None:
        return None
    kind, inplace_pos, always_inplace = entry
    inplace = always_inplace
    if inplace_pos is not None:
        if "inplace" in kwargs:
            inplace = bool(kwargs["inplace"])
        elif len(args) > inplace_pos:
            inplace = bool(args[inplace_pos])
    if kind == "hardtanh" and hardtanh_bounds(args, kwargs) == (0.0, 6.0):
        kind = "relu6"
    return kind, inplace


def hardtanh_bounds(args: tuple, kwargs: dict) -> tuple[float, float]:
    """The ``(min_val, max_val)`` of a ``F.hardtanh`` call (defaults ``-1, 1``)."""
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return float(lo), float(hi)


class _Interceptor(TorchFunctionMode):
    def __init__(self, handler: Callable[[ActivationCall], torch.Tensor]):
        super().__init__()
        self.handler = handler
        self.stack: list[_Frame] = []
        self.outer = _Frame("", None)
        self.last_conv: str | None = None
        self.names: dict[int, str] = {}  # id(module) -> name, for the model's modules only

    # module hooks (global: two registrations, whatever the model's size) -------------
    def pre_hook(self, module: nn.Module, args: Any) -> None:
        name = self.names.get(id(module))
        if name is not None:  # a module of the model (others are not sites' owners)
            self.push(name, module)

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self.names.get(id(module))
        if name is not None:
            self.pop(name, module)

    def push(self, name: str, module: nn.Module) -> None:
        stack = self.stack
        if not stack:
            self.outer = _Frame("", None)  # a new top-level call: call indices restart
        parent = stack[-1] if stack else self.outer
        children = parent.children
        index = children.get(name, 0)
        children[name] = index + 1
        stack.append(_Frame(name, module, index))

    def pop(self, name: str, module: nn.Module) -> None:
        stack = self.stack
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].module is module:
                del stack[i:]
                break
        if isinstance(module, _ConvNd):
            self.last_conv = name

    # functional calls ---------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        # fast path: every torch call of the forward comes here; only activations are sites
        if func not in _FUNCS or not self.stack:
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        kind, inplace = _classify(func, args, kwargs)
        frame = self.stack[-1]
        if isinstance(frame.module, _ACTIVATION_MODULES) and not frame.own_call_taken:
            frame.own_call_taken = True
            key = ("m", frame.name, frame.call_index)
        else:
            key = ("f", frame.name, frame.functional_calls)
            frame.functional_calls += 1
        return self.handler(ActivationCall(key, kind, func, args, kwargs, inplace, self.last_conv))


@contextmanager
def intercept_activations(
    model: nn.Module, handler: Callable[[ActivationCall], torch.Tensor] | None = None
) -> Iterator[_Interceptor]:
    """Route every activation call made inside ``model``'s modules through ``handler``.

    Args:
        model: the root module; its ``named_modules()`` names name the sites.
        handler: called with an :class:`ActivationCall` for each activation call made
            inside a module's forward; returns the output (``call.run()`` or a
            replacement). Default: run the call unchanged.

    Calls made outside every module's forward (e.g. in ``training_step``) are not sites
    and pass through untouched. The module stack is kept by one global forward pre-hook
    and one global forward hook (``torch.nn.modules.module.register_module_forward_*``)
    that ignore modules outside ``model``: entering costs two registrations whatever the
    model's size. Hooks and the mode are removed on exit, also on error.
    """
    interceptor = _Interceptor(handler or (lambda call: call.run()))
    interceptor.names = {id(module): name for name, module in model.named_modules()}
    handles = []
    try:
        handles.append(register_module_forward_pre_hook(interceptor.pre_hook))
        handles.append(register_module_forward_hook(interceptor.post_hook, always_call=True))
        with interceptor:
            yield interceptor
    finally:
        for h in handles:
            h.remove()


def name_sites(keys: list[SiteKey]) -> dict[SiteKey, str]:
    """Readable site names for the keys one forward pass produced (DESIGN naming rule).

    Example::

        >>> name_sites([("m", "features.1", 0), ("m", "block.relu", 0), ("m", "block.relu", 1),
        ...             ("f", "block", 0), ("f", "", 0)])  # doctest: +NORMALIZE_WHITESPACE
        {('m', 'features.1', 0): 'features.1', ('m', 'block.relu', 0): 'block.relu#0',
         ('m', 'block.relu', 1): 'block.relu#1', ('f', 'block', 0): 'block#0', ('f', '', 0): 'forward#0'}
    """
    reused = {name for kind, name, index in keys if kind == "m" and index > 0}
    names = {}
    for key in keys:
        kind, owner, index = key
        if kind == "m":
            names[key] = f"{owner}#{index}" if owner in reused else owner
        else:
            names[key] = f"{owner or 'forward'}#{index}"
    return names


@dataclass(frozen=True)
class Site:
    """An activation site found on a real forward pass."""

    name: str
    key: SiteKey
    kind: str
    channels: int
    shape: tuple[int, ...]
    #: the convolution whose output reaches this site (whose filters feed its channels), if any
    conv: str | None

    @property
    def label(self) -> str:
        """The site as users think of it: ``"conv1 → forward#0"`` (just the name without a conv)."""
        return f"{self.conv} → {self.name}" if self.conv else self.name


#: Backward nodes of activations: the search for a site's convolution does not cross them.
_ACTIVATION_NODES = (
    "Relu", "Threshold", "LeakyRelu", "Rrelu", "Prelu", "Elu", "Celu", "Selu", "Gelu", "Silu", "Mish",
    "Hardswish", "Hardsigmoid", "Hardtanh", "Sigmoid", "Tanh", "Softplus", "Clamp",
)  # fmt: skip


def feeding_conv(
    tensor: torch.Tensor, conv_nodes: dict, channels: int, *, max_nodes: int = 256
) -> str | None:
    """The convolution whose output reaches ``tensor`` through non-activation ops.

    Walks ``tensor``'s autograd graph backwards, depth first and first operand first
    (in ``out += identity`` the residual branch ``out`` is searched before the shortcut),
    through BatchNorm, pooling, additions and other element-wise ops, never across an
    activation (another site) or a concatenation (channels from several layers). The
    first convolution found with ``channels`` output channels is the answer.

    Args:
        tensor: the activation's input, from a pass with gradients enabled.
        conv_nodes: ``{grad_fn: (name, out_channels)}`` of the convolutions' outputs.
        channels: the site's channel count.
        max_nodes: search budget.
    """
    stack = [tensor.grad_fn]
    seen: set[int] = set()
    while stack and max_nodes > 0:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        max_nodes -= 1
        hit = conv_nodes.get(node)
        if hit is not None:
            if hit[1] == channels:
                return hit[0]
            continue
        kind = type(node).__name__
        if kind.startswith(_ACTIVATION_NODES) or kind.startswith("Cat") or kind.startswith("Stack"):
            continue
        nexts = [f for f, _ in node.next_functions if f is not None and type(f).__name__ != "AccumulateGrad"]
        stack.extend(reversed(nexts))
    return None


@contextmanager
def _conv_outputs(model: nn.Module) -> Iterator[dict]:
    """``{grad_fn: (name, out_channels)}`` of every convolution output while inside."""
    nodes: dict = {}
    handles = []

    def hook(name: str, channels: int) -> Callable:
        def record(module, args, out):
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                nodes[out.grad_fn] = (name, channels)

        return record

    try:
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                handles.append(module.register_forward_hook(hook(name, module.out_channels)))
        yield nodes
    finally:
        for h in handles:
            h.remove()


def find_activation_sites(
    model: nn.Module, example: torch.Tensor, *, forward: Callable | None = None
) -> list[Site]:
    """Every activation site of ``model`` on a forward pass of ``example``, in call order.

    The pass runs under :func:`~lightning_vis.isolation.isolated` (gradients on, to
    follow the graph from each site back to the convolution that feeds it, see
    :func:`feeding_conv`; where parameters are frozen, the last convolution executed).

    Example::

        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = nn.Conv2d(3, 3, 3, padding=1)
        ...         self.relu = nn.ReLU(inplace=True)
        ...     def forward(self, x):
        ...         y = self.relu(self.conv(x))
        ...         return self.relu(F.relu(y) + x)
        >>> [s.label for s in find_activation_sites(Block(), torch.randn(1, 3, 8, 8))]
        ['conv → relu#0', 'forward#0', 'relu#1']

    (``forward#0`` and ``relu#1`` are fed by other activations, not by a convolution.)
    """
    from lightning_vis.isolation import isolated
    from lightning_vis.layers import eager_forward

    seen: list[tuple[SiteKey, str, tuple[int, ...], str | None]] = []
    keys: set[SiteKey] = set()

    with isolated(model), eager_forward(model), _conv_outputs(model) as conv_nodes:

        def record(call: ActivationCall) -> torch.Tensor:
            conv = call.last_conv
            if call.key not in keys and isinstance(call.input, torch.Tensor) and call.input.grad_fn is not None:
                channels = call.input.shape[1] if call.input.ndim > 1 else 1
                conv = feeding_conv(call.input, conv_nodes, channels)
            out = call.run()
            if call.key not in keys:
                keys.add(call.key)
                seen.append((call.key, call.kind, tuple(out.shape), conv))
            return out

        with intercept_activations(model, record):
            (forward or model)(example)
    names = name_sites([k for k, *_ in seen])
    return [
        Site(names[key], key, kind, shape[1] if len(shape) > 1 else 1, shape, conv)
        for key, kind, shape, conv in seen
    ]
