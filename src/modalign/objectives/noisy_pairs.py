"""Noisy pairs weighted by a mixture fitted over the whole training split at epoch starts (NCR).

Huang et al. 2021 ("Learning with Noisy Correspondence for Cross-modal Matching", NeurIPS) split
noisy from clean pairs by the memorisation effect: a network learns the clean pairs first, so
after a warm-up their per-pair losses are lower than the mismatched ones'. NCR computes every
training pair's loss once per epoch, in eval mode, fits a two-component Gaussian mixture to those
losses and trains the next epoch with each pair weighted by its posterior of being clean.
``weighted_infonce`` (``modalign.objectives.unaligned``) fits the mixture to one batch's losses;
``ncr_infonce`` here fits it, as NCR does, to the whole split's:

* ``split_pair_losses``: each pair's symmetric InfoNCE term against every other pair of the
  split (``per_pair_infonce`` on the whole split), in row blocks: memory ``block x N``, never a
  stored ``N x N`` matrix.
* ``NCRInfoNCE``: at the epoch starts of fitting, embed the split (``embed_training_split``),
  compute ``split_pair_losses``, fit ``clean_posterior`` and store each pair's weight, keyed by
  its two content ids (a noisy pair holds another sample's value and so another content id).
  Training batches look their pairs' weights up; ``weighted_infonce_loss`` scales each pair's
  own term, and every pair still serves as a negative.

NCR's co-teaching (two networks, each weighting the other's pairs) and its rectified soft
margins are not built: one network weights its own pairs.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import Tensor, nn

from modalign.core.registry import register
from modalign.core.types import Batch, EpochContext, LossOutput, Outputs
from modalign.objectives.cluster_tables import embed_training_split, embed_width, refresh_due, resize_on_load
from modalign.objectives.contrastive import LogitScale, Pair, PairObjective, check_pair_inputs
from modalign.objectives.pseudo_pairs import find_ids
from modalign.objectives.unaligned import check_arg, clean_posterior, scale_of, weighted_pair_output


def _direction_terms(q: Tensor, k: Tensor, same_q: Tensor, same_k: Tensor, scale: Tensor, block: int) -> Tensor:
    """``Tensor[N]``: ``-log softmax`` of each row's own column, rows ``q`` against columns ``k``.

    Columns ``j != i`` with ``same_q[i] == same_q[j]`` or ``same_k[i] == same_k[j]`` are left out.
    """
    n = q.shape[0]
    out = []
    columns = torch.arange(n, device=q.device)
    for start in range(0, n, block):
        rows = columns[start : start + block]
        logits = scale * q[rows] @ k.T
        same = (same_q[rows, None] == same_q[None, :]) | (same_k[rows, None] == same_k[None, :])
        logits = logits.masked_fill(same & (rows[:, None] != columns[None, :]), float("-inf"))
        out.append(torch.logsumexp(logits, dim=1) - logits[torch.arange(rows.shape[0]), rows])
    return torch.cat(out) if out else q.new_zeros(0)


def split_pair_losses(
    a: Tensor, b: Tensor, logit_scale: Tensor, ids_a: Tensor, ids_b: Tensor, block: int = 1024
) -> Tensor:
    """``Tensor[N]``: each pair's symmetric InfoNCE term against the whole split, without gradient.

    Equal to ``per_pair_infonce(a, b, logit_scale, ids_a, ids_b)`` (rows holding the same ``a`` or
    ``b`` content are not negatives), computed ``block`` rows at a time in each direction, so
    memory is ``block x N``.

    Args:
        a: ``Tensor[N, E]`` L2-normalised first-modality rows of the pairs.
        b: ``Tensor[N, E]`` their partners.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        ids_a: ``LongTensor[N]`` content ids of the ``a`` rows.
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows.
        block: Rows per block (>= 1).

    Raises:
        ValueError: On shapes that do not fit, an empty split or ``block < 1``.
    """
    check_pair_inputs(a, b, ids_a, logit_scale=logit_scale)
    check_pair_inputs(a, b, ids_b)
    if a.shape[0] == 0 or block < 1:
        raise ValueError(f"split_pair_losses needs N >= 1 pairs and block >= 1, got N={a.shape[0]}, block={block}")
    with torch.no_grad():
        scale = scale_of(logit_scale.detach())
        a, b = a.detach(), b.detach()
        return 0.5 * (
            _direction_terms(a, b, ids_a, ids_b, scale, block) + _direction_terms(b, a, ids_b, ids_a, scale, block)
        )


#: Content ids are below this bound, so ``a * KEY_SPAN + b`` keys a pair without collision.
KEY_SPAN = 2**31


def pair_keys(ids_a: Tensor, ids_b: Tensor) -> Tensor:
    """``LongTensor[P]``: one key per pair of content ids, ``a * 2**31 + b`` (increasing in ``(a, b)``)."""
    return ids_a.long() * KEY_SPAN + ids_b.long()


@register("objective", "ncr_infonce")
class NCRInfoNCE(PairObjective):
    """InfoNCE with pair weights from a mixture fitted to the whole split's losses each epoch (NCR).

    Until ``warmup_epochs`` every weight is 1 (plain InfoNCE, NCR's warm-up). At each fitting
    epoch start (then every ``refresh_every`` epochs) the training split is embedded once in
    eval mode without gradient; its paired rows' losses (``split_pair_losses`` at the current
    temperature) are fitted by ``clean_posterior`` and each pair's weight is stored: the
    posterior of the low-loss component, or, with ``threshold``, 1 where that posterior exceeds
    it and 0 elsewhere (the pair is dropped from the positives but stays a negative). In a batch
    a pair's weight is looked up by its two content ids; a pair not in the table (none fitted yet,
    or a pairing the pass did not see) weighs 1.

    State: ``table_ids [2, P]`` (content ids of a and b, sorted by ``pair_keys``), ``table_weights
    [P]``, ``fitted_epoch``; buffers, so a resumed run trains on the same weights until the next
    fitting; ``load_state_dict`` resizes them. Under data parallelism with ``gather`` (set by the
    trainer) every rank fits on the rows of all ranks, so the tables agree; the loss itself uses
    each rank's own batch, like ``weighted_infonce``. No ``features``: runs under gradient caching.

    Args:
        modalities: Two modality names (default: the model's two).
        temperature: Initial temperature.
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        warmup_epochs: Epochs with all weights 1 before the first fit (>= 1: the first fit needs
            a trained model).
        refresh_every: Epochs between fits (>= 1).
        threshold: ``null``: soft weights (the posterior); a value in ``(0, 1)``: hard weights.
        iterations: EM iterations of the mixture (NCR: 10).
        reg: Variance regulariser of the mixture, on losses normalised to ``[0, 1]`` (NCR: 5e-4).
        block: Rows per block of ``split_pair_losses``.
        gather: Under data parallelism, fit on the rows of every rank.
    """

    table_ids: Tensor
    table_weights: Tensor
    fitted_epoch: Tensor
    #: The least ``warmup_epochs`` (the first fit reads the model's embeddings: it needs training).
    min_warmup_epochs: ClassVar[int] = 1

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        warmup_epochs: int = 5,
        refresh_every: int = 1,
        threshold: float | None = None,
        iterations: int = 10,
        reg: float = 5e-4,
        block: int = 1024,
        gather: bool = False,
    ) -> None:
        super().__init__(modalities, "ncr_infonce")
        low = self.min_warmup_epochs
        check_arg("warmup_epochs", warmup_epochs >= low, f"must be >= {low}, got {warmup_epochs}")
        check_arg("refresh_every", refresh_every >= 1, f"must be >= 1, got {refresh_every}")
        check_arg("threshold", threshold is None or 0 < threshold < 1, f"must be null or in (0, 1), got {threshold}")
        check_arg("iterations", iterations >= 1, f"must be >= 1, got {iterations}")
        check_arg("reg", reg > 0, f"must be > 0, got {reg}")
        check_arg("block", block >= 1, f"must be >= 1, got {block}")
        self.scale = LogitScale(temperature, learn_temperature, max_logit_scale)
        self.warmup_epochs, self.refresh_every, self.threshold = warmup_epochs, refresh_every, threshold
        self.iterations, self.reg, self.block, self.gather = iterations, reg, block, gather
        self.embed_dim = 0
        self.split_widths: dict[str, int] = {}
        self.split_source = "embeddings"  # what the fitting pass reads (embed_training_split's source)
        self.register_buffer("table_ids", torch.zeros(2, 0, dtype=torch.long))
        self.register_buffer("table_weights", torch.zeros(0))
        self.register_buffer("fitted_epoch", torch.full((), -1, dtype=torch.long))
        resize_on_load(self, ("table_ids", "table_weights"))

    def bind(self, model: nn.Module) -> None:
        """Resolve the modalities and the embedding width."""
        super().bind(model)
        self.embed_dim = embed_width(model, self.modalities, self.name)
        self.split_widths = dict.fromkeys(self.modalities, self.embed_dim)

    def fitting_epoch(self, epoch: int) -> bool:
        """Whether the weights are refitted at the start of ``epoch``."""
        return refresh_due(epoch, self.warmup_epochs, self.refresh_every)

    def on_epoch_start(self, model: nn.Module, ctx: EpochContext) -> None:
        """At a fitting epoch: embed the split, fit the mixture to its pairs' losses, store the weights."""
        if not self.fitting_epoch(ctx.epoch):
            return
        a, b = self.modalities
        rows = embed_training_split(
            model, ctx.batches(), self.modalities, self.split_widths, self.gather, self.split_source
        )
        paired = rows.present[a] & rows.present[b]
        ids = rows.content[a][paired], rows.content[b][paired]
        embeddings = rows.embeddings[a][paired], rows.embeddings[b][paired]
        weights = self.fit_weights(*embeddings, *ids)
        if weights.numel() > 0 and not bool((weights > 0).any()):
            warnings.warn(
                f"{self.name}: every one of the {weights.numel()} pairs weighs 0 after the fit at epoch {ctx.epoch} "
                f"(threshold {self.threshold}): no pair is a positive until the next fit",
                stacklevel=2,
            )
        self.set_table(*ids, weights, ctx.epoch)
        self.after_fit(embeddings, ids, weights, ctx.epoch)

    def fit_weights(self, a: Tensor, b: Tensor, ids_a: Tensor, ids_b: Tensor) -> Tensor:
        """``Tensor[P]`` weights of the split's pairs ``a [P, E]``, ``b [P, E]`` (all 1 under two pairs)."""
        if ids_a.numel() < 2:
            return torch.ones(ids_a.shape[0])
        losses = split_pair_losses(a, b, self.scale(), ids_a, ids_b, self.block)
        weights = clean_posterior(losses, self.iterations, reg=self.reg)
        if self.threshold is not None:
            weights = (weights > self.threshold).to(weights.dtype)
        return weights

    def after_fit(
        self, embeddings: tuple[Tensor, Tensor], ids: tuple[Tensor, Tensor], weights: Tensor, epoch: int
    ) -> None:
        """Called after each fit with the split's pairs and their new weights (``ncr_rematch`` re-pairs here)."""

    def set_table(self, ids_a: Tensor, ids_b: Tensor, weights: Tensor, epoch: int) -> None:
        """Store ``weights [P]`` of the pairs ``(ids_a [P], ids_b [P])``, keyed by ``pair_keys``.

        Raises:
            ValueError: If a content id is outside ``[0, 2**31)``.
        """
        both = torch.cat([ids_a, ids_b])
        if both.numel() > 0 and (int(both.min()) < 0 or int(both.max()) >= KEY_SPAN):
            raise ValueError(f"{self.name}: content ids must lie in [0, 2**31) to key the pair weights")
        keys = pair_keys(ids_a, ids_b)
        order = torch.argsort(keys)
        self.table_ids = torch.stack([ids_a[order], ids_b[order]])
        self.table_weights = weights[order].to(self.table_weights.dtype)
        self.fitted_epoch.fill_(epoch)

    def weights_of(self, ids_a: Tensor, ids_b: Tensor) -> Tensor:
        """``Tensor[P]`` stored weight of each pair ``(ids_a[k], ids_b[k])``; 1 where the table lacks it."""
        out = torch.ones(ids_a.shape[0], dtype=self.table_weights.dtype, device=ids_a.device)
        if self.table_ids.shape[1] == 0:
            return out
        table = pair_keys(self.table_ids[0], self.table_ids[1]).to(ids_a.device)
        found, index = find_ids(pair_keys(ids_a, ids_b), table)
        return torch.where(found, self.table_weights.to(out.device)[index], out)

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Weighted InfoNCE; metrics ``temperature``, ``paired``, ``weight`` (mean), ``clean`` (> 0.5), accuracies."""
        return weighted_pair_output(self, outputs, batch, self.scale(), self.pair_weights)

    def pair_weights(self, pair: Pair, scale: Tensor) -> Tensor:
        """``Tensor[P]``: the stored weights of the batch's pairs (``weights_of``); ``scale`` is unused."""
        return self.weights_of(pair.ids_a, pair.ids_b)
