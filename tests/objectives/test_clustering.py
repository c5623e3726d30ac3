"""Reference tests of the cross-modal swapped prediction loss (SwAV / SeLaVi)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from modalign.objectives.clustering import pooled_swapped_prediction_loss, swapped_prediction_loss


def scores(n: int, k: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.rand(n, k, generator=g, dtype=torch.float64) - 1.0


def numpy_codes(s: np.ndarray, eps: float, iterations: int) -> np.ndarray:
    """SwAV Algorithm 1 (Caron et al. 2020) in NumPy float64."""
    q = np.exp(s / eps).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def numpy_loss(sa: np.ndarray, sb: np.ndarray, t: float, eps: float, iterations: int) -> float:
    qa, qb = numpy_codes(sa, eps, iterations), numpy_codes(sb, eps, iterations)
    total = 0.0
    for s, q in ((sa, qb), (sb, qa)):
        z = s / t
        log_p = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
        total += float(-(q * log_p).sum(1).mean())
    return 0.5 * total


def loop_loss(sa: Tensor, sb: Tensor, qa: Tensor, qb: Tensor, t: float) -> Tensor:
    """Python loops over scalar tensors with the codes as constants (autograd reference)."""
    n, k = sa.shape
    total = torch.zeros((), dtype=sa.dtype)
    for s, q in ((sa, qb), (sb, qa)):
        for i in range(n):
            log_z = torch.log(sum(torch.exp(s[i, j] / t) for j in range(k)))
            total = total - sum(q[i, j] * (s[i, j] / t - log_z) for j in range(k))
    return total / (2 * n)


@pytest.mark.parametrize(
    ("n", "k", "t", "eps", "iterations"), [(6, 4, 0.1, 0.05, 3), (9, 3, 0.5, 0.1, 1), (4, 7, 0.2, 0.03, 10)]
)
def test_value_and_gradient_match_references(n: int, k: int, t: float, eps: float, iterations: int) -> None:
    sa, sb = scores(n, k, 0).requires_grad_(), scores(n, k, 1).requires_grad_()
    loss = swapped_prediction_loss(sa, sb, temperature=t, epsilon=eps, iterations=iterations)
    want = numpy_loss(sa.detach().numpy(), sb.detach().numpy(), t, eps, iterations)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    qa = torch.from_numpy(numpy_codes(sa.detach().numpy(), eps, iterations))
    qb = torch.from_numpy(numpy_codes(sb.detach().numpy(), eps, iterations))
    got = torch.autograd.grad(loss, (sa, sb))
    ref = torch.autograd.grad(loop_loss(sa, sb, qa, qb, t), (sa, sb))
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
        assert g.abs().sum() > 0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), k=st.integers(1, 6), t=st.floats(0.05, 1.0))
def test_gradient_flows_only_through_the_predictions(seed: int, n: int, k: int, t: float) -> None:
    """``d loss / d s_a = (softmax(s_a / T) - q_b) / (2 N T)``: nothing through a's own code."""
    sa, sb = scores(n, k, seed).requires_grad_(), scores(n, k, seed + 1).requires_grad_()
    ga, gb = torch.autograd.grad(swapped_prediction_loss(sa, sb, temperature=t), (sa, sb))
    qa = torch.from_numpy(numpy_codes(sa.detach().numpy(), 0.05, 3))
    qb = torch.from_numpy(numpy_codes(sb.detach().numpy(), 0.05, 3))
    torch.testing.assert_close(ga, (torch.softmax(sa.detach() / t, 1) - qb) / (2 * n * t), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(gb, (torch.softmax(sb.detach() / t, 1) - qa) / (2 * n * t), rtol=1e-8, atol=1e-12)


def test_gradient_matches_finite_differences_with_codes_frozen() -> None:
    sa, sb = scores(5, 3, 2).requires_grad_(), scores(5, 3, 3).requires_grad_()
    qa = torch.from_numpy(numpy_codes(sa.detach().numpy(), 0.05, 3))
    qb = torch.from_numpy(numpy_codes(sb.detach().numpy(), 0.05, 3))
    assert torch.autograd.gradcheck(lambda a, b: loop_loss(a, b, qa, qb, 0.1), (sa, sb))
    got = torch.autograd.grad(swapped_prediction_loss(sa, sb), (sa, sb))
    ref = torch.autograd.grad(loop_loss(sa, sb, qa, qb, 0.1), (sa, sb))
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), k=st.integers(1, 6))
def test_loss_is_symmetric_and_permutation_invariant(seed: int, n: int, k: int) -> None:
    sa, sb = scores(n, k, seed), scores(n, k, seed + 1)
    loss = swapped_prediction_loss(sa, sb)
    torch.testing.assert_close(swapped_prediction_loss(sb, sa), loss)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(swapped_prediction_loss(sa[perm], sb[perm]), loss)
    assert loss.item() >= 0.0


def test_agreeing_modalities_score_lower_than_disagreeing_ones() -> None:
    """Two modalities that put each sample on the same prototype beat ones that disagree."""
    n, k = 8, 4
    onehot = torch.nn.functional.one_hot(torch.arange(n) % k, k).double()
    agree = swapped_prediction_loss(onehot, onehot.clone(), temperature=0.1)
    shuffled = onehot[torch.tensor([1, 2, 3, 0, 5, 6, 7, 4])]
    disagree = swapped_prediction_loss(onehot, shuffled, temperature=0.1)
    assert agree.item() < 0.1 < disagree.item()
    assert agree.item() >= 0.0


def test_uniform_scores_give_log_k() -> None:
    s = torch.zeros(6, 5, dtype=torch.float64)
    assert swapped_prediction_loss(s, s.clone()).item() == pytest.approx(math.log(5), rel=1e-12)


def test_gather_without_process_group_is_local_and_dtype_is_kept() -> None:
    sa, sb = scores(5, 3, 4), scores(5, 3, 5)
    torch.testing.assert_close(swapped_prediction_loss(sa, sb, gather=True), swapped_prediction_loss(sa, sb))
    loss32 = swapped_prediction_loss(sa.float(), sb.float())
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(swapped_prediction_loss(sa, sb).item(), rel=1e-5)


@pytest.mark.parametrize(
    ("sa", "sb", "kwargs", "match"),
    [
        (torch.zeros(4, 3), torch.zeros(5, 3), {}, r"\(4, 3\).*\(5, 3\)"),
        (torch.zeros(4), torch.zeros(4), {}, r"\(4,\)"),
        (torch.zeros(4, 0), torch.zeros(4, 0), {}, r"\(4, 0\)"),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"temperature": 0.0}, "temperature"),
        (torch.zeros(0, 3), torch.zeros(0, 3), {}, "empty"),
    ],
)
def test_bad_inputs_raise(sa: Tensor, sb: Tensor, kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        swapped_prediction_loss(sa, sb, **kwargs)


# ---------------------------------------------------------------------------------------------
# Swapped prediction over paired rows and unimodal views (mix-paired SwAV + SeLaVi).


def pooled_loop_loss(
    sa: Tensor, sb: Tensor, positives: tuple[Tensor, Tensor, Tensor], t: float, eps: float, iterations: int
) -> Tensor:
    """Row by row: the target is the mean of the positives' NumPy codes; the loss the mean CE over anchors."""
    qa = torch.from_numpy(numpy_codes(sa.detach().numpy(), eps, iterations))
    qb = torch.from_numpy(numpy_codes(sb.detach().numpy(), eps, iterations))
    views_a, views_b, pairs = positives
    total, anchors = torch.zeros((), dtype=sa.dtype), 0
    for s, q_own, q_other, views, cross in ((sa, qa, qb, views_a, pairs), (sb, qb, qa, views_b, pairs.T)):
        for i in range(s.shape[0]):
            codes = [q_own[p] for p in range(s.shape[0]) if p != i and bool(views[i, p])]
            codes += [q_other[p] for p in range(q_other.shape[0]) if bool(cross[i, p])]
            if not codes:
                continue
            target = sum(codes) / len(codes)
            log_z = torch.log(sum(torch.exp(s[i, j] / t) for j in range(s.shape[1])))
            total = total - sum(target[j] * (s[i, j] / t - log_z) for j in range(s.shape[1]))
            anchors += 1
    return total / anchors


def mixed_positives(content_a: list[int], content_b: list[int], pairs: list[tuple[int, int]]) -> tuple[Tensor, ...]:
    ca, cb = torch.tensor(content_a), torch.tensor(content_b)
    cross = torch.zeros(len(content_a), len(content_b), dtype=torch.bool)
    for i, j in pairs:
        cross[i, j] = True
    return ca[:, None] == ca[None, :], cb[:, None] == cb[None, :], cross


def test_pooled_loss_without_views_is_the_cross_modal_swapped_prediction() -> None:
    sa, sb = scores(7, 4, 10), scores(7, 4, 11)
    positives = mixed_positives(list(range(7)), list(range(7)), [(i, i) for i in range(7)])
    torch.testing.assert_close(pooled_swapped_prediction_loss((sa, sb), positives), swapped_prediction_loss(sa, sb))


@pytest.mark.parametrize(("t", "eps", "iterations"), [(0.1, 0.05, 3), (0.5, 0.1, 1), (0.2, 0.03, 7)])
def test_pooled_loss_value_and_gradient_match_the_row_by_row_reference(t: float, eps: float, iterations: int) -> None:
    """Rows of a: 2 pairs, a unimodal sample read 3 times, one read twice, one alone; b differs."""
    positives = mixed_positives([0, 1, 5, 5, 5, 6, 6, 7], [0, 1, 8, 8, 9, 9, 3], [(0, 0), (1, 1)])
    sa, sb = scores(8, 5, 20).requires_grad_(), scores(7, 5, 21).requires_grad_()
    loss = pooled_swapped_prediction_loss((sa, sb), positives, t, eps, iterations)
    ref = pooled_loop_loss(sa, sb, positives, t, eps, iterations)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    got = torch.autograd.grad(loss, (sa, sb))
    want = torch.autograd.grad(ref, (sa, sb))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    assert got[0][7].abs().sum() == 0  # a row without positives gets no gradient...
    assert got[0][:7].abs().sum(dim=1).min() > 0  # ...every other row does


def test_pooled_loss_pulls_views_onto_one_prototype() -> None:
    """Views that agree on a prototype score lower than views that disagree."""
    k = 4
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), k).double()
    positives = mixed_positives([0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 1, 1, 2, 2, 3, 3], [])
    agree = pooled_swapped_prediction_loss((onehot, onehot.clone()), positives, 0.1)
    swapped = onehot[torch.tensor([0, 1, 2, 4, 3, 5, 6, 7])]
    disagree = pooled_swapped_prediction_loss((swapped, onehot.clone()), positives, 0.1)
    assert agree.item() < disagree.item()


def test_pooled_loss_without_positives_is_a_connected_zero_and_shapes_are_checked() -> None:
    sa, sb = scores(3, 4, 1).requires_grad_(), scores(2, 4, 2).requires_grad_()
    loss = pooled_swapped_prediction_loss((sa, sb), mixed_positives([0, 1, 2], [3, 4], []))
    assert loss.item() == 0.0
    loss.backward()
    assert sa.grad is not None and sa.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="positives must be"):
        pooled_swapped_prediction_loss((sa, sb), mixed_positives([0, 1], [3, 4], []))
    with pytest.raises(ValueError, match="score matrices"):
        pooled_swapped_prediction_loss((sa, scores(2, 3, 2)), mixed_positives([0, 1, 2], [3, 4], []))
    with pytest.raises(ValueError, match="temperature"):
        pooled_swapped_prediction_loss((sa, sb), mixed_positives([0, 1, 2], [3, 4], [(0, 0)]), temperature=0.0)
