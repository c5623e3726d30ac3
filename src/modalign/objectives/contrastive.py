"""Symmetric InfoNCE, the CLIP loss (van den Oord et al. 2018; Radford et al. 2021).

``infonce_loss`` holds the mathematics; ``InfoNCE`` owns the temperature, selects two
modalities' embeddings from ``Outputs``, keeps the rows where both were observed, and reports
metrics. The helpers ``PairObjective``, ``paired_rows``, ``Gallery``, ``LogitScale`` and
``batch_top1`` are shared with the other pairwise losses of this package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from modalign.objectives.streamed import PairIds, resolve_chunk, streamed_infonce_sum


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
        ids: ``LongTensor[M]`` content ids of the gallery's ``a`` rows, or ``None``.
        offset: Index in the gallery of this rank's first row.
        total: Number of rows over all ranks ``M``.
        weight: ``world_size`` when gathering (so the mean over ranks is the global mean), else 1.
        ids_b: ``LongTensor[M]`` content ids of the ``b`` rows when they differ from ``ids``.
    """

    a: Tensor
    b: Tensor
    ids: Tensor | None
    offset: int
    total: int
    weight: int
    ids_b: Tensor | None = None

    def targets(self, n: int, device: torch.device) -> Tensor:
        """``LongTensor[n]``: gallery index of each local row."""
        return torch.arange(n, device=device) + self.offset

    def same_id(self, ids: Tensor | None, n: int, device: torch.device, ids_b: Tensor | None = None) -> Tensor:
        """``BoolTensor[n, M]``: local pair ``i`` and gallery pair ``j`` hold the same content.

        True where the ``a`` rows share an id, or the ``b`` rows share an id (``ids_b``, else
        ``ids``), and on ``j = offset + i``.
        """
        same = torch.zeros(n, self.total, dtype=torch.bool, device=device)
        if ids is not None and self.ids is not None:
            same = ids[:, None] == self.ids[None, :]
        if ids_b is not None and self.ids_b is not None:
            same = same | (ids_b[:, None] == self.ids_b[None, :])
        same[torch.arange(n, device=device), self.targets(n, device)] = True
        return same


def gather_gallery(a: Tensor, b: Tensor, ids: Tensor | None, gather: bool, ids_b: Tensor | None = None) -> Gallery:
    """Build the gallery of a rank's queries.

    The local rows, or every rank's rows (with gradient) when ``gather`` is set and a process
    group is initialised. Ranks may hold different numbers of rows.
    """
    if not (gather and is_initialized()):
        return Gallery(a, b, ids, 0, a.shape[0], 1, ids_b)
    sizes = all_gather_sizes(a.shape[0], a.device)
    total = sum(sizes)
    offset = sum(sizes[: rank()])
    if total == 0:
        return Gallery(a, b, ids, 0, 0, world_size(), ids_b)
    ids_all = all_gather_no_grad(ids, sizes) if ids is not None else None
    ids_b_all = all_gather_no_grad(ids_b, sizes) if ids_b is not None else None
    a_all, b_all = all_gather_with_grad(a, sizes), all_gather_with_grad(b, sizes)
    return Gallery(a_all, b_all, ids_all, offset, total, world_size(), ids_b_all)


def empty_loss(a: Tensor, b: Tensor, gather: bool, name: str, *scalars: Tensor) -> Tensor:
    """Zero loss, connected to the inputs, for a gathered batch that is empty on every rank.

    Raises:
        ValueError: If the batch is empty and no process group gathers (a caller's bug).
    """
    if not (gather and is_initialized()):
        raise ValueError(f"{name} got an empty batch (a and b have 0 rows)")
    return 0.0 * (a.sum() + b.sum() + sum(s.sum() for s in scalars))


def infonce_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    ids: Tensor | None = None,
    gather: bool = False,
    ids_b: Tensor | None = None,
    multi_positive: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Symmetric InfoNCE / CLIP loss, optionally with several positives per row.

    ``logits = exp(logit_scale) * a @ b.T``; the loss is the mean of the cross-entropies of the
    rows (a -> b) and of the columns (b -> a) with the diagonal as targets. Pairs ``(i, j)``,
    ``i != j``, that hold the same content (``ids[i] == ids[j]``: the same ``a``; or
    ``ids_b[i] == ids_b[j]``: the same ``b``) are never each other's negatives: they are removed
    from the softmax, or, with ``multi_positive``, they are positives too and each row's loss is
    the mean negative log-probability of its positives (the "L_out" form of Khosla et al. 2020,
    "Supervised Contrastive Learning").

    With ``gather=True`` and an initialised process group, the local rows are queries against
    the gallery of every rank's rows (gathered with gradient, targets offset by the rows of the
    lower ranks, ids gathered too). Each rank returns ``world_size * sum_local / (2 N_total)``,
    so the mean over ranks (what DDP's gradient averaging optimises) is the loss of the global
    batch. Ranks may hold different numbers of rows, including none.

    Large galleries take the streamed path (``streamed.streamed_infonce_sum``): the same loss and
    gradients computed over ``chunk x chunk`` blocks of the logits, with memory linear in the
    batch (Inf-CL, Cheng et al. 2024); the plain path builds the ``N x M`` logits.

    Args:
        a: ``Tensor[N, E]`` embeddings of the first modality, assumed L2-normalised.
        b: ``Tensor[N, E]`` embeddings of the second modality, assumed L2-normalised.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        ids: ``LongTensor[N]`` content ids of the ``a`` rows (of both, without ``ids_b``), or
            ``None`` (all distinct).
        gather: Use negatives from all ranks.
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows where they differ from ``ids``.
        multi_positive: Same-content pairs are positives instead of being left out.
        chunk_size: ``None``: plain up to ``streamed.PLAIN_MAX_ROWS`` gallery rows, streamed in
            blocks of ``streamed.DEFAULT_CHUNK`` above; ``0``: always plain; ``> 0``: streamed in
            blocks of that many rows.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If ``a``/``b`` are not 2-D of the same shape, ``ids``/``ids_b`` are not
            ``[N]``, ``logit_scale`` is not a scalar, (without gathering) the batch is empty, or
            ``chunk_size`` is negative.
    """
    check_pair_inputs(a, b, ids, logit_scale=logit_scale)
    check_pair_inputs(a, b, ids_b)
    g = gather_gallery(a, b, ids, gather, ids_b)
    if g.total == 0:
        return empty_loss(a, b, gather, "infonce_loss", logit_scale)
    chunk = resolve_chunk(chunk_size, g.total)
    if chunk is not None:
        return _streamed_infonce(a, b, logit_scale, g, ids, ids_b, multi_positive, chunk)
    return _plain_infonce(a, b, logit_scale, g, ids, ids_b, multi_positive)


def _plain_infonce(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    g: Gallery,
    ids: Tensor | None,
    ids_b: Tensor | None,
    multi_positive: bool,
) -> Tensor:
    """``infonce_loss`` over the full ``[N, M]`` logits of the local rows against gallery ``g``."""
    n = a.shape[0]
    scale = logit_scale.reshape(()).exp()
    targets = g.targets(n, a.device)
    same = g.same_id(ids, n, a.device, ids_b)
    if not multi_positive:
        same[torch.arange(n, device=a.device), targets] = False
    ce_ab = _summed_ce(scale * a @ g.b.T, targets, same, multi_positive)
    ce_ba = _summed_ce(scale * b @ g.a.T, targets, same, multi_positive)
    return (ce_ab + ce_ba) * (g.weight / (2.0 * g.total))


def _streamed_infonce(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    g: Gallery,
    ids: Tensor | None,
    ids_b: Tensor | None,
    multi_positive: bool,
    chunk: int,
) -> Tensor:
    """``infonce_loss`` over ``chunk x chunk`` blocks: one symmetric pass, or (gathered) two row passes."""
    pair_ids = PairIds(ids, g.ids, ids_b, g.ids_b, g.offset)
    if g.a is a and g.b is b:  # one process: the columns of a @ b.T are the b -> a rows
        total = streamed_infonce_sum(a, b, logit_scale, pair_ids, True, multi_positive, chunk)
    else:
        total = streamed_infonce_sum(a, g.b, logit_scale, pair_ids, False, multi_positive, chunk)
        total = total + streamed_infonce_sum(b, g.a, logit_scale, pair_ids, False, multi_positive, chunk)
    return total * (g.weight / (2.0 * g.total))


def _summed_ce(logits: Tensor, targets: Tensor, same: Tensor, multi_positive: bool) -> Tensor:
    """Summed cross-entropy of ``logits [N, M]``: ``same`` entries are positives or left out.

    With ``multi_positive`` each row's loss is the mean negative log-probability of the entries
    where ``same`` holds (the target included); otherwise ``same`` entries (the target excluded
    by the caller) are masked out of the softmax and the target is ``targets``.
    """
    if multi_positive:
        return -(F.log_softmax(logits, dim=1) * same).sum(dim=1).div(same.sum(dim=1)).sum()
    return F.cross_entropy(logits.masked_fill(same, float("-inf")), targets, reduction="sum")


@dataclass
class Pair:
    """The rows of a batch where two modalities were both observed.

    Attributes:
        a: ``Tensor[P, E]`` first modality's rows.
        b: ``Tensor[P, E]`` second modality's rows.
        ids_a: ``LongTensor[P]`` content ids of the ``a`` rows (``Batch.ids_of``).
        ids_b: ``LongTensor[P]`` content ids of the ``b`` rows.
    """

    a: Tensor
    b: Tensor
    ids_a: Tensor
    ids_b: Tensor

    @property
    def size(self) -> int:
        """Number of paired rows ``P``."""
        return int(self.a.shape[0])


def paired_rows(tensors: dict[str, Tensor], batch: Batch, modalities: tuple[str, str]) -> Pair | None:
    """Rows of ``tensors[m0]`` and ``tensors[m1]`` where both modalities were observed.

    Args:
        tensors: ``{modality: Tensor[B, ...]}``, e.g. ``outputs.embeddings``.
        batch: The batch (presence masks and per-modality ids).
        modalities: The two modality names.

    Returns:
        The paired rows, or ``None`` when a modality is absent from every row of the batch.
    """
    if any(m not in tensors for m in modalities):
        return None
    a, b = tensors[modalities[0]], tensors[modalities[1]]
    keep = batch.rows(modalities[0]).to(a.device) & batch.rows(modalities[1]).to(a.device)
    ids_a, ids_b = (batch.ids_of(m).to(a.device)[keep] for m in modalities)
    return Pair(a[keep], b[keep], ids_a, ids_b)


def batch_top1(pair: Pair) -> tuple[float, float]:
    """Top-1 retrieval accuracy a->b and b->a within the batch; a hit holds the same content."""
    with torch.no_grad():
        n = pair.size
        gallery = Gallery(pair.a, pair.b, pair.ids_a, 0, n, 1, pair.ids_b)
        same = gallery.same_id(pair.ids_a, n, pair.a.device, pair.ids_b)
        sim = pair.a @ pair.b.T
        rows = torch.arange(n, device=sim.device)
        acc_ab = same[rows, sim.argmax(dim=1)].float().mean().item()
        acc_ba = same[sim.argmax(dim=0), rows].float().mean().item()
    return acc_ab, acc_ba


def check_modalities(modalities: list[str], name: str) -> tuple[str, str]:
    """Return the two distinct modality names of a pairwise objective.

    Raises:
        ConfigError: Unless exactly two distinct names are given.
    """
    if len(modalities) != 2 or modalities[0] == modalities[1]:
        raise ConfigError("modalities", f"{name} needs two distinct modality names, got {modalities}")
    return modalities[0], modalities[1]


def check_chunk_size(chunk_size: int | None) -> int | None:
    """Return an objective's ``chunk_size`` argument (``None``, ``0`` or a block size).

    Raises:
        ConfigError: If it is negative.
    """
    if chunk_size is not None and chunk_size < 0:
        raise ConfigError(
            "chunk_size", f"must be null (automatic), 0 (plain) or a positive block size, got {chunk_size}"
        )
    return chunk_size


def model_modalities(model: nn.Module) -> tuple[str, ...]:
    """The modalities a model encodes (its ``modalities`` attribute)."""
    return tuple(getattr(model, "modalities", ()))


def check_known(modalities: tuple[str, ...], model: nn.Module, name: str) -> None:
    """Check that ``model`` has an encoder for each of ``modalities``.

    Raises:
        ConfigError: Naming the unknown modalities and the model's.
    """
    known = model_modalities(model)
    unknown = [m for m in modalities if m not in known]
    if unknown:
        raise ConfigError("modalities", f"{name}: the model has no encoder for {unknown}", sorted(known))


class LogitScale(nn.Module):
    """A learnable log inverse temperature ``log(1/t)``, clamped at ``log(max_logit_scale)`` (CLIP).

    Args:
        temperature: Initial temperature ``t``.
        learn: Whether it is trained.
        max_logit_scale: Clamp of ``exp(logit_scale)`` (CLIP: 100).
    """

    def __init__(self, temperature: float, learn: bool = True, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {temperature}")
        self.max_log = math.log(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn)

    def forward(self) -> Tensor:
        """The clamped scalar ``logit_scale``."""
        return self.logit_scale.clamp(max=self.max_log)


class PairObjective(Objective):
    """Base of the objectives over two modalities' paired rows.

    Args:
        modalities: The two modalities, or ``None``: the model's two (resolved in ``bind``).
        name: The objective's registered name (for messages).
    """

    def __init__(self, modalities: list[str] | None, name: str) -> None:
        super().__init__()
        self.name = name
        self._pair = check_modalities(modalities, name) if modalities is not None else None

    @property
    def modalities(self) -> tuple[str, str]:
        """The two modality names.

        Raises:
            ValueError: If they were neither given nor resolved by ``bind``.
        """
        if self._pair is None:
            raise ValueError(f"{self.name}: no modalities given and not bound to a model")
        return self._pair

    def bind(self, model: nn.Module) -> None:
        """Resolve ``modalities=None`` to the model's two modalities and check they exist.

        Raises:
            ConfigError: If the model lacks one, or ``None`` was given and it has not two.
        """
        if self._pair is None:
            self._pair = check_modalities(sorted(model_modalities(model)), self.name)
        check_known(self._pair, model, self.name)

    def pair(self, outputs: Outputs, batch: Batch, raw: bool = False) -> Pair | None:
        """Paired rows of the two modalities' embeddings (``None`` if one is absent).

        Args:
            outputs: The method's outputs.
            batch: The batch.
            raw: Read the unnormalised ``projections`` instead of the normalised ``embeddings``.
        """
        return paired_rows(outputs.projections if raw else outputs.embeddings, batch, self.modalities)

    def too_few(self, pair: Pair | None, gather: bool) -> bool:
        """Whether the batch has fewer than two pairs and no other rank can supply negatives."""
        return (pair is None or pair.size < 2) and not (gather and is_initialized())


@register("objective", "infonce")
class InfoNCE(PairObjective):
    """Symmetric InfoNCE between two modalities (see ``infonce_loss``), with its own temperature.

    Reads ``outputs.embeddings[m]`` (``Tensor[B, E]``, L2-normalised) for the two modalities;
    only rows where both modalities are present are used, and rows holding the same content
    (``batch.ids_of``) are never negatives (or are positives with ``multi_positive``). Fewer than
    two paired rows (without gathering) give a zero loss that stays connected to the graph.

    Args:
        modalities: Two modality names (default: the model's two).
        temperature: Initial temperature (CLIP: 0.07).
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature`` (CLIP: 100).
        multi_positive: Rows sharing a content id are positives (Khosla et al. 2020).
        gather: Use negatives from all ranks (``all_gather`` with gradient).
        chunk_size: Block size of the streamed, linear-memory loss; ``None``: automatic (plain
            ``B x B`` logits up to 256 gallery rows, blocks of 1024 above); ``0``: always plain.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        multi_positive: bool = False,
        gather: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(modalities, "infonce")
        self.scale = LogitScale(temperature, learn_temperature, max_logit_scale)
        self.multi_positive = multi_positive
        self.gather = gather
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss; metrics: ``temperature``, ``acc_a2b``, ``acc_b2a``, ``paired``."""
        scale = self.scale()
        pair = self.pair(outputs, batch)
        n = pair.size if pair is not None else 0
        metrics = {"temperature": float(1.0 / scale.detach().exp()), "paired": float(n)}
        if pair is None or self.too_few(pair, self.gather):
            return LossOutput(loss=outputs.zero(scale), metrics=metrics)
        loss = infonce_loss(
            pair.a, pair.b, scale, pair.ids_a, self.gather, pair.ids_b, self.multi_positive, self.chunk_size
        )
        if n > 0:
            metrics["acc_a2b"], metrics["acc_b2a"] = batch_top1(pair)
        return LossOutput(loss=loss, metrics=metrics)
