"""Similarity in ``[query chunk, gallery chunk]`` blocks: the memory model of ``modalign.eval``.

Every search over a gallery walks the queries in chunks of ``chunk_size`` rows and, for each
chunk, the gallery in chunks of ``gallery_chunk_size`` rows, holding one
``[chunk_size, gallery_chunk_size]`` similarity block (and a few masks of that shape) at a time.
Nothing of size ``N x M`` or ``chunk x M`` is ever allocated, so memory is flat in the gallery
size; what a metric keeps between blocks is ``O(chunk_size x k)`` (running top-k, running
maxima and counts).

Rows are L2-normalised block by block (the same formula as ``l2_normalise`` of the whole matrix,
so the same bits), and the gallery may be visited in a permuted order (``RowBlocks``
with ``order``) without copying it: each block gathers its rows.

**Ties stay ties.** Ranks count negatives *at or above* the positive, so two identical gallery
rows must score bit-identically against a query wherever they fall. BLAS kernels sum in an order
that can depend on the matrix shape (tiny or ragged last blocks take other code paths), so every
similarity block of one query chunk is computed with the same shape: gallery blocks are padded
with zero rows to a fixed width of at least ``MIN_BLOCK_WIDTH`` and the padding columns dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from modalign.eval.embed import EvalInputError, check_chunk_size, check_matrix, chunk_slices, l2_normalise

#: Default gallery rows per similarity block; a float32 block of 1024 queries is then 16 MiB.
GALLERY_CHUNK_SIZE = 4096
#: Smallest padded block width: narrower products take shape-specific BLAS paths (see above).
MIN_BLOCK_WIDTH = 64
#: Largest block width: counts are float32 sums of 0/1, exact below 2^24.
MAX_BLOCK_WIDTH = 1 << 24


class RowBlocks:
    """L2-normalised row blocks of a matrix (queries, gallery), optionally in a permuted order.

    Args:
        gallery: ``Tensor[M, E]`` float32.
        size: Rows per block.
        order: Optional ``LongTensor[M]`` permutation; position ``p`` of the visiting order is
            gallery row ``order[p]``. ``None`` (or the identity) visits rows in place, as views.
    """

    def __init__(self, gallery: Tensor, size: int, order: Tensor | None = None) -> None:
        self.gallery = gallery
        self.size = min(check_chunk_size(size), MAX_BLOCK_WIDTH)
        self.width = max(MIN_BLOCK_WIDTH, min(self.size, len(self)))
        identity = order is None or bool((order == torch.arange(len(order), device=order.device)).all())
        self.order = None if identity else order

    def __len__(self) -> int:
        return int(self.gallery.shape[0])

    def rows(self, start: int, stop: int) -> Tensor:
        """``Tensor[stop - start, E]``: normalised rows at positions ``[start, stop)`` of the order."""
        if self.order is None:
            return l2_normalise(self.gallery[start:stop])
        return l2_normalise(self.gallery.index_select(0, self.order[start:stop]))

    def blocks(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[slice, Tensor]]:
        """Yield ``(positions, rows)`` covering ``[start, stop)`` in blocks of at most ``size``."""
        stop = len(self) if stop is None else stop
        for pos in chunk_slices(stop - start, self.size):
            cols = slice(start + pos.start, start + pos.stop)
            yield cols, self.rows(cols.start, cols.stop)

    def scores(self, q: Tensor, start: int = 0, stop: int | None = None) -> Iterator[tuple[slice, Tensor]]:
        """Yield ``(positions, q @ rows.T)`` over ``[start, stop)``, every product of one shape.

        Args:
            q: ``Tensor[C, E]`` normalised queries.
            start: First position of the visiting order.
            stop: End position (default: the end).

        Yields:
            ``(positions, Tensor[C, len(positions)])`` cosine similarities: a ``[C, width]``
            product, with the columns of the zero padding cut off.
        """
        for cols, rows in self.blocks(start, stop):
            n = cols.stop - cols.start
            if n == self.width:
                yield cols, q @ rows.T
            else:
                padded = torch.cat([rows, rows.new_zeros(self.width - n, rows.shape[1])])
                yield cols, (q @ padded.T)[:, :n].contiguous()


def _block_topk(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``sims`` (``Tensor[C, B]``), ties to smaller columns.

    Returns:
        ``(values Tensor[C, k], columns LongTensor[C, k])`` ordered by value descending, then
        column ascending.
    """
    values, cols = sims.topk(k, dim=1)
    kth = values[:, -1:]
    ambiguous = (sims >= kth).sum(dim=1) > k  # ties at the k-th value: topk's pick is arbitrary
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        sub, kth_sub = sims[rows], kth[rows]
        equal = sub == kth_sub
        need = k - (sub > kth_sub).sum(dim=1, keepdim=True)
        keep = (sub > kth_sub) | (equal & (equal.cumsum(dim=1) <= need))
        cols[rows] = keep.nonzero()[:, 1].view(-1, k)  # row-major: k kept columns per row, ascending
    cols = cols.sort(dim=1).values
    values = sims.gather(1, cols)
    values, order = values.sort(dim=1, descending=True, stable=True)
    return values, cols.gather(1, order)


def _merge_topk(best: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Merge two ``(values [C, k'], indices [C, k'])`` lists; ``best`` holds the smaller indices."""
    values = torch.cat([best[0], new[0]], dim=1)
    indices = torch.cat([best[1], new[1]], dim=1)
    values, order = values.sort(dim=1, descending=True, stable=True)
    return values[:, :k], indices.gather(1, order[:, :k])


def topk_neighbours(
    query: Tensor,
    gallery: Tensor,
    k: int,
    chunk_size: int = 1024,
    gallery_chunk_size: int = GALLERY_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """The ``k`` most cosine-similar gallery rows of every query, by a running top-k over blocks.

    Exact and deterministic: equal similarities are ordered by gallery index (the smaller index
    first), so the result does not depend on the chunk sizes. Memory is
    ``O(chunk_size x (gallery_chunk_size + k))``.

    Args:
        query: ``Tensor[N, E]``.
        gallery: ``Tensor[M, E]``.
        k: Neighbours per query, clipped to ``M``.
        chunk_size: Query rows per block.
        gallery_chunk_size: Gallery rows per block.

    Returns:
        ``(similarities Tensor[N, k] float32, indices LongTensor[N, k])`` on the query's device,
        each row by similarity descending, then index ascending.

    Raises:
        EvalInputError: On mismatched shapes or ``k < 1``.
    """
    query = check_matrix("query", query)
    gallery = check_matrix("gallery", gallery, dim=query.shape[1]).to(query.device)
    if int(k) != k or k < 1:
        raise EvalInputError(f"k: must be a positive integer, got {k!r}")
    k = min(int(k), gallery.shape[0])
    blocks = RowBlocks(gallery, gallery_chunk_size)
    sims_out = torch.empty(query.shape[0], k, device=query.device)
    idx_out = torch.empty(query.shape[0], k, dtype=torch.long, device=query.device)
    for rows, q in RowBlocks(query, check_chunk_size(chunk_size)).blocks():
        best: tuple[Tensor, Tensor] | None = None
        for cols, sims in blocks.scores(q):
            values, idx = _block_topk(sims, min(k, cols.stop - cols.start))
            new = (values, idx + cols.start)
            best = new if best is None else _merge_topk(best, new, k)
        assert best is not None
        sims_out[rows], idx_out[rows] = best
    return sims_out, idx_out
