"""``EmbeddingProjector``: a late layer's features of fixed validation images, in TensorBoard's projector."""

from __future__ import annotations

import re
from typing import Any

import torch

from lightning_vis import embedding as emb
from lightning_vis import render
from lightning_vis.callbacks._base import _VisMonitor, check_every, class_names, find_images, find_labels
from lightning_vis.layers import _quote_list, execution_order, resolve_layers, unwrap_model

_MAX_SAMPLES = 10000


class EmbeddingProjector(_VisMonitor):
    """Send a layer's features of fixed validation images to TensorBoard's embedding projector.

    CS231n's last-layer view. During the validation loop's own forward passes (no extra
    pass over the data), hooks on the layer collect the features of the first
    ``num_samples`` validation samples (the first dataloader, in its order), globally
    average-pooled where the layer's output is spatial, with their labels and small
    thumbnails, into bounded buffers on the model's device. At the end of every
    ``every_n_epochs``-th epoch's validation they are written as one projector snapshot
    (PCA, t-SNE and UMAP of the points, coloured by class, each drawn as its thumbnail)
    and drawn as the ``embedding/neighbours`` picture: for 8 fixed query images, their
    nearest neighbours in feature space beside their nearest neighbours in pixel space
    (what the network has learned to ignore: colour, position, clutter). Only global
    rank 0 collects and writes (under DDP: the first samples of its own shard).

    **Logged** (on global rank 0):

    * projector snapshot ``<layer> @ epoch E, step S`` in each TensorBoard logger's run
      directory (``projector_config.pbtxt``, ``embedding/``): one tensor file per
      snapshot (about 0.3–0.6 MB for 512 samples of 128 features); the sprite (square
      cells, at most 8192 px per side) and the metadata (class names when the data has
      ``classes``, else label numbers; the sample index) are written once and shared by
      every snapshot of the same samples. TensorBoard loads a run's projector config
      once (again only when new runs appear): restart it to see later snapshots.
    * ``embedding/neighbours``: the neighbours image (green frame: same class as the query).
    * ``embedding/neighbour_agreement`` (scalar, to every logger, when the data has
      labels): the fraction of each sample's ``num_neighbours`` nearest neighbours in
      feature space that share its class, over all samples (a kNN view of how well the
      classes separate in this layer); ``embedding/neighbour_agreement_pixels``: the same
      in pixel space, the baseline.

    Args:
        layer: the module whose *output* is embedded (a ``named_modules()`` name of the
            LightningModule or a glob matching one module); ``None``: the *input* of the
            last ``torch.nn.Linear`` the forward pass calls (the classifier's features).
        num_samples: validation samples embedded (at most 10,000; the sprite's cell size
            is chosen from it so the sprite stays within 8192 px).
        every_n_epochs: write a snapshot after the validation of every this many epochs.
        num_queries: query images in the neighbours picture.
        num_neighbours: neighbours per query (and for the agreement scalar).
        metric: ``"euclidean"`` or ``"cosine"``, for the feature-space neighbours (pixel
            space is always Euclidean).
        max_cell_px: largest side of a sprite cell.

    Raises:
        ValueError: bad argument values (here); at ``setup``: an unknown layer (the
            modules are listed), a pattern matching several; when training starts: no
            ``nn.Linear`` called by the forward pass (for the default), a layer the
            forward pass never calls, no images in the data.

    Example::

        >>> from lightning_vis.callbacks import EmbeddingProjector
        >>> EmbeddingProjector(num_samples=256, every_n_epochs=2)
        EmbeddingProjector(layer=None, num_samples=256, every_n_epochs=2)
    """

    def __init__(
        self,
        layer: str | None = None,
        num_samples: int = 512,
        every_n_epochs: int = 3,
        *,
        num_queries: int = 8,
        num_neighbours: int = 4,
        metric: str = "euclidean",
        max_cell_px: int = 64,
    ) -> None:
        super().__init__()
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"layer must be a module name (str) or None, got {type(layer).__name__}: {layer!r}")
        self.every_n_epochs = check_every("every_n_epochs", every_n_epochs, allow_none=False)
        check_every("num_queries", num_queries, allow_none=False)
        check_every("num_neighbours", num_neighbours, allow_none=False)
        check_every("max_cell_px", max_cell_px, allow_none=False)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not (
            num_neighbours + 1 <= num_samples <= _MAX_SAMPLES
        ):
            raise ValueError(
                f"Invalid value for num_samples={num_samples!r}. Must be an int in "
                f"[{num_neighbours + 1}, {_MAX_SAMPLES}] (more than num_neighbours={num_neighbours})"
            )
        if metric not in emb.METRICS:
            raise ValueError(f"Invalid value for metric={metric!r}. Must be one of {', '.join(map(repr, emb.METRICS))}")
        self.layer = layer
        self.num_samples = num_samples
        self.num_queries = num_queries
        self.num_neighbours = num_neighbours
        self.metric = metric
        self.max_cell_px = max_cell_px
        self._layer_name: str | None = None  # resolved module name
        self._use_input = layer is None  # default: the input of the last Linear
        self._queries: list[int] | None = None
        self._handle: Any = None
        self._reset_buffers()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, num_samples={self.num_samples}, every_n_epochs={self.every_n_epochs})"

    def _config(self) -> dict:
        return {"layer": self.layer, "num_samples": self.num_samples, "every_n_epochs": self.every_n_epochs}

    @property
    def layer_name(self) -> str | None:
        """The module whose output (or, for the default, whose input) is embedded."""
        return self._layer_name

    @property
    def feature_name(self) -> str | None:
        """How the features are named in TensorBoard (``"net.fc (input)"`` or the layer)."""
        if self._layer_name is None:
            return None
        return f"{self._layer_name} (input)" if self._use_input else self._layer_name

    # ------------------------------------------------------------------ buffers
    def _reset_buffers(self) -> None:
        self._collecting = False
        self._armed = False
        self._count = 0
        self._pending: torch.Tensor | None = None
        self._batch_images: torch.Tensor | None = None
        self._batch_labels: torch.Tensor | None = None
        self._features: torch.Tensor | None = None
        self._thumbs: torch.Tensor | None = None
        self._pixels: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._has_labels = True
        self._cell_px = 0
        self._image_shape: torch.Size | None = None

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.layer is not None:
            model = unwrap_model(pl_module)
            names = [n for n, _ in model.named_modules() if n]
            hits = resolve_layers(model, self.layer, names, what="modules")
            if len(hits) != 1:
                raise ValueError(
                    f"EmbeddingProjector: layer={self.layer!r} matches {len(hits)} modules ({_quote_list(hits)}); "
                    "name exactly one"
                )
            self._layer_name = hits[0]
        self._check_loggers(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        model = unwrap_model(pl_module)
        x = self._sample_images(trainer, pl_module, 1)
        if x is None:
            raise ValueError(
                "EmbeddingProjector: found no images [N, C, H, W] in the validation or training data; "
                "it embeds validation images"
            )
        if self._use_input:
            linears = [n for n, m in model.named_modules() if n and isinstance(m, torch.nn.Linear)]
            order = execution_order(pl_module, x, linears) if linears else []
            if not order:
                raise ValueError(
                    f"EmbeddingProjector: a forward pass of {type(model).__name__} calls no torch.nn.Linear, so "
                    "there is no classifier input to embed; name the layer whose output to embed with layer=..."
                )
            self._layer_name = order[-1]
        elif not execution_order(pl_module, x, [self._layer_name]):
            raise ValueError(
                f"EmbeddingProjector: a forward pass of {type(model).__name__} never calls {self._layer_name!r}; "
                "choose a layer the forward pass uses"
            )

    # ------------------------------------------------------------------ collection (validation forward)
    def _due(self, trainer: Any) -> bool:
        return (
            not trainer.sanity_checking
            and trainer.is_global_zero
            and bool(trainer.loggers)
            and self._layer_name is not None
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and trainer.global_step != self._last_step
        )

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._remove_hook()
        self._reset_buffers()
        if not self._due(trainer):
            return
        module = dict(unwrap_model(pl_module).named_modules())[self._layer_name]
        if self._use_input:
            self._handle = module.register_forward_pre_hook(self._pre_hook)
        else:
            self._handle = module.register_forward_hook(self._post_hook)
        self._collecting = True

    def _take(self, value: Any, channel_dim: int) -> None:
        if not self._armed:
            return
        self._armed = False  # the first call of the layer in this batch
        if isinstance(value, (tuple, list)):
            value = next((v for v in value if isinstance(v, torch.Tensor)), None)
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.is_floating_point():
            self._pending = emb.pool_features(value, channel_dim=channel_dim)

    def _pre_hook(self, module: Any, args: tuple) -> None:
        self._take(args[0] if args else None, -1)

    def _post_hook(self, module: Any, args: tuple, output: Any) -> None:
        self._take(output, 1)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:  # fmt: skip
        self._pending = None
        if not self._collecting or dataloader_idx != 0 or self._count >= self.num_samples:
            return
        images = find_images(batch)
        if images is None:
            self._warn_once("no-images", "EmbeddingProjector: found no images [N, C, H, W] in a validation batch")
            return
        self._batch_images = images
        self._batch_labels = find_labels(batch, n=images.shape[0])
        self._armed = True

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:  # fmt: skip
        self._armed = False
        feats, images, labels = self._pending, self._batch_images, self._batch_labels
        self._pending = self._batch_images = self._batch_labels = None
        if feats is None or images is None:
            return
        n = min(feats.shape[0], images.shape[0], self.num_samples - self._count)
        if n <= 0:
            return
        if self._features is None:  # bounded buffers, allocated once per snapshot
            _, _, h, w = images.shape
            self._cell_px = emb.sprite_cell_px(self.num_samples, h, w, max_cell=self.max_cell_px)
            device = feats.device
            self._features = torch.zeros(self.num_samples, feats.shape[1], device=device)
            self._thumbs = torch.zeros(self.num_samples, 3, self._cell_px, self._cell_px, dtype=torch.uint8,
                                       device=device)  # fmt: skip
            pixels = emb.pixel_vectors(images[:1])
            self._pixels = torch.zeros(self.num_samples, pixels.shape[1], device=device)
            self._labels = torch.zeros(self.num_samples, dtype=torch.long, device=device)
            self._image_shape = images.shape[1:]
        if feats.shape[1] != self._features.shape[1] or images.shape[1:] != self._image_shape:
            self._warn_once("shape", "EmbeddingProjector: validation batches of different shapes; skipped the rest")
            self._count = self.num_samples
            return
        sl = slice(self._count, self._count + n)
        self._features[sl] = feats[:n].to(self._features.device)
        self._thumbs[sl] = emb.square_thumbnails(images[:n], self._cell_px).to(self._thumbs.device)
        self._pixels[sl] = emb.pixel_vectors(images[:n]).to(self._pixels.device)
        if labels is not None:
            self._labels[sl] = labels[:n].to(self._labels.device)
        else:
            self._has_labels = False
        self._count += n
        if self._count >= self.num_samples:
            self._remove_hook()  # full: no more work in the remaining batches

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._remove_hook()
        if not self._collecting:
            return
        try:
            if self._count <= self.num_neighbours:
                self._warn_once(
                    "few",
                    f"EmbeddingProjector: only {self._count} validation samples reached {self.feature_name}; "
                    f"need more than num_neighbours={self.num_neighbours}. No snapshot written",
                )
                return
            self._last_step = trainer.global_step
            self._snapshot(trainer, pl_module)
        finally:
            self._reset_buffers()

    # ------------------------------------------------------------------ output
    def _snapshot(self, trainer: Any, pl_module: Any) -> None:
        n = self._count
        features = self._features[:n].cpu()
        thumbs = self._thumbs[:n].cpu()
        pixels = self._pixels[:n].cpu()
        labels = self._labels[:n].cpu() if self._has_labels else None
        names = class_names(trainer, pl_module) if labels is not None else None
        if self._queries is None or max(self._queries, default=0) >= n:
            self._queries = emb.select_queries(labels, n, self.num_queries)
        k = min(self.num_neighbours, n - 1)
        feat_nn = emb.nearest_neighbours(features, self._queries, k, metric=self.metric)
        pix_nn = emb.nearest_neighbours(pixels, self._queries, k)
        step, epoch = trainer.global_step, trainer.current_epoch + 1
        agreement = None
        if labels is not None:
            feat_all = emb.neighbour_agreement(emb.nearest_neighbours(features, None, k, metric=self.metric), labels)
            pix_all = emb.neighbour_agreement(emb.nearest_neighbours(pixels, None, k), labels)
            agreement = (feat_all, pix_all)
            self._log_scalars(trainer, {"embedding/neighbour_agreement": feat_all,
                                        "embedding/neighbour_agreement_pixels": pix_all}, step=step)  # fmt: skip
        writers = self._writers(trainer)
        if not writers:
            return
        panel = render.neighbours_panel(thumbs, self._queries, feat_nn, pix_nn, labels=labels, class_names=names,
                                        agreement=agreement)  # fmt: skip
        description = (
            f"{len(self._queries)} fixed validation images (left), each followed by its {k} nearest neighbours "
            f"among the first {n} validation images by the features `{self.feature_name}` (globally "
            f"average-pooled, {self.metric} distance), then by pixels (right). Green frame: same class as the "
            "query; red: another class. The headers give the share of same-class neighbours over all samples "
            "(also the scalars embedding/neighbour_agreement and embedding/neighbour_agreement_pixels)."
        )
        self._log_image(trainer, "embedding/neighbours", panel, step=step, description=description)
        if labels is not None:
            label_col = [names[i] if names is not None and 0 <= i < len(names) else str(i) for i in labels.tolist()]
            columns = {"label": label_col, "index": list(range(n))}
        else:
            columns = {"index": list(range(n))}
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self._layer_name) + (".input" if self._use_input else "")
        for writer in writers:
            logdir = _logdir_of(writer)
            if logdir is None:
                self._warn_once("logdir", f"EmbeddingProjector: cannot find the log directory of {type(writer).__name__}")
                continue
            sprite = emb.write_sprite(logdir, thumbs)
            meta = emb.write_metadata(logdir, columns)
            config = emb.write_embedding(
                logdir,
                features,
                tensor_name=f"{self.feature_name} @ epoch {epoch}, step {step}",
                subdir=f"embedding/{safe}/step_{step:07d}",
                metadata_path=meta,
                sprite_path=sprite,
                cell_px=thumbs.shape[-1],
            )
            if type(writer).__module__ == "torch.utils.tensorboard.writer":
                # SummaryWriter.add_embedding rewrites the config from this attribute: keep ours in it
                writer._projector_config = config

    # ------------------------------------------------------------------ cleanup and state
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._remove_hook()
        self._reset_buffers()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._remove_hook()
        self._reset_buffers()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "layer_name": self._layer_name, "queries": self._queries}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._layer_name is None:
            self._layer_name = state_dict.get("layer_name")
        if state_dict.get("queries") is not None:
            self._queries = list(state_dict["queries"])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None
        for key in ("_pending", "_batch_images", "_batch_labels", "_features", "_thumbs", "_pixels", "_labels"):
            state[key] = None
        return state


def _logdir_of(writer: Any) -> str | None:
    for attr in ("get_logdir", "logdir", "log_dir"):
        value = getattr(writer, attr, None)
        value = value() if callable(value) else value
        if isinstance(value, str) and value:
            return value
    return None
