"""Entropic optimal transport: the Sinkhorn plan and SwAV's balanced cluster assignments.

``sinkhorn`` solves a general entropic transport problem (Cuturi 2013, "Sinkhorn Distances:
Lightspeed Computation of Optimal Transport") in the log domain, so small ``epsilon`` neither
overflows nor underflows. ``balanced_assignments`` is the equipartition step of SwAV (Caron et
al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
Algorithm 1) and SeLaVi (Asano et al. 2020, "Labelling unlabelled videos from scratch with
multi-modal self-supervision"), optionally balanced over the batch of every rank.

Both are solvers, not losses: they run without gradient (inputs are detached).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modalign.alignment._comm import all_reduce_, distributed_enabled


def _solver_dtype(t: Tensor) -> torch.dtype:
    """``float64`` stays, everything else is computed in ``float32``."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _log_marginal(m: Tensor | None, size: int, name: str, like: Tensor) -> Tensor:
    """``log`` of a marginal ``[size]`` (uniform ``1/size`` when ``None``), dtype/device of ``like``.

    Raises:
        ValueError: If ``m`` is not ``[size]`` or has an entry that is not strictly positive.
    """
    if m is None:
        return torch.full((size,), -math.log(size), dtype=like.dtype, device=like.device)
    if m.dim() != 1 or m.shape[0] != size:
        raise ValueError(f"marginal {name} must be [{size}], got shape {tuple(m.shape)}")
    m = m.detach().to(dtype=like.dtype, device=like.device)
    if not bool((m > 0).all()):
        raise ValueError(f"marginal {name} must be strictly positive")
    return m.log()


def sinkhorn(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    epsilon: float = 0.05,
    iterations: int = 100,
    tol: float | None = None,
) -> Tensor:
    """Entropic optimal transport plan between two discrete distributions (Cuturi 2013).

    Minimises ``<P, C> - epsilon * H(P)`` subject to ``P 1 = a`` and ``P^T 1 = b`` by
    alternating Sinkhorn projections on the dual potentials ``f [N]``, ``g [M]`` in the log
    domain: ``g = eps log b - eps LSE_i((f_i - C_ij) / eps)``, then
    ``f = eps log a - eps LSE_j((g_j - C_ij) / eps)``; ``P = exp((f_i + g_j - C_ij) / eps)``.
    The column update comes first, as in POT's ``ot.sinkhorn``, so after the last iteration the
    row marginal ``a`` holds exactly and the column marginal up to convergence. Memory is a few
    ``N x M`` buffers; the plan is a constant (no gradient flows through the iterations; a loss
    ``(P * C).sum()`` still differentiates through ``C``). In ``float32`` the marginals hold to
    a relative ``~1e-7 * max|C| / epsilon``; pass a ``float64`` cost for tighter plans.

    Args:
        cost: ``Tensor[N, M]`` transport cost.
        a: ``Tensor[N]`` source marginal, strictly positive (default uniform ``1/N``).
        b: ``Tensor[M]`` target marginal, strictly positive, same total mass as ``a``
            (default uniform ``1/M``).
        epsilon: Entropic regularisation, in the units of ``cost``.
        iterations: Maximum number of (column, row) update pairs.
        tol: Stop early once the L1 error of the column marginal is at most ``tol``
            (checked every iteration from the column update's own sums); ``None`` runs all iterations.

    Returns:
        ``Tensor[N, M]`` transport plan in the dtype of ``cost`` (``float32`` for half types).

    Raises:
        ValueError: If ``cost`` is not a non-empty 2-D tensor, a marginal has the wrong shape
            or a non-positive entry, ``epsilon <= 0`` or ``iterations < 1``.
    """
    if cost.dim() != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ValueError(f"cost must be a non-empty [N, M] matrix, got shape {tuple(cost.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"need epsilon > 0 and iterations >= 1, got epsilon={epsilon}, iterations={iterations}")
    c = cost.detach().to(_solver_dtype(cost)) / epsilon
    log_a = _log_marginal(a, c.shape[0], "a", c)
    log_b = _log_marginal(b, c.shape[1], "b", c)
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for it in range(iterations):
        lse_col = torch.logsumexp(f[:, None] - c, dim=0)
        if tol is not None and it > 0 and float((torch.exp(g + lse_col) - log_b.exp()).abs().sum()) <= tol:
            break
        g = log_b - lse_col
        f = log_a - torch.logsumexp(g[None, :] - c, dim=1)
    return torch.exp(f[:, None] + g[None, :] - c)


def _column_logsumexp(x: Tensor, distributed: bool) -> Tensor:
    """``logsumexp`` over the rows of ``x [n, K]`` of every rank (``[K]``); ``n`` may be 0."""
    peak = x.amax(dim=0) if x.shape[0] > 0 else x.new_full((x.shape[1],), float("-inf"))
    peak = all_reduce_(peak, distributed, op="max")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = all_reduce_((x - peak).exp().sum(dim=0), distributed)
    return total.log() + peak


def balanced_assignments(scores: Tensor, epsilon: float = 0.05, iterations: int = 3, gather: bool = False) -> Tensor:
    """Equipartitioned soft codes from prototype scores (SwAV Algorithm 1; SeLaVi).

    Approximately solves ``max_Q <Q, S> + epsilon H(Q)`` over codes whose rows sum to 1 and
    whose prototype (column) sums are ``N / K``: starting from ``exp(S / epsilon)``, alternate
    normalising every prototype's total over the batch and every sample's row. The global and
    per-step constants of Algorithm 1 (``/ sum(Q)``, ``/ K``, ``/ B``, ``* B``) cancel, so this
    works on log-codes: ``L -= LSE_rows(L)`` then ``L = log_softmax(L, dim=1)``, in ``float64``
    for ``float64`` scores and ``float32`` otherwise, without overflow for small ``epsilon``.
    The result equals Algorithm 1 up to rounding and is computed without gradient.

    With ``gather=True`` and an initialised process group, the prototype sums run over the
    rows of every rank (one max- and one sum-all-reduce of ``[K]`` per iteration, as in SwAV's
    ``distributed_sinkhorn``) and each rank returns the codes of its own rows: concatenated in
    rank order they equal the single-process codes of the concatenated batch. Ranks may hold
    different numbers of rows, including none.

    Args:
        scores: ``Tensor[N, K]`` scores of ``N`` samples against ``K`` prototypes (typically
            cosine similarities of normalised embeddings and prototypes).
        epsilon: Entropic regularisation; smaller gives sharper codes.
        iterations: Sinkhorn iterations (SwAV uses 3).
        gather: Balance over the global batch of all ranks.

    Returns:
        ``Tensor[N, K]`` codes in the dtype of ``scores`` (``float32`` for half types); every
        row sums to 1, and the column sums approach ``N_total / K`` as ``iterations`` grows.

    Raises:
        ValueError: If ``scores`` is not 2-D with ``K >= 1``, ``epsilon <= 0`` or
            ``iterations < 1``.
    """
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be [N, K] with K >= 1, got shape {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"need epsilon > 0 and iterations >= 1, got epsilon={epsilon}, iterations={iterations}")
    distributed = distributed_enabled(gather)
    log_q = scores.detach().to(_solver_dtype(scores)) / epsilon
    for _ in range(iterations):
        log_q = log_q - _column_logsumexp(log_q, distributed)
        log_q = torch.log_softmax(log_q, dim=1)
    return log_q.exp()
