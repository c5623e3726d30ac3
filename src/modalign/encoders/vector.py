"""Encoder for fixed-width feature vectors ``FloatTensor[B, D_in]``."""

from __future__ import annotations

from torch import Tensor, nn

from modalign.core.modules import Encoder
from modalign.core.registry import register
from modalign.core.types import EncoderOutput
from modalign.nn.heads import MLPHead


@register("encoder", "vector_mlp")
class VectorMLP(Encoder):
    """Multi-layer perceptron for tabular / pre-extracted feature vectors.

    ``LayerNorm(D_in)`` then ``layers`` linear layers with GELU between them. ``pooled`` is the
    output ``[B, dim]``; ``tokens`` is the same vector as a single token ``[B, 1, dim]``;
    ``padding`` is ``None``.

    Args:
        in_channels: Input width ``D_in`` (from the modality spec).
        dim: Output width ``D``.
        hidden: Hidden width.
        layers: Linear layers (``>= 1``).
        dropout: Dropout after each hidden activation.
    """

    kind = "vector"

    def __init__(
        self, in_channels: int, dim: int = 128, hidden: int = 256, layers: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.dim = dim
        self.norm = nn.LayerNorm(in_channels)
        self.mlp = MLPHead(in_channels, dim, hidden=hidden, layers=layers, dropout=dropout)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode ``FloatTensor[B, D_in]`` (``padding`` is ignored).

        Raises:
            ValueError: If ``x`` is not ``[B, in_channels]``.
        """
        if x.dim() != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"vector_mlp expects [B, {self.in_channels}], got shape {tuple(x.shape)}")
        pooled = self.mlp(self.norm(x))
        return EncoderOutput(tokens=pooled.unsqueeze(1), pooled=pooled, padding=None)
