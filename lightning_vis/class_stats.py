"""How the units of one layer serve the classes (Shang et al.): streaming class statistics.

Everything here is a pure function of tensors and modules (no Lightning):

* :class:`ClassChannelStats` streams over batches of one layer's activations
  ``[N, C, ...]`` and their labels ``[N]``. It keeps, on the activations' device, the
  per-class sums of each channel's *mean activation* (the activation averaged over the
  spatial positions of one sample), the number of samples per class and two per-channel
  sparsity counts; nothing per sample, no host synchronisation. Two of them (from two
  data shards or two DDP ranks) add up with :meth:`~ClassChannelStats.merge`, or with
  one ``all_reduce`` of :meth:`~ClassChannelStats.pack`.
* :func:`class_means` ``[classes, C]``, :func:`channel_means` ``[C]``,
  :func:`class_similarity` (the class × class cosine similarity of the mean activation
  vectors, Shang et al. Table 3), :func:`top_units`, :func:`shared_units` (units in
  *every* class's top-n: the intersection rule), :func:`specific_units` (units in
  *exactly one* class's top-n: the difference rule), :func:`sparsity` and
  :func:`inactive_fraction`.
* :func:`channel_order` (least active first) and :func:`ablation_accuracy`: the
  accuracy with a fraction of a layer's channels zeroed by a forward hook (Shang et al.
  Tables 4-5: removing the least active channels barely matters).
* :func:`collect_class_stats` runs a model over batches and fills the statistics;
  :func:`measurement_layer` picks the module whose output is measured (a convolution's
  rectified output).

Definitions. For sample ``n`` and channel ``c`` the *mean activation* is
``a[n, c] = mean over positions of output[n, c, ...]`` (``output[n, c]`` itself for a
``[N, C]`` output). The *class mean* of class ``k`` is the average of ``a[n, c]`` over
the samples labelled ``k``. *Sparsity* of a channel is the fraction of its outputs (every
position of every sample) that are ``<= 0``, i.e. zero after a ReLU; the *inactive
fraction* is the fraction of samples on which the channel is ``<= 0`` at every position
(it never fires on that sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "Ablation",
    "ClassChannelStats",
    "ablation_accuracy",
    "channel_means",
    "channel_order",
    "class_means",
    "class_similarity",
    "collect_class_stats",
    "inactive_fraction",
    "mean_off_diagonal",
    "measurement_layer",
    "shared_units",
    "sparsity",
    "specific_units",
    "top_units",
    "zeroed_count",
]


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class ClassChannelStats:
    """Streaming per-class sums of channel mean activations, and per-channel sparsity counts.

    Fixed size (``(classes + 1) × C`` sums), kept on the device of the activations;
    :meth:`update` does no host synchronisation. Labels outside ``[0, num_classes)``
    (e.g. an ignore index ``-100``) are counted in a spare row (:attr:`ignored`) and left
    out of the class statistics; their samples still count for sparsity and
    :func:`channel_means`.

    Attributes:
        sums: ``[classes + 1, C]`` per-class sums of the samples' mean activations (the
            last row: samples with an out-of-range label).
        counts: ``[classes + 1]`` samples per class (last: out-of-range labels).
        zero_outputs: ``[C]`` outputs ``<= 0`` (every position of every sample).
        inactive: ``[C]`` samples on which the channel is ``<= 0`` at every position.
        positions: ``[]`` outputs per channel seen (samples × positions).

    Example::

        >>> stats = ClassChannelStats.empty(2, 3)
        >>> acts = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0], [5.0, 1.0, 0.0]])  # [N=3, C=3]
        >>> stats.update(acts, torch.tensor([0, 0, 1]))
        >>> class_means(stats)
        tensor([[2., 0., 1.],
                [5., 1., 0.]], dtype=torch.float64)
        >>> sparsity(stats)
        tensor([0.0000, 0.6667, 0.6667], dtype=torch.float64)
    """

    sums: torch.Tensor
    counts: torch.Tensor
    zero_outputs: torch.Tensor
    inactive: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def empty(
        cls, num_classes: int, channels: int, *, device: torch.device | str | None = None
    ) -> ClassChannelStats:
        """Zeroed statistics for ``num_classes`` classes and ``channels`` channels."""
        for name, value in (("num_classes", num_classes), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid value for {name}={value!r}. Must be an int >= 1")
        device = torch.device(device if device is not None else "cpu")
        dtype = _accumulator_dtype(device)
        return cls(
            sums=torch.zeros(num_classes + 1, channels, dtype=dtype, device=device),
            counts=torch.zeros(num_classes + 1, dtype=dtype, device=device),
            zero_outputs=torch.zeros(channels, dtype=dtype, device=device),
            inactive=torch.zeros(channels, dtype=dtype, device=device),
            positions=torch.zeros((), dtype=dtype, device=device),
        )

    @property
    def num_classes(self) -> int:
        return self.sums.shape[0] - 1

    @property
    def channels(self) -> int:
        return self.sums.shape[1]

    @property
    def samples(self) -> torch.Tensor:
        """Samples seen (all labels), a 0-dim tensor."""
        return self.counts.sum()

    @property
    def ignored(self) -> torch.Tensor:
        """Samples whose label was outside ``[0, num_classes)``, a 0-dim tensor."""
        return self.counts[-1]

    # ------------------------------------------------------------------ streaming
    def _check(self, activations: torch.Tensor) -> None:
        if not isinstance(activations, torch.Tensor) or activations.ndim < 2:
            shape = tuple(activations.shape) if isinstance(activations, torch.Tensor) else type(activations).__name__
            raise ValueError(f"activations must have shape [N, C, ...], got {shape}")
        if activations.shape[1] != self.channels:
            raise ValueError(
                f"activations have {activations.shape[1]} channels (shape {tuple(activations.shape)}); "
                f"these statistics count {self.channels}"
            )

    def update_channels(self, activations: torch.Tensor) -> torch.Tensor:
        """Count the sparsity of a batch ``[N, C, ...]``; returns its mean activations ``[N, C]``.

        The first half of :meth:`update`, for callers that get the labels later (a
        forward hook sees the activations, the batch end sees the labels).
        """
        self._check(activations)
        a = activations.detach()
        dims = tuple(range(2, a.ndim))
        dtype = self.sums.dtype
        if dims:
            means = a.mean(dim=dims, dtype=torch.float32)
            self.inactive += (a.amax(dim=dims) <= 0).sum(0).to(dtype)
        else:
            means = a.float()
            self.inactive += (a <= 0).sum(0).to(dtype)
        self.zero_outputs += (a <= 0).sum(dim=(0, *dims)).to(dtype)
        self.positions += a.numel() // max(1, a.shape[1])
        return means

    def add_class_means(self, means: torch.Tensor, labels: torch.Tensor) -> None:
        """Add mean activations ``[N, C]`` (from :meth:`update_channels`) to their classes ``labels [N]``."""
        if means.ndim != 2 or means.shape[1] != self.channels:
            raise ValueError(f"means must have shape [N, {self.channels}], got {tuple(means.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
            what = f"shape {tuple(labels.shape)}, {labels.dtype}" if isinstance(labels, torch.Tensor) else labels
            raise ValueError(f"labels must be an integer tensor [N], got {what}")
        if labels.shape[0] != means.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for a batch of {means.shape[0]} samples")
        labels = labels.to(device=self.sums.device, dtype=torch.long)
        k = self.num_classes
        index = torch.where((labels >= 0) & (labels < k), labels, torch.full_like(labels, k))
        self.sums.index_add_(0, index, means.to(self.sums))
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=self.counts.dtype))

    def update(self, activations: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: activations ``[N, C, ...]`` of one layer and their labels ``[N]``."""
        self.add_class_means(self.update_channels(activations), labels)

    def merge(self, other: ClassChannelStats) -> ClassChannelStats:
        """Add ``other`` (same classes and channels) into these statistics; returns ``self``."""
        if other.sums.shape != self.sums.shape:
            raise ValueError(
                f"Cannot merge statistics of {other.num_classes} classes × {other.channels} channels into "
                f"{self.num_classes} classes × {self.channels} channels"
            )
        for mine, theirs in zip(self._tensors(), other._tensors()):
            mine += theirs.to(mine)
        return self

    # ------------------------------------------------------------------ DDP / checkpoints
    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.sums, self.counts, self.zero_outputs, self.inactive, self.positions)

    def pack(self) -> torch.Tensor:
        """All counts as one flat tensor (one ``all_reduce(SUM)`` merges every rank's)."""
        return torch.cat([t.reshape(-1) for t in self._tensors()])

    @classmethod
    def unpack(cls, packed: torch.Tensor, num_classes: int, channels: int) -> ClassChannelStats:
        """The inverse of :meth:`pack`."""
        sizes = [(num_classes + 1) * channels, num_classes + 1, channels, channels, 1]
        if packed.numel() != sum(sizes):
            raise ValueError(f"packed statistics have {packed.numel()} values, expected {sum(sizes)}")
        sums, counts, zeros, inactive, positions = torch.split(packed.reshape(-1), sizes)
        return cls(sums.reshape(num_classes + 1, channels), counts, zeros, inactive, positions.reshape(()))


# ---------------------------------------------------------------------- statistics
def class_means(stats: ClassChannelStats) -> torch.Tensor:
    """Per-class mean of each channel's mean activation, ``[classes, C]``.

    A class without samples gets a row of NaN (it is left out of :func:`shared_units`,
    :func:`specific_units` and the mean off-diagonal similarity).
    """
    counts = stats.counts[:-1].unsqueeze(1)
    means = stats.sums[:-1] / counts.clamp_min(1)
    return torch.where(counts > 0, means, torch.full_like(means, float("nan")))


def channel_means(stats: ClassChannelStats) -> torch.Tensor:
    """Each channel's mean activation over every sample seen (all labels), ``[C]``."""
    return stats.sums.sum(0) / stats.samples.clamp_min(1)


def class_similarity(means: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity of the classes' mean activation vectors, ``[classes, classes]``.

    ``S[i, j] = <m_i, m_j> / (|m_i| |m_j|)``. A class whose mean vector is all zero has
    similarity 0 with every class (itself included); a NaN row (a class without
    samples) gives NaN.

    Example::

        >>> class_similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
        tensor([[1.0000, 0.7071, 0.0000],
                [0.7071, 1.0000, 0.0000],
                [0.0000, 0.0000, 0.0000]])
    """
    if means.ndim != 2:
        raise ValueError(f"means must have shape [classes, C], got {tuple(means.shape)}")
    unit = means / means.norm(dim=1, keepdim=True).clamp_min(eps)
    return unit @ unit.T


def mean_off_diagonal(similarity: torch.Tensor) -> float:
    """The mean of the off-diagonal entries that are not NaN (NaN when there are none)."""
    k = similarity.shape[0]
    off = similarity[~torch.eye(k, dtype=torch.bool, device=similarity.device)]
    off = off[~torch.isnan(off)]
    return float(off.mean()) if off.numel() else float("nan")


def top_units(means: torch.Tensor, top_n: int) -> torch.Tensor:
    """The ``top_n`` channels of largest mean activation per class, strongest first, ``[classes, top_n]``.

    Ties go to the lower channel index. Rows of a class without samples (NaN) are -1.

    Example::

        >>> top_units(torch.tensor([[0.1, 0.5, 0.5, 0.2]]), 3)
        tensor([[1, 2, 3]])
    """
    if means.ndim != 2:
        raise ValueError(f"means must have shape [classes, C], got {tuple(means.shape)}")
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= means.shape[1]:
        raise ValueError(f"Invalid value for top_n={top_n!r}. Must be an int in [1, {means.shape[1]}] (the channels)")
    order = torch.sort(means.nan_to_num(float("-inf")), dim=1, descending=True, stable=True).indices[:, :top_n]
    absent = torch.isnan(means).any(1, keepdim=True)
    return torch.where(absent, torch.full_like(order, -1), order)


def _present_tops(means: torch.Tensor, top_n: int) -> dict[int, list[int]]:
    tops = top_units(means, top_n).tolist()
    return {k: row for k, row in enumerate(tops) if row[0] >= 0}


def shared_units(means: torch.Tensor, top_n: int) -> list[int]:
    """Channels in *every* class's top-n (intersection rule), ascending. Classes without samples are skipped.

    Example::

        >>> means = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 0.0, 1.0, 2.0]])
        >>> shared_units(means, 2), shared_units(means, 3)
        ([0], [0, 2])
    """
    tops = _present_tops(means, top_n)
    if not tops:
        return []
    common = set.intersection(*(set(row) for row in tops.values()))
    return sorted(common)


def specific_units(means: torch.Tensor, top_n: int) -> dict[int, list[int]]:
    """Per class, the channels of its top-n that are in no other class's top-n (difference rule).

    Every class with samples has an entry (possibly empty), its channels strongest first.

    Example::

        >>> means = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 0.0, 1.0, 2.0]])
        >>> specific_units(means, 2)
        {0: [1], 1: [3]}
    """
    tops = _present_tops(means, top_n)
    seen: dict[int, int] = {}
    for row in tops.values():
        for c in row:
            seen[c] = seen.get(c, 0) + 1
    return {k: [c for c in row if seen[c] == 1] for k, row in tops.items()}


def sparsity(stats: ClassChannelStats) -> torch.Tensor:
    """Per channel, the fraction of its outputs ``<= 0`` over every position of every sample, ``[C]``."""
    return stats.zero_outputs / stats.positions.clamp_min(1)


def inactive_fraction(stats: ClassChannelStats) -> torch.Tensor:
    """Per channel, the fraction of samples on which it is ``<= 0`` at every position, ``[C]``."""
    return stats.inactive / stats.samples.clamp_min(1)


def channel_order(means: torch.Tensor, *, most_active_first: bool = False) -> torch.Tensor:
    """Channel indices ordered by mean activation, least active first (ties: lower index first).

    Args:
        means: ``[C]`` per-channel mean activation (e.g. :func:`channel_means`).
        most_active_first: the reverse order: most active first (ties still lower index first).

    Example::

        >>> channel_order(torch.tensor([0.3, 0.1, 0.3, 0.0]))
        tensor([3, 1, 0, 2])
        >>> channel_order(torch.tensor([0.3, 0.1, 0.3, 0.0]), most_active_first=True)
        tensor([0, 2, 1, 3])
    """
    if means.ndim != 1:
        raise ValueError(f"means must have shape [C], got {tuple(means.shape)}")
    return torch.sort(means.nan_to_num(float("-inf")), descending=most_active_first, stable=True).indices


def zeroed_count(fraction: float, channels: int) -> int:
    """How many of ``channels`` a fraction zeroes: ``floor(fraction × channels + 0.5)``.

    Example::

        >>> zeroed_count(0.1, 128), zeroed_count(0.2, 128), zeroed_count(0.25, 10)
        (13, 26, 3)
    """
    return min(channels, int(math.floor(fraction * channels + 0.5)))


# ---------------------------------------------------------------------- passes through a model
def _module(model: nn.Module, layer: str) -> nn.Module:
    from lightning_vis.layers import resolve_layers

    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        resolve_layers(model, [layer], [n for n in modules if n], what="modules")  # raises, listing them
    return modules[layer]


def _logits(output: Any, n: int) -> torch.Tensor:
    """The class scores ``[N, classes]`` in a model's output (a tensor, or the first one in a tuple/dict)."""
    if isinstance(output, torch.Tensor):
        if output.ndim == 2 and output.shape[0] == n:
            return output
    elif isinstance(output, dict):
        for value in output.values():
            if isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape[0] == n:
                return value
    elif isinstance(output, (list, tuple)):
        for value in output:
            if isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape[0] == n:
                return value
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise ValueError(f"the model's output must hold class scores [N={n}, classes], got {shape}")


def _model_device(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), None


def measurement_layer(
    model: nn.Module, example: torch.Tensor, layer: str | None = None, *, forward: Callable | None = None
) -> tuple[str, str]:
    """Which module's output the class statistics measure: ``(convolution or layer, measured module)``.

    ``layer=None``: the last convolution the input passes through (by execution order).
    For a convolution, the measured module is the activation module that its output
    feeds first (past BatchNorm; e.g. the ``nn.ReLU`` after it), so the statistics are
    those of the channels' rectified outputs and zeroing a channel there removes it
    (zeroing a convolution's output before BatchNorm would not). When that activation is
    a functional call or a module called several times per forward, the convolution's
    own output is measured. Any other module named is measured as it is.

    Raises:
        ValueError: no convolution, an unknown module (the modules are listed), a module
            whose output is not ``[N, C, ...]``, or one called several times per forward.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))
        >>> measurement_layer(net, torch.randn(1, 3, 9, 9)), measurement_layer(net, torch.randn(1, 3, 9, 9), "0")
        (('3', '4'), ('0', '2'))
    """
    from lightning_vis.isolation import isolated
    from lightning_vis.layers import (
        conv_layers,
        eager_forward,
        execution_order,
        unwrap_model,
    )
    from lightning_vis.sites import find_activation_sites

    model = unwrap_model(model)
    convs = conv_layers(model)
    if layer is None:
        if not convs:
            raise ValueError(f"{type(model).__name__} has no convolution (torch.nn.Conv1d/2d/3d); name a layer")
        order = execution_order(model, example, list(convs), forward=forward)
        if not order:
            raise ValueError(f"A forward pass of {type(model).__name__} called none of its convolutions")
        layer = order[-1]
    module = _module(model, layer)
    measured = layer
    if layer in convs:
        out_channels = getattr(module, "out_channels", None)
        for site in find_activation_sites(model, example, forward=forward):
            if site.conv != layer:
                continue
            if site.key[0] == "m" and site.name == site.key[1] and site.channels == out_channels:
                measured = site.key[1]
            break
    # the measured module: called once per forward, with an output [N, C, ...]
    target = _module(model, measured)
    outputs: list[Any] = []
    handle = target.register_forward_hook(lambda m, a, o: outputs.append(o if not isinstance(o, torch.Tensor) else o.shape))
    try:
        with isolated(model), torch.no_grad(), eager_forward(model):
            (forward or model)(example)
    finally:
        handle.remove()
    if len(outputs) != 1:
        raise ValueError(
            f"Module {measured!r} ({type(target).__name__}) is called {len(outputs)} times per forward pass; "
            "name a module that is called once"
        )
    if not isinstance(outputs[0], torch.Size) or len(outputs[0]) < 2:
        what = tuple(outputs[0]) if isinstance(outputs[0], torch.Size) else type(outputs[0]).__name__
        raise ValueError(f"Module {measured!r} ({type(target).__name__}) has no channels: its output is {what}")
    return layer, measured


class _Capture:
    """A forward hook that hands the first output of each armed forward to ``sink``."""

    def __init__(self, sink: Callable[[torch.Tensor], None]) -> None:
        self.sink = sink
        self.armed = False

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.armed and isinstance(output, torch.Tensor):
            self.armed = False
            self.sink(output)


def collect_class_stats(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    layer: str,
    num_classes: int,
    *,
    forward: Callable[[torch.Tensor], Any] | None = None,
) -> ClassChannelStats:
    """Stream ``(images, labels)`` batches through ``model`` and count ``layer``'s class statistics.

    One forward per batch under :func:`~lightning_vis.isolation.isolated` and
    ``no_grad`` (eval mode, state restored); the hook is removed on exit, also on error.

    Args:
        model: the network (or a LightningModule; names are its ``named_modules()`` names).
        batches: an iterable of ``(images [N, ...], labels [N])``.
        layer: the module whose output is measured (see :func:`measurement_layer`).
        num_classes: number of classes (labels outside ``[0, num_classes)`` are ignored).
        forward: how to call the model on images (default ``model``).

    Returns:
        :class:`ClassChannelStats` on the model's device.
    """
    from lightning_vis.isolation import isolated
    from lightning_vis.layers import eager_forward, unwrap_model

    model = unwrap_model(model) if forward is None else model
    target = _module(unwrap_model(model), layer)
    device, dtype = _model_device(model)
    state: dict[str, Any] = {"stats": None, "means": None}

    def sink(output: torch.Tensor) -> None:
        if state["stats"] is None:
            if output.ndim < 2:
                raise ValueError(f"Module {layer!r} has no channels: its output has shape {tuple(output.shape)}")
            state["stats"] = ClassChannelStats.empty(num_classes, output.shape[1], device=output.device)
        state["means"] = state["stats"].update_channels(output)

    capture = _Capture(sink)
    handle = target.register_forward_hook(capture)
    try:
        with isolated(unwrap_model(model)), torch.no_grad(), eager_forward(unwrap_model(model)):
            for images, labels in batches:
                capture.armed = True
                (forward or model)(images.to(device=device, dtype=dtype or images.dtype))
                capture.armed = False
                if state["means"] is None:
                    raise ValueError(f"Module {layer!r} was not called by the forward pass")
                state["stats"].add_class_means(state["means"], labels)
                state["means"] = None
    finally:
        handle.remove()
    if state["stats"] is None:
        raise ValueError("collect_class_stats got no batches")
    return state["stats"]


@dataclass
class Ablation:
    """Accuracy with channels zeroed: ``correct[r]`` of ``total`` samples for ``fractions[r]``.

    ``at_layer``: whether the fractions shared the forward up to the layer (``replicate="layer"``).
    """

    fractions: tuple[float, ...]
    zeroed: tuple[int, ...]
    correct: torch.Tensor
    total: torch.Tensor
    at_layer: bool = False

    @property
    def accuracy(self) -> dict[float, float]:
        """Fraction zeroed -> accuracy (``0.0``: nothing zeroed)."""
        total = float(self.total)
        return {p: float(c) / total if total else float("nan") for p, c in zip(self.fractions, self.correct.tolist())}


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    values = []
    for p in fractions:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"Invalid fraction {p!r} in {tuple(fractions)!r}. Must be numbers in [0, 1]")
        values.append(float(p))
    return tuple(dict.fromkeys([0.0, *values]))


_REPLICATE = ("auto", "layer", "input")


def ablation_accuracy(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    layer: str,
    order: torch.Tensor,
    fractions: Sequence[float] = (0.1, 0.2, 0.3),
    *,
    forward: Callable[[torch.Tensor], Any] | None = None,
    chunk_rows: int = 1024,
    replicate: str = "auto",
) -> Ablation:
    """Accuracy with the first ``round(p·C)`` channels of ``order`` zeroed at ``layer``'s output, per ``p``.

    Pass ``channel_order(means)`` to zero the least active channels (Shang et al.), or
    ``channel_order(means, most_active_first=True)`` for the most active. A forward hook
    multiplies the layer's output by a channel mask. All fractions of a batch run in one
    forward (chunked to at most ``chunk_rows`` rows), under
    :func:`~lightning_vis.isolation.isolated` (eval mode, state and RNG restored) and
    ``no_grad``; the hook is removed on exit, also on error. ``0.0`` (nothing zeroed) is
    always evaluated on the same batches. Samples whose label is outside the model's
    classes are not counted.

    How the fractions share a forward (``replicate``):

    * ``"layer"``: the batch runs once up to the layer; the hook repeats the layer's
      output once per fraction (each copy masked) and only the rest of the network runs
      on the repeated rows. For the last convolution this costs about one forward per
      batch, whatever the number of fractions. It needs a network whose part after the
      layer treats samples independently and takes nothing else from before the layer
      (no skip connection around it).
    * ``"input"``: the batch is repeated once per fraction at the input (the masks
      applied at the layer): ``1 + len(fractions)`` forwards' worth; always valid.
    * ``"auto"`` (default): ``"layer"`` when it gives the same scores as ``"input"`` on
      the first two images of the first batch (checked once per call), else ``"input"``.

    Args:
        model: the network (its output, or the first ``[N, classes]`` tensor in it, are the class scores).
        batches: ``(images, labels)`` pairs.
        layer: module name whose output is masked (:func:`measurement_layer`); called
            once per forward.
        order: ``[C]`` channel indices, the first ones zeroed first.
        fractions: fractions of the channels to zero, each in [0, 1].
        forward: how to call the model on images (default ``model``).
        chunk_rows: most rows per forward.
        replicate: ``"auto"``, ``"layer"`` or ``"input"`` (see above).

    Returns:
        :class:`Ablation`: ``fractions`` (``0.0`` first), channels zeroed per fraction,
        correct counts and the number of samples; ``.accuracy`` as a dict.

    Raises:
        ValueError: a fraction outside [0, 1], an unknown layer or ``replicate``, an
            ``order`` that does not match the layer's channels, an output without class
            scores.
    """
    from lightning_vis.isolation import isolated
    from lightning_vis.layers import eager_forward, unwrap_model

    fractions = _check_fractions(fractions)
    if order.ndim != 1:
        raise ValueError(f"order must be [C] channel indices, got shape {tuple(order.shape)}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"Invalid value for chunk_rows={chunk_rows!r}. Must be an int >= 1")
    if replicate not in _REPLICATE:
        raise ValueError(f"Invalid value for replicate={replicate!r}. Must be one of {', '.join(map(repr, _REPLICATE))}")
    eager = unwrap_model(model)
    target = _module(eager, layer)
    device, dtype = _model_device(model)
    channels = order.numel()
    order = order.to(device="cpu", dtype=torch.long)
    zeroed = tuple(zeroed_count(p, channels) for p in fractions)
    masks = torch.ones(len(fractions), channels)
    for r, k in enumerate(zeroed):
        masks[r, order[:k]] = 0.0
    masks = masks.to(device)
    state: dict[str, Any] = {"mask": None, "at_layer": False}

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        mask = state["mask"]
        if mask is None or not isinstance(output, torch.Tensor):
            return None
        if output.ndim < 2 or output.shape[1] != channels:
            raise ValueError(
                f"Module {layer!r} gave an output of shape {tuple(output.shape)}; the channel order has {channels} "
                "channels"
            )
        if state["at_layer"]:  # [N, C, ...] -> [R·N, C, ...], copy r masked by mask[r]
            view = mask.view(mask.shape[0], 1, channels, *([1] * (output.ndim - 2))).to(output.dtype)
            return (output.unsqueeze(0) * view).flatten(0, 1)
        if output.shape[0] != mask.shape[0]:
            raise ValueError(f"Module {layer!r} gave {output.shape[0]} rows, expected {mask.shape[0]}")
        return output * mask.view(mask.shape[0], channels, *([1] * (output.ndim - 2))).to(output.dtype)

    def scores(x: torch.Tensor, rows: slice, at_layer: bool) -> torch.Tensor:
        """Class scores ``[R, N, classes]`` of images ``x`` for the masks ``rows``."""
        n, reps = x.shape[0], rows.stop - rows.start
        state["at_layer"] = at_layer
        if at_layer:
            state["mask"] = masks[rows]
            out = (forward or model)(x)
        else:
            state["mask"] = masks[rows].repeat_interleave(n, dim=0)
            out = (forward or model)(x.repeat(reps, *([1] * (x.ndim - 1))) if reps > 1 else x)
        state["mask"] = None
        return _logits(out, reps * n).view(reps, n, -1)

    def layer_path_works(x: torch.Tensor) -> bool:
        every = slice(0, len(fractions))
        reference = scores(x, every, False)
        try:
            fast = scores(x, every, True)
        except (RuntimeError, ValueError):
            return False
        return fast.shape == reference.shape and torch.allclose(fast, reference, rtol=1e-4, atol=1e-5)

    handle = target.register_forward_hook(hook)
    try:
        with isolated(eager), torch.no_grad(), eager_forward(eager):
            # created here, outside inference mode, so that they can be updated in place
            correct = torch.zeros(len(fractions), dtype=torch.long, device=device)
            total = torch.zeros((), dtype=torch.long, device=device)
            at_layer = None if replicate == "auto" else replicate == "layer"
            for images, labels in batches:
                x = images.to(device=device, dtype=dtype or images.dtype)
                y = labels.to(device=device, dtype=torch.long)
                n = x.shape[0]
                if at_layer is None:
                    at_layer = layer_path_works(x[:2])
                group = max(1, chunk_rows // max(1, n))
                valid = None
                for start in range(0, len(fractions), group):
                    stop = min(len(fractions), start + group)
                    s = scores(x, slice(start, stop), at_layer)
                    if valid is None:
                        valid = (y >= 0) & (y < s.shape[2])
                    correct[start:stop] += ((s.argmax(2) == y) & valid).sum(1)
                total += valid.sum() if valid is not None else 0
    finally:
        handle.remove()
        state["mask"] = None
    return Ablation(fractions, zeroed, correct, total, bool(at_layer))
