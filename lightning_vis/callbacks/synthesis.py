"""``ActivationMaximization`` and ``FeatureInversion``: synthesised images through training."""

from __future__ import annotations

from typing import Any

import torch

from lightning_vis import render
from lightning_vis.callbacks._base import (
    _VisMonitor,
    as_pattern_list,
    check_every,
    spread,
)
from lightning_vis.isolation import isolated
from lightning_vis.layers import (
    resolve_probe_layers,
    unwrap_model,
)
from lightning_vis.synthesis import (
    _forward_layer,
    color_decorrelation,
    invert,
    maximize,
)

__all__ = ["ActivationMaximization", "FeatureInversion"]

#: Data images read once to measure the value range and the colour covariance.
_NUM_DATA = 64


class _SynthesisMonitor(_VisMonitor):
    """Shared: layer resolution, the data's value range, probe checks, a bounded strip of snapshots."""

    _default_layers = 1
    _tag = ""

    def __init__(self, layers: Any, every_n_epochs: int | None, max_snapshots: int) -> None:
        super().__init__()
        self.every_n_epochs = check_every("every_n_epochs", every_n_epochs, allow_none=False)
        check_every("max_snapshots", max_snapshots, allow_none=False)
        self.layers = as_pattern_list(layers)
        self.max_snapshots = max_snapshots
        self._layer_names: list[str] | None = None
        self._data: torch.Tensor | None = None  # sample images (CPU), for range / colours / probe
        self._ready = False
        self._history: dict[str, list[tuple[str, torch.Tensor]]] = {}  # layer -> [(label, uint8 [R, 3, h, w])]

    @property
    def layer_names(self) -> list[str] | None:
        """The layers shown (resolved at setup, or when training starts for the default)."""
        return self._layer_names

    def _resolve(self, model: torch.nn.Module, convs: list[str]) -> list[str]:
        return resolve_probe_layers(model, self.layers or [], convs)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        model, convs = self._require_convs(pl_module)
        if self.layers is not None:
            self._layer_names = self._resolve(model, convs)
        self._setup_extra(pl_module)
        self._check_loggers(trainer)

    def _setup_extra(self, pl_module: Any) -> None:
        pass

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._data is None:
            self._data = self._take_probe(trainer, pl_module, None, _NUM_DATA).images.detach().float().cpu()
        self._ready = False
        self._prepare(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._ready:
            self._prepare(pl_module)

    def _prepare(self, pl_module: Any) -> None:
        """Default layers and per-layer checks, once a probe forward can run (before step 1 when possible)."""
        order = self._conv_order(pl_module, self._data)
        if order is None:
            return
        model = unwrap_model(pl_module)
        forward = self._forward_fn(pl_module)
        x = self._to_model(pl_module, self._data[:1])
        if self._layer_names is None:
            self._layer_names = self._pick_default(order)
        channels = {}
        with isolated(model), torch.no_grad():
            for layer in self._layer_names:
                try:
                    channels[layer] = int(_forward_layer(model, x, layer, forward).shape[1])
                except ValueError as err:
                    raise ValueError(f"{type(self).__name__}: {err}") from err
        self._check_layers(channels)
        self._ready = True

    def _pick_default(self, order: list[str]) -> list[str]:
        return spread(order, self._default_layers)

    def _check_layers(self, channels: dict[str, int]) -> None:
        pass

    def _value_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (min, max) of the sample images: the data's value range in model-input units."""
        lo = self._data.amin(dim=(0, 2, 3))
        hi = self._data.amax(dim=(0, 2, 3))
        return lo, torch.maximum(hi, lo + 1e-3)

    def _remember(self, layer: str, label: str, images: torch.Tensor) -> None:
        """Keep a uint8 thumbnail column for the strip (at most ``max_snapshots``; the first is kept)."""
        thumbs = render.to_uint8(render.to_display(images, self._value_range()))
        history = self._history.setdefault(layer, [])
        history.append((label, thumbs))
        if len(history) > self.max_snapshots:
            del history[1]

    def _log_strip(self, trainer: Any, layer: str, row_labels: list[str], what: str) -> None:
        history = self._history.get(layer, [])
        if len(history) < 2:
            return
        cols = torch.stack([t for _, t in history], 1)  # [R, T, 3, h, w]
        strip = render.evolution_strip(cols, row_labels, [lbl for lbl, _ in history], cell_px=40)
        self._log_image(
            trainer, f"{self._tag}/{layer}/evolution", strip,
            description=f"{what} of `{layer}` across training (one column per snapshot, same seed every time).",
        )  # fmt: skip

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._epoch_due(trainer, self.every_n_epochs):
            return
        self._last_step = trainer.global_step
        # rank 0 only, and no collective inside: the optimisation runs nowhere else
        if not trainer.is_global_zero or not trainer.loggers or not self._ready:
            return
        for layer in self._layer_names or []:
            self._run_layer(trainer, pl_module, layer, f"ep {trainer.current_epoch + 1}")

    def _run_layer(self, trainer: Any, pl_module: Any, layer: str, label: str) -> None:
        """Synthesise and log one layer's panel: each subclass (maximisation, inversion) defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define _run_layer")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "layer_names": self._layer_names, "data": self._data, "history": self._history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._layer_names is None:
            self._layer_names = state_dict.get("layer_names")
        if self._data is None and state_dict.get("data") is not None:
            self._data = state_dict["data"].detach().cpu()
        self._history = dict(state_dict.get("history") or {})


class ActivationMaximization(_SynthesisMonitor):
    """Log what units want to see: images synthesised to maximise them (Lucid-style), through training.

    For each chosen layer, the chosen units (channels) are maximised together by
    :func:`lightning_vis.maximize` (one batched optimisation under
    :func:`~lightning_vis.isolation.isolated`: training is unchanged bit for bit): a
    decorrelated Fourier image whose colour covariance is measured on your training
    data, pixels kept in your data's value range (both from the first 64 images of the
    validation, else training, data), random jitter / scale / rotation, an L2 decay,
    periodic blur, redirected ReLU gradients at the start. The seed is the same at every
    run, so differences between epochs come from the network, not from the noise.

    Defaults fit the per-run budget (DESIGN: a run costs at most about 10 training steps
    of the demo): one layer (the last convolution), 6 units, 32 steps at a higher
    learning rate (0.1), the canvas of your images, every 2 epochs. On the demo CNN on
    the CPU a run costs about 4 training steps (4.2 measured, ``benchmarks/synthesis.py``). More
    steps, units or a larger canvas (``size=64`` sharpens images of small-image models:
    the forward stops at the layer, so convolutions take any size) cost proportionally.

    Under DDP only global rank 0 optimises (nothing is computed on other ranks, and no
    collective is called).

    **Logged** (to every TensorBoard logger, on global rank 0, at the end of every
    ``every_n_epochs``-th epoch):

    * ``maximization/<layer>``: one cell per unit, labelled ``c<channel> <reached
      activation>`` (measured without transforms).
    * ``maximization/<layer>/evolution``: units × snapshots strip, from the second run on.
    * ``maximization/<layer>/activation`` (scalar, every logger): the mean reached
      activation.

    Args:
        layers: names or glob patterns (``named_modules()`` names of the LightningModule;
            ``"name#k"`` for the k-th call of a reused module); default: the last
            convolution the input passes through.
        channels: the units to maximise (same for every layer); default: the
            ``num_units`` channels with the largest mean activation on the sample
            images at the first run, then kept for the run.
        every_n_epochs: run at the end of every this many training epochs.
        num_units: units per layer when ``channels`` is ``None``.
        steps: optimisation steps per run.
        lr: Adam's learning rate.
        size: canvas side (or ``(H, W)``); default: the training images' size.
        objective: ``"mean"`` (channel mean) or ``"center"`` (the centre unit).
        seed: seed of every run.
        max_snapshots: columns kept in the strip (the first and the latest ones).

    Raises:
        ValueError: bad argument values (here); at ``setup``: unknown layer, model
            without convolutions; when training starts: channels out of a layer's
            range, no images in the data.

    Example::

        >>> from lightning_vis.callbacks import ActivationMaximization
        >>> ActivationMaximization(layers="net.features.*", channels=[0, 3])
        ActivationMaximization(layers=['net.features.*'], channels=[0, 3], steps=32, every_n_epochs=2)
    """

    _tag = "maximization"

    def __init__(
        self,
        layers: str | list[str] | None = None,
        channels: list[int] | None = None,
        every_n_epochs: int = 2,
        *,
        num_units: int = 6,
        steps: int = 32,
        lr: float = 0.1,
        size: int | tuple[int, int] | None = None,
        objective: str = "mean",
        seed: int = 0,
        max_snapshots: int = 12,
    ) -> None:
        super().__init__(layers, every_n_epochs, max_snapshots)
        check_every("num_units", num_units, allow_none=False)
        check_every("steps", steps, allow_none=False)
        if objective not in ("mean", "center"):
            raise ValueError(f"Invalid value for objective={objective!r}. Must be one of 'mean', 'center'")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"Invalid value for lr={lr!r}. Must be a number > 0")
        if size is not None:
            from lightning_vis.synthesis import _size

            _size(size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Invalid value for seed={seed!r}. Must be an int >= 0")
        if channels is not None:
            if isinstance(channels, int):
                channels = [channels]
            channels = list(channels)
            if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in channels):
                raise ValueError(f"Invalid value for channels={channels!r}. Must be a non-empty list of ints >= 0 or None")
        self.channels = channels
        self.num_units, self.steps, self.lr, self.size = num_units, steps, float(lr), size
        self.objective, self.seed = objective, seed
        self._units: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layers!r}, channels={self.channels!r}, steps={self.steps}, "
            f"every_n_epochs={self.every_n_epochs})"
        )

    def _config(self) -> dict:
        return {"layers": self.layers, "channels": self.channels, "objective": self.objective}

    def _pick_default(self, order: list[str]) -> list[str]:
        return order[-1:]

    def _check_layers(self, channels: dict[str, int]) -> None:
        if self.channels is None:
            return
        for layer, c in channels.items():
            bad = [ch for ch in self.channels if ch >= c]
            if bad:
                raise ValueError(f"Invalid value for channels={self.channels!r}: layer {layer!r} has {c} channels (0..{c - 1})")

    @property
    def units(self) -> dict[str, list[int]]:
        """The channels maximised per layer (fixed at the first run)."""
        return dict(self._units)

    def _choose_units(self, pl_module: Any, layer: str) -> list[int]:
        if self.channels is not None:
            return list(self.channels)
        model = unwrap_model(pl_module)
        with isolated(model), torch.no_grad():
            act = _forward_layer(model, self._to_model(pl_module, self._data), layer, self._forward_fn(pl_module))
        mean = act.float().mean(dim=(0, 2, 3)).cpu()
        order = torch.sort(mean, descending=True, stable=True).indices
        return order[: self.num_units].tolist()

    def _run_layer(self, trainer: Any, pl_module: Any, layer: str, label: str) -> None:
        if layer not in self._units:
            self._units[layer] = self._choose_units(pl_module, layer)
        units = self._units[layer]
        lo, hi = self._value_range()
        colours = color_decorrelation((self._data - lo.view(1, -1, 1, 1)) / (hi - lo).view(1, -1, 1, 1))
        size = self.size or tuple(self._data.shape[-2:])
        result = maximize(
            pl_module, layer, units, size=size, steps=self.steps, lr=self.lr, seed=self.seed,
            objective=self.objective, value_range=(lo, hi), decorrelation=colours,
            redirect_steps=min(16, self.steps // 4), forward=self._forward_fn(pl_module),
        )  # fmt: skip
        panel = render.maximization_panel(result, value_range=(lo, hi), cell_px=64, title=f"{layer} (epoch {label[3:]})")
        self._log_image(
            trainer, f"maximization/{layer}", panel,
            description=(
                f"Images synthesised to maximise the {self.objective} activation of units of `{layer}` "
                f"({self.steps} steps, seed {self.seed}); label: channel and the activation reached."
            ),
        )  # fmt: skip
        self._log_scalars(trainer, {f"maximization/{layer}/activation": float(result.activations.mean())})
        self._remember(layer, label, result.images)
        self._log_strip(trainer, layer, [f"c{u}" for u in units], "What each unit wants to see")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "units": self._units}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._units = dict(state_dict.get("units") or {})


class FeatureInversion(_SynthesisMonitor):
    """Log what a layer keeps of an image: probe images reconstructed from their code (Mahendran & Vedaldi).

    For each chosen layer, :func:`lightning_vis.invert` reconstructs the probe images from
    the layer's output (α-norm and total-variation priors, one batched optimisation under
    :func:`~lightning_vis.isolation.isolated`: training is unchanged bit for bit). Early
    layers reconstruct nearly exactly; deeper ones keep the shapes and lose colour and
    position detail — the feature error tells how much of the code was matched.

    Defaults fit the per-run budget (at most about 10 training steps of the demo): 4
    probe images, 64 steps at learning rate 0.1 with the TV weight annealed from 0.1 to
    3e-4 (as :func:`~lightning_vis.invert`: the same cost per step, closer reconstructions
    and lower feature errors than a constant weight), two layers (the first and a middle
    convolution), every 2 epochs; on the demo CNN on the CPU a run costs about 5 training
    steps (5.1 measured, ``benchmarks/synthesis.py``). Only global rank 0 computes (no collective).

    **Logged** (to every TensorBoard logger, on global rank 0, at the end of every
    ``every_n_epochs``-th epoch):

    * ``inversion/<layer>``: pairs ``image | reconstruction``, labelled with the relative
      feature error ``‖Φ(x) − Φ₀‖ / ‖Φ₀‖``, titled with the layer.
    * ``inversion/<layer>/evolution``: reconstructions × snapshots, from the second run on.
    * ``inversion/<layer>/feature_error`` (scalar, every logger): the mean feature error.

    Args:
        probe: images ``[N, C, H, W]``; ``None``: the first ``num_probe`` images of the
            validation data, else of the training data, fixed for the run.
        layers: names or glob patterns; default: the first and a middle convolution in
            the order the input passes through them.
        every_n_epochs: run at the end of every this many training epochs.
        num_probe: probe images when ``probe`` is ``None``.
        steps: optimisation steps per run.
        lr: Adam's learning rate.
        lambda_alpha, lambda_tv: weights of the α-norm (α = 6) and TV (β = 2) priors
            (``lambda_tv``: the TV weight each run ends with).
        lambda_tv_start: the TV weight at the first step, annealed to ``lambda_tv`` over
            the first 3/4 of the steps (:func:`lightning_vis.invert`); ``None``: constant.
        seed: seed of every run.
        max_snapshots: columns kept in the strip.

    Raises:
        ValueError: bad argument values (here); at ``setup``: unknown layer, model
            without convolutions, a probe that does not fit the model.

    Example::

        >>> from lightning_vis.callbacks import FeatureInversion
        >>> FeatureInversion(layers="net.features.0")
        FeatureInversion(layers=['net.features.0'], steps=64, every_n_epochs=2)
    """

    _tag = "inversion"

    def __init__(
        self,
        probe: torch.Tensor | None = None,
        layers: str | list[str] | None = None,
        every_n_epochs: int = 2,
        *,
        num_probe: int = 4,
        steps: int = 64,
        lr: float = 0.1,
        lambda_alpha: float = 1e-3,
        lambda_tv: float = 3e-4,
        lambda_tv_start: float | None = 0.1,
        seed: int = 0,
        max_snapshots: int = 12,
    ) -> None:
        super().__init__(layers, every_n_epochs, max_snapshots)
        check_every("num_probe", num_probe, allow_none=False)
        check_every("steps", steps, allow_none=False)
        for name, value in (("lr", lr), ("lambda_alpha", lambda_alpha), ("lambda_tv", lambda_tv)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"Invalid value for {name}={value!r}. Must be a number " + ("> 0" if name == "lr" else ">= 0"))
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Invalid value for seed={seed!r}. Must be an int >= 0")
        self.num_probe, self.steps, self.lr, self.seed = num_probe, steps, float(lr), seed
        if lambda_tv_start is not None and (
            isinstance(lambda_tv_start, bool) or not isinstance(lambda_tv_start, (int, float)) or not lambda_tv_start > 0
        ):
            raise ValueError(f"Invalid value for lambda_tv_start={lambda_tv_start!r}. Must be a number > 0 or None")
        self.lambda_alpha, self.lambda_tv = float(lambda_alpha), float(lambda_tv)
        self.lambda_tv_start = None if lambda_tv_start is None else float(lambda_tv_start)
        self._probe = self._check_probe(probe)
        self._user_probe = self._probe is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={self.layers!r}, steps={self.steps}, every_n_epochs={self.every_n_epochs})"

    def _config(self) -> dict:
        return {"layers": self.layers, "steps": self.steps}

    @property
    def probe_images(self) -> torch.Tensor | None:
        """The probe images (on the CPU), fixed for the run once chosen."""
        return self._probe

    def _setup_extra(self, pl_module: Any) -> None:
        if self._user_probe:
            self._probe_runs(pl_module, self._probe)

    def _pick_default(self, order: list[str]) -> list[str]:
        return list(dict.fromkeys([order[0], order[len(order) // 2]]))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._data is None:
            self._data = self._take_probe(trainer, pl_module, None, _NUM_DATA).images.detach().float().cpu()
        if self._probe is None:
            self._probe = self._data[: self.num_probe].clone()
        self._ready = False
        self._prepare(pl_module)

    def _run_layer(self, trainer: Any, pl_module: Any, layer: str, label: str) -> None:
        lo, hi = self._value_range()
        result = invert(
            pl_module, self._to_model(pl_module, self._probe), layer, steps=self.steps, lr=self.lr, seed=self.seed,
            lambda_alpha=self.lambda_alpha, lambda_tv=self.lambda_tv, lambda_tv_start=self.lambda_tv_start,
            value_range=(lo, hi),
            forward=self._forward_fn(pl_module),
        )  # fmt: skip
        panel = render.inversion_panel(self._probe, result, value_range=(lo, hi), cell_px=64)
        self._log_image(
            trainer, f"inversion/{layer}", panel,
            description=(
                f"Probe images reconstructed from the output of `{layer}` (Mahendran & Vedaldi, {self.steps} steps); "
                "label: relative feature error ‖Φ(x) − Φ₀‖ / ‖Φ₀‖."
            ),
        )  # fmt: skip
        self._log_scalars(trainer, {f"inversion/{layer}/feature_error": float(result.feature_error.mean())})
        self._remember(layer, label, result.images)
        self._log_strip(trainer, layer, [f"img {i}" for i in range(self._probe.shape[0])], "Reconstructions")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "probe": self._probe}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._probe is None and state_dict.get("probe") is not None:
            self._probe = state_dict["probe"].detach().cpu()
