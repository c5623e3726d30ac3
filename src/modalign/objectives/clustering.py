"""Clustering objectives: cross-modal pseudo-labels (XDC), balanced shared prototypes (SeLaVi), MCN.

* ``swapped_prediction_loss`` / ``SeLaVi``: the loss of SwAV (Caron et al. 2020, "Unsupervised
  Learning of Visual Features by Contrasting Cluster Assignments") applied across modalities
  as in SeLaVi (Asano et al. 2020, "Labelling unlabelled videos from scratch with multi-modal
  self-supervision"): each modality's scores against shared prototypes predict the
  Sinkhorn-balanced codes of the other modality (codes from
  ``modalign.alignment.balanced_assignments``).
* ``xdc_loss`` / ``XDC``: cross-modal deep clustering (Alwassel et al. 2020, "Self-Supervised
  Learning by Cross-Modal Audio-Video Clustering"): k-means pseudo-labels of one modality,
  recomputed at every epoch start over the whole training split, supervise a classifier on
  the other.
* ``centroid_contrastive_loss`` / ``MCNCluster``: the joint-space clustering term of MCN (Chen
  et al. 2021, "Multimodal Clustering Networks for Self-supervised Learning from Unlabeled
  Videos"): k-means of the joint (mean of the modalities') embeddings at every epoch start;
  each modality's embedding is contrasted against the centroids with its sample's centroid as
  the target. The ``mcn`` method adds InfoNCE between the modalities.

Epoch-start passes (``embed_training_split``) hold ``N x E`` embeddings per modality, never an
``N x N`` matrix, and k-means is chunked (``modalign.alignment.kmeans``). Pseudo-labels are keyed
by content id (``Batch.ids_of``) and looked up with ``torch.searchsorted`` (``lookup_labels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.alignment import assign, kmeans
from modalign.core.errors import ConfigError
from modalign.core.modules import Objective
from modalign.core.registry import register
from modalign.core.types import Batch, EpochContext, LossOutput, Outputs, StepContext
from modalign.distributed import all_gather_sizes, is_initialized, world_size
from modalign.objectives.cluster_tables import (
    PassRows,
    PseudoLabels,
    cluster_seed,
    content_means,
    embed_training_split,
    embed_width,
    joint_embeddings,
)
from modalign.objectives.contrastive import Pair, PairObjective, check_known, model_modalities
from modalign.objectives.swapped import pooled_swapped_prediction_loss, swapped_prediction_loss
from modalign.objectives.unimodal import view_positives

# ---------------------------------------------------------------------------------------------
# Plain functions: the XDC and MCN losses.


def _check_logits(logits: Tensor, labels: Tensor, name: str) -> None:
    """Validate ``logits [N, K]`` (``K >= 1``) and ``labels [N]`` in ``[0, K)``.

    Raises:
        ValueError: Naming the shapes or the label out of range.
    """
    if logits.dim() != 2 or logits.shape[1] == 0 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"{name}: expected [N, K] (K >= 1) and [N], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    low, high = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
    if low < 0 or high >= logits.shape[1]:
        raise ValueError(f"{name}: labels must lie in [0, {logits.shape[1]}), got {low}..{high}")


def _global_mean(total: Tensor, n: int, gather: bool, name: str) -> Tensor:
    """``total`` (a sum over ``n`` local rows) divided as the distributed convention asks.

    Without gathering ``total / n``; with ``gather`` and a process group
    ``world_size * total / N_total``, so the mean over ranks is the mean over the global batch.

    Raises:
        ValueError: If there are no rows at all and nothing gathers.
    """
    distributed = gather and is_initialized()
    n_total = sum(all_gather_sizes(n, total.device)) if distributed else n
    if n_total == 0:
        if not distributed:
            raise ValueError(f"{name} got an empty batch (0 rows)")
        return 0.0 * total
    return total * ((world_size() if distributed else 1) / n_total)


def xdc_loss(logits_a: Tensor, logits_b: Tensor, labels_a: Tensor, labels_b: Tensor, gather: bool = False) -> Tensor:
    """Cross-modal deep clustering (XDC; Alwassel et al. 2020): each modality predicts the other's cluster.

    ``0.5 * (mean_i CE(logits_a[i], labels_b[i]) + mean_i CE(logits_b[i], labels_a[i]))``, where
    ``labels_m`` are the k-means pseudo-labels of modality ``m`` and ``logits_m`` the
    classifier outputs on modality ``m``: audio learns to predict the visual cluster of its
    clip and vision the audio cluster.

    With ``gather=True`` and an initialised process group each rank returns
    ``world_size * sum_local / (2 N_total)``: the mean over ranks is the loss of the global
    batch (the rows do not interact, so nothing else is gathered). Ranks may hold different
    numbers of rows, including none.

    Args:
        logits_a: ``Tensor[N, K]`` classifier logits of modality a (predicting b's clusters).
        logits_b: ``Tensor[N, K]`` classifier logits of modality b (predicting a's clusters).
        labels_a: ``LongTensor[N]`` cluster of each row's modality-a content, in ``[0, K)``.
        labels_b: ``LongTensor[N]`` cluster of each row's modality-b content.
        gather: Average over the rows of all ranks.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If shapes disagree, a label is out of range, or (without gathering) the
            batch is empty.
    """
    _check_logits(logits_a, labels_b, "xdc_loss (a predicts b)")
    _check_logits(logits_b, labels_a, "xdc_loss (b predicts a)")
    ce = F.cross_entropy(logits_a, labels_b, reduction="sum") + F.cross_entropy(logits_b, labels_a, reduction="sum")
    return 0.5 * _global_mean(ce, logits_a.shape[0], gather, "xdc_loss")


def centroid_contrastive_loss(
    embeddings: Tensor, centroids: Tensor, targets: Tensor, temperature: float = 0.1, gather: bool = False
) -> Tensor:
    """MCN's joint-space clustering term (Chen et al. 2021, "Multimodal Clustering Networks").

    Each embedding is contrasted against every centroid: ``mean_i CE(z_i C^T / T, t_i)``, the
    softmax over centroids with the sample's assigned centroid ``t_i`` as the target, which
    pulls ``z_i`` toward its centroid and away from the others. The centroids are constants
    (k-means of the joint space); only the embeddings get gradient.

    With ``gather=True`` and an initialised process group each rank returns
    ``world_size * sum_local / N_total`` (mean over ranks = global mean). Ranks may hold
    different numbers of rows, including none.

    Args:
        embeddings: ``Tensor[N, E]`` L2-normalised embeddings of one modality.
        centroids: ``Tensor[K, E]`` unit-norm centroids (detached here).
        targets: ``LongTensor[N]`` assigned centroid of each row, in ``[0, K)``.
        temperature: Softmax temperature.
        gather: Average over the rows of all ranks.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If shapes disagree, a target is out of range, ``temperature <= 0`` or
            (without gathering) the batch is empty.
    """
    if embeddings.dim() != 2 or centroids.dim() != 2 or embeddings.shape[1] != centroids.shape[1]:
        raise ValueError(
            "expected embeddings [N, E] and centroids [K, E], "
            f"got {tuple(embeddings.shape)} and {tuple(centroids.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = embeddings @ centroids.detach().to(embeddings.dtype).T / temperature
    _check_logits(logits, targets, "centroid_contrastive_loss")
    ce = F.cross_entropy(logits, targets, reduction="sum")
    return _global_mean(ce, embeddings.shape[0], gather, "centroid_contrastive_loss")


# ---------------------------------------------------------------------------------------------
# Modules.


def _empty_pair(outputs: Outputs, embed_dim: int, like: Tensor) -> Pair:
    """A pair of zero rows (a rank that must still join the collectives of a gathered loss).

    Its dtype and device are those of the outputs' embeddings, else of ``like``.
    """
    ref = next(iter(outputs.embeddings.values()), like)
    empty = ref.new_zeros(0, embed_dim)
    ids = torch.zeros(0, dtype=torch.long, device=ref.device)
    return Pair(empty, empty, ids, ids)


def _check_clustering(clusters: int, iterations: int, temperature: float) -> None:
    """Raise ``ConfigError`` unless ``clusters >= 2``, ``iterations >= 1`` and ``temperature > 0``."""
    if clusters < 2 or iterations < 1:
        raise ConfigError("clusters", f"need clusters >= 2 and iterations >= 1, got {clusters} and {iterations}")
    _check_positive(temperature=temperature)


def _check_positive(**values: float) -> None:
    """Raise a ``ConfigError`` naming the first argument that is not strictly positive."""
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(key, f"must be > 0, got {value}")


@register("objective", "xdc")
class XDC(PairObjective):
    """Cross-modal deep clustering (Alwassel et al. 2020): each modality predicts the other's k-means cluster.

    At every epoch start the whole training split is embedded (eval mode, no gradient); for
    each modality the normalised embeddings (the projection heads' output, the space the
    evaluation reads) are averaged per content id (``Batch.ids_of``: av-digits keys audio by
    recording) and clustered by spherical k-means (k-means++ seeded by ``seed`` and the
    epoch). During the epoch a classifier per modality predicts the other modality's cluster
    (``xdc_loss``). The first epoch's labels come from the randomly initialised network, as in
    XDC.

    Classifiers: cosine classifiers, ``logits = z @ normalize(W_m)^T / temperature`` with
    ``W_m: [k, E]`` owned here (one parameter ``classifiers [2, k, E]``, built in ``bind`` from
    the heads' ``out_dim``). Cluster ids are arbitrary after each k-means, so, as XDC and
    DeepCluster do, the classifiers are re-initialised at every refresh: deterministically, by
    weight imprinting (Qi et al. 2018, "Low-Shot Learning with Imprinted Weights"): row ``j``
    of modality a's classifier becomes the normalised mean of a's embeddings over the training
    rows whose b-content is in b's cluster ``j`` (and symmetrically), then it is trained. The
    labels and classifiers are a deterministic function of the weights and the epoch, so a
    resumed run recomputes them exactly; the centroids are a buffer, kept for
    ``cluster_assignments`` after loading a checkpoint.

    Args:
        modalities: The two modalities (default: the model's two).
        clusters: ``k`` of k-means (per modality; XDC over-clusters).
        temperature: Temperature of the cosine classifiers.
        iterations: Lloyd iterations per refresh.
        seed: Seed of the k-means++ draws.
        gather: Under data parallelism cluster the rows of all ranks and average the loss
            over the global batch.

    Raises:
        ConfigError: If ``clusters < 2``, ``iterations < 1`` or ``temperature <= 0``.
    """

    centroids: Tensor
    fitted: Tensor

    def __init__(
        self,
        modalities: list[str] | None = None,
        clusters: int = 32,
        temperature: float = 0.1,
        iterations: int = 20,
        seed: int = 0,
        gather: bool = False,
    ) -> None:
        super().__init__(modalities, "xdc")
        _check_clustering(clusters, iterations, temperature)
        self.clusters, self.temperature, self.iterations = clusters, temperature, iterations
        self.seed, self.gather = seed, gather
        self.embed_dim = 0
        self.classifiers = nn.Parameter(torch.zeros(0))
        self.register_buffer("centroids", torch.zeros(0))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.labels = PseudoLabels("xdc")

    def bind(self, model: nn.Module) -> None:
        """Resolve the modalities, then build the classifiers and centroids (both ``[2, k, E]``)."""
        super().bind(model)
        self.embed_dim = embed_width(model, self.modalities, self.name)
        self.classifiers = nn.Parameter(F.normalize(torch.randn(2, self.clusters, self.embed_dim), dim=2))
        self.register_buffer("centroids", torch.zeros(2, self.clusters, self.embed_dim))

    def on_epoch_start(self, model: nn.Module, ctx: EpochContext) -> None:
        """Embed the training split, refresh both modalities' k-means labels, imprint the classifiers."""
        rows = embed_training_split(model, ctx.batches(), self.modalities, self.embed_dim, self.gather)
        seed = cluster_seed(self.seed, ctx.epoch)
        for i, m in enumerate(self.modalities):
            keep = rows.present[m]
            ids, features = content_means(rows.content[m][keep], rows.embeddings[m][keep])
            result = kmeans(features, self.clusters, self.iterations, seed=seed + i, spherical=True)
            self.centroids[i].copy_(result.centroids.to(self.centroids))
            self.labels.tables[m] = (ids, result.assignments)
        self.fitted.fill_(True)
        self.imprint(rows)

    def imprint(self, rows: PassRows) -> None:
        """Set each classifier row to the normalised mean embedding of the other modality's cluster.

        Rows of a cluster that no paired training row falls into keep their weights.
        """
        a, b = self.modalities
        both = rows.present[a] & rows.present[b]
        with torch.no_grad():
            for i, (m, other) in enumerate(((a, b), (b, a))):
                target = self.labels(other, rows.content[other][both])
                sums = torch.zeros(self.clusters, self.embed_dim, device=target.device)
                sums.index_add_(0, target, rows.embeddings[m][both].to(sums))
                filled = sums.norm(dim=1) > 0
                self.classifiers[i, filled] = F.normalize(sums[filled], dim=1).to(self.classifiers)

    def logits(self, embeddings: Tensor, index: int) -> Tensor:
        """``Tensor[N, k]`` cosine logits of ``embeddings [N, E]`` by classifier ``index`` (modality order)."""
        return embeddings @ F.normalize(self.classifiers[index], dim=1).T / self.temperature

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """The XDC loss on the paired rows; metrics ``acc_a2b``/``acc_b2a`` (label prediction)."""
        distributed = self.gather and is_initialized()
        pair = self.pair(outputs, batch)
        if pair is None and distributed:
            pair = _empty_pair(outputs, self.embed_dim, self.classifiers)
        if pair is None or (pair.size == 0 and not distributed):
            return LossOutput(loss=outputs.zero(self.classifiers))
        a, b = self.modalities
        labels_a, labels_b = self.labels(a, pair.ids_a), self.labels(b, pair.ids_b)
        logits_a, logits_b = self.logits(pair.a, 0), self.logits(pair.b, 1)
        loss = xdc_loss(logits_a, logits_b, labels_a, labels_b, self.gather)
        metrics = {"paired": float(pair.size)}
        if pair.size > 0:
            metrics["acc_a2b"] = float((logits_a.argmax(dim=1) == labels_b).float().mean())
            metrics["acc_b2a"] = float((logits_b.argmax(dim=1) == labels_a).float().mean())
        return LossOutput(loss=loss, metrics=metrics)

    def cluster_assignments(self, embeddings: dict[str, Tensor]) -> dict[str, Tensor]:
        """Own clustering of new rows: ``{m: LongTensor[N]}`` nearest centroid of the last refresh.

        Raises:
            ValueError: Before the first epoch-start refresh.
        """
        if not bool(self.fitted):
            raise ValueError("xdc: no centroids yet; on_epoch_start must run first")
        return {
            m: assign(embeddings[m], self.centroids[i], spherical=True)
            for i, m in enumerate(self.modalities)
            if m in embeddings
        }


@register("objective", "selavi")
class SeLaVi(PairObjective):
    """Cross-modal SwAV with shared prototypes (SeLaVi, Asano et al. 2020; SwAV, Caron et al. 2020).

    ``K`` learnable prototypes ``[K, E]`` (a parameter built in ``bind``, L2-normalised in the
    forward pass and re-normalised in place after every step, as SwAV does) are shared by
    both modalities; the scores ``z_m @ normalize(C)^T`` of each modality's normalised
    embeddings predict the Sinkhorn-balanced codes of the other (``swapped_prediction_loss``).
    The prototypes get no gradient during the first ``freeze_steps`` optimiser steps (SwAV
    freezes them for the first epoch); the step count is a buffer, so it survives a resume.
    SeLaVi trains several clustering heads with different ``K``; this is one head.

    With ``views: true`` (mix-paired training: a few pairs plus unimodal pools read as several
    augmented views per sample, ``data.unimodal_views``) the loss is
    ``pooled_swapped_prediction_loss``: paired rows predict their partner's code and every view
    of a unimodal sample predicts its other views' codes, all on the same prototypes, with the
    codes balanced over every observed row of a modality. Not combined with ``gather``.

    Prototype initialisation (``init_prototypes``, a departure from SwAV's random ones): at the
    first epoch start the training split is embedded and the prototypes are set to the
    spherical k-means centroids (seeded by ``seed``) of the samples' joint embeddings (mean of
    the two modalities'). Random unit vectors in ``E`` dimensions are nearly orthogonal to
    every embedding, so the predictions start almost uniform and the early steps learn little;
    prototypes placed among the data start the swapped prediction with informative codes. A
    buffer records that it was done, so a resumed run does not redo it.

    Args:
        modalities: The two modalities (default: the model's two).
        prototypes: Number of prototypes ``K``.
        temperature: Softmax temperature of the predictions (SwAV: 0.1).
        epsilon: Entropic regularisation of the codes (SwAV: 0.05).
        iterations: Sinkhorn iterations of the codes (SwAV: 3).
        freeze_steps: Optimiser steps during which the prototypes are not trained.
        init_prototypes: Set the prototypes to k-means centroids of the data at the first
            epoch start.
        seed: Seed of that k-means.
        gather: Balance the codes over the global batch of all ranks.
        views: Also predict across the views of unimodal samples (SwAV within each pool).

    Raises:
        ConfigError: If ``prototypes < 2``, a positive argument is not, or ``views`` is
            combined with ``gather``.
    """

    steps: Tensor
    initialised: Tensor

    def __init__(
        self,
        modalities: list[str] | None = None,
        prototypes: int = 32,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        iterations: int = 3,
        freeze_steps: int = 0,
        init_prototypes: bool = True,
        seed: int = 0,
        gather: bool = False,
        views: bool = False,
    ) -> None:
        super().__init__(modalities, "selavi")
        if prototypes < 2:
            raise ConfigError("prototypes", f"must be >= 2, got {prototypes}")
        if views and gather:
            raise ConfigError("views", "swapped prediction over unimodal views is per rank: not with gather: true")
        self.views = views
        _check_positive(temperature=temperature, epsilon=epsilon, iterations=iterations)
        self.n_prototypes, self.temperature, self.epsilon = prototypes, temperature, epsilon
        self.iterations, self.freeze_steps, self.gather = iterations, freeze_steps, gather
        self.init_prototypes, self.seed = init_prototypes, seed
        self.embed_dim = 0
        self.prototypes = nn.Parameter(torch.zeros(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def bind(self, model: nn.Module) -> None:
        """Resolve the modalities and draw the prototypes: ``K`` random unit vectors of width ``E``."""
        super().bind(model)
        self.embed_dim = embed_width(model, self.modalities, self.name)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(self.n_prototypes, self.embed_dim), dim=1))

    def on_epoch_start(self, model: nn.Module, ctx: EpochContext) -> None:
        """Once (with ``init_prototypes``): prototypes = k-means centroids of the joint embeddings."""
        if not self.init_prototypes or bool(self.initialised):
            return
        rows = embed_training_split(model, ctx.batches(), self.modalities, self.embed_dim, self.gather)
        _, joint = joint_embeddings(rows, self.modalities)
        result = kmeans(joint, self.n_prototypes, 20, seed=cluster_seed(self.seed, ctx.epoch), spherical=True)
        with torch.no_grad():
            self.prototypes.copy_(result.centroids.to(self.prototypes))
        self.initialised.fill_(True)

    @property
    def frozen(self) -> bool:
        """Whether the prototypes are still frozen (fewer than ``freeze_steps`` steps taken)."""
        return int(self.steps) < self.freeze_steps

    def scores(self, embeddings: Tensor) -> Tensor:
        """``Tensor[N, K]`` cosine scores of normalised ``embeddings [N, E]`` against the prototypes."""
        prototypes = F.normalize(self.prototypes, dim=1)
        return embeddings @ (prototypes.detach() if self.frozen else prototypes).T

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Swapped prediction on the paired rows; metrics ``agreement`` (same argmax) and ``used``."""
        if self.views:
            return self.pooled_forward(outputs, batch)
        distributed = self.gather and is_initialized()
        pair = self.pair(outputs, batch)
        if pair is None and distributed:
            pair = _empty_pair(outputs, self.embed_dim, self.prototypes)
        if pair is None or (pair.size == 0 and not distributed):
            return LossOutput(loss=outputs.zero(self.prototypes))
        scores_a, scores_b = self.scores(pair.a), self.scores(pair.b)
        loss = swapped_prediction_loss(scores_a, scores_b, self.temperature, self.epsilon, self.iterations, self.gather)
        metrics = {"paired": float(pair.size)}
        if pair.size > 0:
            top_a, top_b = scores_a.argmax(dim=1), scores_b.argmax(dim=1)
            metrics["agreement"] = float((top_a == top_b).float().mean())
            metrics["used"] = float(torch.cat([top_a, top_b]).unique().numel())
        return LossOutput(loss=loss, metrics=metrics)

    def pooled_forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """``views: true``: ``pooled_swapped_prediction_loss`` over every observed row of both modalities.

        Metrics: ``paired`` rows, ``viewed`` rows (unimodal rows with another view in the batch),
        ``agreement`` of the paired rows' top prototypes and ``used`` prototypes.
        """
        a, b = self.modalities
        if a not in outputs.embeddings or b not in outputs.embeddings:
            return LossOutput(loss=outputs.zero(self.prototypes))
        device = outputs.embeddings[a].device
        rows = {m: batch.rows(m).to(device).nonzero().squeeze(1) for m in (a, b)}
        scores = {m: self.scores(outputs.embeddings[m][rows[m]]) for m in (a, b)}
        views = {m: view_positives(batch.ids_of(m).to(device)[rows[m]]) for m in (a, b)}
        pairs = rows[a][:, None] == rows[b][None, :]
        loss = pooled_swapped_prediction_loss(
            (scores[a], scores[b]), (views[a], views[b], pairs), self.temperature, self.epsilon, self.iterations
        )
        viewed = sum(int(v.any(dim=1).sum()) for v in views.values())
        metrics = {"paired": float(pairs.sum()), "viewed": float(viewed)}
        with torch.no_grad():
            top = {m: scores[m].argmax(dim=1) for m in (a, b)}
            ia, ib = pairs.nonzero(as_tuple=True)
            if ia.numel() > 0:
                metrics["agreement"] = float((top[a][ia] == top[b][ib]).float().mean())
            metrics["used"] = float(torch.cat([top[a], top[b]]).unique().numel())
        return LossOutput(loss=loss, metrics=metrics)

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        """Record the step count and project the prototypes back onto the unit sphere."""
        self.steps.fill_(ctx.step)
        with torch.no_grad():
            self.prototypes.copy_(F.normalize(self.prototypes, dim=1))

    def cluster_assignments(self, embeddings: dict[str, Tensor]) -> dict[str, Tensor]:
        """Own clustering of new rows: ``{m: LongTensor[N]}`` the prototype of highest score."""
        with torch.no_grad():
            return {m: self.scores(embeddings[m]).argmax(dim=1) for m in self.modalities if m in embeddings}


@register("objective", "mcn_cluster")
class MCNCluster(Objective):
    """MCN's joint-space clustering term (Chen et al. 2021, "Multimodal Clustering Networks").

    At every epoch start the training split is embedded (eval mode, no gradient); each
    sample's joint embedding is the mean of its observed modalities' normalised embeddings
    (averaged over the pass rows of the same sample id), and spherical k-means (k-means++
    seeded by ``seed`` and the epoch) clusters the joint embeddings into ``clusters``
    centroids. During the epoch every modality's embedding is contrasted against the
    centroids with its sample's centroid as the target (``centroid_contrastive_loss``); the
    loss is the sum of the per-modality terms divided by the number of modalities. MCN's
    contrastive term is a separate ``infonce`` objective (the ``mcn`` method adds both); its
    reconstruction term is not used. The centroids are a buffer (saved, for
    ``cluster_assignments`` after loading), recomputed from the weights at every epoch start.

    Args:
        modalities: The modalities of the joint space (default: all of the model's).
        clusters: Number of centroids ``k``.
        temperature: Softmax temperature over the centroids.
        iterations: Lloyd iterations per refresh.
        seed: Seed of the k-means++ draws.
        gather: Under data parallelism cluster the rows of all ranks and average the loss
            over the global batch.

    Raises:
        ConfigError: If ``clusters < 2``, ``iterations < 1``, ``temperature <= 0`` or a
            modality is repeated.
    """

    centroids: Tensor

    def __init__(
        self,
        modalities: list[str] | None = None,
        clusters: int = 32,
        temperature: float = 0.1,
        iterations: int = 20,
        seed: int = 0,
        gather: bool = False,
    ) -> None:
        super().__init__()
        _check_clustering(clusters, iterations, temperature)
        if modalities is not None and (not modalities or len(set(modalities)) != len(modalities)):
            raise ConfigError("modalities", f"mcn_cluster needs distinct modality names, got {modalities}")
        self._modalities = tuple(modalities) if modalities is not None else None
        self.clusters, self.temperature, self.iterations = clusters, temperature, iterations
        self.seed, self.gather = seed, gather
        self.embed_dim = 0
        self.register_buffer("centroids", torch.zeros(0))
        self.labels = PseudoLabels("mcn_cluster")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities of the joint space.

        Raises:
            ValueError: If they were neither given nor resolved by ``bind``.
        """
        if self._modalities is None:
            raise ValueError("mcn_cluster: no modalities given and not bound to a model")
        return self._modalities

    def bind(self, model: nn.Module) -> None:
        """Resolve the modalities (default: the model's), check them, build the centroid buffer ``[k, E]``."""
        if self._modalities is None:
            self._modalities = model_modalities(model)
        check_known(self.modalities, model, "mcn_cluster")
        self.embed_dim = embed_width(model, self.modalities, "mcn_cluster")
        self.register_buffer("centroids", torch.zeros(self.clusters, self.embed_dim))

    def on_epoch_start(self, model: nn.Module, ctx: EpochContext) -> None:
        """Embed the training split, cluster the joint embeddings, assign every sample id."""
        rows = embed_training_split(model, ctx.batches(), self.modalities, self.embed_dim, self.gather)
        ids, joint = joint_embeddings(rows, self.modalities)
        result = kmeans(joint, self.clusters, self.iterations, seed=cluster_seed(self.seed, ctx.epoch), spherical=True)
        self.centroids.copy_(result.centroids.to(self.centroids))
        self.labels.tables["joint"] = (ids, result.assignments)

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Sum over modalities of ``centroid_contrastive_loss`` / number of modalities; metrics ``acc_<m>``."""
        distributed = self.gather and is_initialized()
        terms: list[Tensor] = []
        metrics: dict[str, float] = {}
        for m in self.modalities:
            observed = m in outputs.embeddings
            rows = batch.rows(m).to(batch.ids.device) & observed
            if not (bool(rows.any()) or distributed):
                continue
            emb = outputs.embeddings[m][rows] if observed else self.centroids.new_zeros(0, self.embed_dim)
            targets = self.labels("joint", batch.ids[rows])
            terms.append(centroid_contrastive_loss(emb, self.centroids, targets, self.temperature, self.gather))
            if emb.shape[0] > 0:
                hits = (emb.detach() @ self.centroids.T).argmax(dim=1) == targets
                metrics[f"acc_{m}"] = float(hits.float().mean())
        if not terms:
            return LossOutput(loss=outputs.zero(), metrics=metrics)
        loss = torch.stack(terms).sum() / len(self.modalities) + outputs.zero()
        return LossOutput(loss=loss, metrics=metrics)

    def cluster_assignments(self, embeddings: dict[str, Tensor]) -> dict[str, Tensor]:
        """Own clustering of new rows: ``{m: LongTensor[N]}`` nearest joint centroid."""
        return {m: assign(embeddings[m], self.centroids, spherical=True) for m in self.modalities if m in embeddings}
