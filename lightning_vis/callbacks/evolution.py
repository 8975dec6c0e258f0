"""``FeatureEvolution``: Zeiler & Fergus' Fig. 4 for your run, plus layer convergence by CKA."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_vis import render
from lightning_vis.callbacks._base import _VisMonitor, as_pattern_list, check_every, spread
from lightning_vis.cka import MIN_BATCH, StreamingGram, cka_from_grams, minibatch_slices
from lightning_vis.deconv import METHODS, project
from lightning_vis.isolation import isolated
from lightning_vis.layers import conv_layers, execution_order, resolve_layers, unwrap_model

__all__ = [
    "FeatureEvolution",
    "crop_to_field",
    "drop_column",
    "field_side",
    "log_epochs",
    "probe_layers",
    "snapshot_due",
]


#: Probe images that go through the network at once (probe passes are chunked: a pass's
#: activation memory is that of 16 images, whatever the probe size).
PROBE_CHUNK = 16


# --------------------------------------------------------------------------- pure helpers
def log_epochs(last: int) -> list[int]:
    """Log-spaced snapshot epochs up to ``last`` (1-based): 1, 2, 5, 10, 20, 50, 100, … and ``last``.

    A 1-2-5 series like the epochs of Zeiler & Fergus' Fig. 4 (1, 2, 5, 10, 20, 30, 40, 64),
    with the final epoch added.

    Example::

        >>> log_epochs(64)
        [1, 2, 5, 10, 20, 50, 64]
        >>> log_epochs(3)
        [1, 2, 3]
    """
    out, decade = [], 1
    while decade <= last:
        out.extend(e for e in (decade, 2 * decade, 5 * decade) if e <= last)
        decade *= 10
    if last >= 1 and last not in out:
        out.append(last)
    return out


def snapshot_due(
    epoch: int, every_n_epochs: int | None, epochs: Sequence[int] | str | None, max_epochs: int | None
) -> bool:
    """Whether the (1-based) ``epoch`` gets a snapshot.

    ``epochs`` (a list, or ``"log"``: the 1-2-5 series of :func:`log_epochs` plus
    ``max_epochs`` when it is known) takes precedence over ``every_n_epochs``.

    Example::

        >>> [e for e in range(1, 13) if snapshot_due(e, None, "log", 12)]
        [1, 2, 5, 10, 12]
        >>> [e for e in range(1, 13) if snapshot_due(e, None, "log", -1)]  # open-ended run
        [1, 2, 5, 10]
        >>> [e for e in range(1, 13) if snapshot_due(e, 4, None, 12)]
        [4, 8, 12]
    """
    if epochs is None:
        return every_n_epochs is not None and epoch % every_n_epochs == 0
    if epochs == "log":
        decade = 10 ** (len(str(epoch)) - 1)
        in_series = epoch % decade == 0 and epoch // decade in (1, 2, 5)
        return in_series or (max_epochs is not None and max_epochs > 0 and epoch == max_epochs)
    return epoch in epochs


def drop_column(epochs: Sequence[int]) -> int:
    """Which snapshot to drop to keep a log-spaced subset: the index to remove.

    The first and the latest snapshots are always kept. Of the others, the one whose
    removal leaves the smallest gap in log(epoch) goes (ties: the later one). Applied each
    time the history passes ``max_columns``, this keeps an approximately log-spaced
    subset as training goes on.

    Raises:
        ValueError: fewer than 3 snapshots (nothing can be dropped).

    Example::

        >>> drop_column([1, 2, 3, 4, 5])
        3
        >>> drop_column([1, 2, 5, 6, 20])  # 5 goes: 2 -> 6 is the smallest log-gap left
        2
    """
    if len(epochs) < 3:
        raise ValueError(f"Need at least 3 snapshots to drop one, got {len(epochs)}")
    logs = [math.log(max(e, 1)) for e in epochs]
    gaps = [(logs[i + 1] - logs[i - 1], -i) for i in range(1, len(epochs) - 1)]
    return -min(gaps)[1]


def field_side(projections: torch.Tensor) -> int:
    """Side of the square that holds the support (receptive field) of every projection.

    ``projections`` is ``[K, C, H, W]``; the result is the largest side of their support
    boxes (:func:`lightning_vis.render.support_boxes`), or the image size when all are zero.

    Example::

        >>> p = torch.zeros(2, 1, 16, 16)
        >>> p[0, 0, 2:5, 3:6] = 1.0
        >>> p[1, 0, 8:10, 8:12] = -1.0
        >>> field_side(p)
        4
    """
    boxes = render.support_boxes(projections)
    found = boxes[:, 0] >= 0
    if not found.any():
        return max(projections.shape[-2:])
    sizes = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1)[found]
    return int(sizes.max())


def crop_to_field(projections: torch.Tensor, side: int) -> torch.Tensor:
    """Square windows of ``side`` pixels centred on each projection's support.

    Zeiler & Fergus show each unit's projection cropped to its receptive field; with one
    ``side`` per layer, every snapshot of a unit is shown at the same scale. Windows are
    shifted to stay inside the image; an all-zero projection is cropped at the centre.

    Args:
        projections: ``[K, C, H, W]``.
        side: window side in pixels (clipped to the image).

    Returns:
        ``[K, C, s, s]`` with ``s = min(side, H, W)``.

    Example::

        >>> p = torch.zeros(1, 1, 8, 8)
        >>> p[0, 0, 6, 7] = 1.0
        >>> crop_to_field(p, 3)[0, 0]
        tensor([[0., 0., 0.],
                [0., 0., 1.],
                [0., 0., 0.]])
    """
    k, _, h, w = projections.shape
    s = max(1, min(side, h, w))
    boxes = render.support_boxes(projections).tolist()
    out = []
    for i, (top, left, bottom, right) in enumerate(boxes):
        cy, cx = ((top + bottom) / 2, (left + right) / 2) if top >= 0 else (h / 2, w / 2)
        y0 = min(max(int(round(cy - s / 2)), 0), h - s)
        x0 = min(max(int(round(cx - s / 2)), 0), w - s)
        out.append(projections[i, :, y0 : y0 + s, x0 : x0 + s])
    return torch.stack(out) if k else projections[:, :, :s, :s]


@contextmanager
def _capture_outputs(model: nn.Module, names: Sequence[str], sink: Callable[[str, torch.Tensor], None]) -> Iterator:
    modules = dict(model.named_modules())
    handles = []
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(lambda m, a, out, name=name: sink(name, out)))
        yield
    finally:
        for h in handles:
            h.remove()


def probe_layers(
    model: nn.Module,
    images: torch.Tensor,
    layers: Sequence[str],
    *,
    batch_size: int | None = None,
    forward: Callable[[torch.Tensor], Any] | None = None,
) -> dict[str, tuple[list[torch.Tensor], torch.Tensor]]:
    """Per layer: the CKA Gram matrices of its probe activations, and each channel's peak per image.

    The probe runs in minibatches (see :func:`lightning_vis.cka.minibatch_slices`) under
    :func:`~lightning_vis.isolation.isolated` and ``torch.no_grad()``, each minibatch in
    chunks of at most ``PROBE_CHUNK`` (16) images, so a probe pass holds one chunk's
    activations, never the whole probe's. Only the ``b × b`` Gram matrices (assembled from
    the chunks by :class:`lightning_vis.cka.StreamingGram`: a minibatch larger than a chunk
    keeps the watched layers' flattened activations until its Gram matrix is built, in
    host memory when they are large) and the ``[N, C]`` peaks are kept.

    Args:
        model: the network; ``layers`` are its ``named_modules()`` names.
        images: ``[N, C, H, W]`` probe images, ``N >= 4``.
        layers: the layers to watch; each must output ``[N, C, ...]``.
        batch_size: CKA minibatch size; ``None``: one batch of all ``N``.
        forward: what to call instead of ``model(images)``.

    Returns:
        ``{layer: (grams, peaks)}``: a list of float64 ``[b, b]`` Gram matrices, one per
        minibatch, and float32 ``[N, C]`` spatial maxima per image and channel.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3))
        >>> out = probe_layers(net, torch.randn(8, 3, 9, 9), ["0", "2"], batch_size=4)
        >>> [len(out["0"][0]), tuple(out["0"][1].shape), tuple(out["2"][1].shape)]
        [2, (8, 4), (8, 5)]
    """
    grams: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    peaks: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    streams: dict[str, StreamingGram] = {}
    seen: set[str] = set()

    def sink(name: str, out: Any) -> None:
        if name in seen:  # a module called again within one forward: its first call counts
            return
        if not isinstance(out, torch.Tensor) or out.ndim < 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"Layer {name!r} must output a tensor [N, C, ...] with channels, got {shape}")
        seen.add(name)
        streams[name].add(out.detach())
        peak = out.detach().flatten(2).amax(dim=2) if out.ndim > 2 else out.detach()
        peaks[name].append(peak.float().cpu())

    with isolated(model), torch.no_grad(), _capture_outputs(model, layers, sink):
        for sl in minibatch_slices(images.shape[0], batch_size):
            # each CKA minibatch goes through the network in chunks of at most PROBE_CHUNK
            # images (bounded memory); its Gram matrix is assembled from the chunks
            streams.clear()
            streams.update((name, StreamingGram(sl.stop - sl.start)) for name in layers)
            for start in range(sl.start, sl.stop, PROBE_CHUNK):
                seen.clear()
                (forward or model)(images[start : min(start + PROBE_CHUNK, sl.stop)])
                missing = [name for name in layers if name not in seen]
                if missing:
                    raise ValueError(f"Layers {missing} were not called by the forward pass")
            for name in layers:
                grams[name].append(streams[name].compute())
    return {name: (grams[name], torch.cat(peaks[name])) for name in layers}


def _fingerprint(probe: torch.Tensor) -> list[float]:
    x = probe.detach().double().cpu()
    return [float(s) for s in x.shape] + [float(x.sum()), float((x * x).sum())]


# --------------------------------------------------------------------------- the callback
class FeatureEvolution(_VisMonitor):
    """Feature evolution during training (Zeiler & Fergus 2014, Fig. 4) and when each layer settles.

    At each snapshot (after the last optimizer step of a scheduled training epoch, before
    that epoch's validation), for each watched layer:

    * the DeconvNet projection of each tracked unit's strongest activation over the probe
      set (:func:`lightning_vis.project`), cropped to the layer's receptive field, is
      stored as a small uint8 thumbnail (zero at mid-grey, each scaled by its own max
      ``|value|``). Tracked
      units are chosen once, at the first snapshot: the ``top_k`` channels with the
      largest mean (over the probe images) of their per-image maximum activation;
    * the layer's probe activations are compared with linear CKA (unbiased minibatch
      estimator, :mod:`lightning_vis.cka`) to the previous and to the first snapshot.
      Only the probe's Gram matrices are kept (``b × b`` per minibatch), not activations.

    A layer has *settled at epoch E* when the snapshot at E and the one after it both
    have CKA to their previous snapshot ≥ ``threshold`` (E is recorded once, when the
    second snapshot confirms it). Bottom-up convergence (Raghu et al.) shows as lower
    layers settling earlier.

    Past ``max_columns`` snapshots the history keeps a log-spaced subset (the first and
    the latest are always kept; see :func:`drop_column`). Snapshots (thumbnails, epochs,
    tracked channels, Gram matrices for CKA, settled epochs) are saved in the checkpoint,
    so a resumed run continues the same strips. Every probe pass runs in eval mode under
    :func:`~lightning_vis.isolation.isolated`: training is bit-identical with and without
    the callback. Under DDP every rank takes the snapshot and then adopts rank 0's (one
    broadcast per snapshot, on every rank), so all ranks hold the same state; only global
    rank 0 renders and writes.

    **Logged** (images and text to every TensorBoard logger, scalars to every logger, on
    global rank 0, at the snapshot's ``global_step``):

    * ``evolution/<layer>``: one row per tracked unit (labelled ``ch <channel>``), one
      column per snapshot (labelled ``ep <epoch>``, 1-based), growing as training goes;
    * ``cka/<layer>``: linear CKA of the layer's probe activations to the previous
      snapshot (from the second snapshot on; near 1: the layer has settled);
    * ``cka_first/<layer>``: linear CKA to the first snapshot;
    * ``evolution/settled``: text, once per layer, when it settles.

    After each snapshot: ``callback.settled`` (``{layer: epoch or None}``),
    ``callback.cka`` (``{layer: [(epoch, cka_to_previous, cka_to_first), ...]}``),
    ``callback.epochs`` (the snapshots' epochs), ``callback.tracked`` (``{layer: channels}``),
    ``callback.layers``, ``callback.probe_images``; ``callback.strip(layer)`` renders the
    current image.

    Args:
        probe: fixed probe images ``[N, C, H, W]`` (``N >= 4``), or ``None`` for the first
            ``num_probe`` images of the validation (else training) dataset, chosen once at
            the start of training.
        layers: convolution names or glob patterns; default: up to ``max_layers``
            convolutions spread over the depth, in execution order.
        top_k: tracked units (rows) per layer.
        every_n_epochs: take a snapshot at the end of every this many epochs.
        epochs: instead of ``every_n_epochs``: an explicit list of (1-based) epochs, or
            ``"log"`` for 1, 2, 5, 10, 20, 50, … and the last epoch (:func:`log_epochs`).
        num_probe: probe size when ``probe`` is ``None`` (>= 4).
        max_columns: most snapshots kept (>= 2); older ones are thinned log-spaced.
        threshold: CKA to the previous snapshot at or above which a layer counts as unchanged.
        method: projection method, ``"deconvnet"``, ``"guided"`` or ``"saliency"``.
        cka_batch_size: CKA minibatch size (>= 4); ``None``: the whole probe as one batch.
        max_layers: most layers picked by default.
        crop: show each projection cropped to the layer's receptive field (its support at
            the first snapshot, one square size per layer, as Zeiler & Fergus do), else
            the whole image.
        thumb_px: stored thumbnails are at most this many pixels on a side.
        cell_px: drawn size of a thumbnail in the strip.

    Raises:
        ValueError: bad argument values (here), or at ``setup`` / the start of training:
            an unknown layer or one that is not a convolution, a model without
            convolutions, a probe that does not fit the model, ``top_k`` larger than a
            layer's channels, no probe images to be found.

    Example::

        >>> from lightning_vis.callbacks import FeatureEvolution
        >>> FeatureEvolution(layers="net.features.*", epochs="log")
        FeatureEvolution(layers=['net.features.*'], top_k=4, epochs='log')
    """

    def __init__(
        self,
        probe: torch.Tensor | None = None,
        layers: str | Iterable[str] | None = None,
        top_k: int = 4,
        every_n_epochs: int | None = 1,
        *,
        epochs: Iterable[int] | str | None = None,
        num_probe: int = 64,
        max_columns: int = 16,
        threshold: float = 0.99,
        method: str = "deconvnet",
        cka_batch_size: int | None = None,
        max_layers: int = 4,
        crop: bool = True,
        thumb_px: int = 32,
        cell_px: int = 48,
    ) -> None:
        super().__init__()
        self.probe = self._check_probe(probe)
        if self.probe is not None and self.probe.shape[0] < MIN_BATCH:
            raise ValueError(
                f"probe must hold at least {MIN_BATCH} images for CKA, got shape {tuple(self.probe.shape)}"
            )
        self.layer_patterns = as_pattern_list(layers)
        check_every("top_k", top_k, allow_none=False)
        check_every("max_layers", max_layers, allow_none=False)
        check_every("thumb_px", thumb_px, allow_none=False)
        check_every("cell_px", cell_px, allow_none=False)
        self.every_n_epochs = check_every("every_n_epochs", every_n_epochs)
        if isinstance(epochs, str):
            if epochs != "log":
                raise ValueError(f"Invalid value for epochs={epochs!r}. Must be 'log', a list of epochs >= 1, or None")
        elif epochs is not None:
            epochs = list(epochs)
            if not epochs or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in epochs):
                raise ValueError(
                    f"Invalid value for epochs={epochs!r}. Must be 'log', a non-empty list of epochs >= 1 "
                    "(1-based), or None"
                )
            epochs = sorted(set(epochs))
        if epochs is not None and self.every_n_epochs not in (None, 1):
            raise ValueError(
                f"Give either every_n_epochs={self.every_n_epochs} or epochs={epochs!r}, not both "
                "(leave every_n_epochs at 1 when passing epochs)"
            )
        if epochs is None and self.every_n_epochs is None:
            raise ValueError("Invalid value for every_n_epochs=None without epochs: no snapshot would be taken")
        self.epochs_schedule = epochs
        if isinstance(num_probe, bool) or not isinstance(num_probe, int) or num_probe < MIN_BATCH:
            raise ValueError(f"Invalid value for num_probe={num_probe!r}. Must be an int >= {MIN_BATCH}")
        if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 2:
            raise ValueError(f"Invalid value for max_columns={max_columns!r}. Must be an int >= 2")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"Invalid value for threshold={threshold!r}. Must be a number in (0, 1]")
        if method not in METHODS:
            raise ValueError(f"Invalid value for method={method!r}. Must be one of {', '.join(map(repr, METHODS))}")
        if cka_batch_size is not None and (
            isinstance(cka_batch_size, bool) or not isinstance(cka_batch_size, int) or cka_batch_size < MIN_BATCH
        ):
            raise ValueError(
                f"Invalid value for cka_batch_size={cka_batch_size!r}. Must be an int >= {MIN_BATCH} or None"
            )
        self.top_k = top_k
        self.num_probe = num_probe
        self.max_columns = max_columns
        self.threshold = float(threshold)
        self.method = method
        self.cka_batch_size = cka_batch_size
        self.max_layers = max_layers
        self.crop = bool(crop)
        self.thumb_px = thumb_px
        self.cell_px = cell_px
        self._reset_state()

    def _reset_state(self) -> None:
        self._layers: list[str] | None = None
        self._probe: torch.Tensor | None = None
        self._ready = False
        self._fingerprint: list[float] | None = None
        self.epochs: list[int] = []
        self.steps: list[int] = []
        self.tracked: dict[str, list[int]] = {}
        self._field: dict[str, int] = {}  # layer -> crop side (its receptive field), fixed at the first snapshot
        self._thumbs: dict[str, list[torch.Tensor]] = {}  # layer -> per snapshot uint8 [K, C, h, w]
        self._grams_first: dict[str, list[torch.Tensor]] = {}
        self._grams_prev: dict[str, list[torch.Tensor]] = {}
        self._streak: dict[str, int] = {}
        self.cka: dict[str, list[tuple[int, float, float]]] = {}
        self.settled: dict[str, int | None] = {}

    def __repr__(self) -> str:
        when = f"epochs={self.epochs_schedule!r}" if self.epochs_schedule is not None else (
            f"every_n_epochs={self.every_n_epochs}"
        )
        return f"{type(self).__name__}(layers={self.layer_patterns!r}, top_k={self.top_k}, {when})"

    def _config(self) -> dict:
        return {"layers": self.layer_patterns, "top_k": self.top_k}

    @property
    def probe_images(self) -> torch.Tensor | None:
        """The probe images in use (fixed at the start of training; identical on every rank)."""
        return self._probe

    @property
    def layers(self) -> list[str] | None:
        """The watched layers (resolved at setup, or for the default at the start of training)."""
        return self._layers

    # ------------------------------------------------------------------ schedule
    def _due(self, trainer: Any) -> bool:
        if trainer.sanity_checking or trainer.global_step == self._last_step:
            return False
        return snapshot_due(trainer.current_epoch + 1, self.every_n_epochs, self.epochs_schedule, trainer.max_epochs)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        model, convs = self._require_convs(pl_module)
        if self.layer_patterns is not None:
            self._layers = resolve_layers(model, self.layer_patterns, convs, what="convolutions")
            self._check_top_k(model)
        if self.probe is not None:
            self._check_fits(pl_module, self.probe, convs)
        self._check_loggers(trainer)

    def _check_top_k(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for name in self._layers or []:
            channels = getattr(modules[name], "out_channels", None)
            if channels is not None and self.top_k > channels:
                raise ValueError(
                    f"Invalid value for top_k={self.top_k}: layer {name!r} has {channels} channels. "
                    f"Must be <= {channels}"
                )

    def _check_fits(
        self, pl_module: Any, probe: torch.Tensor, convs: list[str], final: bool = False
    ) -> list[str] | None:
        """The convolutions in the order the probe passes them; ``None`` until the first batch's call."""
        if not self._probe_runs(pl_module, probe, final=final):
            return None
        example = self._to_model(pl_module, probe[:2])
        return execution_order(pl_module, example, convs, forward=self._forward_fn(pl_module))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        found = self._take_probe(trainer, pl_module, self.probe, self.num_probe)
        probe = found.images
        if self.probe is None and probe.shape[0] < MIN_BATCH:
            raise ValueError(
                f"FeatureEvolution: the data gave only {probe.shape[0]} probe images; CKA needs at least "
                f"{MIN_BATCH}. Pass probe=<tensor [N, C, H, W]>"
            )
        self._probe = self._to_model(pl_module, probe)
        fingerprint = _fingerprint(self._probe)
        if self._fingerprint is not None and self._fingerprint != fingerprint and self._grams_prev:
            self._warn_once(
                "probe-changed",
                "FeatureEvolution: the probe images differ from those of the checkpoint; CKA restarts from the "
                "next snapshot (the strips continue).",
            )
            self._grams_first, self._grams_prev = {}, {}
        self._fingerprint = fingerprint
        self._ready = False
        self._prepare(pl_module)

    def _prepare(self, pl_module: Any, final: bool = False) -> None:
        """Default layers, once the probe can run (maybe only after the first training batch)."""
        model = unwrap_model(pl_module)
        convs = list(conv_layers(model))
        order = self._check_fits(pl_module, self._probe, convs, final)
        if order is None:
            return
        if self._layers is None:
            if not order:
                raise ValueError(f"FeatureEvolution: a forward pass of {type(model).__name__} called no convolution")
            self._layers = spread(order, self.max_layers)
            self._check_top_k(model)
        for name in self._layers:
            self.settled.setdefault(name, None)
        self._ready = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The snapshot of an epoch is taken after its last optimizer step, before validation:
        # a checkpoint saved at the end of validation (ModelCheckpoint's default) then holds it.
        if not self._ready and self._probe is not None:
            self._prepare(pl_module, final=True)
        last = batch_idx + 1 >= trainer.num_training_batches or trainer.is_last_batch
        if last and self._ready and self._due(trainer):
            self._snapshot(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._ready and self._due(trainer):  # the last batch was not recognised as such
            self._snapshot(trainer, pl_module)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._probe is not None:  # keep it for inspection, but free device memory
            self._probe = self._probe.cpu()

    # ------------------------------------------------------------------ work
    def _snapshot(self, trainer: Any, pl_module: Any) -> None:
        self._last_step = trainer.global_step
        epoch = trainer.current_epoch + 1
        layers = self._layers or []
        probe = self._probe
        computed: dict[str, dict[str, Any]] = {}
        with isolated(pl_module):
            forward = self._forward_fn(pl_module)
            stats = probe_layers(pl_module, probe, layers, batch_size=self.cka_batch_size, forward=forward)
            for name in layers:
                grams, peaks = stats[name]
                tracked = self.tracked.get(name)
                if tracked is None:
                    order = torch.sort(peaks.mean(dim=0), descending=True, stable=True).indices
                    tracked = order[: self.top_k].tolist()
                channels = torch.tensor(tracked, dtype=torch.long)
                best = peaks[:, channels].argmax(dim=0)  # strongest probe image per unit (first on ties)
                proj = project(
                    pl_module,
                    probe[best.to(probe.device)],
                    name,
                    channels=channels[:, None],
                    method=self.method,
                    forward=forward,
                )
                images = proj.images[:, 0].detach().cpu()
                field = self._field.get(name)
                if self.crop:
                    field = field_side(images) if field is None else field
                    images = crop_to_field(images, field)
                thumbs = render.signed_thumbnail(images, max_px=self.thumb_px)
                computed[name] = {
                    "grams": [g.cpu() for g in grams],
                    "tracked": tracked,
                    "field": field,
                    "thumbs": thumbs,
                }
        # Under DDP, ranks can differ slightly (e.g. BatchNorm running statistics are per rank
        # between forwards): every rank adopts rank 0's snapshot, so all keep the same state.
        computed = trainer.strategy.broadcast(computed, src=0)
        for name in layers:
            self.tracked.setdefault(name, list(computed[name]["tracked"]))
            if computed[name]["field"] is not None:
                self._field.setdefault(name, int(computed[name]["field"]))
            self._thumbs.setdefault(name, []).append(computed[name]["thumbs"])
        metrics, texts = {}, []
        for name in layers:
            grams = computed[name]["grams"]
            prev, first = self._grams_prev.get(name), self._grams_first.get(name)
            to_prev = cka_from_grams(prev, grams) if prev is not None else None
            to_first = cka_from_grams(first, grams) if first is not None else None
            if to_prev is not None and not math.isfinite(to_prev):
                self._warn_once(
                    f"cka-undefined-{name}",
                    f"FeatureEvolution: CKA of {name!r} is undefined at epoch {epoch}: its activations barely vary "
                    "across the probe images (the HSIC estimate is <= 0), e.g. a 1x1 map after global pooling of "
                    "an untrained net; no cka/ scalar is logged for it until they do.",
                )
            elif to_prev is not None:
                metrics[f"cka/{name}"] = to_prev
                if to_first is not None and math.isfinite(to_first):
                    metrics[f"cka_first/{name}"] = to_first
                self.cka.setdefault(name, []).append((epoch, to_prev, to_first))
                self._streak[name] = self._streak.get(name, 0) + 1 if to_prev >= self.threshold else 0
                if self._streak[name] >= 2 and self.settled.get(name) is None:
                    self.settled[name] = self.epochs[-1]
                    texts.append(
                        f"`{name}` settled at epoch {self.epochs[-1]}: CKA to the previous snapshot >= "
                        f"{self.threshold:g} at epochs {self.epochs[-1]} and {epoch}"
                    )
            self._grams_prev[name] = grams
            self._grams_first.setdefault(name, grams)
        self.epochs.append(epoch)
        self.steps.append(trainer.global_step)
        if len(self.epochs) > self.max_columns:
            drop = drop_column(self.epochs)
            del self.epochs[drop], self.steps[drop]
            for name in layers:
                del self._thumbs[name][drop]
        self._log_scalars(trainer, metrics)
        if texts:
            self._log_text(trainer, "evolution/settled", "\n\n".join(texts))
        if self._writers(trainer):
            for name in layers:
                self._log_image(trainer, f"evolution/{name}", self.strip(name))

    def strip(self, layer: str) -> torch.Tensor:
        """The current ``evolution/<layer>`` image: uint8 ``[3, H, W]``.

        Raises:
            ValueError: no snapshot of ``layer`` has been taken.
        """
        columns = self._thumbs.get(layer)
        if not columns:
            known = ", ".join(repr(n) for n in self._thumbs) or "(none yet)"
            raise ValueError(f"No snapshot of layer {layer!r}; layers with snapshots: {known}")
        thumbs = torch.stack(columns, dim=1)  # [K, T, C, h, w]
        if thumbs.shape[2] not in (1, 3):  # e.g. 2- or 4-channel input: show the channel mean
            thumbs = thumbs.float().mean(dim=2, keepdim=True).round().to(torch.uint8)
        return render.evolution_strip(
            thumbs,
            [f"ch {c}" for c in self.tracked[layer]],
            [f"ep {e}" for e in self.epochs],
            cell_px=self.cell_px,
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "layers": self._layers,
            "fingerprint": self._fingerprint,
            "epochs": list(self.epochs),
            "steps": list(self.steps),
            "tracked": {k: list(v) for k, v in self.tracked.items()},
            "field": dict(self._field),
            "thumbs": {k: [t.clone() for t in v] for k, v in self._thumbs.items()},
            "grams_first": {k: [g.cpu() for g in v] for k, v in self._grams_first.items()},
            "grams_prev": {k: [g.cpu() for g in v] for k, v in self._grams_prev.items()},
            "streak": dict(self._streak),
            "cka": {k: list(v) for k, v in self.cka.items()},
            "settled": dict(self.settled),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("layers") is not None:
            self._layers = list(state_dict["layers"])
        self._fingerprint = state_dict.get("fingerprint")
        self.epochs = list(state_dict.get("epochs", []))
        self.steps = list(state_dict.get("steps", []))
        self.tracked = {k: list(v) for k, v in state_dict.get("tracked", {}).items()}
        self._field = dict(state_dict.get("field", {}))
        self._thumbs = {k: list(v) for k, v in state_dict.get("thumbs", {}).items()}
        self._grams_first = {k: list(v) for k, v in state_dict.get("grams_first", {}).items()}
        self._grams_prev = {k: list(v) for k, v in state_dict.get("grams_prev", {}).items()}
        self._streak = dict(state_dict.get("streak", {}))
        self.cka = {k: [tuple(r) for r in v] for k, v in state_dict.get("cka", {}).items()}
        self.settled = dict(state_dict.get("settled", {}))
