"""Reference and property tests of VICReg and Barlow Twins (lightly ``tests/loss`` style).

References: a vectorised NumPy float64 formula (``np.cov``/``np.std``) for values and a torch
float64 formula written with explicit Python loops over rows and dimensions for gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from modalign.objectives.noncontrastive import VICRegTerms, barlow_twins_loss, vicreg_loss


def raw(n: int, e: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Un-normalised projections whose columns have stds on both sides of 1 (hinge partly active)."""
    g = torch.Generator().manual_seed(seed)
    col_scale = torch.linspace(0.3, 1.8, e, dtype=dtype)
    return torch.randn(n, e, generator=g, dtype=dtype) * col_scale + torch.randn(e, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------- references
def numpy_vicreg(a: np.ndarray, b: np.ndarray, gamma: float, eps: float) -> dict[str, float]:
    e = a.shape[1]
    parts = {"invariance": float(np.mean((a - b) ** 2)), "variance": 0.0, "covariance": 0.0}
    for x in (a, b):
        cov = np.cov(x, rowvar=False, ddof=1).reshape(e, e)
        parts["variance"] += 0.5 * float(np.mean(np.maximum(0.0, gamma - np.sqrt(np.diag(cov) + eps))))
        parts["covariance"] += float((np.sum(cov**2) - np.sum(np.diag(cov) ** 2)) / e)
    return parts


def loop_vicreg(a: Tensor, b: Tensor, weights: tuple[float, float, float], gamma: float, eps: float) -> Tensor:
    """VICReg with Python loops over scalar tensors (independent of the vectorised code)."""
    n, e = a.shape
    inv = sum((a[i, k] - b[i, k]) ** 2 for i in range(n) for k in range(e)) / (n * e)
    var = torch.zeros((), dtype=a.dtype)
    cov_term = torch.zeros((), dtype=a.dtype)
    for x in (a, b):
        mean = [sum(x[i, k] for i in range(n)) / n for k in range(e)]
        cov = [
            [sum((x[i, k] - mean[k]) * (x[i, m] - mean[m]) for i in range(n)) / (n - 1) for m in range(e)]
            for k in range(e)
        ]
        var = var + 0.5 * sum(torch.relu(gamma - torch.sqrt(cov[k][k] + eps)) for k in range(e)) / e
        cov_term = cov_term + sum(cov[k][m] ** 2 for k in range(e) for m in range(e) if k != m) / e
    return weights[0] * inv + weights[1] * var + weights[2] * cov_term


def numpy_barlow(a: np.ndarray, b: np.ndarray, lambd: float, eps: float) -> float:
    an = (a - a.mean(0)) / np.sqrt(a.var(0, ddof=0) + eps)
    bn = (b - b.mean(0)) / np.sqrt(b.var(0, ddof=0) + eps)
    c = an.T @ bn / a.shape[0]
    off = c - np.diag(np.diag(c))
    return float(np.sum((1.0 - np.diag(c)) ** 2) + lambd * np.sum(off**2))


def loop_barlow(a: Tensor, b: Tensor, lambd: float, eps: float) -> Tensor:
    n, e = a.shape

    def standardise(x: Tensor) -> list[list[Tensor]]:
        cols = []
        for k in range(e):
            mean = sum(x[i, k] for i in range(n)) / n
            std = torch.sqrt(sum((x[i, k] - mean) ** 2 for i in range(n)) / n + eps)
            cols.append([(x[i, k] - mean) / std for i in range(n)])
        return cols

    sa, sb = standardise(a), standardise(b)
    total = torch.zeros((), dtype=a.dtype)
    for k in range(e):
        for m in range(e):
            c = sum(sa[k][i] * sb[m][i] for i in range(n)) / n
            total = total + ((1.0 - c) ** 2 if k == m else lambd * c**2)
    return total


# ----------------------------------------------------------------------------- VICReg
@pytest.mark.parametrize(("gamma", "eps"), [(1.0, 1e-4), (0.8, 0.0), (2.0, 1e-2)])
def test_vicreg_terms_match_numpy_reference(gamma: float, eps: float) -> None:
    a, b = raw(7, 4, 0), raw(7, 4, 1)
    out = vicreg_loss(a, b, sim_weight=2.0, var_weight=3.0, cov_weight=0.5, gamma=gamma, eps=eps)
    assert isinstance(out, VICRegTerms)
    ref = numpy_vicreg(a.numpy(), b.numpy(), gamma, eps)
    for name, want in ref.items():
        assert getattr(out, name).item() == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert ref["variance"] > 0 and ref["covariance"] > 0  # every term is exercised
    weighted = 2.0 * ref["invariance"] + 3.0 * ref["variance"] + 0.5 * ref["covariance"]
    assert out.loss.item() == pytest.approx(weighted, rel=1e-12)


def test_vicreg_defaults_are_the_papers() -> None:
    a, b = raw(6, 3, 2), raw(6, 3, 3)
    out = vicreg_loss(a, b)
    ref = numpy_vicreg(a.numpy(), b.numpy(), 1.0, 1e-4)
    want = 25.0 * ref["invariance"] + 25.0 * ref["variance"] + 1.0 * ref["covariance"]
    assert out.loss.item() == pytest.approx(want, rel=1e-12)


def test_vicreg_gradient_matches_loop_autograd() -> None:
    a, b = raw(6, 4, 4).requires_grad_(), raw(6, 4, 5).requires_grad_()
    weights, gamma, eps = (25.0, 25.0, 1.0), 1.0, 1e-4
    got = torch.autograd.grad(vicreg_loss(a, b, *weights, gamma=gamma, eps=eps).loss, (a, b))
    want = torch.autograd.grad(loop_vicreg(a, b, weights, gamma, eps), (a, b))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        assert g.abs().sum() > 0


def test_vicreg_gradient_matches_finite_differences() -> None:
    a, b = raw(5, 3, 6).requires_grad_(), raw(5, 3, 7).requires_grad_()
    for term in ("loss", "invariance", "variance", "covariance"):
        assert torch.autograd.gradcheck(lambda x, y, t=term: getattr(vicreg_loss(x, y), t), (a, b))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9), e=st.integers(1, 5))
def test_vicreg_invariance_is_zero_for_identical_inputs(seed: int, n: int, e: int) -> None:
    a = raw(n, e, seed)
    out = vicreg_loss(a, a.clone())
    assert out.invariance.item() == 0.0
    assert out.loss.item() == pytest.approx(25.0 * out.variance.item() + out.covariance.item(), rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9), e=st.integers(1, 5), gamma=st.floats(0.1, 3.0))
def test_vicreg_variance_is_zero_when_every_std_reaches_gamma(seed: int, n: int, e: int, gamma: float) -> None:
    a, b = raw(n, e, seed), raw(n, e, seed + 1)
    # rescale every column to an unbiased std of at least gamma (factors in [1, 2])
    factors = 1.0 + torch.rand(e, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = a / a.std(dim=0).clamp_min(1e-12) * gamma * factors
    b = b / b.std(dim=0).clamp_min(1e-12) * gamma * factors.flip(0)
    if bool((a.std(dim=0) < gamma).any() or (b.std(dim=0) < gamma).any()):
        return  # a degenerate (constant) column cannot be rescaled
    assert vicreg_loss(a, b, gamma=gamma).variance.item() == 0.0
    # shrinking one column of one modality below gamma switches the hinge on
    shrunk = a.clone()
    shrunk[:, 0] = shrunk[:, 0] * 0.25 / factors[0]
    assert vicreg_loss(shrunk, b, gamma=gamma).variance.item() > 0.0


def test_vicreg_variance_hinge_value_on_a_known_column() -> None:
    # column 0 of a has unbiased std 0.5 exactly, every other column std >= gamma = 1
    a = torch.tensor([[0.0, 0.0], [1.0, 3.0], [0.5, -3.0]], dtype=torch.float64)
    a[:, 0] = (a[:, 0] - a[:, 0].mean()) / a[:, 0].std() * 0.5
    b = a.clone()
    b[:, 0] = b[:, 0] * 4.0  # std 2
    out = vicreg_loss(a, b, gamma=1.0, eps=0.0)
    assert out.variance.item() == pytest.approx(0.5 * (1.0 - 0.5) / 2, rel=1e-12)


def test_vicreg_covariance_is_zero_for_decorrelated_features() -> None:
    a = decorrelated(8, 3, seed=0) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) + 5.0
    b = decorrelated(8, 3, seed=1)
    assert vicreg_loss(a, b).covariance.item() == pytest.approx(0.0, abs=1e-24)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9), e=st.integers(1, 5))
def test_vicreg_is_invariant_to_permuting_rows(seed: int, n: int, e: int) -> None:
    a, b = raw(n, e, seed), raw(n, e, seed + 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))
    base, permuted = vicreg_loss(a, b), vicreg_loss(a[perm], b[perm])
    for name in ("loss", "invariance", "variance", "covariance"):
        torch.testing.assert_close(getattr(permuted, name), getattr(base, name), rtol=1e-12, atol=1e-12)


def test_vicreg_float32_inputs_keep_their_dtype() -> None:
    out = vicreg_loss(raw(6, 3, 8, torch.float32), raw(6, 3, 9, torch.float32))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


# ----------------------------------------------------------------------------- Barlow Twins
def decorrelated(n: int, e: int, seed: int) -> Tensor:
    """``[n, e]`` zero-mean columns, mutually orthogonal, biased variance 1 (needs e < n)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.cat([torch.ones(n, 1, dtype=torch.float64), torch.randn(n, e, generator=g, dtype=torch.float64)], 1)
    q, _ = torch.linalg.qr(basis)  # column 0 spans the ones vector, the others are orthogonal to it
    return q[:, 1:] * math.sqrt(n)


@pytest.mark.parametrize(("lambd", "eps"), [(5e-3, 1e-5), (0.5, 0.0), (0.0, 1e-2)])
def test_barlow_matches_numpy_reference(lambd: float, eps: float) -> None:
    a, b = raw(7, 4, 10), raw(7, 4, 11)
    loss = barlow_twins_loss(a, b, lambd=lambd, eps=eps)
    assert loss.item() == pytest.approx(numpy_barlow(a.numpy(), b.numpy(), lambd, eps), rel=1e-12)
    assert loss.item() == pytest.approx(loop_barlow(a, b, lambd, eps).item(), rel=1e-12)


def test_barlow_gradient_matches_loop_autograd() -> None:
    a, b = raw(6, 4, 12).requires_grad_(), raw(6, 4, 13).requires_grad_()
    got = torch.autograd.grad(barlow_twins_loss(a, b, lambd=0.1), (a, b))
    want = torch.autograd.grad(loop_barlow(a, b, 0.1, 1e-5), (a, b))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        assert g.abs().sum() > 0


def test_barlow_gradient_matches_finite_differences() -> None:
    a, b = raw(5, 3, 14).requires_grad_(), raw(5, 3, 15).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: barlow_twins_loss(x, y, lambd=0.2), (a, b))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(3, 10),
    e=st.integers(1, 6),
    scale=st.floats(0.1, 10.0),
    shift=st.floats(-5.0, 5.0),
)
def test_barlow_is_zero_for_equal_decorrelated_standardised_features(
    seed: int, n: int, e: int, scale: float, shift: float
) -> None:
    e = min(e, n - 1)
    a = decorrelated(n, e, seed)
    # the standardisation removes any per-dimension positive scale and shift
    b = a * scale + shift
    assert barlow_twins_loss(a, b, eps=0.0).item() == pytest.approx(0.0, abs=1e-18)
    # with the default eps = 1e-5, C = I / (1 + eps): the loss is E (eps / (1 + eps))^2, about 0
    assert barlow_twins_loss(a, a.clone()).item() == pytest.approx(e * (1e-5 / (1 + 1e-5)) ** 2, rel=1e-6)
    other = raw(n, e, seed + 1)  # any other pairing is strictly worse
    assert barlow_twins_loss(a, other, eps=0.0).item() > 1e-6


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9), e=st.integers(1, 5))
def test_barlow_is_nonnegative_and_invariant_to_permuting_rows(seed: int, n: int, e: int) -> None:
    a, b = raw(n, e, seed), raw(n, e, seed + 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))
    base = barlow_twins_loss(a, b)
    assert base.item() >= 0.0
    torch.testing.assert_close(barlow_twins_loss(a[perm], b[perm]), base, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("fn", [vicreg_loss, barlow_twins_loss])
def test_gather_without_process_group_is_local(fn: object) -> None:
    a, b = raw(5, 3, 16), raw(5, 3, 17)
    local, gathered = fn(a, b), fn(a, b, gather=True)  # type: ignore[operator]
    if isinstance(local, VICRegTerms):
        local, gathered = local.loss, gathered.loss
    torch.testing.assert_close(gathered, local)


@pytest.mark.parametrize("fn", [vicreg_loss, barlow_twins_loss])
@pytest.mark.parametrize(
    ("a", "b", "kwargs", "match"),
    [
        (torch.zeros(4, 3), torch.zeros(5, 3), {}, r"\(4, 3\).*\(5, 3\)"),
        (torch.zeros(4), torch.zeros(4), {}, r"\(4,\)"),
        (torch.zeros(4, 0), torch.zeros(4, 0), {}, r"feature dimension.*\(4, 0\)"),
        (torch.zeros(1, 3), torch.zeros(1, 3), {}, r"at least 2 rows.*\(1, 3\)"),
        (torch.zeros(0, 3), torch.zeros(0, 3), {}, r"at least 2 rows.*\(0, 3\)"),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"eps": -1.0}, "eps must be >= 0"),
    ],
)
def test_bad_inputs_raise(fn: object, a: Tensor, b: Tensor, kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(a, b, **kwargs)  # type: ignore[operator]
