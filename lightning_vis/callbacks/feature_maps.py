"""``FeatureMaps``: the most active feature maps of some layers for fixed probe images."""

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
from lightning_vis.isolation import isolated
from lightning_vis.layers import (
    unwrap_model,
)
from lightning_vis.units import _layer_output, top_feature_maps

#: Default number of layers: convolutions spread over the depth.
_DEFAULT_LAYERS = 4
_DEFAULT_TOP_N = 9


class FeatureMaps(_ProbePanelMonitor):
    """Log, per probe image, each layer's ``top_n`` most active feature maps.

    Shang et al.'s structure view and the "layer outputs" of the OmniXRI review: which
    channels of a layer respond to an image, and where. For each probe image the
    layer's channels are ranked by mean activation (:func:`lightning_vis.units.top_feature_maps`,
    one forward pass under :func:`~lightning_vis.isolation.isolated`: eval mode, no
    autocast, everything restored), and :func:`lightning_vis.render.feature_maps_panel`
    draws the image beside its ``top_n`` maps, each labelled with its channel, all maps of
    one image on one shared colour scale (its range written under the image). Only
    global rank 0 computes and writes (no collective is involved).

    **Logged** (to every TensorBoard logger, on global rank 0):

    * ``feature_maps/<layer>``: one image per layer at the end of every
      ``every_n_epochs``-th training epoch.

    Args:
        probe: images ``[N, C, H, W]`` (or one ``[C, H, W]``); ``None``: the first
            ``num_probe`` images of the validation data, else of the training data,
            chosen when training starts and kept for the run.
        layers: names or glob patterns of the layers (``named_modules()`` names of the
            LightningModule; ``"name#k"`` for the k-th call of a reused module); default:
            up to 4 convolutions spread over the depth, in the order the input passes them.
        top_n: feature maps shown per image. The default shows up to 9 (fewer on layers with
            fewer channels); an explicit value larger than a layer's channels is an error.
        every_n_epochs: log at the end of every this many training epochs.
        num_probe: how many images to take from the data when ``probe`` is ``None``.

    Raises:
        ValueError: bad argument values (here); at ``setup``: an unknown layer, a model
            without convolutions, a probe that does not fit the model; when training
            starts (before step 1): no probe images in the data, ``top_n`` larger than
            a layer's channels, a layer whose output is not a feature map.

    Example::

        >>> from lightning_vis.callbacks import FeatureMaps
        >>> FeatureMaps(layers="net.features.*", top_n=4)
        FeatureMaps(layers=['net.features.*'], top_n=4, every_n_epochs=1)
    """

    def __init__(
        self,
        probe: torch.Tensor | None = None,
        layers: str | list[str] | None = None,
        top_n: int = _DEFAULT_TOP_N,
        every_n_epochs: int = 1,
        *,
        num_probe: int = 4,
    ) -> None:
        super().__init__()
        check_every("top_n", top_n, allow_none=False)
        check_every("num_probe", num_probe, allow_none=False)
        self.every_n_epochs = check_every("every_n_epochs", every_n_epochs, allow_none=False)
        self.layers = as_pattern_list(layers)
        self.top_n = top_n
        self.num_probe = num_probe
        self._probe = self._check_probe(probe)
        self._user_probe = self._probe is not None
        self._layer_names: list[str] | None = None
        self._channels: dict[str, int] = {}
        self._ready = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={self.layers!r}, top_n={self.top_n}, every_n_epochs={self.every_n_epochs})"

    def _config(self) -> dict:
        return {"layers": self.layers, "top_n": self.top_n}

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        model, convs = self._require_convs(pl_module)
        if self.layers is not None:
            self._layer_names = self._resolve(model, convs)
        if self._user_probe:
            self._probe_runs(pl_module, self._probe)
        self._check_loggers(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._probe is None:
            self._probe = self._take_probe(trainer, pl_module, None, self.num_probe).images
        self._ready = False
        self._prepare(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._ready and self._probe is not None:
            self._prepare(pl_module)

    def _prepare(self, pl_module: Any) -> None:
        """Default layers and checks on the layers' outputs, once the probe can run."""
        order = self._conv_order(pl_module, self._probe)
        if order is None:
            return
        model = unwrap_model(pl_module)
        forward = self._forward_fn(pl_module)
        x = self._to_model(pl_module, self._probe[:1])
        if self._layer_names is None:
            self._layer_names = spread(order, _DEFAULT_LAYERS)
        with isolated(model), torch.no_grad():
            for layer in self._layer_names:
                try:
                    c = _layer_output(model, x, layer, forward).shape[1]
                except ValueError as err:
                    raise ValueError(f"FeatureMaps: {err}") from err
                self._channels[layer] = c
                if self.top_n > c and self.top_n != _DEFAULT_TOP_N:  # the default means "up to 9"
                    raise ValueError(
                        f"Invalid value for top_n={self.top_n}: layer {layer!r} has {c} channels. Must be <= {c}"
                    )
        self._ready = True

    # ------------------------------------------------------------------ work
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._epoch_due(trainer, self.every_n_epochs):
            return
        self._last_step = trainer.global_step
        if not trainer.is_global_zero or not self._writers(trainer) or not self._ready:
            return
        x = self._to_model(pl_module, self._probe)
        forward = self._forward_fn(pl_module)
        for layer in self._layer_names or []:
            top_n = min(self.top_n, self._channels.get(layer, self.top_n))
            maps = top_feature_maps(pl_module, x, layer, top_n=top_n, forward=forward)
            panel = render.feature_maps_panel(self._probe, maps)
            description = (
                f"Per probe image, the {top_n} feature maps of `{layer}` with the highest mean activation "
                "(label: channel), on one colour scale per image (its range under the image)."
            )
            self._log_image(trainer, f"feature_maps/{layer}", panel, description=description)
