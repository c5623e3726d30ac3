"""Pairwise sigmoid loss, SigLIP.

After Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training".
``sigmoid_loss`` holds the mathematics; ``SigmoidLoss`` selects two modalities' embeddings from
``Outputs`` with the same conventions as ``InfoNCE``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.objectives.contrastive import (
    LogitScale,
    PairObjective,
    batch_top1,
    check_chunk_size,
    check_pair_inputs,
    empty_loss,
    gather_gallery,
)
from modalign.objectives.streamed import PairIds, resolve_chunk, streamed_sigmoid_sum


def sigmoid_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    ids: Tensor | None = None,
    gather: bool = False,
    ids_b: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """SigLIP loss: an independent binary classification per pair.

    ``logits = exp(logit_scale) * a @ b.T + logit_bias``; labels are ``+1`` for matching pairs
    (the diagonal, and every pair holding the same content: equal ``ids`` of the ``a`` rows or
    equal ``ids_b`` of the ``b`` rows) and ``-1`` elsewhere;
    ``loss = -sum(logsigmoid(labels * logits)) / N``.

    With ``gather=True`` and an initialised process group, the local rows of ``a`` are scored
    against the gathered ``b`` of every rank (with gradient), so all ``N_total^2`` pairs are
    covered exactly once over the ranks (the same sum as SigLIP's chunked "ring" exchange).
    Each rank returns ``world_size * sum_local / N_total``; the mean over ranks is the loss of
    the global batch.

    Large galleries take the streamed path (``streamed.streamed_sigmoid_sum``): the same loss and
    gradients over ``chunk x chunk`` blocks of the logits, memory linear in the batch.

    Args:
        a: ``Tensor[N, E]`` embeddings of the first modality, assumed L2-normalised.
        b: ``Tensor[N, E]`` embeddings of the second modality, assumed L2-normalised.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        logit_bias: Scalar tensor added to every logit.
        ids: ``LongTensor[N]`` content ids of the ``a`` rows (of both, without ``ids_b``), or
            ``None`` (all distinct).
        gather: Use pairs with all ranks' rows.
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows where they differ from ``ids``.
        chunk_size: ``None``: plain up to ``streamed.PLAIN_MAX_ROWS`` gallery rows, streamed in
            blocks of ``streamed.DEFAULT_CHUNK`` above; ``0``: always plain; ``> 0``: streamed in
            blocks of that many rows.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If ``a``/``b`` are not 2-D of the same shape, ``ids`` is not ``[N]``, a
            scale/bias is not a scalar, (without gathering) the batch is empty, or
            ``chunk_size`` is negative.
    """
    check_pair_inputs(a, b, ids, logit_scale=logit_scale, logit_bias=logit_bias)
    check_pair_inputs(a, b, ids_b)
    g = gather_gallery(a, b, ids, gather, ids_b)
    if g.total == 0:
        return empty_loss(a, b, gather, "sigmoid_loss", logit_scale, logit_bias)
    chunk = resolve_chunk(chunk_size, g.total)
    if chunk is None:
        n = a.shape[0]
        logits = logit_scale.reshape(()).exp() * a @ g.b.T + logit_bias.reshape(())
        labels = g.same_id(ids, n, a.device, ids_b).to(logits.dtype) * 2.0 - 1.0
        return -F.logsigmoid(labels * logits).sum() * (g.weight / g.total)
    pair_ids = PairIds(ids, g.ids, ids_b, g.ids_b, g.offset)
    return streamed_sigmoid_sum(a, g.b, logit_scale, logit_bias, pair_ids, chunk) * (g.weight / g.total)


@register("objective", "sigmoid")
class SigmoidLoss(PairObjective):
    """SigLIP loss between two modalities (see ``sigmoid_loss``), with its own temperature and bias.

    Reads ``outputs.embeddings[m]`` (``Tensor[B, E]``, L2-normalised) for the two modalities;
    only rows where both modalities are present are used; rows holding the same content
    (``batch.ids_of``) are positives. Fewer than two paired rows (without gathering) give a zero
    loss that stays connected to the graph.

    Args:
        modalities: Two modality names (default: the model's two).
        temperature: Initial temperature (SigLIP: 0.1, i.e. ``logit_scale = log 10``).
        bias: Initial logit bias (SigLIP: -10).
        max_logit_scale: Clamp on ``1/temperature``.
        gather: Use pairs with all ranks' rows (``all_gather`` with gradient).
        chunk_size: Block size of the streamed, linear-memory loss; ``None``: automatic (plain
            ``B x B`` logits up to 256 gallery rows, blocks of 1024 above); ``0``: always plain.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 0.1,
        bias: float = -10.0,
        max_logit_scale: float = 100.0,
        gather: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(modalities, "sigmoid")
        self.scale = LogitScale(temperature, True, max_logit_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(bias)))
        self.gather = gather
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss; metrics: ``temperature``, ``bias``, ``acc_a2b``, ``acc_b2a``, ``paired``."""
        scale, bias = self.scale(), self.logit_bias
        pair = self.pair(outputs, batch)
        n = pair.size if pair is not None else 0
        metrics = {"temperature": float(1.0 / scale.detach().exp()), "bias": float(bias.detach()), "paired": float(n)}
        if pair is None or self.too_few(pair, self.gather):
            return LossOutput(loss=outputs.zero(scale, bias), metrics=metrics)
        loss = sigmoid_loss(pair.a, pair.b, scale, bias, pair.ids_a, self.gather, pair.ids_b, self.chunk_size)
        if n > 0:
            metrics["acc_a2b"], metrics["acc_b2a"] = batch_top1(pair)
        return LossOutput(loss=loss, metrics=metrics)
