"""Shared callback machinery: when to run, where to log, which probe, what to save.

Callbacks subclass :class:`_VisMonitor`. It derives from the ``Callback`` of every
Lightning package installed (``lightning.pytorch`` and/or ``pytorch_lightning``), so one
instance works in either package's ``Trainer``.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_vis.isolation import preserved_rng

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


def _first_batch(loader: Any, n: int) -> Any:
    """The first ``n`` samples of a loader's dataset, collated, without touching its iterator."""
    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None)
    if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and collate:
        size = min(n, len(dataset))
        if size:
            return collate([dataset[i] for i in range(size)])
    return next(iter(loader))


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
    @staticmethod
    def _sample_images(trainer: Any, pl_module: Any, n: int) -> torch.Tensor | None:
        """The first ``n`` images of the validation data, else of the training data.

        Reads the loaders' datasets directly (their iterators and samplers are not
        touched) and applies the module's batch-transfer hooks; RNG states are restored,
        so random augmentations in the dataset do not shift the run. Identical on every
        rank. ``None`` when no images can be found.
        """
        loaders = _flatten_loaders(getattr(trainer, "val_dataloaders", None))
        loaders += _flatten_loaders(getattr(trainer, "train_dataloader", None))
        for loader in loaders:
            with preserved_rng(), torch.no_grad():
                try:
                    batch = _first_batch(loader, n)
                except (StopIteration, TypeError, IndexError):
                    continue
                batch = pl_module.on_before_batch_transfer(batch, 0)
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                batch = pl_module.on_after_batch_transfer(batch, 0)
            images = find_images(batch)
            if images is not None:
                return images[:n].detach().clone()
        return None

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

    @staticmethod
    def _validate_probe_channels(pl_module: Any, probe: torch.Tensor, first_conv: Any) -> None:
        expected = getattr(first_conv, "in_channels", None)
        if expected is not None and probe.shape[1] != expected:
            raise ValueError(
                f"probe has {probe.shape[1]} channels but the model's first convolution expects {expected} "
                f"(probe shape {tuple(probe.shape)})"
            )

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
    """
    if len(names) <= k:
        return list(names)
    idx = sorted({round(i * (len(names) - 1) / (k - 1)) for i in range(k)})
    return [names[i] for i in idx]
