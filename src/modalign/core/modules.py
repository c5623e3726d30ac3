"""Abstract component bases: encoders, fusion modules and objectives.

Every concrete component subclasses one of these, registers itself by name (see
``modalign.core.registry``) and is then usable from recipes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn

from modalign.core.types import Batch, EncoderOutput, FusionOutput, LossOutput, ModalitySpec, Outputs


class Encoder(nn.Module, ABC):
    """One tower: turns one modality's batch tensor into an ``EncoderOutput``.

    Subclasses set ``kind`` (the modality kind they read) and ``self.dim`` (output width ``D``).
    ``spec_kwargs`` maps a dataset's ``ModalitySpec`` to the constructor arguments that depend
    on the data (input channels, vocabulary size), so recipes only name hyper-parameters.
    """

    kind: ClassVar[str] = ""
    dim: int

    @classmethod
    def spec_kwargs(cls, spec: ModalitySpec) -> dict[str, Any]:
        """Constructor arguments implied by the data (default: ``in_channels``)."""
        return {"in_channels": spec.channels}

    @abstractmethod
    def forward(self, x: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode ``x`` (``Tensor[B, ...]``) with optional ``padding`` (``BoolTensor[B, T]``)."""

    def freeze(self) -> Encoder:
        """Stop gradients to every parameter and keep the module in eval mode; returns self."""
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = True
        self.eval()
        return self

    @property
    def frozen(self) -> bool:
        """Whether ``freeze()`` was called."""
        return bool(getattr(self, "_frozen", False))

    def train(self, mode: bool = True) -> Encoder:
        """Like ``nn.Module.train`` but a frozen encoder stays in eval mode (no BN drift)."""
        return super().train(mode and not self.frozen)


class Fusion(nn.Module, ABC):
    """Combines per-modality encoder outputs. Inputs are a dict; keys are processed sorted."""

    @abstractmethod
    def forward(self, inputs: dict[str, EncoderOutput]) -> FusionOutput:
        """Fuse ``{modality: EncoderOutput}`` into a ``FusionOutput``."""


class Objective(nn.Module, ABC):
    """A loss: reads what it needs from ``Outputs`` and ``Batch``, returns ``LossOutput``.

    The mathematics lives in a plain function next to each subclass, so it can be tested
    against a reference formula; the module only selects inputs and masks.
    """

    @abstractmethod
    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss for one batch."""
