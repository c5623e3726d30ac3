"""The model every method composes, and the ``Method`` interface the training loop calls.

``MultimodalModel(encoders, heads, fusion)`` is built by injection (STYLE rule 6): one encoder
and one projection head per modality, a fusion module, and the learnable temperature/bias of
the contrastive family. A ``Method`` joins a model with objectives behind
``training_step(batch) -> LossOutput`` (STYLE rule 7), so the loop knows nothing of methods.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.modules import Encoder, Fusion
from modalign.core.types import Batch, EncoderOutput, LossOutput, Outputs


class MultimodalModel(nn.Module):
    """Encoders -> fusion -> projection heads -> normalised embeddings.

    Args:
        encoders: ``{modality: Encoder}``.
        heads: ``{modality: nn.Module}`` mapping pooled ``[B, D]`` to ``[B, E]``.
        fusion: A ``Fusion`` module (``NoFusion`` for two towers).
        init_temperature: Initial softmax temperature ``t``; stored as ``logit_scale = log(1/t)``.
            ``None``: no temperature parameter.
        max_logit_scale: Clamp of ``exp(logit_scale)`` (CLIP clamps at 100).
        learn_temperature: Whether ``logit_scale`` is trained.
        init_bias: Initial logit bias (SigLIP uses -10), or ``None`` for no bias.

    Raises:
        ValueError: If encoders and heads name different modalities.
    """

    def __init__(
        self,
        encoders: dict[str, Encoder],
        heads: dict[str, nn.Module],
        fusion: Fusion,
        init_temperature: float | None = 0.07,
        max_logit_scale: float = 100.0,
        learn_temperature: bool = True,
        init_bias: float | None = None,
    ) -> None:
        super().__init__()
        if sorted(encoders) != sorted(heads):
            raise ValueError(f"encoders {sorted(encoders)} and heads {sorted(heads)} differ")
        self.encoders = nn.ModuleDict({k: encoders[k] for k in sorted(encoders)})
        self.heads = nn.ModuleDict({k: heads[k] for k in sorted(heads)})
        self.fusion = fusion
        self.max_log_scale = math.log(max_logit_scale)
        self.logit_scale: nn.Parameter | None = None
        self.logit_bias: nn.Parameter | None = None
        if init_temperature is not None:
            value = torch.tensor(math.log(1.0 / init_temperature))
            self.logit_scale = nn.Parameter(value, requires_grad=learn_temperature)
        if init_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities the model has an encoder for (sorted)."""
        return tuple(self.encoders.keys())

    def encode(self, batch: Batch) -> dict[str, EncoderOutput]:
        """Run every encoder whose modality is in the batch: ``{m: EncoderOutput}``."""
        return {m: self.encoders[m](batch.data[m], batch.padding.get(m)) for m in self.modalities if m in batch.data}

    def forward(self, batch: Batch) -> Outputs:
        """Encode, fuse and project; embeddings are L2-normalised ``[B, E]``."""
        fused = self.fusion(self.encode(batch))
        embeddings = {m: F.normalize(self.heads[m](out.pooled), dim=-1) for m, out in fused.per_modality.items()}
        scale = None
        if self.logit_scale is not None:
            scale = self.logit_scale.clamp(max=self.max_log_scale)
        return Outputs(
            embeddings=embeddings,
            tokens={m: out.tokens for m, out in fused.per_modality.items()},
            padding={m: out.padding for m, out in fused.per_modality.items() if out.padding is not None},
            fused=fused.fused.pooled if fused.fused is not None else None,
            logit_scale=scale,
            logit_bias=self.logit_bias,
        )


class Method(nn.Module, ABC):
    """A named composition of a model and objectives; the unit the trainer optimises.

    Implements the ``Embedder`` protocol used by evaluation.
    """

    model: MultimodalModel

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities this method embeds."""
        return self.model.modalities

    @abstractmethod
    def training_step(self, batch: Batch) -> LossOutput:
        """Forward one batch and return the loss to back-propagate, with named parts."""

    @torch.no_grad()
    def embed(self, batch: Batch) -> dict[str, Tensor]:
        """``{modality: Tensor[B, E]}`` normalised embeddings of the modalities in ``batch``."""
        return self.model(batch).embeddings

    def no_weight_decay(self) -> set[str]:
        """Names of parameters excluded from weight decay (temperature, bias)."""
        return {n for n, _ in self.named_parameters() if n.endswith(("logit_scale", "logit_bias"))}
