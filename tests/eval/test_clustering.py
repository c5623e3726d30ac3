"""k-means NMI/ARI: against a direct NumPy reference, sklearn, invariances and the report keys."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from modalign.eval import (
    EmbeddingSet,
    EvalInputError,
    cluster_scores,
    evaluate_embeddings,
    kmeans_assignments,
    kmeans_scores,
)


def reference_scores(pred: list[int], true: list[int]) -> dict[str, float]:
    """NMI (arithmetic normaliser) and ARI from the contingency table, in float64 loops."""
    n = len(true)
    cells = Counter(zip(true, pred, strict=True))
    rows, cols = Counter(true), Counter(pred)

    def entropy(counts: Counter[int]) -> float:
        return -sum(c / n * math.log(c / n) for c in counts.values())

    mi = sum(c / n * math.log(c * n / (rows[t] * cols[p])) for (t, p), c in cells.items())
    h_true, h_pred = entropy(rows), entropy(cols)
    nmi = 1.0 if h_true == h_pred == 0 else mi / ((h_true + h_pred) / 2)
    pairs = sum(math.comb(c, 2) for c in cells.values())
    a, b = sum(math.comb(c, 2) for c in rows.values()), sum(math.comb(c, 2) for c in cols.values())
    expected = a * b / math.comb(n, 2) if n > 1 else 0.0
    top = (a + b) / 2
    ari = 1.0 if top == expected else (pairs - expected) / (top - expected)
    return {"nmi": nmi, "ari": ari}


def blobs(n: int, classes: int, seed: int, noise: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Points around ``classes`` orthogonal directions (well separated after L2 normalisation)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    return torch.eye(classes, 8)[y] * 3 + noise * torch.randn(n, 8, generator=gen), y


def test_hand_computed_example() -> None:
    # contingency [[2, 0], [1, 1]]: sum C(n_ij, 2) = 1 = (2 * 3) / 6, the expected index -> ARI 0.
    got = cluster_scores(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1]))
    assert got["ari"] == pytest.approx(0.0, abs=1e-12)
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_pred = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert got["nmi"] == pytest.approx(mi / ((math.log(2) + h_pred) / 2), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(-1, 3)), min_size=2, max_size=40).filter(
        lambda rows: any(t >= 0 for _, t in rows)
    )
)
def test_matches_reference_and_sklearn(rows: list[tuple[int, int]]) -> None:
    pred = torch.tensor([p for p, _ in rows])
    true = torch.tensor([t for _, t in rows])
    got = cluster_scores(pred, true)
    known = [(p, t) for p, t in rows if t >= 0]  # unknown labels are left out
    ref = reference_scores([p for p, _ in known], [t for _, t in known])
    assert got["nmi"] == pytest.approx(ref["nmi"], abs=1e-9)
    assert got["ari"] == pytest.approx(ref["ari"], abs=1e-9)
    kp, kt = [p for p, _ in known], [t for _, t in known]
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(kt, kp), abs=1e-12)
    assert got["ari"] == pytest.approx(adjusted_rand_score(kt, kp), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=30), st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
def test_renaming_cluster_ids_changes_nothing(true: list[int], seed: int, perm_seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, 4, (len(true),), generator=gen)
    y = torch.tensor(true)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(perm_seed)) * 7 - 3  # any integer ids
    base = cluster_scores(pred, y)
    renamed = cluster_scores(perm[pred], y)
    assert renamed["nmi"] == pytest.approx(base["nmi"], abs=1e-12)
    assert renamed["ari"] == pytest.approx(base["ari"], abs=1e-12)
    perfect = cluster_scores(perm[y % 4], y % 4)
    assert perfect == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}


def test_random_assignments_score_near_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (20000,), generator=gen)
    pred = torch.randint(0, 5, (20000,), generator=gen)
    got = cluster_scores(pred, y)
    assert abs(got["ari"]) < 0.005 and got["nmi"] < 0.005
    assert cluster_scores(y.flip(0), y)["ari"] < 0.01  # unrelated partition of the same sizes


def test_kmeans_recovers_separated_blobs_and_matches_sklearn() -> None:
    x, y = blobs(300, 5, seed=1)
    assert kmeans_scores(x, y) == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}
    ids = kmeans_assignments(x, 5, seed=3, n_init=4)
    xn = (x / x.norm(dim=1, keepdim=True)).double().numpy()
    direct = KMeans(n_clusters=5, n_init=4, random_state=3).fit(xn).labels_
    assert ids.dtype == torch.long and ids.tolist() == direct.tolist()
    assert torch.equal(kmeans_assignments(x, 5, seed=3, n_init=4), ids)  # deterministic
    # scale of a row does not matter: clustering runs on the L2-normalised rows
    assert torch.equal(kmeans_assignments(x * (0.5 + 10 * torch.rand(300, 1)), 5, seed=3, n_init=4), ids)


def test_kmeans_scores_on_noise_near_zero_and_drop_unknown_labels() -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(600, 8, generator=gen), torch.randint(0, 4, (600,), generator=gen)
    got = kmeans_scores(x, y)
    assert abs(got["ari"]) < 0.02 and got["nmi"] < 0.02
    xb, yb = blobs(120, 3, seed=4)
    y_missing = yb.clone()
    y_missing[::4] = -1
    xb[::4] = torch.randn(30, 8, generator=gen) * 5  # garbage rows whose label is unknown
    assert kmeans_scores(xb, y_missing) == kmeans_scores(xb[y_missing >= 0], yb[y_missing >= 0])
    assert kmeans_scores(xb, y_missing)["ari"] == pytest.approx(1.0)


def test_errors() -> None:
    with pytest.raises(EvalInputError, match=r"labels: expected a Tensor\[3\]"):
        cluster_scores(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(EvalInputError, match="assignments: expected integer values"):
        cluster_scores(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(EvalInputError, match=r"assignments: expected a LongTensor\[N\], got \(2, 1\)"):
        cluster_scores(torch.zeros(2, 1, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(EvalInputError, match="none of the 2 rows has a known"):
        cluster_scores(torch.tensor([0, 1]), torch.tensor([-1, -1]))
    with pytest.raises(EvalInputError, match="none of the 2 rows has a known"):
        kmeans_scores(torch.randn(2, 3), torch.tensor([-1, -1]))
    with pytest.raises(EvalInputError, match=r"k: must lie in \[1, 4\]"):
        kmeans_assignments(torch.randn(4, 3), 5)
    with pytest.raises(EvalInputError, match="emb: contains NaN"):
        kmeans_assignments(torch.full((4, 3), math.nan), 2)


def labelled_set(n: int, seed: int) -> EmbeddingSet:
    """Two modalities with the same 3-class structure; ``text`` is missing on every 3rd row."""
    x, y = blobs(n, 3, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    text = x + 0.1 * torch.randn(n, 8, generator=gen)
    missing = torch.arange(n) % 3 == 0
    # absent rows hold a copy of one point: clustered with the rest they would form no class
    text[missing] = torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 5.0])
    return EmbeddingSet(
        embeddings={"image": x, "text": text},
        present={"image": torch.ones(n, dtype=torch.bool), "text": ~missing},
        ids=torch.arange(n),
        labels={"class": y, "none": torch.full((n,), -1)},
    )


def test_report_clusters_only_present_labelled_rows() -> None:
    es = labelled_set(90, seed=5)
    es.labels["class"][torch.arange(90) % 7 == 0] = -1
    metrics = evaluate_embeddings(None, es, label="class", chunk_size=16, seed=0)
    rows = es.present["text"] & (es.labels["class"] >= 0)
    direct = kmeans_scores(es.embeddings["text"][rows], es.labels["class"][rows], seed=0)
    assert metrics["text/nmi"] == direct["nmi"] and metrics["text/ari"] == direct["ari"]
    assert metrics["text/ari"] == pytest.approx(1.0) and metrics["image/ari"] == pytest.approx(1.0)
    known = es.labels["class"] >= 0
    with_absent = kmeans_scores(es.embeddings["text"][known], es.labels["class"][known], seed=0)
    assert with_absent["ari"] < 0.99  # the check above could fail if absent rows were included
    assert "image/nmi" in metrics and "image/ari" in metrics


def test_report_keys_need_a_label_and_labelled_rows() -> None:
    es = labelled_set(30, seed=6)
    without = evaluate_embeddings(None, es, label=None)
    assert not any(k.endswith(("/nmi", "/ari")) for k in without)
    no_known = evaluate_embeddings(None, es, label="none")
    assert not any(k.endswith(("/nmi", "/ari")) for k in no_known)
    es.labels["class"][es.present["text"]] = -1  # text present only on unlabelled rows
    partial = evaluate_embeddings(None, es, label="class")
    assert "image/nmi" in partial and "text/nmi" not in partial and "text/ari" not in partial
    assert np.isfinite(partial["image/ari"])
