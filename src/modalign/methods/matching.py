"""Matching presets (kind ``method``): ``itm`` (ALBEF's ITC + ITM) and ``avc`` (L3-Net).

Each is a function of typed arguments returning objective entries (see ``methods.presets``).
"""

from __future__ import annotations

from typing import Any, Literal

from modalign.core.errors import ConfigError
from modalign.core.registry import register


def _modalities(modalities: list[str] | None) -> dict[str, Any]:
    return {} if modalities is None else {"modalities": modalities}


@register("method", "itm")
def itm(
    modalities: list[str] | None = None,
    temperature: float = 0.07,
    itm_weight: float = 1.0,
    depth: int = 1,
    heads: int = 4,
    width: int | None = None,
    pool: Literal["mean", "first"] = "mean",
    hard_negatives: bool = True,
    max_rows: int | None = None,
    gather: bool = False,
) -> list[dict[str, Any]]:
    """ALBEF without MLM and momentum distillation: InfoNCE (ITC) plus matching with hard negatives (ITM).

    Li et al. 2021, "Align before Fuse". ITC trains the embeddings used for retrieval and for
    sampling the hard negatives; ITM trains a fusion encoder and both towers' tokens.

    Args:
        modalities: ``[A, B]``: ``A``'s tokens query ``B``'s in the fusion encoder (ALBEF:
            ``[text, image]``). Default: the model's two, sorted.
        temperature: Initial ITC temperature, also the temperature of the hard-negative sampling.
        itm_weight: Weight of the ITM loss (ITC has weight 1).
        depth: Cross-attention blocks of the fusion encoder.
        heads: Attention heads of the fusion encoder.
        width: Fusion width (default: ``A``'s token width).
        pool: Pooling of the fused query tokens (``mean`` or ``first``).
        hard_negatives: Sample ITM negatives by similarity (``False``: uniformly).
        max_rows: Fuse the ITM pairs of at most this many rows per batch (``None``: all, as ALBEF).
        gather: Negatives from every rank under data parallelism (both objectives).

    Raises:
        ConfigError: If ``itm_weight`` is negative.
    """
    if itm_weight < 0:
        raise ConfigError("itm_weight", f"must be >= 0, got {itm_weight}")
    mods = _modalities(modalities)
    matching = {"depth": depth, "heads": heads, "width": width, "pool": pool, "hard_negatives": hard_negatives}
    matching["max_rows"] = max_rows
    return [
        {"name": "infonce", "temperature": temperature, "gather": gather, **mods},
        {"name": "itm", "weight": itm_weight, "temperature": temperature, "gather": gather, **matching, **mods},
    ]


@register("method", "avc")
def avc(
    modalities: list[str] | None = None,
    head: Literal["concat", "distance"] = "concat",
    hidden: int = 128,
    contrastive_weight: float = 0.0,
    temperature: float = 0.1,
    gather: bool = False,
) -> list[dict[str, Any]]:
    """Audio-visual correspondence (Arandjelović & Zisserman 2017, L3-Net), optionally with InfoNCE.

    AVC alone trains each tower to tell true pairs from shuffled ones; with ``head="concat"``
    the two towers need not share a space (linear probes read each), with ``head="distance"``
    (AVE-Net, 2018) the decision is a function of the embedding distance, which aligns them.
    ``contrastive_weight > 0`` adds symmetric InfoNCE with that weight.

    Args:
        modalities: The two modalities (default: the model's two, sorted).
        head: ``concat`` (L3-Net MLP on the projections) or ``distance`` (AVE-Net).
        hidden: Hidden width of the ``concat`` MLP.
        contrastive_weight: Weight of an added InfoNCE objective (0: none).
        temperature: Initial InfoNCE temperature (only with ``contrastive_weight > 0``).
        gather: Normalise (and, for InfoNCE, draw negatives) over every rank.

    Raises:
        ConfigError: If ``contrastive_weight`` is negative.
    """
    if contrastive_weight < 0:
        raise ConfigError("contrastive_weight", f"must be >= 0, got {contrastive_weight}")
    mods = _modalities(modalities)
    entries: list[dict[str, Any]] = [{"name": "avc", "head": head, "hidden": hidden, "gather": gather, **mods}]
    if contrastive_weight > 0:
        entries.append(
            {"name": "infonce", "weight": contrastive_weight, "temperature": temperature, "gather": gather, **mods}
        )
    return entries
