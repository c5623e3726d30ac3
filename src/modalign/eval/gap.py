"""Geometry of a shared embedding space: modality gap, alignment and uniformity.

* Modality gap: Liang et al. 2022, "Mind the Gap: Understanding the Modality Gap in Multi-modal
  Contrastive Representation Learning".
* Alignment and uniformity: Wang & Isola 2020, "Understanding Contrastive Representation
  Learning through Alignment and Uniformity on the Hypersphere".
"""

from __future__ import annotations

import torch
from torch import Tensor

from modalign.eval.embed import EvalInputError, check_matrix, l2_normalise

#: Rows used by ``alignment_uniformity``; the pairwise term is quadratic in it, so it is capped.
MAX_UNIFORMITY_ROWS = 2048


def modality_gap(a: Tensor, b: Tensor) -> float:
    """L2 distance between the centroids of two sets of L2-normalised embeddings.

    ``||mean(a / |a|) - mean(b / |b|)||``, the gap vector norm of Liang et al. 2022. The sets need
    not be paired (``N`` and ``M`` may differ). Identical sets give 0; two antipodal point
    clusters give 2, the maximum.

    Args:
        a: ``Tensor[N, E]`` embeddings of one modality.
        b: ``Tensor[M, E]`` embeddings of another modality.

    Returns:
        The gap, in ``[0, 2]``.

    Raises:
        EvalInputError: If the widths differ or a set is empty.
    """
    a = check_matrix("a", a)
    b = check_matrix("b", b, dim=a.shape[1]).to(a.device)
    gap = l2_normalise(a).double().mean(dim=0) - l2_normalise(b).double().mean(dim=0)
    return float(gap.norm())


def _uniformity(x: Tensor, t: float) -> float:
    """``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` over distinct pairs of rows of ``x``."""
    sq = torch.pdist(x).pow(2)
    return float(torch.logsumexp(-t * sq, dim=0) - torch.log(torch.tensor(float(sq.numel()), dtype=sq.dtype)))


def alignment_uniformity(
    a: Tensor,
    b: Tensor,
    alpha: float = 2.0,
    t: float = 2.0,
    max_rows: int = MAX_UNIFORMITY_ROWS,
    seed: int = 0,
) -> dict[str, float]:
    """Alignment and uniformity of paired, L2-normalised embeddings (Wang & Isola 2020).

    ``alignment = mean_i ||a_i - b_i||^alpha`` (lower is better aligned) and
    ``uniformity = (U(a) + U(b)) / 2`` with ``U(x) = log mean_{i<j} exp(-t ||x_i - x_j||^2)`` (lower
    is more uniform), averaged over both modalities as in the paper's reference loss. When
    ``N > max_rows`` a seeded random subset of ``max_rows`` pairs is used, so the pairwise term
    costs at most ``max_rows^2`` memory.

    Args:
        a: ``Tensor[N, E]``; row ``i`` is paired with ``b[i]``.
        b: ``Tensor[N, E]``.
        alpha: Exponent of the alignment distance.
        t: Temperature of the uniformity kernel.
        max_rows: Cap on the rows used.
        seed: Seed of the subsample.

    Returns:
        ``{"alignment": float, "uniformity": float}``.

    Raises:
        EvalInputError: If shapes differ or there are fewer than two rows.
    """
    a = check_matrix("a", a)
    b = check_matrix("b", b, dim=a.shape[1]).to(a.device)
    if a.shape[0] != b.shape[0]:
        raise EvalInputError(f"a has {a.shape[0]} rows but b has {b.shape[0]}; rows must be paired")
    if a.shape[0] < 2:
        raise EvalInputError("alignment_uniformity: needs at least two paired rows")
    if max_rows < 2:
        raise EvalInputError(f"max_rows: must be at least 2, got {max_rows}")
    if a.shape[0] > max_rows:
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(a.shape[0], generator=gen)[:max_rows].to(a.device)
        a, b = a[keep], b[keep]
    a, b = l2_normalise(a).double(), l2_normalise(b).double()
    alignment = float((a - b).norm(dim=1).pow(alpha).mean())
    return {"alignment": alignment, "uniformity": (_uniformity(a, t) + _uniformity(b, t)) / 2}
