"""Linear CKA: invariances, agreement with a plain numpy reference, degenerate inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qviz.metrics import cka_matrix


def np_cka(x: np.ndarray, y: np.ndarray, estimator: str) -> float:
    """Reference linear CKA of x [n, d1], y [n, d2] (loops, no vectorization tricks)."""
    n = x.shape[0]
    k, m = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        if estimator == "biased":
            h = np.eye(n) - np.ones((n, n)) / n
            return float(np.trace(a @ h @ b @ h)) / (n - 1) ** 2
        a, b = a.copy(), b.copy()
        for i in range(n):
            a[i, i] = 0.0
            b[i, i] = 0.0
        one = np.ones(n)
        term = np.trace(a @ b) + (one @ a @ one) * (one @ b @ one) / ((n - 1) * (n - 2))
        term -= 2.0 / (n - 2) * (one @ a @ b @ one)
        return float(term) / (n * (n - 3))

    return hsic(k, m) / np.sqrt(hsic(k, k) * hsic(m, m))


def random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@pytest.fixture
def acts() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 32, 12, generator=gen)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_identical_inputs_give_one(acts, estimator):
    c = cka_matrix(acts, acts, estimator=estimator)
    assert c.shape == (4, 4)
    assert c.dtype == torch.float64
    torch.testing.assert_close(torch.diagonal(c), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(c, c.T)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_invariant_to_scaling_and_rotation(acts, estimator):
    gen = torch.Generator().manual_seed(1)
    rot = random_orthogonal(acts.shape[-1], gen)
    other = acts.double() @ rot * 3.7
    base = cka_matrix(acts, acts, estimator=estimator)
    torch.testing.assert_close(cka_matrix(acts, other, estimator=estimator), base)
    torch.testing.assert_close(cka_matrix(acts * 0.01, acts, estimator=estimator), base)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_matches_numpy_reference(estimator):
    gen = torch.Generator().manual_seed(2)
    ref = torch.randn(3, 20, 8, generator=gen) + 1.5
    quant = [ref[i] @ torch.randn(8, 5, generator=gen) + 0.3 * torch.randn(20, 5) for i in range(3)]
    quant.append(torch.randn(20, 6, generator=gen))
    got = cka_matrix(ref, quant, estimator=estimator)
    assert got.shape == (3, 4)
    want = np.array(
        [[np_cka(r.double().numpy(), q.double().numpy(), estimator) for q in quant] for r in ref]
    )
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_zero_variance_gives_zero_and_warns(acts, estimator):
    quant = acts.clone()
    quant[2] = 5.0  # constant activations: every sample identical
    with pytest.warns(RuntimeWarning, match="zero-variance"):
        c = cka_matrix(acts, quant, estimator=estimator)
    assert not torch.isnan(c).any()
    assert (c[:, 2] == 0).all()
    torch.testing.assert_close(c[1, 1], torch.tensor(1.0, dtype=torch.float64))


def test_constant_with_round_off_counts_as_zero_variance(acts):
    quant = torch.full((1, 32, 12), 0.1, dtype=torch.float32)  # mean has round-off in float64
    with pytest.warns(RuntimeWarning, match="zero-variance"):
        c = cka_matrix(acts, quant, estimator="unbiased")
    assert (c == 0).all()


def test_all_zero_activations_give_zero():
    with pytest.warns(RuntimeWarning):
        c = cka_matrix(torch.zeros(2, 10, 3), torch.zeros(2, 10, 3))
    assert (c == 0).all()


def test_unbiased_needs_four_samples():
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="n=3"):
        cka_matrix(x, x, estimator="unbiased")
    cka_matrix(x, x, estimator="biased")  # fine


def test_bad_inputs():
    with pytest.raises(ValueError, match="estimator"):
        cka_matrix(torch.randn(1, 8, 2), torch.randn(1, 8, 2), estimator="other")
    with pytest.raises(ValueError, match="samples"):
        cka_matrix(torch.randn(1, 8, 2), torch.randn(1, 9, 2))


@pytest.mark.parametrize("gram_bytes", [0, 32 << 20], ids=["row-blocks", "whole-grams"])
def test_blocked_grams_and_reference_map_match_numpy(monkeypatch, gram_bytes):
    """More samples than one row block (128): the blocked biased path (Grams too large to keep)
    and the whole-Gram one (``GramSide``, also given prepared) against numpy loops."""
    from qviz.metrics import cka as cka_mod

    monkeypatch.setattr(cka_mod, "GRAM_BYTES", gram_bytes)
    gen = torch.Generator().manual_seed(3)
    ref = torch.randn(3, 300, 6, generator=gen)
    quant = ref + 0.8 * torch.randn(3, 300, 6, generator=gen)
    got, self_map = cka_mod.cka_with_reference(ref, quant)
    if gram_bytes:
        side = cka_mod.GramSide(ref)
        for _ in range(2):  # reused
            again, again_self = cka_mod.cka_with_reference(side, quant)
            torch.testing.assert_close(again, got, atol=1e-12, rtol=0)
            torch.testing.assert_close(again_self, self_map, atol=1e-12, rtol=0)
        with pytest.raises(ValueError, match="300 samples but quant has 299"):
            cka_mod.cka_with_reference(side, quant[:, :299])
    else:
        assert not cka_mod.GramSide.fits(ref)
    want = np.array(
        [[np_cka(r.double().numpy(), q.double().numpy(), "biased") for q in quant] for r in ref]
    )
    want_ref = np.array(
        [[np_cka(r.double().numpy(), s.double().numpy(), "biased") for s in ref] for r in ref]
    )
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10, rtol=0)
    np.testing.assert_allclose(self_map.numpy(), want_ref, atol=1e-10, rtol=0)
    np.testing.assert_allclose(cka_matrix(ref, quant).numpy(), want, atol=1e-10, rtol=0)
