"""Masked modelling of one modality conditioned on another (ALBEF/FLAVA MLM, generalised).

After Devlin et al. 2019 (BERT's masked language modelling), Li et al. 2021 ("Align before
Fuse", ALBEF: MLM with the image as context) and Singh et al. 2022 (FLAVA). The loss maths and
masking helpers live in ``modalign.objectives.masked``; this module owns the fusion decoder,
the prediction head and the mask embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Encoder, Objective
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.nn.attention import TransformerDecoder
from modalign.objectives.contrastive import check_known
from modalign.objectives.masked import (
    MaskedTokens,
    bert_corrupt,
    masked_parts,
    model_encoder,
    observed_rows,
    prediction_width,
    random_mask,
    replace_masked,
    row_inputs,
    token_encoder,
    valid_tokens,
)


@register("objective", "masked_conditional")
class MaskedConditional(Objective):
    """Masked modelling of one modality with another as context (ALBEF/FLAVA MLM, generalised).

    On the rows where both ``target`` and ``context`` were observed, ``mask_ratio`` of the
    target's valid tokens are masked (``random_mask``): token ids are corrupted BERT-style
    (``bert_corrupt``: ``[MASK]`` = ``vocab_size - 3``, random ids from the regular vocabulary
    ``[3, vocab_size - 3)``; ``[PAD]``, ``[CLS]``, ``[MASK]``, ``[BOS]``, ``[EOS]`` are never
    masked), float stem tokens are replaced by a learned mask embedding plus their position
    (``replace_masked``). The target encoder encodes the whole corrupted sequence; a
    bidirectional ``TransformerDecoder`` (``causal=False``) whose queries are those tokens
    cross-attends to the context's tokens (``outputs.tokens[context]``), and a linear head
    predicts the vocabulary (cross-entropy) or the per-patch normalised frame values (MSE).

    Writes ``<label>/<target>/pred``, ``/target``, ``/row`` and ``/mask`` (``BoolTensor[B, T]``).

    Args:
        target: The modality masked and predicted.
        context: The modality read as context.
        mask_ratio: Fraction of the target's maskable tokens masked (BERT: 0.15).
        fusion_depth: Cross-attention blocks.
        fusion_heads: Attention heads (must divide the target encoder's width).
        mask_prob: Token ids: probability that a masked id becomes ``[MASK]``.
        random_prob: Token ids: probability that it becomes a random id (else unchanged).
        norm_targets: Float targets: normalise each patch (MAE's ``norm_pix_loss``).

    Raises:
        ConfigError: If ``target == context``, or (in ``bind``) a modality is unknown or the
            target encoder has no token stem.
    """

    def __init__(
        self,
        target: str = "text",
        context: str = "image",
        mask_ratio: float = 0.15,
        fusion_depth: int = 2,
        fusion_heads: int = 4,
        mask_prob: float = 0.8,
        random_prob: float = 0.1,
        norm_targets: bool = True,
    ) -> None:
        super().__init__()
        if target == context:
            raise ConfigError("context", f"masked_conditional needs two distinct modalities, got {target!r} twice")
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError("mask_ratio", f"must be in (0, 1), got {mask_ratio}")
        if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
            got = f"{mask_prob} + {random_prob}"
            raise ConfigError("mask_prob", f"mask_prob + random_prob must be in [0, 1], got {got}")
        self.target, self.context = target, context
        self.mask_ratio, self.depth, self.heads = mask_ratio, fusion_depth, fusion_heads
        self.mask_prob, self.random_prob = mask_prob, random_prob
        self.norm_targets = norm_targets
        self.vocab_size = 0

    def bind(self, model: nn.Module) -> None:
        """Create the fusion decoder, the head and (float targets) the mask embedding.

        Raises:
            ConfigError: If a modality is unknown or the target encoder has no token stem.
        """
        check_known((self.target, self.context), model, "masked_conditional")
        encoder = token_encoder(model, self.target, "masked_conditional")
        context_dim = model_encoder(model, self.context).dim
        self.fusion = TransformerDecoder(encoder.dim, self.depth, self.heads, context_dim, causal=False)
        self.head = nn.Linear(encoder.dim, prediction_width(encoder, self.target, "masked_conditional"))
        if encoder.kind == "text":
            self.vocab_size = int(getattr(encoder, "vocab_size"))  # noqa: B009
            if self.vocab_size <= 6:
                raise ConfigError("target", f"vocabulary of {self.vocab_size} ids has no regular token to mask")
        else:
            self.mask_embedding = nn.Parameter(torch.randn(encoder.stem_dim) * 0.02)

    def features(self, model: nn.Module, batch: Batch, outputs: Outputs) -> dict[str, Tensor]:
        """Corrupt, encode, fuse with the context's tokens and predict at the masked positions."""
        if self.target not in batch.data or self.context not in outputs.tokens:
            return {}
        index = observed_rows(batch, self.target, self.context)
        if index.numel() == 0:
            return {}
        encoder = model_encoder(model, self.target)
        x, padding = row_inputs(batch, self.target, index)
        tokens, stem_padding, mask = self._corrupt(encoder, x, padding)
        h = encoder.trunk(tokens, stem_padding).tokens
        context = outputs.tokens[self.context][index]
        context_padding = outputs.padding.get(self.context)
        fused = self.fusion(h, context, stem_padding, None if context_padding is None else context_padding[index])
        masked = MaskedTokens(index, mask, encoder.targets(x, padding))
        full_mask = torch.zeros(batch.size, mask.shape[1], dtype=torch.bool, device=mask.device)
        extras = masked.extras(self.target, self.head(fused[mask]))
        return {**extras, f"{self.target}/mask": full_mask.index_copy(0, index, mask)}

    def _corrupt(self, encoder: Encoder, x: Tensor, padding: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """Stem tokens of the corrupted input, their padding and the mask ``[P, T]``."""
        if self.vocab_size:
            v = self.vocab_size
            pad = padding if padding is not None else x == 0
            maskable = ~pad & (x != 2) & (x < v - 3)  # not [PAD], [CLS], [MASK], [BOS], [EOS]
            mask = random_mask(maskable, self.mask_ratio)
            ids = bert_corrupt(x, mask, v - 3, 3, v - 3, self.mask_prob, self.random_prob)
            tokens, stem_padding = encoder.stem(ids, padding)
            return tokens, stem_padding, mask
        tokens, stem_padding = encoder.stem(x, padding)
        mask = random_mask(valid_tokens(tokens, stem_padding), self.mask_ratio)
        position_tokens, _ = encoder.stem(torch.zeros_like(x), padding)
        return replace_masked(tokens, position_tokens, mask, self.mask_embedding), stem_padding, mask

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """The masked loss of the target; metrics ``masked_<target>`` (, ``acc_<target>`` for ids)."""
        out = masked_parts(outputs, self, (self.target,), self.norm_targets)
        return LossOutput(loss=out.loss, metrics=out.metrics)
