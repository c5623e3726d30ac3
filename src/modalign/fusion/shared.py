"""Modality-agnostic (shared-weight) fusion: one transformer run on each modality separately.

VATT's modality-agnostic variant (Akbari et al. 2021, "VATT: Transformers for Multimodal
Self-Supervised Learning from Raw Video, Audio and Text"): each modality has its own input
layer (a linear map to the shared width, a learned modality embedding and learned positions)
and its own learned CLS (VATT's aggregation) token, then ONE transformer, with the same
weights for every modality, encodes each modality's ``[CLS_m; tokens_m]`` on its own. The
modalities never attend to each other; the fused vector is the mean of the CLS outputs of the
modalities present in the row.
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
    present_mean,
    unpadded,
    valid_padding,
    zero_padded_tokens,
)
from modalign.nn.layers import Transformer


@register("fusion", "shared")
class SharedFusion(Fusion):
    """VATT-style modality-agnostic transformer (Akbari et al. 2021) shared by every modality.

    Fused tokens are ``[pooled; CLS_1; tokens_1; ...; CLS_M; tokens_M]`` (``[B, 1 + sum_m
    (1 + T_m), D_f]``, modalities in sorted order; one missing from the whole batch contributes
    nothing). The first token is the pooled vector and is never padded; a modality's CLS and
    tokens are padded (and zeroed) in rows where it is absent. Pooled ``[B, D_f]`` is the mean
    over the present modalities of their CLS outputs (zeros for a row with none present).

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
        self.cls = nn.ParameterDict({m: learned_token(1, 1, dim) for m in self.widths})
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, dropout)

    def encode(self, m: str, out: EncoderOutput, present: Tensor) -> tuple[Tensor, Tensor]:
        """Run the shared transformer on modality ``m`` alone.

        Args:
            m: The modality.
            out: Its encoder output, ``tokens: Tensor[B, T, D_m]``.
            present: ``BoolTensor[B]``.

        Returns:
            ``(h Tensor[B, 1 + T, D_f], padding BoolTensor[B, 1 + T])``: the outputs for
            ``[CLS_m; tokens_m]``; the CLS is padded in rows where ``m`` is absent.
        """
        b = out.tokens.shape[0]
        pad = valid_padding(out, present)
        cls = self.cls[m].expand(b, -1, -1)
        x = torch.cat([cls, self.embed[m](out.tokens)], dim=1)
        h = self.transformer(x, torch.cat([unpadded(b, 1, pad.device), pad], dim=1))
        return h, torch.cat([~present.to(torch.bool)[:, None], pad], dim=1)

    def forward(self, inputs: dict[str, EncoderOutput], present: dict[str, Tensor]) -> EncoderOutput:
        """Encode each present modality with the shared transformer; pool the CLS outputs.

        Raises:
            ValueError: From ``check_inputs``, for an empty batch, or a modality with more than
                ``max_tokens`` tokens.
        """
        self.check_inputs(inputs, present)
        b = batch_size(inputs)
        outs, pads, cls, masks = [], [], [], []
        for m in self.widths:
            if m in inputs:
                h, pad = self.encode(m, inputs[m], present[m])
                outs.append(h)
                pads.append(pad)
                cls.append(h[:, 0])
                masks.append(present[m].to(torch.bool))
        pooled = present_mean(cls, masks)
        mask = torch.cat([unpadded(b, 1, pooled.device), *pads], dim=1)
        tokens = torch.cat([pooled[:, None], *outs], dim=1)
        return EncoderOutput(tokens=zero_padded_tokens(tokens, mask), pooled=pooled, padding=mask)
