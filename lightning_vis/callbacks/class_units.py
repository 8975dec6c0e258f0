"""``ClassUnitStatistics``: how the units of a layer serve the classes (Shang et al.), from the validation loop."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lightning_vis.callbacks._base import (
    _VisMonitor,
    check_every,
    class_names,
    find_images,
    find_labels,
    to_model,
)
from lightning_vis.class_stats import (
    ClassChannelStats,
    _Capture,
    _logits,
    ablation_accuracy,
    channel_means,
    channel_order,
    class_means,
    class_similarity,
    inactive_fraction,
    mean_off_diagonal,
    measurement_layer,
    shared_units,
    sparsity,
    specific_units,
    top_units,
)
from lightning_vis.isolation import isolated
from lightning_vis.layers import eager_forward, resolve_layers, unwrap_model

__all__ = ["ClassUnitStatistics"]

_DEFAULT_TOP_N = 10


def _check_ablate(ablate: Any) -> tuple[float, ...]:
    message = f"Invalid value for ablate={ablate!r}. Must be fractions in (0, 1], e.g. (0.1, 0.2, 0.3), or () for none"
    if isinstance(ablate, (int, float)) and not isinstance(ablate, bool):
        ablate = (ablate,)
    if not isinstance(ablate, Sequence) or isinstance(ablate, str):
        raise ValueError(message)
    values = []
    for p in ablate:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(message)
        values.append(float(p))
    return tuple(dict.fromkeys(values))


class ClassUnitStatistics(_VisMonitor):
    """Class-level statistics of one layer's units, collected during the validation loop.

    Shang et al.'s analyses of the last convolution, live: each channel's mean activation
    (spatially averaged per sample) is summed per class on the device during the
    validation loop's own forward (a forward hook on the layer, the labels from the
    batch; no extra pass over the data, nothing kept per sample), summed over DDP ranks at
    the end of the validation epoch, and turned into:

    * the per-class mean activation of each channel, :attr:`class_means` ``[classes, C]``;
    * the class × class cosine similarity of those vectors, :attr:`similarity` (near 1:
      the two classes drive the same units; Shang et al. Table 3);
    * shared units, :attr:`shared`: channels in *every* class's ``top_n`` (intersection
      rule); class-specific units, :attr:`specific`: per class the channels of its
      ``top_n`` that are in no other class's (difference rule);
    * per-channel sparsity (:attr:`sparsity`: fraction of the channel's outputs, every
      position of every sample, that are ``<= 0``, i.e. zero after the ReLU) and the
      fraction of samples on which it never fires anywhere (:attr:`inactive`);
    * :attr:`accuracy`: accuracy on the first ``ablate_batches`` validation batches with
      the fraction ``p`` of the *least* active channels (by mean activation over all
      samples) zeroed at the layer's output, for each ``p`` in ``ablate``; ``0.0`` is the
      unablated accuracy on the same batches (Shang et al. Tables 4-5: pruning the least
      active channels barely changes it). These passes run under
      :func:`~lightning_vis.isolation.isolated` (eval mode, ``no_grad``, state and RNG
      restored), every fraction of a batch in one forward.

    What is measured: for a convolution, the output of the activation module it feeds
    (past BatchNorm, e.g. its ``nn.ReLU``), so the statistics are those of the rectified
    channels and zeroing a channel removes it; where that activation is functional
    (``F.relu``) or a module called several times per forward, the convolution's own
    output. :attr:`layer_name` is the convolution, :attr:`site` the module measured.

    **Logged** (scalars to every logger, the rest to TensorBoard, on global rank 0), at the
    end of the validation of every ``every_n_epochs``-th epoch:

    * ``class_units/similarity``: image, the class × class similarity heatmap (rows
      labelled with class names where the data module, dataset or LightningModule has
      ``classes``/``class_names``);
    * ``class_units/similarity_offdiag``: scalar, mean off-diagonal similarity;
    * ``class_units/units``: text, a table of each class's top units, the shared and the
      class-specific ones;
    * ``class_units/shared``, ``class_units/specific``: scalars, how many units are shared
      by every class, and class-specific (all classes together);
    * ``class_units/sparsity``, ``class_units/inactive``: histograms over the channels;
      ``class_units/sparsity_mean``: scalar;
    * ``class_units/accuracy@0`` (unablated) and ``class_units/accuracy@<p>`` for each ``p``
      in ``ablate``: scalars.

    Args:
        layer: the layer (``named_modules()`` name of the LightningModule or a glob
            matching exactly one); default: the last convolution the input passes
            through, by execution order.
        top_n: units per class for the shared and class-specific rules. The default means
            "up to 10" (all channels of a smaller layer); an explicit value larger than the
            layer's channels is an error.
        every_n_epochs: collect during the validation of every this many epochs.
        ablate: fractions of the least active channels to zero for the accuracy scalars;
            ``()``: no ablation passes.
        ablate_batches: validation batches (the first ones of each collected epoch,
            kept on the CPU) re-run for the ablation; each costs ``1 + len(ablate)``
            evaluation forwards of the batch.
        num_classes: number of classes; default: the width of the model's output.
        chunk_rows: most rows per ablation forward (a batch repeated once per fraction).

    Raises:
        ValueError: bad argument values (here); at ``setup``: an unknown layer (the
            modules are listed), a model without convolutions (with ``layer=None``);
            when training starts: data without class labels (an integer tensor ``[N]``
            beside the images), a layer without channels or called several times per
            forward, ``top_n`` larger than the layer's channels, a model output without
            class scores ``[N, classes]``.

    Example::

        >>> from lightning_vis.callbacks import ClassUnitStatistics
        >>> ClassUnitStatistics(top_n=5, ablate=(0.2,))
        ClassUnitStatistics(layer=None, top_n=5, every_n_epochs=1, ablate=(0.2,), ablate_batches=2)
    """

    def __init__(
        self,
        layer: str | None = None,
        top_n: int = _DEFAULT_TOP_N,
        every_n_epochs: int = 1,
        ablate: Sequence[float] = (0.1, 0.2, 0.3),
        *,
        ablate_batches: int = 2,
        num_classes: int | None = None,
        chunk_rows: int = 1024,
    ) -> None:
        super().__init__()
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"layer must be a module name (str) or None, got {type(layer).__name__}: {layer!r}")
        self.layer = layer
        self.top_n = check_every("top_n", top_n, allow_none=False)
        self._top_n = top_n
        self.every_n_epochs = check_every("every_n_epochs", every_n_epochs, allow_none=False)
        self.ablate = _check_ablate(ablate)
        self.ablate_batches = check_every("ablate_batches", ablate_batches, allow_none=False)
        self.num_classes = check_every("num_classes", num_classes)
        self.chunk_rows = check_every("chunk_rows", chunk_rows, allow_none=False)
        self._layer_name: str | None = None
        self.site: str | None = None
        self._channels: int | None = None
        self._classes: int | None = None
        self._names: list[str] | None = None
        self._reset_run_state()
        # results of the last collected validation epoch
        self.class_means: torch.Tensor | None = None
        self.similarity: torch.Tensor | None = None
        self.shared: list[int] = []
        self.specific: dict[int, list[int]] = {}
        self.tops: dict[int, list[int]] = {}
        self.accuracy: dict[float, float] = {}
        self.sparsity: torch.Tensor | None = None
        self.inactive: torch.Tensor | None = None
        self.channel_means: torch.Tensor | None = None
        self.samples = 0

    def _reset_run_state(self) -> None:
        """What lives only while fitting (not pickled, not saved)."""
        self._example: torch.Tensor | None = None
        self._module: torch.nn.Module | None = None
        self._handle: Any = None
        self._capture: _Capture | None = None
        self._stats: ClassChannelStats | None = None
        self._means: torch.Tensor | None = None
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._collecting = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layer={self.layer!r}, top_n={self.top_n}, every_n_epochs={self.every_n_epochs}, "
            f"ablate={self.ablate!r}, ablate_batches={self.ablate_batches})"
        )

    def _config(self) -> dict:
        return {"layer": self.layer, "top_n": self.top_n, "ablate": self.ablate}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_example=None, _module=None, _handle=None, _capture=None, _stats=None, _means=None, _cache=[])
        state["_collecting"] = False
        for bound in ("log", "log_dict"):  # Lightning binds the module's log methods to callbacks during fit
            state.pop(bound, None)
        return state

    @property
    def layer_name(self) -> str | None:
        """The layer (a convolution by default), resolved when training starts."""
        return self._layer_name

    # ------------------------------------------------------------------ checks before step 1
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        model = unwrap_model(pl_module)
        if self.layer is None:
            self._require_convs(pl_module)
        else:
            names = [n for n, _ in model.named_modules() if n]
            hits = resolve_layers(model, self.layer, names, what="modules")
            if len(hits) != 1:
                shown = ", ".join(repr(h) for h in hits[:10])
                raise ValueError(f"ClassUnitStatistics: layer={self.layer!r} matches {len(hits)} modules ({shown}); "
                                 "name exactly one")  # fmt: skip
            self._layer_name = hits[0]
        self._check_loggers(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._reset_run_state()
        found = self._sample_batch(trainer, pl_module, 2)
        if found is None:
            raise ValueError(
                "ClassUnitStatistics: found no images [N, C, H, W] in the validation or training data; "
                "it collects from the validation batches (images and class labels)"
            )
        if found.labels is None:
            raise ValueError(
                "ClassUnitStatistics needs class labels: the validation batches have no integer tensor [N] "
                "beside the images (e.g. batches of (images, labels), or a dict with a 'label'/'target' key)"
            )
        self._example = found.images
        if self._probe_runs(pl_module, found.images):
            self._resolve(trainer, pl_module)

    def _resolve(self, trainer: Any, pl_module: Any) -> None:
        """Measured module, channels and classes, from a forward pass of two sample images."""
        model = unwrap_model(pl_module)
        x = to_model(pl_module, self._example[:2])
        forward = self._forward_fn(pl_module)
        layer, site = measurement_layer(model, x, self._layer_name, forward=forward)
        module = dict(model.named_modules())[site]
        shapes: list[torch.Size] = []
        handle = module.register_forward_hook(lambda m, a, o: shapes.append(o.shape))
        try:
            with isolated(model), torch.no_grad(), eager_forward(model):
                output = forward(x)
        finally:
            handle.remove()
        channels = int(shapes[0][1])
        try:
            classes = int(_logits(output, x.shape[0]).shape[1])
        except ValueError as err:
            if self.num_classes is None or self.ablate:
                need = "num_classes= and ablate=()" if self.ablate else "num_classes="
                raise ValueError(f"ClassUnitStatistics: {err}; pass {need}") from err
            classes = self.num_classes
        if self.num_classes is not None:
            classes = self.num_classes
        self._top_n = min(self.top_n, channels) if self.top_n == _DEFAULT_TOP_N else self.top_n
        if self._top_n > channels:
            raise ValueError(
                f"Invalid value for top_n={self.top_n}: {site!r} has {channels} channels. Must be <= {channels}"
            )
        names = class_names(trainer, pl_module)
        if names is not None and len(names) != classes:
            self._warn_once(
                "names",
                f"ClassUnitStatistics: the data names {len(names)} classes but the model has {classes}; "
                "class names are not shown",
            )
            names = None
        self._layer_name, self.site, self._module = layer, site, module
        self._channels, self._classes, self._names = channels, classes, names

    # ------------------------------------------------------------------ collection in the validation loop
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._collecting = False
        if self._example is None or not self._epoch_due(trainer, self.every_n_epochs):
            return  # not fitting (trainer.validate), sanity checking, or not due
        if self._module is None:
            self._resolve(trainer, pl_module)  # deferred: forward needed the first training batch's call
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        self._stats = ClassChannelStats.empty(self._classes, self._channels, device=device)
        self._cache = []
        self._means = None
        self._capture = _Capture(self._sink)
        self._handle = self._module.register_forward_hook(self._capture)
        self._collecting = True

    def _sink(self, output: torch.Tensor) -> None:
        if self._stats is not None:
            self._means = self._stats.update_channels(output)

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._collecting and dataloader_idx == 0:
            self._means = None
            self._capture.armed = True

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._collecting or dataloader_idx != 0:
            return
        self._capture.armed = False
        means, self._means = self._means, None
        if means is None:
            self._warn_once(
                "not-called", f"ClassUnitStatistics: a validation step did not call {self.site!r}; its batch is skipped"
            )
            return
        labels = find_labels(batch, means.shape[0])
        if labels is None:
            raise ValueError(
                f"ClassUnitStatistics: validation batch {batch_idx} has no class labels (an integer tensor "
                f"[{means.shape[0]}] beside the images)"
            )
        self._stats.add_class_means(means, labels)
        if self.ablate and len(self._cache) < self.ablate_batches:
            images = find_images(batch)
            if images is not None and images.shape[0] == labels.shape[0]:
                with torch.inference_mode(False):
                    self._cache.append((images.detach().cpu().clone(), labels.detach().cpu().clone()))

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._collecting:
            return
        self._collecting = False
        self._remove_hook()
        self._last_step = trainer.global_step
        stats, self._stats = self._stats, None
        cache, self._cache = self._cache, []
        # every rank: one collective for the counts, one for the ablation
        packed = trainer.strategy.reduce(stats.pack(), reduce_op="sum")
        with torch.inference_mode(False):
            stats = ClassChannelStats.unpack(packed.detach().cpu().clone(), self._classes, self._channels)
            self._summarise(stats)
        if self.ablate:
            self._ablate(trainer, pl_module, cache)
        if self.samples == 0:
            self._warn_once("empty", "ClassUnitStatistics: the validation epoch had no labelled samples; nothing logged")
            return
        self._log(trainer)

    def _summarise(self, stats: ClassChannelStats) -> None:
        means = class_means(stats)
        self.samples = int(stats.counts[:-1].sum())
        self.class_means = means.float()
        self.similarity = class_similarity(means).float()
        self.channel_means = channel_means(stats).float()
        self.sparsity = sparsity(stats).float()
        self.inactive = inactive_fraction(stats).float()
        tops = top_units(means, self._top_n)
        self.tops = {k: row for k, row in enumerate(tops.tolist()) if row[0] >= 0}
        self.shared = shared_units(means, self._top_n)
        self.specific = specific_units(means, self._top_n)
        self.accuracy = {}

    def _ablate(self, trainer: Any, pl_module: Any, cache: list) -> None:
        order = channel_order(self.channel_means)
        result = ablation_accuracy(
            pl_module, cache, self.site, order, self.ablate, forward=self._forward_fn(pl_module),
            chunk_rows=self.chunk_rows,
        )  # fmt: skip
        packed = torch.cat([result.correct.double(), result.total.double().reshape(1)])
        packed = trainer.strategy.reduce(packed.to(result.correct.device), reduce_op="sum")
        values = packed.detach().cpu().tolist()
        total = values[-1]
        self.accuracy = {p: (c / total if total else float("nan")) for p, c in zip(result.fractions, values[:-1])}

    # ------------------------------------------------------------------ logging (rank 0)
    def _log(self, trainer: Any) -> None:
        if not trainer.is_global_zero:
            return
        off = mean_off_diagonal(self.similarity)
        n_specific = sum(len(v) for v in self.specific.values())
        scalars = {
            "class_units/similarity_offdiag": off,
            "class_units/shared": len(self.shared),
            "class_units/specific": n_specific,
            "class_units/sparsity_mean": float(self.sparsity.mean()),
        }
        scalars.update({f"class_units/accuracy@{p:g}": acc for p, acc in self.accuracy.items()})
        self._log_scalars(trainer, {k: v for k, v in scalars.items() if not math.isnan(v)})  # NaN left out
        if not self._writers(trainer):
            return
        from lightning_vis import render

        where = self.site if self.site == self._layer_name else f"{self.site} (after {self._layer_name})"
        title = f"{where} · step {trainer.global_step}"
        image = render.similarity_heatmap(self.similarity, self._names, title=title)
        description = (
            f"Cosine similarity of the classes' mean activation vectors at `{where}` over {self.samples} "
            f"validation samples ({self._channels} channels). Near 1: the two classes drive the same units. "
            f"Mean off-diagonal: {off:.3f}."
        )
        self._log_image(trainer, "class_units/similarity", image, description=description)
        self._log_text(
            trainer,
            "class_units/units",
            render.units_markdown(self.tops, self.shared, self.specific, self._names, layer=where)
            + f"\n\nTop {self._top_n} units per class by mean activation, {self.samples} validation samples.",
        )
        self._log_histogram(trainer, "class_units/sparsity", self.sparsity)
        self._log_histogram(trainer, "class_units/inactive", self.inactive)

    # ------------------------------------------------------------------ cleanup
    def _remove_hook(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.remove()
        if self._capture is not None:
            self._capture.armed = False

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._remove_hook()
        self._collecting = False
        self._stats, self._cache = None, []
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._remove_hook()
        self._collecting = False
        self._stats, self._cache, self._module, self._example = None, [], None, None
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "layer_name": self._layer_name,
            "site": self.site,
            "results": {
                "class_means": self.class_means,
                "similarity": self.similarity,
                "shared": list(self.shared),
                "specific": {k: list(v) for k, v in self.specific.items()},
                "tops": {k: list(v) for k, v in self.tops.items()},
                "accuracy": dict(self.accuracy),
                "sparsity": self.sparsity,
                "inactive": self.inactive,
                "channel_means": self.channel_means,
                "samples": self.samples,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._layer_name is None:
            self._layer_name = state_dict.get("layer_name")
        self.site = self.site or state_dict.get("site")
        for key, value in (state_dict.get("results") or {}).items():
            setattr(self, key, value)
