"""Class attribution maps: which pixels drive a class score.

:func:`attribute` sends a *class score* back to pixel space, as :func:`lightning_vis.project`
sends a unit: the CAM family (CAM, Grad-CAM, Grad-CAM++, Score-CAM), gradient methods
(saliency, guided backpropagation, guided Grad-CAM) and occlusion, for a whole batch at
once. Activations are captured with forward hooks and gradients taken with
``torch.autograd.grad`` with respect to the captured activation or the input (never
backward hooks, never ``.backward()`` into the parameters); Score-CAM's masked inputs and
occlusion's windows go through the model in bounded chunks of images × masks, under
``no_grad``. Everything runs under :func:`~lightning_vis.isolation.isolated`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_vis.deconv import _parse_layer, _rule_handler
from lightning_vis.isolation import isolated
from lightning_vis.layers import eager_forward, unwrap_model
from lightning_vis.sites import intercept_activations

__all__ = ["CAM_METHODS", "METHODS", "Attribution", "attribute", "default_cam_layer", "gradcam_plus_plus_weights"]

#: The attribution methods, in words.
METHODS = {
    "cam": "CAM (Zhou et al.): ReLU(sum_k w[c,k] A_k), w the weights of the linear layer after global average pooling",
    "gradcam": "Grad-CAM (Selvaraju et al.): ReLU(sum_k mean(dS/dA_k) A_k)",
    "gradcam++": "Grad-CAM++ (Chattopadhay et al., eq. 19): ReLU(sum_k (sum alpha ReLU(dS/dA_k)) A_k)",
    "scorecam": "Score-CAM (Wang et al.): ReLU(sum_k softmax_k(S(X * mask_k)) A_k), masks = min-max normalised A_k",
    "saliency": "saliency (Simonyan et al.): max over colour channels of |dS/dX|",
    "guided": "guided backpropagation (Springenberg et al.): max over colour channels of |guided dS/dX|",
    "guided-gradcam": "guided Grad-CAM (Selvaraju et al.): max over colour channels of |guided dS/dX * Grad-CAM|",
    "occlusion": "occlusion (Zeiler & Fergus; Captum's definition): mean of S(X) - S(X with a window set to the "
    "baseline) over the windows covering each pixel",
}
#: Methods that work on a layer's activations (and take ``layer=``).
CAM_METHODS = ("cam", "gradcam", "gradcam++", "scorecam", "guided-gradcam")
#: Extra keyword options each method takes.
_OPTIONS = {"scorecam": ("batch_size",), "occlusion": ("patch", "stride", "baseline", "batch_size")}
#: Elements of input one chunk of masked / occluded images may hold: 64 MB in float32 on an
#: accelerator (large batches hide launch overheads); on the CPU 512 KB but at least 16
#: images (measured: the time per image is lowest for chunks whose activations still fit
#: the caches — 64 images of 32×32, 16 of 64×64 or 112×112 — and grows by a third beyond);
#: at most 1024 images.
_CHUNK_ELEMENTS = 2**24
_CPU_CHUNK_ELEMENTS = 2**17
_CPU_MIN_CHUNK = 16
_MAX_CHUNK = 1024


@dataclass
class Attribution:
    """The result of :func:`attribute` for ``N`` images.

    Attributes:
        maps: ``[N, H, W]`` float maps at the input's resolution, unnormalised (CAM family
            rectified, so ``>= 0``; occlusion signed).
        targets: ``[N]`` the class each map explains (the predicted class when
            ``targets=None``).
        scores: ``[N]`` the target's score (logit) on the unmodified image.
        logits: ``[N, classes]`` the class scores of the unmodified images.
        method: the method's name.
        layer: the layer of the CAM methods (``named_modules()`` name, ``#k`` for a call),
            ``None`` for the others.
        pixels: ``[N, C, H, W]`` signed input-space attribution before the reduction over
            colour channels (``"saliency"``, ``"guided"``, ``"guided-gradcam"``), else ``None``.
    """

    maps: torch.Tensor
    targets: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor
    method: str
    layer: str | None
    pixels: torch.Tensor | None = None

    def __repr__(self) -> str:
        n, h, w = self.maps.shape
        return f"Attribution(method={self.method!r}, layer={self.layer!r}, images={n}, size=({h}, {w}))"


# --------------------------------------------------------------------------- helpers
def _conv_bearing(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if name and any(isinstance(s, nn.modules.conv._ConvNd) for s in m.modules())
    }


def default_cam_layer(model: nn.Module, example: torch.Tensor, *, forward: Callable | None = None) -> str:
    """The default layer of the CAM methods: the last convolution-bearing layer with a spatial output.

    A module is convolution-bearing when it is, or contains, a convolution. On a forward
    pass of ``example[:1]`` (under :func:`~lightning_vis.isolation.isolated` and
    ``no_grad``), the module whose call *finishes* last among those returning a
    ``[N, C, h, w]`` tensor with ``h·w > 1`` is chosen (a container that ends where its
    last block ends wins: ResNet's ``layer4``, VGG's ``features``). A module called
    several times is named ``name#k`` for its k-th call.

    Raises:
        ValueError: the model has no convolution, or no such layer is reached.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> default_cam_layer(net, torch.zeros(1, 3, 8, 8))
        '2'
    """
    model = unwrap_model(model)
    with isolated(model), _capture(model, None, grad=False) as found, torch.no_grad(), eager_forward(model):
        (forward or model)(example[:1])
    return found.layer


def _class_scores(output: Any, score: Callable | None, n: int, model: nn.Module) -> torch.Tensor:
    """The class scores ``[N, classes]`` of a forward's output (``score(output)`` when given)."""
    logits = score(output) if score is not None else output
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != n:
        what = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        if score is not None:
            raise ValueError(f"score(output) must return class scores [N, classes] = [{n}, classes], got {what}")
        raise ValueError(
            f"The output of {type(model).__name__} is {what}, not class scores [N, classes] = [{n}, classes]; "
            "pass score=<callable(output) -> tensor [N, classes]>"
        )
    return logits


def _check_targets(targets: Any, n: int) -> torch.Tensor | None:
    """``targets`` as an int64 tensor ``[N]`` (range checked later), or ``None``."""
    if targets is None:
        return None
    if isinstance(targets, bool) or (isinstance(targets, torch.Tensor) and targets.dtype == torch.bool):
        raise TypeError(f"targets must be an int, a sequence of N ints or an int tensor [N], got {targets!r}")
    if isinstance(targets, int):
        return torch.full((n,), targets, dtype=torch.long)
    try:
        t = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"targets must be an int, a sequence of N ints or an int tensor [N], got {targets!r}") from err
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"targets must be integers, got {t.dtype}: {targets!r}")
    if t.ndim == 0:
        return t.long().expand(n).clone()
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"targets must have one class per image: expected {n}, got shape {tuple(t.shape)}")
    return t.long().cpu()


def _resolve_targets(targets: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    classes = logits.shape[1]
    if targets is None:
        return logits.detach().argmax(dim=1)
    bad = targets[(targets < 0) | (targets >= classes)]
    if bad.numel():
        raise ValueError(f"targets {bad.tolist()} out of range: the model has {classes} classes (0..{classes - 1})")
    return targets.to(logits.device)


def _pick(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, targets[:, None]).squeeze(1)


def _pair(value: Any, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)
    ):
        raise ValueError(f"Invalid value for {name}={value!r}. Must be an int >= 1 or a pair (height, width) of them")
    return int(pair[0]), int(pair[1])


def _chunk_rows(option: Any, per_row: int, device: torch.device) -> int:
    if option is None:
        if device.type == "cpu":
            return max(_CPU_MIN_CHUNK, min(_MAX_CHUNK, _CPU_CHUNK_ELEMENTS // max(1, per_row)))
        return max(1, min(_MAX_CHUNK, _CHUNK_ELEMENTS // max(1, per_row)))
    if isinstance(option, bool) or not isinstance(option, int) or option < 1:
        raise ValueError(f"Invalid value for batch_size={option!r}. Must be an int >= 1 or None")
    return option


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[N, h, w]`` → ``[N, H, W]``, bilinear, ``align_corners=False``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _weighted(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """ReLU(Σ_k w_k A_k): ``[N, K]`` × ``[N, K, h, w]`` → ``[N, h, w]``."""
    return torch.einsum("nk,nkhw->nhw", weights, acts).clamp(min=0)


def gradcam_plus_plus_weights(grads: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ channel weights (Chattopadhay et al., eq. 19), ``[N, K, h, w]`` → ``[N, K]``.

    ``α = g² / (2g² + Σ_ab A_ab · g³)`` (``α = 0`` where the denominator is 0, which
    includes every ``g = 0``), ``w_k = Σ_ij α_ij · ReLU(g_ij)``.

    Example::

        >>> g = torch.tensor([[[[1.0, -1.0], [0.0, 2.0]]]])
        >>> a = torch.tensor([[[[1.0, 0.0], [2.0, 1.0]]]])   # Σ A = 4
        >>> gradcam_plus_plus_weights(g, a)   # 1·1/(2+4) + 0 + 0 + 2·4/(8+32)
        tensor([[0.3667]])
    """
    g2 = grads * grads
    denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g2 * grads
    nonzero = denom != 0
    alpha = torch.where(nonzero, g2 / torch.where(nonzero, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    return (alpha * grads.clamp(min=0)).sum(dim=(2, 3))


# --------------------------------------------------------------------------- forward passes
class _Captured:
    """What :func:`_capture` saw: the chosen layer's name and output, once the forward is done."""

    layer: str
    output: torch.Tensor


@contextmanager
def _capture(model: nn.Module, layer: str | None, grad: bool) -> Iterator[_Captured]:
    """Capture the output of ``layer`` (``name`` or ``name#k``) during the forward pass inside.

    ``layer=None``: the default layer, chosen in the same pass (:func:`default_cam_layer`'s
    rule: the last convolution-bearing module to finish with an output ``[N, C, h, w]``,
    ``h·w > 1``). With ``grad``, ``d score / d captured`` is one ``torch.autograd.grad``:
    for a named layer the captured tensor is a leaf and gradients are switched on after it
    (the forward runs under ``no_grad``: nothing before the layer is recorded); for the
    default layer it stays in the graph. Either way the forward continues on a copy, so
    later in-place operations cannot change it. Without ``grad``, it is a detached copy.
    """
    if layer is not None:
        name, module, index = _parse_layer(model, layer)
        watched = {name: module}
    else:
        watched, index = _conv_bearing(model), None
        if not watched:
            raise ValueError(
                f"{type(model).__name__} has no convolution: the CAM methods need a convolution-bearing layer "
                "with a spatial output [N, C, h, w] (pass layer=...)"
            )
    counts: dict[str, int] = {}
    seen: list[tuple[str, int, Any]] = []  # (name, call, tensor or what it was instead), in completion order

    def make_hook(name: str) -> Callable:
        def hook(mod, args, out):
            i = counts.get(name, 0)
            counts[name] = i + 1
            if index is not None and i != index:
                return None
            if not isinstance(out, torch.Tensor) or out.ndim != 4 or not out.is_floating_point():
                seen.append((name, i, tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__))
                return None
            if index is None and out.shape[2] * out.shape[3] <= 1:
                seen.append((name, i, tuple(out.shape)))
                return None
            if grad and index is not None:  # the known layer: nothing before it needs a graph
                leaf = out.detach().requires_grad_(True)
                seen.append((name, i, leaf))
                torch.set_grad_enabled(True)  # the forward runs under no_grad, restored on its exit
                return leaf.clone()
            if grad:
                seen.append((name, i, out))
                return out.clone()
            seen.append((name, i, out.detach().clone()))
            return None

        return hook

    handles = []
    found = _Captured()
    try:
        for name, module in watched.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield found
    finally:
        for h in handles:
            h.remove()
    tensors = [(n, i, t) for n, i, t in seen if isinstance(t, torch.Tensor)]
    if layer is not None:
        if not seen:
            raise ValueError(
                f"Layer {layer!r} was not reached: the forward pass called {name!r} {counts.get(name, 0)} time(s)"
                + ("" if counts.get(name) else "; it is not used by forward()")
            )
        if not tensors:
            raise ValueError(
                f"Layer {layer!r} has no spatial output: the CAM methods need a float tensor [N, C, h, w], "
                f"got {seen[0][2]}"
            )
        found.layer, found.output = layer, tensors[0][2]
        return
    if not tensors:
        raise ValueError(
            f"No convolution-bearing layer of {type(model).__name__} returned a spatial output [N, C, h, w] "
            "with h*w > 1; outputs seen: " + (", ".join(f"{n!r} {s}" for n, _, s in seen) or "(none)")
        )
    name, i, found.output = tensors[-1]
    found.layer = name if counts[name] == 1 else f"{name}#{i}"


def _cam_forward(model, x, layer, forward, score, grad: bool):
    """One forward; returns (class scores [N, classes], activation [N, K, h, w], layer name)."""
    if grad and layer is None:
        x = x.detach().requires_grad_(True)  # a graph also when every parameter is frozen
    # a known layer: no graph before it (the capture hook turns gradients on after the layer)
    with _capture(model, layer, grad=grad) as found, torch.set_grad_enabled(grad and layer is None):
        with eager_forward(model):
            out = (forward or model)(x)
            logits = _class_scores(out, score, x.shape[0], model)
    return logits, found.output, found.layer


def _input_grad(model, x, forward, score, targets, guided: bool):
    """d score / d x for every image (one forward, one backward); rectifiers guided if asked."""
    x = x.detach().clone().requires_grad_(True)
    handler = _rule_handler("guided") if guided else None
    with intercept_activations(model, handler), eager_forward(model):
        logits = _class_scores((forward or model)(x), score, x.shape[0], model)
    t = _resolve_targets(targets, logits)
    scores = _pick(logits, t)
    if not scores.requires_grad:
        raise ValueError(f"The class scores of {type(model).__name__} do not depend on the input images")
    (g,) = torch.autograd.grad(scores.sum(), x, allow_unused=True)
    return (torch.zeros_like(x) if g is None else g), logits.detach(), t


# --------------------------------------------------------------------------- methods
def _gradcam(model, x, layer, forward, score, targets, plus: bool):
    logits, acts, layer = _cam_forward(model, x, layer, forward, score, grad=True)
    t = _resolve_targets(targets, logits)
    scores = _pick(logits, t)
    if not scores.requires_grad:
        raise ValueError(f"The class scores of {type(model).__name__} do not depend on layer {layer!r}")
    (g,) = torch.autograd.grad(scores.sum(), acts, allow_unused=True)
    g = torch.zeros_like(acts) if g is None else g
    acts = acts.detach()
    weights = gradcam_plus_plus_weights(g, acts) if plus else g.mean(dim=(2, 3))
    return _weighted(weights, acts), logits.detach(), t, layer


def _cam(model, x, layer, forward, score, targets):
    """CAM; with ``layer=None`` the layer is the last one whose global average is the head's input."""
    linears: list = []
    outputs: list = []  # (name, call index, output) of every module with a spatial output, in completion order
    counts: dict[str, int] = {}

    def record(mod, args, out, name):
        i = counts.get(name, 0)
        counts[name] = i + 1
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2] * out.shape[3] > 1:
            outputs.append((name, i, out.detach()))

    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=name: linears.append((n, mod, a[0].detach(), o.detach())))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    if layer is None:
        hooks += [
            m.register_forward_hook(lambda mod, a, o, n=name: record(mod, a, o, n))
            for name, m in model.named_modules()
            if name
        ]
    try:
        if layer is None:
            with torch.no_grad(), eager_forward(model):
                logits = _class_scores((forward or model)(x), score, x.shape[0], model)
        else:
            logits, acts, _ = _cam_forward(model, x, layer, forward, score, grad=False)
    finally:
        for h in hooks:
            h.remove()
    where = f"after layer {layer!r}" if layer is not None else "after a layer"
    what = f"method='cam' needs a global-average-pool -> linear head {where}"
    if not linears:
        raise ValueError(f"{what}, but {type(model).__name__} calls no torch.nn.Linear; use method='gradcam'")
    name, linear, z, out = linears[-1]

    def is_pooled(a: torch.Tensor) -> bool:
        pooled = a.mean(dim=(2, 3))
        tol = 1e-4 * max(1.0, float(pooled.abs().max()))
        return z.shape == pooled.shape and torch.allclose(z, pooled, rtol=1e-4, atol=tol)

    if layer is None:
        found = [(n, i, a) for n, i, a in outputs if is_pooled(a)]
        if not found:
            raise ValueError(
                f"{what}: the input {tuple(z.shape)} of the last Linear {name!r} is not the global average of any "
                f"layer's spatial output in {type(model).__name__}; use method='gradcam'"
            )
        found_name, index, acts = found[-1]
        layer = found_name if counts[found_name] == 1 else f"{found_name}#{index}"
    elif not is_pooled(acts):
        raise ValueError(
            f"{what}: the input of the last Linear {name!r} {tuple(z.shape)} is not the global average of the "
            f"layer's output {tuple(acts.shape)}; pass the layer whose output is averaged, or use method='gradcam'"
        )
    if out.shape != logits.shape or not torch.allclose(out, logits.detach(), rtol=1e-5, atol=1e-6):
        raise ValueError(f"{what}: the class scores are not the output of the last Linear {name!r}; use 'gradcam'")
    t = _resolve_targets(targets, logits)
    return _weighted(linear.weight.detach()[t].to(acts.dtype), acts), logits.detach(), t, layer


def _scorecam(model, x, layer, forward, score, targets, batch_size):
    logits, acts, layer = _cam_forward(model, x, layer, forward, score, grad=False)
    t = _resolve_targets(targets, logits)
    n, k = acts.shape[:2]
    size = tuple(x.shape[-2:])
    rows = _chunk_rows(batch_size, x[0].numel(), x.device)
    flat = acts.reshape(n * k, *acts.shape[2:])
    # a constant map (a dead channel: all zeros) gives an all-zero mask, so every such
    # image × channel scores the same blank image: one forward serves them all
    live = (flat.amax(dim=(1, 2)) > flat.amin(dim=(1, 2))).nonzero().squeeze(1)  # the one host sync
    with torch.no_grad(), eager_forward(model):
        if live.numel() < n * k:
            blank = _class_scores((forward or model)(torch.zeros_like(x[:1])), score, 1, model)
            out = blank[0, t.repeat_interleave(k)].to(logits.dtype)
        else:
            out = torch.empty(n * k, dtype=logits.dtype, device=logits.device)
        for start in range(0, live.numel(), rows):
            idx = live[start : start + rows]
            img = idx // k
            up = _upsample(flat[idx], size)  # [B, H, W]
            lo = up.amin(dim=(1, 2), keepdim=True)
            span = up.amax(dim=(1, 2), keepdim=True) - lo
            masks = torch.where(span > 0, (up - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
            masked = x[img] * masks[:, None]
            chunk = _class_scores((forward or model)(masked), score, masked.shape[0], model)
            out[idx] = _pick(chunk, t[img]).to(out.dtype)
    weights = torch.softmax(out.view(n, k), dim=1)
    return _weighted(weights.to(acts.dtype), acts), logits.detach(), t, layer


def _windows(size: int, patch: int, stride: int, device) -> torch.Tensor:
    """``[count, size]`` 0/1 rows, one per window position (Captum's: ⌈(D−w)/s⌉ + 1, the last cropped)."""
    count = math.ceil((size - patch) / stride) + 1
    pos = torch.arange(size, device=device)
    start = torch.arange(count, device=device)[:, None] * stride
    return ((pos >= start) & (pos < start + patch)).float()


def _occlusion(model, x, forward, score, targets, patch, stride, baseline, batch_size):
    n, c, h, w = x.shape
    ph, pw = _pair(patch if patch is not None else max(1, min(h, w) // 4), "patch")
    sh, sw = _pair(stride if stride is not None else max(1, min(ph, pw) // 2), "stride")
    if ph > h or pw > w:
        raise ValueError(f"Invalid value for patch=({ph}, {pw}): larger than the images ({h}, {w})")
    if sh > ph or sw > pw:
        raise ValueError(f"Invalid value for stride=({sh}, {sw}): must be <= patch ({ph}, {pw}) in each dimension")
    if isinstance(baseline, torch.Tensor):
        try:
            base = torch.broadcast_to(baseline.detach().to(device=x.device, dtype=x.dtype), x.shape)
        except RuntimeError as err:
            raise ValueError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the images {tuple(x.shape)}"
            ) from err
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        base = torch.full((1, 1, 1, 1), float(baseline), dtype=x.dtype, device=x.device)
    else:
        raise TypeError(f"baseline must be a number or a tensor broadcastable to the images, got {baseline!r}")
    rws, cls = _windows(h, ph, sh, x.device).to(x.dtype), _windows(w, pw, sw, x.device).to(x.dtype)
    nr, nc = rws.shape[0], cls.shape[0]
    rows = _chunk_rows(batch_size, x[0].numel(), x.device)
    with torch.no_grad(), eager_forward(model):
        logits = _class_scores((forward or model)(x), score, n, model)
        t = _resolve_targets(targets, logits)
        full = _pick(logits, t)
        diffs = torch.empty(n * nr * nc, dtype=full.dtype, device=full.device)
        total = n * nr * nc
        for start in range(0, total, rows):
            idx = torch.arange(start, min(total, start + rows), device=x.device)
            img, win = idx // (nr * nc), idx % (nr * nc)
            mask = (rws[win // nc][:, :, None] * cls[win % nc][:, None, :])[:, None]  # [B, 1, H, W]
            b = base[img] if base.shape[0] == n and base.shape[0] > 1 else base
            occluded = x[img] * (1 - mask) + b * mask
            chunk = _class_scores((forward or model)(occluded), score, occluded.shape[0], model)
            diffs[idx] = full[img] - _pick(chunk, t[img])
    d = diffs.view(n, nr, nc).to(x.dtype)
    summed = torch.einsum("ri,nrc,cj->nij", rws, d, cls)
    coverage = rws.sum(0)[:, None] * cls.sum(0)[None, :]
    return summed / coverage, logits, t


# --------------------------------------------------------------------------- entry point
def attribute(
    model: nn.Module,
    images: torch.Tensor,
    *,
    targets: int | Sequence[int] | torch.Tensor | None = None,
    method: str = "gradcam",
    layer: str | None = None,
    score: Callable[[Any], torch.Tensor] | None = None,
    forward: Callable[[torch.Tensor], Any] | None = None,
    **options: Any,
) -> Attribution:
    """Which pixels drive each image's class score: one attribution map per image.

    Methods (``S`` = the target class's logit, ``A_k`` = channel ``k`` of ``layer``'s
    output, ``g = dS/dA``; CAM maps are computed at the layer's resolution, rectified and
    upsampled bilinearly with ``align_corners=False`` to the input size):

    * ``"cam"`` (Zhou et al.): ``ReLU(Σ_k W[c, k] A_k)`` with ``W`` the weights of the
      last ``nn.Linear``, whose input must be the global average of ``layer``'s output
      and whose output must be the class scores (a clear error otherwise). On such a head
      it equals Grad-CAM times ``h·w``.
    * ``"gradcam"`` (Selvaraju et al.): ``ReLU(Σ_k mean_ij(g_k) A_k)`` with plain
      gradients. Captum's ``LayerGradCam`` omits the ReLU by default
      (``relu_attributions=False``); we follow the paper.
    * ``"gradcam++"``: weights of Chattopadhay et al. eq. 19 (see
      :func:`gradcam_plus_plus_weights`), α = 0 where g = 0, no epsilon.
    * ``"scorecam"`` (Wang et al.): each ``A_k`` upsampled and min-max normalised to
      [0, 1] is a mask (a constant map gives an all-zero mask, no NaN); the weights are
      the softmax over channels of ``S(X ∘ mask_k)``. The paper subtracts a baseline
      score ``S(X_b)`` first, which cancels inside the softmax (as in pytorch-grad-cam,
      which has no baseline; torch-cam's softmax of the difference is the same). The
      masked inputs of all images × channels go through the model in chunks of
      ``batch_size`` images; the channels whose map is constant at the layer (dead ReLU
      channels: many, in a trained network) all mask to the blank image, scored once.
      pytorch-grad-cam upsamples the masks with
      ``align_corners=True``; ours use ``align_corners=False`` like the final map.
    * ``"saliency"`` (Simonyan et al.): ``max_c |dS/dX_c|``.
    * ``"guided"``: guided backpropagation of ``S`` (every rectifier call form: modules,
      reused and in-place modules, ``F.relu`` / ``torch.relu`` / ``Tensor.relu_``), reduced
      as saliency: ``max_c |·|``.
    * ``"guided-gradcam"``: guided backpropagation times the (upsampled) Grad-CAM map,
      ``max_c |·|``. Grad-CAM itself uses plain gradients.
    * ``"occlusion"`` (Zeiler & Fergus, Captum's ``Occlusion`` definition): a
      ``patch``-sized window over all colour channels, moved by ``stride``
      (``⌈(D − patch)/stride⌉ + 1`` positions per side, the last one cropped at the
      border), is set to ``baseline``; a pixel's value is the mean of
      ``S(X) − S(X occluded)`` over the windows that cover it. Windows of all images run
      in chunks of ``batch_size`` under ``no_grad``.

    The model runs under :func:`~lightning_vis.isolation.isolated` (eval mode, gradients
    on even inside ``torch.inference_mode``, autocast off, modes, buffers, ``.grad`` and
    RNG restored); activations are captured with forward hooks, gradients are taken with
    ``torch.autograd.grad`` with respect to the captured activation or a copy of the
    images; hooks are removed afterwards, also on errors.

    Args:
        model: the network (``torch.compile`` / DDP wrappers unwrapped). Its output must
            be class scores ``[N, classes]``, or pass ``score``.
        images: ``[N, C, H, W]`` float images.
        targets: the class to explain: an int for every image, ``N`` ints, or ``None``
            for each image's predicted class.
        method: one of ``"cam"``, ``"gradcam"``, ``"gradcam++"``, ``"scorecam"``,
            ``"saliency"``, ``"guided"``, ``"guided-gradcam"``, ``"occlusion"``.
        layer: the CAM methods' layer (``named_modules()`` name, ``"name#k"`` for the k-th
            call); default: :func:`default_cam_layer`. Other methods take none.
        score: ``callable(output) -> [N, classes]`` for models whose output is not class
            scores (a dict, a tuple, a segmentation map: e.g. ``lambda o: o.mean((2, 3))``).
        forward: ``callable(images) -> output`` used instead of ``model(images)`` (hooks
            still go on ``model``'s modules).
        **options: ``"scorecam"``: ``batch_size`` (masked images per forward; default:
            about 2**24 input elements on an accelerator, 2**17 but at least 16 images on
            the CPU, at most 1024).
            ``"occlusion"``: ``patch`` (int or
            (h, w); default a quarter of the shorter side), ``stride`` (default half the
            patch), ``baseline`` (number or tensor broadcastable to the images; default 0),
            ``batch_size``.

    Returns:
        An :class:`Attribution` (``maps [N, H, W]``, ``targets [N]``, ``scores [N]``,
        ``logits [N, classes]``, ``method``, ``layer``, ``pixels``).

    Raises:
        ValueError: unknown ``method`` (the methods are listed) or ``layer``; a layer
            without spatial output; ``targets`` out of range or of the wrong length;
            a ``patch`` larger than the images; an output without a class dimension and
            no ``score``; ``"cam"`` without a GAP → linear head.
        TypeError: ``images`` not a float tensor, bad ``targets`` type, an option the
            method does not take.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(1.0), net[0].bias.zero_(), net[4].weight.copy_(torch.eye(2))
        >>> x = torch.zeros(1, 1, 4, 6)
        >>> x[0, 0, 1, 1] = 1.0
        >>> a = attribute(net, x, targets=0, method="cam")
        >>> a.layer, a.maps.shape, a.targets.tolist()
        ('1', torch.Size([1, 4, 6]), [0])
        >>> a.maps[0].tolist()[:3]
        [[1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]
        >>> attribute(net, x, targets=0, method="occlusion", patch=2, stride=2).maps.shape
        torch.Size([1, 4, 6])
    """
    if method not in METHODS:
        raise ValueError(f"Invalid value for method={method!r}. Must be one of {', '.join(map(repr, METHODS))}")
    allowed = _OPTIONS.get(method, ())
    unknown = [k for k in options if k not in allowed]
    if unknown:
        takes = ", ".join(f"{m!r}: {', '.join(o)}" for m, o in _OPTIONS.items())
        raise TypeError(
            f"method={method!r} takes no option {', '.join(map(repr, unknown))}"
            + (f" (it takes {', '.join(allowed)})" if allowed else "")
            + f"; options by method: {takes}"
        )
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a float tensor [N, C, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must have shape [N, C, H, W] with N >= 1, got {tuple(images.shape)}")
    if layer is not None and method not in CAM_METHODS:
        raise ValueError(f"method={method!r} takes no layer (got layer={layer!r}); the CAM methods do: {CAM_METHODS}")
    if score is not None and not callable(score):
        raise TypeError(f"score must be a callable(output) -> tensor [N, classes], got {type(score).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be a callable(images) -> output, got {type(forward).__name__}")
    n = images.shape[0]
    wanted = _check_targets(targets, n)
    model = unwrap_model(model)
    if method == "occlusion":  # geometry checked before any forward
        h, w = images.shape[-2:]
        if options.get("patch") is not None:
            ph, pw = _pair(options["patch"], "patch")
            if ph > h or pw > w:
                raise ValueError(f"Invalid value for patch=({ph}, {pw}): larger than the images ({h}, {w})")
    if method in CAM_METHODS:
        if layer is not None:
            _parse_layer(model, layer)  # unknown layer: fail before any work
    param = next(model.parameters(), None)
    device = param.device if param is not None else images.device
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    pixels = None
    with isolated(model):
        x = images.detach().to(device=device, dtype=dtype).clone()
        try:
            if method == "cam":
                cam, logits, t, layer = _cam(model, x, layer, forward, score, wanted)
            elif method in ("gradcam", "gradcam++", "guided-gradcam"):
                cam, logits, t, layer = _gradcam(model, x, layer, forward, score, wanted, plus=method == "gradcam++")
            elif method == "scorecam":
                cam, logits, t, layer = _scorecam(model, x, layer, forward, score, wanted, options.get("batch_size"))
            if method in CAM_METHODS:
                maps = _upsample(cam, tuple(x.shape[-2:]))
            if method in ("saliency", "guided", "guided-gradcam"):
                g, g_logits, g_t = _input_grad(
                    model, x, forward, score, t if method == "guided-gradcam" else wanted, guided=method != "saliency"
                )
                if method == "guided-gradcam":
                    g = g * maps[:, None]
                else:
                    logits, t = g_logits, g_t
                pixels = g.detach()
                maps = g.abs().amax(dim=1)
            elif method == "occlusion":
                maps, logits, t = _occlusion(
                    model, x, forward, score, wanted, options.get("patch"), options.get("stride"),
                    options.get("baseline", 0.0), options.get("batch_size"),
                )  # fmt: skip
        except RuntimeError as err:
            raise ValueError(
                f"The forward pass of {type(model).__name__} on images of shape {tuple(images.shape)} "
                f"failed (do the images fit the model?): {err}"
            ) from err
    logits = logits.detach()
    return Attribution(
        maps=maps.detach(),
        targets=t.detach(),
        scores=_pick(logits, t).detach(),
        logits=logits,
        method=method,
        layer=layer if method in CAM_METHODS else None,
        pixels=pixels,
    )
