"""A two-modality vector dataset with a known correspondence, for the unaligned-data objective tests.

``x = z A + noise`` and ``y = z B + noise`` from a latent ``z [n, 8]``: sample ``i``'s two values
are each other's partner. ``A`` and ``B`` are fixed; ``z`` is drawn per split.
"""

from __future__ import annotations

import torch

from modalign.core import Batch, ModalitySpec, Sample
from modalign.core.types import EpochContext
from modalign.data.base import MultimodalDataset
from modalign.data.collate import collate
from modalign.data.pairing import PairingView
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


def noisy_batches(n: int, noise: float = 0.5) -> list[Batch]:
    """``Linked(n)`` behind a ``PairingView`` with ``pair_noise``, collated 50 rows at a time, in order."""
    view = PairingView(Linked(n=n), pair_noise=noise, seed=0)
    return [collate([view[i] for i in range(s, min(s + 50, len(view)))], SPECS) for s in range(0, len(view), 50)]


def context(epoch: int, batches: list[Batch]) -> EpochContext:
    """The ``EpochContext`` of ``epoch`` whose pass yields ``batches`` (50 rows, ``len(batches)`` steps each)."""
    steps = len(batches)
    return EpochContext(epoch * steps, epoch, 50, steps, batches=lambda: iter(batches))
