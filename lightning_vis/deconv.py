"""DeconvNet projections (Zeiler & Fergus 2014), guided backpropagation and saliency.

:func:`project` sends the strongest activation of each of the top-k channels of a layer
back to pixel space: one forward pass stopped at the layer, one batched backward
(``torch.autograd.grad`` under ``torch.func.vmap``: the rows are folded into the batch of
each backward kernel; ``is_grads_batched=True`` is the fallback, it loops over rows in
convolutions), never a Python loop over units.
Rectifier rules are applied to every call form of the activation (modules, reused
modules, in-place calls, ``F.relu`` / ``torch.relu`` / ``Tensor.relu_`` inside
``forward``) through :func:`lightning_vis.sites.intercept_activations`.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_vis.isolation import isolated
from lightning_vis.layers import eager_forward, unwrap_model
from lightning_vis.sites import RECTIFIERS, ActivationCall, intercept_activations

__all__ = ["METHODS", "Projection", "project"]

#: The projection methods and what each does at a rectifying activation.
METHODS = {
    "deconvnet": "DeconvNet: rectifier backward = max(R, 0) (the forward mask is ignored)",
    "guided": "guided backpropagation: rectifier backward = max(R, 0) * f'(x) * [x > 0]",
    "saliency": "saliency: plain gradient (autograd everywhere)",
}

#: Elements of backward signal the batched backward may hold at once (2**25: 128 MB in
#: float32; the backward's peak is a small multiple of it), see ``max_rows``. Keeps a
#: projection's extra memory within the probe budget (DESIGN: at most 10% or 256 MB on
#: top of a training step's peak).
_ROW_BUDGET = 2**25


@dataclass
class Projection:
    """The result of :func:`project`: ``N`` images × ``K`` units of one layer.

    Attributes:
        images: ``[N, K, C, H, W]`` raw signed projections in input space (seeded with
            the unit's activation, so units are comparable).
        channels: ``[N, K]`` channel of each unit (top-k by maximum activation).
        locations: ``[N, K, 2]`` (row, col) of each unit in the layer's feature map.
        activations: ``[N, K]`` the unit's activation (the seed of the backward signal).
        layer: the layer projected from (``named_modules()`` name, ``#k`` for a call).
        method: ``"deconvnet"``, ``"guided"`` or ``"saliency"``.
        rule: the rule used at the activations, in words.
    """

    images: torch.Tensor
    channels: torch.Tensor
    locations: torch.Tensor
    activations: torch.Tensor
    layer: str
    method: str
    rule: str

    def __repr__(self) -> str:
        n, k = self.channels.shape
        return f"Projection(layer={self.layer!r}, method={self.method!r}, images={n}, units_per_image={k})"


class _Stop(Exception):
    """Raised by the forward hook at the target layer to end the forward pass there."""


# --------------------------------------------------------------------- rectifier rules
def _with_input(call: ActivationCall, x: torch.Tensor) -> tuple[tuple, dict]:
    """``call``'s arguments with its input replaced by ``x``."""
    if call.args:
        return (x, *call.args[1:]), dict(call.kwargs)
    return (), {**call.kwargs, "input": x}


def _run_out_of_place(call: ActivationCall, x: torch.Tensor) -> torch.Tensor:
    """The activation ``call`` applied to ``x`` without modifying ``x``."""
    args, kwargs = _with_input(call, x.clone() if call.inplace else x)
    return call.func(*args, **kwargs)


def _local_slope(call: ActivationCall, x: torch.Tensor) -> torch.Tensor:
    """f'(x) · [x > 0] for an elementwise activation (what guided backprop keeps)."""
    if call.kind == "relu":
        return (x > 0).to(x.dtype)
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        yy = _run_out_of_place(call, xx)
        (slope,) = torch.autograd.grad(yy, xx, torch.ones_like(yy))
    return slope * (x > 0)


class _Rectified(torch.autograd.Function):
    """Out-of-place activation whose backward is the deconvnet / guided rule."""

    @staticmethod
    def forward(ctx, x, call, guided):
        ctx.guided = guided
        if guided:
            ctx.save_for_backward(_local_slope(call, x))
        return _run_out_of_place(call, x)

    @staticmethod
    def backward(ctx, grad):
        out = grad.clamp(min=0)
        if ctx.guided:
            (slope,) = ctx.saved_tensors
            out = out * slope
        return out, None, None


class _RectifiedInplace(_Rectified):
    """In-place variant (``nn.ReLU(inplace=True)``, ``x.relu_()``): marks ``x`` dirty; same backward."""

    @staticmethod
    def forward(ctx, x, call, guided):
        ctx.guided = guided
        if guided:
            ctx.save_for_backward(_local_slope(call, x))
        call.run()  # modifies x in place
        ctx.mark_dirty(x)
        return x


def _rule_handler(method: str, sizes: list[int] | None = None):
    guided = method == "guided"

    def handler(call: ActivationCall) -> torch.Tensor:
        x = call.input
        if sizes is not None and isinstance(x, torch.Tensor):
            sizes.append(x.numel())
        if (
            method == "saliency"
            or call.kind not in RECTIFIERS
            or not isinstance(x, torch.Tensor)
            or not (x.requires_grad and torch.is_grad_enabled())
        ):
            return call.run()
        fn = _RectifiedInplace if call.inplace else _Rectified
        return fn.apply(x, call, guided)

    return handler


# --------------------------------------------------------------------- the forward pass
_CALL = re.compile(r"^(?P<name>.*)#(?P<index>\d+)$")


def _parse_layer(model: nn.Module, layer: str) -> tuple[str, nn.Module, int]:
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name (str), got {type(layer).__name__}: {layer!r}")
    match = _CALL.match(layer)
    name, index = (match["name"], int(match["index"])) if match else (layer, 0)
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        from lightning_vis.layers import _quote_list, conv_layers

        convs = list(conv_layers(model))
        others = [n for n in modules if n and n not in convs]
        raise ValueError(
            f"No module {name!r} in {type(model).__name__}; convolutions are: {_quote_list(convs)} "
            f"(any other module works too, e.g. {_quote_list(others[:5])})"
        )
    return name, modules[name], index


def _run_to_layer(model: nn.Module, x: torch.Tensor, layer: str, forward=None, context=None) -> object:
    """Run ``model`` on ``x`` until ``layer`` (``name`` or ``name#k``) has produced its output; that output.

    ``context``: a context manager entered around the forward pass (a function mode). The
    stopping hook is removed on exit, also on error.

    Raises:
        ValueError: the forward pass does not reach ``layer`` (its call count is given).
    """
    name, module, index = _parse_layer(model, layer)
    seen: list[object] = []
    calls = [0]

    def stop(mod, args, out):
        if calls[0] == index:
            seen.append(out)
            raise _Stop
        calls[0] += 1

    handle = module.register_forward_hook(stop)
    try:
        with eager_forward(model), (context if context is not None else contextlib.nullcontext()):
            (forward or model)(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError(
            f"Layer {layer!r} was not reached: the forward pass called {name!r} {calls[0]} time(s)"
            + ("" if calls[0] else "; it is not used by forward()")
        )
    return seen[0]


def _forward_to(model: nn.Module, x: torch.Tensor, layer: str, forward=None, handler=None) -> torch.Tensor:
    """:func:`_run_to_layer` with every rectifier call going through ``handler``; ``[N, C, H, W]``.

    Must be called inside :func:`~lightning_vis.isolation.isolated`. A layer output
    ``[N, C]`` is returned as ``[N, C, 1, 1]``.
    """
    out = _run_to_layer(model, x, layer, forward, intercept_activations(model, handler))
    if not isinstance(out, torch.Tensor) or out.ndim not in (2, 4):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"Layer {layer!r} must output a tensor [N, C, H, W] or [N, C], got {shape}")
    return out if out.ndim == 4 else out[:, :, None, None]


def _select_units(
    act: torch.Tensor, top_k: int, channels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channels ``[N, K]``, flat argmax positions ``[N, K]`` and seed values ``[N, K]``."""
    n, c = act.shape[:2]
    flat = act.detach().reshape(n, c, -1)
    peak, where = flat.max(dim=2)  # first maximal position on ties
    if channels is None:
        order = torch.sort(peak, dim=1, descending=True, stable=True).indices
        chosen = order[:, :top_k]
    else:
        chosen = channels.to(act.device)
        chosen = chosen[None].expand(n, -1) if chosen.ndim == 1 else chosen
    return chosen, where.gather(1, chosen), peak.gather(1, chosen)


def _batched_grad(act: torch.Tensor, x: torch.Tensor, grads: torch.Tensor) -> torch.Tensor | None:
    """``d act / d x`` for every row of ``grads`` in one batched backward (vector-Jacobian products).

    ``torch.func.vmap`` over ``torch.autograd.grad`` folds the rows into the batch of each
    backward kernel (one convolution-backward call per layer). ``is_grads_batched=True``
    (the legacy vmap, which loops over rows for convolutions) is the fallback.
    """

    def vjp(g: torch.Tensor) -> torch.Tensor | None:
        return torch.autograd.grad(act, x, g, retain_graph=True, allow_unused=True)[0]

    try:
        with warnings.catch_warnings():  # ops without a batching rule loop over rows: slower, still exact
            warnings.filterwarnings("ignore", message="There is a performance drop")
            out = torch.func.vmap(vjp)(grads)
    except RuntimeError:  # pragma: no cover - an op without a functorch batching rule
        out = torch.autograd.grad(act, x, grads, retain_graph=True, is_grads_batched=True, allow_unused=True)[0]
    return out


def _check_channels(channels, n: int, c: int) -> torch.Tensor:
    t = torch.as_tensor(channels)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim not in (1, 2) or t.numel() == 0:
        raise ValueError(f"channels must be a non-empty list of ints or an int tensor [K] or [N, K], got {channels!r}")
    if t.ndim == 2 and t.shape[0] != n:
        raise ValueError(f"channels of shape {tuple(t.shape)} must have one row per image ({n})")
    bad = t[(t < 0) | (t >= c)]
    if bad.numel():
        raise ValueError(f"channels {bad.tolist()} out of range: the layer has {c} channels (0..{c - 1})")
    return t.long()


def project(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    *,
    top_k: int = 9,
    channels: Sequence[int] | torch.Tensor | None = None,
    method: str = "deconvnet",
    max_rows: int | None = None,
    forward: Callable[[torch.Tensor], object] | None = None,
) -> Projection:
    """Project the top-k units of ``layer`` back to pixel space (DeconvNet, guided, saliency).

    For each image and each of its ``top_k`` most active channels (by maximum
    activation; ties go to the lower channel index, and within a map to the first
    position), only the single strongest activation of the channel's map is kept and
    sent back to the input, seeded with its value. Max-pooling routes the signal through
    its switches, convolutions through their transposes, BatchNorm (eval) scales it, and
    residual additions split it: that is what autograd does, no bias is added. What
    differs between methods is the rule at activations:

    * ``"deconvnet"``: every rectifier applies ReLU to the *backward signal*,
      ``max(R, 0)``, instead of its forward mask. This holds for the whole ReLU family
      and the smooth rectifiers alike: ReLU, ReLU6 (also as ``hardtanh(0, 6)``),
      LeakyReLU, PReLU, ELU, GELU, SiLU, Hardswish, Mish — none of them has a
      canonical DeconvNet rule, so the rule for ReLU is used (for ReLU6 the upper
      clip is ignored, as the forward mask is).
    * ``"guided"`` (Springenberg et al.): both the signal and the forward input must be
      positive: ``max(R, 0) · f'(x) · [x > 0]`` — for ReLU that is
      ``max(R, 0) · [x > 0]``; for the other rectifiers the true local slope is kept
      where the input is positive (ReLU6 also blocks above 6).
    * ``"saliency"`` (Simonyan et al.): the plain gradient.

    Bounded non-rectifiers (tanh, sigmoid, hardsigmoid, other hardtanh) use their
    plain gradient under every method. The rules are nonlinear in the seed only through
    its sign: a positive seed scales its projection, a unit whose strongest activation
    is ≤ 0 (a silent unit) projects to little or nothing under ``"deconvnet"`` and
    ``"guided"``.

    The forward pass stops at ``layer``; all N×K projections come from one batched
    backward where each batch row carries at most one seed per image (seeds never share
    a row, so the nonlinear rules cannot mix them), rows chunked to bound memory. Images
    do not interact (eval mode), so an image's projection does not depend on its
    batch-mates. Gradients are taken with respect to a copy of ``images`` only; the
    model runs under :func:`~lightning_vis.isolation.isolated` (eval mode, gradients on
    even inside ``torch.inference_mode``, autocast off, everything restored), and every
    hook and mode is removed afterwards, also on errors. The projection is computed in
    full fp32: TF32 is switched off for cuDNN convolutions and cuBLAS matmuls and the
    float32 matmul precision is ``"highest"`` inside (restored after), so on a GPU it
    gives the same units and values (within ~1e-4 relative) as on the CPU; with TF32 on
    (PyTorch's default for cuDNN) projections differ by up to ~20% of their maximum.
    Compiled and DDP-wrapped models are projected through their eager module.

    Args:
        model: the network (any ``nn.Module``; ``torch.compile`` / DDP wrappers unwrapped).
        images: ``[N, C, H, W]`` input batch (float).
        layer: ``named_modules()`` name of the layer (of the unwrapped model), or
            ``"name#k"`` for the k-th call (0-based) of a module used several times.
            Its output must be ``[N, C, H, W]`` (or ``[N, C]``).
        top_k: how many channels to project per image (1 ≤ top_k ≤ channels).
        channels: project these channels instead of the top-k: ints ``[K]`` (same for
            every image) or ``[N, K]``.
        method: ``"deconvnet"``, ``"guided"`` or ``"saliency"``.
        max_rows: at most this many backward rows at once (each row holds one unit of
            every image); default: as many as fit in about 2**25 elements of backward
            signal (4 × the largest activation map per row).
        forward: how to run ``model`` on the images (default ``model(images)``), e.g.
            for a ``forward`` that takes more arguments than the images.

    Returns:
        A :class:`Projection` (``images [N, K, C, H, W]``, ``channels [N, K]``,
        ``locations [N, K, 2]``, ``activations [N, K]``, ``layer``, ``method``, ``rule``).

    Raises:
        ValueError: unknown ``method`` or ``layer``, ``images`` not ``[N, C, H, W]`` or
            not fitting the model, ``top_k`` out of range, bad ``channels``.
        TypeError: ``images`` is not a floating-point tensor.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.stack([torch.ones(1, 3, 3), -torch.ones(1, 3, 3)]))
        >>> x = torch.zeros(1, 1, 6, 6)
        >>> x[0, 0, 2, 3] = 1.0
        >>> p = project(net, x, "0", top_k=1)
        >>> p.channels.tolist(), p.locations.tolist(), p.activations.tolist()
        ([[0]], [[[0, 1]]], [[1.0]])
        >>> p.images.shape
        torch.Size([1, 1, 1, 6, 6])
        >>> p.images[0, 0, 0, :3].tolist()
        [[0.0, 1.0, 1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]]
    """
    if method not in METHODS:
        raise ValueError(f"Invalid value for method={method!r}. Must be one of {', '.join(map(repr, METHODS))}")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a float tensor [N, C, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must have shape [N, C, H, W] with N >= 1, got {tuple(images.shape)}")
    if channels is None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"Invalid value for top_k={top_k!r}. Must be an int >= 1")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"Invalid value for max_rows={max_rows!r}. Must be an int >= 1 or None")
    model = unwrap_model(model)
    _parse_layer(model, layer)  # unknown layer: fail before any work
    param = next(model.parameters(), None)
    device = param.device if param is not None else images.device
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    n = images.shape[0]

    sizes: list[int] = []  # elements of each activation's input: the backward's working set per row
    with isolated(model):
        x = images.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
        try:
            act = _forward_to(model, x, layer, forward=forward, handler=_rule_handler(method, sizes))
        except RuntimeError as err:
            raise ValueError(
                f"The forward pass of {type(model).__name__} on images of shape {tuple(images.shape)} "
                f"failed (do the images fit the model?): {err}"
            ) from err
        c = act.shape[1]
        if channels is not None:
            chosen_channels = _check_channels(channels, n, c)
        elif top_k > c:
            raise ValueError(f"Invalid value for top_k={top_k}. Layer {layer!r} has {c} channels: must be <= {c}")
        else:
            chosen_channels = None
        if not act.requires_grad:
            raise ValueError(f"The output of layer {layer!r} does not depend on the input images")
        chans, where, seeds = _select_units(act, top_k, chosen_channels)
        k = chans.shape[1]
        width = act.shape[3]

        # grad_outputs: row j carries unit j of every image (one seed per image per row)
        per_row = 4 * max(x.numel(), act.numel(), *sizes)  # a few live signals of the largest map
        rows = max_rows or max(1, _ROW_BUDGET // per_row)
        rows = min(rows, k)
        batch = torch.arange(n, device=act.device)
        flat_act = act.reshape(n, c, -1)
        out = torch.empty((k, *x.shape), dtype=x.dtype, device=x.device)
        for start in range(0, k, rows):
            stop = min(k, start + rows)
            grads = torch.zeros((stop - start, *flat_act.shape), dtype=act.dtype, device=act.device)
            j = torch.arange(stop - start, device=act.device)[:, None].expand(-1, n)
            grads[j, batch.expand(stop - start, -1), chans[:, start:stop].T, where[:, start:stop].T] = seeds[
                :, start:stop
            ].T.to(act.dtype)
            g = _batched_grad(act, x, grads.view(stop - start, *act.shape))
            if g is None:
                out[start:stop].zero_()
            else:
                out[start:stop] = g
        del act, flat_act, x
    locations = torch.stack([where // width, where % width], dim=-1)
    return Projection(
        images=out.transpose(0, 1).detach(),
        channels=chans.detach(),
        locations=locations.detach(),
        activations=seeds.detach().clone(),
        layer=layer,
        method=method,
        rule=METHODS[method],
    )
