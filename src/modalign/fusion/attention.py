"""Cross-attention fusion: modalities read each other's tokens through attention.

* ``coattention``: the dual-stream co-attentional transformer of ViLBERT (Lu et al. 2019,
  "ViLBERT: Pretraining Task-Agnostic Visiolinguistic Representations for Vision-and-Language
  Tasks") and LXMERT (Tan and Bansal 2019, "LXMERT: Learning Cross-Modality Encoder
  Representations from Transformers"), for exactly two modalities. Each stream is ``[CLS_m;
  Linear_m(tokens_m)]``; in every layer each stream self-attends and cross-attends to the
  other stream's previous-layer output (``CrossAttentionBlock``), both updated in parallel.
  ``pooled = Linear([CLS_a; CLS_b])``, with a learned "missing" vector instead of the CLS of a
  modality absent from the row.
* ``cross_attention``: the multimodal fusion encoder of ALBEF (Li et al. 2021, "Align before
  Fuse: Vision and Language Representation Learning with Momentum Distillation"): the tokens of
  one ``query`` modality, after a learned CLS token, run through a bidirectional
  ``TransformerDecoder`` that cross-attends to the other modalities' tokens; ``pooled`` is the
  CLS output (what ALBEF's ITM head reads).

Encoder tokens carry their own positional information, so no positions are added here; each
modality's own linear map (its bias) tells the modalities apart. A stream's CLS is never
padded for its own self-attention, so every attention has a valid key; padded tokens and
absent modalities are masked out of every key and context, and zeroed in the fused tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalign.core.modules import Fusion
from modalign.core.registry import register
from modalign.core.types import EncoderOutput
from modalign.fusion.tokens import batch_size, learned_token, unpadded, valid_padding, zero_padded_tokens
from modalign.nn.attention import CrossAttentionBlock, TransformerDecoder


def _check_depth(name: str, depth: int) -> None:
    if depth < 1:
        raise ValueError(f"{name} fusion needs depth >= 1, got {depth}")


class CoAttentionLayer(nn.Module):
    """One co-attention layer: each of two streams self-attends and cross-attends to the other.

    Args:
        modalities: The two stream names.
        dim: Stream width ``D``.
        heads: Attention heads (must divide ``dim``).
        mlp_ratio: Hidden width of the MLPs relative to ``dim``.
        dropout: Dropout in attention and MLPs.
    """

    def __init__(self, modalities: tuple[str, str], dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.modalities = modalities
        self.blocks = nn.ModuleDict(
            {m: CrossAttentionBlock(dim, heads, mlp_ratio=mlp_ratio, dropout=dropout) for m in modalities}
        )

    def forward(
        self, x: dict[str, Tensor], self_pad: dict[str, Tensor], ctx_pad: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Update both streams from the previous layer's outputs.

        Args:
            x: ``{m: Tensor[B, 1 + T_m, D]}`` the two streams.
            self_pad: ``{m: BoolTensor[B, 1 + T_m]}`` keys of ``m``'s own self-attention.
            ctx_pad: ``{m: BoolTensor[B, 1 + T_m]}`` padding of ``m`` when it is the other
                stream's context (its CLS is padded too where ``m`` is absent).

        Returns:
            ``{m: Tensor[B, 1 + T_m, D]}``.
        """
        a, b = self.modalities
        return {
            a: self.blocks[a](x[a], x[b], self_pad[a], ctx_pad[b]),
            b: self.blocks[b](x[b], x[a], self_pad[b], ctx_pad[a]),
        }


@register("fusion", "coattention")
class CoAttentionFusion(Fusion):
    """Dual-stream co-attention (ViLBERT, Lu et al. 2019; LXMERT) over exactly two modalities.

    Fused tokens are ``[pooled; CLS_a; tokens_a; CLS_b; tokens_b]`` (``[B, 3 + T_a + T_b,
    D_f]``; ``a < b`` in sorted order; a modality missing from the whole batch keeps only its
    CLS slot). The first token is never padded; a stream's CLS and tokens are padded (and
    zeroed) in rows where its modality is absent.

    Args:
        widths: ``{modality: D_m}`` with exactly two modalities.
        dim: Output width ``D_f`` (both streams' width).
        depth: Co-attention layers.
        heads: Attention heads (must divide ``dim``).
        mlp_ratio: Hidden width of the MLPs relative to ``dim``.
        dropout: Dropout in attention and MLPs.

    Raises:
        ValueError: If ``widths`` does not hold exactly two modalities, or ``depth < 1``.
    """

    def __init__(
        self,
        widths: dict[str, int],
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(widths)
        if len(self.widths) != 2:
            raise ValueError(f"coattention fuses exactly two modalities, got widths {self.widths}")
        _check_depth("coattention", depth)
        self.dim = dim
        a, b = self.widths
        self.proj = nn.ModuleDict({m: nn.Linear(w, dim) for m, w in self.widths.items()})
        self.cls = nn.ParameterDict({m: learned_token(1, 1, dim) for m in self.widths})
        self.missing = nn.ParameterDict({m: learned_token(dim) for m in self.widths})
        self.layers = nn.ModuleList(CoAttentionLayer((a, b), dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.ModuleDict({m: nn.LayerNorm(dim) for m in self.widths})
        self.out = nn.Linear(2 * dim, dim)

    def stream(
        self, m: str, inputs: dict[str, EncoderOutput], present: dict[str, Tensor], b: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Modality ``m``'s stream ``[CLS_m; Linear_m(tokens_m)]`` and its masks.

        Returns:
            ``(x Tensor[B, 1 + T, D], self_pad BoolTensor[B, 1 + T], ctx_pad BoolTensor[B, 1 + T],
            present BoolTensor[B])``; ``T = 0`` when ``m`` is missing from the batch.
        """
        device = self.cls[m].device
        cls = self.cls[m].expand(b, -1, -1)
        if m not in inputs:
            absent = torch.zeros(b, dtype=torch.bool, device=device)
            return cls, unpadded(b, 1, device), ~absent[:, None], absent
        rows = present[m].to(torch.bool)
        pad = valid_padding(inputs[m], rows)
        x = torch.cat([cls, self.proj[m](inputs[m].tokens)], dim=1)
        return x, torch.cat([unpadded(b, 1, device), pad], dim=1), torch.cat([~rows[:, None], pad], dim=1), rows

    def forward(self, inputs: dict[str, EncoderOutput], present: dict[str, Tensor]) -> EncoderOutput:
        """Co-attend the two streams; pooled ``[B, D_f]`` is ``Linear([CLS_a or missing_a; CLS_b or missing_b])``.

        Raises:
            ValueError: From ``check_inputs`` or for an empty batch.
        """
        self.check_inputs(inputs, present)
        b = batch_size(inputs)
        x, self_pad, ctx_pad, rows = {}, {}, {}, {}
        for m in self.widths:
            x[m], self_pad[m], ctx_pad[m], rows[m] = self.stream(m, inputs, present, b)
        for layer in self.layers:
            x = layer(x, self_pad, ctx_pad)
        h = {m: self.norm[m](x[m]) for m in self.widths}
        cls = [torch.where(rows[m][:, None], h[m][:, 0], self.missing[m]) for m in self.widths]
        pooled = self.out(torch.cat(cls, dim=-1))
        mask = torch.cat([unpadded(b, 1, pooled.device), *(ctx_pad[m] for m in self.widths)], dim=1)
        tokens = torch.cat([pooled[:, None], *(h[m] for m in self.widths)], dim=1)
        return EncoderOutput(tokens=zero_padded_tokens(tokens, mask), pooled=pooled, padding=mask)


@register("fusion", "cross_attention")
class CrossAttentionFusion(Fusion):
    """ALBEF-style fusion encoder (Li et al. 2021): one modality's tokens cross-attend to the others.

    Queries are ``[CLS; Linear_q(tokens_q)]``, the context is ``[Linear_m(tokens_m)]`` over the
    other modalities (sorted, concatenated with their padding). Where the query modality is
    absent only the CLS query remains; where every context modality is absent the queries get
    no cross-attention update (``CrossAttentionBlock``). Fused tokens are the decoder outputs
    ``[B, 1 + T_q, D_f]`` (``T_q = 0`` when the query modality is missing from the batch) with
    padding ``[False; padding_q]`` (padded positions zeroed); pooled is the CLS output.

    Args:
        widths: ``{modality: D_m}``, at least two modalities.
        dim: Output width ``D_f`` (the decoder width).
        depth: Decoder blocks.
        heads: Attention heads (must divide ``dim``).
        query: The modality whose tokens are the queries (default: the first in sorted order).
        mlp_ratio: Hidden width of the MLPs relative to ``dim``.
        dropout: Dropout in attention and MLPs.

    Raises:
        ValueError: If ``widths`` has fewer than two modalities, ``query`` is not one of them,
            or ``depth < 1``.
    """

    def __init__(
        self,
        widths: dict[str, int],
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        query: str | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(widths)
        if len(self.widths) < 2:
            raise ValueError(f"cross_attention fuses at least two modalities, got widths {self.widths}")
        self.query = next(iter(self.widths)) if query is None else query
        if self.query not in self.widths:
            raise ValueError(f"cross_attention: query {self.query!r} is not one of the widths {self.widths}")
        _check_depth("cross_attention", depth)
        self.dim = dim
        self.proj = nn.ModuleDict({m: nn.Linear(w, dim) for m, w in self.widths.items()})
        self.cls = learned_token(1, 1, dim)
        self.decoder = TransformerDecoder(dim, depth, heads, causal=False, mlp_ratio=mlp_ratio, dropout=dropout)

    def queries(self, inputs: dict[str, EncoderOutput], present: dict[str, Tensor], b: int) -> tuple[Tensor, Tensor]:
        """``(queries Tensor[B, 1 + T_q, D], padding BoolTensor[B, 1 + T_q])``: CLS, then the query tokens."""
        cls = self.cls.expand(b, -1, -1)
        first = unpadded(b, 1, cls.device)
        if self.query not in inputs:
            return cls, first
        out = inputs[self.query]
        pad = valid_padding(out, present[self.query])
        return torch.cat([cls, self.proj[self.query](out.tokens)], dim=1), torch.cat([first, pad], dim=1)

    def context(self, inputs: dict[str, EncoderOutput], present: dict[str, Tensor], b: int) -> tuple[Tensor, Tensor]:
        """``(context Tensor[B, S, D], padding BoolTensor[B, S])`` over the other modalities.

        With no other modality in the batch, one zero token that is padded in every row (so the
        queries get no cross-attention update, as when every context modality is absent).
        """
        tokens, padding = [], []
        for m in self.widths:
            if m != self.query and m in inputs:
                tokens.append(self.proj[m](inputs[m].tokens))
                padding.append(valid_padding(inputs[m], present[m]))
        if not tokens:
            return self.cls.new_zeros(b, 1, self.dim), ~unpadded(b, 1, self.cls.device)
        return torch.cat(tokens, dim=1), torch.cat(padding, dim=1)

    def forward(self, inputs: dict[str, EncoderOutput], present: dict[str, Tensor]) -> EncoderOutput:
        """Run the fusion encoder; pooled ``[B, D_f]`` is the CLS output.

        Raises:
            ValueError: From ``check_inputs`` or for an empty batch.
        """
        self.check_inputs(inputs, present)
        b = batch_size(inputs)
        x, pad = self.queries(inputs, present, b)
        context, context_pad = self.context(inputs, present, b)
        h = self.decoder(x, context, pad, context_pad)
        return EncoderOutput(tokens=zero_padded_tokens(h, pad), pooled=h[:, 0], padding=pad)
