"""Collation of ``Sample``s into a ``Batch`` (padding, presence masks, labels)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modalign.core.errors import DataError
from modalign.core.types import Batch, ModalitySpec, Sample

#: Kinds whose last dimension is a variable-length sequence.
SEQUENCE_KINDS = frozenset({"audio", "text", "series"})


def _pad_stack(values: list[Tensor | None], batch: int) -> tuple[Tensor, Tensor]:
    """Right-pad along the last dim; returns ``(data [B, ..., T], padding BoolTensor[B, T])``."""
    ref = next(v for v in values if v is not None)
    length = max(v.shape[-1] for v in values if v is not None)
    data = torch.zeros((batch, *ref.shape[:-1], length), dtype=ref.dtype)
    padding = torch.ones(batch, length, dtype=torch.bool)
    for i, v in enumerate(values):
        if v is not None:
            data[i, ..., : v.shape[-1]] = v
            padding[i, : v.shape[-1]] = False
    return data, padding


def _stack(values: list[Tensor | None], batch: int) -> Tensor:
    ref = next(v for v in values if v is not None)
    data = torch.zeros((batch, *ref.shape), dtype=ref.dtype)
    for i, v in enumerate(values):
        if v is not None:
            if v.shape != ref.shape:
                raise DataError(f"sample {i}: shape {tuple(v.shape)} differs from {tuple(ref.shape)}")
            data[i] = v
    return data


def collate(samples: Sequence[Sample | None], specs: dict[str, ModalitySpec]) -> Batch:
    """Collate samples into a ``Batch``; ``None`` entries (skipped bad samples) are dropped.

    A modality absent from a sample gets a zero row and ``present = False``. Sequence
    modalities (audio, text, series) are right-padded to the longest in the batch. A modality
    that any sample gives a ``modality_ids`` entry gets a ``Batch.modality_ids`` row for every
    sample (the sample id where the entry is missing).

    Raises:
        DataError: If no sample is left, or fixed-shape values disagree in shape.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        raise DataError("collate: every sample of the batch was skipped as bad")
    b = len(kept)
    data: dict[str, Tensor] = {}
    present: dict[str, Tensor] = {}
    padding: dict[str, Tensor] = {}
    for name in sorted(specs):
        values = [s.values.get(name) for s in kept]
        present[name] = torch.tensor([v is not None for v in values], dtype=torch.bool)
        if not present[name].any():
            continue
        try:
            if specs[name].kind in SEQUENCE_KINDS:
                data[name], padding[name] = _pad_stack(values, b)
            else:
                data[name] = _stack(values, b)
        except DataError as e:
            raise DataError(f"modality {name!r}: {e}") from None
    label_names = sorted({k for s in kept for k in s.labels})
    labels = {k: torch.tensor([s.labels.get(k, -1) for s in kept], dtype=torch.long) for k in label_names}
    ids = torch.tensor([s.id for s in kept], dtype=torch.long)
    id_names = sorted({k for s in kept for k in s.modality_ids})
    modality_ids = {k: torch.tensor([s.modality_ids.get(k, s.id) for s in kept], dtype=torch.long) for k in id_names}
    return Batch(data=data, present=present, ids=ids, padding=padding, labels=labels, modality_ids=modality_ids)


class Collator:
    """Picklable ``collate_fn`` for ``DataLoader`` (works with worker processes)."""

    def __init__(self, specs: dict[str, ModalitySpec]) -> None:
        self.specs = dict(specs)

    def __call__(self, samples: Sequence[Sample | None]) -> Batch:
        """Collate ``samples`` with the stored modality specs."""
        return collate(samples, self.specs)
