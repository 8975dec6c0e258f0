"""Finding layers by name, by glob, and by the order a real forward pass uses them.

Every callback names layers the way ``named_modules()`` does on the module it is handed
(inside a callback: the ``LightningModule``, e.g. ``"net.features.3"``). Arguments that
take layers accept names or glob patterns (``"net.layer*.conv1"``); an unknown name
raises a ``ValueError`` that lists the candidates.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "conv_layers",
    "eager_forward",
    "execution_order",
    "first_conv",
    "resolve_layers",
    "resolve_probe_layers",
    "unwrap_model",
]

_MAX_LISTED = 40


def unwrap_model(model: nn.Module) -> nn.Module:
    """The eager module behind ``torch.compile``, DDP and DataParallel wrappers.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3))
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


@contextmanager
def eager_forward(model: nn.Module) -> Iterator[None]:
    """Inside, a LightningModule that Lightning compiled runs its eager forward.

    Lightning's ``from_compiled`` replaces the instance's ``forward`` by the compiled one
    and keeps the original in ``_compiler_ctx``; inside this context the original is put
    back (the root module's hooks still run, so hooks and function modes see every call),
    and the compiled one is restored on exit. Any other module is left alone.
    """
    ctx = model.__dict__.get("_compiler_ctx")
    compiled = model.__dict__.get("forward")
    if not isinstance(ctx, dict) or not callable(ctx.get("original_forward")) or compiled is None:
        yield
        return
    model.forward = ctx["original_forward"]
    try:
        yield
    finally:
        model.forward = compiled


def conv_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All convolutions of ``model`` (1d, 2d, 3d, transposed), by ``named_modules()`` name.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> list(conv_layers(net))
        ['0', '2']
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}


def _quote_list(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", … ({len(names) - _MAX_LISTED} more)"
    return shown or "(none)"


def resolve_layers(
    model: nn.Module,
    patterns: str | Iterable[str],
    candidates: Sequence[str] | None = None,
    *,
    what: str = "convolutions",
) -> list[str]:
    """Expand names and glob patterns into the matching candidate names, in candidate order.

    Args:
        model: the module whose ``named_modules()`` names are used.
        patterns: a name or glob pattern, or several.
        candidates: the names that may be chosen; default: every named module.
        what: how the candidates are called in error messages.

    Raises:
        ValueError: a name or pattern matches no candidate. The message lists them.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> resolve_layers(net, "*", list(conv_layers(net)))
        ['0', '2']
        >>> resolve_layers(net, ["9"], list(conv_layers(net)))
        Traceback (most recent call last):
        ...
        ValueError: No module '9' in Sequential; convolutions are: '0', '2'
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise ValueError(f"No layers given; {what} are: {_quote_list(list(candidates or []))}")
    all_names = [n for n, _ in model.named_modules()]
    candidates = list(all_names if candidates is None else candidates)
    chosen: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"Layer names must be strings, got {type(pattern).__name__}: {pattern!r}")
        if any(ch in pattern for ch in "*?["):
            hits = [c for c in candidates if fnmatch.fnmatchcase(c, pattern)]
            if not hits:
                raise ValueError(
                    f"Pattern {pattern!r} matches nothing in {type(model).__name__}; "
                    f"{what} are: {_quote_list(candidates)}"
                )
        elif pattern in candidates:
            hits = [pattern]
        elif pattern in all_names:
            module = dict(model.named_modules())[pattern]
            raise ValueError(
                f"Module {pattern!r} ({type(module).__name__}) cannot be used here; "
                f"{what} are: {_quote_list(candidates)}"
            )
        else:
            raise ValueError(
                f"No module {pattern!r} in {type(model).__name__}; {what} are: {_quote_list(candidates)}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    order = {name: i for i, name in enumerate(candidates)}
    return sorted(chosen, key=order.__getitem__)


_CALL = re.compile(r"^(?P<name>.*)#(?P<index>\d+)$")


def resolve_probe_layers(model: nn.Module, patterns: Iterable[str], convs: Sequence[str]) -> list[str]:
    """The layers a probe callback names: ``"name#k"`` (the k-th call of a module), any
    module by its exact name, or names and globs over the convolutions ``convs``.

    Raises:
        ValueError: a name or pattern matches nothing (the convolutions are listed).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> resolve_probe_layers(net, ["1", "2", "1#1", "*"], ["0", "2"])
        ['1', '2', '1#1', '0']
    """
    modules = dict(model.named_modules())
    names: list[str] = []
    for pattern in patterns:
        base = _CALL.match(pattern)
        if base and base["name"] in modules and base["name"]:
            hits = [pattern]
        elif pattern in modules and pattern and pattern not in convs:
            hits = [pattern]
        else:
            hits = resolve_layers(model, pattern, convs, what="convolutions")
        names.extend(h for h in hits if h not in names)
    return names


@contextmanager
def _record_calls(model: nn.Module, names: Iterable[str], order: list[str]):
    modules = dict(model.named_modules())
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(module, args):
            if name not in order:
                order.append(name)

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(make_hook(name)))
        yield order
    finally:
        for h in handles:
            h.remove()


def execution_order(
    model: nn.Module,
    example: torch.Tensor,
    names: Iterable[str] | None = None,
    *,
    forward: Callable[[torch.Tensor], object] | None = None,
) -> list[str]:
    """Names of ``names`` (default: all modules) in the order a forward pass first calls them.

    The pass runs under :func:`lightning_vis.isolation.isolated`, so the model's mode,
    buffers and the RNG states are left as found.

    Example::

        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.late = nn.Conv2d(8, 8, 3)   # registered first ...
        ...         self.early = nn.Conv2d(3, 8, 3)  # ... applied first
        ...     def forward(self, x):
        ...         return self.late(self.early(x))
        >>> execution_order(Net(), torch.zeros(1, 3, 8, 8), ["late", "early"])
        ['early', 'late']
    """
    from lightning_vis.isolation import isolated

    model = unwrap_model(model)
    names = [n for n, _ in model.named_modules() if n] if names is None else list(names)
    order: list[str] = []
    with isolated(model), torch.no_grad(), eager_forward(model), _record_calls(model, names, order):
        (forward or model)(example)
    return order


def first_conv(model: nn.Module, example: torch.Tensor, *, forward: Callable | None = None) -> str:
    """The name of the first convolution the input passes through (by execution, not registration).

    Raises:
        ValueError: ``model`` has no convolution, or the forward pass calls none.
    """
    convs = list(conv_layers(unwrap_model(model)))
    if not convs:
        raise ValueError(f"{type(model).__name__} has no convolution (no torch.nn.Conv1d/2d/3d module)")
    order = execution_order(model, example, convs, forward=forward)
    if not order:
        raise ValueError(
            f"A forward pass of {type(model).__name__} called none of its convolutions: {_quote_list(convs)}"
        )
    return order[0]
