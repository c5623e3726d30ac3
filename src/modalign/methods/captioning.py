"""Captioning methods (kind ``method``): ``coca``, a contrastive loss plus a captioning decoder."""

from __future__ import annotations

from typing import Any

from modalign.core.registry import register


@register("method", "coca")
def coca(
    source: str | None = None,
    target: str | None = None,
    temperature: float = 0.07,
    max_logit_scale: float = 100.0,
    contrastive_weight: float = 1.0,
    caption_weight: float = 2.0,
    decoder_dim: int = 128,
    decoder_depth: int = 2,
    decoder_heads: int = 4,
    max_len: int = 64,
    dropout: float = 0.0,
    label_smoothing: float = 0.0,
    gather: bool = False,
) -> list[dict[str, Any]]:
    """CoCa: symmetric InfoNCE plus autoregressive captioning of ``target`` from ``source`` (Yu et al. 2022).

    The loss is ``contrastive_weight * InfoNCE(source, target) + caption_weight * captioning``
    with CoCa's weights 1 and 2 by default. The contrastive pair uses the two towers' pooled
    embeddings; the captioning decoder (its own token embeddings) cross-attends to the
    ``source`` encoder's tokens, so the text tower used for retrieval may be order-free.
    Parts are logged as ``contrastive`` and ``caption``.

    Args:
        source: The captioned modality (default: the model's modality other than ``target``).
        target: The generated text modality (default: the model's only text modality).
        temperature: Initial InfoNCE temperature (CLIP: 0.07).
        max_logit_scale: Clamp on ``1/temperature``.
        contrastive_weight: Weight of the InfoNCE term (CoCa: 1).
        caption_weight: Weight of the captioning term (CoCa: 2).
        decoder_dim: Decoder width.
        decoder_depth: Decoder blocks.
        decoder_heads: Decoder attention heads.
        max_len: Longest caption the decoder reads (``[BOS]`` included).
        dropout: Decoder dropout.
        label_smoothing: Label smoothing of the captioning cross-entropy (CoCa: 0).
        gather: Use every rank's rows under data parallelism (negatives; token count).
    """
    pair = {"modalities": [source, target]} if source is not None and target is not None else {}
    contrastive = {"name": "infonce", "label": "contrastive", "weight": contrastive_weight, "temperature": temperature}
    contrastive |= {"max_logit_scale": max_logit_scale, "gather": gather, **pair}
    caption = {"name": "captioning", "label": "caption", "weight": caption_weight, "source": source, "target": target}
    caption |= {"dim": decoder_dim, "depth": decoder_depth, "heads": decoder_heads, "max_len": max_len}
    caption |= {"dropout": dropout, "label_smoothing": label_smoothing, "gather": gather}
    return [contrastive, caption]
