"""Retrieval metrics against brute-force NumPy references that build the full similarity matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from modalign.eval import EvalInputError, class_match_metrics, first_positive_ranks, retrieval_metrics


def _cosine(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    return qn @ gn.T


def reference_ranks(q: np.ndarray, g: np.ndarray, qids: np.ndarray, gids: np.ndarray) -> np.ndarray:
    """Full [N, M] matrix; each row sorted by similarity, ties broken against the positives."""
    sims = _cosine(q.astype(np.float64), g.astype(np.float64))
    ranks = []
    for i in range(len(q)):
        positive = gids == qids[i]
        order = np.lexsort((positive, -sims[i]))  # primary: -sim; ties: negatives (False) first
        ranks.append(int(np.flatnonzero(positive[order])[0]) + 1)
    return np.array(ranks)


def reference_metrics(ranks: np.ndarray) -> dict[str, float]:
    return {
        "R@1": float(np.mean(ranks <= 1)),
        "R@5": float(np.mean(ranks <= 5)),
        "R@10": float(np.mean(ranks <= 10)),
        "median_rank": float(np.median(ranks)),
        "mean_rank": float(np.mean(ranks)),
    }


@pytest.fixture
def noisy_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    gallery = torch.randn(103, 16, generator=gen)
    query = gallery + 1.3 * torch.randn(103, 16, generator=gen)
    return query, gallery


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_retrieval_matches_brute_force(noisy_pairs: tuple[torch.Tensor, torch.Tensor], chunk_size: int) -> None:
    query, gallery = noisy_pairs
    ids = np.arange(len(query))
    expected = reference_metrics(reference_ranks(query.numpy(), gallery.numpy(), ids, ids))
    got = retrieval_metrics(query, gallery, chunk_size=chunk_size)
    assert got == pytest.approx(expected, abs=1e-12)
    # Not trivially perfect nor trivially hopeless, so the comparison means something.
    assert 0.05 < got["R@1"] < 0.95
    assert all(isinstance(v, float) for v in got.values())


def test_chunk_sizes_give_identical_ranks(noisy_pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
    query, gallery = noisy_pairs
    ranks = [first_positive_ranks(query, gallery, chunk_size=c) for c in (1, 7, 500)]
    assert torch.equal(ranks[0], ranks[1])
    assert torch.equal(ranks[0], ranks[2])


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_retrieval_with_ids_matches_brute_force(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(1)
    gallery = torch.randn(60, 8, generator=gen)
    gallery_ids = torch.arange(60) // 3  # three gallery items per id (e.g. captions of one image)
    query_ids = torch.arange(20)
    query = gallery[::3] + 0.8 * torch.randn(20, 8, generator=gen)
    expected = reference_metrics(
        reference_ranks(query.numpy(), gallery.numpy(), query_ids.numpy(), gallery_ids.numpy())
    )
    got = retrieval_metrics(query, gallery, query_ids, gallery_ids, chunk_size=chunk_size)
    assert got == pytest.approx(expected, abs=1e-12)


def test_perfect_embeddings_rank_first() -> None:
    x = torch.randn(50, 12, generator=torch.Generator().manual_seed(2))
    got = retrieval_metrics(x, 3.0 * x, chunk_size=7)  # scale does not matter: cosine
    assert got["R@1"] == 1.0
    assert got["median_rank"] == 1.0
    assert got["mean_rank"] == 1.0


def test_hand_made_case_with_pessimistic_tie() -> None:
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    query = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    # q0: positive g0 has similarity 0; g1 (1), g2 (0.71) are above and g3 ties at 0 -> rank 4.
    # q1: g1 is exact -> 1.  q2: positive g2 (0.71) is beaten by g0 (1) -> 2.  q3: exact -> 1.
    ranks = first_positive_ranks(query, gallery, chunk_size=3)
    assert ranks.tolist() == [4, 1, 2, 1]
    got = retrieval_metrics(query, gallery)
    assert got == {"R@1": 0.5, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.5, "mean_rank": 2.0}


def test_constant_embedder_gets_worst_rank() -> None:
    ones = torch.ones(10, 4)
    got = retrieval_metrics(ones, ones)
    assert got["R@1"] == 0.0
    assert got["median_rank"] == 10.0


def test_bad_inputs_raise_named_errors() -> None:
    x = torch.randn(5, 4)
    with pytest.raises(EvalInputError, match="query has 5 rows but gallery has 6"):
        retrieval_metrics(x, torch.randn(6, 4))
    with pytest.raises(EvalInputError, match="gallery: width 3"):
        retrieval_metrics(x, torch.randn(5, 3))
    with pytest.raises(EvalInputError, match="given together"):
        retrieval_metrics(x, x, query_ids=torch.arange(5))
    with pytest.raises(EvalInputError, match=r"query row 4 \(id 9\) has no positive"):
        retrieval_metrics(x, x, torch.tensor([0, 1, 2, 3, 9]), torch.arange(5))
    with pytest.raises(EvalInputError, match="query: contains NaN"):
        retrieval_metrics(torch.full((5, 4), float("nan")), x)
    with pytest.raises(EvalInputError, match="chunk_size"):
        retrieval_metrics(x, x, chunk_size=0)


def reference_class_match(q: np.ndarray, g: np.ndarray, ql: np.ndarray, gl: np.ndarray) -> dict[str, float]:
    sims = _cosine(q, g)
    p1, aps = [], []
    for i in range(len(q)):
        relevant = gl == ql[i]
        if not relevant.any():
            continue
        p1.append(float(relevant[np.argmax(sims[i])]))
        aps.append(average_precision_score(relevant, sims[i]))
    return {"p@1": float(np.mean(p1)), "mAP": float(np.mean(aps))}


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_class_match_matches_sklearn(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 10, generator=gen)
    gl = torch.randint(0, 4, (90,), generator=gen)
    ql = torch.randint(0, 5, (41,), generator=gen)  # label 4 never occurs in the gallery
    gallery = centres[gl] + 1.5 * torch.randn(90, 10, generator=gen)
    query = centres[ql.clamp(max=3)] + 1.5 * torch.randn(41, 10, generator=gen)
    expected = reference_class_match(query.double().numpy(), gallery.double().numpy(), ql.numpy(), gl.numpy())
    got = class_match_metrics(query, gallery, ql, gl, chunk_size=chunk_size)
    assert got["p@1"] == pytest.approx(expected["p@1"], abs=1e-12)
    assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert 0.3 < got["mAP"] < 0.99


def test_class_match_ties_grouped_like_sklearn() -> None:
    # Rows are signed basis vectors, so similarities are exactly -1, 0 or 1 with many ties.
    gen = torch.Generator().manual_seed(4)
    basis = torch.cat([torch.eye(3), -torch.eye(3)])
    g_idx, q_idx = torch.randint(0, 6, (40,), generator=gen), torch.randint(0, 6, (15,), generator=gen)
    gl, ql = torch.randint(0, 3, (40,), generator=gen), torch.randint(0, 3, (15,), generator=gen)
    gallery, query = basis[g_idx], basis[q_idx]
    expected = reference_class_match(query.numpy(), gallery.numpy(), ql.numpy(), gl.numpy())
    got = class_match_metrics(query, gallery, ql, gl, chunk_size=4)
    assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-9)


def test_class_match_pessimistic_p1_and_perfect_case() -> None:
    x = torch.eye(4)
    labels = torch.tensor([0, 0, 1, 1])
    assert class_match_metrics(x, x, labels, labels) == {"p@1": 1.0, "mAP": pytest.approx(0.75)}
    # A constant embedder ties everything: p@1 counts no hit; AP = class frequency (0.5).
    ones = torch.ones(4, 3)
    assert class_match_metrics(ones, ones, labels, labels) == {"p@1": 0.0, "mAP": 0.5}
    with pytest.raises(EvalInputError, match="no query label occurs"):
        class_match_metrics(x, x, labels + 5, labels)
