"""Alignment solvers: optimal transport, assignments, clustering, space alignment and soft-DTW.

``sinkhorn`` (Cuturi 2013) returns a transport plan for any cost matrix;
``balanced_assignments`` is SwAV/SeLaVi's equipartition of samples over prototypes;
``kmeans``/``assign`` cluster embeddings (XDC pseudo-labels). These run without gradient and
take ``gather=True`` (where it applies) to solve over the batch or data of every rank.

``procrustes``: aligning two embedding spaces with an orthogonal map, from pairs
(``orthogonal_procrustes``), from few or none (``mutual_neighbours`` with CSLS,
``refine_procrustes``, ``gromov_wasserstein``, ``wasserstein_procrustes``), without gradient.
``dtw``: soft-DTW between sequences of different lengths, differentiable, with its expected
alignment (``soft_dtw_alignment``) and divergence.
"""

from modalign.alignment.dtw import pairwise_cost, soft_dtw, soft_dtw_alignment, soft_dtw_divergence
from modalign.alignment.kmeans import KMeansResult, assign, kmeans
from modalign.alignment.procrustes import (
    Alignment,
    gromov_wasserstein,
    mutual_neighbours,
    orthogonal_procrustes,
    refine_procrustes,
    wasserstein_procrustes,
)
from modalign.alignment.sinkhorn import balanced_assignments, sinkhorn

__all__ = [
    "Alignment",
    "KMeansResult",
    "assign",
    "balanced_assignments",
    "gromov_wasserstein",
    "kmeans",
    "mutual_neighbours",
    "orthogonal_procrustes",
    "pairwise_cost",
    "refine_procrustes",
    "sinkhorn",
    "soft_dtw",
    "soft_dtw_alignment",
    "soft_dtw_divergence",
    "wasserstein_procrustes",
]
