"""Soft dynamic time warping: a differentiable alignment cost between sequences of different rates.

Soft-DTW (Cuturi & Blondel, "Soft-DTW: a Differentiable Loss Function for Time-Series", ICML
2017) replaces the minimum of the DTW recursion by a soft minimum,

    R[i, j] = C[i, j] + softmin_gamma(R[i-1, j-1], R[i-1, j], R[i, j-1]),
    softmin_gamma(a) = -gamma * log(sum(exp(-a / gamma))),

with ``R[0, 0] = 0`` and ``R[i, 0] = R[0, j] = +inf``; the value is ``R[N, M]``. Its gradient
with respect to the cost matrix ``C`` is the *expected alignment* (a soft warping path), which
``soft_dtw_alignment`` returns for inspection. ``soft_dtw_divergence`` (Blondel, Mensch & Vert,
"Differentiable Divergences Between Time Series", AISTATS 2021) subtracts the self-similarity
terms so that it is non-negative and zero between a sequence and itself.

The recursion runs over anti-diagonals (every cell of one anti-diagonal depends only on the two
before it), so a ``[B, N, M]`` batch costs ``N + M - 1`` vectorised steps, and autograd
differentiates it (tested against the cell-by-cell dynamic programme, value and gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Stands for +inf outside the DTW grid (finite, so that gradients stay finite).
_FAR = 1e10


def pairwise_cost(x: Tensor, y: Tensor, metric: str = "sqeuclidean") -> Tensor:
    """Cost between every step of ``x [B, N, D]`` and ``y [B, M, D]``: ``[B, N, M]``.

    ``metric``: ``sqeuclidean`` (squared distance) or ``cosine`` (``1 - cosine similarity``).

    Raises:
        ValueError: Unknown metric, or shapes that do not pair.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"x [B, N, D] and y [B, M, D] must share B and D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if metric == "sqeuclidean":
        return (x.unsqueeze(2) - y.unsqueeze(1)).pow(2).sum(-1)
    if metric == "cosine":
        xn = torch.nn.functional.normalize(x, dim=-1)
        yn = torch.nn.functional.normalize(y, dim=-1)
        return 1 - xn @ yn.transpose(1, 2)
    raise ValueError(f"unknown metric {metric!r}; allowed: ['sqeuclidean', 'cosine']")


def soft_dtw_from_cost(cost: Tensor, gamma: float = 1.0) -> Tensor:
    """Soft-DTW value of each cost matrix of ``cost [B, N, M]``: ``[B]``.

    Args:
        cost: Non-negative pairwise costs (``pairwise_cost``); differentiable.
        gamma: Smoothing; ``gamma -> 0`` gives hard DTW.

    Raises:
        ValueError: ``gamma`` is not positive or ``cost`` is not ``[B, N, M]``.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    if cost.dim() != 3:
        raise ValueError(f"cost must be [B, N, M], got {tuple(cost.shape)}")
    b, n, m = cost.shape
    far = torch.full((b, n + 1), _FAR, dtype=cost.dtype, device=cost.device)
    rows = torch.arange(n + 1, device=cost.device)
    # diagonal k holds R[i, k - i] at position i (i = 0..N); outside the grid it is _FAR
    before = far.clone()  # diagonal -1: nothing
    last = torch.where(rows == 0, torch.zeros_like(far), far)  # diagonal 0: R[0, 0] = 0
    for k in range(1, n + m + 1):
        i = rows[1:]  # rows 1..N; column j = k - i
        j = k - i
        valid = (j >= 1) & (j <= m)
        c = cost[:, (i - 1).clamp(max=n - 1), (j - 1).clamp(0, m - 1)]
        diag_prev = before[:, :-1]  # R[i-1, j-1] sits on diagonal k-2 at position i-1
        up = last[:, :-1]  # R[i-1, j] on diagonal k-1 at position i-1
        left = last[:, 1:]  # R[i, j-1] on diagonal k-1 at position i
        options = torch.stack([diag_prev, up, left], dim=-1)
        soft = -gamma * torch.logsumexp(-options / gamma, dim=-1)
        inner = torch.where(valid, c + soft, torch.full_like(soft, _FAR))
        before, last = last, torch.cat([far[:, :1], inner], dim=1)
    return last[:, n]


def soft_dtw(x: Tensor, y: Tensor, gamma: float = 1.0, metric: str = "sqeuclidean") -> Tensor:
    """Soft-DTW between the sequences ``x [B, N, D]`` and ``y [B, M, D]`` (``N != M`` allowed): ``[B]``."""
    return soft_dtw_from_cost(pairwise_cost(x, y, metric), gamma)


def soft_dtw_divergence(x: Tensor, y: Tensor, gamma: float = 1.0, metric: str = "sqeuclidean") -> Tensor:
    """``sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2``: ``[B]``, zero when ``x == y`` (Blondel et al. 2021)."""
    return soft_dtw(x, y, gamma, metric) - 0.5 * (soft_dtw(x, x, gamma, metric) + soft_dtw(y, y, gamma, metric))


def soft_dtw_alignment(cost: Tensor, gamma: float = 1.0) -> Tensor:
    """The expected alignment ``d soft_dtw / d cost``: ``[B, N, M]``, a soft warping path per pair.

    Each entry is the probability, under the Gibbs distribution over alignment paths, that
    the path passes through cell ``(i, j)``; ``gamma -> 0`` gives the hard DTW path.
    """
    with torch.enable_grad():
        leaf = cost.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(soft_dtw_from_cost(leaf, gamma).sum(), leaf)
    return grad
