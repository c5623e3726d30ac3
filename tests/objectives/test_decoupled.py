"""Reference and property tests of the decoupled contrastive loss (DCL, Yeh et al. 2022)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from modalign.objectives.contrastive import infonce_loss
from modalign.objectives.decoupled import dcl_loss


def normed(n: int, e: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g, dtype=dtype), dim=-1)


def negatives(ids: list[int], i: int, ids_b: list[int] | None = None) -> list[int]:
    """Rows holding other content than row ``i``: neither the same ``a`` nor the same ``b``."""
    ids_b = ids_b if ids_b is not None else ids
    return [j for j in range(len(ids)) if j != i and ids[j] != ids[i] and ids_b[j] != ids_b[i]]


def loop_dcl(
    a: Tensor, b: Tensor, logit_scale: Tensor, ids: list[int] | None = None, ids_b: list[int] | None = None
) -> Tensor:
    """Direct formula with Python loops over scalar tensors (independent of the vectorised code)."""
    n = a.shape[0]
    ids = ids if ids is not None else list(range(n))
    s = torch.exp(logit_scale)
    total = torch.zeros((), dtype=a.dtype)
    for q, k in ((a, b), (b, a)):
        for i in range(n):
            neg = negatives(ids, i, ids_b)
            if neg:
                denom = torch.stack([torch.exp(s * (q[i] * k[j]).sum()) for j in neg]).sum()
                total = total + torch.log(denom) - s * (q[i] * k[i]).sum()
    return total / (2 * n)


def numpy_dcl(a: np.ndarray, b: np.ndarray, logit_scale: float, ids: list[int]) -> float:
    logits = math.exp(logit_scale) * a @ b.T
    removed = np.equal.outer(ids, ids) | np.eye(len(ids), dtype=bool)
    total = 0.0
    for mat in (logits, logits.T):
        for i in range(len(ids)):
            if not removed[i].all():
                total += float(np.log(np.exp(mat[i][~removed[i]]).sum()) - mat[i, i])
    return total / (2 * len(ids))


def loop_positive_correction(a: Tensor, b: Tensor, logit_scale: Tensor, ids: list[int]) -> Tensor:
    """InfoNCE - DCL: mean over both directions of ``log(1 + exp(l_ii) / sum_neg exp(l_ij))``."""
    s = torch.exp(logit_scale)
    total = torch.zeros((), dtype=a.dtype)
    for q, k in ((a, b), (b, a)):
        for i in range(len(ids)):
            neg = torch.stack([torch.exp(s * (q[i] * k[j]).sum()) for j in negatives(ids, i)]).sum()
            total = total + torch.log(1.0 + torch.exp(s * (q[i] * k[i]).sum()) / neg)
    return total / (2 * len(ids))


@pytest.mark.parametrize("ids", [None, [0, 1, 2, 3, 4, 5], [7, 3, 7, 1, 3, 9], [2, 2, 2, 5, 5, 1]])
def test_value_matches_loop_and_numpy_reference(ids: list[int] | None) -> None:
    a, b = normed(6, 4, 0), normed(6, 4, 1)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    loss = dcl_loss(a, b, scale, ids=torch.tensor(ids) if ids is not None else None)
    torch.testing.assert_close(loss, loop_dcl(a, b, scale, ids), rtol=1e-12, atol=1e-12)
    ref_ids = ids if ids is not None else list(range(6))
    assert loss.item() == pytest.approx(numpy_dcl(a.numpy(), b.numpy(), scale.item(), ref_ids), rel=1e-10)


@pytest.mark.parametrize("ids", [None, [7, 3, 7, 1, 3, 9]])
def test_gradient_matches_loop_autograd(ids: list[int] | None) -> None:
    a, b = normed(6, 4, 2).requires_grad_(), normed(6, 4, 3).requires_grad_()
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(dcl_loss(a, b, scale, ids=torch.tensor(ids) if ids is not None else None), (a, b, scale))
    want = torch.autograd.grad(loop_dcl(a, b, scale, ids), (a, b, scale))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        assert g.abs().sum() > 0


def test_gradient_matches_finite_differences() -> None:
    a, b = normed(5, 3, 4).requires_grad_(), normed(5, 3, 5).requires_grad_()
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 0, 2, 3])
    assert torch.autograd.gradcheck(lambda x, y, s: dcl_loss(x, y, s, ids=ids), (a, b, scale))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 8), scale=st.floats(-1.0, 4.0))
def test_equals_infonce_minus_the_positive_in_denominator_correction(seed: int, n: int, scale: float) -> None:
    a, b = normed(n, 3, seed), normed(n, 3, seed + 1)
    ids = [*range(n - 1), 0]  # one repeated id; every row keeps a negative
    s = torch.tensor(scale, dtype=torch.float64)
    id_t = torch.tensor(ids)
    dcl, info = dcl_loss(a, b, s, id_t), infonce_loss(a, b, s, id_t)
    if n == 2:  # both rows share id 0: no negatives at all, both losses are 0
        assert dcl.item() == 0.0 and info.item() == 0.0
        return
    correction = loop_positive_correction(a, b, s, ids)
    torch.testing.assert_close(dcl, info - correction, rtol=1e-10, atol=1e-12)
    # the correction is a mean of log(1 + p) terms, positive but below float64 resolution of the
    # loss when the positive is negligible next to the negatives (scale 4, n=7 found by hypothesis)
    assert correction > 0 and dcl <= info


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9), scale=st.floats(-1.0, 4.0))
def test_joint_row_permutation_leaves_the_loss_unchanged(seed: int, n: int, scale: float) -> None:
    a, b = normed(n, 3, seed), normed(n, 3, seed + 1)
    ids = torch.randint(0, max(2, n // 2), (n,), generator=torch.Generator().manual_seed(seed))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))
    s = torch.tensor(scale, dtype=torch.float64)
    torch.testing.assert_close(dcl_loss(a, b, s, ids), dcl_loss(a[perm], b[perm], s, ids[perm]), rtol=1e-12, atol=1e-12)


def test_shared_ids_are_not_negatives() -> None:
    a, b = normed(6, 4, 6), normed(6, 4, 7)
    scale = torch.tensor(2.0, dtype=torch.float64)
    plain = dcl_loss(a, b, scale)
    shared = dcl_loss(a, b, scale, ids=torch.tensor([0, 0, 1, 2, 3, 4]))
    assert shared < plain  # removing negatives strictly lowers every affected logsumexp
    torch.testing.assert_close(shared, loop_dcl(a, b, scale, [0, 0, 1, 2, 3, 4]))


def test_orthogonal_pairs_have_the_closed_form_value() -> None:
    # a = b = I_n: l_ii = s, l_ij = 0 -> every term is log(n - 1) - s
    eye = torch.eye(5, dtype=torch.float64)
    s = torch.tensor(math.log(3.0), dtype=torch.float64)
    assert dcl_loss(eye, eye.clone(), s).item() == pytest.approx(math.log(4) - 3.0, rel=1e-12)


@pytest.mark.parametrize("ids", [[4, 4, 4], [1]])
def test_rows_without_negatives_contribute_zero_with_finite_gradient(ids: list[int]) -> None:
    n = len(ids)
    a, b = normed(n, 3, 8).requires_grad_(), normed(n, 3, 9).requires_grad_()
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    loss = dcl_loss(a, b, scale, ids=torch.tensor(ids))
    assert loss.item() == 0.0
    loss.backward()
    for t in (a, b, scale):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t.grad))


@pytest.mark.parametrize(
    ("ids", "ids_b"),
    [
        ([0, 1, 2, 3, 4, 5], [9, 9, 8, 7, 7, 6]),  # the b side repeats: rows 0/1 and 3/4 are the same b
        ([0, 0, 1, 2, 3, 4], [5, 6, 6, 6, 7, 8]),
        ([0, 0, 1], [5, 6, 6]),  # row 1 shares content with both others: no negative, its terms are 0
    ],
)
def test_separate_b_ids_match_loop_reference_value_and_gradient(ids: list[int], ids_b: list[int]) -> None:
    n = len(ids)
    a, b = normed(n, 4, 14).requires_grad_(), normed(n, 4, 15).requires_grad_()
    scale = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)
    got = dcl_loss(a, b, scale, ids=torch.tensor(ids), ids_b=torch.tensor(ids_b))
    want = loop_dcl(a, b, scale, ids, ids_b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, (a, b, scale)), torch.autograd.grad(want, (a, b, scale)), strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if all(negatives(ids, i, ids_b) for i in range(n)):  # removing negatives lowers every logsumexp
        assert got < dcl_loss(a, b, scale, ids=torch.tensor(ids))


def test_gather_without_process_group_is_local() -> None:
    a, b = normed(5, 3, 12), normed(5, 3, 13)
    s = torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(dcl_loss(a, b, s, gather=True), dcl_loss(a, b, s))


@pytest.mark.parametrize(
    ("a", "b", "scale", "ids", "match"),
    [
        (torch.zeros(4, 3), torch.zeros(5, 3), torch.tensor(1.0), None, r"\(4, 3\).*\(5, 3\)"),
        (torch.zeros(4), torch.zeros(4), torch.tensor(1.0), None, r"\(4,\)"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(2), None, r"logit_scale.*\(2,\)"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.tensor(1.0), torch.zeros(3), r"ids.*\(3,\)"),
        (torch.zeros(0, 3), torch.zeros(0, 3), torch.tensor(1.0), None, "dcl_loss got an empty batch"),
    ],
)
def test_bad_inputs_raise(a: Tensor, b: Tensor, scale: Tensor, ids: Tensor | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dcl_loss(a, b, scale, ids=ids)


def test_bad_b_ids_raise() -> None:
    z = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"ids must be \[N\] with N=4, got shape \(5,\)"):
        dcl_loss(z, z, torch.tensor(1.0), ids=torch.arange(4), ids_b=torch.arange(5))
