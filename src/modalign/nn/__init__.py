"""Shared layers and projection heads.

Transformer blocks, positions, patch/frame embedding, masked pooling, and the projection heads
registered as kind ``head``.
"""

from modalign.nn.heads import LinearHead, MLPHead
from modalign.nn.layers import (
    LearnedPositions,
    PatchEmbed1d,
    PatchEmbed2d,
    SinusoidalPositions,
    Transformer,
    TransformerBlock,
    check_sequence,
    conv_bn_relu,
    downsample_padding,
    masked_max,
    masked_mean,
    zero_padded,
)

__all__ = [
    "LearnedPositions",
    "LinearHead",
    "MLPHead",
    "PatchEmbed1d",
    "PatchEmbed2d",
    "SinusoidalPositions",
    "Transformer",
    "TransformerBlock",
    "check_sequence",
    "conv_bn_relu",
    "downsample_padding",
    "masked_max",
    "masked_mean",
    "zero_padded",
]
