"""Units across a dataset: receptive fields, the patches that drive each unit, feature maps.

* :func:`receptive_field` (from :mod:`lightning_vis.receptive`, re-exported here): the
  exact input region of every unit of a layer, traced from the network itself.
* :func:`top_activations`: streaming over any iterable of image batches with fixed memory,
  per channel the ``top_k`` images of highest activation (each image's strongest
  location) and the receptive-field patches under them (CS231n "maximally activating
  patches", Zeiler & Fergus Fig. 2). :class:`TopActivationCollector` is the streaming
  state, :func:`merge_top_activations` merges partial results (DDP ranks, data shards).
* :func:`top_feature_maps`: per image the layer's most active feature maps.

Only torch is needed here; :mod:`lightning_vis.callbacks` holds the thin callbacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_vis.deconv import _parse_layer
from lightning_vis.isolation import isolated
from lightning_vis.layers import unwrap_model
from lightning_vis.receptive import ReceptiveField, _layer_output, _model_device_dtype, receptive_field  # noqa: F401

__all__ = [
    "FeatureMapsResult",
    "ReceptiveField",
    "TopActivationCollector",
    "TopActivationsResult",
    "crop_patches",
    "merge_top_activations",
    "receptive_field",
    "top_activations",
    "top_feature_maps",
]

#: Image index of an empty top-k slot (fewer images seen than ``top_k``): loses every tie.
EMPTY_INDEX = torch.iinfo(torch.int64).max
#: Elements of patch data cropped at once (bounds the transient memory of cropping).
_CROP_BUDGET = 2**24


# ============================================================================ patches
def patch_shape(field: ReceptiveField, max_patch: int | None = None) -> tuple[int, int]:
    """``(h, w)`` of the stored patches: the field's size, shrunk to ``max_patch`` on its longer side."""
    h, w = field.size
    if max_patch is None or max(h, w) <= max_patch:
        return h, w
    scale = max_patch / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def crop_patches(
    images: torch.Tensor,
    rows: torch.Tensor,
    locations: torch.Tensor,
    field: ReceptiveField,
    *,
    max_patch: int | None = None,
    fill: float = 0.0,
) -> torch.Tensor:
    """The receptive-field patches of units: ``images[rows[m]]`` under the field of ``locations[m]``.

    Where the field leaves the image the patch is padded with ``fill``. With
    ``max_patch``, patches larger than that on their longer side are shrunk by area
    averaging. Cropping is chunked to bound the transient memory.

    Args:
        images: ``[N, C, H, W]``.
        rows: ``[M]`` which image each patch comes from.
        locations: ``[M, 2]`` (row, col) of each unit in the layer's map.
        field: the layer's :class:`ReceptiveField`.
        max_patch: largest stored side in pixels (``None``: the field's size).
        fill: value outside the image.

    Returns:
        ``[M, C, h, w]`` patches (``h, w``: :func:`patch_shape`).

    Example::

        >>> img = torch.arange(16.0).view(1, 1, 4, 4)
        >>> rf = ReceptiveField(size=(3, 3), stride=(1, 1), offset=(-1, -1))
        >>> crop_patches(img, torch.tensor([0]), torch.tensor([[0, 0]]), rf)[0, 0]
        tensor([[0., 0., 0.],
                [0., 0., 1.],
                [0., 4., 5.]])
    """
    n, c, height, width = images.shape
    device = images.device
    rows = rows.to(device).long()
    locations = locations.to(device).long()
    hh, ww = field.size
    out_hw = patch_shape(field, max_patch)
    m = rows.shape[0]
    out = torch.empty((m, c, *out_hw), dtype=images.dtype, device=device)
    if m == 0:
        return out
    chunk = max(1, _CROP_BUDGET // max(1, c * hh * ww))
    if min(field.stride) > 0:  # windows of a padded copy as a strided view: indexing per patch, not per pixel
        sh, sw = field.stride
        rows_needed = int(locations[:, 0].max()) + 1
        cols_needed = int(locations[:, 1].max()) + 1
        top, left = max(0, -field.offset[0]), max(0, -field.offset[1])
        bottom = max(0, field.offset[0] + (rows_needed - 1) * sh + hh - height)
        right = max(0, field.offset[1] + (cols_needed - 1) * sw + ww - width)
        padded = F.pad(images, (left, right, top, bottom), value=fill)
        y0, x0 = field.offset[0] + top, field.offset[1] + left  # first window's corner in the padded copy
        windows = padded[:, :, y0:, x0:].unfold(2, hh, sh).unfold(3, ww, sw)  # [N, C, i, j, hh, ww]
        for start in range(0, m, chunk):
            r, loc = rows[start : start + chunk], locations[start : start + chunk]
            patch = windows[r, :, loc[:, 0], loc[:, 1]]
            if out_hw != (hh, ww):
                patch = F.interpolate(patch.float(), size=out_hw, mode="area").to(images.dtype)
            out[start : start + chunk] = patch
        return out
    dy, dx = torch.arange(hh, device=device), torch.arange(ww, device=device)
    ch = torch.arange(c, device=device)[None, :, None, None]
    for start in range(0, m, chunk):
        r, loc = rows[start : start + chunk], locations[start : start + chunk]
        yi = (field.offset[0] + loc[:, 0] * field.stride[0])[:, None] + dy  # [m, hh]
        xi = (field.offset[1] + loc[:, 1] * field.stride[1])[:, None] + dx  # [m, ww]
        inside = ((yi >= 0) & (yi < height))[:, None, :, None] & ((xi >= 0) & (xi < width))[:, None, None, :]
        patch = images[r[:, None, None, None], ch, yi.clamp(0, height - 1)[:, None, :, None],
                       xi.clamp(0, width - 1)[:, None, None, :]]  # fmt: skip
        patch = torch.where(inside, patch, torch.full((), fill, dtype=patch.dtype, device=device))
        if out_hw != (hh, ww):
            patch = F.interpolate(patch.float(), size=out_hw, mode="area").to(images.dtype)
        out[start : start + chunk] = patch
    return out


# ============================================================================ top activations
@dataclass
class TopActivationsResult:
    """The result of :func:`top_activations`: per channel the ``K`` images that excite it most.

    Entries of a channel are ordered by activation (highest first; ties: lower image
    index first).

    Attributes:
        values: ``[C, K]`` each image's strongest activation of the channel.
        image_index: ``[C, K]`` the image's position in the stream (0-based over all batches).
        locations: ``[C, K, 2]`` (row, col) of that activation in the layer's map.
        patches: ``[C, K, C_in, h, w]`` the input under the unit's receptive field (zero
            where the field leaves the image); ``None`` when not kept.
        channels: ``[C]`` the layer channel of each row.
        layer: the layer's name.
        field: the layer's :class:`ReceptiveField`.
        image_size: ``(H, W)`` of the images.
        count: how many images were seen.
    """

    values: torch.Tensor
    image_index: torch.Tensor
    locations: torch.Tensor
    patches: torch.Tensor | None
    channels: torch.Tensor
    layer: str
    field: ReceptiveField
    image_size: tuple[int, int]
    count: int

    def inside(self) -> torch.Tensor:
        """``[C, K, h, w]`` bool: which patch pixels lie inside the image (at the patch's resolution)."""
        if self.patches is None:
            raise ValueError("this result keeps no patches")
        hh, ww = self.field.size
        boxes = self.field.boxes(self.locations.cpu())
        ys = boxes[..., 0, None] + torch.arange(hh)
        xs = boxes[..., 1, None] + torch.arange(ww)
        mask = ((ys >= 0) & (ys < self.image_size[0]))[..., :, None] & ((xs >= 0) & (xs < self.image_size[1]))[..., None, :]
        out_hw = tuple(self.patches.shape[-2:])
        if out_hw != (hh, ww):
            c, k = mask.shape[:2]
            mask = F.interpolate(mask.view(c * k, 1, hh, ww).float(), size=out_hw, mode="area").view(c, k, *out_hw) > 0.5
        return mask

    def __repr__(self) -> str:
        c, k = self.values.shape
        return f"TopActivationsResult(layer={self.layer!r}, channels={c}, top_k={k}, images={self.count})"


def _lexi_order(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per row, the permutation sorting by value (descending), then by index (ascending)."""
    by_index = torch.sort(index, dim=1, stable=True).indices
    by_value = torch.sort(values.gather(1, by_index), dim=1, descending=True, stable=True).indices
    return by_index.gather(1, by_value)


class TopActivationCollector:
    """Streaming per-channel top-k of image maxima with their receptive-field patches.

    Memory is fixed: ``[C, K]`` values, indices and locations, and ``[C, K, C_in, h, w]``
    patch slots. Each :meth:`update` merges a batch on its device (two stable sorts of
    ``[C, K + N]`` candidates: value descending, then image index ascending, so ties are
    deterministic) and crops patches only for units that enter the top-k.

    Args:
        channels: how many channels the activations passed to :meth:`update` have.
        top_k: images kept per channel.
        field: the layer's receptive field (for the patches); ``None``: keep no patches.
        max_patch: shrink stored patches to this many pixels on their longer side.
    """

    def __init__(
        self, channels: int, top_k: int, field: ReceptiveField | None, *, max_patch: int | None = None
    ) -> None:
        self.c, self.k, self.field, self.max_patch = channels, top_k, field, max_patch
        self.count = 0
        self.image_size: tuple[int, int] | None = None
        self._values: torch.Tensor | None = None

    def _init(self, device: torch.device, images: torch.Tensor | None) -> None:
        c, k = self.c, self.k
        self._values = torch.full((c, k), -math.inf, device=device)
        self._index = torch.full((c, k), EMPTY_INDEX, dtype=torch.long, device=device)
        self._where = torch.zeros((c, k), dtype=torch.long, device=device)
        self._slot = torch.arange(k, device=device).expand(c, k).clone()
        self._patches = None
        if self.field is not None and images is not None:
            h, w = patch_shape(self.field, self.max_patch)
            self._patches = torch.zeros((c, k, images.shape[1], h, w), dtype=images.dtype, device=device)

    def update(self, act: torch.Tensor, images: torch.Tensor | None = None, indices: torch.Tensor | None = None) -> None:
        """Merge one batch.

        Args:
            act: ``[N, C, h, w]`` the layer's activations (already restricted to the channels).
            images: ``[N, C_in, H, W]`` the input images (needed for patches).
            indices: ``[N]`` global image indices (default: consecutive from the images seen so far).
        """
        n, c = act.shape[:2]
        if c != self.c:
            raise ValueError(f"expected activations with {self.c} channels, got {tuple(act.shape)}")
        device = act.device
        if self._values is None:
            self._init(device, images)
        if images is not None:
            self.image_size = (int(images.shape[-2]), int(images.shape[-1]))
        if indices is None:
            indices = torch.arange(self.count, self.count + n, device=device)
        indices = indices.to(device).long()
        self.count += n
        width = self._width = act.shape[-1]
        peak, where = act.detach().flatten(2).max(dim=2)  # [N, C]; one pass, the first maximum on ties
        peak = torch.nan_to_num(peak.float(), nan=-math.inf)  # a map with NaN ranks last

        k = self.k
        cand_values = torch.cat([self._values, peak.T], dim=1)
        cand_index = torch.cat([self._index, indices[None].expand(c, n)], dim=1)
        cand_where = torch.cat([self._where, where.T], dim=1)
        order = _lexi_order(cand_values, cand_index)[:, :k]
        source = order  # < k: an old entry, >= k: row (source - k) of this batch
        old_slot = torch.cat([self._slot, torch.full((c, n), -1, device=device, dtype=torch.long)], dim=1)
        kept_slot = old_slot.gather(1, source)
        self._values = cand_values.gather(1, source)
        self._index = cand_index.gather(1, source)
        self._where = cand_where.gather(1, source)
        is_new = kept_slot < 0
        # free slots: those of evicted entries, handed to the entries that came in, in order
        used = torch.zeros((c, k + 1), dtype=torch.uint8, device=device)
        used.scatter_(1, torch.where(is_new, k, kept_slot), 1)  # new entries mark the spare column k
        free_first = torch.sort(used[:, :k], dim=1, stable=True).indices
        rank = (is_new.long().cumsum(dim=1) - 1).clamp_min(0)
        self._slot = torch.where(is_new, free_first.gather(1, rank), kept_slot)
        if self._patches is None or images is None:
            return
        ch, pos = is_new.nonzero(as_tuple=True)  # one host sync per batch
        if ch.numel() == 0:
            return
        rows = source[ch, pos] - k
        w = self._where[ch, pos]
        loc = torch.stack([w // width, w % width], dim=1)
        crops = crop_patches(images.to(device), rows, loc, self.field, max_patch=self.max_patch)
        self._patches[ch, self._slot[ch, pos]] = crops.to(self._patches.dtype)

    def ordered(self, *, trim: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``values [C, K]``, ``image_index [C, K]``, ``locations [C, K, 2]`` (best first)."""
        if self._values is None:
            raise ValueError("no batch has been seen")
        k = min(self.k, self.count) if trim else self.k
        where = self._where[:, :k]
        loc = torch.stack([where // self._width, where % self._width], dim=-1)
        return self._values[:, :k].clone(), self._index[:, :k].clone(), loc

    def ordered_patches(self, rows: torch.Tensor | None = None, *, trim: bool = False) -> torch.Tensor:
        """``[R, K, C_in, h, w]`` the patches of ``rows`` (default: all channels), best first."""
        if self._patches is None:
            raise ValueError("this collector keeps no patches")
        k = min(self.k, self.count) if trim else self.k
        rows = torch.arange(self.c, device=self._slot.device) if rows is None else rows.to(self._slot.device)
        return self._patches[rows[:, None], self._slot[rows, :k]]

    def result(
        self, *, channels: torch.Tensor | None = None, layer: str = "", trim: bool = True
    ) -> TopActivationsResult:
        """The current top-k; ``trim``: only the slots filled so far (``min(top_k, count)``)."""
        if self._values is None:
            raise ValueError("no batch has been seen")
        values, index, locations = self.ordered(trim=trim)
        patches = None if self._patches is None else self.ordered_patches(trim=trim)
        return TopActivationsResult(
            values=values,
            image_index=index,
            locations=locations,
            patches=patches,
            channels=torch.arange(self.c) if channels is None else torch.as_tensor(channels).long().cpu(),
            layer=layer,
            field=self.field,
            image_size=self.image_size or (0, 0),
            count=self.count,
        )


def merge_order(
    values: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each merged entry comes from: ``(part [C, K], position [C, K])``.

    Merges per-part top-k lists ``values[p] [C, K_p]`` with global image indices
    ``indices[p]`` by value (descending), then index (ascending), keeping ``top_k``.
    """
    sizes = [v.shape[1] for v in values]
    cat_values, cat_index = torch.cat(list(values), dim=1), torch.cat(list(indices), dim=1)
    order = _lexi_order(cat_values, cat_index)[:, : min(top_k, sum(sizes))]
    starts = torch.tensor([0] + sizes[:-1], device=order.device).cumsum(0)
    part = torch.searchsorted(starts, order.contiguous(), right=True) - 1
    return part, order - starts[part]


def merge_top_activations(parts: Sequence[TopActivationsResult], top_k: int | None = None) -> TopActivationsResult:
    """Merge top-k results of disjoint sets of images (data shards, DDP ranks) into one.

    The image indices must be global (distinct across parts). The result is what
    :func:`top_activations` gives over the union of the images; empty slots are dropped.

    Args:
        parts: results over the same layer and channels.
        top_k: entries kept per channel (default: the largest ``K`` of the parts).

    Raises:
        ValueError: no parts, or parts over different channels / fields.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_top_activations needs at least one result")
    first = parts[0]
    for p in parts[1:]:
        if not torch.equal(p.channels, first.channels) or p.field != first.field:
            raise ValueError("results to merge must cover the same layer, channels and receptive field")
    top_k = top_k or max(p.values.shape[1] for p in parts)
    part, pos = merge_order([p.values for p in parts], [p.image_index for p in parts], top_k)
    c = first.values.shape[0]
    rows = torch.arange(c, device=part.device)[:, None]

    widest = max(p.values.shape[1] for p in parts)

    def pick(name: str) -> torch.Tensor:
        return torch.stack([_pad_k(getattr(p, name), widest) for p in parts])[part, rows, pos]

    values, index = pick("values"), pick("image_index")
    keep = min(top_k, sum(p.count for p in parts))
    patches = pick("patches") if all(p.patches is not None for p in parts) else None
    return TopActivationsResult(
        values=values[:, :keep],
        image_index=index[:, :keep],
        locations=pick("locations")[:, :keep],
        patches=None if patches is None else patches[:, :keep],
        channels=first.channels,
        layer=first.layer,
        field=first.field,
        image_size=first.image_size,
        count=sum(p.count for p in parts),
    )


def _pad_k(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t [C, K_p, ...]`` padded along K to ``k`` (padding is never selected)."""
    if t.shape[1] == k:
        return t
    fill = torch.zeros((t.shape[0], k - t.shape[1], *t.shape[2:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, fill], dim=1)


def _batch_images(batch: Any) -> torch.Tensor:
    """The images of a batch: a tensor, or the first float ``[N, C, H, W]`` tensor of a tuple/list/dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    items = list(batch.values()) if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    for item in items:
        if isinstance(item, torch.Tensor) and item.ndim == 4 and item.is_floating_point():
            return item
    raise TypeError(f"each batch must be an image tensor [N, C, H, W] or hold one, got {type(batch).__name__}")


def top_activations(
    model: nn.Module,
    batches: Iterable[Any],
    layer: str,
    *,
    channels: Sequence[int] | torch.Tensor | None = None,
    top_k: int = 9,
    forward: Callable[[torch.Tensor], object] | None = None,
    max_patch: int | None = None,
) -> TopActivationsResult:
    """Per channel of ``layer``, the ``top_k`` images (and patches) of highest activation.

    Streams over ``batches`` with fixed memory: each batch runs forward to ``layer``
    (under :func:`~lightning_vis.isolation.isolated`, ``no_grad``), each image's
    strongest location per channel (first position on ties) is merged into the running
    top-k on the device (:class:`TopActivationCollector`), and the receptive-field patch
    of a unit is cropped from its image when it enters the top-k, so no image is kept.
    Ties between images go to the lower image index; an all-zero channel keeps the first
    ``top_k`` images at location (0, 0). Patches are padded with zeros where the field
    leaves the image.

    Args:
        model: the network.
        batches: an iterable of image tensors ``[N, C, H, W]`` (or of tuples/dicts holding
            one, e.g. a ``DataLoader`` of ``(images, labels)``), all of the same image size.
        layer: ``named_modules()`` name (``"name#k"``: k-th call); output ``[N, C, H, W]``.
        channels: only these channels (default: all).
        top_k: images kept per channel.
        forward: how to run ``model`` on images (default ``model(images)``).
        max_patch: shrink patches to this many pixels on their longer side (area
            averaging), to bound memory for deep layers; default: the field's size.

    Returns:
        A :class:`TopActivationsResult` (``values [C, K]``, ``image_index [C, K]``,
        ``locations [C, K, 2]``, ``patches [C, K, C_in, h, w]``); ``K = min(top_k, images)``.

    Raises:
        ValueError: no batches, bad ``top_k``/``channels``/``max_patch``, images of
            different sizes, a layer without a fixed receptive field.
        TypeError: a batch without an image tensor.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
        >>> batches = [torch.randn(4, 1, 8, 8) for _ in range(3)]
        >>> res = top_activations(net, batches, "1", top_k=5)
        >>> res.values.shape, res.image_index.shape, res.locations.shape, res.patches.shape
        (torch.Size([2, 5]), torch.Size([2, 5]), torch.Size([2, 5, 2]), torch.Size([2, 5, 1, 3, 3]))
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"Invalid value for top_k={top_k!r}. Must be an int >= 1")
    if max_patch is not None and (isinstance(max_patch, bool) or not isinstance(max_patch, int) or max_patch < 1):
        raise ValueError(f"Invalid value for max_patch={max_patch!r}. Must be an int >= 1 or None")
    model = unwrap_model(model)
    _parse_layer(model, layer)
    device, dtype = _model_device_dtype(model)
    collector: TopActivationCollector | None = None
    chosen: torch.Tensor | None = None
    field: ReceptiveField | None = None
    for batch in batches:
        images = _batch_images(batch)
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images must be float [N, C, H, W], got {tuple(images.shape)} {images.dtype}")
        if field is None:
            field = receptive_field(model, layer, tuple(images.shape[1:]), forward=forward)
            chosen = _check_channel_list(channels, field.channels)
            c = field.channels if chosen is None else len(chosen)
            collector = TopActivationCollector(c, top_k, field, max_patch=max_patch)
        elif tuple(images.shape[-2:]) != field.input_size:
            raise ValueError(f"all images must have the size {field.input_size}, got {tuple(images.shape[-2:])}")
        x = images.detach().to(device=device, dtype=dtype)
        with isolated(model), torch.no_grad():
            act = _layer_output(model, x, layer, forward)
        if chosen is not None:
            act = act[:, chosen.to(act.device)]
        collector.update(act, x)
    if collector is None:
        raise ValueError("top_activations got no batches")
    return collector.result(channels=chosen, layer=layer)


def _check_channel_list(channels: Any, available: int) -> torch.Tensor | None:
    if channels is None:
        return None
    t = torch.as_tensor(channels)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"channels must be a non-empty list of ints, got {channels!r}")
    bad = t[(t < 0) | (t >= available)]
    if bad.numel():
        raise ValueError(f"channels {bad.tolist()} out of range: the layer has {available} channels (0..{available - 1})")
    return t.long().cpu()


# ============================================================================ feature maps
@dataclass
class FeatureMapsResult:
    """The result of :func:`top_feature_maps`.

    Attributes:
        maps: ``[N, n, h, w]`` the chosen feature maps of each image.
        channels: ``[N, n]`` their channels (by mean activation, highest first; ties: lower channel).
        means: ``[N, n]`` their mean activation.
        layer: the layer's name.
    """

    maps: torch.Tensor
    channels: torch.Tensor
    means: torch.Tensor
    layer: str


def top_feature_maps(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    *,
    top_n: int = 9,
    forward: Callable[[torch.Tensor], object] | None = None,
) -> FeatureMapsResult:
    """Per image, the ``top_n`` feature maps of ``layer`` with the highest mean activation.

    One forward pass to the layer under :func:`~lightning_vis.isolation.isolated`
    (``no_grad``, fp32 as the model's parameters).

    Args:
        model: the network.
        images: ``[N, C, H, W]``.
        layer: ``named_modules()`` name (``"name#k"``: k-th call); output ``[N, C, H, W]``.
        top_n: maps per image (at most the layer's channels).
        forward: how to run ``model`` on images (default ``model(images)``).

    Raises:
        ValueError: bad ``top_n``, ``images`` or ``layer``.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 4, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([1.0, 3.0, 2.0, -1.0]).view(4, 1, 1, 1))
        ...     _ = net[0].bias.zero_()
        >>> fm = top_feature_maps(net, torch.ones(1, 1, 2, 2), "0", top_n=2)
        >>> fm.channels.tolist(), fm.means.tolist(), fm.maps.shape
        ([[1, 2]], [[3.0, 2.0]], torch.Size([1, 2, 2, 2]))
    """
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ValueError(f"Invalid value for top_n={top_n!r}. Must be an int >= 1")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4:
        raise ValueError(f"images must be a float tensor [N, C, H, W], got {getattr(images, 'shape', images)!r}")
    model = unwrap_model(model)
    _parse_layer(model, layer)
    device, dtype = _model_device_dtype(model)
    with isolated(model), torch.no_grad():
        act = _layer_output(model, images.detach().to(device=device, dtype=dtype), layer, forward).float()
    c = act.shape[1]
    if top_n > c:
        raise ValueError(f"Invalid value for top_n={top_n}. Layer {layer!r} has {c} channels: must be <= {c}")
    means = act.mean(dim=(2, 3))
    chans = torch.sort(means, dim=1, descending=True, stable=True).indices[:, :top_n]
    maps = act.gather(1, chans[:, :, None, None].expand(-1, -1, *act.shape[2:]))
    return FeatureMapsResult(maps=maps.detach(), channels=chans, means=means.gather(1, chans), layer=layer)
