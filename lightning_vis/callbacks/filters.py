"""``FilterGrid``: a convolution's weights as an image grid, through training."""

from __future__ import annotations

from typing import Any

import torch

from lightning_vis import render
from lightning_vis.callbacks._base import _VisMonitor, check_every
from lightning_vis.layers import _record_calls, conv_layers, first_conv, resolve_layers, unwrap_model


class FilterGrid(_VisMonitor):
    """Log the filters of one convolution as a grid of cells, one cell per filter.

    First-layer filters over RGB input are drawn in colour (the edge and colour detectors
    of Zeiler & Fergus); filters over other inputs as grey tiles, one per input channel.
    Dead filters, known from a :class:`~lightning_vis.callbacks.DeadNeuronMonitor` in the
    same Trainer or from a zero weight norm, get a red frame.

    **Logged** (to every TensorBoard logger, on global rank 0):

    * ``filters/<layer>``: the grid image, at step 0, every ``every_n_steps`` optimizer
      steps, and once at the end of training.

    Args:
        layer: name or glob pattern of one convolution (``named_modules()`` name of the
            LightningModule, e.g. ``"net.features.0"``); default: the first convolution
            the input passes through, found on a real forward pass.
        every_n_steps: log every this many optimizer steps (``trainer.global_step``).
        normalize: ``"filter"`` (each filter its own range) or ``"layer"`` (one range:
            shows relative strength).
        cell_px: approximate size of a filter tile in pixels (nearest upscaling).
        max_filters: draw at most this many filters.
        max_inputs: for grey filters, at most this many input channels each.

    Raises:
        ValueError: bad argument values (here), or at ``setup``: an unknown layer, a layer
            that is not a convolution, a pattern matching several convolutions, or a
            model without convolutions.

    Example::

        >>> from lightning_vis.callbacks import FilterGrid
        >>> FilterGrid(layer="net.features.0", every_n_steps=50)
        FilterGrid(layer='net.features.0', every_n_steps=50)
    """

    def __init__(
        self,
        layer: str | None = None,
        every_n_steps: int | None = 200,
        *,
        normalize: str = "filter",
        cell_px: int = 40,
        max_filters: int = 256,
        max_inputs: int = 16,
    ) -> None:
        super().__init__()
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"layer must be a name or glob pattern (str) or None, got {type(layer).__name__}")
        if normalize not in ("filter", "layer"):
            raise ValueError(f"Invalid value for normalize={normalize!r}. Must be one of 'filter', 'layer'")
        for name, value in (("cell_px", cell_px), ("max_filters", max_filters), ("max_inputs", max_inputs)):
            check_every(name, value, allow_none=False)
        self.layer = layer
        self.every_n_steps = check_every("every_n_steps", every_n_steps)
        self.normalize = normalize
        self.cell_px = cell_px
        self.max_filters = max_filters
        self.max_inputs = max_inputs
        self._layer_name: str | None = None
        self._recording: list[str] | None = None
        self._record_ctx: Any = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, every_n_steps={self.every_n_steps})"

    def _config(self) -> dict:
        return {"layer": self.layer, "normalize": self.normalize}

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        model, convs = self._require_convs(pl_module)
        if self.layer is not None:
            names = resolve_layers(model, self.layer, convs, what="convolutions")
            if len(names) > 1:
                raise ValueError(
                    f"FilterGrid shows one convolution, but layer={self.layer!r} matches {len(names)}: "
                    f"{', '.join(names)}; add one FilterGrid per layer"
                )
            self._layer_name = names[0]
        self._check_loggers(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._layer_name is None:
            example = self._sample_images(trainer, pl_module, 2)
            if example is not None and self._probe_runs(pl_module, example):
                self._layer_name = first_conv(
                    pl_module, self._to_model(pl_module, example), forward=self._forward_fn(pl_module)
                )
            else:  # no map-style data to look at: watch the first training batch instead
                self._recording = []
                convs = list(conv_layers(unwrap_model(pl_module)))
                self._record_ctx = _record_calls(unwrap_model(pl_module), convs, self._recording)
                self._record_ctx.__enter__()
                return
        if trainer.global_step == 0:
            self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._record_ctx is not None:
            self._record_ctx.__exit__(None, None, None)
            self._record_ctx = None
            if not self._recording:
                raise ValueError("FilterGrid: the training step called none of the model's convolutions")
            self._layer_name = self._recording[0]
        if self._step_due(trainer, self.every_n_steps):
            self._log(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._layer_name is not None and trainer.global_step != self._last_step:
            self._log(trainer, pl_module)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._record_ctx is not None:
            self._record_ctx.__exit__(None, None, None)
            self._record_ctx = None

    # ------------------------------------------------------------------ work
    @property
    def layer_name(self) -> str | None:
        """The convolution shown (resolved at setup, or on the first forward pass)."""
        return self._layer_name

    def _dead_filters(self, trainer: Any) -> set[int]:
        dead: set[int] = set()
        for callback in trainer.callbacks:
            lookup = getattr(callback, "dead_filters", None)
            if callable(lookup) and callback is not self:
                dead.update(lookup(self._layer_name))
        return dead

    def _log(self, trainer: Any, pl_module: Any) -> None:
        self._last_step = trainer.global_step
        if not trainer.is_global_zero or not self._writers(trainer):
            return
        module = dict(unwrap_model(pl_module).named_modules())[self._layer_name]
        weight = module.weight
        if weight.numel() == 0 or weight.ndim not in (3, 4, 5):
            self._warn_once(
                "sharded",
                f"FilterGrid: the weight of {self._layer_name!r} has shape {tuple(weight.shape)} on this rank "
                "(sharded, e.g. by FSDP); filters are not drawn. Use DDP, or FSDP with full state on rank 0.",
            )
            return
        dead = sorted(self._dead_filters(trainer))
        with torch.no_grad():
            grid = render.filter_grid(
                weight,
                normalize=self.normalize,
                dead=dead,
                cell_px=self.cell_px,
                max_filters=self.max_filters,
                max_inputs=self.max_inputs,
            )
        scale = "each filter scaled to its own range" if self.normalize == "filter" else "one scale for the layer"
        description = (
            f"Filters of `{self._layer_name}` (weight {tuple(weight.shape)}), {scale}. "
            f"Red frame: dead (never firing, per DeadNeuronMonitor, or zero weight norm); marked now: {dead or 'none'}"
        )
        self._log_image(trainer, f"filters/{self._layer_name}", grid, description=description)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "layer_name": self._layer_name}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._layer_name = self._layer_name or state_dict.get("layer_name")
