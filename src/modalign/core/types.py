"""The data contracts every layer of modalign speaks.

Data flows ``Sample -> Batch -> Outputs -> LossOutput`` (see ``docs/architecture.md``).

Conventions used in every shape annotation below:

* ``B`` batch size, ``T`` sequence length (tokens, frames, patches, time steps), ``D`` encoder
  width, ``E`` shared embedding width.
* Padding masks are boolean and ``True`` marks a *padded* (invalid) position, the convention of
  ``torch.nn.MultiheadAttention(key_padding_mask=...)``.
* Presence masks are boolean and ``True`` marks a sample for which the modality was observed.
  A batch may therefore be partly paired: a sample can carry ``image`` but not ``audio``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

ModalityKind = Literal["image", "audio", "text", "series", "vector"]
MODALITY_KINDS: tuple[str, ...] = ("image", "audio", "text", "series", "vector")


@dataclass(frozen=True)
class ModalitySpec:
    """What an encoder must know about a modality's tensors.

    Attributes:
        kind: One of ``MODALITY_KINDS``; picks the family of encoders that can read it.
        channels: Input channels: image colour channels, audio mel bins, series channels,
            vector width. ``0`` for text.
        vocab_size: Tokenizer vocabulary size (text only).
        length: Fixed sequence length if known (frames, time steps, tokens), else ``None``.
        size: Image side length in pixels (image only).
    """

    kind: str
    channels: int = 0
    vocab_size: int | None = None
    length: int | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in MODALITY_KINDS:
            raise ValueError(f"unknown modality kind {self.kind!r}; allowed: {list(MODALITY_KINDS)}")


@dataclass
class Sample:
    """One item of a dataset: per-modality values plus identity and evaluation labels.

    Attributes:
        id: Sample id. Equal ids mean "same content" (never each other's negatives).
        values: ``{modality: value}``; a value is a tensor after transforms. A modality missing
            for this sample is simply absent from the dict.
        labels: Evaluation-only labels ``{name: int}`` (e.g. ``digit``, ``speaker``); training
            never reads them.
        modality_ids: ``{modality: int}`` content id of one modality's value where it differs
            from ``id`` (av-digits: the recording an image is paired with, so a recording
            reused in one batch is never its own negative). Absent: the sample id.
    """

    id: int
    values: dict[str, Any]
    labels: dict[str, int] = field(default_factory=dict)
    modality_ids: dict[str, int] = field(default_factory=dict)


@dataclass
class Batch:
    """A collated mini-batch.

    Attributes:
        data: ``{modality: Tensor[B, ...]}``; rows of absent samples are zeros.
        present: ``{modality: BoolTensor[B]}``; ``True`` where the modality was observed.
        padding: ``{modality: BoolTensor[B, T]}`` for sequence modalities; ``True`` = padded.
        ids: ``LongTensor[B]`` sample ids (equal ids = same sample).
        labels: ``{name: LongTensor[B]}`` evaluation-only labels, ``-1`` where unknown.
        modality_ids: ``{modality: LongTensor[B]}`` content ids of one modality's rows where they
            differ from ``ids``; read them through ``ids_of``.
    """

    data: dict[str, Tensor]
    present: dict[str, Tensor]
    ids: Tensor
    padding: dict[str, Tensor] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)
    modality_ids: dict[str, Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of samples ``B``."""
        return int(self.ids.shape[0])

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in sorted order."""
        return tuple(sorted(self.data))

    def ids_of(self, modality: str) -> Tensor:
        """``LongTensor[B]`` content ids of ``modality``'s rows (equal = same content)."""
        return self.modality_ids.get(modality, self.ids)

    def rows(self, modality: str) -> Tensor:
        """``BoolTensor[B]``: rows where ``modality`` was observed (all rows if no mask is given)."""
        mask = self.present.get(modality)
        if mask is None:
            return torch.ones(self.size, dtype=torch.bool, device=self.ids.device)
        return mask

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Return a copy with every tensor moved to ``device``."""

        def move(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.to(device, non_blocking=non_blocking) for k, v in d.items()}

        return Batch(
            data=move(self.data),
            present=move(self.present),
            ids=self.ids.to(device, non_blocking=non_blocking),
            padding=move(self.padding),
            labels=move(self.labels),
            modality_ids=move(self.modality_ids),
        )

    def select(self, modalities: tuple[str, ...] | list[str]) -> Batch:
        """Return a view holding only ``modalities`` (labels and ids are kept)."""
        keep = set(modalities)
        return Batch(
            data={k: v for k, v in self.data.items() if k in keep},
            present={k: v for k, v in self.present.items() if k in keep},
            ids=self.ids,
            padding={k: v for k, v in self.padding.items() if k in keep},
            labels=self.labels,
            modality_ids={k: v for k, v in self.modality_ids.items() if k in keep},
        )


@dataclass
class EncoderOutput:
    """What every encoder returns.

    Attributes:
        tokens: ``Tensor[B, T, D]`` token/patch/frame features (``T = 1`` for vector inputs).
        pooled: ``Tensor[B, D]`` one vector per sample.
        padding: ``BoolTensor[B, T]`` (``True`` = padded) or ``None`` when nothing is padded.
    """

    tokens: Tensor
    pooled: Tensor
    padding: Tensor | None = None


@dataclass
class Outputs:
    """What a method's ``forward`` hands to its objectives.

    Row layout: every ``[B, ...]`` tensor has one row per sample of the batch. Encoders run only
    on the rows where their modality was observed (``Batch.present``); the other rows are zeros
    here (and their token padding is all ``True``). A modality absent from every row of the
    batch is absent from these dicts.

    Attributes:
        embeddings: ``{modality: Tensor[B, E]}`` L2-normalised embeddings in the shared space.
        projections: ``{modality: Tensor[B, E]}`` the same before normalisation (the heads'
            raw output; VICReg and Barlow Twins read these).
        tokens: ``{modality: Tensor[B, T, D]}`` per-modality token features of the encoder (or
            of the fusion module where it rewrites them).
        padding: ``{modality: BoolTensor[B, T]}`` token padding masks (absent = no padding).
        pooled: ``{modality: Tensor[B, D_m]}`` each encoder's pooled vector before its head
            (what a fusion module re-reads when an objective fuses a subset of modalities).
        fused: Joint representation ``Tensor[B, D_f]``: the fusion module's pooled output over
            every observed modality of each row, or ``None`` without fusion (``fusion: none``).
        fused_tokens: ``Tensor[B, T_f, D_f]`` fused tokens, or ``None``.
        fused_padding: ``BoolTensor[B, T_f]`` their padding, or ``None`` when nothing is padded.
        fused_embedding: ``Tensor[B, E]`` the fused vector through the fusion head,
            L2-normalised (in the shared space), or ``None``.
        extras: Objective-specific tensors (matching logits, reconstructions, decoder logits),
            keyed ``"<objective label>/<name>"`` by ``Method.forward``.
    """

    embeddings: dict[str, Tensor]
    projections: dict[str, Tensor] = field(default_factory=dict)
    tokens: dict[str, Tensor] = field(default_factory=dict)
    padding: dict[str, Tensor] = field(default_factory=dict)
    pooled: dict[str, Tensor] = field(default_factory=dict)
    fused: Tensor | None = None
    fused_tokens: Tensor | None = None
    fused_padding: Tensor | None = None
    fused_embedding: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def zero(self, *tensors: Tensor) -> Tensor:
        """A zero loss connected to every embedding (and ``tensors``): its gradients are zeros.

        Objectives return it when a batch gives them nothing to compare (e.g. a modality absent
        from every row), so the backward pass and data-parallel gradient reduction still run.
        """
        total: Tensor | None = None
        for t in [*self.embeddings.values(), *tensors]:
            total = t.sum() if total is None else total + t.sum()
        return torch.zeros(()) if total is None else 0.0 * total


@dataclass
class LossOutput:
    """What an objective (and a method's ``training_step``) returns.

    Attributes:
        loss: Scalar tensor to back-propagate.
        parts: Named scalar components of ``loss`` (kept with their graph so hybrids can weight
            them); for a single objective ``{"name": loss}``.
        metrics: Plain floats for logging (temperature, accuracy of the batch, ...).
    """

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def with_prefix(self, prefix: str) -> LossOutput:
        """Return a copy whose part and metric names are prefixed with ``prefix/``."""
        return replace(
            self,
            parts={f"{prefix}/{k}": v for k, v in self.parts.items()},
            metrics={f"{prefix}/{k}": v for k, v in self.metrics.items()},
        )


@dataclass(frozen=True)
class StepContext:
    """Where training stands, passed to the lifecycle hooks of methods and objectives.

    Attributes:
        step: Optimiser steps taken so far (after the step that triggered an ``after_step``).
        epoch: Current epoch, 0-based.
        total_steps: Optimiser steps of the whole run.
        steps_per_epoch: Optimiser steps per epoch.
    """

    step: int
    epoch: int
    total_steps: int
    steps_per_epoch: int

    @property
    def progress(self) -> float:
        """Fraction of training done, in ``[0, 1]`` (momentum and temperature schedules)."""
        return min(1.0, self.step / max(1, self.total_steps))


@dataclass(frozen=True)
class EpochContext(StepContext):
    """``StepContext`` at the start of an epoch, plus a way to read the whole training split.

    Attributes:
        batches: Returns a fresh, unshuffled pass over the training split (this epoch's
            pairing, on the training device). Hooks that need whole-dataset statistics
            (k-means pseudo-labels, prototype initialisation) iterate it; nothing reads the
            data unless a hook calls it.
    """

    batches: Callable[[], Iterable[Batch]] = field(default=lambda: iter(()))


@runtime_checkable
class Embedder(Protocol):
    """Anything evaluation can read: maps a batch to normalised per-modality embeddings."""

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities this embedder can embed."""
        ...

    def embed(self, batch: Batch) -> dict[str, Tensor]:
        """Return ``{modality: Tensor[B, E]}`` L2-normalised embeddings for the batch.

        Only modalities both in ``self.modalities`` and in ``batch.data`` are returned.
        """
        ...
