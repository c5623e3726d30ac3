"""k-means in torch: seeded k-means++ initialisation, chunked Lloyd iterations, sharded data.

Lloyd's algorithm (Lloyd 1982) started from k-means++ (Arthur & Vassilvitskii 2007,
"k-means++: The Advantages of Careful Seeding"), used for XDC-style pseudo-labels (Alwassel et
al. 2020, "Self-Supervised Learning by Cross-Modal Audio-Video Clustering"). The iteration
follows scikit-learn's ``KMeans(algorithm="lloyd")`` step for step (data centred on its mean,
empty clusters re-seeded at the points farthest from their centroid, convergence when the
assignments stop changing or the squared centroid shift is at most ``tol`` times the mean
feature variance), so the two agree given the same initial centroids.

Distances are computed ``chunk_size`` rows at a time: memory grows with ``chunk_size x k`` and
``chunk_size x D``, never ``N x k x D`` or ``N x N``. With ``gather=True`` under a process group
every rank holds a shard of the data; sums, counts, and the draws of k-means++ go through
collectives so that all ranks hold the centroids of single-process k-means on the concatenated
data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.alignment._comm import all_reduce_, broadcast_, distributed_enabled
from modalign.distributed import all_gather_no_grad, all_gather_sizes, rank, world_size


@dataclass(frozen=True)
class KMeansResult:
    """Output of ``kmeans``.

    Attributes:
        centroids: ``Tensor[k, D]`` cluster centres (unit-norm when spherical), identical on
            every rank when gathering.
        assignments: ``LongTensor[N]`` cluster of each local row.
        inertia: Sum over all rows (of every rank when gathering) of the squared distance to
            the assigned centroid; spherical: ``||x / |x| - c||^2 = 2 - 2 cos``.
        iterations: Number of centroid updates run (scikit-learn's ``n_iter_``).
    """

    centroids: Tensor
    assignments: Tensor
    inertia: float
    iterations: int


@dataclass
class _Points:
    """A rank's rows, read ``chunk_size`` at a time in the solver's coordinates.

    Rows are cast to ``dtype`` and either L2-normalised (``spherical``) or moved by ``-shift``
    (the data mean, for precise distances far from the origin).
    """

    x: Tensor
    shift: Tensor
    spherical: bool
    chunk_size: int
    dtype: torch.dtype

    def prepare(self, rows: Tensor) -> Tensor:
        """``Tensor[n, D]``: ``rows`` in solver coordinates."""
        rows = rows.to(self.dtype)
        return F.normalize(rows, dim=1) if self.spherical else rows - self.shift

    def chunks(self) -> Iterator[tuple[slice, Tensor]]:
        """Yield ``(rows, prepared chunk)`` over all local rows."""
        for start in range(0, self.x.shape[0], self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            yield rows, self.prepare(self.x[rows])

    def zeros(self, *shape: int) -> Tensor:
        """A zero tensor of the solver's dtype and device."""
        return torch.zeros(shape, dtype=self.dtype, device=self.x.device)


def _nearest(points: _Points, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every local row and the exact squared distance to it.

    Args:
        points: Local rows.
        centroids: ``Tensor[k, D]`` in solver coordinates.

    Returns:
        ``(LongTensor[n], Tensor[n])``; ties go to the lowest cluster index.
    """
    n = points.x.shape[0]
    labels = torch.empty(n, dtype=torch.long, device=points.x.device)
    sqdist = points.zeros(n)
    c_norm = (centroids * centroids).sum(dim=1)
    for rows, xc in points.chunks():
        best = (c_norm[None, :] - 2.0 * xc @ centroids.T).argmin(dim=1)
        labels[rows] = best
        sqdist[rows] = ((xc - centroids[best]) ** 2).sum(dim=1)
    return labels, sqdist


def _farthest(points: _Points, labels: Tensor, sqdist: Tensor, m: int, distributed: bool) -> tuple[Tensor, ...]:
    """The ``m`` rows (of all ranks) farthest from their centroid, farthest first.

    Ties go to the lower global row index (rank order, then local order).

    Returns:
        ``(sqdist [m'], rows [m', D] in solver coordinates, labels [m'])`` with ``m' <= m``.
    """
    local = torch.sort(sqdist, descending=True, stable=True).indices[: min(m, sqdist.shape[0])]
    cand: tuple[Tensor, ...] = (sqdist[local], points.prepare(points.x[local]), labels[local])
    if distributed:
        sizes = all_gather_sizes(local.shape[0], sqdist.device)
        cand = tuple(all_gather_no_grad(t, sizes) for t in cand)
    order = torch.sort(cand[0], descending=True, stable=True).indices[:m]
    return tuple(t[order] for t in cand)


def _relocate(points: _Points, labels: Tensor, sqdist: Tensor, sums: Tensor, counts: Tensor, distributed: bool) -> None:
    """Re-seed empty clusters at the farthest rows, in place on ``sums`` / ``counts``.

    As scikit-learn's ``_relocate_empty_clusters_dense``: the ``j``-th empty cluster (by
    index) takes the ``j``-th farthest row, which leaves its old cluster; nothing happens when
    every row sits on its centroid (more clusters than distinct rows).
    """
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return
    far_d, far_x, far_label = _farthest(points, labels, sqdist, len(empty), distributed)
    if far_d.numel() == 0 or float(far_d[0]) == 0.0:
        return
    for j, cluster in enumerate(empty[: far_d.shape[0]]):
        old = int(far_label[j])
        sums[old] -= far_x[j]
        counts[old] -= 1
        sums[cluster] = far_x[j]
        counts[cluster] = 1


def _update(points: _Points, labels: Tensor, sqdist: Tensor, centroids: Tensor, distributed: bool) -> Tensor:
    """New centroids: the mean of each cluster's rows over all ranks (spherical: re-normalised).

    Empty clusters are re-seeded (``_relocate``); a cluster still empty keeps its centroid.
    """
    k, d = centroids.shape
    sums = points.zeros(k, d)
    counts = torch.zeros(k, dtype=torch.float64, device=centroids.device)
    for rows, xc in points.chunks():
        sums.index_add_(0, labels[rows], xc)
        counts.index_add_(0, labels[rows], torch.ones_like(labels[rows], dtype=torch.float64))
    all_reduce_(sums, distributed)
    all_reduce_(counts, distributed)
    _relocate(points, labels, sqdist, sums, counts, distributed)
    new = sums / counts.clamp_min(1.0).to(sums.dtype)[:, None]
    if points.spherical:
        new = F.normalize(new, dim=1)
    return torch.where((counts > 0)[:, None], new, centroids)


def _draw(points: _Points, weights: Tensor, u: float, distributed: bool) -> Tensor:
    """One row of all ranks drawn with probability proportional to ``weights`` (``[n]``, >= 0).

    ``u`` in ``[0, 1)`` is the same on every rank; the owner rank picks its row by inverse CDF
    and broadcasts it. Zero total weight falls back to a uniform draw.

    Returns:
        ``Tensor[D]`` the drawn row in solver coordinates.
    """
    cum = weights.to(torch.float64).cumsum(0)
    local = cum[-1:] if cum.numel() else cum.new_zeros(1)
    totals = all_gather_no_grad(local, [1] * world_size()) if distributed else local
    if float(totals.sum()) <= 0.0:
        return _draw(points, torch.ones_like(weights), u, distributed)
    target = u * float(totals.sum())
    ends = totals.cumsum(0)
    after = torch.nonzero(ends > target).flatten()
    owner = int(after[0]) if after.numel() else int(torch.nonzero(totals > 0).flatten()[-1])
    row = points.zeros(points.x.shape[1])
    if owner == (rank() if distributed else 0):
        residual = torch.tensor([target - float(ends[owner] - totals[owner])], dtype=torch.float64, device=cum.device)
        i = int(torch.searchsorted(cum, residual, right=True).clamp_max(cum.shape[0] - 1))
        row = points.prepare(points.x[i : i + 1])[0]
    return broadcast_(row.contiguous(), owner, distributed)


def _kmeans_plus_plus(points: _Points, k: int, seed: int, distributed: bool) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) over the rows of every rank.

    The first centre is uniform, each next one drawn with probability proportional to the
    squared distance to the nearest centre so far; the uniforms come from a CPU
    ``torch.Generator`` seeded with ``seed`` (deterministic, identical on every rank).

    Returns:
        ``Tensor[k, D]`` initial centroids in solver coordinates.
    """
    gen = torch.Generator().manual_seed(seed)
    centroids = points.zeros(k, points.x.shape[1])
    nearest = torch.ones(points.x.shape[0], dtype=points.dtype, device=points.x.device)
    for j in range(k):
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        centroids[j] = _draw(points, nearest, u, distributed)
        dist_j = points.zeros(points.x.shape[0])
        for rows, xc in points.chunks():
            dist_j[rows] = ((xc - centroids[j]) ** 2).sum(dim=1)
        nearest = dist_j if j == 0 else torch.minimum(nearest, dist_j)
    return centroids


def _mean_variance(points: _Points, n_total: int, distributed: bool) -> float:
    """Mean over features of the population variance of all ranks' rows (solver coordinates)."""
    d = points.x.shape[1]
    moments = points.zeros(2, d)
    for _, xc in points.chunks():
        moments[0] += xc.sum(dim=0)
        moments[1] += (xc * xc).sum(dim=0)
    all_reduce_(moments, distributed)
    mean = moments[0] / n_total
    return float((moments[1] / n_total - mean * mean).clamp_min(0.0).mean())


def _lloyd(
    points: _Points, centroids: Tensor, iterations: int, tol: float, distributed: bool
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Lloyd iterations as scikit-learn's ``_kmeans_single_lloyd``.

    Stops when the assignments repeat (strict convergence) or the total squared centroid shift
    is at most ``tol``; otherwise the rows are re-assigned to the final centroids.

    Returns:
        ``(centroids [k, D], labels [n], squared distances [n], updates run)``.
    """
    previous: Tensor | None = None
    for it in range(iterations):
        labels, sqdist = _nearest(points, centroids)
        new = _update(points, labels, sqdist, centroids, distributed)
        shift = float(((new - centroids) ** 2).sum())
        centroids = new
        if previous is not None:
            changed = all_reduce_((labels != previous).sum().to(torch.float64), distributed)
            if float(changed) == 0.0:
                return centroids, labels, sqdist, it + 1
        if shift <= tol:
            iterations = it + 1
            break
        previous = labels
    labels, sqdist = _nearest(points, centroids)
    return centroids, labels, sqdist, iterations


def _check(x: Tensor, k: int, iterations: int, chunk_size: int, tol: float, init: Tensor | None) -> None:
    """Validate the arguments of ``kmeans`` that every rank sees alike.

    Raises:
        ValueError: Naming the argument and shape that do not fit.
    """
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"x must be [N, D] with D >= 1, got shape {tuple(x.shape)}")
    if k < 1 or iterations < 0 or chunk_size < 1 or tol < 0:
        raise ValueError(
            f"need k >= 1, iterations >= 0, chunk_size >= 1, tol >= 0; got k={k}, "
            f"iterations={iterations}, chunk_size={chunk_size}, tol={tol}"
        )
    if init is not None and tuple(init.shape) != (k, x.shape[1]):
        raise ValueError(f"init must be [k, D] = [{k}, {x.shape[1]}], got shape {tuple(init.shape)}")


def _prepare_points(x: Tensor, spherical: bool, chunk_size: int, distributed: bool) -> tuple[_Points, int]:
    """Wrap the local rows, with the global data mean as shift; also return ``N_total``."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n_total = sum(all_gather_sizes(x.shape[0], x.device)) if distributed else x.shape[0]
    shift = torch.zeros(x.shape[1], dtype=dtype, device=x.device)
    if not spherical and n_total > 0:
        shift = all_reduce_(x.detach().sum(dim=0, dtype=dtype), distributed) / n_total
    return _Points(x.detach(), shift, spherical, chunk_size, dtype), n_total


def kmeans(
    x: Tensor,
    k: int,
    iterations: int = 50,
    seed: int = 0,
    spherical: bool = False,
    chunk_size: int = 4096,
    init: Tensor | None = None,
    tol: float = 1e-6,
    gather: bool = False,
) -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding (Lloyd 1982; Arthur & Vassilvitskii 2007).

    Each iteration assigns every row to its nearest centroid and moves each centroid to the
    mean of its rows; an empty cluster is re-seeded at the row farthest from its centroid. Stops
    after ``iterations`` updates, when the assignments repeat, or when the summed squared
    centroid shift is at most ``tol`` times the mean feature variance. No gradient.

    ``spherical=True`` is cosine k-means for embeddings: rows are L2-normalised, assigned by
    cosine similarity, and centroids re-normalised after every update.

    With ``gather=True`` and an initialised process group each rank passes its shard of the
    data: centroid sums and counts are all-reduced, k-means++ draws its rows from all ranks
    (same seed on every rank, the drawn row broadcast by its owner), and an explicit ``init``
    is taken from rank 0. Every rank then holds the centroids of single-process k-means on the
    concatenated data (up to summation order) and the assignments of its own rows.

    Args:
        x: ``Tensor[N, D]`` data (float; computed in ``float64`` if ``x`` is, else ``float32``).
        k: Number of clusters, at most the number of rows (over all ranks when gathering).
        iterations: Maximum number of centroid updates (``0``: assign to the initial centroids).
        seed: Seed of the k-means++ draws.
        spherical: Cosine k-means on L2-normalised rows.
        chunk_size: Rows per distance computation.
        init: ``Tensor[k, D]`` initial centroids instead of k-means++.
        tol: Relative tolerance on the centroid shift (``0``: until assignments repeat).
        gather: Cluster the data of all ranks together.

    Returns:
        ``KMeansResult`` with centroids in the coordinates (and float dtype) of ``x``.

    Raises:
        ValueError: If ``x`` is not ``[N, D]``, ``init`` is not ``[k, D]``, an argument is out
            of range, or there are fewer rows than clusters.
    """
    _check(x, k, iterations, chunk_size, tol, init)
    distributed = distributed_enabled(gather)
    points, n_total = _prepare_points(x, spherical, chunk_size, distributed)
    if n_total < k:
        raise ValueError(f"kmeans needs at least k={k} rows, got {n_total} (x has shape {tuple(x.shape)})")
    if init is not None:
        start = broadcast_(init.detach().to(dtype=points.dtype, device=x.device).clone(), 0, distributed)
        start = F.normalize(start, dim=1) if spherical else start - points.shift
    else:
        start = _kmeans_plus_plus(points, k, seed, distributed)
    tol_abs = tol * _mean_variance(points, n_total, distributed) if tol > 0 else 0.0
    centroids, labels, sqdist, done = _lloyd(points, start, iterations, tol_abs, distributed)
    inertia = float(all_reduce_(sqdist.sum().to(torch.float64), distributed))
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    return KMeansResult((centroids + points.shift).to(out_dtype), labels, inertia, done)


def assign(x: Tensor, centroids: Tensor, spherical: bool = False, chunk_size: int = 4096) -> Tensor:
    """Index of the nearest centroid of every row (Euclidean, or cosine when ``spherical``).

    Args:
        x: ``Tensor[N, D]`` rows.
        centroids: ``Tensor[k, D]`` centroids (e.g. ``KMeansResult.centroids``).
        spherical: Compare L2-normalised rows and centroids by cosine similarity.
        chunk_size: Rows per distance computation (memory ``chunk_size x k``).

    Returns:
        ``LongTensor[N]``; ties go to the lowest index.

    Raises:
        ValueError: If the shapes are not ``[N, D]`` and ``[k, D]`` with ``k >= 1``, or
            ``chunk_size < 1``.
    """
    if x.dim() != 2 or centroids.dim() != 2 or centroids.shape[0] == 0 or x.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"expected x [N, D] and centroids [k, D] with k >= 1, got {tuple(x.shape)} and {tuple(centroids.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = torch.float64 if torch.float64 in (x.dtype, centroids.dtype) else torch.float32
    c = centroids.detach().to(dtype=dtype, device=x.device)
    shift = torch.zeros_like(c[0]) if spherical else c.mean(dim=0)
    points = _Points(x.detach(), shift, spherical, chunk_size, dtype)
    return _nearest(points, F.normalize(c, dim=1) if spherical else c - shift)[0]
