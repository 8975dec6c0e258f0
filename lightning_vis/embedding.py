"""The embedding projector's pieces: features, thumbnails, sprites, neighbours, files.

Pure functions (torch, numpy, Pillow and TensorBoard's projector protobuf; no Lightning):

* :func:`pool_features` turns a layer's output (or a linear layer's input) into one
  vector per image, globally average-pooled where it is spatial.
* :func:`sprite_cell_px`, :func:`square_thumbnails` and :func:`make_sprite` build the
  sprite TensorBoard's projector shows at each point: square cells (an image is padded to
  ``max(H, W)`` before it is shrunk, so nothing is stretched) and a square sprite of at
  most 8192 pixels per side (the projector's limit).
* :func:`nearest_neighbours` (exact, brute force, chunked) and
  :func:`neighbour_agreement` compare feature space with pixel space, the CS231n figure.
* :func:`write_embedding` writes one snapshot in the layout the projector reads and
  *merges* it into ``projector_config.pbtxt`` on disk. ``SummaryWriter.add_embedding``
  rewrites that file from the writer's own memory, so a second writer on the directory
  (a resumed run) drops every earlier entry; merging keeps all snapshots.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "MAX_SPRITE_PX",
    "make_sprite",
    "nearest_neighbours",
    "neighbour_agreement",
    "pixel_vectors",
    "pool_features",
    "select_queries",
    "sprite_cell_px",
    "square_thumbnails",
    "write_embedding",
    "write_metadata",
    "write_sprite",
]

#: TensorBoard's projector loads sprites of at most this many pixels per side.
MAX_SPRITE_PX = 8192
PROJECTOR_CONFIG = "projector_config.pbtxt"
METRICS = ("euclidean", "cosine")


def pool_features(x: torch.Tensor, *, channel_dim: int = 1) -> torch.Tensor:
    """One float32 feature vector per sample: spatial dimensions averaged away.

    Args:
        x: a layer's output ``[N, C]`` or ``[N, C, *spatial]`` (``channel_dim=1``), or a
            linear layer's input ``[N, *, D]`` (``channel_dim=-1``: every dimension
            between the batch and the features is averaged).
        channel_dim: ``1`` (channels first) or ``-1`` (features last).

    Returns:
        ``[N, D]`` float32, on ``x``'s device, detached.

    Raises:
        ValueError: ``x`` has fewer than two dimensions, or ``channel_dim`` is not 1 or -1.

    Example::

        >>> pool_features(torch.arange(8.0).view(1, 2, 2, 2))
        tensor([[1.5000, 5.5000]])
        >>> pool_features(torch.ones(2, 5, 3), channel_dim=-1).shape
        torch.Size([2, 3])
    """
    if channel_dim not in (1, -1):
        raise ValueError(f"Invalid value for channel_dim={channel_dim!r}. Must be 1 or -1")
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"Expected features [N, D] or [N, C, *spatial], got {getattr(x, 'shape', type(x))}")
    x = x.detach().float()
    if x.ndim == 2:
        return x
    if channel_dim == 1:
        return x.flatten(2).mean(dim=2)
    return x.flatten(1, -2).mean(dim=1)


def sprite_cell_px(n: int, height: int, width: int, *, max_cell: int = 64, max_side: int = MAX_SPRITE_PX) -> int:
    """Side of one square sprite cell for ``n`` images of ``height × width`` pixels.

    The cell is the image's larger side (images are never enlarged), at most ``max_cell``,
    and small enough that ``ceil(sqrt(n))`` cells fit in ``max_side`` pixels.

    Raises:
        ValueError: ``n`` images cannot fit with cells of at least 1 pixel.

    Example::

        >>> sprite_cell_px(512, 32, 32), sprite_cell_px(512, 224, 160), sprite_cell_px(10000, 224, 224)
        (32, 64, 64)
        >>> sprite_cell_px(10000, 224, 224, max_cell=128)
        81
    """
    for name, value in (("n", n), ("height", height), ("width", width), ("max_cell", max_cell)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid value for {name}={value!r}. Must be an int >= 1")
    per_side = math.ceil(math.sqrt(n))
    cell = min(max(height, width), max_cell, max_side // per_side)
    if cell < 1:
        raise ValueError(f"{n} images do not fit a sprite of {max_side} px per side (at most {max_side**2})")
    return cell


def _display(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` → RGB in [0, 1], min-max scaled per image (data is usually normalised)."""
    x = images.detach().float()
    c = x.shape[1]
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
    elif c != 3:
        x = x[:, :3] if c > 3 else x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.full_like(x, 0.5))


def square_thumbnails(images: torch.Tensor, cell_px: int, *, pad_value: float = 0.0) -> torch.Tensor:
    """Images as square uint8 RGB thumbnails: padded to ``max(H, W)``, then resized.

    Each image is min-max scaled on its own for display; one channel is shown as grey,
    more than three channels by the first three. Non-square images are centred on a
    square of ``pad_value`` (so the projector does not stretch them), then shrunk with
    antialiasing (or enlarged, nearest) to ``cell_px``.

    Args:
        images: ``[N, C, H, W]`` float images (any device).
        cell_px: side of the thumbnails.
        pad_value: grey level in [0, 1] of the padding.

    Returns:
        ``[N, 3, cell_px, cell_px]`` uint8 on ``images``' device.

    Example::

        >>> t = square_thumbnails(torch.rand(2, 1, 20, 10), 8)
        >>> t.shape, t.dtype, int(t[0, :, :, 0].max())  # left margin is padding
        (torch.Size([2, 3, 8, 8]), torch.uint8, 0)
    """
    if isinstance(cell_px, bool) or not isinstance(cell_px, int) or cell_px < 1:
        raise ValueError(f"Invalid value for cell_px={cell_px!r}. Must be an int >= 1")
    if images.ndim != 4:
        raise ValueError(f"Expected images [N, C, H, W], got shape {tuple(images.shape)}")
    x = _display(images)
    n, _, h, w = x.shape
    side = max(h, w)
    if h != w:
        canvas = torch.full((n, 3, side, side), float(pad_value), device=x.device)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[:, :, top : top + h, left : left + w] = x
        x = canvas
    if side > cell_px:
        x = torch.nn.functional.interpolate(x, size=(cell_px, cell_px), mode="bilinear", antialias=True,
                                            align_corners=False)  # fmt: skip
    elif side < cell_px:
        x = torch.nn.functional.interpolate(x, size=(cell_px, cell_px), mode="nearest-exact")
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def pixel_vectors(images: torch.Tensor, *, max_px: int = 32) -> torch.Tensor:
    """Images as float32 vectors for pixel-space distances, area-shrunk to at most ``max_px``.

    The values are the images as the model sees them (not display-scaled); large images
    are shrunk by an integer area-average factor first, which keeps the buffer small and
    makes the distance insensitive to pixel-level noise.

    Example::

        >>> pixel_vectors(torch.ones(2, 3, 64, 64), max_px=16).shape
        torch.Size([2, 768])
    """
    x = images.detach().float()
    if x.ndim != 4:
        raise ValueError(f"Expected images [N, C, H, W], got shape {tuple(x.shape)}")
    factor = math.ceil(max(x.shape[-2:]) / max_px)
    if factor > 1:
        x = torch.nn.functional.avg_pool2d(x, factor, ceil_mode=True)
    return x.flatten(1)


def make_sprite(thumbnails: torch.Tensor, *, max_side: int = MAX_SPRITE_PX) -> torch.Tensor:
    """Square thumbnails ``[N, 3, S, S]`` (uint8) as one square sprite, row-major.

    The sprite has ``ceil(sqrt(N))`` cells per side (the projector's layout); unused
    cells are black.

    Raises:
        ValueError: thumbnails are not square, or the sprite would exceed ``max_side``.

    Example::

        >>> make_sprite(torch.zeros(5, 3, 10, 10, dtype=torch.uint8)).shape
        torch.Size([3, 30, 30])
    """
    if thumbnails.ndim != 4 or thumbnails.shape[1] != 3 or thumbnails.shape[2] != thumbnails.shape[3]:
        raise ValueError(f"Expected square RGB thumbnails [N, 3, S, S], got shape {tuple(thumbnails.shape)}")
    n, _, s, _ = thumbnails.shape
    per_side = max(1, math.ceil(math.sqrt(n)))
    side = per_side * s
    if side > max_side:
        raise ValueError(
            f"A sprite of {n} cells of {s} px would be {side} px per side; the projector allows {max_side}. "
            f"Use cells of at most {max_side // per_side} px (sprite_cell_px)"
        )
    grid = torch.zeros(per_side * per_side, 3, s, s, dtype=torch.uint8)
    grid[:n] = thumbnails.detach().cpu()
    return grid.view(per_side, per_side, 3, s, s).permute(2, 0, 3, 1, 4).reshape(3, side, side)


def _distances(vectors: torch.Tensor, rows: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        unit = torch.nn.functional.normalize(vectors, dim=1)
        return 1.0 - unit[rows] @ unit.T
    # exact differences (no |a|² - 2ab + |b|² cancellation): ties and near-ties are decided correctly
    return torch.cdist(vectors[rows], vectors, compute_mode="donot_use_mm_for_euclid_dist")


def nearest_neighbours(
    vectors: torch.Tensor,
    queries: torch.Tensor | Sequence[int] | None = None,
    k: int = 5,
    *,
    metric: str = "euclidean",
    chunk: int = 256,
) -> torch.Tensor:
    """Exact k nearest neighbours of some rows of ``vectors`` among all the others.

    Brute force in chunks of ``chunk`` query rows (memory ``chunk × N``). A query is never
    its own neighbour (other rows at distance 0 are); ties go to the lower index.

    Args:
        vectors: ``[N, D]`` float vectors.
        queries: row indices to look up; ``None``: every row.
        k: neighbours per query, at most ``N - 1``.
        metric: ``"euclidean"`` or ``"cosine"`` (1 − cosine similarity).
        chunk: query rows per distance block.

    Returns:
        ``[Q, k]`` int64 indices into ``vectors``, nearest first.

    Raises:
        ValueError: bad ``k``, ``metric``, ``chunk`` or query index.

    Example::

        >>> v = torch.tensor([[0.0], [1.0], [3.0], [1.5]])
        >>> nearest_neighbours(v, [0, 2], k=2)
        tensor([[1, 3],
                [3, 1]])
    """
    if metric not in METRICS:
        raise ValueError(f"Invalid value for metric={metric!r}. Must be one of {', '.join(map(repr, METRICS))}")
    if vectors.ndim != 2:
        raise ValueError(f"Expected vectors [N, D], got shape {tuple(vectors.shape)}")
    n = vectors.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
        raise ValueError(f"Invalid value for k={k!r}. Must be an int in [1, {n - 1}] for {n} vectors")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"Invalid value for chunk={chunk!r}. Must be an int >= 1")
    rows = torch.arange(n) if queries is None else torch.as_tensor(queries, dtype=torch.long).flatten().cpu()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise ValueError(f"Query indices must be in [0, {n - 1}], got {rows.tolist()}")
    vectors = vectors.detach().float()
    rows = rows.to(vectors.device)
    out = []
    index = torch.arange(n, device=vectors.device)
    for start in range(0, rows.numel(), chunk):
        block = rows[start : start + chunk]
        d = _distances(vectors, block, metric)
        d[index[: block.numel()], block] = float("inf")  # never the query itself
        order = torch.sort(d, dim=1, stable=True).indices  # stable: ties to the lower index
        out.append(order[:, :k])
    return torch.cat(out).cpu() if out else torch.zeros(0, k, dtype=torch.long)


def neighbour_agreement(neighbours: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor | None = None) -> float:
    """Fraction of neighbours that share their query's label (kNN label agreement).

    Args:
        neighbours: ``[Q, k]`` indices from :func:`nearest_neighbours`.
        labels: ``[N]`` labels of all rows.
        queries: ``[Q]`` the query rows (default: ``0 .. Q-1``, i.e. every row).

    Example::

        >>> neighbour_agreement(torch.tensor([[1, 2], [0, 2], [0, 1]]), torch.tensor([0, 0, 1]))
        0.3333333333333333
    """
    labels = labels.cpu()
    queries = torch.arange(neighbours.shape[0]) if queries is None else torch.as_tensor(queries).cpu()
    if neighbours.numel() == 0:
        return float("nan")
    return float((labels[neighbours.cpu()] == labels[queries][:, None]).double().mean())


def select_queries(labels: torch.Tensor | None, n: int, num: int = 8) -> list[int]:
    """``num`` query rows out of ``n``: one per class in turn (by first appearance), else evenly spread.

    Example::

        >>> select_queries(torch.tensor([2, 2, 0, 1, 0, 1, 2]), 7, 4)
        [0, 2, 3, 1]
        >>> select_queries(None, 10, 3)
        [0, 4, 9]
    """
    num = min(num, n)
    if labels is None:
        if num <= 1:
            return list(range(num))
        return sorted({round(i * (n - 1) / (num - 1)) for i in range(num)})
    rows: dict[int, list[int]] = {}
    for i, label in enumerate(labels[:n].tolist()):
        rows.setdefault(int(label), []).append(i)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < num:
        for members in rows.values():
            if depth < len(members) and len(chosen) < num:
                chosen.append(members[depth])
        depth += 1
    return chosen


# ----------------------------------------------------------------------------- files
def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _fingerprint(*parts: bytes) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:12]


def write_sprite(logdir: str, thumbnails: torch.Tensor, *, folder: str = "embedding") -> str:
    """Write the sprite of ``thumbnails`` once (content-addressed); its path relative to ``logdir``.

    The file name holds a hash of the thumbnails, so every snapshot of the same images
    shares one file, and a different sample set (or a resumed run) never overwrites it.
    """
    from PIL import Image

    sprite = make_sprite(thumbnails)
    hwc = sprite.permute(1, 2, 0).contiguous().numpy()
    rel = os.path.join(folder, f"sprite_{_fingerprint(hwc.tobytes())}.png")
    path = os.path.join(logdir, rel)
    if not os.path.exists(path):
        import io

        os.makedirs(os.path.dirname(path), exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(hwc).save(buffer, format="PNG", optimize=True)
        _write_atomic(path, buffer.getvalue())
    return rel


def _clean(value: object) -> str:
    return str(value).replace("\t", " ").replace("\n", " ").replace("\r", " ")


def write_metadata(logdir: str, columns: dict[str, Sequence[object]], *, folder: str = "embedding") -> str:
    """Write the projector's metadata table once (content-addressed); its path relative to ``logdir``.

    One column is written without a header (the projector's rule); several get a header row.
    """
    names = list(columns)
    if not names:
        raise ValueError("metadata needs at least one column")
    n = len(columns[names[0]])
    if any(len(columns[c]) != n for c in names):
        raise ValueError(f"metadata columns differ in length: { {c: len(v) for c, v in columns.items()} }")
    lines = [] if len(names) == 1 else ["\t".join(_clean(c) for c in names)]
    lines += ["\t".join(_clean(columns[c][i]) for c in names) for i in range(n)]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    rel = os.path.join(folder, f"metadata_{_fingerprint(data)}.tsv")
    path = os.path.join(logdir, rel)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_atomic(path, data)
    return rel


def write_embedding(
    logdir: str,
    features: torch.Tensor,
    *,
    tensor_name: str,
    subdir: str,
    metadata_path: str | None = None,
    sprite_path: str | None = None,
    cell_px: int | None = None,
    precision: int = 4,
) -> object:
    """Write one projector snapshot and merge it into ``<logdir>/projector_config.pbtxt``.

    ``features`` go to ``<logdir>/<subdir>/tensors.tsv`` (``precision`` significant
    digits, plenty for PCA, t-SNE and UMAP). The config on disk is read, any entry with
    the same ``tensor_name`` replaced, ours appended, and the file replaced atomically:
    every earlier snapshot stays listed, whoever wrote it.

    Args:
        logdir: the run's directory (a TensorBoard run: where its event file is).
        features: ``[N, D]``.
        tensor_name: the name the projector lists.
        subdir: folder of this snapshot's tensor file, relative to ``logdir``.
        metadata_path: a table from :func:`write_metadata` (relative to ``logdir``).
        sprite_path: a sprite from :func:`write_sprite` (relative to ``logdir``).
        cell_px: side of one sprite cell (required with ``sprite_path``).
        precision: significant digits in the tensor file.

    Returns:
        The merged ``ProjectorConfig``.
    """
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import EmbeddingInfo, ProjectorConfig

    if features.ndim != 2:
        raise ValueError(f"Expected features [N, D], got shape {tuple(features.shape)}")
    if sprite_path is not None and not cell_px:
        raise ValueError("cell_px is required with sprite_path")
    folder = os.path.join(logdir, subdir)
    os.makedirs(folder, exist_ok=True)
    tensor_rel = os.path.join(subdir, "tensors.tsv")
    array = features.detach().float().cpu().numpy()
    import io

    buffer = io.StringIO()
    np.savetxt(buffer, array, fmt=f"%.{precision}g", delimiter="\t")
    _write_atomic(os.path.join(logdir, tensor_rel), buffer.getvalue().encode("ascii"))

    info = EmbeddingInfo(tensor_name=tensor_name, tensor_path=tensor_rel)
    info.tensor_shape.extend(list(array.shape))
    if metadata_path:
        info.metadata_path = metadata_path
    if sprite_path:
        info.sprite.image_path = sprite_path
        info.sprite.single_image_dim.extend([cell_px, cell_px])

    config_path = os.path.join(logdir, PROJECTOR_CONFIG)
    config = ProjectorConfig()
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            text_format.Parse(f.read(), config)
    kept = [e for e in config.embeddings if e.tensor_name != tensor_name]
    del config.embeddings[:]
    config.embeddings.extend([*kept, info])
    _write_atomic(config_path, text_format.MessageToString(config).encode("utf-8"))
    return config
