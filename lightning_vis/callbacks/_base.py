"""Shared callback machinery: when to run, where to log, which probe, what to save.

Callbacks subclass :class:`_VisMonitor`. It derives from the ``Callback`` of every
Lightning package installed (``lightning.pytorch`` and/or ``pytorch_lightning``), so one
instance works in either package's ``Trainer``.
"""

from __future__ import annotations

import importlib
import weakref
from dataclasses import dataclass
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_vis.isolation import preserved_rng
from lightning_vis.layers import resolve_probe_layers

_PACKAGES = []
for _name in ("lightning.pytorch", "pytorch_lightning"):
    try:
        _PACKAGES.append(importlib.import_module(_name))
    except ImportError:  # pragma: no cover - depends on the environment
        pass
if not _PACKAGES:  # pragma: no cover
    raise ImportError("lightning_vis.callbacks needs `lightning` or `pytorch_lightning`: pip install pytorch-lightning")

_CALLBACK_BASES = tuple(p.Callback for p in _PACKAGES)
_TENSORBOARD_LOGGERS = tuple(p.loggers.TensorBoardLogger for p in _PACKAGES)
# warnings already given, per Trainer (one warning for all our callbacks together)
_LOGGER_WARNINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_tensorboard(logger: Any) -> bool:
    return isinstance(logger, _TENSORBOARD_LOGGERS)


def _image_summary(tag: str, image: torch.Tensor, description: str = "") -> Any:
    """A TensorBoard image summary, PNG-encoded with fast compression (a third of the time
    of the default level, for files about 10% larger)."""
    import io

    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata

    hwc = image.detach().to(torch.uint8).cpu().permute(1, 2, 0).numpy()
    if hwc.shape[2] == 1:
        hwc = hwc[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(hwc).save(buffer, format="PNG", compress_level=1)
    encoded = Summary.Image(
        height=image.shape[1], width=image.shape[2], colorspace=image.shape[0], encoded_image_string=buffer.getvalue()
    )
    metadata = SummaryMetadata(
        display_name=tag,
        summary_description=description,
        plugin_data=SummaryMetadata.PluginData(plugin_name="images"),
    )
    return Summary(value=[Summary.Value(tag=tag, image=encoded, metadata=metadata)])


def check_every(name: str, value: int | None, *, allow_none: bool = True) -> int | None:
    """Validate a cadence argument (``every_n_steps``, ``every_n_epochs``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid value for {name}={value!r}. Must be an int >= 1" + (" or None" if allow_none else ""))
    return value


def find_images(batch: Any) -> torch.Tensor | None:
    """The first floating-point tensor of rank 4 (``[N, C, H, W]``) in a batch structure."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.ndim == 4 and batch.is_floating_point() else None
    if isinstance(batch, Mapping):
        preferred = [k for k in ("image", "images", "img", "x", "input", "inputs") if k in batch]
        batch = [batch[k] for k in preferred] + [v for k, v in batch.items() if k not in preferred]
    if isinstance(batch, (list, tuple)):
        for item in batch:
            found = find_images(item)
            if found is not None:
                return found
    return None


def _flatten_loaders(loaders: Any) -> list:
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [dl for item in loaders for dl in _flatten_loaders(item)]
    if hasattr(loaders, "flattened"):  # CombinedLoader
        return list(loaders.flattened)
    return [loaders]


def find_labels(batch: Any, n: int | None = None) -> torch.Tensor | None:
    """The class labels of a batch: the first integer tensor ``[N]`` beside the images.

    Mappings are searched under ``label``/``labels``/``target``/``targets``/``y`` first.
    ``n``: the batch size the labels must have (default: any).

    Example::

        >>> find_labels((torch.zeros(2, 3, 4, 4), torch.tensor([1, 0])))
        tensor([1, 0])
        >>> find_labels({"image": torch.zeros(2, 3, 4, 4)}) is None
        True
    """

    def fits(t: Any) -> bool:
        return (
            isinstance(t, torch.Tensor)
            and t.ndim == 1
            and not t.is_floating_point()
            and not t.is_complex()
            and t.dtype != torch.bool
            and (n is None or t.shape[0] == n)
        )

    if fits(batch):
        return batch
    if isinstance(batch, Mapping):
        preferred = [k for k in ("label", "labels", "target", "targets", "y", "class", "classes") if k in batch]
        batch = [batch[k] for k in preferred] + [v for k, v in batch.items() if k not in preferred]
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, (list, tuple, Mapping)) or fits(item):
                found = find_labels(item, n)
                if found is not None:
                    return found
    return None


def _names_of(obj: Any) -> list[str] | None:
    for attr in ("class_names", "classes"):
        names = getattr(obj, attr, None)
        if isinstance(names, Mapping):  # {index: name} or {name: index}
            items = list(names.items())
            if items and all(isinstance(k, int) for k, _ in items):
                names = [str(v) for _, v in sorted(items)]
            elif items and all(isinstance(v, int) for _, v in items):
                names = [str(k) for k, _ in sorted(items, key=lambda kv: kv[1])]
        if isinstance(names, (list, tuple)) and names and all(isinstance(x, str) for x in names):
            return list(names)
    return None


def class_names(trainer: Any, pl_module: Any = None) -> list[str] | None:
    """Class names where the data exposes them (``classes`` or ``class_names``).

    Looked up on the LightningModule, the Trainer's datamodule, then the datasets of the
    validation and training dataloaders (through ``Subset``-style ``.dataset`` wrappers).
    """
    candidates = [pl_module, getattr(trainer, "datamodule", None)]
    loaders = _flatten_loaders(getattr(trainer, "val_dataloaders", None))
    loaders += _flatten_loaders(getattr(trainer, "train_dataloader", None))
    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        for _ in range(4):
            if dataset is None:
                break
            candidates.append(dataset)
            dataset = getattr(dataset, "dataset", None)
    for obj in candidates:
        if obj is not None:
            names = _names_of(obj)
            if names:
                return names
    return None


def _first_batch(loader: Any, n: int) -> Any:
    """The first ``n`` samples of a loader, collated.

    Map-style datasets are indexed directly (the loader's iterator and sampler are not
    touched); iterable datasets, and datasets whose ``__getitem__`` is not implemented,
    give the loader's first batch.
    """
    from torch.utils.data import IterableDataset

    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None)
    if (
        dataset is not None
        and not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__getitem__")
        and hasattr(dataset, "__len__")
        and collate
    ):
        try:
            size = min(n, len(dataset))
            if size:
                return collate([dataset[i] for i in range(size)])
        except (NotImplementedError, KeyError, IndexError, TypeError, AttributeError):
            pass  # not indexable after all: fall back to the loader's own iteration
    return next(iter(loader))


@dataclass
class ProbeBatch:
    """Probe images (CPU, as the data gives them) and their labels when the data has some."""

    images: torch.Tensor
    labels: torch.Tensor | None = None


def model_dtype(pl_module: Any) -> torch.dtype | None:
    """The floating dtype of the model's parameters (``None`` without float parameters)."""
    for p in pl_module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def to_model(pl_module: Any, images: torch.Tensor) -> torch.Tensor:
    """``images`` on the model's device, cast to its floating dtype (``bf16-true`` etc.)."""
    param = next(iter(pl_module.parameters()), None)
    device = param.device if param is not None else getattr(pl_module, "device", images.device)
    dtype = model_dtype(pl_module) or images.dtype
    return images.detach().to(device=device, dtype=dtype)


class _ForwardCall:
    """How the LightningModule's ``forward`` was called on the first training batch.

    Used when ``forward`` needs more than a tensor of images (``forward(x, scale)``):
    probe passes replace the images in that call and keep the other arguments (tensors
    with the batch's leading size are cut or repeated to the probe's size).
    """

    def __init__(self) -> None:
        self.args: tuple | None = None
        self.kwargs: dict = {}
        self.position: int | str | None = None
        self.batch_size = 0
        self._handle = None

    @property
    def recorded(self) -> bool:
        return self.args is not None

    def arm(self, pl_module: Any) -> None:
        if self._handle is not None or self.recorded:
            return
        self._handle = pl_module.register_forward_hook(self._record, with_kwargs=True)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _record(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if not module.training:  # a probe pass (eval mode), not the training step's own call
            return
        slots = [(i, a) for i, a in enumerate(args)] + list(kwargs.items())
        for key, value in slots:
            if isinstance(value, torch.Tensor) and value.ndim == 4 and value.is_floating_point():
                self.position, self.batch_size = key, value.shape[0]
                self.args = tuple(_detached(a) for a in args)
                self.kwargs = {k: _detached(v) for k, v in kwargs.items()}
                self.disarm()
                return

    def __call__(self, pl_module: Any, images: torch.Tensor) -> Any:
        n = images.shape[0]

        def fit(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == self.batch_size:
                reps = -(-n // max(1, value.shape[0]))
                return value.repeat(reps, *([1] * (value.ndim - 1)))[:n]
            return value

        args = [fit(a) for a in self.args]
        kwargs = {k: fit(v) for k, v in self.kwargs.items()}
        if isinstance(self.position, int):
            args[self.position] = images
        else:
            kwargs[self.position] = images
        return pl_module(*args, **kwargs)


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


#: One recorded forward call per LightningModule, shared by all our callbacks.
_FORWARD_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ProbeError(ValueError):
    """A probe that cannot be run through the model (a ``ValueError``)."""


class _VisMonitor(*_CALLBACK_BASES):
    """Base of the lightning_vis callbacks: cadence, logging, probes, state."""

    def __init__(self) -> None:
        self._warned: set[str] = set()
        self._last_step = -1

    # ---------------------------------------------------------------- scheduling
    def _step_due(self, trainer: Any, every_n_steps: int | None) -> bool:
        """True once per optimizer step whose number is a multiple of ``every_n_steps``."""
        if every_n_steps is None or trainer.sanity_checking:
            return False
        step = trainer.global_step
        return step % every_n_steps == 0 and step != self._last_step

    def _epoch_due(self, trainer: Any, every_n_epochs: int | None) -> bool:
        """At the end of every ``every_n_epochs``-th training epoch (1-based)."""
        if every_n_epochs is None or trainer.sanity_checking:
            return False
        return (trainer.current_epoch + 1) % every_n_epochs == 0 and trainer.global_step != self._last_step

    # ---------------------------------------------------------------- warnings
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, stacklevel=3)

    def _check_loggers(self, trainer: Any) -> None:
        """Warn once per Trainer (for all our callbacks together) when images cannot be shown."""
        if getattr(trainer, "fast_dev_run", False):
            return  # Lightning swaps the loggers for a DummyLogger and says so itself
        said = _LOGGER_WARNINGS.setdefault(trainer, set())
        ours = ", ".join(dict.fromkeys(type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, _VisMonitor)))
        if not trainer.loggers:
            if "no-logger" not in said:
                said.add("no-logger")
                rank_zero_warn(
                    f"lightning_vis ({ours}): the Trainer has no logger (logger=False), so nothing is logged; "
                    "add a TensorBoardLogger to see the images.",
                    stacklevel=3,
                )
        elif not any(_is_tensorboard(lg) for lg in trainer.loggers) and "no-tensorboard" not in said:
            said.add("no-tensorboard")
            kinds = ", ".join(type(lg).__name__ for lg in trainer.loggers)
            rank_zero_warn(
                f"lightning_vis ({ours}): no TensorBoardLogger among the Trainer's loggers ({kinds}); "
                "images are skipped, scalars still go to every logger.",
                stacklevel=3,
            )

    # ---------------------------------------------------------------- logging (rank 0 writes)
    @staticmethod
    def _writers(trainer: Any) -> list:
        if not trainer.is_global_zero:
            return []
        return [lg.experiment for lg in trainer.loggers if _is_tensorboard(lg)]

    @staticmethod
    def _log_scalars(trainer: Any, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not trainer.is_global_zero or not metrics:
            return
        step = trainer.global_step if step is None else step
        metrics = {k: float(v) for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _log_image(
        self, trainer: Any, tag: str, image: torch.Tensor, step: int | None = None, description: str = ""
    ) -> None:
        """A uint8 CHW image to every TensorBoard logger, with a description TensorBoard shows."""
        step = trainer.global_step if step is None else step
        writers = self._writers(trainer)
        if not writers:
            return
        summary = _image_summary(tag, image, description)
        for writer in writers:
            file_writer = getattr(writer, "_get_file_writer", None)
            if callable(file_writer) and type(writer).__module__ == "torch.utils.tensorboard.writer":
                file_writer().add_summary(summary, step)
            else:  # tensorboardX and others: their own encoder
                writer.add_image(tag, image, global_step=step, dataformats="CHW")

    def _log_text(self, trainer: Any, tag: str, text: str, step: int | None = None) -> None:
        step = trainer.global_step if step is None else step
        for writer in self._writers(trainer):
            writer.add_text(tag, text, global_step=step)

    def _log_histogram(self, trainer: Any, tag: str, values: torch.Tensor, step: int | None = None) -> None:
        step = trainer.global_step if step is None else step
        for writer in self._writers(trainer):
            writer.add_histogram(tag, values.detach().float().cpu(), global_step=step)

    # ---------------------------------------------------------------- model
    def _require_convs(self, pl_module: Any) -> tuple[Any, list[str]]:
        """The eager model and its convolutions' names; a model without any fails here."""
        from lightning_vis.layers import conv_layers, unwrap_model

        model = unwrap_model(pl_module)
        convs = list(conv_layers(model))
        if not convs:
            raise ValueError(f"{type(self).__name__}: {type(model).__name__} has no convolution (torch.nn.Conv1d/2d/3d)")
        return model, convs

    # ---------------------------------------------------------------- probes
    # One probe policy for every callback: take the user's probe or sample the data
    # (``_take_probe``), move and cast it to the model (``_to_model``), run it the way
    # training runs the model (``_forward_fn``, checked by ``_probe_runs``).
    @staticmethod
    def _sample_batch(trainer: Any, pl_module: Any, n: int) -> ProbeBatch | None:
        """The first ``n`` images (and labels) of the validation data, else of the training data.

        Map-style datasets are read directly (their loaders' iterators and samplers are
        not touched); the module's batch-transfer hooks are applied; RNG states are
        restored, so random augmentations in the dataset do not shift the run. Identical
        on every rank. ``None`` when no images can be found.
        """
        loaders = _flatten_loaders(getattr(trainer, "val_dataloaders", None))
        loaders += _flatten_loaders(getattr(trainer, "train_dataloader", None))
        for loader in loaders:
            with preserved_rng(), torch.no_grad():
                try:
                    batch = _first_batch(loader, n)
                except (StopIteration, TypeError, IndexError, NotImplementedError, KeyError):
                    continue
                batch = pl_module.on_before_batch_transfer(batch, 0)
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                batch = pl_module.on_after_batch_transfer(batch, 0)
            images = find_images(batch)
            if images is not None:
                labels = find_labels(batch, images.shape[0])
                return ProbeBatch(
                    images[:n].detach().cpu().clone(),
                    None if labels is None else labels[:n].detach().cpu().clone(),
                )
        return None

    @classmethod
    def _sample_images(cls, trainer: Any, pl_module: Any, n: int) -> torch.Tensor | None:
        """The images of :meth:`_sample_batch` (``None`` when the data has none)."""
        found = cls._sample_batch(trainer, pl_module, n)
        return None if found is None else found.images

    def _take_probe(self, trainer: Any, pl_module: Any, probe: torch.Tensor | None, n: int) -> ProbeBatch:
        """The user's probe, else the first ``n`` images of the data; an error naming the callback."""
        if probe is not None:
            return ProbeBatch(probe.detach().cpu())
        found = self._sample_batch(trainer, pl_module, n)
        if found is None:
            raise ValueError(
                f"{type(self).__name__}: found no images [N, C, H, W] in the validation or training data; "
                "pass probe=<tensor of images>"
            )
        return found

    _to_model = staticmethod(to_model)

    @staticmethod
    def _forward_fn(pl_module: Any) -> Any:
        """A callable ``images -> output`` that runs the LightningModule as training does.

        ``pl_module(images)``, or, for a ``forward`` that needs more than images, the
        first training batch's own call with the images replaced (see ``_probe_runs``).
        """
        call = _FORWARD_CALLS.get(pl_module)
        if call is not None and call.recorded:
            return lambda images: call(pl_module, images)
        return pl_module

    def _forward_pending(self, pl_module: Any) -> bool:
        """True while the probe forward waits for the first training batch's call."""
        call = _FORWARD_CALLS.get(pl_module)
        return call is not None and not call.recorded

    def _probe_runs(self, pl_module: Any, images: torch.Tensor, *, final: bool = False) -> bool:
        """Check that probe images run through the model; False: wait for the first training batch.

        Runs two images under :func:`~lightning_vis.isolation.isolated`. A ``forward``
        that does not take a bare image tensor (``TypeError``) arms a recorder of the
        first training forward call (shared by all our callbacks) and returns False;
        anything else that fails raises :class:`ProbeError` naming the probe's shape,
        dtype and the model. ``final=True`` (after the first training batch): a forward
        that still cannot be run is an error.
        """
        from lightning_vis.isolation import isolated
        from lightning_vis.layers import eager_forward, unwrap_model

        x = to_model(pl_module, images[:2])
        forward = self._forward_fn(pl_module)
        try:
            with isolated(unwrap_model(pl_module)), torch.no_grad(), eager_forward(unwrap_model(pl_module)):
                forward(x)
            return True
        except (TypeError, NotImplementedError) as err:
            if forward is not pl_module or final:
                hint = (
                    f" (and the first training batch did not call {type(pl_module).__name__}.forward either)"
                    if final
                    else ""
                )
                raise ProbeError(self._probe_message(pl_module, images, err) + hint) from err
            _FORWARD_CALLS.setdefault(pl_module, _ForwardCall()).arm(pl_module)
            self._warn_once(
                "forward-call",
                f"{type(self).__name__}: {type(pl_module).__name__}.forward does not take a bare image tensor "
                f"({err}); probe passes will reuse the first training batch's forward call with the images "
                "replaced.",
            )
            return False
        except (RuntimeError, ValueError, IndexError) as err:
            raise ProbeError(self._probe_message(pl_module, images, err)) from err

    def _conv_order(self, pl_module: Any, images: torch.Tensor, *, final: bool = False) -> list[str] | None:
        """The convolutions in the order the probe images pass them, for default layers.

        ``None`` while the forward waits for the first training batch's call (see
        :meth:`_probe_runs`); a ``ValueError`` naming the callback when no convolution runs.
        """
        from lightning_vis.layers import _quote_list, conv_layers, execution_order, unwrap_model

        if not self._probe_runs(pl_module, images, final=final):
            return None
        convs = list(conv_layers(unwrap_model(pl_module)))
        x = to_model(pl_module, images[:1])
        order = execution_order(pl_module, x, convs, forward=self._forward_fn(pl_module))
        if not order:
            raise ValueError(
                f"{type(self).__name__}: a forward pass of the probe called none of the convolutions "
                f"{_quote_list(convs)}; name the layers with layers=[...]"
            )
        return order

    def _probe_message(self, pl_module: Any, images: torch.Tensor, err: BaseException) -> str:
        return (
            f"{type(self).__name__}: probe of shape {tuple(images.shape)} does not fit {type(pl_module).__name__} "
            f"(run as {model_dtype(pl_module)} on {to_model(pl_module, images[:1]).device}): "
            f"{type(err).__name__}: {err}"
        )

    @staticmethod
    def _release_forward(pl_module: Any) -> None:
        call = _FORWARD_CALLS.get(pl_module)
        if call is not None:
            call.disarm()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._release_forward(pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release_forward(pl_module)

    @staticmethod
    def _check_probe(probe: torch.Tensor | None) -> torch.Tensor | None:
        if probe is None:
            return None
        if not isinstance(probe, torch.Tensor) or not probe.is_floating_point():
            raise TypeError(f"probe must be a float tensor [N, C, H, W] or None, got {type(probe).__name__}")
        if probe.ndim == 3:
            probe = probe.unsqueeze(0)
        if probe.ndim != 4 or probe.shape[0] < 1:
            raise ValueError(f"probe must have shape [N, C, H, W] with N >= 1, got {tuple(probe.shape)}")
        return probe.detach().clone()

    # ---------------------------------------------------------------- state
    def _config(self) -> dict:
        """The configuration that tells two instances of a callback apart (for ``state_key``)."""
        return {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._config())

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step", -1)


class _ProbePanelMonitor(_VisMonitor):
    """A callback that renders panels of fixed probe images for a few layers.

    Holds what such callbacks share: ``layers`` patterns resolved against the model's
    convolutions, the resolved ``layer_names`` and the ``probe`` (on the CPU), both kept in
    the checkpoint so a resumed run shows the same layers and images. Subclasses set
    ``self.layers``, ``self._layer_names`` and ``self._probe`` in ``__init__``.
    """

    layers: list[str] | None
    _layer_names: list[str] | None
    _probe: torch.Tensor | None

    @property
    def layer_names(self) -> list[str] | None:
        """The layers shown (resolved at setup, or when training starts for the default)."""
        return self._layer_names

    @property
    def probe_images(self) -> torch.Tensor | None:
        """The probe images (on the CPU), fixed for the run once chosen."""
        return self._probe

    def _resolve(self, model: torch.nn.Module, convs: list[str]) -> list[str]:
        return resolve_probe_layers(model, self.layers or [], convs)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "layer_names": self._layer_names, "probe": self._probe}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._layer_names is None:
            self._layer_names = state_dict.get("layer_names")
        if self._probe is None and state_dict.get("probe") is not None:
            self._probe = state_dict["probe"].detach().cpu()


def as_pattern_list(layers: str | Iterable[str] | None) -> list[str] | None:
    """Normalise a ``layers`` argument: ``None``, one name, or several."""
    if layers is None:
        return None
    if isinstance(layers, str):
        return [layers]
    layers = list(layers)
    for item in layers:
        if not isinstance(item, str):
            raise TypeError(f"layer names must be strings, got {type(item).__name__}: {item!r}")
    if not layers:
        raise ValueError("layers must name at least one layer, or be None for the default")
    return layers


def spread(names: Sequence[str], k: int) -> list[str]:
    """Up to ``k`` names spread evenly over ``names`` (first and last included).

    Example::

        >>> spread(["a", "b", "c", "d", "e", "f", "g"], 4)
        ['a', 'c', 'e', 'g']
        >>> spread(["a", "b", "c"], 1)  # one name: the deepest
        ['c']
    """
    if k < 1:
        raise ValueError(f"Invalid value for k={k}. Must be >= 1")
    if len(names) <= k:
        return list(names)
    if k == 1:
        return [names[-1]]
    idx = sorted({round(i * (len(names) - 1) / (k - 1)) for i in range(k)})
    return [names[i] for i in idx]
