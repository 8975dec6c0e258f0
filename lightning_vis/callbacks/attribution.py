"""``ClassAttribution``: class attribution maps (Grad-CAM, occlusion, …) of fixed probe images, through training."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lightning_vis import render
from lightning_vis.attribution import _OPTIONS, CAM_METHODS, METHODS, attribute, default_cam_layer
from lightning_vis.callbacks._base import _VisMonitor, check_every, class_names
from lightning_vis.deconv import _parse_layer
from lightning_vis.layers import unwrap_model

_TARGETS = ("predicted", "label")


class ClassAttribution(_VisMonitor):
    """Log, for fixed probe images, which pixels drive the network's decision.

    The class attribution methods of the literature (CAM, Grad-CAM, Grad-CAM++,
    Score-CAM, saliency, guided backpropagation, guided Grad-CAM, occlusion), live while
    the network learns: for each probe image :func:`lightning_vis.attribute` computes
    the map of the predicted class (or of the true label, ``target="label"``), and
    :func:`lightning_vis.render.attribution_panel` draws, per image, the image beside the
    map as a heat-map overlay (matplotlib colour map ``cmap``, positive part, each map
    scaled to its own maximum), captioned with the predicted class and its probability
    and, when the data has labels, the true class (red when the prediction is wrong).
    Class names come from ``class_names=`` or the data (a ``classes`` / ``class_names``
    attribute of the datamodule or dataset), else class indices are shown. Every pass
    runs under :func:`~lightning_vis.isolation.isolated` (eval mode, no autocast,
    modes, buffers, ``.grad`` and RNG states restored), so training is unchanged bit for
    bit. Only global rank 0 computes and writes (no collective is involved).

    **Logged** (to every TensorBoard logger, on global rank 0):

    * ``attribution/<method>``: one image per method (e.g. ``attribution/gradcam``) at
      the end of every ``every_n_epochs``-th training epoch and, with ``every_n_steps``,
      every that many optimizer steps. Its description names the method, the layer and
      how to read the picture.

    Args:
        probe: images ``[N, C, H, W]`` (or one ``[C, H, W]``); ``None``: the first
            ``num_probe`` images (and their labels, when the batches have them) of the
            validation data, else of the training data, chosen when training starts and
            kept for the run.
        methods: one or several of ``"cam"``, ``"gradcam"``, ``"gradcam++"``,
            ``"scorecam"``, ``"saliency"``, ``"guided"``, ``"guided-gradcam"``,
            ``"occlusion"``.
        layer: the CAM methods' layer (``named_modules()`` name of the LightningModule,
            ``"name#k"`` for a call of a reused module); default: the last
            convolution-bearing layer with a spatial output (see
            :func:`lightning_vis.attribution.default_cam_layer`; ``"cam"`` finds the layer
            its head averages).
        every_n_epochs: log at the end of every this many training epochs (``None``: never).
        every_n_steps: also log every this many optimizer steps (``trainer.global_step``).
        num_probe: how many images to take from the data when ``probe`` is ``None``.
        labels: true labels ``[N]`` of a user ``probe`` (shown in the captions).
        target: ``"predicted"`` (explain the predicted class) or ``"label"`` (the true one;
            needs labels).
        class_names: names of the classes; default: from the data when it has them.
        options: per-method options of :func:`~lightning_vis.attribute`, e.g.
            ``{"occlusion": {"patch": 8, "stride": 4}}``.
        score: ``callable(output) -> [N, classes]`` for models whose output is not class
            scores.
        cmap: matplotlib colour map of the overlays.
        cell_px: height of one picture in pixels; default: 3 × the probe's size, within 64–80
            (two image | overlay pairs per row fit TensorBoard's 350-px card).

    Raises:
        ValueError: bad argument values (here); at ``setup``: an unknown layer, a CAM
            method on a model without convolutions, a probe that does not fit the model;
            when training starts (before step 1): no probe images in the data, targets
            out of range, a CAM layer without spatial output, a patch larger than the
            images, an output without a class dimension and no ``score``.

    Example::

        >>> from lightning_vis.callbacks import ClassAttribution
        >>> ClassAttribution(methods=("gradcam", "occlusion"), options={"occlusion": {"patch": 8}})
        ClassAttribution(methods=('gradcam', 'occlusion'), layer=None, every_n_epochs=1, every_n_steps=None)
    """

    def __init__(
        self,
        probe: torch.Tensor | None = None,
        methods: str | Sequence[str] = ("gradcam",),
        layer: str | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        *,
        num_probe: int = 8,
        labels: Sequence[int] | torch.Tensor | None = None,
        target: str = "predicted",
        class_names: Sequence[str] | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        score: Callable[[Any], torch.Tensor] | None = None,
        cmap: str = "inferno",
        cell_px: int | None = None,
    ) -> None:
        super().__init__()
        methods = (methods,) if isinstance(methods, str) else tuple(methods)
        if not methods:
            raise ValueError(f"methods must name at least one method of {', '.join(map(repr, METHODS))}")
        for m in methods:
            if m not in METHODS:
                raise ValueError(f"Invalid value for methods: {m!r}. Must be among {', '.join(map(repr, METHODS))}")
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods={methods!r} names a method twice")
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"layer must be a module name (str) or None, got {type(layer).__name__}: {layer!r}")
        if target not in _TARGETS:
            raise ValueError(f"Invalid value for target={target!r}. Must be one of {', '.join(map(repr, _TARGETS))}")
        options = {k: dict(v) for k, v in (options or {}).items()}
        for m, opts in options.items():
            if m not in methods:
                raise ValueError(f"options for {m!r}, which is not among methods={methods!r}")
            bad = [k for k in opts if k not in _OPTIONS.get(m, ())]
            if bad:
                allowed = ", ".join(_OPTIONS.get(m, ())) or "none"
                raise ValueError(f"Invalid options for {m!r}: {', '.join(map(repr, bad))}. It takes: {allowed}")
        check_every("num_probe", num_probe, allow_none=False)
        if cell_px is not None and (isinstance(cell_px, bool) or not isinstance(cell_px, int) or cell_px < 24):
            raise ValueError(f"Invalid value for cell_px={cell_px!r}. Must be an int >= 24 or None")
        if score is not None and not callable(score):
            raise TypeError(f"score must be a callable(output) -> tensor [N, classes], got {type(score).__name__}")
        if class_names is not None and (
            isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names)
        ):
            raise TypeError(f"class_names must be a sequence of strings, got {class_names!r}")
        self.every_n_epochs = check_every("every_n_epochs", every_n_epochs)
        self.every_n_steps = check_every("every_n_steps", every_n_steps)
        if self.every_n_epochs is None and self.every_n_steps is None:
            raise ValueError("ClassAttribution never logs with every_n_epochs=None and every_n_steps=None; set one")
        self.methods = methods
        self.layer = layer
        self.num_probe = num_probe
        self.target = target
        self.options = options
        self.score = score
        self.cmap = cmap
        self.cell_px = cell_px
        self._class_names = list(class_names) if class_names is not None else None
        self._probe = self._check_probe(probe)
        if self._probe is not None:
            self._probe = self._probe.cpu()
        self._user_probe = self._probe is not None
        self._labels = self._check_labels(labels, self._probe)
        self._layer_name: str | None = layer
        self._names: list[str] | None = self._class_names
        self._ready = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(methods={self.methods!r}, layer={self.layer!r}, "
            f"every_n_epochs={self.every_n_epochs}, every_n_steps={self.every_n_steps})"
        )

    def _config(self) -> dict:
        return {"methods": self.methods, "layer": self.layer, "target": self.target}

    @staticmethod
    def _check_labels(labels: Any, probe: torch.Tensor | None) -> torch.Tensor | None:
        if labels is None:
            return None
        if probe is None:
            raise ValueError("labels= describes a user probe: pass probe=<images> with it")
        t = torch.as_tensor(labels)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim != 1 or t.shape[0] != probe.shape[0]:
            raise ValueError(f"labels must be {probe.shape[0]} ints, one per probe image, got {labels!r}")
        return t.long().cpu()

    @property
    def probe_images(self) -> torch.Tensor | None:
        """The probe images (on the CPU), fixed for the run once chosen."""
        return self._probe

    @property
    def probe_labels(self) -> torch.Tensor | None:
        """The probe's true labels, when known."""
        return self._labels

    @property
    def layer_name(self) -> str | None:
        """The CAM methods' layer (resolved when training starts for the default)."""
        return self._layer_name

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if any(m in CAM_METHODS for m in self.methods):
            model, _ = self._require_convs(pl_module)
            if self.layer is not None:
                try:
                    _parse_layer(model, self.layer)
                except ValueError as err:
                    raise ValueError(f"ClassAttribution: {err}") from err
        if self._user_probe:
            self._probe_runs(pl_module, self._probe)
        self._check_loggers(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._probe is None:
            found = self._take_probe(trainer, pl_module, None, self.num_probe)
            self._probe, self._labels = found.images, found.labels
        if self.target == "label" and self._labels is None:
            raise ValueError(
                "ClassAttribution(target='label') needs the probe's labels: the data has none; "
                "pass probe=<images> and labels=<ints>, or use target='predicted'"
            )
        if self._names is None:
            self._names = class_names(trainer, pl_module)
        self._ready = False
        self._prepare(pl_module)

    def _prepare(self, pl_module: Any, final: bool = False) -> None:
        """Resolve the default layer and run every method on one image: bad input fails here, before step 1."""
        if not self._probe_runs(pl_module, self._probe, final=final):
            return
        forward = self._forward_fn(pl_module)
        x = self._to_model(pl_module, self._probe[:1])
        needs_layer = any(m in CAM_METHODS and m != "cam" for m in self.methods)
        try:
            if self._layer_name is None and needs_layer:
                self._layer_name = default_cam_layer(unwrap_model(pl_module), x, forward=forward)
            for method in self.methods:
                labels = None if self._labels is None else self._labels[:1]
                result = attribute(pl_module, x, targets=labels if self.target == "label" else None,
                                   **self._arguments(method, forward))  # fmt: skip
            if self._labels is not None:
                classes = result.logits.shape[1]
                bad = self._labels[(self._labels < 0) | (self._labels >= classes)]
                if bad.numel():
                    raise ValueError(
                        f"labels {bad.tolist()} out of range: the model has {classes} classes (0..{classes - 1})"
                    )
        except (ValueError, TypeError) as err:
            raise type(err)(f"ClassAttribution: {err}") from err
        self._ready = True

    def _arguments(self, method: str, forward: Any) -> dict:
        layer = self._layer_name if method in CAM_METHODS and method != "cam" else None
        if method == "cam":
            layer = self.layer
        options = self.options.get(method, {})
        return {"method": method, "layer": layer, "forward": forward, "score": self.score, **options}

    # ------------------------------------------------------------------ hooks
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
        if not trainer.is_global_zero or not self._writers(trainer) or not self._ready:
            return
        x = self._to_model(pl_module, self._probe)
        forward = self._forward_fn(pl_module)
        labels = self._labels
        targets = labels if self.target == "label" else None
        cell = self.cell_px or min(80, max(64, 3 * self._probe.shape[-2]))  # 2 pairs fit the card
        for method in self.methods:
            result = attribute(pl_module, x, targets=targets, **self._arguments(method, forward))
            captions, wrong = self._captions(result.logits, labels)
            panel = render.attribution_panel(
                self._probe, result.maps.float().cpu(), captions, wrong=wrong, cell_px=cell, cmap=self.cmap
            )
            self._log_image(trainer, f"attribution/{method}", panel, description=self._describe(method, result.layer))

    def _name(self, index: int) -> str:
        names = self._names
        return names[index] if names is not None and 0 <= index < len(names) else str(index)

    def _captions(self, logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[list[list[str]], list[bool]]:
        probs = torch.softmax(logits.detach().float().cpu(), dim=1)
        p, pred = probs.max(dim=1)
        captions, wrong = [], []
        for i in range(probs.shape[0]):
            lines = [f"pred {self._name(int(pred[i]))} {float(p[i]):.0%}"]
            bad = False
            if labels is not None:
                lines.append(f"true {self._name(int(labels[i]))}")
                bad = int(labels[i]) != int(pred[i])
            captions.append(lines)
            wrong.append(bad)
        return captions, wrong

    def _describe(self, method: str, layer: str | None) -> str:
        which = "the true label" if self.target == "label" else "the predicted class"
        where = f" at layer `{layer}`" if layer else ""
        return (
            f"{METHODS[method]}{where}. Per probe image: the image, and the map of {which} over it "
            f"(colour map {self.cmap}: bright = drives the class score; positive part, each map scaled to its "
            "maximum). Caption: predicted class and its probability; the true class when known (red: wrong)."
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "probe": self._probe,
            "labels": self._labels,
            "layer_name": self._layer_name,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._probe is None and state_dict.get("probe") is not None:
            self._probe = state_dict["probe"].detach().cpu()
            labels = state_dict.get("labels")
            self._labels = None if labels is None else labels.detach().cpu()
        if self._layer_name is None:
            self._layer_name = state_dict.get("layer_name")
