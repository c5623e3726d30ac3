"""Embedding a dataset through the ``Embedder`` protocol, and the input checks of ``modalign.eval``.

Evaluation never sees a model: it reads ``{modality: Tensor[B, E]}`` from anything that satisfies
``modalign.core.Embedder`` and collects the rows into an ``EmbeddingSet`` on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from modalign.core.errors import ModalignError
from modalign.core.types import Batch, Embedder


class EvalInputError(ModalignError, ValueError):
    """Invalid input to an evaluation function; the message names the argument and its shape."""


def check_matrix(name: str, x: Tensor, dim: int | None = None) -> Tensor:
    """Validate an embedding matrix and return it as float32.

    Args:
        name: Argument name used in error messages (e.g. ``"query"``).
        x: ``Tensor[N, E]`` with ``N >= 1``.
        dim: Required width ``E``, or ``None`` for any.

    Returns:
        ``x`` as a float32 tensor on its original device.

    Raises:
        EvalInputError: If ``x`` is not a non-empty 2-D tensor of width ``dim`` with finite values.
    """
    if not isinstance(x, Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise EvalInputError(f"{name}: expected a Tensor[N, E], got {shape}")
    if x.shape[0] == 0:
        raise EvalInputError(f"{name}: has no rows (shape {tuple(x.shape)})")
    if dim is not None and x.shape[1] != dim:
        raise EvalInputError(f"{name}: width {x.shape[1]} differs from the expected {dim}")
    x = x.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise EvalInputError(f"{name}: contains NaN or infinite values")
    return x


def check_vector(name: str, v: Tensor, n: int) -> Tensor:
    """Validate a per-row integer vector (ids, labels) of length ``n`` and return it as int64.

    Raises:
        EvalInputError: If ``v`` is not a 1-D tensor of length ``n`` or is floating point.
    """
    if not isinstance(v, Tensor) or v.ndim != 1 or v.shape[0] != n:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise EvalInputError(f"{name}: expected a Tensor[{n}], got {shape}")
    if v.is_floating_point() or v.is_complex():
        raise EvalInputError(f"{name}: expected integer values, got dtype {v.dtype}")
    return v.detach().long()


def check_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` if it is a positive int.

    Raises:
        EvalInputError: If ``chunk_size < 1``.
    """
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise EvalInputError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def l2_normalise(x: Tensor) -> Tensor:
    """Scale each row of ``x`` (``Tensor[N, E]``) to unit L2 norm; all-zero rows stay zero."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def chunk_slices(n: int, chunk_size: int) -> Iterator[slice]:
    """Yield consecutive ``slice`` objects of at most ``chunk_size`` rows covering ``range(n)``."""
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


@dataclass
class EmbeddingSet:
    """Per-modality embeddings of a whole evaluation split, on the CPU.

    Attributes:
        embeddings: ``{modality: Tensor[N, E]}`` float32 embeddings; rows where the modality was
            not observed hold whatever the embedder returned for the zero input (or zeros when
            the modality was missing from the whole batch) and must be ignored.
        present: ``{modality: BoolTensor[N]}``; ``True`` where the modality was observed.
        ids: ``LongTensor[N]`` sample ids (equal ids = same pair group: never each other's
            negatives).
        labels: ``{name: LongTensor[N]}`` evaluation labels, ``-1`` where unknown.
        content_ids: ``{modality: LongTensor[N]}`` content ids of a modality's rows where they
            differ from ``ids`` (``Batch.modality_ids``: av-digits' recordings, a manifest's
            several captions per id); read them through ``content_of``. Retrieval ranks one
            row per distinct content id (``modalign.eval.items``).
    """

    embeddings: dict[str, Tensor]
    present: dict[str, Tensor]
    ids: Tensor
    labels: dict[str, Tensor]
    content_ids: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = int(self.ids.shape[0]) if self.ids.ndim == 1 else -1
        if n < 0:
            raise EvalInputError(f"EmbeddingSet.ids: expected a Tensor[N], got {tuple(self.ids.shape)}")
        if set(self.embeddings) != set(self.present):
            raise EvalInputError(
                f"EmbeddingSet: embeddings modalities {sorted(self.embeddings)} differ from "
                f"present modalities {sorted(self.present)}"
            )
        for m, e in self.embeddings.items():
            if e.ndim != 2 or e.shape[0] != n:
                raise EvalInputError(f"EmbeddingSet.embeddings[{m!r}]: shape {tuple(e.shape)}, expected [{n}, E]")
            if self.present[m].shape != (n,) or self.present[m].dtype != torch.bool:
                raise EvalInputError(f"EmbeddingSet.present[{m!r}]: expected a BoolTensor[{n}]")
        for k, v in self.labels.items():
            check_vector(f"EmbeddingSet.labels[{k!r}]", v, n)
        for m, v in self.content_ids.items():
            if m not in self.embeddings:
                raise EvalInputError(f"EmbeddingSet.content_ids[{m!r}]: no such modality ({sorted(self.embeddings)})")
            check_vector(f"EmbeddingSet.content_ids[{m!r}]", v, n)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in sorted order."""
        return tuple(sorted(self.embeddings))

    def content_of(self, modality: str) -> Tensor:
        """``LongTensor[N]`` content ids of ``modality``'s rows (equal = same item)."""
        return self.content_ids.get(modality, self.ids)

    def subset(self, mask: Tensor) -> EmbeddingSet:
        """Return the rows where ``mask`` (``BoolTensor[N]``) is ``True``.

        Raises:
            EvalInputError: If ``mask`` is not a boolean tensor of length ``N``.
        """
        if mask.dtype != torch.bool or mask.shape != (len(self),):
            raise EvalInputError(
                f"EmbeddingSet.subset: mask must be a BoolTensor[{len(self)}], got {mask.dtype} {tuple(mask.shape)}"
            )
        mask = mask.to(self.ids.device)
        return EmbeddingSet(
            embeddings={k: v[mask] for k, v in self.embeddings.items()},
            present={k: v[mask] for k, v in self.present.items()},
            ids=self.ids[mask],
            labels={k: v[mask] for k, v in self.labels.items()},
            content_ids={k: v[mask] for k, v in self.content_ids.items()},
        )


def _embed_batch(embedder: Embedder, batch: Batch, device: torch.device | str) -> dict[str, Tensor]:
    """Embed one batch and validate the result; returns ``{modality: Tensor[B, E]}`` on the CPU."""
    out = embedder.embed(batch.to(device))
    result: dict[str, Tensor] = {}
    for m, e in out.items():
        if not isinstance(e, Tensor) or e.ndim != 2 or e.shape[0] != batch.size:
            shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise EvalInputError(f"embedder returned {shape} for modality {m!r}; expected [{batch.size}, E]")
        result[m] = e.detach().to("cpu", torch.float32)
    return result


def _assemble(
    per_batch: list[dict[str, Tensor]], batches: list[Batch]
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Concatenate per-batch outputs; fills modalities/labels a batch lacks with zeros/False/-1."""
    widths: dict[str, int] = {}
    for out in per_batch:
        for m, e in out.items():
            if widths.setdefault(m, int(e.shape[1])) != e.shape[1]:
                raise EvalInputError(f"embedder returned width {widths[m]} then {e.shape[1]} for modality {m!r}")
    label_names = sorted({k for b in batches for k in b.labels})
    emb: dict[str, list[Tensor]] = {m: [] for m in widths}
    pres: dict[str, list[Tensor]] = {m: [] for m in widths}
    labs: dict[str, list[Tensor]] = {k: [] for k in label_names}
    for out, b in zip(per_batch, batches, strict=True):
        for m, width in widths.items():
            emb[m].append(out.get(m, torch.zeros(b.size, width)))
            seen = b.present.get(m, torch.ones(b.size, dtype=torch.bool)).to("cpu", torch.bool)
            pres[m].append(seen if m in out else torch.zeros(b.size, dtype=torch.bool))
        for k in label_names:
            labs[k].append(b.labels.get(k, torch.full((b.size,), -1)).to("cpu", torch.long))
    return (
        {m: torch.cat(v) for m, v in emb.items()},
        {m: torch.cat(v) for m, v in pres.items()},
        {k: torch.cat(v) for k, v in labs.items()},
    )


def embed_loader(embedder: Embedder, batches: Iterable[Batch], device: torch.device | str = "cpu") -> EmbeddingSet:
    """Embed every batch of a loader and collect the result on the CPU as float32.

    Runs under ``torch.no_grad()``. If the embedder has ``eval()`` it is switched to eval mode and
    its previous ``training`` flag is restored afterwards (via ``train(previous)``), even on error.
    A modality an embedder returns for only some batches is zero-filled with ``present = False``
    elsewhere; a label a batch lacks is ``-1`` there.

    Args:
        embedder: Anything implementing ``modalign.core.Embedder``.
        batches: Iterable of ``Batch`` (a ``DataLoader`` with a collate function).
        device: Device each batch is moved to before ``embed``.

    Returns:
        An ``EmbeddingSet`` with one row per sample, in loader order.

    Raises:
        EvalInputError: If the loader is empty or the embedder returns tensors of the wrong shape.
    """
    was_training = getattr(embedder, "training", None)
    set_eval = getattr(embedder, "eval", None)
    if callable(set_eval):
        set_eval()
    try:
        per_batch: list[dict[str, Tensor]] = []
        kept: list[Batch] = []
        with torch.no_grad():
            for batch in batches:
                per_batch.append(_embed_batch(embedder, batch, device))
                kept.append(batch)
    finally:
        set_train = getattr(embedder, "train", None)
        if isinstance(was_training, bool) and callable(set_train):
            set_train(was_training)
    if not kept:
        raise EvalInputError("embed_loader: the loader yielded no batches")
    embeddings, present, labels = _assemble(per_batch, kept)
    ids = torch.cat([b.ids.to("cpu", torch.long) for b in kept])
    return EmbeddingSet(embeddings, present, ids, labels, batch_content_ids(kept, set(embeddings)))


def batch_content_ids(batches: list[Batch], modalities: set[str]) -> dict[str, Tensor]:
    """``{modality: LongTensor[N]}`` of the ``Batch.modality_ids`` any batch gives, concatenated.

    A batch without a modality's content ids contributes its sample ids (``Batch.ids_of``).
    Only ``modalities`` (those embedded) are kept.
    """
    names = sorted({m for b in batches for m in b.modality_ids} & modalities)
    return {m: torch.cat([b.ids_of(m).to("cpu", torch.long) for b in batches]) for m in names}
