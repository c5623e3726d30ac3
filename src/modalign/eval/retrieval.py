"""Cross-modal retrieval metrics: Recall@K, median/mean rank, class-match precision@1 and mAP.

Similarity is cosine: both sides are L2-normalised here, so raw or normalised embeddings give the
same result. **Memory** is flat in the gallery size: queries are walked in chunks of
``chunk_size`` rows and the gallery in chunks of ``gallery_chunk_size`` rows
(``modalign.eval.blocks``), and only one ``[chunk_size, gallery_chunk_size]`` block is held at a
time; between blocks each query keeps a running maximum and counts, never a row of ``M`` scores.

* Ranks: the rank of the best positive is ``1 +`` the number of negatives scoring at least as
  high, so queries and gallery are visited sorted by id; a query chunk's positives then lie in
  one contiguous gallery range, scanned first for the best positive score, after which every
  block only counts negatives at or above it.
* Class match: queries are grouped by label; a chunk of one label holds its relevant scores
  (``[chunk, R]``, the chunk shrunk so that ``chunk x R <= chunk_size x gallery_chunk_size``),
  sorted, and each irrelevant block adds a histogram of where its scores fall among them. That
  gives every relevant item's tied precision exactly, so mAP equals scikit-learn's.

Recall@K as in the image-text retrieval literature (e.g. Karpathy & Fei-Fei 2015; Radford et al.
2021, "Learning Transferable Visual Models From Natural Language Supervision").
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from modalign.eval.blocks import GALLERY_CHUNK_SIZE, RowBlocks
from modalign.eval.embed import (
    EvalInputError,
    check_chunk_size,
    check_matrix,
    check_vector,
    chunk_slices,
)

#: The K of the reported Recall@K values.
RECALL_KS: tuple[int, ...] = (1, 5, 10)


def _check_pairs(
    query: Tensor, gallery: Tensor, query_ids: Tensor | None, gallery_ids: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validated ``(query [N, E], gallery [M, E], query ids [N], gallery ids [M])`` on one device."""
    query = check_matrix("query", query)
    gallery = check_matrix("gallery", gallery, dim=query.shape[1]).to(query.device)
    n, m = query.shape[0], gallery.shape[0]
    if (query_ids is None) != (gallery_ids is None):
        raise EvalInputError("query_ids and gallery_ids must be given together")
    if query_ids is None or gallery_ids is None:
        if n != m:
            raise EvalInputError(f"query has {n} rows but gallery has {m}; pass ids for unequal sizes")
        ids = torch.arange(n, device=query.device)
        return query, gallery, ids, ids
    qids = check_vector("query_ids", query_ids, n).to(query.device)
    return query, gallery, qids, check_vector("gallery_ids", gallery_ids, m).to(query.device)


def _count_above_best(q: Tensor, qid: Tensor, gallery: RowBlocks, gid: Tensor, span: tuple[int, int]) -> Tensor:
    """Negatives scoring at least as high as each query's best positive.

    Args:
        q: ``Tensor[C, E]`` normalised queries.
        qid: ``LongTensor[C]`` their ids.
        gallery: Gallery blocks in id order.
        gid: ``LongTensor[M]`` gallery ids in that order.
        span: ``(start, stop)`` positions holding every positive of these queries.

    Returns:
        ``LongTensor[C]`` counts.
    """
    best = torch.full((q.shape[0], 1), float("-inf"), device=q.device)
    for cols, sims in gallery.scores(q, *span):
        sims = sims.masked_fill(qid[:, None] != gid[None, cols], float("-inf"))
        best = torch.maximum(best, sims.amax(dim=1, keepdim=True))
    count = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    for cols, sims in gallery.scores(q, *span):  # recomputed: same blocks, same bits as ``best``
        count += ((sims >= best) & (qid[:, None] != gid[None, cols])).sum(dim=1)
    for start, stop in ((0, span[0]), (span[1], len(gallery))):
        for _, sims in gallery.scores(q, start, stop):
            # A float sum of 0/1 is exact below 2^24 columns and twice as fast as a bool sum.
            count += (sims >= best).float().sum(dim=1).long()
    return count


def first_positive_ranks(
    query: Tensor,
    gallery: Tensor,
    query_ids: Tensor | None = None,
    gallery_ids: Tensor | None = None,
    chunk_size: int = 1024,
    gallery_chunk_size: int = GALLERY_CHUNK_SIZE,
) -> Tensor:
    """1-based rank of the best-ranked positive gallery item of every query.

    Positives are ``gallery[i]`` for ``query[i]`` when no ids are given (``N == M``), otherwise
    the gallery items with the query's id. **Ties are counted pessimistically**: every negative
    whose similarity equals the best positive's is ranked before it, so a constant embedder gets
    the worst rank, never a perfect one. The rank is ``1 +`` the number of negatives at or above
    the best positive, counted block by block (see the module docstring).

    Args:
        query: ``Tensor[N, E]``.
        gallery: ``Tensor[M, E]``.
        query_ids: ``LongTensor[N]`` or ``None`` (then ``gallery_ids`` must be ``None`` too).
        gallery_ids: ``LongTensor[M]`` or ``None``.
        chunk_size: Queries per block.
        gallery_chunk_size: Gallery rows per block; memory is
            ``O(chunk_size x gallery_chunk_size)`` besides the inputs.

    Returns:
        ``LongTensor[N]`` ranks in ``[1, M]`` on the CPU.

    Raises:
        EvalInputError: On mismatched shapes, only one of the id vectors given, or a query
            without any positive in the gallery.
    """
    query, gallery, qids, gids = _check_pairs(query, gallery, query_ids, gallery_ids)
    chunk_size = check_chunk_size(chunk_size)
    gid, gorder = gids.sort(stable=True)
    qid, qorder = qids.sort(stable=True)
    lo = torch.searchsorted(gid, qid)
    hi = torch.searchsorted(gid, qid, right=True)
    missing = torch.zeros_like(qids, dtype=torch.bool).index_fill_(0, qorder[hi == lo], True)
    if bool(missing.any()):
        bad = int(missing.nonzero()[0])
        raise EvalInputError(f"query row {bad} (id {int(qids[bad])}) has no positive in the gallery")
    queries = RowBlocks(query, chunk_size, qorder)
    blocks = RowBlocks(gallery, gallery_chunk_size, gorder)
    ranks = torch.empty(query.shape[0], dtype=torch.long)
    for rows, q in queries.blocks():
        span = (int(lo[rows.start]), int(hi[rows.stop - 1]))  # ids sorted: one contiguous range
        ranks[qorder[rows].cpu()] = 1 + _count_above_best(q, qid[rows], blocks, gid, span).cpu()
    return ranks


def retrieval_metrics(
    query: Tensor,
    gallery: Tensor,
    query_ids: Tensor | None = None,
    gallery_ids: Tensor | None = None,
    chunk_size: int = 1024,
    gallery_chunk_size: int = GALLERY_CHUNK_SIZE,
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
        chunk_size: Queries per block.
        gallery_chunk_size: Gallery rows per block; memory is
            ``O(chunk_size x gallery_chunk_size)`` besides the inputs.

    Returns:
        ``{"R@1", "R@5", "R@10", "median_rank", "mean_rank"}`` as Python floats; ``R@K`` is the
        fraction of queries whose best-ranked positive has rank ``<= K``.

    Raises:
        EvalInputError: See ``first_positive_ranks``.
    """
    ranks = first_positive_ranks(query, gallery, query_ids, gallery_ids, chunk_size, gallery_chunk_size).numpy()
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in RECALL_KS}
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(np.mean(ranks))
    return out


def _class_chunk(q: Tensor, gallery: RowBlocks, span: tuple[int, int]) -> tuple[int, float]:
    """Pessimistic p@1 hits and summed average precision of queries sharing one label.

    Args:
        q: ``Tensor[C, E]`` normalised queries of one label.
        gallery: Gallery blocks in label order.
        span: ``(start, stop)`` positions of the ``R`` gallery items with that label.

    Returns:
        ``(hits, sum of the C average precisions)``.
    """
    rel = torch.cat([sims for _, sims in gallery.scores(q, *span)], dim=1).sort(dim=1).values  # [C, R] ascending
    c, r = rel.shape
    best_irr = torch.full((c,), float("-inf"), device=q.device)
    # hist[i, p]: irrelevant items of query i with exactly p relevant scores <= theirs.
    hist = torch.zeros(c, r + 1, dtype=torch.long, device=q.device)
    offsets = torch.arange(c, device=q.device)[:, None] * (r + 1)
    for start, stop in ((0, span[0]), (span[1], len(gallery))):
        for _, sims in gallery.scores(q, start, stop):
            best_irr = torch.maximum(best_irr, sims.amax(dim=1))
            where = torch.searchsorted(rel, sims, right=True).add_(offsets).view(-1)
            hist.view(-1).index_add_(0, where, torch.ones(1, dtype=torch.long, device=q.device).expand_as(where))
    # Relevant item j (ascending): irrelevant at or above it = those with p > j; relevant at or
    # above it = r minus the relevant strictly below (ties grouped, as scikit-learn does).
    irr_above = hist.sum(dim=1, keepdim=True) - hist.cumsum(dim=1)[:, :r]
    rel_above = r - torch.searchsorted(rel, rel)
    precision = rel_above.double() / (rel_above + irr_above).double()
    hits = int((rel[:, -1] > best_irr).sum())
    return hits, float(precision.mean(dim=1).sum())


def class_match_metrics(
    query: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    chunk_size: int = 1024,
    gallery_chunk_size: int = GALLERY_CHUNK_SIZE,
) -> dict[str, float]:
    """Category-level retrieval: precision@1 and mean average precision (relevance = same label).

    ``p@1`` is the fraction of queries whose nearest gallery item shares their label, with ties
    pessimistic (a query scores only if some relevant item is strictly more similar than every
    irrelevant one). ``mAP`` is the mean over queries of the average precision of the full
    ranking, tied scores grouped exactly as ``sklearn.metrics.average_precision_score``: for each
    relevant item ``j``, ``#relevant(score >= s_j) / #items(score >= s_j)``, averaged over the
    relevant items. Queries whose label never occurs in the gallery have no defined AP and are
    left out of both metrics. Labels are arbitrary integers; callers drop unknown (``-1``)
    labels themselves.

    Args:
        query: ``Tensor[N, E]``.
        gallery: ``Tensor[M, E]``.
        query_labels: ``LongTensor[N]``.
        gallery_labels: ``LongTensor[M]``.
        chunk_size: Queries per block (fewer for a label with more than ``gallery_chunk_size``
            gallery items, whose sorted relevant scores ``[chunk, R]`` are held).
        gallery_chunk_size: Gallery rows per block; memory is
            ``O(chunk_size x gallery_chunk_size)`` besides the inputs. Time is
            ``O(N x M x (E + log R))``.

    Returns:
        ``{"p@1": float, "mAP": float}``.

    Raises:
        EvalInputError: On mismatched shapes or when no query has a relevant gallery item.
    """
    query = check_matrix("query", query)
    gallery = check_matrix("gallery", gallery, dim=query.shape[1]).to(query.device)
    chunk_size = check_chunk_size(chunk_size)
    budget = chunk_size * check_chunk_size(gallery_chunk_size)
    qlab, qorder = check_vector("query_labels", query_labels, query.shape[0]).to(query.device).sort(stable=True)
    glab, gorder = check_vector("gallery_labels", gallery_labels, gallery.shape[0]).to(query.device).sort(stable=True)
    queries = RowBlocks(query, chunk_size, qorder)
    blocks = RowBlocks(gallery, gallery_chunk_size, gorder)
    labels, sizes = torch.unique_consecutive(qlab, return_counts=True)
    hits, ap_sum, counted, first = 0, 0.0, 0, 0
    for label, size in zip(labels.tolist(), sizes.tolist(), strict=True):
        group = torch.tensor([label], device=query.device)
        span = (int(torch.searchsorted(glab, group)), int(torch.searchsorted(glab, group, right=True)))
        if span[1] > span[0]:
            step = max(1, min(chunk_size, budget // (span[1] - span[0])))
            for pos in chunk_slices(size, step):
                h, ap = _class_chunk(queries.rows(first + pos.start, first + pos.stop), blocks, span)
                hits, ap_sum, counted = hits + h, ap_sum + ap, counted + pos.stop - pos.start
        first += size
    if counted == 0:
        raise EvalInputError("class_match_metrics: no query label occurs among the gallery labels")
    return {"p@1": hits / counted, "mAP": ap_sum / counted}
