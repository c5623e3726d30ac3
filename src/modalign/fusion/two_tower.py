"""Fusion-free two-tower models (CLIP, Radford et al. 2021): each modality stays separate."""

from __future__ import annotations

from modalign.core.modules import Fusion
from modalign.core.registry import register
from modalign.core.types import EncoderOutput, FusionOutput


@register("fusion", "none")
class NoFusion(Fusion):
    """Identity fusion: returns the per-modality outputs unchanged and no joint representation."""

    def forward(self, inputs: dict[str, EncoderOutput]) -> FusionOutput:
        """Return ``FusionOutput(per_modality=inputs (sorted keys), fused=None)``."""
        return FusionOutput(per_modality={k: inputs[k] for k in sorted(inputs)}, fused=None)
