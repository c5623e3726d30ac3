"""Query-based resampler: a fixed number of learned queries read a variable-length token sequence.

The adapter of Flamingo's Perceiver Resampler (Alayrac et al. 2022, "Flamingo: a Visual Language
Model for Few-Shot Learning") and BLIP-2's Q-Former (Li et al. 2023, "BLIP-2: Bootstrapping
Language-Image Pre-training with Frozen Image Encoders and Large Language Models"): ``Q``
learned query vectors cross-attend to the (frozen) tokens of a pretrained tower and self-attend
among themselves, so a tower with any number of tokens (7 x 7 CNN grid, a sentence, partial
utterances) becomes ``Q`` trainable tokens of width ``dim``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalign.nn.attention import CrossAttentionBlock


class QueryResampler(nn.Module):
    """``Q`` learned queries, ``layers`` cross-attention blocks over the context, a final LayerNorm.

    Args:
        context_dim: Width ``D_c`` of the tokens read.
        queries: Number of learned queries ``Q``.
        dim: Width ``D`` of the queries and outputs.
        layers: Number of ``CrossAttentionBlock``s (self-attention among queries, cross-attention
            to the context, MLP).
        heads: Attention heads (must divide ``dim``).
        dropout: Dropout in attention and MLP.

    Raises:
        ValueError: If ``queries`` or ``layers`` is below 1, or ``heads`` does not divide ``dim``.
    """

    def __init__(
        self, context_dim: int, queries: int = 8, dim: int = 256, layers: int = 1, heads: int = 4, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if queries < 1 or layers < 1:
            raise ValueError(f"QueryResampler needs queries >= 1 and layers >= 1, got {queries} and {layers}")
        self.dim = dim
        self.queries = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(dim, heads, context_dim=context_dim, dropout=dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, context: Tensor, padding: Tensor | None = None) -> Tensor:
        """Read ``context: Tensor[B, S, D_c]`` (``padding: BoolTensor[B, S]``, True = padded) into ``[B, Q, D]``."""
        x = self.queries.unsqueeze(0).expand(context.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, context, context_padding=padding)
        out: Tensor = self.norm(x)
        return out
