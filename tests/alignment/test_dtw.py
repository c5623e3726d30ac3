"""Soft-DTW against the cell-by-cell dynamic programme (value and gradient), and its limits."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from modalign.alignment.dtw import (
    pairwise_cost,
    soft_dtw,
    soft_dtw_alignment,
    soft_dtw_divergence,
    soft_dtw_from_cost,
)


def naive_soft_dtw(cost: Tensor, gamma: float) -> Tensor:
    """Cuturi & Blondel (2017), Algorithm 1, one cell at a time (``gamma = 0``: hard DTW)."""
    n, m = cost.shape
    inf = torch.tensor(float("inf"), dtype=cost.dtype)
    r = [[inf] * (m + 1) for _ in range(n + 1)]
    r[0][0] = torch.zeros((), dtype=cost.dtype)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            prev = torch.stack([r[i - 1][j - 1], r[i - 1][j], r[i][j - 1]])
            soft = prev.min() if gamma == 0 else -gamma * torch.logsumexp(-prev / gamma, dim=0)
            r[i][j] = cost[i - 1, j - 1] + soft
    return r[n][m]


@pytest.mark.parametrize(("n", "m", "gamma"), [(5, 7, 0.5), (6, 3, 1.0), (1, 4, 0.1), (8, 8, 0.01)])
def test_value_and_gradient_equal_the_naive_programme(n: int, m: int, gamma: float) -> None:
    g = torch.Generator().manual_seed(n * 10 + m)
    x = torch.randn(3, n, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(3, m, 4, dtype=torch.float64, generator=g, requires_grad=True)
    fast = soft_dtw(x, y, gamma)
    fast_grads = torch.autograd.grad(fast.sum(), (x, y))
    cost = pairwise_cost(x, y)
    slow = torch.stack([naive_soft_dtw(cost[b], gamma) for b in range(3)])
    slow_grads = torch.autograd.grad(slow.sum(), (x, y))
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_small_gamma_approaches_hard_dtw_and_the_alignment_is_its_path() -> None:
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(2, 6, 9, dtype=torch.float64, generator=g)
    hard = torch.stack([naive_soft_dtw(cost[b], 0) for b in range(2)])
    torch.testing.assert_close(soft_dtw_from_cost(cost, 1e-4), hard, rtol=0, atol=1e-3)
    path = soft_dtw_alignment(cost, 1e-4)
    assert path.shape == cost.shape
    assert torch.allclose(path[:, 0, 0], torch.ones(2, dtype=torch.float64)) and torch.allclose(
        path[:, -1, -1], torch.ones(2, dtype=torch.float64)
    )
    # a hard path: 0/1 entries whose cost sum is the DTW value
    assert torch.allclose(path, path.round(), atol=1e-3)
    torch.testing.assert_close((path * cost).sum((1, 2)), hard, rtol=0, atol=1e-3)


def test_a_delayed_copy_is_aligned_by_its_shift() -> None:
    t = torch.linspace(0, 6.28, 40, dtype=torch.float64)
    x = torch.sin(t)[None, :, None]
    y = torch.sin(t - 0.8)[None, :, None]  # the same wave, 5 steps later
    path = soft_dtw_alignment(pairwise_cost(x, y), 0.01)[0]
    cols = path[10:30].argmax(dim=1) - torch.arange(10, 30)
    assert cols.float().mean().item() == pytest.approx(5, abs=1.5)
    divergence = soft_dtw_divergence(x, y, 0.1)
    assert soft_dtw_divergence(x, x, 0.1).abs().item() < 1e-9 and divergence.item() > 0


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="gamma must be positive"):
        soft_dtw_from_cost(torch.rand(1, 2, 2), 0)
    with pytest.raises(ValueError, match="share B and D"):
        pairwise_cost(torch.rand(2, 3, 4), torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="unknown metric"):
        pairwise_cost(torch.rand(1, 3, 4), torch.rand(1, 3, 4), "manhattan")
