"""Linear CKA with the unbiased HSIC estimator (DESIGN "CKA")."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_vis.cka import CKAAccumulator, cka_from_grams, gram_matrices, hsic1, linear_cka, minibatch_slices


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hsic1_direct(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """DESIGN's formula written out literally with matrices and a ones vector."""
    n = K.shape[0]
    Kt = K.double() - torch.diag(torch.diag(K.double()))
    Lt = L.double() - torch.diag(torch.diag(L.double()))
    one = torch.ones(n, 1, dtype=torch.float64)
    term1 = torch.trace(Kt @ Lt)
    term2 = (one.T @ Kt @ one) * (one.T @ Lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * ((Kt @ one).T @ (Lt @ one))
    return ((term1 + term2 - term3) / (n * (n - 3))).squeeze()


def _hsic_u_statistic(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """HSIC₁ as the U-statistic over ordered 4-tuples of distinct examples (Song et al. 2012)."""
    n = K.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
        count += 1
    return total / count


def _cka_direct(X: torch.Tensor, Y: torch.Tensor, batch_size: int) -> float:
    """Minibatch CKA from raw (uncentered) Gram matrices and the literal formula."""
    X, Y = X.reshape(len(X), -1).double(), Y.reshape(len(Y), -1).double()
    xy = xx = yy = 0.0
    for start in range(0, len(X), batch_size):
        K = X[start : start + batch_size] @ X[start : start + batch_size].T
        L = Y[start : start + batch_size] @ Y[start : start + batch_size].T
        xy += float(_hsic1_direct(K, L))
        xx += float(_hsic1_direct(K, K))
        yy += float(_hsic1_direct(L, L))
    return xy / math.sqrt(xx * yy)


# --------------------------------------------------------------------------- HSIC₁
def test_hsic1_matches_the_literal_formula_and_the_u_statistic():
    g = _gen(1)
    X = torch.randn(7, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(7, 5, generator=g, dtype=torch.float64) + 2.0  # uncentered on purpose
    K, L = X @ X.T, Y @ Y.T
    ours = hsic1(K, L)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, _hsic1_direct(K, L), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, _hsic_u_statistic(K, L), rtol=1e-10, atol=1e-10)


def test_hsic1_does_not_modify_its_inputs_and_is_symmetric():
    X = torch.randn(8, 4, generator=_gen(2))
    K = X @ X.T
    L = (X**2) @ (X**2).T
    K0, L0 = K.clone(), L.clone()
    torch.testing.assert_close(hsic1(K, L), hsic1(L, K))
    assert torch.equal(K, K0) and torch.equal(L, L0)


def test_hsic1_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"n >= 4 examples, got n=3"):
        hsic1(torch.eye(3), torch.eye(3))
    with pytest.raises(ValueError, match=r"square Gram matrices of the same size, got \(5, 5\) and \(6, 6\)"):
        hsic1(torch.eye(5), torch.eye(6))
    with pytest.raises(ValueError, match=r"square Gram matrices"):
        hsic1(torch.ones(5, 4), torch.ones(5, 4))


# --------------------------------------------------------------------------- CKA properties
@pytest.mark.parametrize("batch_size", [None, 8, 10])
def test_self_cka_is_one(batch_size):
    X = torch.relu(torch.randn(40, 6, 5, 5, generator=_gen(3)))
    assert linear_cka(X, X, batch_size=batch_size) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("batch_size", [None, 16])
def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling(batch_size):
    g = _gen(4)
    X = torch.randn(64, 12, generator=g, dtype=torch.float64)
    Y = torch.tanh(X @ torch.randn(12, 8, generator=g, dtype=torch.float64)) + 0.5 * torch.randn(
        64, 8, generator=g, dtype=torch.float64
    )
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    base = linear_cka(X, Y, batch_size=batch_size)
    assert 0.05 < base < 0.95  # a non-trivial value, so invariance means something
    assert linear_cka(X @ Q, Y, batch_size=batch_size) == pytest.approx(base, abs=1e-9)
    assert linear_cka(7.5 * X, 0.01 * Y, batch_size=batch_size) == pytest.approx(base, abs=1e-9)
    assert linear_cka(-3.0 * X @ Q, Y, batch_size=batch_size) == pytest.approx(base, abs=1e-9)
    # ... but not to a general (anisotropic) linear map
    A = torch.diag(torch.linspace(0.1, 10.0, 12, dtype=torch.float64))
    assert abs(linear_cka(X @ A, Y, batch_size=batch_size) - base) > 1e-3


def test_cka_invariant_to_a_common_shift_of_the_examples():
    g = _gen(5)
    X, Y = torch.randn(30, 5, generator=g), torch.randn(30, 3, generator=g)
    Y = Y + X[:, :3]
    shift = 100.0 * torch.randn(5, generator=g)
    assert linear_cka(X + shift, Y) == pytest.approx(linear_cka(X, Y), abs=1e-6)


def test_full_batch_agrees_with_a_direct_computation():
    g = _gen(6)
    X = torch.randn(9, 2, 3, 3, generator=g, dtype=torch.float64)
    Y = torch.relu(X.flatten(1) @ torch.randn(18, 4, generator=g, dtype=torch.float64)) + 1.0
    expected = _cka_direct(X, Y, batch_size=9)
    assert linear_cka(X, Y) == pytest.approx(expected, abs=1e-9)
    assert linear_cka(X, Y, batch_size=None) == pytest.approx(expected, abs=1e-9)


def test_minibatch_cka_sums_hsic_before_normalising_not_an_average_of_cka():
    # Two minibatches on very different scales: the average of per-batch CKA values
    # weighs them equally, the minibatch estimator weighs them by their HSIC.
    g = _gen(7)
    X1 = torch.randn(16, 6, generator=g, dtype=torch.float64)
    Y1 = X1 + 0.1 * torch.randn(16, 6, generator=g, dtype=torch.float64)  # CKA ≈ 1
    X2 = 10 * torch.randn(16, 6, generator=g, dtype=torch.float64)
    Y2 = 10 * torch.randn(16, 6, generator=g, dtype=torch.float64)  # CKA ≈ 0
    X, Y = torch.cat([X1, X2]), torch.cat([Y1, Y2])
    per_batch_average = (linear_cka(X1, Y1) + linear_cka(X2, Y2)) / 2
    minibatch = _cka_direct(X, Y, batch_size=16)
    assert abs(per_batch_average - minibatch) > 0.1  # the two estimators really differ here
    ours = linear_cka(X, Y, batch_size=16)
    assert ours == pytest.approx(minibatch, abs=1e-9)
    assert ours != pytest.approx(per_batch_average, abs=0.05)


def test_accumulator_and_grams_give_the_minibatch_estimate():
    g = _gen(8)
    X = torch.randn(48, 3, 4, 4, generator=g)
    Y = torch.tanh(X.flatten(1) @ torch.randn(48, 10, generator=g))
    expected = linear_cka(X, Y, batch_size=12)
    acc = CKAAccumulator()
    for start in range(0, 48, 12):
        acc.update(X[start : start + 12], Y[start : start + 12])
    assert acc.batches == 4
    assert acc.compute() == pytest.approx(expected, abs=1e-9)
    grams = gram_matrices(X, batch_size=12), gram_matrices(Y, batch_size=12)
    assert [tuple(k.shape) for k in grams[0]] == [(12, 12)] * 4
    assert cka_from_grams(*grams) == pytest.approx(expected, abs=1e-9)
    acc.reset()
    assert math.isnan(acc.compute())


def test_constant_representation_gives_nan_not_an_error():
    X = torch.randn(10, 4, generator=_gen(9))
    assert math.isnan(linear_cka(X, torch.ones(10, 3)))


def test_minibatch_slices_keep_every_example():
    assert minibatch_slices(10) == [slice(0, 10)]
    assert minibatch_slices(10, 4) == [slice(0, 4), slice(4, 10)]  # remainder of 2 joins the last batch
    assert minibatch_slices(13, 4)[-1] == slice(8, 13)
    assert minibatch_slices(16, 4) == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)]


def test_cka_input_errors():
    with pytest.raises(ValueError, match=r"same examples: got 10 and 12"):
        linear_cka(torch.randn(10, 3), torch.randn(12, 3))
    with pytest.raises(ValueError, match=r"at least 4 examples, got 3"):
        linear_cka(torch.randn(3, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"Invalid value for batch_size=2\. Must be an int >= 4 or None"):
        linear_cka(torch.randn(10, 3), torch.randn(10, 3), batch_size=2)
    with pytest.raises(ValueError, match=r"same \(non-zero\) number of minibatches on both sides, got 2 and 1"):
        cka_from_grams(gram_matrices(torch.randn(8, 2), batch_size=4), gram_matrices(torch.randn(8, 2)))
