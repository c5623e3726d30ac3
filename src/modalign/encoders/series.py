"""Time-series encoders over ``FloatTensor[B, C, T]`` (channels first).

``padding`` is ``BoolTensor[B, T]`` (``True`` = padded). Padded steps are zeroed before every
convolution so their values never reach valid outputs; the sequence length is kept, so the
returned ``padding`` is the input's (``series_conv`` with ``token_pool > 1``: its pooled steps').
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Encoder
from modalign.core.registry import register
from modalign.core.types import EncoderOutput
from modalign.nn.layers import (
    SinusoidalPositions,
    Transformer,
    check_sequence,
    check_tokens,
    conv_bn_relu,
    masked_max,
    masked_mean,
    zero_padded,
)


@register("encoder", "series_conv")
class SeriesConv(Encoder):
    """Fully convolutional network for time series (Wang et al. 2017).

    After "Time Series Classification from Scratch with Deep Neural Networks: A Strong
    Baseline". A stack of conv1d-BN-ReLU layers with "same" padding. ``tokens`` are time steps after a
    linear map to ``dim``: ``[B, T, dim]`` (``[B, ceil(T / token_pool), dim]`` with
    ``token_pool > 1``); ``pooled`` is a linear map of the concatenated masked mean and masked
    max over the time steps, ``[B, dim]``.

    Args:
        in_channels: Series channels (from the modality spec).
        widths: Channels of each conv layer.
        kernel: Odd kernel length.
        dim: Output width ``D``.
        token_pool: Returned tokens are means of this many consecutive steps (``pool_steps``),
            for token objectives whose cost grows with the length (``soft_dtw`` is quadratic);
            ``pooled`` always reads every step, so 1 (the default) and other values give the
            same ``pooled``.
    """

    kind = "series"

    def __init__(
        self,
        in_channels: int,
        widths: tuple[int, ...] = (64, 128, 128),
        kernel: int = 5,
        dim: int = 128,
        token_pool: int = 1,
    ) -> None:
        super().__init__()
        if not widths:
            raise ConfigError("widths", "series_conv needs at least one layer")
        if kernel % 2 == 0:
            raise ConfigError("kernel", f"series_conv needs an odd kernel, got {kernel}")
        if token_pool < 1:
            raise ConfigError("token_pool", f"series_conv needs token_pool >= 1 steps, got {token_pool}")
        self.in_channels = in_channels
        self.dim = dim
        self.token_pool = token_pool
        chans = [in_channels, *widths]
        self.layers = nn.ModuleList(
            conv_bn_relu(chans[i], chans[i + 1], dims=1, kernel=kernel) for i in range(len(widths))
        )
        self.to_tokens = nn.Linear(widths[-1], dim)
        self.pool_proj = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode ``FloatTensor[B, C, T]`` with optional ``BoolTensor[B, T]`` padding.

        Returns:
            ``tokens [B, T', dim]`` and their ``padding [B, T']`` (``T' = ceil(T / token_pool)``)
            and ``pooled [B, dim]``.
        """
        check_sequence(x, padding, self.in_channels, "series_conv")
        h = zero_padded(x, padding)
        for layer in self.layers:
            h = zero_padded(layer(h), padding)
        tokens = self.to_tokens(h.transpose(1, 2))
        stats = torch.cat([masked_mean(tokens, padding), masked_max(tokens, padding)], dim=-1)
        tokens, token_padding = pool_steps(tokens, padding, self.token_pool)
        return EncoderOutput(tokens=tokens, pooled=self.pool_proj(stats), padding=token_padding)


def pool_steps(tokens: Tensor, padding: Tensor | None, size: int) -> tuple[Tensor, Tensor | None]:
    """Average each run of ``size`` consecutive steps of ``tokens [B, T, D]``: ``[B, ceil(T / size), D]``.

    The mean is over the valid steps of a run (the last run may be shorter); a pooled step is
    padded when all of its steps are, so right padding stays right padding. ``size == 1``
    returns the inputs unchanged.

    Args:
        tokens: ``FloatTensor[B, T, D]``.
        padding: ``BoolTensor[B, T]`` (True = padded) or ``None``.
        size: Steps per pooled step, ``>= 1``.

    Returns:
        ``(FloatTensor[B, T', D], BoolTensor[B, T'] or None)`` with ``T' = ceil(T / size)``.
    """
    if size == 1:
        return tokens, padding
    b, t, d = tokens.shape
    runs = -(-t // size)
    valid = torch.ones(b, t, dtype=tokens.dtype, device=tokens.device) if padding is None else (~padding).to(tokens)
    extra = runs * size - t
    sums = F.pad(tokens * valid[..., None], (0, 0, 0, extra)).reshape(b, runs, size, d).sum(dim=2)
    counts = F.pad(valid, (0, extra)).reshape(b, runs, size).sum(dim=2)
    pooled = sums / counts.clamp(min=1.0)[..., None]
    return pooled, None if padding is None else counts == 0


@register("encoder", "series_transformer")
class SeriesTransformer(Encoder):
    """Transformer for time series with a convolutional stem.

    The conv stem follows Xiao et al. 2021 ("Early Convolutions Help Transformers See
    Better"), applied to 1-D signals.
    A conv1d stem ("same" padding, GELU) maps channels to ``dim``; sinusoidal positions and
    pre-norm transformer blocks with the padding mask follow. ``tokens`` are ``[B, T, dim]``;
    ``pooled`` is their masked mean ``[B, dim]``. Token stem (see ``Encoder``): ``stem`` is the
    conv stem plus positions, ``trunk`` the transformer and pooling, ``targets`` the input steps.

    Args:
        in_channels: Series channels (from the modality spec).
        dim: Width ``D``.
        depth: Number of transformer blocks.
        heads: Attention heads (must divide ``dim``).
        kernel: Odd kernel length of the stem.
        mlp_ratio: Hidden width of the block MLP relative to ``dim``.
        dropout: Dropout in attention and MLP.
        checkpoint: Activation checkpointing: ``true`` recomputes every transformer block but
            the last in the backward pass instead of keeping its activations, an integer ``k``
            the first ``k`` blocks only (``Transformer``).
    """

    kind = "series"
    token_stem = True

    def __init__(
        self,
        in_channels: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        kernel: int = 5,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        checkpoint: bool | int = False,
    ) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ConfigError("kernel", f"series_transformer needs an odd kernel, got {kernel}")
        self.in_channels = in_channels
        self.dim = self.stem_dim = dim
        self.stem_conv = nn.Sequential(nn.Conv1d(in_channels, dim, kernel, padding=kernel // 2), nn.GELU())
        self.positions = SinusoidalPositions(dim)
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, dropout, checkpoint=checkpoint)
        self.register_load_state_dict_pre_hook(_rename_old_stem)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode ``FloatTensor[B, C, T]`` with optional ``BoolTensor[B, T]`` padding: ``trunk(*stem(x))``.

        Raises:
            ValueError: If ``x`` is not ``[B, C, T]`` or ``padding`` not ``[B, T]``.
        """
        return self.trunk(*self.stem(x, padding))

    def stem(self, x: Tensor, padding: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """One token per time step, conv stem plus sinusoidal positions ``[B, T, dim]``; the padding.

        Raises:
            ValueError: If ``x`` is not ``[B, C, T]`` or ``padding`` not ``[B, T]``.
        """
        check_sequence(x, padding, self.in_channels, "series_transformer")
        tokens = self.stem_conv(zero_padded(x, padding)).transpose(1, 2)
        return self.positions(tokens), padding

    def trunk(self, tokens: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Transformer and masked mean over stem tokens ``[B, T, dim]`` (any subset).

        Raises:
            ValueError: If ``tokens`` is not ``[B, T, dim]`` or ``padding`` not ``[B, T]``.
        """
        check_tokens(tokens, padding, self.dim, "series_transformer")
        tokens = self.transformer(tokens, padding)
        return EncoderOutput(tokens=tokens, pooled=masked_mean(tokens, padding), padding=padding)

    def targets(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        """The input step of each token, ``FloatTensor[B, T, C]`` (zero where padded).

        Token ``t`` stands for step ``t``, but the conv stem reads steps ``t - kernel // 2`` to
        ``t + kernel // 2``, so visible neighbours carry part of a masked step: mask spans
        longer than ``kernel`` for a reconstruction task that is not trivial.

        Raises:
            ValueError: If ``x`` is not ``[B, C, T]`` or ``padding`` not ``[B, T]``.
        """
        check_sequence(x, padding, self.in_channels, "series_transformer")
        return zero_padded(x, padding).transpose(1, 2)


def _rename_old_stem(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: checkpoints saved before ``stem`` became ``stem_conv`` still load."""
    for key in [k for k in state_dict if k.startswith(prefix + "stem.")]:
        state_dict[prefix + "stem_conv." + key[len(prefix + "stem.") :]] = state_dict.pop(key)
