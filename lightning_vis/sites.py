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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
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


@dataclass
class _Frame:
    name: str
    module: nn.Module | None
    call_index: int = 0
    children: dict[str, int] = field(default_factory=dict)
    functional_calls: int = 0
    own_call_taken: bool = False


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

    # module hooks -------------------------------------------------------------------
    def push(self, name: str, module: nn.Module) -> None:
        if not self.stack:
            self.outer = _Frame("", None)  # a new top-level call: call indices restart
        parent = self.stack[-1] if self.stack else self.outer
        index = parent.children.get(name, 0)
        parent.children[name] = index + 1
        self.stack.append(_Frame(name, module, index))

    def pop(self, name: str, module: nn.Module) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i].module is module:
                del self.stack[i:]
                break
        if isinstance(module, nn.modules.conv._ConvNd):
            self.last_conv = name

    # functional calls ---------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = _classify(func, args, kwargs) if func in _FUNCS else None
        if found is None or not self.stack:
            return func(*args, **kwargs)
        frame = self.stack[-1]
        if isinstance(frame.module, _ACTIVATION_MODULES) and not frame.own_call_taken:
            frame.own_call_taken = True
            key = ("m", frame.name, frame.call_index)
        else:
            key = ("f", frame.name, frame.functional_calls)
            frame.functional_calls += 1
        kind, inplace = found
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
    and pass through untouched. Hooks and the mode are removed on exit, also on error.
    """
    interceptor = _Interceptor(handler or (lambda call: call.run()))
    handles = []
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: interceptor.push(n, m)))
            handles.append(
                module.register_forward_hook(lambda m, a, o, n=name: interceptor.pop(n, m), always_call=True)
            )
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
    #: the convolution executed last before this site (whose filters feed it), if any
    conv: str | None


def find_activation_sites(
    model: nn.Module, example: torch.Tensor, *, forward: Callable | None = None
) -> list[Site]:
    """Every activation site of ``model`` on a forward pass of ``example``, in call order.

    The pass runs under :func:`~lightning_vis.isolation.isolated` and ``no_grad``.

    Example::

        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = nn.Conv2d(3, 3, 3, padding=1)
        ...         self.relu = nn.ReLU(inplace=True)
        ...     def forward(self, x):
        ...         y = self.relu(self.conv(x))
        ...         return self.relu(F.relu(y) + x)
        >>> [s.name for s in find_activation_sites(Block(), torch.randn(1, 3, 8, 8))]
        ['relu#0', 'forward#0', 'relu#1']
    """
    from lightning_vis.isolation import isolated
    from lightning_vis.layers import eager_forward

    seen: list[tuple[SiteKey, str, tuple[int, ...], str | None]] = []

    def record(call: ActivationCall) -> torch.Tensor:
        out = call.run()
        if call.key not in {k for k, *_ in seen}:
            seen.append((call.key, call.kind, tuple(out.shape), call.last_conv))
        return out

    with isolated(model), torch.no_grad(), eager_forward(model), intercept_activations(model, record):
        (forward or model)(example)
    names = name_sites([k for k, *_ in seen])
    return [
        Site(names[key], key, kind, shape[1] if len(shape) > 1 else 1, shape, conv)
        for key, kind, shape, conv in seen
    ]
