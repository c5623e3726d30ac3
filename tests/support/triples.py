"""A small float64 problem of three linked vector modalities, for trainer-level equality tests."""

from __future__ import annotations

from typing import Any

import torch

from modalign.core import ModalitySpec, Sample
from modalign.data.base import MultimodalDataset
from modalign.methods import Method
from modalign.train.build import build_method
from modalign.train.recipe import validate_recipe

N = 128  # training samples
EMBED = 4
SPECS = {m: ModalitySpec("vector", channels=c) for m, c in (("x", 6), ("y", 5), ("z", 4))}


class Triples(MultimodalDataset):
    """``N`` float64 samples of three linked vector modalities; ids repeat (``id = index % 100``)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        latent = torch.randn(N, 3, generator=g, dtype=torch.float64)
        self.values = {
            m: latent @ torch.randn(3, spec.channels, generator=g, dtype=torch.float64)
            + 0.3 * torch.randn(N, spec.channels, generator=g, dtype=torch.float64)
            for m, spec in SPECS.items()
        }

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return dict(SPECS)

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> Sample:
        return Sample(id=index % 100, values={m: v[index] for m, v in self.values.items()})


def make_method(name: str, modalities: tuple[str, ...], args: dict[str, Any]) -> Method:
    """The same small float64 method on every process (seeded before building)."""
    encoders = {m: {"name": "vector_mlp", "dim": 8, "hidden": 8} for m in modalities}
    recipe = {
        "data": {"name": "av-digits"},
        "model": {"embed_dim": EMBED, "encoders": encoders},
        "method": {"name": name, **args},
    }
    torch.manual_seed(0)
    return build_method(validate_recipe(recipe), {m: SPECS[m] for m in modalities}).double()
