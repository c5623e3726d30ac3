"""Prototype zero-shot, linear probe and kNN on synthetic clusters with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modalign.eval import (
    EvalInputError,
    class_prototypes,
    knn_accuracy,
    knn_predict,
    linear_probe_accuracy,
    zero_shot_accuracy,
)


def blobs(n: int, classes: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around well separated random centres."""
    gen = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(100))
    y = torch.randint(0, classes, (n,), generator=gen)
    return centres[y] + noise * torch.randn(n, dim, generator=gen), y


def test_class_prototypes_are_normalised_class_means() -> None:
    emb = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, -1.0], [1.0, 1.0]])
    labels = torch.tensor([5, 5, 2, 2])
    classes, protos = class_prototypes(emb, labels)
    assert classes.tolist() == [2, 5]
    s = 2**-0.5
    # class 2: mean of (0,-1) and (s,s); class 5: mean of (1,0) and (0,1).
    expected = torch.tensor([[s, s - 1.0], [1.0, 1.0]])
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert torch.allclose(protos, expected, atol=1e-6)
    assert torch.allclose(protos.norm(dim=1), torch.ones(2))


def test_zero_shot_separable_clusters_is_perfect() -> None:
    x_a, y = blobs(300, 5, 16, noise=0.3, seed=0)
    x_b, y_b = blobs(200, 5, 16, noise=0.3, seed=1)  # "other modality" builds the prototypes
    classes, protos = class_prototypes(x_b, y_b)
    assert zero_shot_accuracy(x_a, y, protos, classes, chunk_size=7) == 1.0


def test_zero_shot_shuffled_labels_is_near_chance() -> None:
    x_a, y = blobs(2000, 5, 16, noise=0.3, seed=0)
    x_b, y_b = blobs(500, 5, 16, noise=0.3, seed=1)
    classes, protos = class_prototypes(x_b, y_b)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(2))]
    assert abs(zero_shot_accuracy(x_a, shuffled, protos, classes) - 0.2) < 0.05


def test_zero_shot_unknown_query_label_counts_wrong() -> None:
    protos = torch.eye(2)
    classes = torch.tensor([0, 1])
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert zero_shot_accuracy(query, torch.tensor([0, 1, 7]), protos, classes) == pytest.approx(2 / 3)


def test_linear_probe_and_knn_beat_chance_on_blobs() -> None:
    x_tr, y_tr = blobs(400, 4, 32, noise=1.0, seed=3)
    x_te, y_te = blobs(300, 4, 32, noise=1.0, seed=4)
    assert linear_probe_accuracy(x_tr, y_tr, x_te, y_te) > 0.95
    assert knn_accuracy(x_tr, y_tr, x_te, y_te, k=10) > 0.95


def test_linear_probe_and_knn_near_chance_on_random_labels() -> None:
    gen = torch.Generator().manual_seed(5)
    x_tr, x_te = torch.randn(400, 32, generator=gen), torch.randn(1000, 32, generator=gen)
    y_tr, y_te = torch.randint(0, 4, (400,), generator=gen), torch.randint(0, 4, (1000,), generator=gen)
    assert abs(linear_probe_accuracy(x_tr, y_tr, x_te, y_te) - 0.25) < 0.06
    assert abs(knn_accuracy(x_tr, y_tr, x_te, y_te, k=10) - 0.25) < 0.06


def test_knn_chunked_equals_unchunked() -> None:
    x_tr, y_tr = blobs(150, 6, 8, noise=4.0, seed=6)
    x_te, y_te = blobs(77, 6, 8, noise=4.0, seed=7)
    preds = [knn_predict(x_tr, y_tr, x_te, k=5, chunk_size=c) for c in (1, 7, 1000)]
    assert torch.equal(preds[0], preds[1])
    assert torch.equal(preds[0], preds[2])
    accs = {knn_accuracy(x_tr, y_tr, x_te, y_te, k=5, chunk_size=c) for c in (1, 7, 1000)}
    assert len(accs) == 1


def test_knn_matches_brute_force_majority_vote() -> None:
    x_tr, y_tr = blobs(120, 3, 6, noise=5.0, seed=8)
    x_te, _ = blobs(60, 3, 6, noise=5.0, seed=9)
    k = 7  # odd k with 3 classes can still tie (3-3-1), so break ties by summed similarity
    tr = x_tr.double().numpy() / np.linalg.norm(x_tr.double().numpy(), axis=1, keepdims=True)
    te = x_te.double().numpy() / np.linalg.norm(x_te.double().numpy(), axis=1, keepdims=True)
    sims = te @ tr.T
    expected = []
    for row in sims:
        top = np.argsort(-row)[:k]
        counts = np.bincount(y_tr.numpy()[top], minlength=3)
        sim_sums = np.bincount(y_tr.numpy()[top], weights=row[top], minlength=3)
        best = [c for c in range(3) if counts[c] == counts.max()]
        expected.append(max(best, key=lambda c: (sim_sums[c], -c)))
    assert knn_predict(x_tr, y_tr, x_te, k=k, chunk_size=8).tolist() == expected


def test_knn_vote_tie_broken_by_similarity() -> None:
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.0, -1.0]])
    labels = torch.tensor([0, 1, 1, 0])
    # The k=2 neighbours of (1, 0.05) and (1, 0.15) are train 0 (label 0) and train 2 (label 1):
    # one vote each; the more similar neighbour decides.
    assert knn_predict(train, labels, torch.tensor([[1.0, 0.05]]), k=2).tolist() == [0]
    assert knn_predict(train, labels, torch.tensor([[1.0, 0.15]]), k=2).tolist() == [1]


def test_bad_inputs_raise() -> None:
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(EvalInputError, match="at least two classes"):
        linear_probe_accuracy(x, y, x, y)
    with pytest.raises(EvalInputError, match="k: must be a positive integer"):
        knn_accuracy(x, y, x, y, k=0)
    with pytest.raises(EvalInputError, match=r"test_x: width 3"):
        knn_accuracy(x, y, torch.randn(4, 3), y[:4])
    with pytest.raises(EvalInputError, match=r"labels: expected a Tensor\[10\]"):
        class_prototypes(x, y[:5])
    with pytest.raises(EvalInputError, match="integer values"):
        class_prototypes(x, y.float())
