"""The flat metrics report, its JSON file and table, embedding a loader, and the gap metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from modalign.core import Batch, Embedder
from modalign.eval import (
    EmbeddingSet,
    EvalInputError,
    alignment_uniformity,
    embed_loader,
    evaluate_embeddings,
    format_table,
    modality_gap,
    retrieval_metrics,
    write_eval_json,
)

PAIR_RETRIEVAL = ("R@1", "R@5", "R@10", "median_rank")


def make_set(n: int, seed: int, noise: float = 0.5, classes: int = 4) -> EmbeddingSet:
    """Two modalities sharing class structure and per-sample content."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(classes, 8, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, classes, (n,), generator=gen)
    content = centres[y] + torch.randn(n, 8, generator=gen)
    return EmbeddingSet(
        embeddings={
            "text": content + noise * torch.randn(n, 8, generator=gen),
            "image": content + noise * torch.randn(n, 8, generator=gen),
        },
        present={"image": torch.ones(n, dtype=torch.bool), "text": torch.ones(n, dtype=torch.bool)},
        ids=torch.arange(seed * 1000, seed * 1000 + n),
        labels={"digit": y},
    )


def expected_keys(label: bool, train: bool, probe: bool = True) -> set[str]:
    keys = {f"{a}->{b}/{m}" for a, b in (("image", "text"), ("text", "image")) for m in PAIR_RETRIEVAL}
    keys.add("image|text/modality_gap")
    if label:
        keys |= {
            f"{a}->{b}/{m}" for a, b in (("image", "text"), ("text", "image")) for m in ("p@1", "mAP", "zero_shot")
        }
        keys |= {f"{m}/{s}" for m in ("image", "text") for s in ("nmi", "ari")}  # k-means clustering
    if label and train:
        keys |= {f"{m}/knn" for m in ("image", "text")}
        if probe:
            keys |= {f"{m}/linear_probe" for m in ("image", "text")}
    return keys


def test_keys_without_label() -> None:
    metrics = evaluate_embeddings(None, make_set(80, 1), label=None, chunk_size=16)
    assert set(metrics) == expected_keys(label=False, train=False)
    assert all(type(v) is float for v in metrics.values())
    assert metrics["image->text/R@1"] > 0.5  # paired content is retrievable


def test_keys_with_label_and_train() -> None:
    train, test = make_set(200, 2), make_set(80, 3)
    metrics = evaluate_embeddings(train, test, label="digit", chunk_size=16, knn_k=5)
    assert set(metrics) == expected_keys(label=True, train=True)
    assert all(type(v) is float for v in metrics.values())
    for key in ("image/knn", "image/linear_probe", "image->text/zero_shot", "text->image/p@1"):
        assert metrics[key] > 0.9, key
    no_probe = evaluate_embeddings(train, test, label="digit", probe=False)
    assert set(no_probe) == expected_keys(label=True, train=True, probe=False)


def test_keys_with_label_without_train() -> None:
    metrics = evaluate_embeddings(None, make_set(80, 4), label="digit")
    assert set(metrics) == expected_keys(label=True, train=False)


def test_zero_shot_prototypes_come_from_train_when_given() -> None:
    test = make_set(60, 5)
    train = make_set(100, 6)
    # Relabel the train set: class c -> (c + 1) % 4. Train prototypes then name the wrong class.
    train.labels["digit"] = (train.labels["digit"] + 1) % 4
    with_train = evaluate_embeddings(train, test, label="digit", probe=False)
    without = evaluate_embeddings(None, test, label="digit")
    assert without["image->text/zero_shot"] > 0.9
    assert with_train["image->text/zero_shot"] < 0.1


def test_partially_present_rows_are_excluded() -> None:
    es = make_set(90, 7, noise=0.05)
    missing = torch.arange(90) % 3 == 0
    es.present["text"] = ~missing
    # Rows without text hold a copy of another row's text: included, they would break retrieval.
    es.embeddings["text"][missing] = es.embeddings["text"][1].clone()
    es.labels["digit"][torch.arange(90) % 5 == 0] = -1  # unknown labels are left out too
    metrics = evaluate_embeddings(None, es, label="digit", chunk_size=8)
    rows = ~missing
    direct = retrieval_metrics(es.embeddings["image"][rows], es.embeddings["text"][rows])
    for m in PAIR_RETRIEVAL:
        assert metrics[f"image->text/{m}"] == direct[m]
    assert metrics["image->text/R@1"] == 1.0
    sub = evaluate_embeddings(None, es.subset(rows & (es.labels["digit"] >= 0)), label="digit")
    assert metrics["image->text/mAP"] == pytest.approx(sub["image->text/mAP"])


def test_pair_without_co_present_rows_gets_no_keys() -> None:
    es = make_set(40, 8)
    es.embeddings["audio"] = torch.randn(40, 8)
    es.present["audio"] = torch.arange(40) < 10
    es.present["text"] = torch.arange(40) >= 10  # audio and text never co-occur
    metrics = evaluate_embeddings(None, es, label=None)
    assert not any(k.startswith(("audio->text", "text->audio", "audio|text")) for k in metrics)
    assert "audio->image/R@1" in metrics
    assert "audio|image/modality_gap" in metrics


def test_missing_label_raises() -> None:
    with pytest.raises(EvalInputError, match="test set has no label 'speaker'; available: \\['digit'\\]"):
        evaluate_embeddings(None, make_set(10, 9), label="speaker")


def test_write_eval_json_round_trip(tmp_path: Path) -> None:
    metrics = evaluate_embeddings(None, make_set(30, 10), label="digit")
    path = write_eval_json(metrics, tmp_path / "run" / "eval.json")
    loaded = json.loads(path.read_text())
    assert loaded == metrics
    assert list(loaded) == sorted(loaded)
    assert all(isinstance(v, float) for v in loaded.values())  # flat: no nesting
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temporary file left
    with pytest.raises(EvalInputError, match="metric 'x': value nan"):
        write_eval_json({"x": math.nan}, tmp_path / "bad.json")
    with pytest.raises(EvalInputError, match="metric 'nested'"):
        write_eval_json({"nested": {"a": 1.0}}, tmp_path / "bad.json")  # type: ignore[dict-item]
    assert not (tmp_path / "bad.json").exists()


def test_format_table_groups_rows() -> None:
    metrics = {
        "image->text/R@1": 0.5,
        "image->text/median_rank": 2.0,
        "text->image/R@1": 0.25,
        "text->image/median_rank": 3.0,
        "image/knn": 0.875,
        "image|text/modality_gap": 0.123456,
    }
    table = format_table(metrics)
    lines = table.splitlines()
    header = next(line for line in lines if "R@1" in line)
    assert header.index("R@1") < header.index("median_rank")
    assert any(line.startswith("image->text") and "0.5000" in line and "2.0000" in line for line in lines)
    assert any(line.startswith("image|text") and "0.1235" in line for line in lines)
    assert any(line.startswith("image ") and "0.8750" in line for line in lines)
    assert format_table({}) == ""


def test_modality_gap_known_values() -> None:
    x = torch.randn(20, 5)
    assert modality_gap(x, x.clone()) == pytest.approx(0.0, abs=1e-7)
    e1 = torch.zeros(30, 5)
    e1[:, 0] = 1.0
    assert modality_gap(e1 + 0.0, -3.0 * e1[:7]) == pytest.approx(2.0)
    with pytest.raises(EvalInputError, match="b: width 4"):
        modality_gap(x, torch.randn(3, 4))


def test_alignment_uniformity_matches_formula() -> None:
    gen = torch.Generator().manual_seed(11)
    a, b = torch.randn(50, 6, generator=gen), torch.randn(50, 6, generator=gen)
    an, bn = (a / a.norm(dim=1, keepdim=True)).double(), (b / b.norm(dim=1, keepdim=True)).double()

    def uniformity(x: Tensor) -> float:
        d2 = torch.cdist(x, x).pow(2)
        iu = torch.triu_indices(len(x), len(x), offset=1)
        return float(torch.exp(-2 * d2[iu[0], iu[1]]).mean().log())

    got = alignment_uniformity(a, b)
    assert got["alignment"] == pytest.approx(float((an - bn).norm(dim=1).pow(2).mean()))
    assert got["uniformity"] == pytest.approx((uniformity(an) + uniformity(bn)) / 2)
    assert alignment_uniformity(a, a)["alignment"] == pytest.approx(0.0, abs=1e-9)
    sub = alignment_uniformity(a, b, max_rows=10, seed=3)
    assert sub == alignment_uniformity(a, b, max_rows=10, seed=3)
    assert sub != got


class ToyEmbedder(nn.Module):
    """Embeds 'x' and 'y' by two linear maps; only 'x' when 'y' is absent from the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.maps = nn.ModuleDict({"x": nn.Linear(3, 4), "y": nn.Linear(2, 4)})
        self.modes: list[bool] = []

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("x", "y")

    def embed(self, batch: Batch) -> dict[str, Tensor]:
        self.modes.append(self.training)
        assert not torch.is_grad_enabled()
        out = {m: self.maps[m](batch.data[m]) for m in self.modalities if m in batch.data}
        return {m: v / v.norm(dim=1, keepdim=True) for m, v in out.items()}


def make_batch(start: int, size: int, with_y: bool) -> Batch:
    data = {"x": torch.randn(size, 3)}
    present = {"x": torch.ones(size, dtype=torch.bool)}
    if with_y:
        data["y"] = torch.randn(size, 2)
        present["y"] = torch.arange(size) % 2 == 0
    labels = {"digit": torch.arange(size)} if with_y else {}
    return Batch(data=data, present=present, ids=torch.arange(start, start + size), labels=labels)


def test_embed_loader_collects_rows_and_restores_mode() -> None:
    embedder = ToyEmbedder()
    assert isinstance(embedder, Embedder)
    embedder.train()
    batches = [make_batch(0, 4, True), make_batch(4, 3, False), make_batch(7, 5, True)]
    es = embed_loader(embedder, batches)
    assert embedder.training and embedder.modes == [False, False, False]
    assert es.ids.tolist() == list(range(12))
    assert es.embeddings["x"].shape == (12, 4) and es.embeddings["y"].shape == (12, 4)
    assert es.embeddings["x"].dtype == torch.float32 and not es.embeddings["x"].requires_grad
    assert es.present["y"].tolist() == [True, False, True, False] + [False] * 3 + [
        True,
        False,
        True,
        False,
        True,
    ]
    assert es.labels["digit"].tolist() == [0, 1, 2, 3, -1, -1, -1, 0, 1, 2, 3, 4]
    with torch.no_grad():
        expected_x = torch.cat([embedder.embed(b)["x"] for b in batches])
        expected_y = embedder.embed(batches[2])["y"]
    assert torch.allclose(es.embeddings["x"], expected_x)
    assert torch.allclose(es.embeddings["y"][7:], expected_y)
    assert torch.equal(es.embeddings["y"][4:7], torch.zeros(3, 4))  # batch without 'y': zero-filled
    assert es.subset(es.present["y"]).ids.tolist() == [0, 2, 7, 9, 11]


def test_embed_loader_errors() -> None:
    with pytest.raises(EvalInputError, match="no batches"):
        embed_loader(ToyEmbedder(), [])

    class Bad(ToyEmbedder):
        def embed(self, batch: Batch) -> dict[str, Tensor]:
            return {"x": torch.zeros(batch.size + 1, 4)}

    bad = Bad()
    bad.train()
    with pytest.raises(EvalInputError, match=r"embedder returned \(5, 4\) for modality 'x'; expected \[4, E\]"):
        embed_loader(bad, [make_batch(0, 4, True)])
    assert bad.training  # restored even on error


class _NearestCentre:
    """A clustering objective stand-in: nearest of fixed centres, optionally not fitted yet."""

    def __init__(self, centres: Tensor, fitted: bool = True) -> None:
        self.centres, self.fitted, self.seen = centres, fitted, []

    def cluster_assignments(self, embeddings: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.fitted:
            raise ValueError("not fitted")
        self.seen.append({m: len(x) for m, x in embeddings.items()})
        return {m: torch.cdist(x, self.centres).argmin(dim=1) for m, x in embeddings.items()}


def test_own_cluster_metrics_score_each_clustering_objective_on_labelled_rows() -> None:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from modalign.eval import own_cluster_metrics

    test = make_set(120, seed=5, noise=0.2)
    test.labels["digit"][:10] = -1  # unknown labels are left out
    test.present["text"][10:20] = False  # absent rows are left out too
    centres = 3.0 * torch.randn(4, 8, generator=torch.Generator().manual_seed(99))
    good, unfitted = _NearestCentre(centres), _NearestCentre(centres, fitted=False)
    got = own_cluster_metrics({"xdc": good, "infonce": object(), "late": unfitted}, test, "digit")
    assert set(got) == {"xdc/image/nmi", "xdc/image/ari", "xdc/text/nmi", "xdc/text/ari"}
    assert good.seen == [{"image": 110}, {"text": 100}]
    for m in ("image", "text"):
        rows = (test.labels["digit"] >= 0) & test.present[m]
        pred = torch.cdist(test.embeddings[m][rows], centres).argmin(dim=1).numpy()
        y = test.labels["digit"][rows].numpy()
        assert got[f"xdc/{m}/nmi"] == pytest.approx(normalized_mutual_info_score(y, pred))
        assert got[f"xdc/{m}/ari"] == pytest.approx(adjusted_rand_score(y, pred))
    assert got["xdc/image/nmi"] > 0.8  # the centres are the class centres
