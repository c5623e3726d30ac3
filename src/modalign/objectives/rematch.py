"""Re-pairing the suspected-noisy pairs of a noisy split (rematching) on top of NCR's weights.

Filtering noisy correspondences (NCR, ``ncr_infonce``) weighs a mismatched pair down, and its
image and caption are then lost as positives. With mismatches inside one corpus, the true
partner of a mismatched image is often another mismatched pair's caption: L2RM (Han et al.
2024, "Learning to Rematch Mismatched Pairs for Robust Cross-Modal Retrieval", CVPR) re-pairs
them by optimal transport between the mismatched sides and trains on the refined pairs.
``ncr_rematch`` does this on NCR's split-level fit:

* At each fitting epoch (``ncr_infonce``'s schedule) the pairs whose clean posterior is below
  0.5 are the suspects. Their ``a`` rows and their ``b`` rows (one per content) are matched by
  the one-to-one assignment maximising the summed cosine (``mine_assignment``: the zero-entropy
  limit of L2RM's transport, without its learned cost), and the ``rematch`` fraction of the
  suspects with the most confident (highest-cosine) assignments is kept.
* In training, a batch pair whose ``a`` content was re-paired adds ``pseudo_pair_terms``: its
  ``a`` row against the new partner's stored embedding, among the suspects' stored ``b`` rows as
  negatives; symmetrically for ``b``. The terms are summed and divided by twice the batch's pair
  count, so a re-paired pair counts like one clean pair of ``weighted_infonce_loss``.

Memory: the pass holds ``N x E`` per modality; the assignment a dense ``S_a x S_b`` cosine of
the suspects (cubic time; a few seconds for 1,500 suspects).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.objectives.cluster_tables import resize_on_load
from modalign.objectives.mining import mine_assignment, most_confident
from modalign.objectives.noisy_pairs import NCRInfoNCE
from modalign.objectives.pseudo_pairs import find_ids, pseudo_pair_terms
from modalign.objectives.unaligned import check_arg

#: The rematch tables: buffers whose length depends on the data (resized on load).
TABLES = ("rematch_ids", "rematch_targets", "bank_a", "bank_a_ids", "bank_b", "bank_b_ids")


def first_of_each(ids: Tensor) -> Tensor:
    """``LongTensor[U]``: the index of the first row of each distinct value of ``ids [N]``, by increasing value."""
    values, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((values.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
    return first.scatter_reduce(0, inverse, torch.arange(ids.shape[0], device=ids.device), "amin")


@register("objective", "ncr_rematch")
class NCRRematch(NCRInfoNCE):
    """``ncr_infonce`` plus the re-pairing of its suspected-noisy pairs (see the module docstring).

    State, besides ``ncr_infonce``'s: ``rematch_ids [2, R]`` (content ids of each re-paired
    ``a`` and its new ``b``, sorted by ``a``), ``rematch_targets [2, R, E]`` (their embeddings from
    the fitting pass), ``bank_a [S_a, E]``/``bank_a_ids``, ``bank_b``/``bank_b_ids`` (the
    suspects' rows, the negatives); buffers, resized on load, so a resumed run trains on the same
    tables until the next fit. Labels are never read; under measured noise (``data.pair_noise``)
    the metric ``rematch_same`` (re-paired rows from one sample: equal content ids) says how
    many re-pairings are right.

    Args:
        rematch: Fraction of the suspects to re-pair, the most confident assignments, in ``(0, 1]``.
        rematch_threshold: Minimum cosine of a re-pairing, in ``[-1, 1]``.
        rematch_weight: Weight of the re-paired terms (>= 0).
        **kwargs: ``ncr_infonce``'s arguments (a recipe may set them: the config check follows
            ``**kwargs`` to the parent's signature). With ``gather`` every rank re-pairs the rows
            of all ranks, so the tables agree.

    Raises:
        ConfigError: Naming the argument, as ``ncr_infonce`` and for the three above.
    """

    rematch_ids: Tensor
    rematch_targets: Tensor
    bank_a: Tensor
    bank_a_ids: Tensor
    bank_b: Tensor
    bank_b_ids: Tensor

    def __init__(
        self, rematch: float = 0.25, rematch_threshold: float = -1.0, rematch_weight: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.name = "ncr_rematch"
        check_arg("rematch", 0 < rematch <= 1, f"must be in (0, 1], got {rematch}")
        check_arg("rematch_threshold", -1 <= rematch_threshold <= 1, f"must be in [-1, 1], got {rematch_threshold}")
        check_arg("rematch_weight", rematch_weight >= 0, f"must be >= 0, got {rematch_weight}")
        self.rematch, self.rematch_threshold, self.rematch_weight = rematch, rematch_threshold, rematch_weight
        self.register_buffer("rematch_ids", torch.zeros(2, 0, dtype=torch.long))
        self.register_buffer("rematch_targets", torch.zeros(2, 0, 0))
        for side in "ab":
            self.register_buffer(f"bank_{side}", torch.zeros(0, 0))
            self.register_buffer(f"bank_{side}_ids", torch.zeros(0, dtype=torch.long))
        resize_on_load(self, TABLES)

    def after_fit(
        self, embeddings: tuple[Tensor, Tensor], ids: tuple[Tensor, Tensor], weights: Tensor, epoch: int
    ) -> None:
        """Re-pair the suspects (weight < 0.5) by ``mine_assignment``; store the tables."""
        suspect = weights.to(ids[0].device) < 0.5
        pools = []
        for side in (0, 1):
            rows = first_of_each(ids[side][suspect])
            pools.append((ids[side][suspect][rows], embeddings[side][suspect][rows]))
        (ids_a, emb_a), (ids_b, emb_b) = pools
        keep = round(self.rematch * min(ids_a.shape[0], ids_b.shape[0]))
        mined = most_confident(mine_assignment(emb_a, emb_b, self.rematch_threshold), keep)
        dtype = self.table_weights.dtype
        self.rematch_ids = torch.stack([ids_a[mined.i], ids_b[mined.j]])
        self.rematch_targets = torch.stack([emb_a[mined.i], emb_b[mined.j]]).to(dtype)
        self.bank_a, self.bank_a_ids = emb_a.to(dtype), ids_a
        self.bank_b, self.bank_b_ids = emb_b.to(dtype), ids_b

    def rematch_terms(self, query: Tensor, query_ids: Tensor, side: int, scale: Tensor) -> Tensor:
        """``Tensor[Q]``: ``pseudo_pair_terms`` of the rows of ``query [P, E]`` (side ``side``) that were re-paired."""
        if self.rematch_ids.shape[1] == 0:
            return query.new_zeros(0)
        order = torch.argsort(self.rematch_ids[side])
        found, index = find_ids(query_ids, self.rematch_ids[side][order])
        pick = order[index[found]]
        bank, bank_ids = (self.bank_b, self.bank_b_ids) if side == 0 else (self.bank_a, self.bank_a_ids)
        targets = self.rematch_targets[1 - side][pick].to(query)
        target_ids = self.rematch_ids[1 - side][pick]
        return pseudo_pair_terms(query[found], targets, target_ids, bank.to(query), bank_ids, scale)

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """NCR's weighted InfoNCE plus the re-paired terms.

        Metrics: ``ncr_infonce``'s, ``rematched`` (pairs in the table), ``rematch_queries`` (the
        batch's re-paired rows, both sides) and ``rematch_same`` (see the class docstring).
        """
        out = super().forward(outputs, batch)
        pair = self.pair(outputs, batch)
        metrics = {**out.metrics, "rematched": float(self.rematch_ids.shape[1])}
        if self.rematch_ids.shape[1] > 0:
            metrics["rematch_same"] = float((self.rematch_ids[0] == self.rematch_ids[1]).float().mean())
        if pair is None or pair.size == 0:
            return LossOutput(loss=out.loss, metrics=metrics)
        scale = self.scale()
        terms = torch.cat(
            [self.rematch_terms(pair.a, pair.ids_a, 0, scale), self.rematch_terms(pair.b, pair.ids_b, 1, scale)]
        )
        metrics["rematch_queries"] = float(terms.shape[0])
        loss = out.loss + self.rematch_weight * terms.sum() / (2 * pair.size)
        return LossOutput(loss=loss, metrics=metrics)
