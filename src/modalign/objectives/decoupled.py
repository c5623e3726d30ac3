"""Decoupled contrastive learning (DCL): InfoNCE without the positive in the denominator.

After Yeh, Hong, Hsu, Liu, Chen and LeCun 2022, "Decoupled Contrastive Learning" (ECCV 2022).
Removing the positive pair from the softmax denominator removes the negative-positive coupling
that scales InfoNCE's gradient down when positives are already easy, which makes the loss less
dependent on large batches. The gather, id and weighting conventions are those of
``infonce_loss``, whose helpers this module reuses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.objectives.contrastive import (
    LogitScale,
    PairObjective,
    batch_top1,
    check_pair_inputs,
    empty_loss,
    gather_gallery,
)


def dcl_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    ids: Tensor | None = None,
    gather: bool = False,
    ids_b: Tensor | None = None,
) -> Tensor:
    """Symmetric decoupled contrastive loss (Yeh et al. 2022), without the optional DCLW weighting.

    With ``l = exp(logit_scale) * a @ b.T``, the a -> b term of row ``i`` is
    ``-l_ii + logsumexp_{j in neg(i)} l_ij`` and the b -> a term the same on ``l.T``, where
    ``neg(i)`` holds the rows ``j != i`` that hold other content: ``ids[j] != ids[i]`` and
    ``ids_b[j] != ids_b[i]`` (same-content rows are neither positives nor negatives, exactly as
    ``infonce_loss`` removes them). The loss is the sum of the ``2N`` terms divided by ``2N``;
    a row without any negative (every other row shares its content, or ``N_total = 1``) has no
    contrastive signal and its terms are 0. Unlike InfoNCE the loss may be negative.

    With ``gather=True`` and an initialised process group, the local rows are queries against
    the gallery of every rank's rows (gathered with gradient, ids gathered too). Each rank
    returns ``world_size * sum_local / (2 N_total)``, so the mean over ranks is the loss of the
    global batch. Ranks may hold different numbers of rows, including none.

    Args:
        a: ``Tensor[N, E]`` embeddings of the first modality, assumed L2-normalised.
        b: ``Tensor[N, E]`` embeddings of the second modality, assumed L2-normalised.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        ids: ``LongTensor[N]`` content ids of the ``a`` rows (of both, without ``ids_b``), or
            ``None`` (all distinct).
        gather: Use negatives from all ranks.
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows where they differ from ``ids``.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If ``a``/``b`` are not 2-D of the same shape, ``ids``/``ids_b`` are not ``[N]``,
            ``logit_scale`` is not a scalar, or (without gathering) the batch is empty.
    """
    check_pair_inputs(a, b, ids, logit_scale=logit_scale)
    check_pair_inputs(a, b, ids_b)
    g = gather_gallery(a, b, ids, gather, ids_b)
    if g.total == 0:
        return empty_loss(a, b, gather, "dcl_loss", logit_scale)
    scale = logit_scale.reshape(()).exp()
    removed = g.same_id(ids, a.shape[0], a.device, ids_b)  # the positive and every same-content row
    # A row without negatives has logsumexp -inf and is dropped; no NaN flows back from it since
    # masked_fill's backward zeroes the gradient of every masked logit (tested).
    has_negative = ~removed.all(dim=1)
    positive = scale * (a * b).sum(dim=1)
    total = a.new_zeros(())
    for query, gallery in ((a, g.b), (b, g.a)):
        denominator = torch.logsumexp((scale * query @ gallery.T).masked_fill(removed, float("-inf")), dim=1)
        total = total + torch.where(has_negative, denominator - positive, 0.0).sum()
    return total * (g.weight / (2.0 * g.total))


@register("objective", "dcl")
class DCL(PairObjective):
    """Decoupled contrastive loss between two modalities (see ``dcl_loss``), with its temperature.

    Same row selection, content-id handling and metrics as ``InfoNCE``.

    Args:
        modalities: Two modality names (default: the model's two).
        temperature: Initial temperature (DCL: 0.1).
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        gather: Use negatives from all ranks.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 0.1,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        gather: bool = False,
    ) -> None:
        super().__init__(modalities, "dcl")
        self.scale = LogitScale(temperature, learn_temperature, max_logit_scale)
        self.gather = gather

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss; metrics: ``temperature``, ``acc_a2b``, ``acc_b2a``, ``paired``."""
        scale = self.scale()
        pair = self.pair(outputs, batch)
        n = pair.size if pair is not None else 0
        metrics = {"temperature": float(1.0 / scale.detach().exp()), "paired": float(n)}
        if pair is None or self.too_few(pair, self.gather):
            return LossOutput(loss=outputs.zero(scale), metrics=metrics)
        loss = dcl_loss(pair.a, pair.b, scale, pair.ids_a, self.gather, pair.ids_b)
        if n > 0:
            metrics["acc_a2b"], metrics["acc_b2a"] = batch_top1(pair)
        return LossOutput(loss=loss, metrics=metrics)
