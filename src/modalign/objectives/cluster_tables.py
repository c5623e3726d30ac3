"""Whole-split passes and pseudo-label tables for the clustering objectives (XDC, MCN).

An epoch-start hook embeds the training split once (``embed_training_split``: eval mode, no
gradient, ``N x E`` per modality, never ``N x N``), averages the rows of each content id
(``content_means``), clusters them (``modalign.alignment.kmeans``, chunked) and keeps the labels
in a table sorted by content id, read during the epoch with ``torch.searchsorted``
(``lookup_labels``, ``PseudoLabels``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.types import Batch
from modalign.distributed import all_gather_no_grad, all_gather_sizes, is_initialized


def lookup_labels(ids: Tensor, table_ids: Tensor, table_labels: Tensor) -> Tensor:
    """Labels of content ``ids`` read from a table sorted by id (``torch.searchsorted``).

    Args:
        ids: ``LongTensor[N]`` content ids to look up (``Batch.ids_of``).
        table_ids: ``LongTensor[M]`` the table's ids, strictly increasing.
        table_labels: ``LongTensor[M]`` the label of each table id.

    Returns:
        ``LongTensor[N]`` labels, on the device of ``table_labels``.

    Raises:
        ValueError: If the table is malformed or empty, or an id is not in the table (the
            message names up to five of them).
    """
    if table_ids.dim() != 1 or table_labels.shape != table_ids.shape or ids.dim() != 1:
        raise ValueError(
            f"expected ids [N] and a table of ids [M] and labels [M], got ids {tuple(ids.shape)}, "
            f"table ids {tuple(table_ids.shape)} and labels {tuple(table_labels.shape)}"
        )
    if table_ids.numel() == 0:
        raise ValueError("the pseudo-label table is empty (on_epoch_start has not run, or saw no rows)")
    ids = ids.to(table_ids.device)
    pos = torch.searchsorted(table_ids, ids).clamp_max(table_ids.shape[0] - 1)
    found = table_ids[pos] == ids
    if not bool(found.all()):
        missing = ids[~found].unique()
        raise ValueError(
            f"{missing.numel()} content id(s) have no pseudo-label, e.g. {missing[:5].tolist()}: "
            "the epoch-start pass did not see them (labels come from the training split of this epoch)"
        )
    return table_labels[pos]


@dataclass
class PassRows:
    """Every row of one epoch-start pass over the training split (all ranks' rows when gathering).

    Attributes:
        ids: ``LongTensor[N]`` sample ids.
        content: ``{modality: LongTensor[N]}`` content ids (``Batch.ids_of``).
        present: ``{modality: BoolTensor[N]}`` where the modality was observed.
        embeddings: ``{modality: Tensor[N, E]}`` L2-normalised embeddings, or the pooled encoder
            vectors of a ``source="pooled"`` pass (zeros where absent).
    """

    ids: Tensor
    content: dict[str, Tensor]
    present: dict[str, Tensor]
    embeddings: dict[str, Tensor]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run a block with ``model`` in eval mode and without gradient, then restore its mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _batch_rows(
    model: nn.Module, batch: Batch, modalities: tuple[str, ...], widths: dict[str, int], source: str
) -> dict[str, Tensor]:
    """One batch's rows of a ``PassRows`` as flat ``{key: tensor}`` (presence as ``uint8``)."""
    out = getattr(model(batch), source)
    rows = {"ids": batch.ids.long()}
    for m in modalities:
        observed = m in out
        rows[f"content/{m}"] = batch.ids_of(m).long().to(batch.ids.device)
        present = batch.rows(m).to(batch.ids.device) if observed else torch.zeros_like(batch.ids, dtype=torch.bool)
        rows[f"present/{m}"] = present.to(torch.uint8)
        zeros = torch.zeros(batch.size, widths[m], device=batch.ids.device)
        rows[f"embeddings/{m}"] = out[m].float() if observed else zeros
    return rows


def embed_training_split(
    model: nn.Module,
    batches: Iterable[Batch],
    modalities: tuple[str, ...],
    embed_dim: int | Mapping[str, int],
    gather: bool = False,
    source: str = "embeddings",
) -> PassRows:
    """Embed every batch of ``batches`` with ``model`` in eval mode, without gradient.

    Memory is ``N x E`` per modality (never ``N x N``). With ``gather`` under a process group
    the rows of every rank are concatenated in rank order, so every rank sees the whole split
    and clusters it identically.

    Args:
        model: The ``MultimodalModel`` (put back in its previous train/eval mode afterwards).
        batches: One pass over the training split (``EpochContext.batches()``).
        modalities: Modalities to embed.
        embed_dim: Row width ``E``, or one per modality (``source="pooled"``: the encoders' widths).
        gather: Concatenate the rows of all ranks.
        source: The ``Outputs`` field read: ``"embeddings"`` (L2-normalised head outputs) or
            ``"pooled"`` (each encoder's vector before its head); kept in ``PassRows.embeddings``.

    Raises:
        ValueError: If the pass holds no row at all.
    """
    if source not in ("embeddings", "pooled"):
        raise ValueError(f"source must be 'embeddings' or 'pooled', got {source!r}")
    widths = dict(embed_dim) if isinstance(embed_dim, Mapping) else dict.fromkeys(modalities, embed_dim)
    with evaluating(model):
        chunks = [_batch_rows(model, batch, modalities, widths, source) for batch in batches]
    if chunks:
        rows = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    else:
        rows = _batch_rows_empty(modalities, widths)
    if gather and is_initialized():
        sizes = all_gather_sizes(rows["ids"].shape[0], rows["ids"].device)
        rows = {k: all_gather_no_grad(v.contiguous(), sizes) for k, v in rows.items()}
    if rows["ids"].numel() == 0:
        raise ValueError("the epoch-start pass over the training split yielded no rows")
    return PassRows(
        rows["ids"],
        {m: rows[f"content/{m}"] for m in modalities},
        {m: rows[f"present/{m}"].bool() for m in modalities},
        {m: rows[f"embeddings/{m}"] for m in modalities},
    )


def _batch_rows_empty(modalities: tuple[str, ...], widths: dict[str, int]) -> dict[str, Tensor]:
    """The flat rows of a pass that saw no batch on this rank."""
    rows = {"ids": torch.zeros(0, dtype=torch.long)}
    for m in modalities:
        rows[f"content/{m}"] = torch.zeros(0, dtype=torch.long)
        rows[f"present/{m}"] = torch.zeros(0, dtype=torch.uint8)
        rows[f"embeddings/{m}"] = torch.zeros(0, widths[m])
    return rows


def content_means(ids: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
    """Group rows by content id: sorted unique ids and the mean feature of each.

    A content seen several times in one pass (av-digits: a recording paired with two images,
    under different augmentations) is clustered once, at its mean embedding.

    Args:
        ids: ``LongTensor[N]`` content ids.
        features: ``Tensor[N, E]``.

    Returns:
        ``(LongTensor[M] strictly increasing ids, Tensor[M, E] means)``.
    """
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    sums = features.new_zeros(unique.shape[0], features.shape[1]).index_add_(0, inverse, features)
    counts = torch.bincount(inverse, minlength=unique.shape[0]).to(features.dtype)
    return unique, sums / counts[:, None]


def joint_embeddings(rows: PassRows, modalities: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """Each sample's joint embedding: the mean of its observed modalities' embeddings.

    Rows of the same sample id are averaged (``content_means``); samples with no observed
    modality are left out.

    Returns:
        ``(LongTensor[M] sorted sample ids, Tensor[M, E] joint embeddings, not re-normalised)``.
    """
    total = torch.zeros_like(rows.embeddings[modalities[0]])
    count = torch.zeros_like(total[:, 0])
    for m in modalities:
        total += rows.embeddings[m] * rows.present[m][:, None]
        count += rows.present[m]
    keep = count > 0
    return content_means(rows.ids[keep], total[keep] / count[keep][:, None])


def resize_on_load(module: nn.Module, names: tuple[str, ...]) -> None:
    """Register a ``load_state_dict`` pre-hook giving each buffer of ``names`` the shape it has in the checkpoint.

    Tables filled by an epoch-start pass (mined pairs, fitted weights) have data-dependent
    lengths and start empty; the hook resizes them (same dtype and device) before the copy.
    """

    def hook(mod: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in names:
            incoming = state_dict.get(prefix + name)
            if incoming is not None:
                setattr(mod, name, getattr(mod, name).new_empty(incoming.shape))

    module.register_load_state_dict_pre_hook(hook)


def refresh_due(epoch: int, warmup_epochs: int, refresh_every: int) -> bool:
    """Whether an epoch-start pass runs at ``epoch``: from ``warmup_epochs`` on, every ``refresh_every`` epochs."""
    return epoch >= warmup_epochs and (epoch - warmup_epochs) % refresh_every == 0


def cluster_seed(seed: int, epoch: int) -> int:
    """Seed of the k-means++ draws of ``epoch`` for an objective seeded with ``seed``."""
    return (seed * 1_000_003 + epoch * 7_919) % (2**31)


def embed_width(model: nn.Module, modalities: tuple[str, ...], name: str) -> int:
    """The shared embedding width ``E``: the ``out_dim`` of the model's projection heads.

    Raises:
        ConfigError: If a head of ``modalities`` has no ``out_dim`` or the widths differ.
    """
    heads = getattr(model, "heads", {})
    widths = {int(getattr(heads[m], "out_dim", 0)) if m in heads else 0 for m in modalities}
    if len(widths) != 1 or 0 in widths:
        raise ConfigError("modalities", f"{name}: projection heads need one common out_dim, got {sorted(widths)}")
    return widths.pop()


class PseudoLabels:
    """Pseudo-label tables ``{key: (sorted content ids [M], labels [M])}`` set at epoch start.

    Not in the checkpoint: they are recomputed from the weights at every epoch start.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.tables: dict[str, tuple[Tensor, Tensor]] = {}

    def __call__(self, key: str, ids: Tensor) -> Tensor:
        """``LongTensor[N]`` labels of content ``ids`` (see ``lookup_labels``).

        Raises:
            ValueError: Before the first epoch-start pass, or for an unknown id.
        """
        if key not in self.tables:
            raise ValueError(f"{self.owner}: no pseudo-labels for {key!r} yet; on_epoch_start must run first")
        table_ids, labels = self.tables[key]
        return lookup_labels(ids, table_ids, labels).to(ids.device)
