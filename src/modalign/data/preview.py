"""Human-viewable forms of a sample's values, for reports: pixels, waveforms, text.

A dataset's ``Sample`` holds model inputs (normalised pixels, log-mel features, token ids).
``MultimodalDataset.previews(index)`` turns them back into what a person can look at or
listen to, as ``Preview`` values; the default here works from the sample itself, and datasets
that keep the source (a waveform, the raw text) override it to return that instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from modalign.data.transforms.image import ImageTransform
from modalign.data.transforms.text import TextTokenizer

if TYPE_CHECKING:
    from modalign.data.base import MultimodalDataset


@dataclass(frozen=True)
class Preview:
    """One modality value of one sample, in a viewable form.

    Attributes:
        kind: ``image``, ``audio``, ``text``, ``series`` or ``vector``.
        value: image ``uint8 [H, W, C]`` (``C`` 1 or 3); audio ``float32 [N]`` waveform in
            ``[-1, 1]`` when ``sample_rate`` is set, else ``float32 [n_mels, T]`` log-mel
            features; text ``str``; series ``float32 [C, T]``; vector ``float32 [D]``.
        sample_rate: Audio waveforms only: samples per second.
    """

    kind: str
    value: np.ndarray | str
    sample_rate: int | None = None

    @property
    def is_waveform(self) -> bool:
        """``True`` for an audio waveform (playable), ``False`` otherwise."""
        return self.kind == "audio" and self.sample_rate is not None


def image_pixels(x: Tensor, transform: ImageTransform | None) -> np.ndarray:
    """Undo an image transform's normalisation: ``FloatTensor[C, H, W]`` -> ``uint8 [H, W, C]``.

    Without a transform the values are min-max scaled to ``[0, 255]``.
    """
    x = x.detach().float().cpu()
    if transform is not None and transform.channels == x.shape[0]:
        unit = x * transform.std + transform.mean
    else:
        low, high = float(x.min()), float(x.max())
        unit = (x - low) / max(high - low, 1e-12)
    return (unit.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def token_text(ids: Tensor, tokenizer: TextTokenizer | None) -> str:
    """Token ids back to text (special tokens dropped), or the ids themselves without a tokenizer."""
    values = [int(i) for i in ids.tolist() if int(i) != 0]
    if tokenizer is None:
        return "token ids: " + " ".join(str(i) for i in values)
    return tokenizer.decode(values)


def sample_previews(dataset: MultimodalDataset, index: int) -> dict[str, Preview]:
    """Previews of sample ``index`` built from its transformed values.

    Images are un-normalised with the dataset's ``image_tf`` when it has one; text is decoded
    with its ``tokenizer`` (or ``tokenizers[modality]``); audio stays log-mel features (a
    dataset that keeps waveforms overrides ``previews``); series and vectors are their values.
    """
    sample = dataset[index]
    specs = dataset.modalities
    transform = getattr(dataset, "image_tf", None)
    out: dict[str, Preview] = {}
    for m, x in sample.values.items():
        kind = specs[m].kind
        if kind == "image":
            out[m] = Preview(kind, image_pixels(x, transform if isinstance(transform, ImageTransform) else None))
        elif kind == "text":
            out[m] = Preview(kind, token_text(x, _tokenizer(dataset, m)))
        else:
            out[m] = Preview(kind, x.detach().float().cpu().numpy())
    return out


def _tokenizer(dataset: MultimodalDataset, modality: str) -> TextTokenizer | None:
    """The dataset's tokenizer of a text modality, if it keeps one where it is usually kept."""
    many = getattr(dataset, "tokenizers", None)
    one = many.get(modality) if isinstance(many, dict) else getattr(dataset, "tokenizer", None)
    return one if isinstance(one, TextTokenizer) else None
