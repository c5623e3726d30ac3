"""Instance-discrimination methods over two modalities: CLIP and SigLIP.

* ``clip``: symmetric InfoNCE with a learnable, clamped temperature (Radford et al. 2021,
  "Learning Transferable Visual Models From Natural Language Supervision").
* ``siglip``: pairwise sigmoid loss with learnable temperature and bias (Zhai et al. 2023,
  "Sigmoid Loss for Language Image Pre-Training").

Any two modalities: the pair is named by ``modalities`` (default: the model's two).
"""

from __future__ import annotations

from torch import nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Encoder, Fusion, Objective
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput
from modalign.methods.base import Method, MultimodalModel
from modalign.objectives import InfoNCE, SigmoidLoss


class ContrastiveMethod(Method):
    """A two-tower model trained with one pairwise objective.

    Args:
        model: The ``MultimodalModel``.
        objective: An ``Objective`` reading ``outputs.embeddings`` of the pair.
    """

    def __init__(self, model: MultimodalModel, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def training_step(self, batch: Batch) -> LossOutput:
        """Embed the batch and apply the objective."""
        return self.objective(self.model(batch), batch)


def _pair(encoders: dict[str, Encoder], modalities: list[str] | None) -> list[str]:
    pair = sorted(modalities) if modalities else sorted(encoders)
    if len(pair) != 2:
        raise ConfigError("method.modalities", f"needs exactly two modalities, got {pair}")
    unknown = [m for m in pair if m not in encoders]
    if unknown:
        raise ConfigError("method.modalities", f"no encoder for {unknown}", sorted(encoders))
    return pair


@register("method", "clip")
def clip(
    encoders: dict[str, Encoder],
    heads: dict[str, nn.Module],
    fusion: Fusion,
    modalities: list[str] | None = None,
    temperature: float = 0.07,
    max_logit_scale: float = 100.0,
    learn_temperature: bool = True,
    gather: bool = False,
) -> ContrastiveMethod:
    """CLIP: symmetric InfoNCE between two modalities.

    Args:
        encoders: ``{modality: Encoder}`` (framework-provided).
        heads: ``{modality: projection head}`` (framework-provided).
        fusion: Fusion module (framework-provided; two-tower = ``none``).
        modalities: The two modalities to contrast (default: the two encoders).
        temperature: Initial temperature (CLIP: 0.07).
        max_logit_scale: Clamp on ``1/temperature`` (CLIP: 100).
        learn_temperature: Train the temperature.
        gather: Use negatives from every rank under data parallelism.
    """
    pair = _pair(encoders, modalities)
    model = MultimodalModel(encoders, heads, fusion, temperature, max_logit_scale, learn_temperature)
    return ContrastiveMethod(model, InfoNCE(modalities=pair, gather=gather))


@register("method", "siglip")
def siglip(
    encoders: dict[str, Encoder],
    heads: dict[str, nn.Module],
    fusion: Fusion,
    modalities: list[str] | None = None,
    temperature: float = 0.1,
    bias: float = -10.0,
    max_logit_scale: float = 100.0,
    gather: bool = False,
) -> ContrastiveMethod:
    """SigLIP: pairwise sigmoid loss with learnable temperature and bias.

    Args:
        encoders: ``{modality: Encoder}`` (framework-provided).
        heads: ``{modality: projection head}`` (framework-provided).
        fusion: Fusion module (framework-provided).
        modalities: The two modalities (default: the two encoders).
        temperature: Initial temperature (SigLIP: 0.1, i.e. ``logit_scale = log 10``).
        bias: Initial logit bias (SigLIP: -10).
        max_logit_scale: Clamp on ``1/temperature``.
        gather: Use negatives from every rank under data parallelism.
    """
    pair = _pair(encoders, modalities)
    model = MultimodalModel(encoders, heads, fusion, temperature, max_logit_scale, True, init_bias=bias)
    return ContrastiveMethod(model, SigmoidLoss(modalities=pair, gather=gather))
