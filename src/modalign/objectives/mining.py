"""Mining pseudo-pairs between two unimodal pools of embeddings: plain functions, without gradient.

``PseudoPairs`` (``modalign.objectives.pseudo_pairs``) calls one of these at its mining epochs:

* ``mine_mnn``: mutual nearest neighbours by CSLS (Conneau et al. 2018, "Word Translation Without
  Parallel Data", ICLR; ``modalign.alignment.mutual_neighbours``), kept above a cosine.
* ``mine_ot``: the mutual argmax entries of an entropic optimal-transport plan between the pools
  (Cuturi 2013, "Sinkhorn Distances"; ``modalign.alignment.sinkhorn``).
* ``mine_clusters``: cluster-level matching guided by the known pairs. Each pool is clustered
  (spherical k-means); a cluster of one pool is matched to one cluster of the other by an
  assignment (Hungarian, ``scipy.optimize.linear_sum_assignment``) on the centroids' cosine plus
  the votes of the anchors (the paired rows: where each pair's two sides fall); rows are then
  paired one-to-one inside each matched cluster pair by a second assignment on their cosine.
  Instance-level matching (``mnn``, ``ot``) can map a whole class of one modality onto a wrong
  class of the other when the embedding confuses them; matching clusters first, with a few
  known pairs voting, repairs such whole-class swaps (the cluster-then-match idea of
  cross-modal deep clustering, Alwassel et al. 2020, "Self-Supervised Learning by Cross-Modal
  Audio-Video Clustering" (XDC), NeurIPS; and of semi-supervised alignment from few anchors).
* ``mine_assignment``: the one-to-one matching of the pools maximising their summed cosine (the
  Hungarian algorithm), kept above a cosine; ``ncr_rematch`` re-pairs suspected-noisy pairs with it.
* ``neighbourhood_means`` (kNN consensus smoothing) and ``most_confident`` (a cap on the pairs).

Memory: ``mnn`` and ``neighbourhood_means`` work in row blocks; ``ot`` builds the dense
``N_a x N_b`` plan; ``clusters`` holds ``N x K`` for k-means and one ``n_c x m_c`` cosine
matrix per matched cluster pair (the within-cluster assignment is cubic in the cluster size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from modalign.alignment import kmeans, mutual_neighbours, sinkhorn
from modalign.alignment.kmeans import assign

# ---------------------------------------------------------------------------------------------
# Mining: plain functions on two pools of embeddings, without gradient.


@dataclass
class MinedPairs:
    """Index pairs between two pools, one-to-one, with a confidence each.

    Attributes:
        i: ``LongTensor[P]`` rows of the first pool, increasing.
        j: ``LongTensor[P]`` their partners in the second pool.
        confidence: ``Tensor[P]`` cosine (``mnn``) or row-normalised plan mass (``ot``).
    """

    i: Tensor
    j: Tensor
    confidence: Tensor

    @property
    def size(self) -> int:
        """Number of pairs ``P``."""
        return int(self.i.shape[0])

    def where(self, keep: Tensor) -> MinedPairs:
        """The pairs where ``keep`` (``BoolTensor[P]``) holds."""
        return MinedPairs(self.i[keep], self.j[keep], self.confidence[keep])


def _check_pools(a: Tensor, b: Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"pools must be [N, E] and [M, E] with one E, got {tuple(a.shape)} and {tuple(b.shape)}")


def _no_pairs(a: Tensor) -> MinedPairs:
    empty = torch.zeros(0, dtype=torch.long, device=a.device)
    return MinedPairs(empty, empty, a.new_zeros(0))


@torch.no_grad()
def mine_mnn(a: Tensor, b: Tensor, threshold: float = 0.5, csls_k: int | None = 10) -> MinedPairs:
    """Mutual nearest neighbours of two pools by CSLS (Conneau et al. 2018), kept above a cosine.

    Args:
        a: ``Tensor[N, E]`` first pool (compared by cosine).
        b: ``Tensor[M, E]`` second pool.
        threshold: Minimum cosine of a kept pair, in ``[-1, 1]``.
        csls_k: Neighbours of the CSLS hubness correction; ``None`` ranks by plain cosine.

    Returns:
        The mutual pairs whose cosine is at least ``threshold``; confidence = cosine.

    Raises:
        ValueError: If the pools are not ``[N, E]`` and ``[M, E]``.
    """
    _check_pools(a, b)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return _no_pairs(a)
    i, j = mutual_neighbours(a, b, csls_k)
    cosine = (F.normalize(a[i], dim=1) * F.normalize(b[j], dim=1)).sum(dim=1)
    pairs = MinedPairs(i, j, cosine)
    return pairs.where(cosine >= threshold)


@torch.no_grad()
def mine_ot(a: Tensor, b: Tensor, threshold: float = 0.5, epsilon: float = 0.02, iterations: int = 100) -> MinedPairs:
    """Pairs of an entropic OT plan (Cuturi 2013) between two pools, mutual argmax and confident.

    ``P = sinkhorn(1 - cos(a, b))`` with uniform marginals; ``(i, j)`` is kept when
    ``j = argmax_j P[i, :]``, ``i = argmax_i P[:, j]`` and ``P[i, j] / sum_j P[i, j] >= threshold``.
    The plan is computed in the dtype of the pools (``float64`` stays, else ``float32``).

    Args:
        a: ``Tensor[N, E]`` first pool.
        b: ``Tensor[M, E]`` second pool.
        threshold: Minimum row-normalised mass of a kept pair, in ``[0, 1]``.
        epsilon: Entropic regularisation, in units of the cost (``1 - cosine``, in ``[0, 2]``).
        iterations: Sinkhorn iterations.

    Returns:
        The kept pairs; confidence = row-normalised mass.

    Raises:
        ValueError: If the pools are not ``[N, E]`` and ``[M, E]``, or as ``sinkhorn``.
    """
    _check_pools(a, b)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return _no_pairs(a)
    cost = 1.0 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    plan = sinkhorn(cost, epsilon=epsilon, iterations=iterations)
    mass = plan / plan.sum(dim=1, keepdim=True)
    i = torch.arange(a.shape[0], device=a.device)
    j = plan.argmax(dim=1)
    pairs = MinedPairs(i, j, mass[i, j].to(a.dtype))
    return pairs.where((plan.argmax(dim=0)[j] == i) & (pairs.confidence >= threshold))


@torch.no_grad()
def mine_assignment(a: Tensor, b: Tensor, threshold: float = -1.0) -> MinedPairs:
    """The one-to-one matching of two pools maximising their summed cosine, kept above a cosine.

    A linear assignment (Hungarian; Kuhn 1955, ``scipy.optimize.linear_sum_assignment``) pairs
    ``min(N, M)`` rows; unlike ``mnn`` it pairs every row of the smaller pool, and the global
    one-to-one constraint resolves rows whose nearest neighbours collide (the zero-entropy limit
    of ``ot``). Memory and time: a dense ``N x M`` cosine matrix, cubic assignment.

    Args:
        a: ``Tensor[N, E]`` first pool (compared by cosine).
        b: ``Tensor[M, E]`` second pool.
        threshold: Minimum cosine of a kept pair, in ``[-1, 1]``.

    Returns:
        The assigned pairs whose cosine is at least ``threshold``, by increasing ``i``; confidence = cosine.

    Raises:
        ValueError: If the pools are not ``[N, E]`` and ``[M, E]``.
    """
    _check_pools(a, b)
    rows = torch.arange(a.shape[0], device=a.device)
    cols = torch.arange(b.shape[0], device=a.device)
    pairs = _assign_within(F.normalize(a, dim=1), F.normalize(b, dim=1), rows, cols)
    return pairs.where(pairs.confidence >= threshold)


@torch.no_grad()
def neighbourhood_means(x: Tensor, k: int, block: int = 1024) -> Tensor:
    """Each row replaced by the normalised mean of its ``k`` nearest rows (itself included), by cosine.

    A neighbourhood-consensus smoothing before cross-modal matching: where a pool has cluster
    structure, a row's neighbourhood mean sits near its cluster's centre, so matching the
    smoothed pools pairs rows whose *neighbourhoods* agree across modalities rather than single
    noisy points (the consensus idea of neighbourhood-based matching, e.g. Rocco et al. 2018,
    "Neighbourhood Consensus Networks"; here on the pools' kNN graphs).

    Args:
        x: ``Tensor[N, E]`` pool (compared by cosine).
        k: Neighbours averaged per row, ``>= 1`` (``1``: the normalised rows; capped at ``N``).
        block: Rows per similarity block: memory ``block x N``, never ``N x N``.

    Returns:
        ``Tensor[N, E]`` L2-normalised neighbourhood means.

    Raises:
        ValueError: If ``x`` is not ``[N, E]`` or ``k < 1``.
    """
    if x.dim() != 2:
        raise ValueError(f"neighbourhood_means expects [N, E], got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"neighbourhood_means needs k >= 1, got {k}")
    unit = F.normalize(x, dim=1)
    k = min(k, x.shape[0])
    if k <= 1 or x.shape[0] == 0:
        return unit
    means = []
    for start in range(0, x.shape[0], block):
        nearest = (unit[start : start + block] @ unit.T).topk(k, dim=1).indices
        means.append(unit[nearest].mean(dim=1))
    return F.normalize(torch.cat(means), dim=1)


def most_confident(pairs: MinedPairs, max_pairs: int | None) -> MinedPairs:
    """At most ``max_pairs`` pairs, the most confident (ties: lower ``i``), by increasing ``i``."""
    if max_pairs is None or pairs.size <= max_pairs:
        return pairs
    order = torch.sort(pairs.confidence, descending=True, stable=True).indices[:max_pairs]
    keep = torch.zeros(pairs.size, dtype=torch.bool, device=pairs.i.device)
    keep[order] = True
    return pairs.where(keep)


def anchor_votes(anchors_a: Tensor, anchors_b: Tensor, centroids_a: Tensor, centroids_b: Tensor) -> Tensor:
    """``Tensor[K_a, K_b]``: how many known pairs have their ``a`` side in cluster ``k`` and ``b`` side in ``l``.

    Args:
        anchors_a: ``Tensor[P, E]`` the ``a`` sides of the known pairs.
        anchors_b: ``Tensor[P, E]`` their ``b`` sides.
        centroids_a: ``Tensor[K_a, E]`` unit-norm centroids of the ``a`` pool.
        centroids_b: ``Tensor[K_b, E]`` unit-norm centroids of the ``b`` pool.
    """
    votes = centroids_a.new_zeros(centroids_a.shape[0], centroids_b.shape[0])
    if anchors_a.shape[0] == 0:
        return votes
    rows = assign(anchors_a.to(centroids_a), centroids_a, spherical=True)
    cols = assign(anchors_b.to(centroids_b), centroids_b, spherical=True)
    return votes.index_put_((rows, cols), torch.ones_like(rows, dtype=votes.dtype), accumulate=True)


def match_clusters(centroids_a: Tensor, centroids_b: Tensor, votes: Tensor, anchor_weight: float) -> Tensor:
    """``LongTensor[K_a]``: the ``b`` cluster matched to each ``a`` cluster (``-1``: unmatched).

    Maximises ``sum_k cos(c_a[k], c_b[m(k)]) + anchor_weight * votes[k, m(k)] / max(1, sum_l votes[k, l])``
    over one-to-one matchings (``linear_sum_assignment``): the vote term is the fraction of
    cluster ``k``'s anchors whose partner falls in ``m(k)``, so anchors outweigh the centroid
    geometry once ``anchor_weight`` exceeds the spread of the cosines.
    """
    score = centroids_a @ centroids_b.T
    share = votes / votes.sum(dim=1, keepdim=True).clamp_min(1.0)
    rows, cols = linear_sum_assignment((score + anchor_weight * share).double().cpu().numpy(), maximize=True)
    out = torch.full((centroids_a.shape[0],), -1, dtype=torch.long)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return out.to(centroids_a.device)


def _assign_within(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor) -> MinedPairs:
    """One-to-one pairs of ``a[rows]`` and ``b[cols]`` maximising their summed cosine."""
    if rows.numel() == 0 or cols.numel() == 0:
        return _no_pairs(a)
    cosine = a[rows] @ b[cols].T
    i, j = linear_sum_assignment(cosine.double().cpu().numpy(), maximize=True)
    i_t, j_t = torch.as_tensor(i, device=a.device), torch.as_tensor(j, device=a.device)
    return MinedPairs(rows[i_t], cols[j_t], cosine[i_t, j_t])


@torch.no_grad()
def mine_clusters(
    a: Tensor,
    b: Tensor,
    clusters: int,
    anchors_a: Tensor | None = None,
    anchors_b: Tensor | None = None,
    anchor_weight: float = 1.0,
    threshold: float = -1.0,
    seed: int = 0,
    iterations: int = 50,
) -> MinedPairs:
    """Pairs matched cluster to cluster, guided by known pairs, then row to row inside matched clusters.

    Both pools are clustered by spherical k-means into ``clusters`` clusters (capped at each
    pool's size); ``match_clusters`` pairs the clusters using ``anchor_votes`` of the anchors;
    inside each matched pair of clusters, rows are paired one-to-one by a maximum-cosine
    assignment (the larger cluster's surplus rows stay unpaired).

    Args:
        a: ``Tensor[N, E]`` first pool (compared by cosine).
        b: ``Tensor[M, E]`` second pool.
        clusters: Clusters per pool, ``>= 1``.
        anchors_a: ``Tensor[P, E]`` the ``a`` sides of known pairs, or ``None``.
        anchors_b: ``Tensor[P, E]`` their ``b`` sides.
        anchor_weight: Weight of the anchors' vote share against the centroids' cosine (>= 0).
        threshold: Minimum cosine of a kept pair, in ``[-1, 1]``.
        seed: Seed of the k-means++ draws (``b`` uses ``seed + 1``).
        iterations: k-means iterations.

    Returns:
        The kept pairs, sorted by ``i``; confidence = cosine.

    Raises:
        ValueError: If the pools or anchors do not fit, or ``clusters < 1``.
    """
    _check_pools(a, b)
    if clusters < 1:
        raise ValueError(f"mine_clusters needs clusters >= 1, got {clusters}")
    anchors_a, anchors_b = _anchors_or_none(a, anchors_a, anchors_b)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return _no_pairs(a)
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    ka = kmeans(a, min(clusters, a.shape[0]), iterations, seed=seed, spherical=True)
    kb = kmeans(b, min(clusters, b.shape[0]), iterations, seed=seed + 1, spherical=True)
    votes = anchor_votes(anchors_a, anchors_b, ka.centroids, kb.centroids)
    matched = match_clusters(ka.centroids, kb.centroids, votes, anchor_weight)
    pairs = _pairs_in_matched(a, b, ka.assignments, kb.assignments, matched)
    return pairs.where(pairs.confidence >= threshold)


def _anchors_or_none(pool: Tensor, anchors_a: Tensor | None, anchors_b: Tensor | None) -> tuple[Tensor, Tensor]:
    """The anchors (empty ``[0, E]`` when ``None``), checked to be ``[P, E]`` both."""
    empty = pool.new_zeros(0, pool.shape[1])
    anchors_a = empty if anchors_a is None else anchors_a
    anchors_b = empty if anchors_b is None else anchors_b
    if anchors_a.shape != anchors_b.shape or anchors_a.shape[1:] != pool.shape[1:]:
        shapes = f"{tuple(anchors_a.shape)} and {tuple(anchors_b.shape)}"
        raise ValueError(f"anchors must both be [P, {pool.shape[1]}], got {shapes}")
    return anchors_a, anchors_b


def _pairs_in_matched(a: Tensor, b: Tensor, labels_a: Tensor, labels_b: Tensor, matched: Tensor) -> MinedPairs:
    """One-to-one pairs inside every matched cluster pair ``(k, matched[k])``, sorted by ``i``."""
    parts = [
        _assign_within(a, b, (labels_a == k).nonzero().flatten(), (labels_b == m).nonzero().flatten())
        for k, m in enumerate(matched.tolist())
        if m >= 0
    ]
    if not parts:
        return _no_pairs(a)
    i, j, c = (torch.cat(x) for x in zip(*((p.i, p.j, p.confidence) for p in parts), strict=True))
    order = torch.argsort(i)
    return MinedPairs(i[order], j[order], c[order])
