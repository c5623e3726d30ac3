"""Raw inputs for encoders that bring their own preprocessing (pretrained, stitched towers).

A dataset's own transforms (resizing, normalisation, a fitted tokenizer) suit encoders trained
from scratch. A pretrained encoder needs the input *it* was trained on: MiniLM its WordPiece
tokenizer, EfficientNet 224 px RGB with its normalisation, resemblyzer 16 kHz waveforms. So
the dataset hands over the **raw form** of a modality and the encoder does the rest:

* ``text``: the string;
* ``image``: ``uint8`` pixels ``[H, W, 3]`` (RGB, 0-255, alpha composited on white) at the
  dataset's native size;
* ``audio``: a :class:`Waveform` (float samples in ``[-1, 1]`` and their rate).

Datasets expose raw values by *content*: ``raw_count(m)`` distinct contents, ``raw_value(c, m)``
the raw value of content ``c`` and ``raw_index(i, m)`` the content of sample ``i`` (av-digits:
the recording an image is currently paired with), so a feature cache computes each content once.

:class:`InputView` wraps a dataset and replaces the values of the chosen modalities by what a
:class:`ModalityInput` returns for each sample's content (the encoder's preprocessing of the raw
value, or cached features); everything else (labels, ids, pairing, artifacts) is the dataset's.
Raw values are augmented only through **views**: a dataset may offer ``raw_view_count(m) = V``
fixed, deterministic views of each content (view ``0`` the raw value itself; emoji's training
texts: the CLDR name with its keywords re-sampled), and :class:`InputView` draws one of them
per sample and epoch from the torch RNG. A stitched tower thus sees one of ``V`` known inputs,
which is what keeps its features cacheable (see ``docs/architecture.md``, "Stitching").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from modalign.core.types import ModalitySpec, Sample
from modalign.data.base import DatasetView, MultimodalDataset


class Waveform(NamedTuple):
    """Raw audio: ``samples`` float32 ``[N]`` in ``[-1, 1]`` at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int


#: What ``MultimodalDataset.raw_value`` returns: a string, ``uint8 [H, W, 3]`` pixels or a waveform.
RawValue = str | np.ndarray | Waveform

#: The raw form each modality kind is handed over in.
RAW_KINDS = ("text", "image", "audio")


@dataclass(frozen=True)
class ModalityInput:
    """How an :class:`InputView` makes one modality's values.

    Attributes:
        spec: ``ModalitySpec`` of the values it returns (same kind as the dataset's).
        value: ``(content, view) -> `` the sample's tensor (preprocessed input or cached features).
        views: Views per content (``MultimodalDataset.raw_view_count``); ``InputView`` draws
            ``view`` uniformly from ``range(views)`` for every sample it returns.
    """

    spec: ModalitySpec
    value: Callable[[int, int], Tensor]
    views: int = 1


class InputView(DatasetView):
    """``dataset`` with the values of some modalities made from their raw content.

    Args:
        dataset: The wrapped dataset (must implement the ``raw_*`` methods for ``inputs``).
        inputs: ``{modality: ModalityInput}``.

    Raises:
        ValueError: If ``inputs`` names a modality the dataset does not have, or changes its kind.
    """

    def __init__(self, dataset: MultimodalDataset, inputs: dict[str, ModalityInput]) -> None:
        specs = dataset.modalities
        for m, inp in inputs.items():
            if m not in specs:
                raise ValueError(f"InputView: dataset has no modality {m!r} (has {sorted(specs)})")
            if inp.spec.kind != specs[m].kind:
                raise ValueError(f"InputView: {m!r} is {specs[m].kind!r}, the input gives {inp.spec.kind!r}")
        super().__init__(dataset)
        self.inputs = dict(inputs)

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        """The dataset's specs, with those of the replaced modalities."""
        specs = dict(self.dataset.modalities)
        specs.update({m: inp.spec for m, inp in self.inputs.items()})
        return dict(sorted(specs.items()))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        sample = self.dataset.item(index, frozenset(self.inputs))
        values = dict(sample.values)
        for m, inp in self.inputs.items():
            if m in values:
                view = int(torch.randint(inp.views, ())) if inp.views > 1 else 0
                values[m] = inp.value(self.dataset.raw_index(index, m), view)
        return Sample(sample.id, values, sample.labels, sample.modality_ids)
