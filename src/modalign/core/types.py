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
    """

    id: int
    values: dict[str, Any]
    labels: dict[str, int] = field(default_factory=dict)


@dataclass
class Batch:
    """A collated mini-batch.

    Attributes:
        data: ``{modality: Tensor[B, ...]}``; rows of absent samples are zeros.
        present: ``{modality: BoolTensor[B]}``; ``True`` where the modality was observed.
        padding: ``{modality: BoolTensor[B, T]}`` for sequence modalities; ``True`` = padded.
        ids: ``LongTensor[B]`` sample ids (equal ids = same content).
        labels: ``{name: LongTensor[B]}`` evaluation-only labels, ``-1`` where unknown.
    """

    data: dict[str, Tensor]
    present: dict[str, Tensor]
    ids: Tensor
    padding: dict[str, Tensor] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of samples ``B``."""
        return int(self.ids.shape[0])

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in sorted order."""
        return tuple(sorted(self.data))

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
class FusionOutput:
    """What every fusion module returns.

    Attributes:
        per_modality: ``{modality: EncoderOutput}`` after fusion (two-tower: unchanged).
        fused: A joint representation ``EncoderOutput`` or ``None`` for fusion-free models.
    """

    per_modality: dict[str, EncoderOutput]
    fused: EncoderOutput | None = None


@dataclass
class Outputs:
    """What a model hands to the objectives.

    Attributes:
        embeddings: ``{modality: Tensor[B, E]}`` L2-normalised embeddings in the shared space.
        tokens: ``{modality: Tensor[B, T, D]}`` per-modality token features.
        padding: ``{modality: BoolTensor[B, T]}`` token padding masks (absent = no padding).
        fused: Joint representation ``Tensor[B, D]`` from a fusion module, or ``None``.
        logit_scale: Scalar tensor, the *log* of the inverse temperature, or ``None``.
        logit_bias: Scalar tensor (sigmoid losses), or ``None``.
        extras: Method-specific tensors (reconstructions, matching logits, ...).
    """

    embeddings: dict[str, Tensor]
    tokens: dict[str, Tensor] = field(default_factory=dict)
    padding: dict[str, Tensor] = field(default_factory=dict)
    fused: Tensor | None = None
    logit_scale: Tensor | None = None
    logit_bias: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


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
