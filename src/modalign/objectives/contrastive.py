"""Symmetric InfoNCE, the CLIP loss (van den Oord et al. 2018; Radford et al. 2021).

``infonce_loss`` holds the mathematics; ``InfoNCE`` selects two modalities' embeddings from
``Outputs``, keeps the rows where both were observed, and reports metrics. The helpers
``paired_embeddings``, ``Gallery`` and ``batch_top1`` are shared with the other pairwise
losses of this package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core.errors import ConfigError
from modalign.core.modules import Objective
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.distributed import (
    all_gather_no_grad,
    all_gather_sizes,
    all_gather_with_grad,
    is_initialized,
    rank,
    world_size,
)


def check_pair_inputs(a: Tensor, b: Tensor, ids: Tensor | None, **scalars: Tensor) -> None:
    """Validate ``a, b: [N, E]``, ``ids: [N]`` and scalar parameters.

    Raises:
        ValueError: Naming the shapes that do not fit.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"expected two embedding matrices of the same shape [N, E], got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if ids is not None and (ids.dim() != 1 or ids.shape[0] != a.shape[0]):
        raise ValueError(f"ids must be [N] with N={a.shape[0]}, got shape {tuple(ids.shape)}")
    for name, value in scalars.items():
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar tensor, got shape {tuple(value.shape)}")


@dataclass
class Gallery:
    """The embeddings a rank's queries are scored against.

    Attributes:
        a: ``Tensor[M, E]`` gallery of the first modality (all ranks' rows when gathering).
        b: ``Tensor[M, E]`` gallery of the second modality.
        ids: ``LongTensor[M]`` ids of the gallery rows, or ``None``.
        offset: Index in the gallery of this rank's first row.
        total: Number of rows over all ranks ``M``.
        weight: ``world_size`` when gathering (so the mean over ranks is the global mean), else 1.
    """

    a: Tensor
    b: Tensor
    ids: Tensor | None
    offset: int
    total: int
    weight: int

    def targets(self, n: int, device: torch.device) -> Tensor:
        """``LongTensor[n]``: gallery index of each local row."""
        return torch.arange(n, device=device) + self.offset

    def same_id(self, ids: Tensor | None, n: int, device: torch.device) -> Tensor:
        """``BoolTensor[n, M]``: local row ``i`` and gallery row ``j`` share an id (or j = offset+i)."""
        same = torch.zeros(n, self.total, dtype=torch.bool, device=device)
        if ids is not None and self.ids is not None:
            same = ids[:, None] == self.ids[None, :]
        same[torch.arange(n, device=device), self.targets(n, device)] = True
        return same


def gather_gallery(a: Tensor, b: Tensor, ids: Tensor | None, gather: bool) -> Gallery:
    """Build the gallery of a rank's queries.

    The local rows, or every rank's rows (with gradient) when ``gather`` is set and a process
    group is initialised. Ranks may hold different numbers of rows.
    """
    if not (gather and is_initialized()):
        return Gallery(a, b, ids, 0, a.shape[0], 1)
    sizes = all_gather_sizes(a.shape[0], a.device)
    total = sum(sizes)
    offset = sum(sizes[: rank()])
    if total == 0:
        return Gallery(a, b, ids, 0, 0, world_size())
    ids_all = all_gather_no_grad(ids, sizes) if ids is not None else None
    return Gallery(all_gather_with_grad(a, sizes), all_gather_with_grad(b, sizes), ids_all, offset, total, world_size())


def empty_loss(a: Tensor, b: Tensor, gather: bool, name: str, *scalars: Tensor) -> Tensor:
    """Zero loss, connected to the inputs, for a gathered batch that is empty on every rank.

    Raises:
        ValueError: If the batch is empty and no process group gathers (a caller's bug).
    """
    if not (gather and is_initialized()):
        raise ValueError(f"{name} got an empty batch (a and b have 0 rows)")
    return 0.0 * (a.sum() + b.sum() + sum(s.sum() for s in scalars))


def infonce_loss(a: Tensor, b: Tensor, logit_scale: Tensor, ids: Tensor | None = None, gather: bool = False) -> Tensor:
    """Symmetric InfoNCE / CLIP loss.

    ``logits = exp(logit_scale) * a @ b.T``; the loss is the mean of the cross-entropies of the
    rows (a -> b) and of the columns (b -> a) with the diagonal as targets. Pairs ``(i, j)``,
    ``i != j``, with ``ids[i] == ids[j]`` are the same content and are removed from the softmax
    (never each other's negatives).

    With ``gather=True`` and an initialised process group, the local rows are queries against
    the gallery of every rank's rows (gathered with gradient, targets offset by the rows of the
    lower ranks, ids gathered too). Each rank returns ``world_size * sum_local / (2 N_total)``,
    so the mean over ranks (what DDP's gradient averaging optimises) is the loss of the global
    batch. Ranks may hold different numbers of rows, including none.

    Args:
        a: ``Tensor[N, E]`` embeddings of the first modality, assumed L2-normalised.
        b: ``Tensor[N, E]`` embeddings of the second modality, assumed L2-normalised.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        ids: ``LongTensor[N]`` sample ids, or ``None`` (all distinct).
        gather: Use negatives from all ranks.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If ``a``/``b`` are not 2-D of the same shape, ``ids`` is not ``[N]``,
            ``logit_scale`` is not a scalar, or (without gathering) the batch is empty.
    """
    check_pair_inputs(a, b, ids, logit_scale=logit_scale)
    g = gather_gallery(a, b, ids, gather)
    if g.total == 0:
        return empty_loss(a, b, gather, "infonce_loss", logit_scale)
    n = a.shape[0]
    scale = logit_scale.reshape(()).exp()
    targets = g.targets(n, a.device)
    negatives_off = g.same_id(ids, n, a.device)
    negatives_off[torch.arange(n, device=a.device), targets] = False
    logits_ab = (scale * a @ g.b.T).masked_fill(negatives_off, float("-inf"))
    logits_ba = (scale * b @ g.a.T).masked_fill(negatives_off, float("-inf"))
    ce = F.cross_entropy(logits_ab, targets, reduction="sum") + F.cross_entropy(logits_ba, targets, reduction="sum")
    return ce * (g.weight / (2.0 * g.total))


def paired_embeddings(
    outputs: Outputs, batch: Batch, modalities: tuple[str, str], name: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of ``outputs.embeddings[m0]``, ``[m1]`` and ``batch.ids`` where both were observed.

    Returns:
        ``(a [P, E], b [P, E], ids [P])`` with ``P`` the number of paired rows.

    Raises:
        ConfigError: If a modality has no embedding in ``outputs``.
    """
    for m in modalities:
        if m not in outputs.embeddings:
            raise ConfigError(
                f"{name}.modalities",
                f"modality {m!r} has no embedding in the model outputs",
                sorted(outputs.embeddings),
            )
    a, b = outputs.embeddings[modalities[0]], outputs.embeddings[modalities[1]]
    keep = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    for m in modalities:
        if m in batch.present:
            keep = keep & batch.present[m].to(a.device)
    return a[keep], b[keep], batch.ids.to(a.device)[keep]


def batch_top1(a: Tensor, b: Tensor, ids: Tensor) -> tuple[float, float]:
    """Top-1 retrieval accuracy a->b and b->a within the batch; a hit is a row with the same id.

    Args:
        a: ``Tensor[N, E]`` first modality.
        b: ``Tensor[N, E]`` second modality.
        ids: ``LongTensor[N]`` sample ids.
    """
    with torch.no_grad():
        sim = a @ b.T
        acc_ab = (ids[sim.argmax(dim=1)] == ids).float().mean().item()
        acc_ba = (ids[sim.argmax(dim=0)] == ids).float().mean().item()
    return acc_ab, acc_ba


def check_modalities(modalities: list[str], name: str) -> tuple[str, str]:
    """Return the two distinct modality names of a pairwise objective.

    Raises:
        ConfigError: Unless exactly two distinct names are given.
    """
    if len(modalities) != 2 or modalities[0] == modalities[1]:
        raise ConfigError(f"{name}.modalities", f"needs two distinct modality names, got {modalities}")
    return modalities[0], modalities[1]


def require_scalar(value: Tensor | None, field: str, name: str) -> Tensor:
    """Return ``value`` or raise a ``ValueError`` naming the missing ``Outputs`` field."""
    if value is None:
        raise ValueError(f"objective {name!r} needs outputs.{field}, but the model returned None")
    return value


@register("objective", "infonce")
class InfoNCE(Objective):
    """Symmetric InfoNCE between two modalities (see ``infonce_loss``).

    Reads ``outputs.embeddings[m]`` (``Tensor[B, E]``, L2-normalised) for the two modalities and
    ``outputs.logit_scale``; only rows where both modalities are present are used and rows
    sharing ``batch.ids`` are never negatives. Fewer than two paired rows (without gathering)
    give a zero loss that stays connected to the graph.

    Args:
        modalities: Exactly two modality names.
        gather: Use negatives from all ranks (``all_gather`` with gradient).
    """

    def __init__(self, modalities: list[str], gather: bool = False) -> None:
        super().__init__()
        self.modalities = check_modalities(modalities, "infonce")
        self.gather = gather

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss; metrics: ``temperature``, ``acc_a2b``, ``acc_b2a``, ``paired``."""
        scale = require_scalar(outputs.logit_scale, "logit_scale", "infonce")
        a, b, ids = paired_embeddings(outputs, batch, self.modalities, "infonce")
        n = a.shape[0]
        metrics = {"temperature": float(1.0 / scale.detach().exp()), "paired": float(n)}
        if n < 2 and not (self.gather and is_initialized()):
            emb = outputs.embeddings
            zero = 0.0 * (emb[self.modalities[0]].sum() + emb[self.modalities[1]].sum() + scale.sum())
            return LossOutput(loss=zero, parts={"infonce": zero}, metrics=metrics)
        loss = infonce_loss(a, b, scale, ids=ids, gather=self.gather)
        if n > 0:
            metrics["acc_a2b"], metrics["acc_b2a"] = batch_top1(a, b, ids)
        return LossOutput(loss=loss, parts={"infonce": loss}, metrics=metrics)
