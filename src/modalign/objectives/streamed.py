"""Streamed (linear-memory) InfoNCE and sigmoid losses.

The plain ``infonce_loss`` and ``sigmoid_loss`` build the ``N x M`` logits of a batch against
its gallery; their memory grows with the square of the batch. The functions here compute the
same losses over ``chunk x chunk`` blocks of the similarity matrix and never hold more than a
few blocks, so memory grows with ``N x chunk`` (plus the ``[N, E]`` gradients):

* InfoNCE (van den Oord et al. 2018; CLIP, Radford et al. 2021): the forward pass keeps an
  online log-sum-exp of every row (and, for the symmetric loss, every column) over the blocks;
  the backward pass recomputes each block and forms ``d loss / d logits = softmax - target``
  from the saved log-sum-exps, then multiplies it into the embedding gradients. This is the
  tiling of Inf-CL (Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size
  Scaling for Contrastive Loss"). Without gathering, one block ``a_I @ b_J.T`` serves both
  directions (rows a -> b, columns b -> a), so a step costs four block matmuls where the plain
  loss costs six.
* Sigmoid (SigLIP, Zhai et al. 2023): every pair is an independent term, so the gradients are
  final as soon as a block is scored; the forward pass accumulates them and the backward pass
  only scales them (three block matmuls, like the plain loss, with far fewer passes over
  ``N x N`` memory).

Pairs that hold the same content are found per block by comparing the blocks' ids, never as an
``N x M`` boolean matrix. The public entry points stay ``infonce_loss`` and ``sigmoid_loss``
(``chunk_size`` selects the path); the functions below take the rows of one rank and its
gallery (``contrastive.Gallery``'s fields), so gathering works unchanged: gradients for the
gallery flow back through ``all_gather_with_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK = 1024
"""Block size of the automatic streamed path: large matmuls, ``4 MiB`` fp32 blocks."""

PLAIN_MAX_ROWS = 256
"""Galleries up to this many rows use the plain ``N x M`` path when ``chunk_size`` is ``None``."""


def resolve_chunk(chunk_size: int | None, total: int) -> int | None:
    """Block size of the streamed path, or ``None`` for the plain ``N x M`` path.

    Args:
        chunk_size: ``None``: automatic (plain up to ``PLAIN_MAX_ROWS`` gallery rows, else
            streamed in blocks of ``DEFAULT_CHUNK``); ``0``: plain; ``> 0``: streamed in blocks
            of that many rows.
        total: Number of gallery rows ``M``.

    Raises:
        ValueError: If ``chunk_size`` is negative.
    """
    if chunk_size is None:
        return DEFAULT_CHUNK if total > PLAIN_MAX_ROWS else None
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be None, 0 (plain) or a positive block size, got {chunk_size}")
    return chunk_size or None


@dataclass
class PairIds:
    """Content ids of the query rows and of the gallery rows, and where the targets lie.

    Query row ``i`` targets gallery row ``offset + i``. Pairs ``(i, j)`` hold the same content
    when ``q[i] == g[j]`` or ``qb[i] == gb[j]`` (an absent side never matches).

    Attributes:
        q: ``LongTensor[N]`` ids of the query rows' ``a`` side, or ``None``.
        g: ``LongTensor[M]`` ids of the gallery rows' ``a`` side, or ``None``.
        qb: ``LongTensor[N]`` ids of the query rows' ``b`` side, or ``None``.
        gb: ``LongTensor[M]`` ids of the gallery rows' ``b`` side, or ``None``.
        offset: Gallery index of query row 0.
    """

    q: Tensor | None
    g: Tensor | None
    qb: Tensor | None
    gb: Tensor | None
    offset: int

    def diagonal(self, rows: slice, cols: slice, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """Block-local indices of the target pairs in block ``(rows, cols)``, or ``None``."""
        start = max(rows.start + self.offset, cols.start)
        stop = min(rows.stop + self.offset, cols.stop)
        if stop <= start:
            return None
        idx = torch.arange(start, stop, device=device)
        return idx - self.offset - rows.start, idx - cols.start

    def same(self, rows: slice, cols: slice, device: torch.device, targets: bool) -> tuple[Tensor, Tensor] | None:
        """Block-local indices of the same-content pairs in block ``(rows, cols)``, or ``None``.

        Args:
            rows: Query rows of the block.
            cols: Gallery rows of the block.
            device: Device of the indices.
            targets: Include the target pairs (they always hold the same content) or leave
                them out.
        """
        mask = None
        if self.q is not None and self.g is not None:
            mask = self.q[rows, None] == self.g[None, cols]
        if self.qb is not None and self.gb is not None:
            same_b = self.qb[rows, None] == self.gb[None, cols]
            mask = same_b if mask is None else mask | same_b
        diag = self.diagonal(rows, cols, device)
        if mask is None:
            return diag if targets else None
        if diag is not None:
            mask[diag] = targets
        found = mask.nonzero(as_tuple=True)
        return (found[0], found[1]) if found[0].numel() else None


def _blocks(n: int, m: int, chunk: int) -> list[tuple[slice, slice]]:
    """Row and column slices of the ``chunk x chunk`` blocks of an ``n x m`` matrix."""
    return [
        (slice(r, min(r + chunk, n)), slice(c, min(c + chunk, m)))
        for r in range(0, n, chunk)
        for c in range(0, m, chunk)
    ]


@dataclass
class _NCESpec:
    """What ``_StreamedInfoNCE`` computes (the non-tensor arguments)."""

    ids: PairIds
    both: bool
    multi_positive: bool
    chunk: int


class _StreamedInfoNCE(torch.autograd.Function):
    """Summed InfoNCE cross-entropies of ``q`` against gallery ``k``, streamed over blocks.

    ``logits = exp(logit_scale) * q @ k.T``. Rows are queries (a -> b); with ``spec.both``
    (``q`` and ``k`` the whole batch, offset 0) the columns are queries too (b -> a).
    Same-content pairs are left out of the softmax, or with ``multi_positive`` are positives.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, logit_scale: Tensor, spec: _NCESpec) -> Tensor:
        """Return the summed cross-entropies; save the rows' and columns' log-sum-exps."""
        scale = logit_scale.reshape(()).exp()
        qs = q * scale
        n, m = q.shape[0], k.shape[0]
        lse_r = q.new_full((n,), float("-inf"))
        lse_c = k.new_full((m,), float("-inf")) if spec.both else None
        pos = _Positives(n, m, q) if spec.multi_positive else None
        for rows, cols in _blocks(n, m, spec.chunk):
            s = _nce_block(qs, k, rows, cols, spec, pos)
            torch.logaddexp(lse_r[rows], s.logsumexp(1), out=lse_r[rows])
            if lse_c is not None:
                torch.logaddexp(lse_c[cols], s.logsumexp(0), out=lse_c[cols])
        if pos is not None:
            loss = (lse_r - pos.sum_r / pos.cnt_r).sum()
            if lse_c is not None:
                loss = loss + (lse_c - pos.sum_c / pos.cnt_c).sum()
        else:
            target = (qs * k[spec.ids.offset : spec.ids.offset + n]).sum()
            loss = lse_r.sum() - target
            if lse_c is not None:
                loss = loss + lse_c.sum() - target
        ctx.save_for_backward(q, k, logit_scale, lse_r, lse_c if lse_c is not None else lse_r)
        ctx.spec, ctx.pos = spec, pos
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        """Recompute each block; ``d loss / d logits = softmax - target`` from the log-sum-exps."""
        q, k, logit_scale, lse_r, lse_c = ctx.saved_tensors
        spec: _NCESpec = ctx.spec
        scale = logit_scale.reshape(()).exp()
        qs = q * scale
        gq, gk = torch.zeros_like(q), torch.zeros_like(k)
        for rows, cols in _blocks(q.shape[0], k.shape[0], spec.chunk):
            s = _nce_block(qs, k, rows, cols, spec, None)
            p = torch.sub(s, lse_r[rows, None]).exp_()
            if spec.both:
                p.add_(s.sub_(lse_c[None, cols]).exp_())
            _subtract_targets(p, rows, cols, spec, ctx.pos)
            gq[rows].addmm_(p, k[cols])
            gk[cols].addmm_(p.T, qs[rows])
        grad_scale = ((qs * gq).sum() * grad).reshape(logit_scale.shape).to(logit_scale.dtype)
        return gq.mul_(scale * grad), gk.mul_(grad), grad_scale, None


class _Positives:
    """Per-row and per-column sums of the positive logits and their counts (multi-positive).

    Attributes:
        sum_r: ``Tensor[N]`` sum of each row's positive logits; ``cnt_r`` their number.
        sum_c: ``Tensor[M]`` sum of each column's positive logits; ``cnt_c`` their number.
    """

    def __init__(self, n: int, m: int, like: Tensor) -> None:
        self.sum_r, self.cnt_r = like.new_zeros(n), like.new_zeros(n)
        self.sum_c, self.cnt_c = like.new_zeros(m), like.new_zeros(m)


def _nce_block(qs: Tensor, k: Tensor, rows: slice, cols: slice, spec: _NCESpec, pos: _Positives | None) -> Tensor:
    """``Tensor[r, c]`` logits of one block, same-content pairs masked (or counted into ``pos``)."""
    s = qs[rows] @ k[cols].T
    if not spec.multi_positive:
        same = spec.ids.same(rows, cols, s.device, targets=False)
        if same is not None:
            s[same] = float("-inf")
    elif pos is not None:
        same = spec.ids.same(rows, cols, s.device, targets=True)
        if same is not None:
            values = s[same].to(pos.sum_r.dtype)  # bf16 logits under autocast; the sums keep the inputs' dtype
            ones = torch.ones_like(values)
            pos.sum_r.index_add_(0, same[0] + rows.start, values)
            pos.cnt_r.index_add_(0, same[0] + rows.start, ones)
            pos.sum_c.index_add_(0, same[1] + cols.start, values)
            pos.cnt_c.index_add_(0, same[1] + cols.start, ones)
    return s


def _subtract_targets(p: Tensor, rows: slice, cols: slice, spec: _NCESpec, pos: _Positives | None) -> None:
    """Subtract the targets' probabilities from the block ``p`` of softmax probabilities."""
    if pos is None:
        diag = spec.ids.diagonal(rows, cols, p.device)
        if diag is not None:
            p[diag] -= 2.0 if spec.both else 1.0
        return
    same = spec.ids.same(rows, cols, p.device, targets=True)
    if same is None:
        return
    target = 1.0 / pos.cnt_r[same[0] + rows.start]
    if spec.both:
        target = target + 1.0 / pos.cnt_c[same[1] + cols.start]
    p.index_put_(same, -target, accumulate=True)


def streamed_infonce_sum(
    q: Tensor, k: Tensor, logit_scale: Tensor, ids: PairIds, both: bool, multi_positive: bool, chunk: int
) -> Tensor:
    """Summed InfoNCE cross-entropies of ``q`` against gallery ``k``, in ``chunk x chunk`` blocks.

    Args:
        q: ``Tensor[N, E]`` query rows.
        k: ``Tensor[M, E]`` gallery rows; query ``i`` targets ``k[ids.offset + i]``.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        ids: Content ids and target offset (see ``PairIds``).
        both: Also sum the column cross-entropies (``k`` against ``q``); needs ``N == M`` and
            offset 0 (the symmetric loss of one process).
        multi_positive: Same-content pairs are positives instead of being left out.
        chunk: Block size.

    Returns:
        Scalar: the sum over the ``N`` rows (and ``M`` columns) of their cross-entropies.
    """
    spec = _NCESpec(ids, both, multi_positive, chunk)
    out: Tensor = _StreamedInfoNCE.apply(q, k, logit_scale, spec)
    return out


class _StreamedSigmoid(torch.autograd.Function):
    """Summed SigLIP terms of ``q`` against gallery ``k``; gradients accumulated in the forward pass."""

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, logit_scale: Tensor, logit_bias: Tensor, ids: PairIds, chunk: int
    ) -> Tensor:
        """Return ``sum softplus(-label * logits)``; keep the gradients for ``backward``."""
        scale, bias = logit_scale.reshape(()).exp(), logit_bias.reshape(())
        qs = q * scale
        need = any(ctx.needs_input_grad[:4])
        gq, gk = torch.zeros_like(q), torch.zeros_like(k)
        loss, gbias = q.new_zeros(()), q.new_zeros(())
        for rows, cols in _blocks(q.shape[0], k.shape[0], chunk):
            z = torch.addmm(bias, qs[rows], k[cols].T)
            same = ids.same(rows, cols, z.device, targets=True)
            # softplus(z) = relu(z) + log1p(exp(-|z|)); positives: softplus(-z) = softplus(z) - z
            loss += z.clamp_min(0).sum() + z.abs().neg_().exp_().log1p_().sum()
            if same is not None:
                loss -= z[same].sum()
            if need:
                p = z.sigmoid_().to(gq.dtype)  # d term / d z = sigmoid(z) - label01; bf16 under autocast
                if same is not None:
                    p[same] -= 1.0
                gbias += p.sum()
                gq[rows].addmm_(p, k[cols])
                gk[cols].addmm_(p.T, qs[rows])
        grad_scale = (qs * gq).sum()  # sum(d/dz * z_unbiased): before gq takes the scale
        ctx.grads = (gq.mul_(scale), gk, grad_scale, gbias) if need else None
        ctx.params = ((logit_scale.shape, logit_scale.dtype), (logit_bias.shape, logit_bias.dtype))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        """Scale the gradients accumulated in the forward pass."""
        if ctx.grads is None:
            raise RuntimeError("the streamed sigmoid loss supports one backward pass per forward pass")
        gq, gk, gscale, gbias = ctx.grads
        ctx.grads = None  # returned in place: no second copy of the [N, E] gradients
        (scale_shape, scale_dtype), (bias_shape, bias_dtype) = ctx.params
        grad_scale = (gscale * grad).reshape(scale_shape).to(scale_dtype)
        grad_bias = (gbias * grad).reshape(bias_shape).to(bias_dtype)
        return gq.mul_(grad), gk.mul_(grad), grad_scale, grad_bias, None, None


def streamed_sigmoid_sum(
    q: Tensor, k: Tensor, logit_scale: Tensor, logit_bias: Tensor, ids: PairIds, chunk: int
) -> Tensor:
    """Summed SigLIP terms ``-logsigmoid(label * logits)`` of ``q`` against ``k``, in blocks.

    ``logits = exp(logit_scale) * q @ k.T + logit_bias``; the label is ``+1`` for same-content
    pairs (targets included, see ``PairIds``), else ``-1``.

    Args:
        q: ``Tensor[N, E]`` query rows.
        k: ``Tensor[M, E]`` gallery rows.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        logit_bias: Scalar tensor added to every logit.
        ids: Content ids and target offset.
        chunk: Block size.

    Returns:
        Scalar: the sum over the ``N x M`` pairs.
    """
    out: Tensor = _StreamedSigmoid.apply(q, k, logit_scale, logit_bias, ids, chunk)
    return out
