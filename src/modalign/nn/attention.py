"""Cross-attention blocks and the transformer decoder built from them.

A query sequence ``x: Tensor[B, T, D]`` attends to itself (optionally causally) and to a
context sequence ``context: Tensor[B, S, D_c]`` (another tower's tokens). This is the
captioning decoder of CoCa (Yu et al. 2022) and BLIP (Li et al. 2022) with ``causal=True``,
and the multimodal fusion encoder of ALBEF (Li et al. 2021) with ``causal=False``. Padding
masks follow ``modalign.core.types``: ``BoolTensor[B, T]`` with ``True`` = padded.
"""

from __future__ import annotations

from torch import Tensor, nn

from modalign.nn.layers import block_mlp, check_tokens, self_attend


class CrossAttentionBlock(nn.Module):
    """Pre-norm block with self-attention, cross-attention to a context, and an MLP.

    ``x = x + SelfAttn(LN(x))`` (if ``self_attention``; causal if ``causal``),
    ``x = x + CrossAttn(LN(x), LN_c(context))``, ``x = x + MLP(LN(x))``. The context gets its
    own LayerNorm, as in the cross-attention blocks of open_clip's CoCa, so contexts that are
    not normalised (CNN tokens, raw embeddings) are fine. Rows whose context is all padded get
    no cross-attention update (zero instead of NaN).

    Args:
        dim: Query width ``D``.
        heads: Attention heads (must divide ``dim``).
        context_dim: Context width ``D_c`` (default ``dim``).
        mlp_ratio: Hidden width of the MLP relative to ``dim``.
        dropout: Dropout in attention and MLP.
        causal: Position ``t`` of ``x`` self-attends to positions ``<= t`` only.
        self_attention: Whether the block has a self-attention sub-layer.

    Raises:
        ValueError: If ``heads`` does not divide ``dim`` or ``causal`` is set without
            ``self_attention``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        causal: bool = False,
        self_attention: bool = True,
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        if causal and not self_attention:
            raise ValueError("causal=True needs self_attention=True (the causal mask applies to self-attention)")
        self.dim = dim
        self.context_dim = context_dim or dim
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim) if self_attention else None
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) if self_attention else None
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(self.context_dim)
        self.cross_attn = nn.MultiheadAttention(
            dim, heads, dropout=dropout, batch_first=True, kdim=self.context_dim, vdim=self.context_dim
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = block_mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(
        self, x: Tensor, context: Tensor, padding: Tensor | None = None, context_padding: Tensor | None = None
    ) -> Tensor:
        """Apply the block.

        Args:
            x: Queries ``Tensor[B, T, D]``.
            context: ``Tensor[B, S, D_c]``.
            padding: ``BoolTensor[B, T]`` padding of ``x`` (masks self-attention keys) or ``None``.
            context_padding: ``BoolTensor[B, S]`` padding of ``context`` or ``None``.

        Returns:
            ``Tensor[B, T, D]``; outputs at padded query positions are meaningless.

        Raises:
            ValueError: If shapes of ``x``, ``context`` or the masks disagree.
        """
        check_tokens(x, padding, self.dim, "CrossAttentionBlock")
        check_tokens(context, context_padding, self.context_dim, "CrossAttentionBlock context")
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"CrossAttentionBlock: context batch {context.shape[0]} != query batch {x.shape[0]}")
        if self.attn is not None and self.norm1 is not None:
            x = x + self_attend(self.attn, self.norm1(x), padding, self.causal)
        x = x + self._cross_attend(self.norm_cross(x), self.norm_context(context), context_padding)
        return x + self.mlp(self.norm2(x))

    def _cross_attend(self, h: Tensor, context: Tensor, context_padding: Tensor | None) -> Tensor:
        """``CrossAttn(h, context)``; zero for rows whose context is all padded."""
        if context_padding is None:
            return self.cross_attn(h, context, context, need_weights=False)[0]
        empty = context_padding.all(dim=1)
        mask = context_padding & ~empty[:, None]
        out = self.cross_attn(h, context, context, key_padding_mask=mask, need_weights=False)[0]
        return out.masked_fill(empty[:, None, None], 0.0)


class TransformerDecoder(nn.Module):
    """A stack of ``CrossAttentionBlock``s followed by a final LayerNorm.

    With ``causal=True`` (the default) it is an autoregressive decoder over a context (the
    CoCa / BLIP captioner: position ``t`` predicts token ``t + 1``); with ``causal=False`` a
    bidirectional fusion encoder (ALBEF's multimodal encoder, read by an ITM head).

    Args:
        dim: Query width ``D``.
        depth: Number of blocks.
        heads: Attention heads (must divide ``dim``).
        context_dim: Context width ``D_c`` (default ``dim``).
        causal: Causal self-attention in every block.
        mlp_ratio: Hidden width of the MLP relative to ``dim``.
        dropout: Dropout in attention and MLP.
        self_attention: Whether blocks self-attend (``False``: cross-attention and MLP only).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        context_dim: int | None = None,
        causal: bool = True,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        self_attention: bool = True,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"TransformerDecoder needs depth >= 1, got {depth}")
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(dim, heads, context_dim, mlp_ratio, dropout, causal, self_attention)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: Tensor, context: Tensor, padding: Tensor | None = None, context_padding: Tensor | None = None
    ) -> Tensor:
        """Map queries ``Tensor[B, T, D]`` over ``context: Tensor[B, S, D_c]`` to ``Tensor[B, T, D]``.

        Args:
            x: Queries ``Tensor[B, T, D]`` (e.g. embedded caption tokens with positions).
            context: ``Tensor[B, S, D_c]`` (e.g. image tokens).
            padding: ``BoolTensor[B, T]`` or ``None``.
            context_padding: ``BoolTensor[B, S]`` or ``None``.

        Raises:
            ValueError: If shapes of ``x``, ``context`` or the masks disagree.
        """
        for block in self.blocks:
            x = block(x, context, padding, context_padding)
        return self.norm(x)
