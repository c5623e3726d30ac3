"""Shared layers: masked pooling, padding bookkeeping, transformer blocks, positions, patches.

Padding masks follow ``modalign.core.types``: ``BoolTensor[B, T]`` with ``True`` = padded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from modalign.core.errors import ConfigError


def _check_padding(x: Tensor, padding: Tensor) -> None:
    if padding.dim() != 2 or padding.shape != x.shape[:2]:
        raise ValueError(f"padding of shape {tuple(padding.shape)} does not match tokens of shape {tuple(x.shape)}")


def check_sequence(x: Tensor, padding: Tensor | None, channels: int, name: str) -> None:
    """Check a channels-first sequence ``x: [B, channels, T]`` and its ``padding: [B, T]``.

    Raises:
        ValueError: Naming ``name`` (the component) and the offending shapes.
    """
    if x.dim() != 3 or x.shape[1] != channels:
        raise ValueError(f"{name} expects [B, {channels}, T], got shape {tuple(x.shape)}")
    if padding is not None and padding.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"{name}: padding of shape {tuple(padding.shape)} does not match input {tuple(x.shape)}")


def masked_mean(x: Tensor, padding: Tensor | None = None) -> Tensor:
    """Mean over valid tokens.

    Args:
        x: ``Tensor[B, T, D]``.
        padding: ``BoolTensor[B, T]`` (``True`` = padded) or ``None`` (all valid).

    Returns:
        ``Tensor[B, D]``; rows whose tokens are all padded give zeros (never NaN).

    Raises:
        ValueError: If ``padding`` does not match ``x[:, :, 0]`` in shape.
    """
    if padding is None:
        return x.mean(dim=1)
    _check_padding(x, padding)
    valid = (~padding).unsqueeze(-1).to(x.dtype)
    return (x * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


def masked_max(x: Tensor, padding: Tensor | None = None) -> Tensor:
    """Maximum over valid tokens.

    Args:
        x: ``Tensor[B, T, D]``.
        padding: ``BoolTensor[B, T]`` (``True`` = padded) or ``None``.

    Returns:
        ``Tensor[B, D]``; rows whose tokens are all padded give zeros.
    """
    if padding is None:
        return x.amax(dim=1)
    _check_padding(x, padding)
    filled = x.masked_fill(padding.unsqueeze(-1), float("-inf")).amax(dim=1)
    return filled.masked_fill(padding.all(dim=1, keepdim=True), 0.0)


def zero_padded(x: Tensor, padding: Tensor | None) -> Tensor:
    """Set padded time steps of a channels-first tensor to zero.

    Args:
        x: ``Tensor[B, ..., T]`` (time last, e.g. ``[B, C, T]`` or ``[B, C, F, T]``).
        padding: ``BoolTensor[B, T]`` or ``None`` (returns ``x`` unchanged).

    Returns:
        ``x`` with zeros where ``padding`` is ``True``, so convolutions see zero padding.
    """
    if padding is None:
        return x
    if padding.shape != (x.shape[0], x.shape[-1]):
        raise ValueError(
            f"padding of shape {tuple(padding.shape)} does not match input of shape {tuple(x.shape)} "
            "(time must be the last axis)"
        )
    mask = padding.view(padding.shape[0], *([1] * (x.dim() - 2)), padding.shape[1])
    return x.masked_fill(mask, 0.0)


def downsample_padding(padding: Tensor, new_len: int, kernel: int | None = None, stride: int | None = None) -> Tensor:
    """Padding mask of a downsampled sequence.

    An output position is padded iff every source position it covers is padded.

    Args:
        padding: ``BoolTensor[B, T]`` (``True`` = padded).
        new_len: Output length ``T'``.
        kernel: Window length of the downsampling op (defaults to ``stride``).
        stride: Step of the downsampling op; output ``j`` covers ``[j*stride, j*stride+kernel)``
            clipped to ``T``. ``None`` uses adaptive windows
            ``[floor(j*T/T'), ceil((j+1)*T/T'))`` as ``adaptive_max_pool1d`` does.

    Returns:
        ``BoolTensor[B, T']``; output positions beyond the input are padded.
    """
    if padding.dim() != 2:
        raise ValueError(f"padding must be [B, T], got shape {tuple(padding.shape)}")
    if new_len < 1:
        raise ValueError(f"new_len must be >= 1, got {new_len}")
    valid = (~padding).to(torch.float32).unsqueeze(1)
    if stride is None:
        pooled = F.adaptive_max_pool1d(valid, new_len)
    else:
        k = kernel or stride
        length = valid.shape[-1]
        need = max(0, (new_len - 1) * stride + k - length)
        pooled = F.max_pool1d(F.pad(valid, (0, need)), k, stride)[..., :new_len]
    return pooled.squeeze(1) < 0.5


def conv_bn_relu(c_in: int, c_out: int, dims: int = 2, kernel: int = 3) -> nn.Sequential:
    """``conv(kernel, same padding, no bias) -> BatchNorm -> ReLU`` in 1-D (``dims=1``) or 2-D."""
    if kernel % 2 == 0:
        raise ValueError(f"conv_bn_relu needs an odd kernel for same padding, got {kernel}")
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return nn.Sequential(conv(c_in, c_out, kernel, padding=kernel // 2, bias=False), norm(c_out), nn.ReLU())


def check_tokens(x: Tensor, padding: Tensor | None, dim: int, name: str) -> None:
    """Check a token sequence ``x: [B, T, dim]`` and its ``padding: [B, T]``.

    Raises:
        ValueError: Naming ``name`` (the component) and the offending shapes.
    """
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} expects tokens [B, T, {dim}], got shape {tuple(x.shape)}")
    if padding is not None and padding.shape != x.shape[:2]:
        raise ValueError(f"{name}: padding of shape {tuple(padding.shape)} does not match tokens {tuple(x.shape)}")


def causal_attention_mask(length: int, padding: Tensor | None, heads: int, device: torch.device) -> Tensor:
    """Boolean attention mask (``True`` = blocked) letting position ``t`` see keys ``<= t`` only.

    Args:
        length: Sequence length ``T``.
        padding: ``BoolTensor[B, T]`` key padding (``True`` = padded) or ``None``.
        heads: Attention heads (the 3-D mask is repeated per head, as
            ``nn.MultiheadAttention(attn_mask=...)`` expects).
        device: Device of the mask.

    Returns:
        ``BoolTensor[T, T]`` without ``padding``; otherwise ``BoolTensor[B * heads, T, T]`` that
        also blocks padded keys. A query always sees itself, so no row is fully blocked (a
        padded query, whose earlier keys may all be padded, gives a finite, meaningless output).
    """
    blocked = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    if padding is None:
        return blocked
    eye = torch.eye(length, dtype=torch.bool, device=device)
    return ((blocked | padding[:, None, :]) & ~eye).repeat_interleave(heads, dim=0)


def self_attend(attn: nn.MultiheadAttention, h: Tensor, padding: Tensor | None, causal: bool = False) -> Tensor:
    """Self-attention of ``h: Tensor[B, T, D]`` under the padding (and optional causal) mask.

    Without ``causal``, rows whose tokens are all padded attend to every token instead of
    producing NaN; with it, see :func:`causal_attention_mask`.

    Raises:
        ValueError: If ``padding`` is not ``[B, T]``.
    """
    if padding is not None:
        _check_padding(h, padding)
    if causal:
        blocked = causal_attention_mask(h.shape[1], padding, attn.num_heads, h.device)
        # Without padding the mask is the plain causal one: ``is_causal`` lets
        # ``scaled_dot_product_attention`` skip the blocks above the diagonal instead of reading a mask.
        return attn(h, h, h, attn_mask=blocked, need_weights=False, is_causal=padding is None)[0]
    mask = None if padding is None else padding & ~padding.all(dim=1, keepdim=True)
    return attn(h, h, h, key_padding_mask=mask, need_weights=False)[0]


def block_mlp(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """The transformer MLP: ``Linear(dim, hidden) -> GELU -> Dropout -> Linear(hidden, dim) -> Dropout``."""
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
    )


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (Vaswani et al. 2017; pre-norm as in GPT-2 / ViT).

    ``x = x + Attn(LN(x)); x = x + MLP(LN(x))``. Rows whose tokens are all padded attend to
    every token (instead of producing NaN); their outputs are meaningless and must be masked.
    With ``causal=True`` position ``t`` attends to positions ``<= t`` only (GPT, Radford et al.
    2018), besides the key padding mask.
    """

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, causal: bool = False
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = block_mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        """Apply the block.

        Args:
            x: ``Tensor[B, T, D]``.
            padding: ``BoolTensor[B, T]`` key padding mask (``True`` = padded) or ``None``.

        Returns:
            ``Tensor[B, T, D]``.

        Raises:
            ValueError: If ``padding`` is not ``[B, T]``.
        """
        x = x + self_attend(self.attn, self.norm1(x), padding, self.causal)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of ``TransformerBlock``s followed by a final LayerNorm (``causal`` for every block).

    With ``checkpoint=True`` (activation checkpointing; Chen et al. 2016, "Training Deep Nets
    with Sublinear Memory Cost") a training forward pass keeps only each block's input and
    recomputes the block in the backward pass (``torch.utils.checkpoint``, non-reentrant, RNG
    state preserved so dropout masks repeat): activation memory of about two blocks instead of
    ``depth``, for one more forward pass of all blocks but the last (whose backward runs first,
    so recomputing it would free nothing). ``checkpoint=k`` (an integer) recomputes the first
    ``k`` blocks only and keeps the activations of the others: a memory/time trade-off between
    none and all (Megatron-LM's ``recompute_num_layers``; Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models"); ``k`` is capped at ``depth - 1``.
    Under autocast the recomputed blocks do not cache their weights' low-precision casts
    (``_without_cast_cache``). Evaluation and ``no_grad`` passes are unaffected.

    Raises:
        ConfigError: At ``checkpoint`` for a negative block count.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        causal: bool = False,
        checkpoint: bool | int = False,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout, causal) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.recomputed = recomputed_blocks(checkpoint, depth)

    @property
    def checkpoint(self) -> bool:
        """Whether any block is recomputed in the backward pass."""
        return self.recomputed > 0

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        """Map ``Tensor[B, T, D]`` (with optional ``BoolTensor[B, T]`` padding) to ``[B, T, D]``."""
        recompute = self.recomputed if self.training and torch.is_grad_enabled() else 0
        for i, block in enumerate(self.blocks):
            if i < recompute:
                x = activation_checkpoint(_without_cast_cache, block, x, padding, use_reentrant=False)
            else:
                x = block(x, padding)
        return self.norm(x)


def recomputed_blocks(checkpoint: bool | int, depth: int) -> int:
    """Blocks a ``Transformer`` recomputes: all but the last (``True``), none (``False``) or ``min(k, depth - 1)``.

    The last block's backward runs first, so recomputing it would free nothing.

    Raises:
        ConfigError: At ``checkpoint`` for a negative count.
    """
    if isinstance(checkpoint, bool):
        return max(depth - 1, 0) if checkpoint else 0
    if checkpoint < 0:
        raise ConfigError("checkpoint", f"must be true, false or a block count >= 0, got {checkpoint}")
    return min(checkpoint, max(depth - 1, 0))


def _without_cast_cache(block: nn.Module, x: Tensor, padding: Tensor | None) -> Tensor:
    """``block(x, padding)`` with autocast's weight-cast cache off (a no-op without autocast).

    Autocast keeps the low-precision copy of every weight it casts until the outermost autocast
    region exits; a recomputed block casts its weights again in the backward pass anyway, so
    caching them through the forward pass only holds ``2 bytes x parameters`` for nothing.
    """
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return block(x, padding)
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, dtype=dtype, cache_enabled=False):
        return block(x, padding)


class SinusoidalPositions(nn.Module):
    """Fixed sine/cosine positional encoding (Vaswani et al. 2017), added to the input.

    The table grows on demand, so any sequence length works.
    """

    pe: Tensor

    def __init__(self, dim: int, max_len: int = 1024) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("pe", self._table(max_len, dim), persistent=False)

    @staticmethod
    def _table(length: int, dim: int) -> Tensor:
        pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        table = torch.zeros(length, dim)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
        return table

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x + PE[:T]`` for ``x: Tensor[B, T, D]``."""
        length = x.shape[1]
        if length > self.pe.shape[0]:
            self.pe = self._table(length, self.dim).to(self.pe.device)
        return x + self.pe[:length].to(x.dtype)


class LearnedPositions(nn.Module):
    """Learned absolute position embeddings (BERT, ViT) for at most ``max_len`` tokens."""

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x + P[:T]`` for ``x: Tensor[B, T, D]``.

        Raises:
            ValueError: If ``T > max_len``.
        """
        if x.shape[1] > self.max_len:
            raise ValueError(f"sequence of {x.shape[1]} tokens exceeds max_len={self.max_len}")
        return x + self.weight[: x.shape[1]]


class PatchEmbed2d(nn.Module):
    """Non-overlapping ``patch x patch`` patches of an image, linearly embedded (ViT).

    Maps ``Tensor[B, C, H, W]`` to ``Tensor[B, (H/p)(W/p), D]`` in row-major patch order.
    """

    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        """Embed patches.

        Raises:
            ValueError: If ``x`` is not 4-D or ``H``/``W`` is not a multiple of ``patch``.
        """
        if x.dim() != 4 or x.shape[-1] % self.patch or x.shape[-2] % self.patch:
            raise ValueError(
                f"expected an image [B, C, H, W] with H and W multiples of patch={self.patch}, "
                f"got shape {tuple(x.shape)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class PatchEmbed1d(nn.Module):
    """Non-overlapping frames of ``patch`` time steps, linearly embedded (a strided conv1d).

    ``Tensor[B, C, T]`` is right-padded with zeros to a multiple of ``patch`` and mapped to
    ``Tensor[B, ceil(T/patch), D]``; padded input steps are zeroed first, so they never leak
    into a frame.
    """

    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch}")
        self.patch = patch
        self.proj = nn.Conv1d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Embed frames.

        Args:
            x: ``Tensor[B, C, T]``.
            padding: ``BoolTensor[B, T]`` or ``None``.

        Returns:
            ``(tokens Tensor[B, T', D], padding BoolTensor[B, T'] or None)``.
        """
        if x.dim() != 3:
            raise ValueError(f"expected [B, C, T], got shape {tuple(x.shape)}")
        x = zero_padded(x, padding)
        extra = (-x.shape[-1]) % self.patch
        x = F.pad(x, (0, extra))
        tokens = self.proj(x).transpose(1, 2)
        if padding is None:
            return tokens, None
        return tokens, downsample_padding(padding, tokens.shape[1], stride=self.patch)
