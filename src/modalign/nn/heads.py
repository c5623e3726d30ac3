"""Projection heads: map an encoder's pooled ``Tensor[B, D]`` into the shared space ``[B, E]``.

Heads do not normalise; the model L2-normalises embeddings after the head. ``in_dim`` and
``out_dim`` are filled in by the framework (encoder width and embedding width), so a recipe
only names the hyper-parameters.
"""

from __future__ import annotations

from torch import Tensor, nn

from modalign.core.registry import register


@register("head", "linear")
class LinearHead(nn.Module):
    """A single linear map ``[B, in_dim] -> [B, out_dim]`` (CLIP's projection, Radford et al. 2021)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Project ``Tensor[B, in_dim]`` to ``Tensor[B, out_dim]``."""
        return self.proj(x)


@register("head", "mlp")
class MLPHead(nn.Module):
    """``layers`` linear maps with GELU (and dropout) between them.

    The projection head of SimCLR (Chen et al. 2020).

    Args:
        in_dim: Input width ``D``.
        out_dim: Output width ``E``.
        hidden: Width of the hidden layers (default: ``in_dim``).
        layers: Number of linear layers (``1`` is a linear head).
        dropout: Dropout probability after each hidden activation.

    Raises:
        ValueError: If ``layers < 1`` or ``dropout`` is outside ``[0, 1)``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden: int | None = None, layers: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"mlp head needs layers >= 1, got {layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"mlp head dropout must be in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        width = hidden or in_dim
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, width), nn.GELU(), nn.Dropout(dropout)]
            d = width
        mods.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        """Project ``Tensor[B, in_dim]`` to ``Tensor[B, out_dim]``."""
        return self.net(x)
