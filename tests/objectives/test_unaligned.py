"""Losses for unaligned data: MIL-NCE, noisy-pair targets and weights, FILIP, OT and soft-DTW token scores.

Every loss is checked against a direct loop formula in float64 (value and gradient); the GMM
against scikit-learn; the batched Sinkhorn against ``alignment.sinkhorn`` pair by pair; the
ragged soft-DTW against ``alignment.soft_dtw_divergence`` on trimmed sequences.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture
from torch import Tensor, nn

from modalign.alignment.dtw import soft_dtw_divergence
from modalign.alignment.sinkhorn import sinkhorn
from modalign.core import Batch, ConfigError, ModalitySpec, Outputs
from modalign.core.registry import create
from modalign.core.types import StepContext
from modalign.objectives import FILIP, MILNCE, OTTokens, SoftDTW, SoftInfoNCE, WeightedInfoNCE, infonce_loss
from modalign.objectives.token_alignment import (
    batched_sinkhorn,
    filip_loss,
    filip_similarity,
    ot_token_distance,
    ot_token_loss,
    ot_token_plan,
    soft_dtw_loss,
    soft_dtw_scores,
)
from modalign.objectives.unaligned import (
    agreement_weights,
    clean_posterior,
    content_bags,
    fit_gmm_1d,
    flatten_bags,
    milnce_loss,
    per_pair_infonce,
    score_infonce_loss,
    soft_infonce_loss,
    weighted_infonce_loss,
)
from modalign.train.build import build_method
from modalign.train.grad_cache import grad_cache_backward
from modalign.train.recipe import validate_recipe
from support.reference import assert_same_value_and_grad, normed

F64 = torch.float64
SCALE = torch.tensor(math.log(1 / 0.2), dtype=F64)


def same(ids: list[int] | None, ids_b: list[int] | None, i: int, j: int) -> bool:
    """Rows ``i != j`` hold the same content (never each other's negatives)."""
    return i != j and ((ids is not None and ids[i] == ids[j]) or (ids_b is not None and ids_b[i] == ids_b[j]))


def loop_ce(scores: Callable[[int, int], Tensor], n: int, ids: list[int] | None, ids_b: list[int] | None) -> Tensor:
    """Mean over rows ``i`` of ``-log softmax_j(scores(i, j))[i]`` over the allowed columns."""
    total = torch.zeros((), dtype=F64)
    for i in range(n):
        cols = [j for j in range(n) if not same(ids, ids_b, i, j)]
        den = torch.stack([torch.exp(scores(i, j)) for j in cols]).sum()
        total = total - torch.log(torch.exp(scores(i, i)) / den)
    return total / n


def dot(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum()


def cos(x: Tensor, y: Tensor) -> Tensor:
    return dot(x, y) / (x.norm() * y.norm())


IDS = [None, [0, 1, 0, 2, 3, 1]]


# ---------------------------------------------------------------- score_infonce_loss


@pytest.mark.parametrize("ids", IDS)
def test_score_infonce_equals_infonce_and_the_loop(ids: list[int] | None) -> None:
    a, b = normed(6, 4, 0), normed(6, 4, 1)
    t = torch.tensor(ids) if ids is not None else None
    s = SCALE.exp()

    def loop(a: Tensor, b: Tensor) -> Tensor:
        return 0.5 * (
            loop_ce(lambda i, j: s * dot(a[i], b[j]), 6, ids, None)
            + loop_ce(lambda i, j: s * dot(b[i], a[j]), 6, ids, None)
        )

    assert_same_value_and_grad(lambda a, b: score_infonce_loss(s * a @ b.T, t), loop, a, b)
    torch.testing.assert_close(score_infonce_loss(s * a @ b.T, t), infonce_loss(a, b, SCALE, t), rtol=1e-12, atol=0)


def test_score_infonce_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match=r"\[N, N\]"):
        score_infonce_loss(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="logits_ba"):
        score_infonce_loss(torch.zeros(3, 3), logits_ba=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="ids"):
        score_infonce_loss(torch.zeros(3, 3), ids=torch.arange(2))


# ---------------------------------------------------------------- MIL-NCE

BAGS = [[0, 2], [1], [3, 4, 5, 6], [6]]  # different sizes, one candidate in two bags


def bag_mask(bags: list[list[int]], m: int) -> Tensor:
    return torch.tensor([[j in bag for j in range(m)] for bag in bags])


def loop_milnce(a: Tensor, b: Tensor, bags: list[list[int]], symmetric: bool) -> Tensor:
    s = SCALE.exp()
    rows = []
    for i, bag in enumerate(bags):
        num = torch.stack([torch.exp(s * dot(a[i], b[j])) for j in bag]).sum()
        den = torch.stack([torch.exp(s * dot(a[i], b[j])) for j in range(b.shape[0])]).sum()
        rows.append(-torch.log(num / den))
    loss = torch.stack(rows).mean()
    if not symmetric:
        return loss
    cols = []
    for j in range(b.shape[0]):
        pos = [i for i, bag in enumerate(bags) if j in bag]
        num = torch.stack([torch.exp(s * dot(a[i], b[j])) for i in pos]).sum()
        den = torch.stack([torch.exp(s * dot(a[i], b[j])) for i in range(a.shape[0])]).sum()
        cols.append(-torch.log(num / den))
    return 0.5 * (loss + torch.stack(cols).mean())


@pytest.mark.parametrize("symmetric", [True, False])
def test_milnce_matches_the_loop_with_bags_of_different_sizes(symmetric: bool) -> None:
    a, b = normed(4, 5, 2), normed(7, 5, 3)
    positive = bag_mask(BAGS, 7)
    assert_same_value_and_grad(
        lambda a, b: milnce_loss(a, b, positive, SCALE, symmetric),
        lambda a, b: loop_milnce(a, b, BAGS, symmetric),
        a,
        b,
    )


def test_milnce_with_bags_of_one_is_infonce() -> None:
    a, b = normed(6, 4, 4), normed(6, 4, 5)
    eye = torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(milnce_loss(a, b, eye, SCALE), infonce_loss(a, b, SCALE), rtol=1e-12, atol=0)
    one_way = F.cross_entropy(SCALE.exp() * a @ b.T, torch.arange(6))
    torch.testing.assert_close(milnce_loss(a, b, eye, SCALE, symmetric=False), one_way, rtol=1e-12, atol=0)


def test_flatten_bags_keeps_the_valid_candidates_of_each_anchor() -> None:
    candidates = torch.randn(3, 4, 2, dtype=F64)
    padding = torch.tensor([[False, False, True, True], [False, True, True, True], [False, False, False, True]])
    b, positive = flatten_bags(candidates, padding)
    torch.testing.assert_close(b, torch.cat([candidates[0, :2], candidates[1, :1], candidates[2, :3]]))
    assert positive.tolist() == bag_mask([[0, 1], [2], [3, 4, 5]], 6).tolist()


def test_content_bags_join_rows_of_one_a_content_and_same_b_content() -> None:
    ids_a = torch.tensor([0, 1, 0, 2, 3, 1])
    anchors, positive = content_bags(ids_a, ids_a)
    assert anchors.tolist() == [0, 1, 3, 4]
    assert positive.tolist() == bag_mask([[0, 2], [1, 5], [3], [4]], 6).tolist()
    # b rows 3 and 4 hold one recording: both are positives of anchors 2 and 3
    anchors, positive = content_bags(ids_a, torch.tensor([10, 11, 12, 13, 13, 15]))
    assert positive.tolist() == bag_mask([[0, 2], [1, 5], [3, 4], [3, 4]], 6).tolist()


def test_milnce_bad_inputs_raise() -> None:
    a, b = normed(2, 3, 0), normed(3, 3, 1)
    with pytest.raises(ValueError, match="positive must be"):
        milnce_loss(a, b, torch.ones(2, 2, dtype=torch.bool), SCALE)
    with pytest.raises(ValueError, match="every anchor"):
        milnce_loss(a, b, bag_mask([[0], []], 3), SCALE)
    with pytest.raises(ValueError, match="every candidate"):
        milnce_loss(a, b, bag_mask([[0], [1]], 3), SCALE)
    milnce_loss(a, b, bag_mask([[0], [1]], 3), SCALE, symmetric=False)  # a candidate in no bag: a negative


# ---------------------------------------------------------------- noisy pairs


def loop_soft(a: Tensor, b: Tensor, alpha: float, ids: list[int] | None) -> Tensor:
    s, n = SCALE.exp(), a.shape[0]
    total = torch.zeros((), dtype=F64)
    for q, k in ((a, b), (b, a)):
        for i in range(n):
            cols = [j for j in range(n) if not same(ids, None, i, j)]
            logits = torch.stack([s * dot(q[i], k[j]) for j in cols])
            log_p = logits - torch.log(torch.exp(logits).sum())
            target = alpha * torch.exp(log_p).detach() + (1 - alpha) * torch.tensor(
                [float(j == i) for j in cols], dtype=F64
            )
            total = total - (target * log_p).sum() / n
    return total / 2


@pytest.mark.parametrize("ids", IDS)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_soft_infonce_matches_the_loop(alpha: float, ids: list[int] | None) -> None:
    t = torch.tensor(ids) if ids is not None else None
    assert_same_value_and_grad(
        lambda a, b: soft_infonce_loss(a, b, SCALE, alpha, t),
        lambda a, b: loop_soft(a, b, alpha, ids),
        normed(6, 4, 6),
        normed(6, 4, 7),
    )


@pytest.mark.parametrize("ids", IDS)
def test_soft_infonce_with_alpha_zero_is_infonce(ids: list[int] | None) -> None:
    a, b, t = normed(6, 4, 8), normed(6, 4, 9), torch.tensor(ids) if ids is not None else None
    torch.testing.assert_close(soft_infonce_loss(a, b, SCALE, 0.0, t), infonce_loss(a, b, SCALE, t), rtol=1e-12, atol=0)


def test_soft_infonce_targets_pull_less_towards_a_noisy_label() -> None:
    """The gradient on a mismatched pair's similarity shrinks as alpha grows (bootstrapping)."""
    a, b = normed(6, 4, 10), normed(6, 4, 11)
    b = torch.cat([a[:5] + 0.05 * b[:5], b[5:]])  # five clean pairs, the last one mismatched
    pulls = []
    for alpha in (0.0, 0.5, 0.9):
        bb = b.clone().requires_grad_()
        soft_infonce_loss(a, bb, SCALE, alpha).backward()
        assert bb.grad is not None
        pulls.append(float(-(bb.grad[5] * a[5]).sum()))  # descent moves b_5 towards a_5 by this much
    assert pulls[0] > pulls[1] > pulls[2] > 0


def loop_weighted(a: Tensor, b: Tensor, w: Tensor, ids: list[int] | None) -> Tensor:
    s, n = SCALE.exp(), a.shape[0]
    total = torch.zeros((), dtype=F64)
    for i in range(n):
        cols = [j for j in range(n) if not same(ids, None, i, j)]
        ce_ab = -torch.log(
            torch.exp(s * dot(a[i], b[i])) / torch.stack([torch.exp(s * dot(a[i], b[j])) for j in cols]).sum()
        )
        ce_ba = -torch.log(
            torch.exp(s * dot(b[i], a[i])) / torch.stack([torch.exp(s * dot(b[i], a[j])) for j in cols]).sum()
        )
        total = total + w[i] * (ce_ab + ce_ba) / 2
    return total / n


@pytest.mark.parametrize("ids", IDS)
def test_weighted_infonce_matches_the_loop_and_ones_give_infonce(ids: list[int] | None) -> None:
    a, b, t = normed(6, 4, 12), normed(6, 4, 13), torch.tensor(ids) if ids is not None else None
    w = torch.tensor([1.0, 0.0, 0.5, 0.2, 1.0, 0.9], dtype=F64)
    assert_same_value_and_grad(
        lambda a, b: weighted_infonce_loss(a, b, SCALE, w, t), lambda a, b: loop_weighted(a, b, w, ids), a, b
    )
    ones = torch.ones(6, dtype=F64)
    torch.testing.assert_close(
        weighted_infonce_loss(a, b, SCALE, ones, t), infonce_loss(a, b, SCALE, t), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        per_pair_infonce(a, b, SCALE, t).mean(), infonce_loss(a, b, SCALE, t), rtol=1e-12, atol=0
    )
    with pytest.raises(ValueError, match="weights must be"):
        weighted_infonce_loss(a, b, SCALE, ones[:5])


def two_clusters(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.2, 0.05, 70), rng.normal(0.7, 0.15, 30)])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # tol=0: never "converged"
@pytest.mark.parametrize("iterations", [1, 4, 60])
def test_gmm_em_steps_equal_sklearn_from_the_same_start(iterations: int) -> None:
    x = two_clusters(0)
    low, high = np.sort(x)[:50], np.sort(x)[50:]
    var = x.var() + 1e-6
    ref = GaussianMixture(
        2, max_iter=iterations, tol=0.0, reg_covar=1e-6, weights_init=[0.5, 0.5],
        means_init=[[low.mean()], [high.mean()]], precisions_init=np.full((2, 1, 1), 1 / var),
    )  # fmt: skip
    ref.fit(x[:, None])
    mix = fit_gmm_1d(torch.tensor(x), iterations, tol=0.0, reg=1e-6)
    np.testing.assert_allclose(mix.means.numpy(), ref.means_.ravel(), rtol=1e-10)
    np.testing.assert_allclose(mix.variances.numpy(), ref.covariances_.ravel(), rtol=1e-10)
    np.testing.assert_allclose(mix.weights.numpy(), ref.weights_, rtol=1e-10)
    np.testing.assert_allclose(mix.posterior(torch.tensor(x)).numpy(), ref.predict_proba(x[:, None]), atol=1e-10)


def test_gmm_converges_to_sklearns_default_fit() -> None:
    x = two_clusters(1)
    ref = GaussianMixture(2, tol=1e-12, max_iter=1000, reg_covar=1e-6, random_state=0).fit(x[:, None])
    mix = fit_gmm_1d(torch.tensor(x), 1000, tol=1e-12, reg=1e-6)
    order = np.argsort(ref.means_.ravel())
    np.testing.assert_allclose(mix.means.numpy(), ref.means_.ravel()[order], rtol=1e-6)
    np.testing.assert_allclose(mix.variances.numpy(), ref.covariances_.ravel()[order], rtol=1e-5)
    np.testing.assert_allclose(mix.weights.numpy(), ref.weights_[order], rtol=1e-6)


def test_clean_posterior_weights_the_low_loss_component_without_gradient() -> None:
    losses = torch.tensor(two_clusters(2)).requires_grad_()
    w = clean_posterior(losses)
    assert not w.requires_grad
    assert bool((w[:70] > 0.9).float().mean() > 0.95) and bool((w[70:] < 0.1).float().mean() > 0.85)
    assert torch.equal(clean_posterior(torch.full((5,), 3.0)), torch.ones(5))
    with pytest.raises(ValueError, match="iterations"):
        fit_gmm_1d(torch.zeros(1))


def test_agreement_weights_find_the_mismatched_pairs() -> None:
    """32 pairs whose sides agree, 8 whose partner was shuffled: the shuffled ones get low weights."""
    a = normed(40, 16, 14)
    b = F.normalize(a + 0.1 * normed(40, 16, 15), dim=-1)
    b[32:] = b[32:].roll(1, dims=0)
    w = agreement_weights(a.requires_grad_(), b, SCALE)
    assert not w.requires_grad
    assert bool((w[:32] > 0.5).all()) and bool((w[32:] < 0.5).all()), w


# ---------------------------------------------------------------- token-level: FILIP


def tokens(n: int, t: int, e: int, lengths: list[int] | None, seed: int) -> tuple[Tensor, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, e, generator=g, dtype=F64)
    return x, None if lengths is None else torch.arange(t)[None] >= torch.tensor(lengths)[:, None]


def length_of(padding: Tensor | None, i: int, t: int) -> int:
    return t if padding is None else int((~padding[i]).sum())


def loop_filip_sim(a: Tensor, pa: Tensor | None, b: Tensor, pb: Tensor | None, i: int, j: int) -> Tensor:
    na, nb = length_of(pa, i, a.shape[1]), length_of(pb, j, b.shape[1])
    best = [torch.stack([cos(a[i, t], b[j, u]) for u in range(nb)]).max() for t in range(na)]
    return torch.stack(best).mean()


A_LEN, B_LEN = [5, 3, 1, 4], [6, 2, 4, 5]


@pytest.mark.parametrize("padded", [True, False])
def test_filip_similarity_matches_the_per_pair_loop(padded: bool) -> None:
    a, pa = tokens(4, 5, 3, A_LEN if padded else None, 0)
    b, pb = tokens(3, 6, 3, B_LEN[:3] if padded else None, 1)
    want = torch.stack([torch.stack([loop_filip_sim(a, pa, b, pb, i, j) for j in range(3)]) for i in range(4)])
    torch.testing.assert_close(filip_similarity(a, pa, b, pb), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ids", [None, [0, 1, 0, 2]])
def test_filip_loss_matches_the_loop_and_ignores_padded_tokens(ids: list[int] | None) -> None:
    (a, pa), (b, pb) = tokens(4, 5, 3, A_LEN, 2), tokens(4, 6, 3, B_LEN, 3)
    t, s = (torch.tensor(ids) if ids is not None else None), SCALE.exp()

    def loop(a: Tensor, b: Tensor) -> Tensor:
        ab = loop_ce(lambda i, j: s * loop_filip_sim(a, pa, b, pb, i, j), 4, ids, None)
        ba = loop_ce(lambda i, j: s * loop_filip_sim(b, pb, a, pa, i, j), 4, ids, None)
        return (ab + ba) / 2

    assert_same_value_and_grad(lambda a, b: filip_loss(a, pa, b, pb, SCALE, t), loop, a, b)
    a2 = a.clone().requires_grad_()
    a2.data[pa] = 1e3  # other values at the padded tokens
    loss = filip_loss(a2, pa, b, pb, SCALE, t)
    torch.testing.assert_close(loss, filip_loss(a, pa, b, pb, SCALE, t), rtol=1e-12, atol=0)
    loss.backward()
    assert a2.grad is not None and float(a2.grad[pa].abs().max()) == 0.0


def test_token_losses_reject_rows_without_valid_tokens() -> None:
    a, _ = tokens(2, 3, 2, None, 0)
    pad = torch.tensor([[False, False, False], [True, True, True]])
    for fn in (filip_loss, ot_token_loss, soft_dtw_loss):
        with pytest.raises(ValueError, match="every row needs a token"):
            fn(a, None, a, pad, SCALE)
    with pytest.raises(ValueError, match="right padding"):
        soft_dtw_loss(a, None, a, torch.tensor([[True, False, False], [False, False, True]]), SCALE)


# ---------------------------------------------------------------- token-level: optimal transport


def trimmed_cost(a: Tensor, pa: Tensor | None, b: Tensor, pb: Tensor | None, i: int, j: int) -> Tensor:
    na, nb = length_of(pa, i, a.shape[1]), length_of(pb, j, b.shape[1])
    return torch.stack([torch.stack([1 - cos(a[i, t], b[j, u]) for u in range(nb)]) for t in range(na)])


def test_batched_sinkhorn_equals_alignment_sinkhorn_pair_by_pair() -> None:
    (a, pa), (b, pb) = tokens(4, 5, 3, A_LEN, 4), tokens(4, 6, 3, B_LEN, 5)
    plans = ot_token_plan(a, pa, b, pb, epsilon=0.1, iterations=30)
    for i in range(4):
        na, nb = A_LEN[i], B_LEN[i]
        want = sinkhorn(trimmed_cost(a, pa, b, pb, i, i), epsilon=0.1, iterations=30)
        torch.testing.assert_close(plans[i, :na, :nb], want, rtol=1e-10, atol=1e-14)
        assert float(plans[i, na:].abs().sum() + plans[i, :, nb:].abs().sum()) == 0.0


def test_ot_plan_has_uniform_marginals_over_the_valid_tokens() -> None:
    (a, pa), (b, pb) = tokens(4, 5, 3, A_LEN, 6), tokens(4, 6, 3, B_LEN, 7)
    plans = ot_token_plan(a, pa, b, pb, epsilon=0.05, iterations=500)
    for i in range(4):
        rows, cols = plans[i].sum(dim=1), plans[i].sum(dim=0)
        torch.testing.assert_close(
            rows[: A_LEN[i]], torch.full((A_LEN[i],), 1 / A_LEN[i], dtype=F64), atol=1e-12, rtol=0
        )
        torch.testing.assert_close(
            cols[: B_LEN[i]], torch.full((B_LEN[i],), 1 / B_LEN[i], dtype=F64), atol=1e-6, rtol=0
        )


def test_ot_permuted_tokens_cost_less_than_random_ones() -> None:
    a, _ = tokens(1, 6, 8, None, 8)
    permuted = a[:, torch.randperm(6, generator=torch.Generator().manual_seed(0))]
    other, _ = tokens(1, 6, 8, None, 9)
    w_perm = ot_token_distance(a, None, permuted, None, epsilon=0.01, iterations=300)
    w_rand = ot_token_distance(a, None, other, None, epsilon=0.01, iterations=300)
    assert float(w_perm) < 0.05 < 0.5 < float(w_rand)


@pytest.mark.parametrize("ids", [None, [0, 1, 0, 2]])
def test_ot_token_loss_matches_the_loop_with_the_plan_held_constant(ids: list[int] | None) -> None:
    (a, pa), (b, pb) = tokens(4, 5, 3, A_LEN, 10), tokens(4, 6, 3, B_LEN, 11)
    t, s = (torch.tensor(ids) if ids is not None else None), SCALE.exp()

    def w(a: Tensor, b: Tensor, i: int, j: int) -> Tensor:
        cost = trimmed_cost(a, pa, b, pb, i, j)
        return (sinkhorn(cost.detach(), epsilon=0.1, iterations=40) * cost).sum()

    def loop(a: Tensor, b: Tensor) -> Tensor:
        return (
            loop_ce(lambda i, j: -s * w(a, b, i, j), 4, ids, None)
            + loop_ce(lambda i, j: -s * w(a, b, j, i), 4, ids, None)
        ) / 2

    assert_same_value_and_grad(
        lambda a, b: ot_token_loss(a, pa, b, pb, SCALE, t, epsilon=0.1, iterations=40), loop, a, b
    )


def test_batched_sinkhorn_bad_settings_raise() -> None:
    valid = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="epsilon"):
        batched_sinkhorn(torch.zeros(1, 2, 2), valid, valid, 0.0, 10)


# ---------------------------------------------------------------- token-level: soft-DTW


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_soft_dtw_scores_equal_the_divergence_of_the_trimmed_sequences(metric: str) -> None:
    (a, pa), (b, pb) = tokens(3, 5, 2, [5, 3, 3], 12), tokens(4, 4, 2, [2, 4, 3, 2], 13)

    def loop(a: Tensor, b: Tensor) -> Tensor:
        rows = []
        for i, n in enumerate([5, 3, 3]):
            rows.append(
                torch.cat(
                    [
                        soft_dtw_divergence(a[i : i + 1, :n], b[j : j + 1, :m], 0.3, metric)
                        for j, m in enumerate([2, 4, 3, 2])
                    ]
                )
            )
        return torch.stack(rows)

    assert_same_value_and_grad(
        lambda a, b: (soft_dtw_scores(a, pa, b, pb, 0.3, metric) * torch.arange(12, dtype=F64).reshape(3, 4)).sum(),
        lambda a, b: (loop(a, b) * torch.arange(12, dtype=F64).reshape(3, 4)).sum(),
        a,
        b,
    )


def test_soft_dtw_loss_matches_the_loop() -> None:
    (a, pa), (b, pb) = tokens(4, 5, 3, [5, 3, 2, 4], 14), tokens(4, 6, 3, [6, 2, 4, 5], 15)
    s, ids = SCALE.exp(), [0, 1, 0, 2]

    def d(a: Tensor, b: Tensor, i: int, j: int) -> Tensor:
        return soft_dtw_divergence(
            a[i : i + 1, : length_of(pa, i, 5)], b[j : j + 1, : length_of(pb, j, 6)], 0.2, "cosine"
        )[0]

    def loop(a: Tensor, b: Tensor) -> Tensor:
        return (
            loop_ce(lambda i, j: -s * d(a, b, i, j), 4, ids, None)
            + loop_ce(lambda i, j: -s * d(a, b, j, i), 4, ids, None)
        ) / 2

    assert_same_value_and_grad(
        lambda a, b: soft_dtw_loss(a, pa, b, pb, SCALE, torch.tensor(ids), gamma=0.2), loop, a, b
    )


def test_soft_dtw_scores_are_zero_for_a_sequence_and_itself() -> None:
    a, pa = tokens(3, 5, 2, [5, 3, 4], 16)
    assert torch.allclose(soft_dtw_scores(a, pa, a, pa).diagonal(), torch.zeros(3, dtype=F64), atol=1e-12)


# ---------------------------------------------------------------- modules on hand-made outputs


class _Width(nn.Module):
    def __init__(self, **attrs: int) -> None:
        super().__init__()
        for k, v in attrs.items():
            setattr(self, k, v)


class StubModel(nn.Module):
    """What ``bind`` reads: ``modalities``, encoder token widths and projection head widths."""

    def __init__(self, dims: dict[str, int], out_dim: int = 6) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: _Width(dim=d) for m, d in dims.items()})
        self.heads = nn.ModuleDict({m: _Width(out_dim=out_dim) for m in dims})

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(sorted(self.encoders))


DIMS = {"text": 8, "image": 12}


def hand_outputs(n: int, seed: int) -> Outputs:
    """Embeddings ``[n, 6]``; text tokens ``[n, 5, 8]`` right-padded, image tokens ``[n, 4, 12]`` unpadded."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (n,), generator=g)
    return Outputs(
        embeddings={m: F.normalize(torch.randn(n, 6, generator=g, dtype=F64), dim=-1).requires_grad_() for m in DIMS},
        tokens={
            "text": torch.randn(n, 5, 8, generator=g, dtype=F64).requires_grad_(),
            "image": torch.randn(n, 4, 12, generator=g, dtype=F64).requires_grad_(),
        },
        padding={"text": torch.arange(5)[None, :] >= lengths[:, None]},
    )


def hand_batch(n: int, ids: list[int] | None = None, absent: list[int] | None = None) -> Batch:
    present = torch.ones(n, dtype=torch.bool)
    present[absent or []] = False
    return Batch(
        data={"text": torch.zeros(n, 5, dtype=torch.long), "image": torch.zeros(n, 1)},
        present={"text": torch.ones(n, dtype=torch.bool), "image": present},
        ids=torch.tensor(ids) if ids is not None else torch.arange(n),
    )


def bound(cls: type[nn.Module], **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    obj = cls(modalities=["text", "image"], **kwargs)
    obj.bind(StubModel(DIMS))
    return obj.double()


def test_milnce_module_makes_one_anchor_per_text_content_on_the_observed_rows() -> None:
    obj, out = bound(MILNCE, temperature=0.2), hand_outputs(7, 0)
    batch = hand_batch(7, ids=[0, 1, 0, 2, 3, 1, 4], absent=[6])
    got = obj(out, batch)
    a, b = out.embeddings["text"][:6], out.embeddings["image"][:6]
    want = milnce_loss(a[[0, 1, 3, 4]], b, bag_mask([[0, 2], [1, 5], [3], [4]], 6), obj.scale())
    torch.testing.assert_close(got.loss, want, rtol=1e-12, atol=0)
    assert got.metrics["bags"] == 4 and got.metrics["paired"] == 6


def test_soft_infonce_module_is_the_function_on_the_paired_rows() -> None:
    obj, out, batch = (
        bound(SoftInfoNCE, alpha=0.4),
        hand_outputs(6, 1),
        hand_batch(6, ids=[0, 1, 0, 2, 3, 4], absent=[5]),
    )
    want = soft_infonce_loss(
        out.embeddings["text"][:5], out.embeddings["image"][:5], obj.scale(), 0.4, batch.ids[:5], batch.ids[:5]
    )
    torch.testing.assert_close(obj(out, batch).loss, want, rtol=1e-12, atol=0)


def test_weighted_module_is_infonce_during_warmup_then_weighted() -> None:
    obj, out, batch = bound(WeightedInfoNCE, warmup_steps=3), hand_outputs(8, 2), hand_batch(8)
    a, b = out.embeddings["text"], out.embeddings["image"]
    scale = obj.scale()
    torch.testing.assert_close(
        obj(out, batch).loss, infonce_loss(a, b, scale, batch.ids, ids_b=batch.ids), rtol=1e-12, atol=0
    )
    obj.after_step(None, StepContext(step=3, epoch=0, total_steps=10, steps_per_epoch=10))
    assert int(obj.state_dict()["steps"]) == 3  # a buffer: saved with the weights
    w = agreement_weights(a, b, scale, batch.ids, batch.ids)
    got = obj(out, batch)
    torch.testing.assert_close(
        got.loss, weighted_infonce_loss(a, b, scale, w, batch.ids, batch.ids), rtol=1e-12, atol=0
    )
    assert got.metrics["weight"] == pytest.approx(float(w.mean()))


def project(obj: nn.Module, out: Outputs, m: str, rows: slice) -> Tensor:
    return obj.project.maps[m](out.tokens[m][rows])


@pytest.mark.parametrize(
    ("cls", "fn"),
    [
        (FILIP, lambda a, pa, b, pb, s, ids: filip_loss(a, pa, b, pb, s, ids, ids)),
        (OTTokens, lambda a, pa, b, pb, s, ids: ot_token_loss(a, pa, b, pb, s, ids, ids, 0.05, 50)),
        (SoftDTW, lambda a, pa, b, pb, s, ids: soft_dtw_loss(a, pa, b, pb, s, ids, ids)),
    ],
)
def test_token_modules_are_the_function_on_projected_tokens(cls: type[nn.Module], fn: Callable[..., Tensor]) -> None:
    obj, out, batch = bound(cls), hand_outputs(6, 3), hand_batch(6, ids=[0, 1, 0, 2, 3, 4], absent=[5])
    got = obj(out, batch)
    rows = slice(0, 5)
    a, b = project(obj, out, "text", rows), project(obj, out, "image", rows)
    want = fn(a, out.padding["text"][rows], b, torch.zeros(5, 4, dtype=torch.bool), obj.scale(), batch.ids[rows])
    torch.testing.assert_close(got.loss, want, rtol=1e-12, atol=0)
    got.loss.backward()
    for p in obj.parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)
    assert {"acc_a2b", "acc_b2a", "temperature", "paired"} <= got.metrics.keys()


@pytest.mark.parametrize("cls", [MILNCE, SoftInfoNCE, WeightedInfoNCE, FILIP, OTTokens, SoftDTW])
def test_modules_with_a_modality_absent_or_one_pair_give_a_connected_zero(cls: type[nn.Module]) -> None:
    obj = bound(cls)
    for out, batch in [(hand_outputs(4, 4), hand_batch(4, absent=[1, 2, 3]))]:
        loss = obj(out, batch).loss
        assert float(loss.detach()) == 0.0 and loss.requires_grad
    out = hand_outputs(4, 5)
    del out.embeddings["image"], out.tokens["image"]
    loss = obj(out, hand_batch(4)).loss
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_registered_names_and_configuration_errors() -> None:
    for name, cls in [("milnce", MILNCE), ("soft_infonce", SoftInfoNCE), ("weighted_infonce", WeightedInfoNCE),
                      ("filip", FILIP), ("ot_tokens", OTTokens), ("soft_dtw", SoftDTW)]:  # fmt: skip
        assert isinstance(create("objective", name, modalities=["text", "image"]), cls)
    bad = [
        (SoftInfoNCE, {"alpha": 1.5}, "alpha"),
        (WeightedInfoNCE, {"warmup_steps": -1}, "warmup_steps"),
        (WeightedInfoNCE, {"iterations": 0}, "iterations"),
        (WeightedInfoNCE, {"reg": 0.0}, "reg"),
        (OTTokens, {"epsilon": 0.0}, "epsilon"),
        (OTTokens, {"iterations": 0}, "iterations"),
        (SoftDTW, {"gamma": -1.0}, "gamma"),
        (SoftDTW, {"metric": "l1"}, "metric"),
        (FILIP, {"dim": 0}, "dim"),
        (MILNCE, {"temperature": 0.0}, "temperature"),
        (FILIP, {"modalities": ["text", "text"]}, "modalities"),
    ]
    for cls, kwargs, key in bad:
        with pytest.raises(ConfigError, match=rf"^{key}:"):
            cls(**kwargs)
    with pytest.raises(ConfigError, match=r"^modalities:"):
        FILIP(modalities=["text", "audio"]).bind(StubModel(DIMS))


# ---------------------------------------------------------------- through the method: gradient caching, training


SERIES = {"x": ModalitySpec("series", channels=3), "y": ModalitySpec("series", channels=3)}
NAMES = ["milnce", "soft_infonce", "weighted_infonce", "filip", "ot_tokens", "soft_dtw"]


def series_method(objective: dict) -> nn.Module:
    tree = {
        "data": {"name": "av-digits"},
        "model": {
            "embed_dim": 8,
            "encoders": {m: {"name": "series_transformer", "dim": 16, "depth": 1, "heads": 2} for m in SERIES},
        },
        "method": {"name": "composite", "objectives": [objective]},
    }
    torch.manual_seed(0)
    return build_method(validate_recipe(tree), SERIES)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_caching_equals_the_full_batch_step(name: str) -> None:
    """The objectives read ``Outputs`` only: chunks of 3 rows give the full step (ragged right padding)."""
    method = series_method({"name": name}).double()
    g = torch.Generator().manual_seed(0)
    pad = torch.arange(8)[None] >= torch.tensor([8, 5, 8, 3, 7, 8, 2, 6])[:, None]
    ones = torch.ones(8, dtype=torch.bool)
    batch = Batch(
        data={m: torch.randn(8, 3, 8, generator=g, dtype=F64) for m in SERIES},
        present={"x": ones, "y": ones},
        ids=torch.tensor([0, 1, 2, 0, 4, 5, 1, 7]),
        padding={"x": pad, "y": pad.roll(1, 0)},
    )
    full = method.loss(method(batch), batch)
    full.loss.backward()
    want = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
    method.zero_grad(set_to_none=True)
    got = grad_cache_backward(method, batch, 3)
    torch.testing.assert_close(got.loss.detach(), full.loss.detach(), rtol=1e-10, atol=0)
    grads = {k: p.grad for k, p in method.named_parameters() if p.grad is not None}
    assert grads.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(grads[k], v, rtol=1e-8, atol=1e-12)


MIX = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))[0]


def series_batch(g: torch.Generator, pool: Tensor, n: int = 16) -> Batch:
    """``y = MIX x + noise`` over the time steps of ``n`` sequences ``[3, 8]`` drawn from a pool."""
    rows = torch.randperm(pool.shape[0], generator=g)[:n]
    x = pool[rows]
    y = torch.einsum("dc,nct->ndt", MIX, x) + 0.05 * torch.randn(x.shape, generator=g)
    ones = torch.ones(n, dtype=torch.bool)
    return Batch(data={"x": x, "y": y}, present={"x": ones, "y": ones}, ids=rows)


@pytest.mark.parametrize("name", ["filip", "ot_tokens", "soft_dtw"])
def test_token_objective_trains_towers_to_match_sequences(name: str, one_thread: None) -> None:
    """100 steps of a recipe-built method: the loss halves and held-out pairs rank first (chance 1/32)."""
    objective = {"name": name, "temperature": 0.1, **({"iterations": 20} if name == "ot_tokens" else {})}
    method = series_method(objective)
    opt = torch.optim.Adam(method.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    pool, held_out = torch.randn(200, 3, 8, generator=g), torch.randn(32, 3, 8, generator=g)

    def held_out_accuracy() -> float:
        batch = series_batch(g, held_out, 32)
        with torch.no_grad():
            return method.loss(method(batch), batch).metrics[f"{name}/acc_a2b"]

    before = held_out_accuracy()
    losses = []
    for _ in range(100):
        batch = series_batch(g, pool)
        out = method.loss(method(batch), batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    after = held_out_accuracy()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-5:])
    assert before < 0.25 < 0.6 < after, (before, after)
