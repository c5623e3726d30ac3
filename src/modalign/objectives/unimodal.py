"""Within-modality instance discrimination for the unimodal pools of mix-paired training.

``unimodal_infonce``: SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML) generalised to several positives per anchor as in SupCon
(Khosla et al. 2020, "Supervised Contrastive Learning", NeurIPS, the "L_out" form). The data
layer puts independently augmented reads ("views") of one unimodal sample in the same batch:
rows of modality ``m`` that share a content id (``Batch.ids_of(m)``). Each such row is an
anchor whose positives are its other views; every other observed row of ``m`` in the batch is
a negative. Rows without another view are negatives only.

With ``neighbours: k`` a row's positives also include the ``k`` rows of the batch nearest to it
in its encoder's pooled feature space (``Outputs.pooled``), as NNCLR (Dwibedi et al. 2021,
"With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of Visual
Representations", ICCV) takes neighbours as positives; here the neighbours come from the
encoder's features rather than the learnt embedding, which is what a stitched model with a frozen
pretrained encoder wants: its adapter, trained across modalities on a few pairs, keeps the
pretrained neighbourhoods of the unimodal pools instead of forgetting them.

``unimodal_infonce_loss`` holds the mathematics; the registered module ``UnimodalInfoNCE``
selects each modality's observed rows, optionally maps them through a SimCLR projection head
``g(.)`` of its own, and averages over the modalities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Objective
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.objectives.cluster_tables import embed_width
from modalign.objectives.contrastive import LogitScale, check_known, model_modalities
from modalign.objectives.unaligned import check_arg, scale_of


def view_positives(content: Tensor) -> Tensor:
    """``BoolTensor[N, N]``: ``[i, p]`` True where rows ``i != p`` hold the same content (other views).

    Args:
        content: ``LongTensor[N]`` content ids of the rows.
    """
    n = content.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=content.device)
    return (content[:, None] == content[None, :]) & ~eye


def feature_neighbours(features: Tensor, content: Tensor, k: int) -> Tensor:
    """``BoolTensor[N, N]``: ``[i, j]`` True where row ``j`` is one of the ``k`` rows nearest to row ``i``.

    Nearest by cosine of ``features`` among the rows of another content (a row's own views are
    its positives already); fewer than ``k`` where fewer such rows exist. Ties are broken by
    ``topk``.

    Args:
        features: ``Tensor[N, D]`` features the neighbourhoods are read from (no gradient).
        content: ``LongTensor[N]`` content ids.
        k: Neighbours per row, ``>= 0``.
    """
    n = features.shape[0]
    out = torch.zeros(n, n, dtype=torch.bool, device=features.device)
    k = min(k, n - 1)
    if k <= 0:
        return out
    with torch.no_grad():
        unit = F.normalize(features.float(), dim=1)
        sim = (unit @ unit.T).masked_fill(content[:, None] == content[None, :], float("-inf"))
        top = sim.topk(k, dim=1)
        out.scatter_(1, top.indices, torch.isfinite(top.values))
    return out


def positive_infonce_loss(z: Tensor, positive: Tensor, logit_scale: Tensor) -> Tensor:
    """SupCon "L_out" among the rows of one modality with the given positives (see ``unimodal_infonce_loss``).

    Args:
        z: ``Tensor[N, E]`` embeddings, assumed L2-normalised.
        positive: ``BoolTensor[N, N]``, ``[i, p]`` True where ``p`` is a positive of ``i``
            (the diagonal is ignored); the anchors are the rows with at least one.
        logit_scale: Scalar tensor, the log of the inverse temperature.

    Raises:
        ValueError: If ``z`` is not 2-D or ``positive`` not ``[N, N]``.
    """
    if z.dim() != 2:
        raise ValueError(f"z must be [N, E], got shape {tuple(z.shape)}")
    n = z.shape[0]
    if positive.shape != (n, n):
        raise ValueError(f"positive must be [N, N] with N={n}, got shape {tuple(positive.shape)}")
    scale = scale_of(logit_scale)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    positive = positive.to(z.device) & ~eye
    anchors = positive.any(dim=1)
    if not bool(anchors.any()):
        return 0.0 * (z.sum() + scale)
    logits = (scale * z[anchors] @ z.T).masked_fill(eye[anchors], float("-inf"))
    log_prob = F.log_softmax(logits, dim=1)
    pos = positive[anchors]
    per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(dim=1) / pos.sum(dim=1)
    return per_anchor.mean()


def unimodal_infonce_loss(z: Tensor, content: Tensor, logit_scale: Tensor) -> Tensor:
    """SimCLR / SupCon "L_out" instance discrimination among the rows of one modality.

    With ``s_ik = exp(logit_scale) * z_i . z_k``, the anchors are the rows ``i`` with at least
    one other row of the same content, ``P(i) = {p != i: content[p] == content[i]}``, and

        ``loss_i = -(1/|P(i)|) sum_{p in P(i)} log(exp(s_ip) / sum_{k != i} exp(s_ik))``;

    the loss is the mean of ``loss_i`` over the anchors. The anchor itself is left out of its
    denominator; rows without positives still serve as negatives of the anchors. Two views per
    content (``z = [a; b]``, ``content = [0..N-1, 0..N-1]``) give SimCLR's NT-Xent.

    No anchor (every content id appears once, or ``N < 2``): a zero connected to ``z`` and
    ``logit_scale`` (zero gradients), so a batch without views trains nothing and the backward
    pass still runs.

    Args:
        z: ``Tensor[N, E]`` embeddings, assumed L2-normalised.
        content: ``LongTensor[N]`` content ids (equal ids = views of one sample).
        logit_scale: Scalar tensor, the log of the inverse temperature.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If ``z`` is not 2-D, ``content`` not ``[N]`` or ``logit_scale`` not a scalar.
    """
    if z.dim() != 2:
        raise ValueError(f"z must be [N, E], got shape {tuple(z.shape)}")
    if content.shape != z.shape[:1]:
        raise ValueError(f"content must be [N] with N={z.shape[0]}, got shape {tuple(content.shape)}")
    return positive_infonce_loss(z, view_positives(content.to(z.device)), logit_scale)


def view_top1(z: Tensor, views: Tensor) -> tuple[int, float]:
    """Anchors and the fraction of them whose most similar other row is one of their views.

    Args:
        z: ``Tensor[N, E]`` embeddings.
        views: ``BoolTensor[N, N]`` the other views of each row (``view_positives`` of its content ids).

    Returns:
        ``(anchors, top1)``; ``top1`` is ``0.0`` without anchors.
    """
    with torch.no_grad():
        positive = views.to(z.device)
        anchors = positive.any(dim=1)
        count = int(anchors.sum())
        if count == 0:
            return 0, 0.0
        own = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)[anchors]
        sim = (z[anchors] @ z.T).masked_fill(own, float("-inf"))
        hit = positive[anchors].gather(1, sim.argmax(dim=1, keepdim=True))
        return count, float(hit.float().mean())


def projection_head(width: int, dim: int) -> nn.Module:
    """SimCLR's ``g(.)``: ``Linear(width, width) -> ReLU -> Linear(width, dim)``."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))


@register("objective", "unimodal_infonce")
class UnimodalInfoNCE(Objective):
    """Instance discrimination within each modality (see ``unimodal_infonce_loss``; SimCLR, SupCon).

    For each modality ``m``: the rows where ``m`` is observed (``batch.rows(m)``), their
    ``outputs.embeddings[m]`` (``Tensor[B, E]``), through the projection head ``g_m`` when
    ``dim`` is set, L2-normalised; views are the rows sharing a content id ``batch.ids_of(m)``.
    The loss is the mean over anchors within a modality, then the mean over the modalities with
    at least one anchor (parts: one per such modality, named by it). A modality absent from the
    batch, or without two views of one content, is skipped; with no anchor anywhere the loss is
    a zero connected to every embedding, the temperature and the heads.

    The projection head (Chen et al. 2020, section 4.2) keeps the instance term from acting
    directly on the shared space the cross-modal objectives align: the views are pulled
    together after ``g_m``, a per-modality ``Linear(E, E) -> ReLU -> Linear(E, dim)`` built in
    ``bind`` from the model's embedding width ``E``.

    Not gathered across ranks: each rank contrasts its own rows (views of one sample are put in
    the same local batch by the data layer), like ``milnce``. Runs under gradient caching (no
    ``features``). The objective's weight in a method is the recipe entry's ``weight``.

    Args:
        modalities: Modalities taking part (default: all of the model's, resolved in ``bind``).
        temperature: Initial temperature (SimCLR: 0.1).
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        dim: Output width of the per-modality projection head; ``None``: no head (the loss acts
            on the shared embeddings).
        neighbours: Also take each row's ``k`` nearest rows of the batch in its encoder's pooled
            feature space as positives (``feature_neighbours``); ``0``: views only (SimCLR).

    Raises:
        ConfigError: Naming the argument: empty or repeated ``modalities``, ``temperature <= 0``,
            ``max_logit_scale <= 0``, ``dim < 1`` or ``neighbours < 0``; at ``bind``, a modality the model lacks.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 0.1,
        learn_temperature: bool = False,
        max_logit_scale: float = 100.0,
        dim: int | None = None,
        neighbours: int = 0,
    ) -> None:
        super().__init__()
        if modalities is not None and (not modalities or len(set(modalities)) != len(modalities)):
            raise ConfigError("modalities", f"unimodal_infonce needs distinct modality names, got {modalities}")
        check_arg("temperature", temperature > 0, f"must be > 0, got {temperature}")
        check_arg("max_logit_scale", max_logit_scale > 0, f"must be > 0, got {max_logit_scale}")
        check_arg("dim", dim is None or dim >= 1, f"must be null or >= 1, got {dim}")
        check_arg("neighbours", neighbours >= 0, f"must be >= 0, got {neighbours}")
        self.neighbours = neighbours
        self._modalities: tuple[str, ...] | None = tuple(modalities) if modalities is not None else None
        self.scale = LogitScale(temperature, learn_temperature, max_logit_scale)
        self.dim = dim
        self.heads = nn.ModuleDict()

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities taking part.

        Raises:
            ValueError: If they were neither given nor resolved by ``bind``.
        """
        if self._modalities is None:
            raise ValueError("unimodal_infonce: no modalities given and not bound to a model")
        return self._modalities

    def bind(self, model: nn.Module) -> None:
        """Resolve the modalities (default: the model's), check them, and build the heads (with ``dim``).

        Raises:
            ConfigError: If the model lacks a modality, has none, or (with ``dim``) its heads
                have no common ``out_dim``.
        """
        if self._modalities is None:
            self._modalities = tuple(sorted(model_modalities(model)))
            if not self._modalities:
                raise ConfigError("modalities", "unimodal_infonce: the model has no modalities")
        check_known(self._modalities, model, "unimodal_infonce")
        if self.dim is not None and len(self.heads) == 0:
            width = embed_width(model, self._modalities, "unimodal_infonce")
            for m in self._modalities:
                self.heads[m] = projection_head(width, self.dim)

    def views(self, outputs: Outputs, batch: Batch, modality: str) -> tuple[Tensor, Tensor] | None:
        """``(z Tensor[N_m, E'], content LongTensor[N_m])``: the observed rows of ``modality``.

        ``z`` is through the head (``E' = dim``) when there is one, L2-normalised. ``None`` when
        the modality is absent from the batch.

        Raises:
            ValueError: If ``dim`` is set and ``bind`` has not built the heads.
        """
        if modality not in outputs.embeddings:
            return None
        x = outputs.embeddings[modality]
        keep = batch.rows(modality).to(x.device)
        z, content = x[keep], batch.ids_of(modality).to(x.device)[keep]
        if self.dim is not None:
            if modality not in self.heads:
                raise ValueError("unimodal_infonce: bind(model) must run before forward to build the heads")
            z = self.heads[modality](z)
        return F.normalize(z, dim=-1), content

    def positives(self, outputs: Outputs, batch: Batch, modality: str, content: Tensor, views: Tensor) -> Tensor:
        """``BoolTensor[N_m, N_m]``: the other views of each observed row (``views``), plus its feature neighbours.

        Raises:
            ValueError: If ``neighbours > 0`` and the outputs hold no pooled features of ``modality``.
        """
        positive = views
        if self.neighbours == 0:
            return positive
        if modality not in outputs.pooled:
            raise ValueError(f"unimodal_infonce: neighbours need the pooled features of {modality!r}")
        pooled = outputs.pooled[modality]
        features = pooled[batch.rows(modality).to(pooled.device)].detach()
        return positive | feature_neighbours(features, content, self.neighbours)

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Mean over modalities of the per-modality loss; metrics ``temperature``, ``anchors``, ``top1``.

        ``anchors`` counts the rows with a view and ``top1`` (only with such rows) is the fraction
        of them whose nearest other row is a view; ``anchors/m`` and ``top1/m`` per modality. A
        modality takes part when some row has a positive (a view, or with ``neighbours`` a
        neighbour).
        """
        scale = self.scale()
        parts: dict[str, Tensor] = {}
        metrics = {"temperature": float(1.0 / scale.detach().exp())}
        anchors, hits = 0, 0.0
        for m in self.modalities:
            views = self.views(outputs, batch, m)
            if views is None:
                continue
            z, content = views
            same = view_positives(content)
            count, top1 = view_top1(z.detach(), same)
            metrics[f"anchors/{m}"] = float(count)
            if count > 0:
                metrics[f"top1/{m}"] = top1
                anchors, hits = anchors + count, hits + top1 * count
            positive = self.positives(outputs, batch, m, content, same)
            if bool(positive.any()):  # views and neighbours never include the row itself
                parts[m] = positive_infonce_loss(z, positive, scale)
        metrics["anchors"] = float(anchors)
        zero = outputs.zero(scale, *self.heads.parameters())
        if not parts:
            return LossOutput(loss=zero, metrics=metrics)
        if anchors:
            metrics["top1"] = hits / anchors
        total = sum(parts.values(), start=zero)
        return LossOutput(loss=total / len(parts), parts=parts, metrics=metrics)
