"""Masked-prediction methods as presets (kind ``method``): ``multimae``, ``mlm``, ``data2vec``.

Each returns objective entries of the ``composite`` method (see ``methods.presets``); the
objectives live in ``modalign.objectives.masked``, ``.masked_conditional`` and ``.data2vec``.
"""

from __future__ import annotations

from typing import Any, Literal

from modalign.core.registry import register


def _drop_none(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


@register("method", "multimae")
def multimae(
    modalities: list[str] | None = None,
    mask_ratio: float = 0.75,
    mask_ratios: dict[str, float] | None = None,
    decoder_dim: int = 128,
    decoder_depth: int = 2,
    decoder_heads: int = 4,
    norm_targets: bool = True,
    global_tokens: bool = True,
    alpha: float | None = None,
) -> list[dict[str, Any]]:
    """MultiMAE: mask every modality, reconstruct each from all visible tokens (Bachmann et al. 2022).

    Args:
        modalities: Modalities masked and reconstructed (default: all of the model's).
        mask_ratio: Fraction of each modality's tokens dropped.
        mask_ratios: Per-modality overrides of ``mask_ratio``.
        decoder_dim: Width of the shared decoder.
        decoder_depth: Blocks of the shared decoder.
        decoder_heads: Attention heads of the decoder.
        norm_targets: Normalise each float target patch (MAE's ``norm_pix_loss``).
        global_tokens: Add each modality's pooled output to the decoder input (MultiMAE's global token).
        alpha: Dirichlet concentration splitting the visible budget between modalities per row
            (MultiMAE: 1); ``None``: fixed ratios.
    """
    args = _drop_none(modalities=modalities, mask_ratios=mask_ratios, alpha=alpha)
    entry: dict[str, Any] = {"name": "multimae", "mask_ratio": mask_ratio, "decoder_dim": decoder_dim}
    entry |= {"decoder_depth": decoder_depth, "decoder_heads": decoder_heads, "norm_targets": norm_targets}
    entry["global_tokens"] = global_tokens
    return [{**entry, **args}]


@register("method", "mlm")
def mlm(
    target: str = "text",
    context: str = "image",
    mask_ratio: float = 0.15,
    fusion_depth: int = 2,
    fusion_heads: int = 4,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
    contrastive_weight: float = 1.0,
    temperature: float = 0.07,
) -> list[dict[str, Any]]:
    """Masked modelling of ``target`` with ``context`` (ALBEF/FLAVA MLM) plus a CLIP term.

    The masked term (``masked_conditional``) trains the target encoder and a fusion decoder;
    the contrastive term (``infonce`` between the two modalities, weight
    ``contrastive_weight``) aligns the pooled embeddings, which retrieval evaluation reads.
    ALBEF trains the same pair of losses (plus image-text matching).

    Args:
        target: The modality masked and predicted.
        context: The modality read as context.
        mask_ratio: Fraction of the target's tokens masked (BERT: 0.15).
        fusion_depth: Cross-attention blocks of the fusion decoder.
        fusion_heads: Attention heads of the fusion decoder.
        mask_prob: Token ids: probability of ``[MASK]`` at a masked position.
        random_prob: Token ids: probability of a random id (else unchanged).
        contrastive_weight: Weight of the InfoNCE term (0: none).
        temperature: Initial InfoNCE temperature.
    """
    masked: dict[str, Any] = {"name": "masked_conditional", "label": "mlm", "target": target, "context": context}
    masked |= {"mask_ratio": mask_ratio, "fusion_depth": fusion_depth, "fusion_heads": fusion_heads}
    masked |= {"mask_prob": mask_prob, "random_prob": random_prob}
    if contrastive_weight <= 0:
        return [masked]
    contrastive: dict[str, Any] = {"name": "infonce", "weight": contrastive_weight, "temperature": temperature}
    return [masked, {**contrastive, "modalities": [context, target]}]


@register("method", "data2vec")
def data2vec(
    modalities: list[str] | None = None,
    mask_ratio: float = 0.6,
    top_k: int = 3,
    tau0: float = 0.999,
    tau1: float = 0.9999,
    loss: Literal["mse", "smooth_l1"] = "smooth_l1",
    beta: float = 1.0,
    target_norm: Literal["layer", "instance"] = "layer",
    pooled_weight: float = 0.0,
    mask_span: int = 1,
) -> list[dict[str, Any]]:
    """data2vec: masked prediction of an EMA teacher's top-K block average (Baevski et al. 2022).

    Args:
        modalities: Modalities trained, each against its own teacher (default: all).
        mask_ratio: Fraction of stem tokens masked.
        top_k: Teacher blocks averaged into the target.
        tau0: EMA momentum at the start of training.
        tau1: EMA momentum at the end.
        loss: ``"smooth_l1"`` or ``"mse"``.
        beta: Threshold of the smooth L1 loss.
        target_norm: Normalisation of each teacher layer: ``"layer"`` (vision/text) or ``"instance"`` (speech).
        pooled_weight: Weight of data2vec 2.0's regression of the mean target by the pooled output (0: off).
        mask_span: Mask contiguous spans of this many tokens (1: single tokens).
    """
    entry: dict[str, Any] = {"name": "data2vec", "mask_ratio": mask_ratio, "top_k": top_k, "tau0": tau0, "tau1": tau1}
    entry |= {"loss": loss, "beta": beta, "target_norm": target_norm, "pooled_weight": pooled_weight}
    entry["mask_span"] = mask_span
    return [{**entry, **_drop_none(modalities=modalities)}]
