"""Text encoders over token ids ``LongTensor[B, T]`` (pad id ``0``).

``padding`` is ``BoolTensor[B, T]`` (``True`` = padded); when it is ``None`` it is derived as
``x == 0``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Encoder
from modalign.core.registry import register
from modalign.core.types import EncoderOutput, ModalitySpec
from modalign.nn.heads import MLPHead
from modalign.nn.layers import LearnedPositions, Transformer, check_tokens, masked_mean


def _text_padding(x: Tensor, padding: Tensor | None, vocab_size: int, name: str) -> Tensor:
    if x.dim() != 2 or x.is_floating_point():
        raise ValueError(f"{name} expects token ids LongTensor[B, T], got {x.dtype} {tuple(x.shape)}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab_size):
        raise ValueError(f"{name}: token ids must lie in [0, {vocab_size}), got range [{int(x.min())}, {int(x.max())}]")
    if padding is None:
        return x == 0
    if padding.shape != x.shape:
        raise ValueError(f"{name}: padding {tuple(padding.shape)} does not match ids {tuple(x.shape)}")
    return padding.bool()


class _TextEncoder(Encoder):
    kind = "text"
    token_stem = True
    vocab_size: int

    def targets(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        """The token ids themselves, ``LongTensor[B, T]`` (one per stem token).

        Raises:
            ValueError: On non-integer or out-of-vocabulary ids or a padding mask of another shape.
        """
        _text_padding(x, padding, self.vocab_size, type(self).__name__)
        return x.long()

    @classmethod
    def spec_kwargs(cls, spec: ModalitySpec) -> dict[str, Any]:
        """``vocab_size`` from the spec.

        Raises:
            ConfigError: If the spec has no ``vocab_size``.
        """
        if spec.vocab_size is None:
            raise ConfigError("vocab_size", f"{cls.__name__} needs the tokenizer's vocabulary size")
        return {"vocab_size": spec.vocab_size}


@register("encoder", "text_transformer")
class TextTransformer(_TextEncoder):
    """Bidirectional transformer text encoder (BERT, Devlin et al. 2019).

    The CLIP text tower (Radford et al. 2021) without the causal mask.
    Token and learned position embeddings, pre-norm transformer blocks with the padding mask.
    ``tokens`` are ``[B, T, dim]``; ``pooled`` is the masked mean over valid tokens
    (``pool="mean"``) or the first token (``pool="cls"``, for tokenizers that prepend [CLS]),
    ``[B, dim]``. Token stem (see ``Encoder``): ``stem`` is token plus position embeddings,
    ``trunk`` the transformer and pooling, ``targets`` the token ids.

    Args:
        vocab_size: Tokenizer vocabulary size (from the modality spec).
        dim: Width ``D``.
        depth: Number of transformer blocks.
        heads: Attention heads (must divide ``dim``).
        max_len: Longest accepted sequence.
        pool: ``"mean"`` or ``"cls"``.
        mlp_ratio: Hidden width of the block MLP relative to ``dim``.
        dropout: Dropout in attention and MLP.
        checkpoint: Activation checkpointing: each transformer block is recomputed in the
            backward pass instead of keeping its activations (``Transformer``).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        max_len: int = 64,
        pool: Literal["mean", "cls"] = "mean",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ConfigError("pool", f"invalid value {pool!r}", ["mean", "cls"])
        self.vocab_size = vocab_size
        self.dim = self.stem_dim = dim
        self.pool = pool
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.positions = LearnedPositions(dim, max_len)
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, dropout, checkpoint=checkpoint)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode ``LongTensor[B, T]`` ids with optional ``BoolTensor[B, T]`` padding: ``trunk(*stem(x))``.

        Raises:
            ValueError: On non-integer or out-of-vocabulary ids, ``T > max_len`` or a padding
                mask of another shape.
        """
        return self.trunk(*self.stem(x, padding))

    def stem(self, x: Tensor, padding: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Token plus position embeddings ``[B, T, dim]`` and the padding ``BoolTensor[B, T]``.

        Raises:
            ValueError: On non-integer or out-of-vocabulary ids, ``T > max_len`` or a padding
                mask of another shape.
        """
        padding = _text_padding(x, padding, self.vocab_size, "text_transformer")
        return self.positions(self.embed(x)), padding

    def trunk(self, tokens: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode stem tokens ``[B, T, dim]`` (any subset; ``pool="cls"`` pools whichever comes first).

        Raises:
            ValueError: If ``tokens`` is not ``[B, T, dim]`` or ``padding`` not ``[B, T]``.
        """
        check_tokens(tokens, padding, self.dim, "text_transformer")
        tokens = self.transformer(tokens, padding)
        pooled = tokens[:, 0] if self.pool == "cls" else masked_mean(tokens, padding)
        return EncoderOutput(tokens=tokens, pooled=pooled, padding=padding)


@register("encoder", "text_bow")
class TextBoW(_TextEncoder):
    """Bag of words (fastText-like, Joulin et al. 2017): token embeddings, masked mean, MLP.

    Order-free and cheap; strong for short label texts ("a photo of a seven"). ``tokens`` are
    the token embeddings ``[B, T, dim]``; ``pooled`` is ``MLP(masked mean)`` ``[B, dim]``.
    In training mode, ``word_dropout`` leaves each valid token out of the mean with that
    probability (the word dropout of Iyyer et al. 2015, "Deep Unordered Composition Rivals
    Syntactic Methods"); a sample always keeps at least one token. Token stem (see
    ``Encoder``): ``stem`` is the token embeddings, ``trunk`` the masked mean and MLP,
    ``targets`` the token ids.

    Args:
        vocab_size: Tokenizer vocabulary size (from the modality spec).
        dim: Width ``D``.
        hidden: Hidden width of the MLP.
        layers: Linear layers of the MLP (``>= 1``).
        word_dropout: Probability of dropping a token from the mean while training.
    """

    def __init__(
        self, vocab_size: int, dim: int = 128, hidden: int = 256, layers: int = 2, word_dropout: float = 0.0
    ) -> None:
        super().__init__()
        if not 0.0 <= word_dropout < 1.0:
            raise ConfigError("word_dropout", f"must be in [0, 1), got {word_dropout}")
        self.vocab_size = vocab_size
        self.dim = self.stem_dim = dim
        self.word_dropout = word_dropout
        self.embed = nn.Embedding(vocab_size, dim)
        self.mlp = MLPHead(dim, dim, hidden=hidden, layers=layers)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode ``LongTensor[B, T]`` ids with optional ``BoolTensor[B, T]`` padding: ``trunk(*stem(x))``.

        Raises:
            ValueError: On non-integer or out-of-vocabulary ids or a padding mask of another shape.
        """
        return self.trunk(*self.stem(x, padding))

    def stem(self, x: Tensor, padding: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Token embeddings ``[B, T, dim]`` (no positions: bags are order-free) and the padding.

        Raises:
            ValueError: On non-integer or out-of-vocabulary ids or a padding mask of another shape.
        """
        padding = _text_padding(x, padding, self.vocab_size, "text_bow")
        return self.embed(x), padding

    def trunk(self, tokens: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """``MLP(masked mean)`` of stem tokens ``[B, T, dim]`` (word dropout while training).

        Raises:
            ValueError: If ``tokens`` is not ``[B, T, dim]`` or ``padding`` not ``[B, T]``.
        """
        check_tokens(tokens, padding, self.dim, "text_bow")
        if padding is None:
            padding = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens=tokens, pooled=self.mlp(masked_mean(tokens, self._drop(padding))), padding=padding)

    def _drop(self, padding: Tensor) -> Tensor:
        """Padding mask with dropped words marked as padded (training only)."""
        if not self.training or self.word_dropout == 0.0:
            return padding
        dropped = padding | (torch.rand(padding.shape, device=padding.device) < self.word_dropout)
        emptied = dropped.all(dim=1)
        return torch.where(emptied[:, None], padding, dropped)
