"""Fusion-free two-tower models (CLIP, Radford et al. 2021): each modality stays separate."""

from __future__ import annotations

from torch import Tensor

from modalign.core.modules import Fusion
from modalign.core.registry import register
from modalign.core.types import EncoderOutput


@register("fusion", "none")
class NoFusion(Fusion):
    """No joint representation (``dim = 0``): the model is two (or more) separate towers."""

    dim = 0

    def forward(self, inputs: dict[str, EncoderOutput], present: dict[str, Tensor]) -> EncoderOutput | None:
        """Return ``None``: there is nothing fused."""
        return None
