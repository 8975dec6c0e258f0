"""``DeconvProjection``: DeconvNet projections of fixed probe images, through training."""

from __future__ import annotations

from typing import Any

import torch

from lightning_vis import render
from lightning_vis.callbacks._base import (
    _ProbePanelMonitor,
    as_pattern_list,
    check_every,
    spread,
)
from lightning_vis.deconv import METHODS, _forward_to, project
from lightning_vis.isolation import isolated
from lightning_vis.layers import (
    _quote_list,
    conv_layers,
    execution_order,
    unwrap_model,
)

#: Default number of layers: convolutions spread over the depth.
_DEFAULT_LAYERS = 4


_DEFAULT_TOP_K = 9


class DeconvProjection(_ProbePanelMonitor):
    """Log, for fixed probe images, the top-k units of some layers projected back to pixels.

    Zeiler & Fergus (2014), Fig. 2, live: for each probe image and each chosen layer, the
    ``top_k`` channels with the strongest activation are projected to pixel space by
    :func:`lightning_vis.project` (one forward to the layer and one batched backward per
    layer) and drawn by :func:`lightning_vis.render.projection_panel`: per image a block
    with the image (each unit's receptive field boxed) and a grid of its units, each
    unit's projection beside the image patch under its receptive field. The projections run under
    :func:`~lightning_vis.isolation.isolated` (eval mode, no autocast, modes, buffers,
    ``.grad`` and RNG states restored), so training is unchanged bit for bit. Only global
    rank 0 computes and writes.

    **Logged** (to every TensorBoard logger, on global rank 0):

    * ``deconv/<layer>``: one image per layer, at the end of every ``every_n_epochs``-th
      training epoch and, with ``every_n_steps``, every that many optimizer steps. The
      image's description says which rule was used at the activations.

    Args:
        probe: images ``[N, C, H, W]`` (or one ``[C, H, W]``) to project; ``None``: the
            first ``num_probe`` images of the validation data, else of the training
            data, chosen when training starts and kept for the whole run.
        layers: names or glob patterns of the layers (``named_modules()`` names of the
            LightningModule, e.g. ``"net.features.*"``; ``"name#k"`` for the k-th call of
            a reused module); default: up to 4 convolutions spread over the depth, in
            the order the input passes through them.
        top_k: units (channels) shown per image and layer. The default shows up to 9 (fewer
            on layers with fewer channels); an explicit value larger than a layer's channels
            is an error.
        every_n_epochs: log at the end of every this many training epochs (``None``: never).
        method: ``"deconvnet"`` (default), ``"guided"`` (guided backpropagation) or
            ``"saliency"`` (plain gradient).
        every_n_steps: also log every this many optimizer steps (``trainer.global_step``).
        num_probe: how many images to take from the data when ``probe`` is ``None``.
        cell_px: side of one cell of the panel in pixels; default: the largest cell (12–64)
            with which the panel fits TensorBoard's 350-px image card.

    Raises:
        ValueError: bad argument values (here); at ``setup``: an unknown layer (the
            convolutions are listed), a model without convolutions, a probe that does
            not fit the model; when training starts: no probe images in the data.

    Example::

        >>> from lightning_vis.callbacks import DeconvProjection
        >>> DeconvProjection(layers="net.features.*", top_k=4)
        DeconvProjection(layers=['net.features.*'], top_k=4, method='deconvnet', every_n_epochs=1, every_n_steps=None)
    """

    def __init__(
        self,
        probe: torch.Tensor | None = None,
        layers: str | list[str] | None = None,
        top_k: int = _DEFAULT_TOP_K,
        every_n_epochs: int | None = 1,
        method: str = "deconvnet",
        every_n_steps: int | None = None,
        *,
        num_probe: int = 4,
        cell_px: int | None = None,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"Invalid value for method={method!r}. Must be one of {', '.join(map(repr, METHODS))}")
        check_every("top_k", top_k, allow_none=False)
        check_every("num_probe", num_probe, allow_none=False)
        if cell_px is not None and (isinstance(cell_px, bool) or not isinstance(cell_px, int) or cell_px < 4):
            raise ValueError(f"Invalid value for cell_px={cell_px!r}. Must be an int >= 4 or None")
        self.every_n_epochs = check_every("every_n_epochs", every_n_epochs)
        self.every_n_steps = check_every("every_n_steps", every_n_steps)
        if self.every_n_epochs is None and self.every_n_steps is None:
            raise ValueError("DeconvProjection never logs with every_n_epochs=None and every_n_steps=None; set one")
        self.layers = as_pattern_list(layers)
        self.top_k = top_k
        self.method = method
        self.num_probe = num_probe
        self.cell_px = cell_px
        self._probe = self._check_probe(probe)
        if self._probe is not None:
            self._probe = self._probe.cpu()
        self._user_probe = self._probe is not None
        self._layer_names: list[str] | None = None
        self._channels: dict[str, int] = {}
        self._ready = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layers!r}, top_k={self.top_k}, method={self.method!r}, "
            f"every_n_epochs={self.every_n_epochs}, every_n_steps={self.every_n_steps})"
        )

    def _config(self) -> dict:
        return {"layers": self.layers, "method": self.method, "top_k": self.top_k}

    # ------------------------------------------------------------------ validation
    def _check_probe_fits(
        self, pl_module: Any, probe: torch.Tensor, convs: list[str], final: bool = False
    ) -> list[str] | None:
        """The convolutions in the order the probe passes them; ``None`` until the first batch's call."""
        if not self._probe_runs(pl_module, probe, final=final):
            return None
        return execution_order(pl_module, self._to_model(pl_module, probe[:1]), convs, forward=self._forward_fn(pl_module))

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        model, convs = self._require_convs(pl_module)
        if self.layers is not None:
            self._layer_names = self._resolve(model, convs)
        if self._user_probe:
            self._check_probe_fits(pl_module, self._probe, convs)
        self._check_loggers(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._probe is None:
            self._probe = self._take_probe(trainer, pl_module, None, self.num_probe).images
        self._ready = False
        self._prepare(pl_module)

    def _prepare(self, pl_module: Any, final: bool = False) -> None:
        """Default layers and channel counts, once the probe can run (maybe after the first batch)."""
        convs = list(conv_layers(unwrap_model(pl_module)))
        order = self._check_probe_fits(pl_module, self._probe, convs, final)
        if order is None:  # forward needs the first training batch's call
            return
        if self._layer_names is None:
            if not order:
                raise ValueError(
                    f"DeconvProjection: a forward pass of the probe called none of the convolutions "
                    f"{_quote_list(convs)}; name the layers with layers=[...]"
                )
            self._layer_names = spread(order, _DEFAULT_LAYERS)
        self._channels = self._count_channels(pl_module)
        if self.top_k != _DEFAULT_TOP_K:  # an explicit top_k must fit; the default means "up to 9"
            small = {layer: c for layer, c in self._channels.items() if c < self.top_k}
            if small:
                raise ValueError(
                    f"Invalid value for top_k={self.top_k}: larger than the channels of "
                    + ", ".join(f"{layer!r} ({c})" for layer, c in small.items())
                    + f". Must be <= {min(small.values())} for these layers"
                )
        self._ready = True

    def _count_channels(self, pl_module: Any) -> dict[str, int]:
        model = unwrap_model(pl_module)
        x = self._to_model(pl_module, self._probe[:1])
        forward = self._forward_fn(pl_module)
        counts = {}
        with isolated(model), torch.no_grad():
            for layer in self._layer_names:
                counts[layer] = int(_forward_to(model, x, layer, forward=forward).shape[1])
        return counts

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._ready and self._probe is not None:
            self._prepare(pl_module, final=True)
        if self._step_due(trainer, self.every_n_steps):
            self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._epoch_due(trainer, self.every_n_epochs):
            self._run(trainer, pl_module)

    # ------------------------------------------------------------------ work
    def _run(self, trainer: Any, pl_module: Any) -> None:
        self._last_step = trainer.global_step
        if not trainer.is_global_zero or not self._writers(trainer) or self._probe is None or not self._ready:
            return
        x = self._to_model(pl_module, self._probe)
        forward = self._forward_fn(pl_module)
        for layer in self._layer_names or []:
            top_k = min(self.top_k, self._channels.get(layer, self.top_k))
            projection = project(pl_module, x, layer, top_k=top_k, method=self.method, forward=forward)
            panel = render.projection_panel(self._probe, projection, cell_px=self.cell_px)
            description = (
                f"Top {top_k} units of `{layer}` per probe image, projected to pixel space with "
                f"{projection.rule}. Per probe image: the image (receptive fields boxed), then per unit its "
                "projection (zero = grey) beside the image patch under its receptive field."
            )
            self._log_image(trainer, f"deconv/{layer}", panel, description=description)
