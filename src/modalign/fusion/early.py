"""Early (single-stream) fusion: one transformer over the tokens of every modality together.

The single-stream design of VisualBERT (Li et al. 2019, "VisualBERT: A Simple and Performant
Baseline for Vision and Language") and UNITER (Chen et al. 2020, "UNITER: UNiversal Image-TExt
Representation Learning"): each modality's tokens are projected to the fused width by their
own linear map, get a learned modality embedding and learned positions, and are concatenated
after a learned CLS token; every layer attends over all of them at once. Padded tokens and
the tokens of a modality absent from a row are masked out of every attention, so the CLS
token (never padded) sees only the present, unpadded tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalign.core.modules import Fusion
from modalign.core.registry import register
from modalign.core.types import EncoderOutput
from modalign.fusion.tokens import (
    ModalityEmbedding,
    batch_size,
    learned_token,
    unpadded,
    valid_padding,
    zero_padded_tokens,
)
from modalign.nn.layers import Transformer


@register("fusion", "early")
class EarlyFusion(Fusion):
    """Single-stream transformer over ``[CLS; tokens_1; ...; tokens_M]`` (VisualBERT, UNITER).

    Returns the transformer outputs as fused tokens ``[B, 1 + sum_m T_m, D_f]`` (modalities in
    sorted order; one missing from the whole batch contributes no tokens) with padding
    ``[False; padding_1; ...]`` (padded positions zeroed), and the CLS output as pooled.

    Args:
        widths: ``{modality: D_m}`` (filled in by the framework).
        dim: Output width ``D_f`` (the transformer width).
        depth: Transformer layers.
        heads: Attention heads (must divide ``dim``).
        max_tokens: Most tokens per modality the learned positions cover.
        mlp_ratio: Hidden width of the MLPs relative to ``dim``.
        dropout: Dropout in attention and MLPs.
    """

    def __init__(
        self,
        widths: dict[str, int],
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        max_tokens: int = 256,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(widths)
        self.dim = dim
        self.embed = nn.ModuleDict({m: ModalityEmbedding(w, dim, max_tokens) for m, w in self.widths.items()})
        self.cls = learned_token(1, 1, dim)
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, dropout)

    def forward(self, inputs: dict[str, EncoderOutput], present: dict[str, Tensor]) -> EncoderOutput:
        """Fuse the present modalities' tokens; pooled ``[B, D_f]`` is the CLS output.

        Raises:
            ValueError: From ``check_inputs``, for an empty batch, or a modality with more than
                ``max_tokens`` tokens.
        """
        self.check_inputs(inputs, present)
        b = batch_size(inputs)
        tokens, padding = [self.cls.expand(b, -1, -1)], [unpadded(b, 1, self.cls.device)]
        for m in self.widths:
            if m in inputs:
                tokens.append(self.embed[m](inputs[m].tokens))
                padding.append(valid_padding(inputs[m], present[m]))
        mask = torch.cat(padding, dim=1)
        h = self.transformer(torch.cat(tokens, dim=1), mask)
        return EncoderOutput(tokens=zero_padded_tokens(h, mask), pooled=h[:, 0], padding=mask)
