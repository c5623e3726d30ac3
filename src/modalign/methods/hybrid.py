"""Hybrid presets (kind ``method``): ``albef`` and ``flava``, compositions of other families.

Each is a function of typed arguments returning objective entries of the ``composite`` method
(see ``methods.presets``): nothing here is a new loss, only a documented, validated recipe of
the instance-discrimination, matching and masked objectives.
"""

from __future__ import annotations

from typing import Any

from modalign.core.errors import ConfigError
from modalign.core.registry import register


def _check_weights(**weights: float) -> None:
    for key, w in weights.items():
        if w < 0:
            raise ConfigError(key, f"must be >= 0, got {w}")


@register("method", "albef")
def albef(
    modalities: list[str] | None = None,
    temperature: float = 0.07,
    queue_size: int = 4096,
    momentum: float = 0.995,
    distill: float = 0.4,
    itm_weight: float = 1.0,
    mlm_weight: float = 1.0,
    fusion_depth: int = 1,
    fusion_heads: int = 4,
    fusion_width: int | None = None,
    mask_ratio: float = 0.15,
    gather: bool = False,
) -> list[dict[str, Any]]:
    """ALBEF: ITC with momentum distillation + ITM with hard negatives + conditioned MLM.

    Li et al. 2021, "Align before Fuse: Vision and Language Representation Learning with
    Momentum Distillation". The three objectives of the paper:

    - ``itc``: cross-modal momentum contrast (``moco``) with queues of teacher keys and
      momentum distillation: the targets mix the one-hot pairing with the EMA teacher's
      similarity distribution, weight ``distill`` (ALBEF: 0.4).
    - ``itm``: a cross-attention fusion encoder (``text`` queries ``image`` tokens) classifies
      matched pairs against hard negatives sampled from the contrastive similarities.
    - ``mlm``: masked modelling of the text with the image as context (``masked_conditional``).

    Args:
        modalities: ``[text, image]``: the first is masked and queries the second in the fusion
            encoders (default: ``[text, image]``).
        temperature: Initial temperature of ITC (learnt) and of the hard-negative sampling.
        queue_size: Teacher keys kept per modality (ALBEF: 65 536; small data wants fewer).
        momentum: EMA coefficient of the teacher (ALBEF: 0.995).
        distill: Momentum distillation weight ``alpha`` (0 disables it).
        itm_weight: Weight of ITM (ITC has weight 1).
        mlm_weight: Weight of MLM.
        fusion_depth: Cross-attention blocks of the ITM and MLM fusion encoders.
        fusion_heads: Attention heads of the fusion encoders.
        fusion_width: Width of the ITM fusion encoder (default: the text tokens' width).
        mask_ratio: Fraction of text tokens masked (BERT: 0.15).
        gather: Negatives and queue keys from every rank under data parallelism.

    Raises:
        ConfigError: If a weight is negative or ``modalities`` is not two names.
    """
    _check_weights(itm_weight=itm_weight, mlm_weight=mlm_weight)
    text, image = modalities if modalities is not None else ["text", "image"]
    if text == image:
        raise ConfigError("modalities", f"albef needs two distinct modalities, got {modalities}")
    pair = [text, image]
    itc = {"name": "moco", "label": "itc", "modalities": pair, "temperature": temperature}
    itc |= {"queue_size": queue_size, "momentum": momentum, "distill": distill, "gather": gather}
    itm = {"name": "itm", "weight": itm_weight, "modalities": pair, "temperature": temperature}
    itm |= {"depth": fusion_depth, "heads": fusion_heads, "width": fusion_width, "gather": gather}
    mlm = {"name": "masked_conditional", "label": "mlm", "weight": mlm_weight, "target": text, "context": image}
    mlm |= {"mask_ratio": mask_ratio, "fusion_depth": fusion_depth, "fusion_heads": fusion_heads}
    return [itc, itm, mlm]


@register("method", "flava")
def flava(
    modalities: list[str] | None = None,
    temperature: float = 0.07,
    contrastive_weight: float = 1.0,
    itm_weight: float = 1.0,
    masked_weight: float = 1.0,
    text_mask_ratio: float = 0.15,
    image_mask_ratio: float = 0.5,
    decoder_dim: int = 64,
    decoder_depth: int = 1,
    decoder_heads: int = 4,
    fusion_depth: int = 1,
    fusion_heads: int = 4,
    fusion_width: int | None = None,
    gather: bool = False,
) -> list[dict[str, Any]]:
    """FLAVA-lite: unimodal masked modelling + cross-modal contrastive + matching.

    Singh et al. 2022, "FLAVA: A Foundational Language And Vision Alignment Model", without
    the multimodal masked term (MMM) and the large unimodal corpora:

    - ``mim`` and ``mlm``: each modality masked and reconstructed from its own visible tokens
      only (``multimae`` restricted to one modality: MAE for images, BERT-style id prediction
      for text), so each encoder learns unimodal structure.
    - ``itc``: symmetric InfoNCE between the pooled embeddings (the retrieval space).
    - ``itm``: matching on a cross-attention fusion encoder with hard negatives.

    Args:
        modalities: ``[text, image]`` (default). The first queries the second in the fusion encoder.
        temperature: Initial InfoNCE temperature (learnt).
        contrastive_weight: Weight of ITC.
        itm_weight: Weight of ITM.
        masked_weight: Weight of each unimodal masked term.
        text_mask_ratio: Fraction of text tokens masked.
        image_mask_ratio: Fraction of image tokens masked.
        decoder_dim: Width of the masked decoders.
        decoder_depth: Blocks of the masked decoders.
        decoder_heads: Attention heads of the masked decoders.
        fusion_depth: Cross-attention blocks of the ITM fusion encoder.
        fusion_heads: Attention heads of the ITM fusion encoder.
        fusion_width: Width of the ITM fusion encoder (default: the text tokens' width).
        gather: Negatives from every rank under data parallelism.

    Raises:
        ConfigError: If a weight is negative or ``modalities`` is not two names.
    """
    _check_weights(contrastive_weight=contrastive_weight, itm_weight=itm_weight, masked_weight=masked_weight)
    text, image = modalities if modalities is not None else ["text", "image"]
    if text == image:
        raise ConfigError("modalities", f"flava needs two distinct modalities, got {modalities}")
    pair = [text, image]
    decoder = {"decoder_dim": decoder_dim, "decoder_depth": decoder_depth, "decoder_heads": decoder_heads}
    masked = {"name": "multimae", "weight": masked_weight, "alpha": None, **decoder}
    mim = {**masked, "label": "mim", "modalities": [image], "mask_ratio": image_mask_ratio}
    mlm = {**masked, "label": "mlm", "modalities": [text], "mask_ratio": text_mask_ratio}
    itc = {"name": "infonce", "label": "itc", "weight": contrastive_weight, "modalities": pair}
    itc |= {"temperature": temperature, "gather": gather}
    itm = {"name": "itm", "weight": itm_weight, "modalities": pair, "temperature": temperature}
    itm |= {"depth": fusion_depth, "heads": fusion_heads, "width": fusion_width, "gather": gather}
    return [mim, mlm, itc, itm]
