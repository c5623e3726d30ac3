"""Audio encoders over log-mel spectrograms ``FloatTensor[B, n_mels, T]``.

``padding`` is ``BoolTensor[B, T]`` over frames (``True`` = padded). Padded frames are zeroed
before every convolution, so their values never reach valid outputs, and the returned
``padding`` marks output tokens whose whole receptive window was padded.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Encoder
from modalign.core.registry import register
from modalign.core.types import EncoderOutput
from modalign.encoders.series import SeriesConv
from modalign.nn.layers import (
    PatchEmbed1d,
    SinusoidalPositions,
    Transformer,
    check_sequence,
    check_tokens,
    conv_bn_relu,
    downsample_padding,
    masked_mean,
    zero_padded,
)


@register("encoder", "audio_cnn")
class AudioCNN(Encoder):
    """2-D CNN over the spectrogram as a one-channel image (VGGish / PANNs style).

    Follows the CNNs of Hershey et al. 2017 and Kong et al. 2020.
    Stages of two conv-BN-ReLU layers with 2x2 max-pooling (ceil mode, so ``T`` down to one
    frame works) between stages; the last map is averaged over frequency. ``tokens`` are
    frames ``[B, T', dim]`` with ``T' = ceil(T / 2^(len(widths)-1))``; ``padding`` is
    downsampled to ``[B, T']``; ``pooled`` is the masked mean over frames followed by a linear
    layer, ``[B, dim]``.

    Args:
        in_channels: Mel bins (from the modality spec).
        widths: Channels of each stage.
        dim: Output width ``D``.
    """

    kind = "audio"

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (32, 64, 128), dim: int = 128) -> None:
        super().__init__()
        if not widths:
            raise ConfigError("widths", "audio_cnn needs at least one stage")
        self.in_channels = in_channels
        self.dim = dim
        chans = [1, *widths]
        # two conv-BN-ReLU layers per stage: layer 2i opens stage i
        self.convs = nn.ModuleList(conv_bn_relu(chans[i + j], chans[i + 1]) for i in range(len(widths)) for j in (0, 1))
        self.to_tokens = nn.Linear(widths[-1], dim)
        self.pool_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode ``FloatTensor[B, n_mels, T]`` with optional ``BoolTensor[B, T]`` padding."""
        check_sequence(x, padding, self.in_channels, "audio_cnn")
        h = zero_padded(x, padding).unsqueeze(1)
        for j, conv in enumerate(self.convs):
            if j > 0 and j % 2 == 0:
                h = F.max_pool2d(h, 2, ceil_mode=True)
                if padding is not None:
                    padding = downsample_padding(padding, h.shape[-1], stride=2)
            h = zero_padded(conv(h), padding)  # re-zero padded frames: zero-padding semantics
        tokens = self.to_tokens(h.mean(dim=2).transpose(1, 2))
        pooled = self.pool_proj(masked_mean(tokens, padding))
        return EncoderOutput(tokens=tokens, pooled=pooled, padding=padding)


@register("encoder", "audio_transformer")
class AudioTransformer(Encoder):
    """Transformer over spectrogram frames (AST / Whisper-encoder style, 1-D frame patches).

    Follows Gong et al. 2021 (AST) and Radford et al. 2022 (Whisper).
    Frames of ``patch`` time steps are embedded by a strided conv1d over the mel bins,
    sinusoidal positions are added and pre-norm transformer blocks attend with the padding
    mask. ``tokens`` are ``[B, ceil(T/patch), dim]``; ``pooled`` is their masked mean
    ``[B, dim]``. Token stem (see ``Encoder``): ``stem`` is the frame embedding plus positions,
    ``trunk`` the transformer and pooling, ``targets`` the spectrogram frames of each token.

    Args:
        in_channels: Mel bins (from the modality spec).
        patch: Time steps per token.
        dim: Width ``D``.
        depth: Number of transformer blocks.
        heads: Attention heads (must divide ``dim``).
        mlp_ratio: Hidden width of the block MLP relative to ``dim``.
        dropout: Dropout in attention and MLP.
        checkpoint: Activation checkpointing: ``true`` recomputes every transformer block but
            the last in the backward pass instead of keeping its activations, an integer ``k``
            the first ``k`` blocks only (``Transformer``).
    """

    kind = "audio"
    token_stem = True

    def __init__(
        self,
        in_channels: int,
        patch: int = 4,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        checkpoint: bool | int = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.dim = self.stem_dim = dim
        self.embed = PatchEmbed1d(in_channels, dim, patch)
        self.positions = SinusoidalPositions(dim)
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, dropout, checkpoint=checkpoint)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode ``FloatTensor[B, n_mels, T]`` with optional ``BoolTensor[B, T]`` padding: ``trunk(*stem(x))``.

        Raises:
            ValueError: If ``x`` is not ``[B, n_mels, T]`` or ``padding`` not ``[B, T]``.
        """
        return self.trunk(*self.stem(x, padding))

    def stem(self, x: Tensor, padding: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Frame tokens plus sinusoidal positions ``[B, ceil(T/patch), dim]`` and their padding.

        Raises:
            ValueError: If ``x`` is not ``[B, n_mels, T]`` or ``padding`` not ``[B, T]``.
        """
        check_sequence(x, padding, self.in_channels, "audio_transformer")
        tokens, padding = self.embed(x, padding)
        return self.positions(tokens), padding

    def trunk(self, tokens: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Transformer and masked mean over stem tokens ``[B, T', dim]`` (any subset).

        Raises:
            ValueError: If ``tokens`` is not ``[B, T', dim]`` or ``padding`` not ``[B, T']``.
        """
        check_tokens(tokens, padding, self.dim, "audio_transformer")
        tokens = self.transformer(tokens, padding)
        return EncoderOutput(tokens=tokens, pooled=masked_mean(tokens, padding), padding=padding)

    def targets(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        """The ``patch`` frames each token covers, ``FloatTensor[B, ceil(T/patch), n_mels * patch]``.

        Padded frames (and the zero frames that complete the last patch) are zero, exactly what
        the stem saw; rows are flattened mel-major (``n_mels, patch``), the layout of the frame
        embedding's weights.

        Raises:
            ValueError: If ``x`` is not ``[B, n_mels, T]`` or ``padding`` not ``[B, T]``.
        """
        check_sequence(x, padding, self.in_channels, "audio_transformer")
        p = self.embed.patch
        x = F.pad(zero_padded(x, padding), (0, (-x.shape[-1]) % p))
        b, c, t = x.shape
        return x.reshape(b, c, t // p, p).permute(0, 2, 1, 3).reshape(b, t // p, c * p)


@register("encoder", "audio_tdnn")
class AudioTDNN(SeriesConv):
    """1-D convolutions over time with the mel bins as channels (TDNN / x-vector style).

    Follows Waibel et al. 1989 (time-delay neural networks) and Snyder et al. 2018
    ("X-Vectors: Robust DNN Embeddings for Speaker Recognition"): conv1d-BN-ReLU layers over
    frames, statistics pooling (masked mean and max) and a linear layer. Far cheaper on a CPU
    than ``audio_cnn``'s 2-D convolutions at full spectrogram resolution. ``tokens`` are frames
    ``[B, T, dim]``; ``pooled`` is ``[B, dim]``; ``padding`` is the input's.

    Args:
        in_channels: Mel bins (from the modality spec).
        widths: Channels of each conv layer.
        kernel: Odd kernel length in frames.
        dim: Output width ``D``.
    """

    kind = "audio"
