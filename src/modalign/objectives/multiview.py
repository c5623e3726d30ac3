"""Contrastive learning over three or more modalities: every pair (CMC) or pairs with one anchor (ImageBind).

* Full graph: Tian, Krishnan and Isola 2020, "Contrastive Multiview Coding" (CMC): InfoNCE on
  every pair of views.
* Anchored: Girdhar et al. 2023, "ImageBind: One Embedding Space To Bind Them All": InfoNCE only
  between an anchor modality (images) and each other modality; the other modalities align with
  each other without ever being trained together ("emergent" alignment).

``multiview_pairs`` decides the graph; the loss is the mean of ``infonce_loss`` over the pairs
that have data in the batch (each pair on the rows where both of its modalities were observed,
so partially paired data uses every pair it can). One temperature is shared by all pairs.
"""

from __future__ import annotations

from itertools import combinations

from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Objective
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.distributed import is_initialized
from modalign.objectives.contrastive import (
    LogitScale,
    check_known,
    infonce_loss,
    model_modalities,
    paired_rows,
)


def multiview_pairs(
    modalities: list[str], anchor: str | None = None, pairs: list[list[str]] | None = None
) -> list[tuple[str, str]]:
    """The pairs a multi-view objective contrasts.

    Args:
        modalities: The modalities taking part (at least two).
        anchor: ImageBind: pair the anchor with every other modality.
        pairs: Explicit pairs (overrides ``anchor`` and the full graph).

    Returns:
        Ordered ``(a, b)`` pairs: explicit ones as given, else ``(anchor, m)``, else every pair
        of the sorted modalities.

    Raises:
        ConfigError: Fewer than two modalities, an anchor outside them, a malformed or repeated
            pair, or a pair naming a modality outside them.
    """
    if len(set(modalities)) < 2:
        raise ConfigError("modalities", f"a multi-view objective needs two or more modalities, got {modalities}")
    if pairs is not None:
        out = [(p[0], p[1]) for p in pairs if len(p) == 2 and p[0] != p[1]]
        if len(out) != len(pairs) or len({frozenset(p) for p in out}) != len(out):
            raise ConfigError("pairs", f"expected distinct pairs of two different modalities, got {pairs}")
        unknown = sorted({m for p in out for m in p} - set(modalities))
        if unknown:
            raise ConfigError("pairs", f"pairs name modalities outside the objective's: {unknown}", sorted(modalities))
        return out
    if anchor is not None:
        if anchor not in modalities:
            raise ConfigError("anchor", f"anchor {anchor!r} is not one of the modalities", sorted(modalities))
        return [(anchor, m) for m in sorted(modalities) if m != anchor]
    return list(combinations(sorted(set(modalities)), 2))


@register("objective", "multiview")
class MultiView(Objective):
    """InfoNCE over a graph of modality pairs (CMC full graph, or ImageBind anchored).

    Parts: one per pair, named ``"a-b"``; metrics ``paired/a-b``. The loss is the mean over the
    pairs with at least two paired rows (a connected zero when none has).

    Args:
        modalities: Modalities taking part (default: all of the model's).
        anchor: Contrast only ``(anchor, m)`` pairs (ImageBind).
        pairs: Explicit list of pairs, e.g. ``[[image, text_en], [image, text_de]]``.
        temperature: Initial temperature, shared by all pairs.
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        multi_positive: Rows sharing a content id are positives (see ``infonce_loss``).
        gather: Contrast against every rank's rows (data parallelism; set by the trainer).
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        anchor: str | None = None,
        pairs: list[list[str]] | None = None,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        multi_positive: bool = False,
        gather: bool = False,
    ) -> None:
        super().__init__()
        self.requested = modalities
        self.anchor = anchor
        self.requested_pairs = pairs
        self.pairs: list[tuple[str, str]] = []
        if modalities is not None:
            self.pairs = multiview_pairs(modalities, anchor, pairs)
        self.scale = LogitScale(temperature, learn_temperature, max_logit_scale)
        self.multi_positive = multi_positive
        self.gather = gather

    def bind(self, model: nn.Module) -> None:
        """Resolve the modalities (default: the model's) and check the model has each.

        Raises:
            ConfigError: As ``multiview_pairs``, or for a modality without an encoder.
        """
        modalities = self.requested if self.requested is not None else list(model_modalities(model))
        self.pairs = multiview_pairs(modalities, self.anchor, self.requested_pairs)
        check_known(tuple(modalities), model, "multiview")

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Mean InfoNCE over the pairs that have data; one part per pair."""
        if not self.pairs:
            raise ValueError("multiview: no modalities given and not bound to a model")
        scale = self.scale()
        parts: dict[str, Tensor] = {}
        metrics = {"temperature": float(1.0 / scale.detach().exp())}
        for a, b in self.pairs:
            pair = paired_rows(outputs.embeddings, batch, (a, b))
            metrics[f"paired/{a}-{b}"] = float(pair.size if pair is not None else 0)
            if pair is not None and (pair.size >= 2 or (self.gather and is_initialized())):
                loss = infonce_loss(pair.a, pair.b, scale, pair.ids_a, self.gather, pair.ids_b, self.multi_positive)
                parts[f"{a}-{b}"] = loss
        if not parts:
            return LossOutput(loss=outputs.zero(scale), metrics=metrics)
        total = sum(parts.values(), start=outputs.zero(scale))
        return LossOutput(loss=total / len(parts), parts=parts, metrics=metrics)
