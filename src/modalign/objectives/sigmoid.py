"""Pairwise sigmoid loss, SigLIP.

After Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training".
``sigmoid_loss`` holds the mathematics; ``SigmoidLoss`` selects two modalities' embeddings from
``Outputs`` with the same conventions as ``InfoNCE``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from modalign.core.modules import Objective
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.distributed import is_initialized
from modalign.objectives.contrastive import (
    batch_top1,
    check_modalities,
    check_pair_inputs,
    empty_loss,
    gather_gallery,
    paired_embeddings,
    require_scalar,
)


def sigmoid_loss(
    a: Tensor, b: Tensor, logit_scale: Tensor, logit_bias: Tensor, ids: Tensor | None = None, gather: bool = False
) -> Tensor:
    """SigLIP loss: an independent binary classification per pair.

    ``logits = exp(logit_scale) * a @ b.T + logit_bias``; labels are ``+1`` for matching pairs
    (the diagonal, and every pair whose ids are equal: same content) and ``-1`` elsewhere;
    ``loss = -sum(logsigmoid(labels * logits)) / N``.

    With ``gather=True`` and an initialised process group, the local rows of ``a`` are scored
    against the gathered ``b`` of every rank (with gradient), so all ``N_total^2`` pairs are
    covered exactly once over the ranks (the same sum as SigLIP's chunked "ring" exchange).
    Each rank returns ``world_size * sum_local / N_total``; the mean over ranks is the loss of
    the global batch.

    Args:
        a: ``Tensor[N, E]`` embeddings of the first modality, assumed L2-normalised.
        b: ``Tensor[N, E]`` embeddings of the second modality, assumed L2-normalised.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        logit_bias: Scalar tensor added to every logit.
        ids: ``LongTensor[N]`` sample ids, or ``None`` (all distinct).
        gather: Use pairs with all ranks' rows.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If ``a``/``b`` are not 2-D of the same shape, ``ids`` is not ``[N]``, a
            scale/bias is not a scalar, or (without gathering) the batch is empty.
    """
    check_pair_inputs(a, b, ids, logit_scale=logit_scale, logit_bias=logit_bias)
    g = gather_gallery(a, b, ids, gather)
    if g.total == 0:
        return empty_loss(a, b, gather, "sigmoid_loss", logit_scale, logit_bias)
    n = a.shape[0]
    logits = logit_scale.reshape(()).exp() * a @ g.b.T + logit_bias.reshape(())
    labels = g.same_id(ids, n, a.device).to(logits.dtype) * 2.0 - 1.0
    return -F.logsigmoid(labels * logits).sum() * (g.weight / g.total)


@register("objective", "sigmoid")
class SigmoidLoss(Objective):
    """SigLIP loss between two modalities (see ``sigmoid_loss``).

    Reads ``outputs.embeddings[m]`` (``Tensor[B, E]``, L2-normalised) for the two modalities,
    ``outputs.logit_scale`` and ``outputs.logit_bias``; only rows where both modalities are
    present are used; rows sharing ``batch.ids`` are positives. Fewer than two paired rows
    (without gathering) give a zero loss that stays connected to the graph.

    Args:
        modalities: Exactly two modality names.
        gather: Use pairs with all ranks' rows (``all_gather`` with gradient).
    """

    def __init__(self, modalities: list[str], gather: bool = False) -> None:
        super().__init__()
        self.modalities = check_modalities(modalities, "sigmoid")
        self.gather = gather

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss; metrics: ``temperature``, ``bias``, ``acc_a2b``, ``acc_b2a``, ``paired``."""
        scale = require_scalar(outputs.logit_scale, "logit_scale", "sigmoid")
        bias = require_scalar(outputs.logit_bias, "logit_bias", "sigmoid")
        a, b, ids = paired_embeddings(outputs, batch, self.modalities, "sigmoid")
        n = a.shape[0]
        metrics = {
            "temperature": float(1.0 / scale.detach().exp()),
            "bias": float(bias.detach()),
            "paired": float(n),
        }
        if n < 2 and not (self.gather and is_initialized()):
            emb = outputs.embeddings
            total = emb[self.modalities[0]].sum() + emb[self.modalities[1]].sum() + scale.sum() + bias.sum()
            zero = 0.0 * total
            return LossOutput(loss=zero, parts={"sigmoid": zero}, metrics=metrics)
        loss = sigmoid_loss(a, b, scale, bias, ids=ids, gather=self.gather)
        if n > 0:
            metrics["acc_a2b"], metrics["acc_b2a"] = batch_top1(a, b, ids)
        return LossOutput(loss=loss, parts={"sigmoid": loss}, metrics=metrics)
