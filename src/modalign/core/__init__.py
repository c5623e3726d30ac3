"""Contracts, component bases and registries.

``Batch``, ``EncoderOutput``, ``Outputs``, ``LossOutput``, ``Embedder``; imports nothing else from
modalign.
"""

from modalign.core.errors import (
    ConfigError,
    DataError,
    MissingDataRootError,
    ModalignError,
    UnknownComponentError,
)
from modalign.core.modules import Encoder, Fusion, Objective
from modalign.core.registry import available, create, lookup, register
from modalign.core.types import (
    MODALITY_KINDS,
    Batch,
    Embedder,
    EncoderOutput,
    EpochContext,
    LossOutput,
    ModalitySpec,
    Outputs,
    Sample,
    StepContext,
)

__all__ = [
    "MODALITY_KINDS",
    "Batch",
    "ConfigError",
    "DataError",
    "Embedder",
    "Encoder",
    "EncoderOutput",
    "EpochContext",
    "Fusion",
    "LossOutput",
    "MissingDataRootError",
    "ModalignError",
    "ModalitySpec",
    "Objective",
    "Outputs",
    "Sample",
    "StepContext",
    "UnknownComponentError",
    "available",
    "create",
    "lookup",
    "register",
]
