"""Clustering quality against an evaluation label: k-means, NMI and ARI.

* k-means (Lloyd 1982, "Least squares quantization in PCM") with k-means++ seeding (Arthur &
  Vassilvitskii 2007) on the L2-normalised embeddings, ``k`` = number of distinct labels; the
  protocol of clustering-based self-supervised learning, e.g. DeepCluster (Caron et al. 2018)
  and SeLa (Asano et al. 2020).
* NMI, normalised mutual information with the arithmetic-mean normaliser (Strehl & Ghosh 2002,
  ``sklearn.metrics.normalized_mutual_info_score``).
* ARI, adjusted Rand index (Hubert & Arabie 1985, ``sklearn.metrics.adjusted_rand_score``).

Both scores are 1 for a clustering equal to the labels up to renaming the cluster ids, and
(in expectation) 0 for ARI and near 0 for NMI for random assignments. Unknown labels (``-1``,
any negative value) are left out.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import Tensor

from modalign.eval.embed import EvalInputError, check_matrix, check_vector, l2_normalise

#: k-means restarts (the best inertia is kept).
KMEANS_N_INIT = 10


def cluster_scores(assignments: Tensor, labels: Tensor) -> dict[str, float]:
    """NMI and ARI of a clustering against class labels (rows with a negative label left out).

    A clustering method can score its own assignments with this (e.g. Sinkhorn codes' argmax).
    Cluster ids are arbitrary integers: only which rows share an id matters.

    Args:
        assignments: ``LongTensor[N]`` cluster id of each row.
        labels: ``LongTensor[N]`` class of each row, negative where unknown.

    Returns:
        ``{"nmi": float, "ari": float}`` over the rows whose label is known.

    Raises:
        EvalInputError: If the shapes disagree, a tensor is not integer, or no row has a
            known label.
    """
    if not isinstance(assignments, Tensor) or assignments.ndim != 1:
        shape = tuple(assignments.shape) if isinstance(assignments, Tensor) else type(assignments).__name__
        raise EvalInputError(f"assignments: expected a LongTensor[N], got {shape}")
    n = int(assignments.shape[0])
    a = check_vector("assignments", assignments, n).cpu()
    y = check_vector("labels", labels, n).cpu()
    known = y >= 0
    if not bool(known.any()):
        raise EvalInputError(f"labels: none of the {n} rows has a known (non-negative) label")
    pred, true = a[known].numpy(), y[known].numpy()
    return {"nmi": float(normalized_mutual_info_score(true, pred)), "ari": float(adjusted_rand_score(true, pred))}


def kmeans_assignments(emb: Tensor, k: int, seed: int = 0, n_init: int = KMEANS_N_INIT) -> Tensor:
    """Cluster the L2-normalised rows of ``emb`` into ``k`` groups with k-means.

    Deterministic for a given ``seed`` (``KMeans(random_state=seed)``, float64 inputs).

    Args:
        emb: ``Tensor[N, E]`` embeddings.
        k: Number of clusters, ``1 <= k <= N``.
        seed: ``random_state`` of the k-means++ seeding.
        n_init: Restarts; the run with the lowest inertia is kept.

    Returns:
        ``LongTensor[N]`` cluster id in ``[0, k)`` of each row (on the CPU).

    Raises:
        EvalInputError: If ``emb`` is not a non-empty finite matrix, or ``k`` is outside
            ``[1, N]`` or ``n_init < 1``.
    """
    emb = check_matrix("emb", emb)
    if not 1 <= k <= emb.shape[0]:
        raise EvalInputError(f"k: must lie in [1, {emb.shape[0]}] (the number of rows), got {k}")
    if n_init < 1:
        raise EvalInputError(f"n_init: must be >= 1, got {n_init}")
    x = l2_normalise(emb).cpu().numpy().astype(np.float64)
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    return torch.from_numpy(np.asarray(km.labels_, dtype=np.int64))


def kmeans_scores(emb: Tensor, labels: Tensor, seed: int = 0, n_init: int = KMEANS_N_INIT) -> dict[str, float]:
    """NMI and ARI of k-means on ``emb`` with ``k`` = number of distinct known labels.

    Rows with a negative (unknown) label are dropped before clustering.

    Args:
        emb: ``Tensor[N, E]`` embeddings.
        labels: ``LongTensor[N]`` classes, negative where unknown.
        seed: ``random_state`` of k-means.
        n_init: k-means restarts.

    Returns:
        ``{"nmi": float, "ari": float}``.

    Raises:
        EvalInputError: If shapes disagree or no row has a known label.
    """
    emb = check_matrix("emb", emb)
    labels = check_vector("labels", labels, emb.shape[0]).to(emb.device)
    known = labels >= 0
    if not bool(known.any()):
        raise EvalInputError(f"labels: none of the {emb.shape[0]} rows has a known (non-negative) label")
    y = labels[known]
    k = int(torch.unique(y).numel())
    return cluster_scores(kmeans_assignments(emb[known], k, seed=seed, n_init=n_init), y)
