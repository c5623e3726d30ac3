"""Non-differentiable solvers: entropic optimal transport (Sinkhorn), balanced assignments, k-means.

``sinkhorn`` (Cuturi 2013) returns a transport plan for any cost matrix;
``balanced_assignments`` is SwAV/SeLaVi's equipartition of samples over prototypes;
``kmeans``/``assign`` cluster embeddings (XDC pseudo-labels). All run without gradient and
take ``gather=True`` (where it applies) to solve over the batch or data of every rank.
"""

from modalign.alignment.kmeans import KMeansResult, assign, kmeans
from modalign.alignment.sinkhorn import balanced_assignments, sinkhorn

__all__ = ["KMeansResult", "assign", "balanced_assignments", "kmeans", "sinkhorn"]
