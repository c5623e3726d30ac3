"""Local false discovery rates: how likely each item is null, from its p-value and the others'.

When every item has a p-value under a known null (uniform on ``[0, 1]`` for a null item) and
the non-null items' p-values pile up near 0, the p-value density is decreasing,
``f(p) = pi0 * 1 + (1 - pi0) * f1(p)``, and the posterior probability that an item is null is
its local false discovery rate ``lfdr(p) = pi0 / f(p)`` (Efron, Tibshirani, Storey and Tusher
2001, "Empirical Bayes Analysis of a Microarray Experiment", JASA). Both parts are estimated
from the p-values alone:

* ``storey_pi0``: the null share from the p-values above ``lam``, where almost only null items
  fall (Storey 2002, "A Direct Approach to False Discovery Rates", JRSS B).
* ``grenander_density``: the maximum-likelihood decreasing density, the slopes of the least
  concave majorant of the empirical distribution function (Grenander 1956): no bins, no
  bandwidth.

``crossfit_infonce`` uses them on the ranks of noisy pairs (``posterior: lfdr``): a pair whose
partner was replaced by a random other sample ranks its given partner uniformly among the
alternatives. Everything here runs without gradient in ``float64`` on the CPU (``N`` values,
once per fit); ``grenander_density`` and ``local_fdr`` return tensors on ``p``'s device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_pvalues(p: Tensor) -> Tensor:
    if p.dim() != 1 or p.shape[0] == 0:
        raise ValueError(f"need p-values of shape [N >= 1], got {tuple(p.shape)}")
    x = p.detach().to(device="cpu", dtype=torch.float64)  # the hull is a loop over the sorted values
    if bool(((x <= 0) | (x > 1)).any()):
        raise ValueError(f"p-values must lie in (0, 1], got min {float(x.min())}, max {float(x.max())}")
    return x


def storey_pi0(p: Tensor, lam: float = 0.5) -> float:
    """The share of null items, ``min(1, #{p > lam} / (N (1 - lam)))`` (Storey 2002).

    Args:
        p: ``Tensor[N]`` p-values in ``(0, 1]``.
        lam: Items above it are taken to be null (``0 <= lam < 1``); non-null items above it
            make the estimate conservative (too high).

    Raises:
        ValueError: On an empty or non-1-D ``p``, values outside ``(0, 1]`` or ``lam`` outside ``[0, 1)``.
    """
    x = _check_pvalues(p)
    if not 0 <= lam < 1:
        raise ValueError(f"lam must lie in [0, 1), got {lam}")
    return min(1.0, float((x > lam).to(torch.float64).mean()) / (1.0 - lam))


def grenander_density(p: Tensor) -> Tensor:
    """``Tensor[N]`` (float64): the Grenander estimate of a decreasing density on ``[0, 1]`` at each ``p``.

    The empirical distribution function's points ``(0, 0), (u_1, F(u_1)), ..., (u_K, 1)`` (``u``
    the distinct values, sorted) get their least concave majorant (upper hull); the density at a
    value is the slope of the hull segment ``(x_{h-1}, x_h]`` that contains it. Equivalently,
    the antitonic regression of the raw slopes ``(F(u_k) - F(u_{k-1})) / (u_k - u_{k-1})``
    weighted by the gaps ``u_k - u_{k-1}``.

    Raises:
        ValueError: As ``storey_pi0`` for ``p``.
    """
    x = _check_pvalues(p)
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    xs = [0.0, *values.tolist()]
    ys = [0.0, *(counts.cumsum(0).to(torch.float64) / x.shape[0]).tolist()]
    hull: list[int] = []
    for k in range(len(xs)):
        while len(hull) >= 2:
            i, j = hull[-2], hull[-1]
            # j lies on or below the chord from i to k: not a vertex of the concave majorant
            if (xs[j] - xs[i]) * (ys[k] - ys[i]) - (ys[j] - ys[i]) * (xs[k] - xs[i]) >= 0:
                hull.pop()
            else:
                break
        hull.append(k)
    hull_x = torch.tensor([xs[h] for h in hull], dtype=torch.float64)
    hull_y = torch.tensor([ys[h] for h in hull], dtype=torch.float64)
    slopes = (hull_y[1:] - hull_y[:-1]) / (hull_x[1:] - hull_x[:-1])
    segment = torch.searchsorted(hull_x, values, right=False) - 1  # segment (x_{h-1}, x_h] holding each value
    return slopes[segment.clamp(min=0)][inverse].to(p.device)


def local_fdr(p: Tensor, lam: float = 0.5) -> tuple[Tensor, float]:
    """``(lfdr Tensor[N] in [0, 1], pi0)``: ``min(1, pi0 / f(p))`` with ``storey_pi0`` and ``grenander_density``.

    ``1 - lfdr`` is each item's posterior probability of being non-null. ``pi0 = 0`` (no p-value
    above ``lam``) gives every item ``lfdr = 0``.

    Raises:
        ValueError: As ``storey_pi0``.
    """
    pi0 = storey_pi0(p, lam)
    density = grenander_density(p)
    return (pi0 / density.clamp(min=torch.finfo(torch.float64).tiny)).clamp(max=1.0), pi0
