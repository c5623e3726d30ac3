"""Batch perturbations: removing modalities and adding noise to one modality.

Used by training-time modality dropout and by the missing-modality and noise evaluation.

A removed modality is removed the way a sample without it arrives from the collator: its
``present`` flag is ``False``, its data rows are zeros and its tokens all padded, so nothing
downstream can read the old values.

Modality dropout (as in Neverova et al. 2016, "ModDrop", and the multimodal transformers
trained to tolerate missing inputs, e.g. Ma et al. 2022) drops each observed modality of each
row with probability ``p`` during training, never every modality of a row.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from modalign.core.types import Batch


def _with_rows_removed(batch: Batch, modality: str, drop: Tensor) -> Batch:
    """``batch`` with ``modality`` marked absent (zero data, all padded) on the rows where ``drop``."""
    x = batch.data[modality]
    keep = (~drop).to(x.device)
    data = {**batch.data, modality: x * keep.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)}
    present = {**batch.present, modality: batch.rows(modality) & keep}
    padding = dict(batch.padding)
    if modality in padding:
        padding[modality] = padding[modality] | drop.to(padding[modality].device)[:, None]
    return replace(batch, data=data, present=present, padding=padding)


def remove_modality(batch: Batch, modality: str) -> Batch:
    """``batch`` with ``modality`` absent from every row.

    Raises:
        KeyError: If the batch has no such modality (naming the ones it has).
    """
    if modality not in batch.data:
        raise KeyError(f"remove_modality: the batch has no modality {modality!r} ({list(batch.modalities)})")
    return _with_rows_removed(batch, modality, torch.ones(batch.size, dtype=torch.bool, device=batch.ids.device))


def drop_modalities(batch: Batch, p: float, generator: torch.Generator | None = None) -> Batch:
    """Modality dropout: each observed modality of each row is removed with probability ``p``.

    A row never loses all its observed modalities: when every one is drawn, one of them (chosen
    uniformly) is kept. With one modality in the batch, or ``p = 0``, the batch is returned as is.
    Draws come from ``generator`` (default: the global torch RNG, which the trainer re-seeds
    every epoch, so runs and resumes repeat exactly).

    Raises:
        ValueError: If ``p`` is outside ``[0, 1)``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"modality dropout must be in [0, 1), got {p}")
    names = batch.modalities
    if p == 0.0 or len(names) < 2:
        return batch
    present = torch.stack([batch.rows(m).cpu() for m in names], dim=1)  # [B, M]
    drop = (torch.rand(present.shape, generator=generator) < p) & present
    lost_all = present.any(dim=1) & ~(present & ~drop).any(dim=1)
    if bool(lost_all.any()):
        scores = torch.rand(present.shape, generator=generator).masked_fill(~present, -1.0)
        keep_one = torch.zeros_like(drop).scatter_(1, scores.argmax(dim=1, keepdim=True), True)
        drop = torch.where(lost_all[:, None], drop & ~keep_one, drop)
    for j, m in enumerate(names):
        if bool(drop[:, j].any()):
            batch = _with_rows_removed(batch, m, drop[:, j].to(batch.ids.device))
    return batch


def add_noise(batch: Batch, modality: str, level: float, generator: torch.Generator) -> Batch:
    """``batch`` with noise on ``modality``'s observed rows.

    * Float data: ``x + level * sd * N(0, 1)``, ``sd`` the standard deviation of the modality's
      observed values in the batch (``level = 1`` is a signal-to-noise ratio of 0 dB).
    * Integer data (token ids): each unpadded token is replaced, with probability
      ``min(1, level / 2)``, by a token drawn uniformly from the batch's unpadded tokens.

    Raises:
        KeyError: If the batch has no such modality.
        ValueError: If ``level < 0``.
    """
    if modality not in batch.data:
        raise KeyError(f"add_noise: the batch has no modality {modality!r} ({list(batch.modalities)})")
    if level < 0:
        raise ValueError(f"noise level must be >= 0, got {level}")
    x = batch.data[modality]
    rows = batch.rows(modality)
    if x.is_floating_point():
        sd = x[rows].float().std() if bool(rows.any()) else x.new_zeros(())
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype) * level * sd
        mask = rows.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return replace(batch, data={**batch.data, modality: x + noise * mask})
    padding = batch.padding.get(modality, torch.zeros(x.shape, dtype=torch.bool, device=x.device))
    valid = ~padding & rows[:, None]
    pool = x[valid]
    if pool.numel() == 0:
        return batch
    swap = (torch.rand(x.shape, generator=generator) < min(1.0, level / 2)).to(x.device) & valid
    drawn = pool[torch.randint(0, pool.numel(), x.shape, generator=generator).to(x.device)]
    return replace(batch, data={**batch.data, modality: torch.where(swap, drawn, x)})
