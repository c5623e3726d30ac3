"""Helpers shared by the token-level fusion modules (``early``, ``shared``, attention, ``bottleneck``).

Padding masks follow ``modalign.core.types``: ``BoolTensor[B, T]`` with ``True`` = padded. A
modality's tokens are "valid" in a row only where the modality is present and the token is
not padded; every module builds its attention masks from :func:`valid_padding`, so absent
values and padded tokens never reach a key, a value, a mean or a returned token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalign.core.types import EncoderOutput
from modalign.nn.layers import LearnedPositions


def batch_size(inputs: dict[str, EncoderOutput]) -> int:
    """Rows ``B`` of the batch.

    Raises:
        ValueError: If ``inputs`` is empty (no modality observed in the batch).
    """
    if not inputs:
        raise ValueError("fusion needs at least one modality in the batch")
    return int(next(iter(inputs.values())).tokens.shape[0])


def valid_padding(out: EncoderOutput, present: Tensor) -> Tensor:
    """``BoolTensor[B, T]``: ``out``'s padding, with every token of a row where ``present`` is False padded.

    Args:
        out: One modality's encoder output, ``tokens: Tensor[B, T, D_m]``.
        present: ``BoolTensor[B]``, whether the modality is observed in each row.
    """
    b, t = out.tokens.shape[:2]
    padding = out.padding
    if padding is None:
        padding = torch.zeros(b, t, dtype=torch.bool, device=out.tokens.device)
    return padding | ~present.to(torch.bool)[:, None]


def unpadded(b: int, t: int, device: torch.device) -> Tensor:
    """``BoolTensor[B, T]`` of ``False`` (nothing padded): the mask of CLS, query or bottleneck tokens."""
    return torch.zeros(b, t, dtype=torch.bool, device=device)


def zero_padded_tokens(tokens: Tensor, padding: Tensor) -> Tensor:
    """``tokens: Tensor[B, T, D]`` with padded positions set to exactly zero (no gradient flows there)."""
    return tokens.masked_fill(padding[..., None], 0.0)


def present_mean(values: list[Tensor], present: list[Tensor]) -> Tensor:
    """Mean over the modalities present in each row.

    Args:
        values: One ``Tensor[B, ...]`` per modality.
        present: One ``BoolTensor[B]`` per modality (same order).

    Returns:
        ``Tensor[B, ...]``: per row, the mean of the present modalities' values; zeros for a row
        where none is present. Values of absent modalities are masked out (not multiplied by
        zero), so neither they nor their gradient ever matter, even when not finite.
    """
    stacked = torch.stack(values, dim=0)  # [M, B, ...]
    mask = torch.stack(present, dim=0).view(*stacked.shape[:2], *([1] * (stacked.dim() - 2)))
    total = stacked.masked_fill(~mask, 0.0).sum(dim=0)
    return total / mask.sum(dim=0).clamp(min=1).to(total.dtype)


def learned_token(*shape: int) -> nn.Parameter:
    """A learned token (CLS, modality embedding, bottleneck), truncated-normal initialised (std 0.02)."""
    weight = nn.Parameter(torch.zeros(*shape))
    nn.init.trunc_normal_(weight, std=0.02)
    return weight


class ModalityEmbedding(nn.Module):
    """One modality's input layer: ``Linear(D_m, D) + modality embedding + learned positions``.

    Args:
        width: Token width ``D_m`` of the modality.
        dim: Fused width ``D``.
        max_tokens: Longest token sequence the learned positions cover.
    """

    def __init__(self, width: int, dim: int, max_tokens: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, dim)
        self.modality = learned_token(dim)
        self.positions = LearnedPositions(dim, max_tokens)

    def forward(self, tokens: Tensor) -> Tensor:
        """Map ``Tensor[B, T, D_m]`` to ``Tensor[B, T, D]``.

        Raises:
            ValueError: If ``T > max_tokens``.
        """
        return self.positions(self.proj(tokens) + self.modality)
