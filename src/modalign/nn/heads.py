"""Projection heads: map an encoder's pooled ``Tensor[B, D]`` into the shared space ``[B, E]``.

Heads do not normalise; the model L2-normalises embeddings after the head. ``in_dim`` and
``out_dim`` are filled in by the framework (encoder width and embedding width), so a recipe
only names the hyper-parameters.
"""

from __future__ import annotations

from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.registry import register


def _check_dropout(name: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")


@register("head", "identity")
class IdentityHead(nn.Module):
    """No projection: the tower's pooled output is its embedding (``in_dim == out_dim``).

    With a frozen pretrained tower this locks that tower's embedding space, and the other
    towers' adapters learn to map into it (locked-tower tuning; LiT, Zhai et al. 2022, locks
    the image tower, stitching onto a locked sentence encoder locks the text tower).

    Raises:
        ConfigError: If the encoder width ``in_dim`` differs from ``model.embed_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if in_dim != out_dim:
            msg = f"an identity head needs embed_dim equal to its tower's width {in_dim}, got {out_dim}"
            raise ConfigError("model.embed_dim", msg)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """``Tensor[B, D]`` unchanged."""
        return x


@register("head", "linear")
class LinearHead(nn.Module):
    """A single linear map ``[B, in_dim] -> [B, out_dim]`` (CLIP's projection, Radford et al. 2021).

    Args:
        in_dim: Input width ``D``.
        out_dim: Output width ``E``.
        bias: Add a bias.
        input_dropout: Dropout on the input features (a regulariser for adapters on frozen
            features, where the tower itself cannot be augmented).
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False, input_dropout: float = 0.0) -> None:
        super().__init__()
        _check_dropout("linear head input_dropout", input_dropout)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.drop = nn.Dropout(input_dropout)
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Project ``Tensor[B, in_dim]`` to ``Tensor[B, out_dim]``."""
        return self.proj(self.drop(x))


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
        input_dropout: Dropout on the input features (see ``LinearHead``).

    Raises:
        ValueError: If ``layers < 1`` or a dropout is outside ``[0, 1)``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int | None = None,
        layers: int = 2,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"mlp head needs layers >= 1, got {layers}")
        _check_dropout("mlp head dropout", dropout)
        _check_dropout("mlp head input_dropout", input_dropout)
        self.in_dim = in_dim
        self.out_dim = out_dim
        width = hidden or in_dim
        mods: list[nn.Module] = [nn.Dropout(input_dropout)] if input_dropout else []
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, width), nn.GELU(), nn.Dropout(dropout)]
            d = width
        mods.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        """Project ``Tensor[B, in_dim]`` to ``Tensor[B, out_dim]``."""
        return self.net(x)
