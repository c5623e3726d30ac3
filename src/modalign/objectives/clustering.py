"""Clustering objectives: cross-modal swapped prediction of balanced cluster codes.

``swapped_prediction_loss`` is the loss of SwAV (Caron et al. 2020, "Unsupervised Learning of
Visual Features by Contrasting Cluster Assignments") applied across modalities as in SeLaVi
(Asano et al. 2020, "Labelling unlabelled videos from scratch with multi-modal
self-supervision"): each modality's prototype scores predict the Sinkhorn-balanced codes of the
other modality. The codes come from ``modalign.alignment.balanced_assignments``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from modalign.alignment import balanced_assignments
from modalign.distributed import all_gather_sizes, is_initialized, world_size


def swapped_prediction_loss(
    scores_a: Tensor,
    scores_b: Tensor,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    gather: bool = False,
) -> Tensor:
    """Cross-modal swapped prediction (SwAV's loss between two modalities; SeLaVi).

    Codes ``q_a = balanced_assignments(scores_a)`` and ``q_b = balanced_assignments(scores_b)``
    are targets without gradient; with ``p_m = softmax(scores_m / temperature)`` the loss is
    ``0.5 * (mean_i CE(q_b[i], p_a[i]) + mean_i CE(q_a[i], p_b[i]))`` where
    ``CE(q, p) = -sum_k q_k log p_k``: modality a predicts b's code and b predicts a's.

    With ``gather=True`` and an initialised process group, the codes are balanced over the
    global batch of every rank (see ``balanced_assignments``) and each rank returns
    ``world_size * sum_local / (2 N_total)``, so the mean over ranks (what DDP's gradient
    averaging optimises) is the loss of the global batch. The targets carry no gradient, so no
    gradient crosses ranks. Ranks may hold different numbers of rows, including none.

    Args:
        scores_a: ``Tensor[N, K]`` scores of modality a's samples against ``K`` prototypes
            (cosine similarities of normalised embeddings and normalised prototypes).
        scores_b: ``Tensor[N, K]`` scores of the paired samples of modality b.
        temperature: Softmax temperature of the predictions.
        epsilon: Entropic regularisation of the codes.
        iterations: Sinkhorn iterations of the codes.
        gather: Balance the codes over, and average the loss across, all ranks.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If the scores are not two ``[N, K]`` matrices of the same shape with
            ``K >= 1``, ``temperature <= 0``, or (without gathering) the batch is empty.
    """
    if scores_a.dim() != 2 or scores_a.shape != scores_b.shape or scores_a.shape[1] == 0:
        raise ValueError(
            "expected two score matrices of the same shape [N, K] with K >= 1, "
            f"got scores_a {tuple(scores_a.shape)} and scores_b {tuple(scores_b.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    distributed = gather and is_initialized()
    n_total = sum(all_gather_sizes(scores_a.shape[0], scores_a.device)) if distributed else scores_a.shape[0]
    if n_total == 0:
        if not distributed:
            raise ValueError("swapped_prediction_loss got an empty batch (scores have 0 rows)")
        return 0.0 * (scores_a.sum() + scores_b.sum())
    q_a = balanced_assignments(scores_a, epsilon, iterations, gather).to(scores_a.dtype)
    q_b = balanced_assignments(scores_b, epsilon, iterations, gather).to(scores_b.dtype)
    ce_ab = -(q_b * F.log_softmax(scores_a / temperature, dim=1)).sum()
    ce_ba = -(q_a * F.log_softmax(scores_b / temperature, dim=1)).sum()
    weight = world_size() if distributed else 1
    return (ce_ab + ce_ba) * (weight / (2.0 * n_total))
