"""Named methods (kind ``method``) as presets of one composition: a list of weighted objectives.

A recipe's ``method`` section is either ``{name: composite, objectives: [...]}`` with explicit
objective entries, or a preset such as ``{name: clip, temperature: 0.07}``. A preset is a
function of its (validated) arguments returning objective entries, so every named method builds
the same ``Method(MultimodalModel, objectives)``; none rebuilds the model.

An objective entry is ``{name: <objective>, weight: 1.0, label: <log name>, **arguments}``;
``weight`` and ``label`` are optional. Labels default to the objective's name; when a name
repeats, each copy's label gets its modalities (``infonce_image-text``) or its position.
"""

from __future__ import annotations

from typing import Any

from modalign.core.errors import ConfigError
from modalign.core.registry import register

#: Keys of an objective entry that belong to the composition, not to the objective.
ENTRY_KEYS = frozenset({"weight", "label"})


def _drop_none(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


@register("method", "composite")
def composite(objectives: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Any weighted list of objectives, e.g. ``[{name: infonce, weight: 1.0}, {name: vicreg}]``.

    Args:
        objectives: Objective entries ``{name, weight?, label?, **arguments}``.

    Raises:
        ConfigError: If the list is empty.
    """
    if not objectives:
        raise ConfigError("objectives", "a composite method needs at least one objective")
    return list(objectives)


@register("method", "clip")
def clip(
    modalities: list[str] | None = None,
    temperature: float = 0.07,
    max_logit_scale: float = 100.0,
    learn_temperature: bool = True,
    gather: bool = False,
) -> list[dict[str, Any]]:
    """CLIP: symmetric InfoNCE between two modalities (Radford et al. 2021).

    Args:
        modalities: The two modalities to contrast (default: the model's two).
        temperature: Initial temperature (CLIP: 0.07).
        max_logit_scale: Clamp on ``1/temperature`` (CLIP: 100).
        learn_temperature: Train the temperature.
        gather: Use negatives from every rank under data parallelism.
    """
    args = _drop_none(modalities=modalities)
    return [
        {
            "name": "infonce",
            "temperature": temperature,
            "max_logit_scale": max_logit_scale,
            "learn_temperature": learn_temperature,
            "gather": gather,
            **args,
        }
    ]


@register("method", "siglip")
def siglip(
    modalities: list[str] | None = None,
    temperature: float = 0.1,
    bias: float = -10.0,
    max_logit_scale: float = 100.0,
    gather: bool = False,
) -> list[dict[str, Any]]:
    """SigLIP: pairwise sigmoid loss with learnable temperature and bias (Zhai et al. 2023).

    Args:
        modalities: The two modalities (default: the model's two).
        temperature: Initial temperature (SigLIP: 0.1, i.e. ``logit_scale = log 10``).
        bias: Initial logit bias (SigLIP: -10).
        max_logit_scale: Clamp on ``1/temperature``.
        gather: Use negatives from every rank under data parallelism.
    """
    args = _drop_none(modalities=modalities)
    return [
        {
            "name": "sigmoid",
            "temperature": temperature,
            "bias": bias,
            "max_logit_scale": max_logit_scale,
            "gather": gather,
            **args,
        }
    ]


@register("method", "cmc")
def cmc(
    modalities: list[str] | None = None,
    pairs: list[list[str]] | None = None,
    temperature: float = 0.07,
    learn_temperature: bool = True,
) -> list[dict[str, Any]]:
    """CMC: InfoNCE on every pair of modalities (Tian et al. 2020, "Contrastive Multiview Coding").

    Args:
        modalities: Modalities taking part (default: all of the model's).
        pairs: Restrict to these pairs (default: every pair).
        temperature: Initial temperature, shared by all pairs.
        learn_temperature: Train the temperature.
    """
    args = _drop_none(modalities=modalities, pairs=pairs)
    return [{"name": "multiview", "temperature": temperature, "learn_temperature": learn_temperature, **args}]


@register("method", "imagebind")
def imagebind(
    anchor: str = "image",
    modalities: list[str] | None = None,
    temperature: float = 0.07,
    learn_temperature: bool = True,
) -> list[dict[str, Any]]:
    """ImageBind: InfoNCE between an anchor modality and each other one (Girdhar et al. 2023).

    The non-anchor modalities are never contrasted with each other; their alignment is emergent.

    Args:
        anchor: The binding modality (ImageBind: images).
        modalities: Modalities taking part (default: all of the model's).
        temperature: Initial temperature, shared by all pairs.
        learn_temperature: Train the temperature.
    """
    args = _drop_none(modalities=modalities)
    entry = {"name": "multiview", "anchor": anchor, "temperature": temperature, "learn_temperature": learn_temperature}
    return [{**entry, **args}]


@register("method", "moco")
def moco(
    modalities: list[str] | None = None,
    queue_size: int = 4096,
    momentum: float = 0.995,
    temperature: float = 0.07,
    gather: bool = False,
) -> list[dict[str, Any]]:
    """Cross-modal momentum contrast with queues (He et al. 2020 MoCo; ALBEF's ITC, Li et al. 2021).

    Args:
        modalities: The two modalities (default: the model's two).
        queue_size: Keys kept per modality.
        momentum: EMA coefficient of the teacher.
        temperature: Initial temperature (learnt).
        gather: Use and enqueue every rank's keys.
    """
    args = _drop_none(modalities=modalities)
    entry = {"name": "moco", "queue_size": queue_size, "momentum": momentum, "temperature": temperature}
    return [{**entry, "gather": gather, **args}]


@register("method", "dcl")
def dcl(modalities: list[str] | None = None, temperature: float = 0.1, gather: bool = False) -> list[dict[str, Any]]:
    """Decoupled contrastive learning (Yeh et al. 2022): InfoNCE without the positive in the denominator.

    Args:
        modalities: The two modalities (default: the model's two).
        temperature: Initial temperature (learnt).
        gather: Use negatives from every rank.
    """
    return [{"name": "dcl", "temperature": temperature, "gather": gather, **_drop_none(modalities=modalities)}]


@register("method", "vicreg")
def vicreg(
    modalities: list[str] | None = None,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    gather: bool = False,
) -> list[dict[str, Any]]:
    """VICReg across modalities (Bardes et al. 2022), on the raw projections.

    Args:
        modalities: The two modalities (default: the model's two).
        sim_weight: Invariance weight.
        var_weight: Variance weight.
        cov_weight: Covariance weight.
        gather: Batch statistics over every rank.
    """
    weights = {"sim_weight": sim_weight, "var_weight": var_weight, "cov_weight": cov_weight}
    return [{"name": "vicreg", **weights, "gather": gather, **_drop_none(modalities=modalities)}]


@register("method", "barlow")
def barlow(modalities: list[str] | None = None, lambd: float = 5e-3, gather: bool = False) -> list[dict[str, Any]]:
    """Barlow Twins across modalities (Zbontar et al. 2021), on the raw projections.

    Args:
        modalities: The two modalities (default: the model's two).
        lambd: Weight of the redundancy-reduction term.
        gather: Batch statistics over every rank.
    """
    return [{"name": "barlow", "lambd": lambd, "gather": gather, **_drop_none(modalities=modalities)}]


def entry_labels(entries: list[dict[str, Any]]) -> list[str]:
    """The log label of each objective entry (explicit ``label``, else derived from the name).

    Raises:
        ConfigError: If labels repeat or contain ``.``.
    """
    names = [str(e.get("name")) for e in entries]
    unlabelled = [n for n, e in zip(names, entries, strict=True) if e.get("label") is None]
    labels = []
    for i, entry in enumerate(entries):
        label = entry.get("label")
        if label is None:
            label = names[i]
            if unlabelled.count(label) > 1:
                mods = entry.get("modalities")
                label = f"{label}_{'-'.join(map(str, mods))}" if mods else f"{label}_{i}"
        labels.append(str(label))
    for i, label in enumerate(labels):
        if "." in label or labels.index(label) != i:
            raise ConfigError(f"objectives.{i}.label", f"label {label!r} is repeated or contains '.'")
    return labels


@register("method", "gmc")
def gmc(
    modalities: list[str] | None = None,
    temperature: float = 0.1,
    fusion_temperature: float = 0.1,
    fusion_weight: float = 1.0,
) -> list[dict[str, Any]]:
    """Two towers plus a fusion module trained without labels (Poklukar et al. 2022, GMC).

    InfoNCE aligns the towers' embeddings (retrieval); ``gmc`` trains the fusion module so the
    joint representation of a sample agrees with each of its modalities fused alone (what keeps
    it usable when one is missing). Needs ``model.fusion``.

    Args:
        modalities: The two modalities (default: the model's two).
        temperature: Initial InfoNCE temperature of the towers.
        fusion_temperature: NT-Xent temperature of the fusion objective.
        fusion_weight: Weight of the fusion objective.
    """
    args = _drop_none(modalities=modalities)
    return [
        {"name": "infonce", "temperature": temperature, **args},
        {"name": "gmc", "temperature": fusion_temperature, "weight": fusion_weight, **args},
    ]
