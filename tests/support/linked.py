"""A two-modality vector dataset with a known correspondence, for the unaligned-data objective tests.

``x = z A + noise`` and ``y = z B + noise`` from a latent ``z [n, 8]``: sample ``i``'s two values
are each other's partner. ``A`` and ``B`` are fixed; ``z`` is drawn per split.
"""

from __future__ import annotations

import torch

from modalign.core import ModalitySpec, Sample
from modalign.data.base import MultimodalDataset
from modalign.data.collate import collate
from modalign.methods import Method

SPECS = {"x": ModalitySpec("vector", channels=32), "y": ModalitySpec("vector", channels=32)}


class Linked(MultimodalDataset):
    """x = z A + noise and y = z B + noise from a latent ``z [n, 8]``; A, B fixed, ``z`` per split."""

    def __init__(self, split: str = "train", n: int = 800, noise: float = 0.5) -> None:
        g = torch.Generator().manual_seed(0)
        maps = {m: torch.randn(8, spec.channels, generator=g) for m, spec in SPECS.items()}
        g = torch.Generator().manual_seed(1 if split == "train" else 2)
        z = torch.randn(n, 8, generator=g)
        self.split = split
        self.values = {m: z @ w + noise * torch.randn(n, w.shape[1], generator=g) for m, w in maps.items()}

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return dict(SPECS)

    def __len__(self) -> int:
        return self.values["x"].shape[0]

    def __getitem__(self, index: int) -> Sample:
        return Sample(id=index, values={m: v[index] for m, v in self.values.items()}, labels={"digit": index % 3})


def top1(method: Method, n: int = 300) -> float:
    """Mean of x->y and y->x top-1 retrieval on ``n`` held-out clean pairs of ``Linked("test")``."""
    test = Linked("test", n=n)
    batch = collate([test[i] for i in range(len(test))], SPECS)
    method.eval()
    emb = method.embed(batch)
    sim = emb["x"] @ emb["y"].T
    truth = torch.arange(len(test))
    return 0.5 * float((sim.argmax(dim=1) == truth).double().mean() + (sim.argmax(dim=0) == truth).double().mean())
