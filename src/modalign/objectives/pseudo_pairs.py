"""Pseudo-pair mining for mix-paired data: match the unimodal pools by their current embeddings.

A mix-paired training split (``data.paired_fraction < 1``, ``modalign.data.pairing``) holds a few
pairs and many unimodal samples: rows holding ``a`` only and rows holding ``b`` only, whose true
partners are somewhere in the other pool but unknown. ``PseudoPairs`` pairs the two pools at
epoch starts from the current embeddings and trains on the confident pairs, as pseudo-labelling
does for classes (Lee 2013, "Pseudo-Label", ICML workshop; a confidence threshold as in FixMatch,
Sohn et al. 2020):

* The matchings (plain functions in ``modalign.objectives.mining``): ``mnn``, mutual nearest
  neighbours by CSLS, kept above a cosine; ``ot``, the mutual argmax entries of an entropic
  optimal-transport plan, kept above a row mass (S-CLIP, Mo et al. 2023, "Semi-supervised
  Vision-Language Learning using Few Specialist Captions", NeurIPS, transports unpaired images
  onto the paired ones; here the two unimodal pools are matched to each other); ``clusters``,
  k-means clusters of the two pools matched with the votes of the training split's known pairs,
  then rows paired inside matched clusters.
* ``pseudo_pair_terms`` / ``pseudo_pair_loss``: InfoNCE of each unimodal row against its mined
  partner's embedding (a fixed target from the mining pass) among a bank of the other pool's
  embeddings (fixed negatives).

Memory: the pass holds ``N x E`` per modality (``embed_training_split``); each matching's memory
is given in ``modalign.objectives.mining``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.registry import register
from modalign.core.types import Batch, EpochContext, LossOutput, Outputs
from modalign.distributed import all_gather_sizes, is_initialized, world_size
from modalign.objectives.cluster_tables import (
    PassRows,
    cluster_seed,
    content_means,
    embed_training_split,
    embed_width,
    refresh_due,
    resize_on_load,
)
from modalign.objectives.contrastive import LogitScale, PairObjective
from modalign.objectives.mining import (
    MinedPairs,
    mine_clusters,
    mine_mnn,
    mine_ot,
    most_confident,
    neighbourhood_means,
)
from modalign.objectives.unaligned import check_arg, scale_of

Matching = Literal["mnn", "ot", "clusters"]
MATCHINGS: tuple[str, ...] = ("mnn", "ot", "clusters")

# ---------------------------------------------------------------------------------------------
# The loss.


def pseudo_pair_terms(
    queries: Tensor, positives: Tensor, positive_ids: Tensor, bank: Tensor, bank_ids: Tensor, logit_scale: Tensor
) -> Tensor:
    """Per-row InfoNCE of queries against their pseudo-partners among a bank of negatives.

    With ``s = exp(logit_scale)``, ``p_i = s q_i . t_i`` and ``n_ik = s q_i . b_k``, row ``i``'s term
    is ``log(exp(p_i) + sum_{k: bank_ids[k] != positive_ids[i]} exp(n_ik)) - p_i``: the bank
    entry holding the partner's own content is replaced by the partner (it is the positive, not
    a negative). Gradient flows into every input that requires it; the module passes fixed
    targets and bank, so only the queries (and the temperature) learn.

    Args:
        queries: ``Tensor[N, E]`` current embeddings of the unimodal rows, L2-normalised.
        positives: ``Tensor[N, E]`` each row's mined partner embedding, L2-normalised.
        positive_ids: ``LongTensor[N]`` content id of each partner (the other modality's ids).
        bank: ``Tensor[K, E]`` negatives of the other modality, L2-normalised (``K`` may be 0).
        bank_ids: ``LongTensor[K]`` their content ids.
        logit_scale: Scalar tensor, the log of the inverse temperature.

    Returns:
        ``Tensor[N]`` per-row losses.

    Raises:
        ValueError: If the shapes do not fit or ``logit_scale`` is not a scalar.
    """
    n, e = queries.shape if queries.dim() == 2 else (-1, -1)
    if n < 0 or positives.shape != queries.shape or positive_ids.shape != (n,):
        raise ValueError(
            f"expected queries and positives [N, E] and positive_ids [N], got {tuple(queries.shape)}, "
            f"{tuple(positives.shape)} and {tuple(positive_ids.shape)}"
        )
    if bank.dim() != 2 or bank.shape[1] != e or bank_ids.shape != bank.shape[:1]:
        raise ValueError(f"expected bank [K, {e}] and bank_ids [K], got {tuple(bank.shape)}, {tuple(bank_ids.shape)}")
    scale = scale_of(logit_scale)
    positive = scale * (queries * positives).sum(dim=1)
    negative = (scale * queries @ bank.T).masked_fill(positive_ids[:, None] == bank_ids[None, :], float("-inf"))
    return torch.logsumexp(torch.cat([positive[:, None], negative], dim=1), dim=1) - positive


def pseudo_pair_loss(
    queries: Tensor, positives: Tensor, positive_ids: Tensor, bank: Tensor, bank_ids: Tensor, logit_scale: Tensor
) -> Tensor:
    """Mean of ``pseudo_pair_terms`` (see there for the shapes).

    Raises:
        ValueError: As ``pseudo_pair_terms``, or for no query rows.
    """
    if queries.shape[0] == 0:
        raise ValueError("pseudo_pair_loss got no query rows")
    return pseudo_pair_terms(queries, positives, positive_ids, bank, bank_ids, logit_scale).mean()


def mean_over_rows(total: Tensor, n: int, gather: bool) -> Tensor:
    """``total`` (a sum over ``n`` local rows) as a mean; gathered: ``world_size * total / N_total``.

    With ``gather`` under a process group the mean over ranks is then the mean over every
    rank's rows (every rank must call it). No row anywhere gives ``0 * total``.
    """
    distributed = gather and is_initialized()
    n_total = sum(all_gather_sizes(n, total.device)) if distributed else n
    if n_total == 0:
        return 0.0 * total
    return total * ((world_size() if distributed else 1) / n_total)


# ---------------------------------------------------------------------------------------------
# Pools and tables.


@dataclass
class Pool:
    """The rows of one pass holding one modality without the other, one per content.

    Attributes:
        ids: ``LongTensor[N]`` content ids of that modality, increasing.
        embeddings: ``Tensor[N, E]`` mean embedding of each content, L2-normalised.
    """

    ids: Tensor
    embeddings: Tensor

    @property
    def size(self) -> int:
        """Number of contents ``N``."""
        return int(self.ids.shape[0])


def unimodal_pool(rows: PassRows, modality: str, other: str) -> Pool:
    """The contents of ``modality`` in pass rows where ``other`` is absent (``content_means``)."""
    keep = rows.present[modality] & ~rows.present[other]
    ids, means = content_means(rows.content[modality][keep], rows.embeddings[modality][keep])
    return Pool(ids, F.normalize(means, dim=1))


def find_ids(ids: Tensor, table_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Where content ``ids [N]`` sit in ``table_ids [M]`` (increasing): ``(found [N], index [N])``.

    ``index`` is meaningful only where ``found``.
    """
    if table_ids.numel() == 0:
        return torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids)
    index = torch.searchsorted(table_ids, ids).clamp_max(table_ids.shape[0] - 1)
    return table_ids[index] == ids, index


def bank_rows(size: int, cap: int | None, seed: int, device: torch.device) -> Tensor:
    """``LongTensor[min(size, cap)]``: all rows, or a seeded random subset of ``cap`` rows, increasing."""
    if cap is None or size <= cap:
        return torch.arange(size, device=device)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=g)[:cap].sort().values.to(device)


#: Buffers whose size is set by mining; ``load_state_dict`` resizes them to the checkpoint's.
TABLES = ("pair_ids", "pair_embeddings", "pair_confidence", "bank_a", "bank_a_ids", "bank_b", "bank_b_ids")


# ---------------------------------------------------------------------------------------------
# The module.


@register("objective", "pseudo_pairs")
class PseudoPairs(PairObjective):
    """Pseudo-pairs mined between the unimodal pools, refreshed at epoch starts (see the module docstring).

    At the epoch starts of mining (``warmup_epochs``, then every ``refresh_every`` epochs) the
    training split is embedded once (``embed_training_split``: eval mode, no gradient); the rows
    holding ``a`` without ``b`` form the a-pool and the rows holding ``b`` without ``a`` the
    b-pool, each averaged per content id (``Batch.ids_of``) and normalised. The pools are matched
    (``mine_mnn`` or ``mine_ot``), at most ``max_pairs`` of the most confident pairs are kept,
    and the tables below are stored. During the epochs that follow, each batch row holding ``a``
    without ``b`` whose content has a partner is a query: ``pseudo_pair_terms`` against the
    partner's stored embedding, with the stored b-pool as negatives (the bank); symmetrically
    for ``b`` rows. The loss is the mean over the queries of both directions; with none (or
    before the first mining) it is a zero connected to the graph. Labels are never read.

    Pair it with a paired objective (``infonce`` on the kept pairs): the pools are matched in
    the shared space that objective aligns, and the first mining waits ``warmup_epochs``.

    State: the tables are buffers (``pair_ids [2, P]`` content ids of a and b, sorted by a;
    ``pair_embeddings [2, P, E]`` their embeddings from the mining pass; ``pair_confidence [P]``;
    ``bank_a [K_a, E]``/``bank_a_ids [K_a]`` and ``bank_b``/``bank_b_ids``, the pools or a seeded
    subset of ``bank_size``), so a resumed run between refreshes trains on the same tables;
    ``load_state_dict`` resizes them to the checkpoint's. At a mining epoch they are recomputed
    from the weights, deterministically (the bank subset is seeded by ``seed`` and the epoch).

    Data parallel: with ``gather`` (set by the trainer) every rank embeds its shard of the split
    and the rows of all ranks are gathered, so every rank mines the same tables; the loss is
    averaged over the queries of every rank (``mean_over_rows``). Targets and bank are
    constants, so nothing else crosses ranks. Runs under gradient caching (no ``features``).
    Refused under FSDP and streamed shards, like every objective with an epoch-start pass.

    Args:
        modalities: ``[a, b]`` (default: the model's two).
        matching: ``mnn`` (mutual nearest neighbours by CSLS), ``ot`` (Sinkhorn plan) or
            ``clusters`` (``mine_clusters``: k-means clusters matched with the votes of the
            split's known pairs, rows paired inside matched clusters).
        threshold: ``mnn``, ``clusters``: minimum cosine of a pair, in ``[-1, 1]``; ``ot``: minimum
            row-normalised plan mass, in ``[0, 1]``.
        csls_k: ``mnn``: neighbours of the CSLS correction; ``null``: plain cosine.
        epsilon: ``ot``: entropic regularisation (cost ``1 - cosine``); at 0.05 the plan of a
            few hundred rows in 16 dimensions is too flat for a 0.5 mass threshold.
        ot_iterations: ``ot``: Sinkhorn iterations.
        clusters: ``clusters``: k-means clusters per pool.
        anchor_weight: ``clusters``: weight of the known pairs' votes against the centroids' cosine.
        consensus_k: Before matching, replace each pool row by the mean of its ``k`` nearest
            rows of its own pool (``neighbourhood_means``); the stored targets and banks are the
            smoothed rows too. ``null``: match the rows themselves.
        refresh_every: Epochs between minings.
        warmup_epochs: Epochs before the first mining (loss zero until then).
        max_pairs: Keep at most this many pairs, the most confident; ``null``: all.
        bank_size: Negatives kept per modality (a seeded subset of the pool); ``null``: all.
        temperature: Initial temperature.
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        seed: Seed of the bank subsets.
        gather: Under data parallelism, mine the rows of every rank and average over them.

    Raises:
        ConfigError: Naming the argument: an unknown ``matching``, a ``threshold`` outside its
            range, or a count or scale that is not positive.
    """

    pair_ids: Tensor
    pair_embeddings: Tensor
    pair_confidence: Tensor
    bank_a: Tensor
    bank_a_ids: Tensor
    bank_b: Tensor
    bank_b_ids: Tensor
    mined_epoch: Tensor

    def __init__(
        self,
        modalities: list[str] | None = None,
        matching: Matching = "mnn",
        threshold: float = 0.5,
        csls_k: int | None = 10,
        epsilon: float = 0.02,
        ot_iterations: int = 100,
        clusters: int = 10,
        anchor_weight: float = 1.0,
        consensus_k: int | None = None,
        refresh_every: int = 1,
        warmup_epochs: int = 1,
        max_pairs: int | None = None,
        bank_size: int | None = None,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        seed: int = 0,
        gather: bool = False,
    ) -> None:
        super().__init__(modalities, "pseudo_pairs")
        _check_mining(matching, threshold, csls_k, epsilon, ot_iterations)
        _check_schedule(refresh_every, warmup_epochs, max_pairs, bank_size)
        self.matching, self.threshold, self.csls_k = matching, threshold, csls_k
        self.epsilon, self.ot_iterations = epsilon, ot_iterations
        check_arg("clusters", clusters >= 1, f"must be >= 1, got {clusters}")
        check_arg("anchor_weight", anchor_weight >= 0, f"must be >= 0, got {anchor_weight}")
        self.clusters, self.anchor_weight = clusters, anchor_weight
        check_arg("consensus_k", consensus_k is None or consensus_k >= 1, f"must be null or >= 1, got {consensus_k}")
        self.consensus_k = consensus_k
        self.refresh_every, self.warmup_epochs = refresh_every, warmup_epochs
        self.max_pairs, self.bank_size, self.seed, self.gather = max_pairs, bank_size, seed, gather
        self.scale = LogitScale(temperature, learn_temperature, max_logit_scale)
        self.embed_dim = 0
        self._make_tables(0)
        self.register_buffer("mined_epoch", torch.full((), -1, dtype=torch.long))
        resize_on_load(self, TABLES)

    def _make_tables(self, embed_dim: int) -> None:
        """Empty mining tables of width ``embed_dim``."""
        self.register_buffer("pair_ids", torch.zeros(2, 0, dtype=torch.long))
        self.register_buffer("pair_embeddings", torch.zeros(2, 0, embed_dim))
        self.register_buffer("pair_confidence", torch.zeros(0))
        for side in ("a", "b"):
            self.register_buffer(f"bank_{side}", torch.zeros(0, embed_dim))
            self.register_buffer(f"bank_{side}_ids", torch.zeros(0, dtype=torch.long))

    def bind(self, model: nn.Module) -> None:
        """Resolve the modalities and the embedding width ``E`` (the heads' ``out_dim``)."""
        super().bind(model)
        self.embed_dim = embed_width(model, self.modalities, self.name)
        self._make_tables(self.embed_dim)

    def mining_epoch(self, epoch: int) -> bool:
        """Whether the tables are refreshed at the start of ``epoch``."""
        return refresh_due(epoch, self.warmup_epochs, self.refresh_every)

    def on_epoch_start(self, model: nn.Module, ctx: EpochContext) -> None:
        """At a mining epoch: embed the training split, match the unimodal pools, store the tables."""
        if not self.mining_epoch(ctx.epoch):
            return
        a, b = self.modalities
        rows = embed_training_split(model, ctx.batches(), self.modalities, self.embed_dim, self.gather)
        pool_a, pool_b = unimodal_pool(rows, a, b), unimodal_pool(rows, b, a)
        if self.consensus_k is not None:
            pool_a = Pool(pool_a.ids, neighbourhood_means(pool_a.embeddings, self.consensus_k))
            pool_b = Pool(pool_b.ids, neighbourhood_means(pool_b.embeddings, self.consensus_k))
        if self.matching == "clusters":
            paired = rows.present[a] & rows.present[b]
            anchors = (rows.embeddings[a][paired], rows.embeddings[b][paired])
            seed = cluster_seed(self.seed, ctx.epoch)
            mined = mine_clusters(
                pool_a.embeddings, pool_b.embeddings, self.clusters, *anchors, self.anchor_weight, self.threshold, seed
            )
        else:
            mined = self.mine(pool_a.embeddings, pool_b.embeddings)
        self._store(pool_a, pool_b, most_confident(mined, self.max_pairs), ctx.epoch)

    def mine(self, a: Tensor, b: Tensor) -> MinedPairs:
        """Pairs between the pools ``a [N, E]`` and ``b [M, E]`` by ``mnn`` or ``ot`` (no anchors)."""
        if self.matching == "ot":
            return mine_ot(a, b, self.threshold, self.epsilon, self.ot_iterations)
        return mine_mnn(a, b, self.threshold, self.csls_k)

    def _store(self, pool_a: Pool, pool_b: Pool, pairs: MinedPairs, epoch: int) -> None:
        """Replace the tables by the pairs of this mining and the (capped) pools as banks."""
        dtype = self.pair_embeddings.dtype
        self.pair_ids = torch.stack([pool_a.ids[pairs.i], pool_b.ids[pairs.j]])
        self.pair_embeddings = torch.stack([pool_a.embeddings[pairs.i], pool_b.embeddings[pairs.j]]).to(dtype)
        self.pair_confidence = pairs.confidence.to(dtype)
        for side, pool in enumerate((pool_a, pool_b)):
            keep = bank_rows(pool.size, self.bank_size, cluster_seed(self.seed, epoch) + side, pool.ids.device)
            setattr(self, f"bank_{'ab'[side]}", pool.embeddings[keep].to(dtype))
            setattr(self, f"bank_{'ab'[side]}_ids", pool.ids[keep])
        self.mined_epoch.fill_(epoch)

    def side_terms(self, outputs: Outputs, batch: Batch, side: int, scale: Tensor) -> Tensor:
        """``Tensor[Q]`` terms of the batch's rows holding modality ``side`` only that have a partner."""
        m, other = self.modalities[side], self.modalities[1 - side]
        ref = next(iter(outputs.embeddings.values()), scale)
        if m not in outputs.embeddings or self.pair_ids.shape[1] == 0:
            return ref.new_zeros(0)
        own = batch.rows(m).to(outputs.embeddings[m].device)
        alone = own & ~batch.rows(other).to(own.device) if other in batch.data else own
        order = torch.argsort(self.pair_ids[side])
        found, index = find_ids(batch.ids_of(m).to(own.device)[alone], self.pair_ids[side][order])
        pair = order[index[found]]
        bank, bank_ids = (self.bank_b, self.bank_b_ids) if side == 0 else (self.bank_a, self.bank_a_ids)
        q = outputs.embeddings[m][alone][found]
        targets = self.pair_embeddings[1 - side][pair].to(q)
        return pseudo_pair_terms(q, targets, self.pair_ids[1 - side][pair], bank.to(q), bank_ids, scale)

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Mean pseudo-pair InfoNCE over both directions; metrics ``temperature``, ``mined``, ``queries``."""
        scale = self.scale()
        terms = torch.cat([self.side_terms(outputs, batch, side, scale) for side in (0, 1)])
        loss = mean_over_rows(terms.sum(), terms.shape[0], self.gather) + outputs.zero(scale)
        metrics = {
            "temperature": float(1.0 / scale.detach().exp()),
            "mined": float(self.pair_ids.shape[1]),
            "queries": float(terms.shape[0]),
        }
        if self.pair_confidence.numel() > 0:
            metrics["confidence"] = float(self.pair_confidence.mean())
        return LossOutput(loss=loss, metrics=metrics)


def _check_mining(matching: str, threshold: float, csls_k: int | None, epsilon: float, ot_iterations: int) -> None:
    """Raise ``ConfigError`` at the first mining argument out of range."""
    if matching not in MATCHINGS:
        raise ConfigError("matching", f"unknown matching {matching!r}", list(MATCHINGS))
    low = 0.0 if matching == "ot" else -1.0
    check_arg("threshold", low <= threshold <= 1.0, f"must be in [{low:g}, 1] for matching {matching}, got {threshold}")
    check_arg("csls_k", csls_k is None or csls_k >= 1, f"must be null or >= 1, got {csls_k}")
    check_arg("epsilon", epsilon > 0, f"must be > 0, got {epsilon}")
    check_arg("ot_iterations", ot_iterations >= 1, f"must be >= 1, got {ot_iterations}")


def _check_schedule(refresh_every: int, warmup_epochs: int, max_pairs: int | None, bank_size: int | None) -> None:
    """Raise ``ConfigError`` at the first schedule or size argument out of range."""
    check_arg("refresh_every", refresh_every >= 1, f"must be >= 1, got {refresh_every}")
    check_arg("warmup_epochs", warmup_epochs >= 0, f"must be >= 0, got {warmup_epochs}")
    check_arg("max_pairs", max_pairs is None or max_pairs >= 1, f"must be null or >= 1, got {max_pairs}")
    check_arg("bank_size", bank_size is None or bank_size >= 1, f"must be null or >= 1, got {bank_size}")
