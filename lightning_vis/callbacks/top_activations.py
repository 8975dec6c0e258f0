"""``TopActivations``: the dataset patches that excite each unit most, from the validation loop."""

from __future__ import annotations

from typing import Any

import torch

from lightning_vis import render
from lightning_vis.callbacks._base import (
    _VisMonitor,
    as_pattern_list,
    check_every,
    find_images,
    spread,
)
from lightning_vis.deconv import _CALL
from lightning_vis.layers import (
    _quote_list,
    conv_layers,
    execution_order,
    resolve_probe_layers,
    unwrap_model,
)
from lightning_vis.units import (
    ReceptiveField,
    TopActivationCollector,
    TopActivationsResult,
    _check_channel_list,
    merge_order,
    receptive_field,
)

#: Default number of layers: convolutions spread over the depth.
_DEFAULT_LAYERS = 4


class TopActivations(_VisMonitor):
    """Log, per layer, the validation patches that drive its most active units (units × top-k grids).

    CS231n's "maximally activating patches" and the right half of Zeiler & Fergus' Fig. 2,
    live: during the validation loop's own forward passes (forward hooks on the layers, no
    extra pass over the data) every image's strongest location per channel is merged into
    a running top-k on the device (:class:`lightning_vis.units.TopActivationCollector`),
    and the receptive-field patch of a unit (:func:`lightning_vis.receptive_field`) is cropped
    from the batch when it enters the top-k; nothing else is kept. At the end of the
    validation run the per-rank top-k lists are gathered on every rank and merged
    (DDP), the ``units`` channels with the highest mean top-k activation are chosen (or
    the ``channels`` given), and global rank 0 draws them with
    :func:`lightning_vis.render.top_activations_grid`: one row per unit, its ``top_k``
    patches framed and labelled with their activation; pixels outside the image are
    hatched. Collection touches no RNG, mode or buffer, so training is unchanged bit for
    bit. Sanity checking is skipped. After each run, ``callback.results[layer]`` holds
    the merged result of the units shown (a
    :class:`lightning_vis.units.TopActivationsResult`, on the CPU).

    **Logged** (to every TensorBoard logger, on global rank 0):

    * ``top_activations/<layer>``: one image per layer after the validation run of every
      ``every_n_epochs``-th training epoch.

    Args:
        layers: names or glob patterns (``named_modules()`` names of the LightningModule;
            ``"name#k"`` for the k-th call of a reused module); default: up to 4
            convolutions spread over the depth, in the order the input passes them.
        channels: show these channels of every layer (ints); default: the ``units`` most
            active ones of each layer.
        top_k: images (patches) per unit.
        every_n_epochs: collect and log during the validation of every this many epochs.
        units: how many units (rows) to show per layer when ``channels`` is ``None``.
        max_patch: stored patches are shrunk to at most this many pixels on their longer
            side (memory: ``channels × top_k × C_in × max_patch²`` values per layer).
        cell_px: side of a patch cell in the picture.

    Raises:
        ValueError: bad argument values (here); at ``setup``: an unknown layer (the
            convolutions are listed), a model without convolutions; when training starts
            (before step 1): no images in the data, a layer without a fixed receptive
            field or a feature-map output, ``channels`` out of range.

    Example::

        >>> from lightning_vis.callbacks import TopActivations
        >>> TopActivations(layers="net.features.*", top_k=6)
        TopActivations(layers=['net.features.*'], channels=None, top_k=6, every_n_epochs=1, units=9)
    """

    def __init__(
        self,
        layers: str | list[str] | None = None,
        channels: list[int] | None = None,
        top_k: int = 9,
        every_n_epochs: int = 1,
        *,
        units: int = 9,
        max_patch: int = 48,
        cell_px: int = 30,
    ) -> None:
        super().__init__()
        check_every("top_k", top_k, allow_none=False)
        check_every("units", units, allow_none=False)
        check_every("max_patch", max_patch, allow_none=False)
        self.every_n_epochs = check_every("every_n_epochs", every_n_epochs, allow_none=False)
        if isinstance(cell_px, bool) or not isinstance(cell_px, int) or cell_px < 8:
            raise ValueError(f"Invalid value for cell_px={cell_px!r}. Must be an int >= 8")
        if channels is not None:
            t = torch.as_tensor(channels)
            if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim != 1 or t.numel() == 0 or (t < 0).any():
                raise ValueError(f"Invalid value for channels={channels!r}. Must be a non-empty list of ints >= 0 or None")
            channels = [int(c) for c in t]
        self.layers = as_pattern_list(layers)
        self.channels = channels
        self.top_k = top_k
        self.units = units
        self.max_patch = max_patch
        self.cell_px = cell_px
        self._layer_names: list[str] | None = None
        self._fields: dict[str, ReceptiveField] = {}
        self._ready = False
        self._handles: list = []
        self._collectors: dict[str, TopActivationCollector] = {}
        self._images: torch.Tensor | None = None
        self._seen_in_batch: set[str] = set()
        self._calls: dict[str, int] = {}
        self._world = (1, 0)
        self._in_channels = 3
        self._local_count = 0
        self._runs = 0
        self.results: dict[str, TopActivationsResult] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layers!r}, channels={self.channels!r}, top_k={self.top_k}, "
            f"every_n_epochs={self.every_n_epochs}, units={self.units})"
        )

    def _config(self) -> dict:
        return {"layers": self.layers, "channels": self.channels, "top_k": self.top_k}

    @property
    def layer_names(self) -> list[str] | None:
        """The layers collected (resolved at setup, or when training starts for the default)."""
        return self._layer_names

    # ------------------------------------------------------------------ setup
    def _resolve(self, model: torch.nn.Module, convs: list[str]) -> list[str]:
        return resolve_probe_layers(model, self.layers or [], convs)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        model, convs = self._require_convs(pl_module)
        if self.layers is not None:
            self._layer_names = self._resolve(model, convs)
        self._check_loggers(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._ready = False
        self._prepare(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._ready:
            self._prepare(trainer, pl_module)

    def _prepare(self, trainer: Any, pl_module: Any) -> None:
        """Default layers, receptive fields and channel checks, from one sample image (before step 1)."""
        sample = self._take_probe(trainer, pl_module, None, 1).images
        if not self._probe_runs(pl_module, sample):  # forward needs the first training batch's call
            return
        model = unwrap_model(pl_module)
        forward = self._forward_fn(pl_module)
        x = self._to_model(pl_module, sample)
        if self._layer_names is None:
            convs = list(conv_layers(model))
            order = execution_order(pl_module, x, convs, forward=forward)
            if not order:
                raise ValueError(
                    f"TopActivations: a forward pass called none of the convolutions {_quote_list(convs)}; "
                    "name the layers with layers=[...]"
                )
            self._layer_names = spread(order, _DEFAULT_LAYERS)
        self._fields = {}
        self._in_channels = int(sample.shape[1])
        for layer in self._layer_names:
            try:
                field = receptive_field(pl_module, layer, tuple(sample.shape[1:]), forward=forward)
            except ValueError as err:
                raise ValueError(f"TopActivations: layer {layer!r}: {err}") from err
            if self.channels is not None:
                try:
                    _check_channel_list(self.channels, field.channels)
                except ValueError as err:
                    raise ValueError(f"TopActivations: layer {layer!r}: {err}") from err
            self._fields[layer] = field
        self._ready = True

    # ------------------------------------------------------------------ collection
    def _due(self, trainer: Any) -> bool:
        return self._ready and not trainer.sanity_checking and self._epoch_due(trainer, self.every_n_epochs)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._remove_hooks()
        if not self._due(trainer):
            return
        model = unwrap_model(pl_module)
        modules = dict(model.named_modules())
        self._collectors = {}
        self._local_count = 0
        self._images = None
        for layer in self._layer_names or []:
            match = _CALL.match(layer)
            name, index = (match["name"], int(match["index"])) if match else (layer, 0)
            field = self._fields[layer]
            c = field.channels if self.channels is None else len(self.channels)
            self._collectors[layer] = TopActivationCollector(c, self.top_k, field, max_patch=self.max_patch)
            self._handles.append(modules[name].register_forward_hook(self._hook(layer, index)))

    def _hook(self, layer: str, index: int):
        def hook(module: Any, args: Any, out: Any) -> None:
            images = self._images
            if images is None or layer in self._seen_in_batch:
                return
            calls = self._calls.get(layer, 0)
            self._calls[layer] = calls + 1
            if calls != index:  # a reused module: its index-th call in this batch
                return
            self._seen_in_batch.add(layer)  # only the batch's first forward (not test-time augmentation)
            if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != images.shape[0]:
                return
            field = self._fields[layer]
            if tuple(images.shape[-2:]) != field.input_size or tuple(out.shape[-2:]) != field.output_size:
                self._warn_once(
                    f"size-{layer}",
                    f"TopActivations: validation images of size {tuple(images.shape[-2:])} differ from the "
                    f"size {field.input_size} the receptive fields were traced with; such batches are skipped.",
                )
                return
            act = out.detach()
            if self.channels is not None:
                act = act[:, torch.tensor(self.channels, device=act.device)]
            world, rank = self._world
            local = torch.arange(self._local_count, self._local_count + images.shape[0], device=act.device)
            self._collectors[layer].update(act, images.to(act.device), local * world + rank)

        return hook

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if not self._handles:
            return
        images = find_images(batch)
        self._images = None if images is None else images.detach()
        self._seen_in_batch = set()
        self._calls = {}
        self._world = (trainer.world_size, trainer.global_rank)
        if images is None:
            self._warn_once("no-images", "TopActivations: a validation batch holds no images [N, C, H, W]; skipped.")

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if self._images is not None:
            self._local_count += self._images.shape[0]
        self._images = None

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._handles:
            return
        self._remove_hooks()
        self._images = None
        self._last_step = trainer.global_step
        self._runs += 1
        self.results = {}
        for layer, collector in self._collectors.items():
            merged = self._merge_ranks(trainer, collector, layer)  # every rank: collectives inside
            if merged is None:
                continue
            self.results[layer] = merged
            if trainer.is_global_zero and self._writers(trainer):
                image = render.top_activations_grid(merged, cell_px=self.cell_px)
                field = merged.field
                description = (
                    f"Rows: units of `{layer}` ({'the channels asked for' if self.channels else 'the most active, by mean top-k activation'}); "
                    f"columns: the {merged.values.shape[1]} validation images that drive each unit most, as the "
                    f"patch under its receptive field ({field.size[0]}×{field.size[1]} px, stride {field.stride[0]}), "
                    f"labelled with the activation; out of {merged.count} images. Hatched: outside the image."
                )
                self._log_image(trainer, f"top_activations/{layer}", image, description=description)
        self._collectors = {}

    def _merge_ranks(self, trainer: Any, collector: TopActivationCollector, layer: str) -> TopActivationsResult | None:
        """The top-k over all ranks for the units shown (every rank runs the same collectives).

        Values, image indices and locations of every channel are gathered first (small);
        the rows to show are chosen from the merged values (the same on every rank); then
        only those rows' patches are gathered.
        """
        world = trainer.world_size
        if collector._values is None:  # no validation batch on this rank
            if world == 1:
                return None
            collector._init(trainer.strategy.root_device, torch.zeros(1, self._in_channels, 1, 1))
            collector._width = self._fields[layer].output_size[1]
        values, index, locations = collector.ordered(trim=False)
        count = torch.tensor([collector.count], device=values.device)
        gather = trainer.strategy.all_gather if world > 1 else (lambda t: t[None])
        values, index, locations, counts = (gather(t.contiguous()) for t in (values, index, locations, count))
        total = int(counts.sum())
        if total == 0:
            return None
        source, pos = merge_order(list(values), list(index), self.top_k)
        channel = torch.arange(source.shape[0], device=source.device)[:, None]
        merged_values = values[source, channel, pos]
        shown = self._shown_rows(merged_values)
        src, at, chan = source[shown], pos[shown], shown[:, None]
        patches = gather(collector.ordered_patches(shown).contiguous())  # [W, U, K, C_in, h, w]
        rows = torch.arange(len(shown), device=source.device)[:, None]
        keep = min(self.top_k, total)
        chans = torch.arange(collector.c) if self.channels is None else torch.tensor(self.channels)
        return TopActivationsResult(
            values=merged_values[shown][:, :keep].float().cpu(),
            image_index=index[src, chan, at][:, :keep].cpu(),
            locations=locations[src, chan, at][:, :keep].cpu(),
            patches=patches[src, rows, at][:, :keep].float().cpu(),
            channels=chans[shown.cpu()],
            layer=layer,
            field=self._fields[layer],
            image_size=self._fields[layer].input_size,
            count=total,
        )

    def _shown_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Rows to draw: all channels asked for, else the ``units`` with the highest mean top-k value."""
        if self.channels is not None:
            return torch.arange(values.shape[0], device=values.device)
        finite = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
        score = finite.mean(dim=1)
        return torch.sort(score, descending=True, stable=True).indices[: self.units]

    # ------------------------------------------------------------------ cleanup
    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._remove_hooks()
        if self._runs == 0 and self._ready and trainer.current_epoch + 1 >= self.every_n_epochs:
            self._warn_once(
                "no-validation",
                "TopActivations collects during the validation loop, and no validation run was seen; "
                "give the Trainer validation data (val_dataloaders / validation_step).",
            )

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._remove_hooks()
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._remove_hooks()
        super().on_exception(trainer, pl_module, exception)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "layer_names": self._layer_names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._layer_names is None:
            self._layer_names = state_dict.get("layer_names")
