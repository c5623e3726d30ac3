"""Aligning two embedding spaces by an orthogonal map, with pairs, with a few, or with none.

* ``orthogonal_procrustes``: the closed form (Schönemann 1966) of
  ``min_W ||X W - Y||_F`` over orthogonal ``W``: ``W = U V^T`` from the SVD ``X^T Y = U S V^T``.
* ``mutual_neighbours``: pairs that are each other's nearest neighbour, by cosine or by CSLS
  (cross-domain similarity local scaling, Conneau et al., "Word Translation Without Parallel
  Data", ICLR 2018), which discounts hubs; computed in row blocks.
* ``refine_procrustes``: the iterative refinement of that paper: alternate mutual neighbours of
  ``X W`` and ``Y`` and Procrustes on them.
* ``gromov_wasserstein``: an entropic Gromov-Wasserstein coupling (Peyré, Cuturi & Solomon,
  ICML 2016; Alvarez-Melis & Jaakkola, "Gromov-Wasserstein Alignment of Word Embedding
  Spaces", EMNLP 2018) between two point clouds from their *intra*-space similarities only:
  it needs no shared space and no pairs, which is what an unpaired start needs.
* ``wasserstein_procrustes``: Grave, Joulin & Berthet ("Unsupervised Alignment of Embeddings
  with Wasserstein Procrustes", AISTATS 2019): alternate an optimal-transport matching of
  ``X W`` to ``Y`` (``sinkhorn``) and Procrustes on the matched targets.

Everything here runs without gradient on ``[N, D]`` embeddings (rows are samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from modalign.alignment.sinkhorn import sinkhorn


def orthogonal_procrustes(x: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
    """The orthogonal ``W [D, D]`` minimising ``sum_i w_i ||x_i W - y_i||^2``.

    Args:
        x: ``[N, D]`` source rows.
        y: ``[N, D]`` their targets.
        weights: ``[N]`` non-negative pair weights (default all 1).

    Raises:
        ValueError: Shapes that do not pair.
    """
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be [N, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    m = (x if weights is None else x * weights[:, None]).T @ y
    u, _, vh = torch.linalg.svd(m)
    return u @ vh


def _hubness(a: Tensor, b: Tensor, k: int, block: int) -> Tensor:
    """Mean cosine of each row of ``a`` to its ``k`` nearest rows of ``b`` (unit rows): ``[len(a)]``."""
    out = []
    for start in range(0, a.shape[0], block):
        sims = a[start : start + block] @ b.T
        out.append(sims.topk(min(k, b.shape[0]), dim=1).values.mean(dim=1))
    return torch.cat(out)


def _best(a: Tensor, b: Tensor, ra: Tensor | None, rb: Tensor | None, block: int) -> Tensor:
    """For each row of ``a``, the index of its best row of ``b`` (cosine, or CSLS with hubness ``ra``, ``rb``)."""
    best = []
    for start in range(0, a.shape[0], block):
        scores = a[start : start + block] @ b.T
        if ra is not None and rb is not None:
            scores = 2 * scores - ra[start : start + block, None] - rb[None, :]
        best.append(scores.argmax(dim=1))
    return torch.cat(best)


@torch.no_grad()
def mutual_neighbours(a: Tensor, b: Tensor, csls_k: int | None = 10, block: int = 4096) -> tuple[Tensor, Tensor]:
    """Index pairs ``(i, j)`` where ``b[j]`` is ``a[i]``'s best match and ``a[i]`` is ``b[j]``'s.

    Args:
        a: ``[N, D]``.
        b: ``[M, D]`` (compared by cosine).
        csls_k: Neighbours of the CSLS hubness correction; ``None`` ranks by plain cosine.
        block: Rows per similarity block (memory ``block x max(N, M)``).

    Returns:
        ``(i [P], j [P])`` with ``i`` increasing.
    """
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    ra = rb = None
    if csls_k is not None:
        ra, rb = _hubness(a, b, csls_k, block), _hubness(b, a, csls_k, block)
    ab = _best(a, b, ra, rb, block)
    ba = _best(b, a, rb, ra, block)
    i = torch.arange(a.shape[0], device=a.device)
    keep = ba[ab] == i
    return i[keep], ab[keep]


@dataclass
class Alignment:
    """An orthogonal map and how it was found.

    Attributes:
        w: ``[D, D]`` orthogonal map; ``x @ w`` lies in ``y``'s space.
        pairs: Mutual-neighbour pairs used by each refinement iteration (empty without one).
    """

    w: Tensor
    pairs: list[int]


@torch.no_grad()
def refine_procrustes(
    x: Tensor, y: Tensor, w: Tensor, iterations: int = 5, csls_k: int | None = 10, block: int = 4096
) -> Alignment:
    """Refine the map ``w`` by Procrustes on the mutual neighbours of ``x @ w`` and ``y``, ``iterations`` times.

    ``x [N, D]`` and ``y [M, D]`` need not be paired or of equal size (Conneau et al. 2018).
    """
    sizes = []
    for _ in range(iterations):
        i, j = mutual_neighbours(x @ w, y, csls_k, block)
        sizes.append(int(i.numel()))
        if i.numel() < 2:
            break
        w = orthogonal_procrustes(F.normalize(x[i], dim=1), F.normalize(y[j], dim=1))
    return Alignment(w, sizes)


#: Entropic regularisations of ``gromov_wasserstein``, annealed from coarse to sharp.
GW_EPSILONS = (0.2, 0.1, 0.05, 0.02, 0.01, 0.005)


@torch.no_grad()
def gromov_wasserstein(
    x: Tensor,
    y: Tensor,
    epsilons: Sequence[float] = GW_EPSILONS,
    iterations: int = 20,
    sinkhorn_iterations: int = 300,
) -> Tensor:
    """Entropic Gromov-Wasserstein coupling ``[N, M]`` between ``x [N, D]`` and ``y [M, E]`` (square loss).

    Uses only the cosine similarity matrices ``Cx = x x^T`` and ``Cy = y y^T`` of unit rows, so
    ``D`` and ``E`` may differ. Projected mirror descent of Peyré et al. (2016): with uniform
    marginals ``p, q``, the gradient of the GW loss at ``T`` is
    ``2 (Cx^2 p 1^T + 1 q^T (Cy^2)^T - 2 Cx T Cy^T)``, and each iteration is one Sinkhorn
    projection of that cost (POT's ``entropic_gromov_wasserstein`` with
    ``loss_fun='square_loss'`` and one epsilon solves the same problem; tested against it).
    The problem is not convex, so epsilon is annealed from coarse to sharp through
    ``epsilons`` (each for ``iterations`` steps, warm-started from the last plan), which
    steers away from poor stationary points of a small epsilon (Alvarez-Melis & Jaakkola 2018).
    """
    cx = F.normalize(x.double(), dim=1) @ F.normalize(x.double(), dim=1).T
    cy = F.normalize(y.double(), dim=1) @ F.normalize(y.double(), dim=1).T
    p = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=torch.float64, device=x.device)
    q = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=torch.float64, device=x.device)
    constant = (cx**2 @ p)[:, None] + (cy**2 @ q)[None, :]
    plan = p[:, None] * q[None, :]
    for epsilon in epsilons:
        for _ in range(iterations):
            cost = 2 * (constant - 2 * cx @ plan @ cy.T)
            plan = sinkhorn(cost, p, q, epsilon=epsilon, iterations=sinkhorn_iterations)
    return plan


@torch.no_grad()
def wasserstein_procrustes(
    x: Tensor, y: Tensor, w: Tensor, iterations: int = 10, epsilon: float = 0.05, sinkhorn_iterations: int = 100
) -> Tensor:
    """Alternate an entropic OT matching of ``x @ w`` to ``y`` and Procrustes on it (Grave et al. 2019).

    ``x [N, D]`` and ``y [M, D]``; each row of ``x`` is matched to the barycentre of its
    transported mass, ``N * P y``. Returns the refined ``w``.
    """
    xn, yn = F.normalize(x.double(), dim=1), F.normalize(y.double(), dim=1)
    w = w.double()
    for _ in range(iterations):
        plan = sinkhorn(-(xn @ w) @ yn.T, epsilon=epsilon, iterations=sinkhorn_iterations)
        w = orthogonal_procrustes(xn, x.shape[0] * plan @ yn)
    return w.to(x.dtype)
