"""Linear CKA with the unbiased HSIC estimator (minibatch CKA).

Centered kernel alignment (Kornblith et al. 2019) compares two representations of the
same examples, e.g. one layer's activations at two points of training. It is invariant
to orthogonal transforms and isotropic scaling of either representation, and equals 1
for identical representations. We use the *minibatch* form of Nguyen, Raghu & Kornblith
(2021): for minibatches ``i`` with Gram matrices ``K_i = X_i X_iᵀ`` and ``L_i = Y_i Y_iᵀ``,

    CKA = Σᵢ HSIC₁(Kᵢ, Lᵢ) / √(Σᵢ HSIC₁(Kᵢ, Kᵢ) · Σᵢ HSIC₁(Lᵢ, Lᵢ))

with the unbiased estimator HSIC₁ (Song et al. 2012). The three HSIC sums are
accumulated over minibatches and normalised once at the end; averaging per-batch CKA
values instead would be biased (the "biased-average mistake" this module avoids).

Linear CKA needs only the Gram matrices, so a snapshot of a layer can be kept as its
per-minibatch Gram matrices (``n × n`` each, independent of the layer's width):
:func:`gram_matrices` computes them, :func:`cka_from_grams` compares two sets of them.

Pure torch, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "CKAAccumulator",
    "StreamingGram",
    "cka_from_grams",
    "gram_matrices",
    "hsic1",
    "linear_cka",
    "minibatch_slices",
]

#: The unbiased HSIC estimator needs at least this many examples per minibatch.
MIN_BATCH = 4


def hsic1(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator HSIC₁ of two ``n × n`` Gram matrices (``n >= 4``).

    With ``K̃``, ``L̃`` the Gram matrices with zeroed diagonals and ``1`` the ones vector::

        HSIC₁(K, L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n−1)(n−2)) − 2/(n−2) · (K̃1)·(L̃1)] / (n(n−3))

    Computed in float64; the inputs are not modified.

    Args:
        K: Gram matrix ``[n, n]`` of the first representation.
        L: Gram matrix ``[n, n]`` of the second representation.

    Returns:
        A float64 scalar tensor.

    Raises:
        ValueError: the matrices are not square, differ in size, or ``n < 4``.

    Example::

        >>> X = torch.arange(12.0).reshape(6, 2) ** 0.5
        >>> K = X @ X.T
        >>> round(float(hsic1(K, K)), 4)
        2.7522
        >>> round(float(hsic1(K, 2 * K)), 4)  # bilinear
        5.5043
    """
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape != L.shape:
        raise ValueError(
            f"hsic1 needs two square Gram matrices of the same size, got {tuple(K.shape)} and {tuple(L.shape)}"
        )
    n = K.shape[0]
    if n < MIN_BATCH:
        raise ValueError(f"The unbiased HSIC estimator needs n >= {MIN_BATCH} examples, got n={n}")
    eye = torch.eye(n, dtype=torch.bool, device=K.device)
    Kt = K.detach().double().masked_fill(eye, 0.0)
    Lt = L.detach().double().masked_fill(eye, 0.0)
    k1, l1 = Kt.sum(dim=1), Lt.sum(dim=1)
    trace = (Kt * Lt).sum()  # tr(K̃ L̃) for symmetric matrices
    return (trace + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)) / (n * (n - 3))


def minibatch_slices(n: int, batch_size: int | None = None) -> list[slice]:
    """Consecutive minibatches of ``n`` examples for minibatch CKA.

    ``batch_size=None`` gives one batch of all ``n``. A trailing remainder too small for the
    unbiased estimator (fewer than 4 examples) joins the batch before it, so no example
    is dropped.

    Raises:
        ValueError: ``n < 4`` or ``batch_size < 4``.

    Example::

        >>> minibatch_slices(10, 4)
        [slice(0, 4, None), slice(4, 10, None)]
        >>> minibatch_slices(12, 4)
        [slice(0, 4, None), slice(4, 8, None), slice(8, 12, None)]
    """
    if n < MIN_BATCH:
        raise ValueError(f"CKA with the unbiased HSIC estimator needs at least {MIN_BATCH} examples, got {n}")
    if batch_size is None:
        return [slice(0, n)]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < MIN_BATCH:
        raise ValueError(f"Invalid value for batch_size={batch_size!r}. Must be an int >= {MIN_BATCH} or None")
    starts = list(range(0, n, batch_size))
    if n - starts[-1] < MIN_BATCH and len(starts) > 1:
        starts.pop()
    ends = starts[1:] + [n]
    return [slice(a, b) for a, b in zip(starts, ends)]


def _flat(x: torch.Tensor) -> torch.Tensor:
    if x.ndim < 1:
        raise ValueError("activations must have a leading example dimension, got a scalar")
    return x.detach().reshape(x.shape[0], -1)


def gram_matrices(X: torch.Tensor, *, batch_size: int | None = None) -> list[torch.Tensor]:
    """The per-minibatch linear Gram matrices ``Xᵢ Xᵢᵀ`` of activations ``X`` (float64).

    ``X`` is ``[n, ...]``; each example is flattened. Each minibatch is centered (its mean
    example subtracted) before the product: this leaves HSIC₁, hence CKA, exactly
    unchanged (the estimator is invariant to a common shift of the examples) and keeps
    float32 round-off small for non-negative (post-ReLU) activations.

    Args:
        X: activations ``[n, ...]``.
        batch_size: minibatch size (see :func:`minibatch_slices`); ``None``: one batch.

    Returns:
        A list of float64 tensors ``[b, b]``, one per minibatch.

    Example::

        >>> [tuple(g.shape) for g in gram_matrices(torch.randn(10, 3, 4, 4), batch_size=4)]
        [(4, 4), (6, 6)]
    """
    flat = _flat(X)
    grams = []
    for sl in minibatch_slices(flat.shape[0], batch_size):
        chunk = flat[sl]
        chunk = chunk - chunk.mean(dim=0, keepdim=True)
        if not chunk.is_floating_point() or chunk.dtype in (torch.float16, torch.bfloat16):
            chunk = chunk.float()
        grams.append((chunk @ chunk.T).double())
    return grams


class StreamingGram:
    """The centered Gram matrix of one minibatch whose examples arrive in chunks.

    Equals ``gram_matrices(torch.cat(chunks))[0]`` (up to float32 round-off) without
    running the whole minibatch through the network at once: each chunk's flattened
    activations are copied (on their device while the minibatch's total stays under
    ``keep_elements``, else into host memory), and the ``n × n`` matrix is built block
    by block at :meth:`compute`, two chunks on the device at a time. With ``n`` given, a
    chunk holding the whole minibatch gives its Gram matrix at once (nothing is kept).

    Example::

        >>> X = torch.randn(10, 3, 4, 4)
        >>> acc = StreamingGram(keep_elements=0)  # every chunk goes to host memory
        >>> for part in X.split(4):
        ...     acc.add(part)
        >>> torch.allclose(acc.compute(), gram_matrices(X)[0], atol=1e-4)
        True
    """

    def __init__(self, n: int | None = None, *, keep_elements: int = 2**24) -> None:
        self.n = n
        self.keep_elements = keep_elements
        self.gram: torch.Tensor | None = None
        self.chunks: list[torch.Tensor] = []
        self.total: torch.Tensor | None = None
        self.count = 0
        self.device: torch.device | None = None

    def add(self, X: torch.Tensor) -> None:
        """Add the activations ``[b, ...]`` of the next ``b`` examples."""
        flat = _flat(X)
        if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        self.device = flat.device
        if self.count == 0 and flat.shape[0] == self.n:
            (self.gram,) = gram_matrices(flat)
            self.count = flat.shape[0]
            return
        flat = flat.clone() if flat.data_ptr() == X.data_ptr() else flat  # the network may modify X in place
        part = flat.sum(dim=0, dtype=torch.float64)
        self.total = part if self.total is None else self.total + part
        self.count += flat.shape[0]
        self.chunks.append(flat)
        if sum(c.numel() for c in self.chunks) > self.keep_elements:
            self.chunks = [c.cpu() for c in self.chunks]

    def compute(self) -> torch.Tensor:
        """The float64 ``[n, n]`` Gram matrix of the centered examples."""
        if self.gram is not None:
            return self.gram
        if len(self.chunks) == 1:  # the minibatch came whole: exactly gram_matrices
            (K,) = gram_matrices(self.chunks[0].to(self.device))
            return K
        mean = (self.total / self.count).to(self.chunks[0].dtype)
        sizes = [c.shape[0] for c in self.chunks]
        K = torch.empty((self.count, self.count), dtype=torch.float64, device=self.device)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for i, (a0, Xi) in enumerate(zip(starts, self.chunks)):
            A = Xi.to(self.device) - mean
            for b0, Xj in zip(starts[i:], self.chunks[i:]):
                B = A if Xj is Xi else Xj.to(self.device) - mean
                block = (A @ B.T).double()
                K[a0 : a0 + A.shape[0], b0 : b0 + B.shape[0]] = block
                K[b0 : b0 + B.shape[0], a0 : a0 + A.shape[0]] = block.T
        return K


def _normalise(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor) -> float:
    denom = math.sqrt(max(float(xx), 0.0) * max(float(yy), 0.0))
    if denom <= 0.0 or not math.isfinite(denom):
        return float("nan")
    return float(xy) / denom


def cka_from_grams(grams_x: Sequence[torch.Tensor], grams_y: Sequence[torch.Tensor]) -> float:
    """Minibatch linear CKA from matching lists of per-minibatch Gram matrices.

    Sums HSIC₁ over the minibatches, then normalises once (not an average of per-batch
    CKA values). ``nan`` when either representation is constant (zero HSIC with itself).

    Raises:
        ValueError: the lists differ in length or a pair of matrices differs in size.

    Example::

        >>> X = torch.randn(32, 10)
        >>> g = gram_matrices(X, batch_size=8)
        >>> round(cka_from_grams(g, g), 6)
        1.0
    """
    grams_x, grams_y = list(grams_x), list(grams_y)
    if len(grams_x) != len(grams_y) or not grams_x:
        raise ValueError(
            f"cka_from_grams needs the same (non-zero) number of minibatches on both sides, "
            f"got {len(grams_x)} and {len(grams_y)}"
        )
    acc = CKAAccumulator()
    for K, L in zip(grams_x, grams_y):
        acc.update_grams(K, L)
    return acc.compute()


def linear_cka(X: torch.Tensor, Y: torch.Tensor, *, batch_size: int | None = None) -> float:
    """Linear CKA between two representations of the same ``n`` examples.

    Each example is flattened (``[n, ...] -> [n, d]``); ``X`` and ``Y`` may have different
    widths. With ``batch_size=None`` this is the full-batch CKA with the unbiased HSIC
    estimator; with a ``batch_size`` it is the minibatch CKA of Nguyen, Raghu & Kornblith
    (2021) over consecutive minibatches: HSIC₁ summed over the minibatches, normalised
    once at the end.

    Args:
        X: activations ``[n, ...]``.
        Y: activations ``[n, ...]`` of the same examples, in the same order.
        batch_size: minibatch size (>= 4), or ``None`` for one batch of all ``n``.

    Returns:
        CKA as a float (1 for identical representations; ``nan`` if either is constant).

    Raises:
        ValueError: different numbers of examples, fewer than 4, or a bad ``batch_size``.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(64, 16, generator=g)
        >>> Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
        >>> round(linear_cka(X, X), 6), round(linear_cka(X, 3 * X @ Q, batch_size=16), 6)
        (1.0, 1.0)
    """
    if X.shape[:1] != Y.shape[:1]:
        raise ValueError(
            f"X and Y must hold the same examples: got {X.shape[0] if X.ndim else 0} and "
            f"{Y.shape[0] if Y.ndim else 0} (shapes {tuple(X.shape)} and {tuple(Y.shape)})"
        )
    return cka_from_grams(gram_matrices(X, batch_size=batch_size), gram_matrices(Y, batch_size=batch_size))


class CKAAccumulator:
    """Streaming minibatch CKA: feed minibatches one at a time, read CKA at the end.

    Keeps three float64 sums (Σ HSIC₁(K,L), Σ HSIC₁(K,K), Σ HSIC₁(L,L)), so memory does not
    grow with the number of minibatches.

    Example::

        >>> acc = CKAAccumulator()
        >>> X = torch.randn(40, 8)
        >>> for i in range(0, 40, 10):
        ...     acc.update(X[i : i + 10], 2 * X[i : i + 10])
        >>> round(acc.compute(), 6), acc.batches
        (1.0, 4)
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every minibatch seen so far."""
        self.xy = torch.zeros((), dtype=torch.float64)
        self.xx = torch.zeros((), dtype=torch.float64)
        self.yy = torch.zeros((), dtype=torch.float64)
        self.batches = 0

    def update_grams(self, K: torch.Tensor, L: torch.Tensor) -> None:
        """Add one minibatch given by its two Gram matrices ``[b, b]`` (``b >= 4``)."""
        self.xy = self.xy + hsic1(K, L).cpu()
        self.xx = self.xx + hsic1(K, K).cpu()
        self.yy = self.yy + hsic1(L, L).cpu()
        self.batches += 1

    def update(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        """Add one minibatch of activations ``[b, ...]`` of the same ``b >= 4`` examples."""
        if X.shape[:1] != Y.shape[:1]:
            raise ValueError(f"X and Y must hold the same examples, got shapes {tuple(X.shape)} and {tuple(Y.shape)}")
        (K,), (L,) = gram_matrices(X), gram_matrices(Y)
        self.update_grams(K, L)

    def compute(self) -> float:
        """CKA over every minibatch seen (``nan`` before the first or for a constant side)."""
        if not self.batches:
            return float("nan")
        return _normalise(self.xy, self.xx, self.yy)

