"""Receptive fields traced from the network: the exact input region of every unit of a layer.

:func:`receptive_field` follows the geometry of every tensor through one real forward
pass with a :class:`torch.overrides.TorchFunctionMode` (convolutions, pooling, padding,
slicing, residual additions as the union over paths, concatenations), so residual nets
and unusual pooling come out right, not from hard-coded layer lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_vis.deconv import _parse_layer, _run_to_layer
from lightning_vis.isolation import isolated
from lightning_vis.layers import unwrap_model

__all__ = ["ReceptiveField", "receptive_field"]


# ============================================================================ receptive fields
@dataclass(frozen=True)
class ReceptiveField:
    """The input region of every unit of a layer (DESIGN "Second wave: conventions").

    Unit ``(i, j)`` of the layer's map covers input rows ``offset[0] + i·stride[0]`` …
    ``offset[0] + i·stride[0] + size[0] − 1`` and the columns likewise. ``offset`` is
    negative where the field reaches into padding; boxes are not clipped to the image.
    A stride of 0 means every unit sees the same region (e.g. after global pooling).

    Attributes:
        size: ``(h, w)`` of the field in input pixels.
        stride: ``(h, w)`` input pixels between neighbouring units.
        offset: ``(h, w)`` input row/column of the first pixel of unit (0, 0)'s field.
        layer: the layer (``named_modules()`` name, ``#k`` for a call of a reused module).
        input_size: ``(H, W)`` of the input the field was traced with.
        output_size: ``(h, w)`` of the layer's feature map for that input.
        channels: the layer's number of channels.
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]
    layer: str = ""
    input_size: tuple[int, int] = (0, 0)
    output_size: tuple[int, int] = (0, 0)
    channels: int = 0

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` of unit ``(i, j)``'s field, bottom/right exclusive, not clipped.

        Example::

            >>> ReceptiveField(size=(3, 3), stride=(2, 2), offset=(-1, -1)).box(1, 2)
            (1, 3, 4, 6)
        """
        top = self.offset[0] + i * self.stride[0]
        left = self.offset[1] + j * self.stride[1]
        return top, left, top + self.size[0], left + self.size[1]

    def boxes(self, locations: torch.Tensor) -> torch.Tensor:
        """Boxes ``[..., 4]`` (top, left, bottom, right) for locations ``[..., 2]`` (row, col)."""
        loc = torch.as_tensor(locations).long()
        top = self.offset[0] + loc[..., 0] * self.stride[0]
        left = self.offset[1] + loc[..., 1] * self.stride[1]
        return torch.stack([top, left, top + self.size[0], left + self.size[1]], dim=-1)


class _Lost:
    """Geometry that cannot be described by (stride, offset, size): why, for the error message."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


_Axis = tuple[int, int, int]  # (stride, offset, size) along one spatial axis


def _union_axis(a: _Axis, b: _Axis, n: int) -> _Axis | None:
    """The union of two fields along an axis of ``n`` units; ``None`` when not affine."""
    (sa, oa, ka), (sb, ob, kb) = a, b
    if sa == sb or n == 1:
        lo, hi = min(oa, ob), max(oa + ka, ob + kb)
        return max(sa, sb), lo, hi - lo
    if sa == 0 or sb == 0:
        (sc, oc, kc), (sm, om, km) = (a, b) if sa == 0 else (b, a)
        if oc <= om and oc + kc >= om + (n - 1) * sm + km:  # the fixed region holds every moving one
            return 0, oc, kc
        if om + (n - 1) * sm <= oc and oc + kc <= om + km:  # every moving field holds the fixed one
            return sm, om, km
    return None


def _conv_axis(a: _Axis, kernel: int, stride: int, pad: int, dilation: int) -> _Axis:
    s, o, k = a
    return s * stride, o - pad * s, k + (kernel - 1) * dilation * s


def _pair(value: Any, n: int = 2) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    return value * n if len(value) == 1 else value


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, Mapping):
        return [t for item in tree.values() for t in _tensors(item)]
    return []


def _name(func: Any) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


# functions that move pixels around while keeping the shape: exact only when they leave
# the last two (spatial) dimensions alone
_REORDERING = {"flip", "fliplr", "flipud", "roll", "rot90", "transpose", "transpose_", "permute", "swapaxes",
               "swapdims", "swapaxes_", "swapdims_", "movedim", "moveaxis", "t", "t_", "index_select", "gather",
               "take_along_dim", "scatter", "scatter_", "scatter_add", "take", "masked_select", "grid_sample",
               "unfold", "as_strided", "diagonal", "tril", "triu"}  # fmt: skip


class _GeometryMode(TorchFunctionMode):
    """Follows the receptive-field geometry of every tensor computed from the traced input."""

    def __init__(self) -> None:
        super().__init__()
        self._geom: dict[int, tuple[torch.Tensor, Any]] = {}  # id -> (tensor kept alive, geometry)

    def track(self, t: torch.Tensor, geom: Any) -> None:
        self._geom[id(t)] = (t, geom)

    def geometry(self, t: Any) -> Any:
        entry = self._geom.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    # --------------------------------------------------------------------- dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in _tensors(args) + _tensors(kwargs) if self.geometry(t) is not None]
        if not inputs:
            return out
        outs = _tensors(out)
        if _name(func) == "__setitem__" and args:
            outs = [args[0]]
        if not outs:
            return out
        try:
            geom = self._rule(func, args, kwargs, inputs, outs[0])
        except Exception as err:  # noqa: BLE001 - a rule that does not apply: lose the geometry, say why
            geom = _Lost(f"{_name(func)} ({type(err).__name__}: {err})")
        for t in outs:
            if isinstance(geom, _Lost) or t.ndim >= 3:
                self.track(t, geom)
            else:
                self.track(t, _Lost(f"{_name(func)} returned a tensor of shape {tuple(t.shape)} (no spatial dims)"))
        return out

    def _rule(self, func, args, kwargs, inputs, out: torch.Tensor) -> Any:
        name = _name(func)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        gx = self.geometry(x)
        if isinstance(gx, _Lost):
            return gx
        if x is not None and gx is not None and x.ndim >= 3 and out.ndim == x.ndim:
            spatial = self._spatial_rule(func, name, args, kwargs, x, gx, out)
            if spatial is not None:
                return spatial
        if name in _REORDERING and not self._spares_spatial(name, args, kwargs, x):
            return _Lost(f"{name} rearranges the spatial dimensions")
        return self._elementwise(name, inputs, out)

    @staticmethod
    def _spares_spatial(name: str, args: tuple, kwargs: dict, x: torch.Tensor | None) -> bool:
        """True when a reordering op provably leaves the last two dimensions alone."""
        if x is None or x.ndim < 3:
            return False
        nd = x.ndim
        if name in ("transpose", "transpose_", "swapaxes", "swapdims", "swapaxes_", "swapdims_"):
            dims = [_arg(args, kwargs, 1, "dim0"), _arg(args, kwargs, 2, "dim1")]
        elif name == "permute":
            perm = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else args[1]
            perm = [d % nd for d in _pair(perm, 1)]
            return perm[-2:] == [nd - 2, nd - 1]
        elif name in ("flip", "roll", "index_select"):
            dims = _arg(args, kwargs, 1 if name != "roll" else 2, "dims" if name != "index_select" else "dim")
            if dims is None:
                return False
            dims = list(_pair(dims, 1))
        else:
            return False
        if any(d is None for d in dims):
            return False
        return all(d % nd < nd - 2 for d in dims)

    def _elementwise(self, name: str, inputs: list[torch.Tensor], out: torch.Tensor) -> Any:
        """Output unit (i, j) depends on unit (i, j) of each input (broadcast: on its single unit)."""
        if out.ndim < 3:
            return _Lost(f"{name} returned a tensor of shape {tuple(out.shape)} (no spatial dims)")
        result: list[_Axis] | None = None
        for t in inputs:
            g = self.geometry(t)
            if isinstance(g, _Lost):
                return g
            if t.ndim < 3:
                return _Lost(f"{name} mixes in a tensor of shape {tuple(t.shape)}")
            axes = []
            for d, ax in zip((-2, -1), g):
                n_in, n_out = t.shape[d], out.shape[d]
                if n_in == n_out:
                    axes.append(ax)
                elif n_in == 1:  # broadcast: every output unit sees this tensor's single unit
                    axes.append((0, ax[1], ax[2]))
                elif n_out == 1:  # reduced over the axis: the union of all its units
                    axes.append((ax[0], ax[1], ax[2] + (n_in - 1) * ax[0]))
                else:
                    return _Lost(f"{name} maps a spatial size {n_in} to {n_out}")
            if result is None:
                result = axes
            else:
                merged = [_union_axis(a, b, out.shape[d]) for a, b, d in zip(result, axes, (-2, -1))]
                if any(m is None for m in merged):
                    return _Lost(f"{name} joins paths whose fields do not move together (strides {result} vs {axes})")
                result = merged
        return tuple(result)

    def _spatial_rule(self, func, name, args, kwargs, x, gx, out) -> Any:
        """Convolution, pooling, padding and slicing; ``None`` for anything else."""
        if func in _CONV:
            weight = _arg(args, kwargs, 1, "weight")
            stride = _pair(_arg(args, kwargs, 3, "stride", 1))
            padding = _arg(args, kwargs, 4, "padding", 0)
            dilation = _pair(_arg(args, kwargs, 5, "dilation", 1))
            kernel = tuple(weight.shape[-2:])
            if isinstance(padding, str):
                padding = (0, 0) if padding == "valid" else tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
            padding = _pair(padding)
            return tuple(_conv_axis(a, *p) for a, p in zip(gx, zip(kernel, stride, padding, dilation)))
        if func in _POOL:
            kind = _POOL[func]
            if kind == "lp":  # lp_pool2d(input, norm_type, kernel_size, stride=None, ceil_mode=False)
                kernel = _pair(_arg(args, kwargs, 2, "kernel_size"))
                stride, padding, dilation = _arg(args, kwargs, 3, "stride"), 0, 1
            else:  # max/avg_pool2d(input, kernel_size, stride=None, padding=0, [dilation (max)], ...)
                kernel = _pair(_arg(args, kwargs, 1, "kernel_size"))
                stride = _arg(args, kwargs, 2, "stride")
                padding = _arg(args, kwargs, 3, "padding", 0)
                dilation = _arg(args, kwargs, 4, "dilation", 1) if kind == "max" else 1
            stride = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _pair(stride)
            return tuple(
                _conv_axis(a, *p) for a, p in zip(gx, zip(kernel, stride, _pair(padding), _pair(dilation)))
            )
        if func in _ADAPTIVE:
            axes = []
            for a, n_in, n_out in zip(gx, x.shape[-2:], out.shape[-2:]):
                if n_in % n_out:
                    return _Lost(f"{name} from {n_in} to {n_out} (bins of unequal size)")
                k = n_in // n_out
                axes.append(_conv_axis(a, k, k, 0, 1))
            return tuple(axes)
        if func in _PAD:
            pad = list(_arg(args, kwargs, 1, "pad"))
            left, top = (pad + [0, 0, 0, 0])[0], (pad + [0, 0, 0, 0])[2]
            (sh, oh, kh), (sw, ow, kw) = gx
            return (sh, oh - top * sh, kh), (sw, ow - left * sw, kw)
        if name == "__getitem__":
            return self._slice_rule(args[1], x, gx)
        return None

    @staticmethod
    def _slice_rule(index: Any, x: torch.Tensor, gx: Any) -> Any:
        index = index if isinstance(index, tuple) else (index,)
        if not all(isinstance(i, slice) or i is Ellipsis or i is None for i in index):
            return None
        if any(i is None for i in index):
            return None
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (x.ndim - len(index) + 1) + index[at + 1 :]
        index = index + (slice(None),) * (x.ndim - len(index))
        axes = []
        for sl, n, (s, o, k) in zip(index[-2:], x.shape[-2:], gx):
            start, _, step = sl.indices(n)
            axes.append((s * step, o + start * s, k))
        return tuple(axes)


_CONV = {torch.conv2d, F.conv2d}
_POOL = {
    F.max_pool2d: "max",
    F.max_pool2d_with_indices: "max",
    torch.max_pool2d: "max",
    F.avg_pool2d: "avg",
    torch._C._nn.avg_pool2d: "avg",
    F.lp_pool2d: "lp",
}
_ADAPTIVE = {
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool2d_with_indices,
    torch._C._nn.adaptive_avg_pool2d,
    torch._C._nn.adaptive_max_pool2d,
}
_PAD = {F.pad, torch._C._nn.pad}


def _layer_output(
    model: nn.Module, x: torch.Tensor, layer: str, forward: Callable | None, mode: TorchFunctionMode | None = None
) -> torch.Tensor:
    """``model`` run on ``x`` until ``layer`` (``name`` or ``name#k``) has produced its feature map."""
    out = _run_to_layer(model, x, layer, forward, mode)
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"Layer {layer!r} must output a feature map [N, C, H, W], got {shape}")
    return out


def _model_device_dtype(model: nn.Module, fallback: torch.Tensor | None = None) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    device = param.device if param is not None else (fallback.device if fallback is not None else torch.device("cpu"))
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return device, dtype


def _check_input_shape(input_shape: Any) -> tuple[int, int, int]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else None
    if (
        shape is None
        or len(shape) not in (3, 4)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W) of positive ints, got {input_shape!r}")
    return shape[-3:]  # type: ignore[return-value]


def receptive_field(
    model: nn.Module,
    layer: str,
    input_shape: Sequence[int],
    *,
    forward: Callable[[torch.Tensor], object] | None = None,
) -> ReceptiveField:
    """The exact input region of every unit of ``layer``, traced from the network.

    One forward pass of a zero image of ``input_shape`` runs under a
    :class:`torch.overrides.TorchFunctionMode` that follows, for every tensor computed
    from the input, the field of its units along each spatial axis as
    ``(stride, offset, size)``: convolutions (stride, padding including ``"same"``,
    dilation), max/avg/LP pooling (overlapping windows and ``ceil_mode`` need nothing
    special: the last window simply reaches further into the padding), adaptive pooling
    with equal bins, ``F.pad`` and slicing compose it; elementwise operations (activations,
    BatchNorm, dropout, products) keep it; additions and concatenations take the union
    over their inputs (residual and dense paths); broadcasting a 1×1 map (squeeze-
    excitation gates) adds its region to every unit. The pass stops at ``layer`` and runs
    under :func:`~lightning_vis.isolation.isolated`. Non-constant padding modes
    (reflect, replicate) are treated like zero padding.

    Args:
        model: the network (``torch.compile`` / DDP wrappers are unwrapped).
        layer: ``named_modules()`` name (or ``"name#k"`` for the k-th call of a reused module);
            its output must be ``[N, C, H, W]``.
        input_shape: ``(C, H, W)`` or ``(N, C, H, W)`` of the input images.
        forward: how to run ``model`` on images (default ``model(images)``).

    Returns:
        A :class:`ReceptiveField` (``size``, ``stride``, ``offset``, ``box(i, j)``).

    Raises:
        ValueError: unknown layer, bad ``input_shape``, a layer output that is not a
            feature map, or a field that is not a fixed window (e.g. bilinear upsampling,
            adaptive pooling into unequal bins), naming the operation that broke it.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3))
        >>> rf = receptive_field(net, "3", (3, 16, 16))
        >>> rf.size, rf.stride, rf.offset
        ((8, 8), (2, 2), (-1, -1))
        >>> rf.box(0, 1)
        (-1, 1, 7, 9)
    """
    c, h, w = _check_input_shape(input_shape)
    model = unwrap_model(model)
    _parse_layer(model, layer)
    device, dtype = _model_device_dtype(model)
    mode = _GeometryMode()
    with isolated(model), torch.no_grad():
        x = torch.zeros((1, c, h, w), device=device, dtype=dtype)
        mode.track(x, ((1, 0, 1), (1, 0, 1)))
        try:
            out = _layer_output(model, x, layer, forward, mode)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"The forward pass of {type(model).__name__} on an input of shape {(1, c, h, w)} failed: {err}"
            ) from err
    geom = mode.geometry(out)
    if geom is None:
        raise ValueError(f"The output of layer {layer!r} does not depend on the input")
    if isinstance(geom, _Lost):
        raise ValueError(
            f"Layer {layer!r} has no fixed receptive field (each unit a window of the same size and "
            f"stride): lost at {geom.reason}"
        )
    (sh, oh, kh), (sw, ow, kw) = geom
    return ReceptiveField(
        size=(kh, kw),
        stride=(sh, sw),
        offset=(oh, ow),
        layer=layer,
        input_size=(h, w),
        output_size=(int(out.shape[-2]), int(out.shape[-1])),
        channels=int(out.shape[1]),
    )
