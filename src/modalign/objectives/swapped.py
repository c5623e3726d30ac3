"""Swapped prediction of Sinkhorn-balanced codes on shared prototypes: SwAV across modalities and views.

* ``swapped_prediction_loss``: SwAV's loss (Caron et al. 2020, "Unsupervised Learning of Visual
  Features by Contrasting Cluster Assignments") between two modalities, as in SeLaVi (Asano et
  al. 2020, "Labelling unlabelled videos from scratch with multi-modal self-supervision").
* ``pooled_swapped_prediction_loss``: the same over a mix-paired batch, paired rows predicting
  their partner's code and views of unimodal samples their other views' codes.

The ``selavi`` objective (``modalign.objectives.clustering``) holds the prototypes.
"""

from __future__ import annotations

import torch
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


def pooled_swapped_prediction_loss(
    scores: tuple[Tensor, Tensor],
    positives: tuple[Tensor, Tensor, Tensor],
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
) -> Tensor:
    """Swapped prediction over the paired rows *and* the unimodal views of a mix-paired batch.

    SwAV (Caron et al. 2020) predicts the code of one augmented view from another view of the
    same image; SeLaVi (Asano et al. 2020) predicts one modality's code from the other
    modality's. With a small paired set and large unimodal pools both apply in one batch with
    one set of shared prototypes: a paired row predicts its partner's code (across modalities),
    a view of a unimodal sample predicts the codes of its other views (within its modality). The
    pools are thus clustered on the prototypes the pairs tie across modalities, which is what
    carries a few pairs' alignment over to every unpaired sample of a cluster.

    Codes ``q_a = balanced_assignments(scores_a)`` and ``q_b`` are balanced over *all* rows of
    each modality (paired and unimodal) and carry no gradient. A row ``i`` of modality a with
    positives ``P(i)`` (rows of a in ``positives[0][i]``, rows of b in ``positives[2][i]``)
    has the target ``t_i = mean_{p in P(i)} q[p]`` and the loss
    ``CE(t_i, softmax(scores_a[i] / temperature))``; rows of b likewise with ``positives[1]``
    and the transpose of ``positives[2]``. The loss is the mean over the rows of both
    modalities with at least one positive. With ``positives = (no views, no views, identity)``
    it equals ``swapped_prediction_loss(scores_a, scores_b)``.

    Args:
        scores: ``(Tensor[Na, K], Tensor[Nb, K])`` scores of each modality's observed rows
            against the ``K`` shared prototypes.
        positives: ``(BoolTensor[Na, Na], BoolTensor[Nb, Nb], BoolTensor[Na, Nb])``: views
            within a (diagonal ignored), views within b, and pairs (row of a, row of b).
        temperature: Softmax temperature of the predictions.
        epsilon: Entropic regularisation of the codes.
        iterations: Sinkhorn iterations of the codes.

    Returns:
        Scalar loss tensor; a zero connected to both score matrices when no row has a positive.

    Raises:
        ValueError: If the shapes disagree or ``temperature <= 0``.
    """
    _check_pooled(scores, positives, temperature)
    scores_a, scores_b = scores
    views_a, views_b, pairs = positives
    na, nb = scores_a.shape[0], scores_b.shape[0]
    zero = 0.0 * (scores_a.sum() + scores_b.sum())
    if na == 0 or nb == 0:
        return zero
    q_a = balanced_assignments(scores_a, epsilon, iterations).to(scores_a.dtype)
    q_b = balanced_assignments(scores_b, epsilon, iterations).to(scores_b.dtype)
    total_a, anchors_a = _predict_positives(scores_a, torch.cat([q_a, q_b]), views_a, pairs, temperature)
    total_b, anchors_b = _predict_positives(scores_b, torch.cat([q_b, q_a]), views_b, pairs.T, temperature)
    anchors = anchors_a + anchors_b
    return (total_a + total_b) / anchors if anchors else zero


def _predict_positives(
    own: Tensor, codes: Tensor, views: Tensor, cross: Tensor, temperature: float
) -> tuple[Tensor, int]:
    """Summed CE of one modality's rows against their positives' mean code, and the number of such rows.

    Args:
        own: ``Tensor[N, K]`` scores of this modality's rows.
        codes: ``Tensor[N + M, K]`` codes of this modality's rows, then of the other's.
        views: ``BoolTensor[N, N]`` views within the modality (diagonal ignored).
        cross: ``BoolTensor[N, M]`` partners in the other modality.
        temperature: Softmax temperature of the predictions.
    """
    eye = torch.eye(own.shape[0], dtype=torch.bool, device=own.device)
    weights = torch.cat([views.to(own.device) & ~eye, cross.to(own.device)], dim=1).to(own.dtype)
    count = weights.sum(dim=1)
    keep = count > 0
    if not bool(keep.any()):
        return 0.0 * own.sum(), 0
    targets = weights[keep] @ codes / count[keep, None]
    return -(targets * F.log_softmax(own[keep] / temperature, dim=1)).sum(), int(keep.sum())


def _check_pooled(scores: tuple[Tensor, Tensor], positives: tuple[Tensor, Tensor, Tensor], temperature: float) -> None:
    """Raise ``ValueError`` unless the input shapes agree and ``temperature > 0``."""
    (scores_a, scores_b), (views_a, views_b, pairs) = scores, positives
    na, nb = scores_a.shape[0], scores_b.shape[0]
    if scores_a.dim() != 2 or scores_b.dim() != 2 or scores_a.shape[1] != scores_b.shape[1] or scores_a.shape[1] == 0:
        raise ValueError(
            "expected score matrices [Na, K] and [Nb, K] with K >= 1, "
            f"got {tuple(scores_a.shape)} and {tuple(scores_b.shape)}"
        )
    if views_a.shape != (na, na) or views_b.shape != (nb, nb) or pairs.shape != (na, nb):
        raise ValueError(
            f"positives must be [{na}, {na}], [{nb}, {nb}] and [{na}, {nb}], got "
            f"{tuple(views_a.shape)}, {tuple(views_b.shape)} and {tuple(pairs.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
