"""Cross-modal retrieval metrics: Recall@K, median/mean rank, class-match precision@1 and mAP.

Similarity is cosine: both sides are L2-normalised here, so raw or normalised embeddings give the
same result. **Memory** grows with ``chunk_size x M`` (plus the ``[N, E]`` and ``[M, E]`` inputs),
never with ``N x M``: every function walks the queries in chunks of ``chunk_size`` rows and only
ever holds the ``[chunk, M]`` similarity block of the current chunk.

Recall@K as in the image-text retrieval literature (e.g. Karpathy & Fei-Fei 2015; Radford et al.
2021, "Learning Transferable Visual Models From Natural Language Supervision").
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from modalign.eval.embed import (
    EvalInputError,
    check_chunk_size,
    check_matrix,
    check_vector,
    chunk_slices,
    l2_normalise,
)

#: The K of the reported Recall@K values.
RECALL_KS: tuple[int, ...] = (1, 5, 10)


def similarity_chunks(query: Tensor, gallery: Tensor, chunk_size: int) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(rows, sims)`` with ``sims = cos(query[rows], gallery)`` of shape ``[chunk, M]``.

    Args:
        query: ``Tensor[N, E]`` float32.
        gallery: ``Tensor[M, E]`` float32 (moved to the query's device).
        chunk_size: Rows of ``query`` per block.
    """
    g = l2_normalise(gallery.to(query.device))
    for rows in chunk_slices(query.shape[0], chunk_size):
        yield rows, l2_normalise(query[rows]) @ g.T


def first_positive_ranks(
    query: Tensor,
    gallery: Tensor,
    query_ids: Tensor | None = None,
    gallery_ids: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """1-based rank of the best-ranked positive gallery item of every query.

    Positives are ``gallery[i]`` for ``query[i]`` when no ids are given (``N == M``), otherwise
    the gallery items with the query's id. **Ties are counted pessimistically**: every negative
    whose similarity equals the best positive's is ranked before it, so a constant embedder gets
    the worst rank, never a perfect one.

    Args:
        query: ``Tensor[N, E]``.
        gallery: ``Tensor[M, E]``.
        query_ids: ``LongTensor[N]`` or ``None`` (then ``gallery_ids`` must be ``None`` too).
        gallery_ids: ``LongTensor[M]`` or ``None``.
        chunk_size: Queries per similarity block; memory is ``O(chunk_size x M)``.

    Returns:
        ``LongTensor[N]`` ranks in ``[1, M]`` on the CPU.

    Raises:
        EvalInputError: On mismatched shapes, only one of the id vectors given, or a query
            without any positive in the gallery.
    """
    query = check_matrix("query", query)
    gallery = check_matrix("gallery", gallery, dim=query.shape[1])
    chunk_size = check_chunk_size(chunk_size)
    n, m = query.shape[0], gallery.shape[0]
    if (query_ids is None) != (gallery_ids is None):
        raise EvalInputError("query_ids and gallery_ids must be given together")
    if query_ids is None or gallery_ids is None:
        if n != m:
            raise EvalInputError(f"query has {n} rows but gallery has {m}; pass ids for unequal sizes")
        qids = torch.arange(n, device=query.device)
        gids = qids
    else:
        qids = check_vector("query_ids", query_ids, n).to(query.device)
        gids = check_vector("gallery_ids", gallery_ids, m).to(query.device)
    ranks = torch.empty(n, dtype=torch.long)
    for rows, sims in similarity_chunks(query, gallery, chunk_size):
        positive = qids[rows, None] == gids[None, :]
        has_positive = positive.any(dim=1)
        if not bool(has_positive.all()):
            bad = rows.start + int((~has_positive).nonzero()[0])
            raise EvalInputError(f"query row {bad} (id {int(qids[bad])}) has no positive in the gallery")
        best = sims.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        ranks[rows] = (1 + ((sims >= best) & ~positive).sum(dim=1)).cpu()
    return ranks


def retrieval_metrics(
    query: Tensor,
    gallery: Tensor,
    query_ids: Tensor | None = None,
    gallery_ids: Tensor | None = None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Instance retrieval: Recall@{1,5,10}, median and mean rank of the first positive.

    Query ``i``'s positive is ``gallery[i]`` (``N == M``) unless ids are given, in which case the
    positives are the gallery items with the same id. Ranks are 1-based, ties pessimistic (see
    ``first_positive_ranks``). ``median_rank`` is ``numpy.median`` (mean of the two middle ranks
    for even ``N``).

    Args:
        query: ``Tensor[N, E]`` query embeddings.
        gallery: ``Tensor[M, E]`` gallery embeddings.
        query_ids: Optional ``LongTensor[N]`` ids of the queries.
        gallery_ids: Optional ``LongTensor[M]`` ids of the gallery items.
        chunk_size: Queries per similarity block; memory is ``O(chunk_size x M)``.

    Returns:
        ``{"R@1", "R@5", "R@10", "median_rank", "mean_rank"}`` as Python floats; ``R@K`` is the
        fraction of queries whose best-ranked positive has rank ``<= K``.

    Raises:
        EvalInputError: See ``first_positive_ranks``.
    """
    ranks = first_positive_ranks(query, gallery, query_ids, gallery_ids, chunk_size).numpy()
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in RECALL_KS}
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(np.mean(ranks))
    return out


def _average_precision_rows(sims: Tensor, relevant: Tensor) -> Tensor:
    """Average precision of each row's ranking, with tied scores grouped (as scikit-learn does).

    For each relevant item ``j`` with score ``s_j`` the precision is
    ``#relevant(score >= s_j) / #items(score >= s_j)``; AP is its mean over the relevant items.
    This equals ``sklearn.metrics.average_precision_score`` per row, ties included.

    Args:
        sims: ``Tensor[C, M]`` scores.
        relevant: ``BoolTensor[C, M]``; every row has at least one ``True``.

    Returns:
        ``Tensor[C]`` float64 average precisions.
    """
    scores, order = sims.sort(dim=1, descending=True)
    rel = relevant.gather(1, order)
    m = scores.shape[1]
    positions = torch.arange(m, device=sims.device).expand_as(scores)
    last_of_tie = torch.ones_like(rel)
    last_of_tie[:, :-1] = scores[:, :-1] != scores[:, 1:]
    group_end = torch.where(last_of_tie, positions, torch.full_like(positions, m))
    group_end = group_end.flip(1).cummin(dim=1).values.flip(1)
    true_pos = rel.double().cumsum(dim=1).gather(1, group_end)
    precision = true_pos / (group_end + 1).double()
    return (precision * rel).sum(dim=1) / rel.sum(dim=1)


def class_match_metrics(
    query: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Category-level retrieval: precision@1 and mean average precision (relevance = same label).

    ``p@1`` is the fraction of queries whose nearest gallery item shares their label, with ties
    pessimistic (a query scores only if some relevant item is strictly more similar than every
    irrelevant one). ``mAP`` is the mean over queries of the average precision of the full
    ranking, tied scores grouped exactly as ``sklearn.metrics.average_precision_score``. Queries
    whose label never occurs in the gallery have no defined AP and are left out of both metrics.
    Labels are arbitrary integers; callers drop unknown (``-1``) labels themselves.

    Args:
        query: ``Tensor[N, E]``.
        gallery: ``Tensor[M, E]``.
        query_labels: ``LongTensor[N]``.
        gallery_labels: ``LongTensor[M]``.
        chunk_size: Queries per block; each block sorts a ``[chunk, M]`` matrix, so memory is
            ``O(chunk_size x M)``.

    Returns:
        ``{"p@1": float, "mAP": float}``.

    Raises:
        EvalInputError: On mismatched shapes or when no query has a relevant gallery item.
    """
    query = check_matrix("query", query)
    gallery = check_matrix("gallery", gallery, dim=query.shape[1])
    chunk_size = check_chunk_size(chunk_size)
    qlab = check_vector("query_labels", query_labels, query.shape[0]).to(query.device)
    glab = check_vector("gallery_labels", gallery_labels, gallery.shape[0]).to(query.device)
    hits, ap_sum, counted = 0, 0.0, 0
    for rows, sims in similarity_chunks(query, gallery, chunk_size):
        relevant = qlab[rows, None] == glab[None, :]
        keep = relevant.any(dim=1)
        if not bool(keep.any()):
            continue
        sims, relevant = sims[keep], relevant[keep]
        best_rel = sims.masked_fill(~relevant, float("-inf")).amax(dim=1)
        best_irr = sims.masked_fill(relevant, float("-inf")).amax(dim=1)
        hits += int((best_rel > best_irr).sum())
        ap_sum += float(_average_precision_rows(sims, relevant).sum())
        counted += int(keep.sum())
    if counted == 0:
        raise EvalInputError("class_match_metrics: no query label occurs among the gallery labels")
    return {"p@1": hits / counted, "mAP": ap_sum / counted}
