"""Helpers shared by the masked-prediction tests (MultiMAE and data2vec)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modalign.core import Batch
from modalign.methods import Method


def expected_count(n: int, ratio: float) -> int:
    """Tokens ``random_mask`` masks among ``n`` valid ones: rounded, at least one, one left visible."""
    return 0 if n == 0 else min(max(1, math.floor(ratio * n + 0.5)), max(n - 1, 1))


def stem_valid(method: Method, batch: Batch, m: str) -> Tensor:
    """``BoolTensor[B, T]`` of the stem tokens that exist (observed row, not padded)."""
    tokens, padding = method.model.encoders[m].stem(batch.data[m], batch.padding.get(m))
    valid = torch.ones(tokens.shape[:2], dtype=torch.bool) if padding is None else ~padding
    return valid & batch.rows(m)[:, None]


def perturb_masked(batch: Batch, image_mask: Tensor, audio_mask: Tensor) -> Batch:
    """A copy of ``batch`` whose masked image patches (4x4) and audio frames (2 per token) are noise."""
    image, audio = batch.data["image"].clone(), batch.data["audio"].clone()
    for b, t in image_mask.nonzero().tolist():
        r, c = divmod(t, 2)
        image[b, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 5.0 * torch.randn(1, 4, 4)
    for b, t in audio_mask.nonzero().tolist():
        audio[b, :, 2 * t : 2 * t + 2] += 5.0 * torch.randn(6, 2)
    return Batch({**batch.data, "image": image, "audio": audio}, batch.present, batch.ids, batch.padding)
