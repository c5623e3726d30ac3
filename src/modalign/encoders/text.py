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
    """Transformer text encoder: bidirectional (BERT, Devlin et al. 2019) or causal (CLIP's text tower).

    Token and learned position embeddings, pre-norm transformer blocks with the padding mask.
    ``tokens`` are ``[B, T, dim]``; ``pooled`` is the masked mean over valid tokens
    (``pool="mean"``), the first token (``pool="cls"``, for tokenizers that prepend [CLS]) or
    the last valid token (``pool="last"``), ``[B, dim]``. Token stem (see ``Encoder``): ``stem``
    is token plus position embeddings, ``trunk`` the transformer and pooling, ``targets`` the
    token ids.

    ``causal=True`` with ``pool="last"`` is the CLIP text tower (Radford et al. 2021; GPT-2
    blocks, pooled at the end-of-text token, which closes the text): position ``t`` attends to
    positions ``<= t`` only. When the padding is a suffix of every row (right padding, as the
    tokenizers write it) no valid token can see a padded one, so the blocks run without a
    padding mask on the plain causal kernel (``is_causal``); the outputs at padded positions are
    then meaningless (they are masked downstream, as ``padding`` says). Other padding (a
    gathered subset of tokens) keeps the per-row mask.

    Args:
        vocab_size: Tokenizer vocabulary size (from the modality spec).
        dim: Width ``D``.
        depth: Number of transformer blocks.
        heads: Attention heads (must divide ``dim``).
        max_len: Longest accepted sequence.
        pool: ``"mean"``, ``"cls"`` or ``"last"``; ``"cls"`` is refused with ``causal`` (the
            first token sees only itself).
        mlp_ratio: Hidden width of the block MLP relative to ``dim``.
        dropout: Dropout in attention and MLP.
        checkpoint: Activation checkpointing: ``true`` recomputes every transformer block but
            the last in the backward pass instead of keeping its activations, an integer ``k``
            the first ``k`` blocks only (``Transformer``).
        causal: Causal self-attention (see above).

    Raises:
        ConfigError: At ``pool`` for an unknown value, or ``"cls"`` with ``causal``.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        max_len: int = 64,
        pool: Literal["mean", "cls", "last"] = "mean",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        checkpoint: bool | int = False,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if pool not in ("mean", "cls", "last"):
            raise ConfigError("pool", f"invalid value {pool!r}", ["mean", "cls", "last"])
        if causal and pool == "cls":
            reason = "'cls' pools the first token, which a causal tower lets see only itself"
            raise ConfigError("pool", reason, ["mean", "last"])
        self.vocab_size = vocab_size
        self.dim = self.stem_dim = dim
        self.pool, self.causal = pool, causal
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.positions = LearnedPositions(dim, max_len)
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, dropout, causal=causal, checkpoint=checkpoint)

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
        unmasked = self.causal and (padding is None or is_suffix(padding))
        tokens = self.transformer(tokens, None if unmasked else padding)
        if self.pool == "cls":
            pooled = tokens[:, 0]
        elif self.pool == "last":
            pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), last_valid(tokens, padding)]
        else:
            pooled = masked_mean(tokens, padding)
        return EncoderOutput(tokens=tokens, pooled=pooled, padding=padding)


def is_suffix(padding: Tensor) -> bool:
    """Whether the padding of every row of ``BoolTensor[B, T]`` is a suffix (no valid token after a padded one)."""
    return not bool((padding[:, :-1] & ~padding[:, 1:]).any())


def last_valid(tokens: Tensor, padding: Tensor | None) -> Tensor:
    """``LongTensor[B]``: the position of each row's last valid token (``T - 1`` without padding; 0 if all padded)."""
    b, t = tokens.shape[:2]
    if padding is None:
        return torch.full((b,), t - 1, dtype=torch.long, device=tokens.device)
    positions = torch.arange(t, device=tokens.device).expand(b, t)
    return positions.masked_fill(padding, 0).amax(dim=1)


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
