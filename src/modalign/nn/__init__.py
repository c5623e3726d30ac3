"""Shared layers and projection heads.

Transformer blocks (bidirectional or causal), cross-attention blocks and the transformer decoder,
positions, patch/frame embedding, masked pooling, and the projection heads registered as kind
``head``.
"""

from modalign.nn.attention import CrossAttentionBlock, TransformerDecoder
from modalign.nn.heads import LinearHead, MLPHead
from modalign.nn.layers import (
    LearnedPositions,
    PatchEmbed1d,
    PatchEmbed2d,
    SinusoidalPositions,
    Transformer,
    TransformerBlock,
    block_mlp,
    causal_attention_mask,
    check_sequence,
    check_tokens,
    conv_bn_relu,
    downsample_padding,
    masked_max,
    masked_mean,
    self_attend,
    zero_padded,
)
from modalign.nn.resampler import QueryResampler

__all__ = [
    "CrossAttentionBlock",
    "LearnedPositions",
    "LinearHead",
    "MLPHead",
    "PatchEmbed1d",
    "PatchEmbed2d",
    "QueryResampler",
    "SinusoidalPositions",
    "Transformer",
    "TransformerBlock",
    "TransformerDecoder",
    "block_mlp",
    "causal_attention_mask",
    "check_sequence",
    "check_tokens",
    "conv_bn_relu",
    "downsample_padding",
    "masked_max",
    "masked_mean",
    "self_attend",
    "zero_padded",
]
