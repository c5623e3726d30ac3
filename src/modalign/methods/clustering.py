"""Clustering methods (kind ``method``): ``xdc``, ``selavi`` and ``mcn`` as presets of objective entries.

* ``xdc``: cross-modal deep clustering (Alwassel et al. 2020): the ``xdc`` objective.
* ``selavi``: cross-modal SwAV on shared Sinkhorn-balanced prototypes (Asano et al. 2020;
  Caron et al. 2020): the ``selavi`` objective.
* ``mcn``: Multimodal Clustering Networks (Chen et al. 2021): ``infonce`` between the
  modalities plus the joint-space clustering term ``mcn_cluster``.

``xdc`` and ``selavi`` are pure clustering in their papers; each takes a ``contrastive_weight``
that adds an ``infonce`` term when positive (default 0: the paper's method).
"""

from __future__ import annotations

from typing import Any

from modalign.core.registry import register


def _drop_none(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _contrastive(weight: float, temperature: float, gather: bool, args: dict[str, Any]) -> list[dict[str, Any]]:
    """An ``infonce`` entry of ``weight`` (none when ``weight <= 0``)."""
    if weight <= 0:
        return []
    return [{"name": "infonce", "weight": weight, "temperature": temperature, "gather": gather, **args}]


@register("method", "xdc")
def xdc(
    modalities: list[str] | None = None,
    clusters: int = 32,
    temperature: float = 0.1,
    iterations: int = 20,
    seed: int = 0,
    contrastive_weight: float = 0.0,
    contrastive_temperature: float = 0.1,
    gather: bool = False,
) -> list[dict[str, Any]]:
    """XDC: each modality's classifier predicts the other modality's k-means cluster (Alwassel et al. 2020).

    Args:
        modalities: The two modalities (default: the model's two).
        clusters: k-means clusters per modality, refreshed at every epoch start.
        temperature: Temperature of the cosine classifiers.
        iterations: Lloyd iterations per refresh.
        seed: Seed of the k-means++ draws.
        contrastive_weight: Weight of an added InfoNCE term (0: pure XDC, as in the paper).
        contrastive_temperature: Initial temperature of that InfoNCE term.
        gather: Cluster and average over all ranks under data parallelism.
    """
    args = _drop_none(modalities=modalities)
    entry = {
        "name": "xdc",
        "clusters": clusters,
        "temperature": temperature,
        "iterations": iterations,
        "seed": seed,
        "gather": gather,
        **args,
    }
    return [entry, *_contrastive(contrastive_weight, contrastive_temperature, gather, args)]


@register("method", "selavi")
def selavi(
    modalities: list[str] | None = None,
    prototypes: int = 32,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    freeze_steps: int = 0,
    init_prototypes: bool = True,
    seed: int = 0,
    contrastive_weight: float = 0.0,
    contrastive_temperature: float = 0.1,
    gather: bool = False,
    views: bool = False,
) -> list[dict[str, Any]]:
    """SeLaVi: cross-modal swapped prediction of Sinkhorn-balanced codes on shared prototypes.

    Asano et al. 2020 (SeLaVi), with SwAV's online codes (Caron et al. 2020); one clustering head.

    Args:
        modalities: The two modalities (default: the model's two).
        prototypes: Number of shared prototypes ``K``.
        temperature: Softmax temperature of the predictions (SwAV: 0.1).
        epsilon: Entropic regularisation of the codes (SwAV: 0.05).
        iterations: Sinkhorn iterations (SwAV: 3).
        freeze_steps: Optimiser steps during which the prototypes stay fixed.
        init_prototypes: Start the prototypes at k-means centroids of the data (first epoch).
        seed: Seed of that k-means.
        contrastive_weight: Weight of an added InfoNCE term (0: pure SeLaVi, as in the paper).
        contrastive_temperature: Initial temperature of that InfoNCE term.
        gather: Balance codes over all ranks under data parallelism.
        views: Also predict across the views of unimodal samples (mix-paired: SwAV on the pools).
    """
    args = _drop_none(modalities=modalities)
    entry = {
        "name": "selavi",
        "views": views,
        "prototypes": prototypes,
        "temperature": temperature,
        "epsilon": epsilon,
        "iterations": iterations,
        "freeze_steps": freeze_steps,
        "init_prototypes": init_prototypes,
        "seed": seed,
        "gather": gather,
        **args,
    }
    return [entry, *_contrastive(contrastive_weight, contrastive_temperature, gather, args)]


@register("method", "mcn")
def mcn(
    modalities: list[str] | None = None,
    temperature: float = 0.1,
    clusters: int = 32,
    cluster_temperature: float = 0.1,
    cluster_weight: float = 1.0,
    iterations: int = 20,
    seed: int = 0,
    gather: bool = False,
) -> list[dict[str, Any]]:
    """MCN: InfoNCE between the modalities plus joint-space k-means clustering (Chen et al. 2021).

    Args:
        modalities: The two modalities (default: the model's two).
        temperature: Initial temperature of the InfoNCE term.
        clusters: Joint-space k-means centroids, refreshed at every epoch start.
        cluster_temperature: Softmax temperature over the centroids.
        cluster_weight: Weight of the clustering term (InfoNCE has weight 1).
        iterations: Lloyd iterations per refresh.
        seed: Seed of the k-means++ draws.
        gather: Negatives, clustering and averages over all ranks under data parallelism.
    """
    args = _drop_none(modalities=modalities)
    cluster = {
        "name": "mcn_cluster",
        "weight": cluster_weight,
        "clusters": clusters,
        "temperature": cluster_temperature,
        "iterations": iterations,
        "seed": seed,
        "gather": gather,
        **args,
    }
    return [{"name": "infonce", "temperature": temperature, "gather": gather, **args}, cluster]
