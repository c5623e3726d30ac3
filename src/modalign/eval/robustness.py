"""The fused representation and robustness to missing or noisy modalities.

``eval.json`` keys (``modalign.eval.report`` has the base scheme):

* ``fused/<metric>``: the fusion module's joint representation of each test row (every
  observed modality), probed like a modality (``fused/linear_probe``, ``fused/knn``,
  ``fused/nmi``, ...) with probes fitted on the clean training split;
* ``missing:<m>/<metric>``: every metric recomputed on the test split with modality ``m``
  removed from every row (``data.perturb.remove_modality``): ``m``'s own metrics disappear,
  the other modalities' stay, and ``missing:<m>/fused/...`` measures the fused
  representation without ``m``;
* ``noise:<m>/<metric>``: the same with noise on ``m`` (``data.perturb.add_noise``; level
  ``eval.noise``, seeded).

Probes and prototypes always come from the clean training split: the question is how well
a model trained on complete data holds up when a modality goes missing or noisy at test time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from modalign.core.types import Batch
from modalign.data.perturb import add_noise, remove_modality
from modalign.eval.embed import EmbeddingSet
from modalign.eval.report import evaluate_embeddings

#: Name of the fused representation in an ``EmbeddingSet``.
FUSED = "fused"


class WithFused:
    """An ``Embedder`` returning a method's per-modality embeddings plus ``fused`` (when it fuses).

    Args:
        method: Anything with ``embed(batch, fused=True)`` (``modalign.methods.Method``) and
            ``modalities``; ``eval``/``train`` are passed through.
    """

    def __init__(self, method: Any) -> None:
        self.method = method

    @property
    def modalities(self) -> tuple[str, ...]:
        """The method's modalities."""
        return tuple(self.method.modalities)

    @property
    def training(self) -> bool:
        """The method's training flag."""
        return bool(self.method.training)

    def eval(self) -> WithFused:
        """Switch the method to eval mode."""
        self.method.eval()
        return self

    def train(self, mode: bool = True) -> WithFused:
        """Restore the method's training flag."""
        self.method.train(mode)
        return self

    def embed(self, batch: Batch) -> dict[str, Tensor]:
        """``{modality: Tensor[B, E]}`` and, for a fusing model, ``fused: Tensor[B, D_f]``."""
        out: dict[str, Tensor] = self.method.embed(batch, fused=True)
        return out


def split_fused(emb: EmbeddingSet) -> tuple[EmbeddingSet, EmbeddingSet | None]:
    """``(per-modality set, fused-only set or None)`` of an ``EmbeddingSet`` embedded ``WithFused``."""
    if FUSED not in emb.embeddings:
        return emb, None
    per = {m: e for m, e in emb.embeddings.items() if m != FUSED}
    rest = EmbeddingSet(
        per,
        {m: emb.present[m] for m in per},
        emb.ids,
        emb.labels,
        {m: c for m, c in emb.content_ids.items() if m in per},
    )
    fused = EmbeddingSet({FUSED: emb.embeddings[FUSED]}, {FUSED: emb.present[FUSED]}, emb.ids, emb.labels)
    return rest, fused


def evaluate_with_fused(
    train: EmbeddingSet | None, test: EmbeddingSet, label: str | None, **kwargs: Any
) -> dict[str, float]:
    """``evaluate_embeddings`` of the modalities, plus the single-set metrics of ``fused/...``.

    The fused representation is never paired with a modality (it contains them), so it gets
    probe, kNN and clustering metrics only.
    """
    test_m, test_f = split_fused(test)
    train_m, train_f = split_fused(train) if train is not None else (None, None)
    metrics = evaluate_embeddings(train_m, test_m, label, **kwargs) if test_m.embeddings else {}
    if test_f is not None:
        metrics |= evaluate_embeddings(train_f, test_f, label, **kwargs)
    return metrics


def perturbations(
    modalities: Iterable[str], noise: float, seed: int = 0
) -> Iterator[tuple[str, Callable[[Batch], Batch]]]:
    """``(key prefix, batch transform)`` for each modality removed and each modality noised.

    The noise generator restarts from ``seed`` for each modality, so figures repeat exactly.
    """
    for m in sorted(modalities):
        yield f"missing:{m}", _remover(m)
    for m in sorted(modalities):
        yield f"noise:{m}", _noiser(m, noise, seed)


def _remover(m: str) -> Callable[[Batch], Batch]:
    def apply(batch: Batch) -> Batch:
        return remove_modality(batch, m) if m in batch.data else batch

    return apply


def _noiser(m: str, level: float, seed: int) -> Callable[[Batch], Batch]:
    generator = torch.Generator().manual_seed(seed)

    def apply(batch: Batch) -> Batch:
        return add_noise(batch, m, level, generator) if m in batch.data else batch

    return apply


def robustness_metrics(
    embed: Callable[[Callable[[Batch], Batch]], EmbeddingSet],
    train: EmbeddingSet | None,
    modalities: Iterable[str],
    label: str | None,
    noise: float,
    **kwargs: Any,
) -> dict[str, float]:
    """Every metric with each modality removed and with noise on each, keys prefixed.

    Args:
        embed: Embeds the test split with a batch transform applied (``WithFused`` embeddings).
        train: The clean training split's embeddings (probes, prototypes), or ``None``.
        modalities: The modalities to remove / noise in turn.
        label: Evaluation label (see ``evaluate_embeddings``).
        noise: Noise level (``add_noise``).
        **kwargs: Passed to ``evaluate_embeddings``.
    """
    out: dict[str, float] = {}
    for prefix, transform in perturbations(modalities, noise):
        test = embed(transform)
        metrics = evaluate_with_fused(train, test, label, **kwargs)
        out |= {f"{prefix}/{k}": v for k, v in metrics.items()}
    return out
