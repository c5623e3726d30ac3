"""Sharded embedding export round-trips to what ``embed_loader`` collects in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from modalign.core.types import Batch
from modalign.eval import EmbeddingSet, EvalInputError, embed_loader
from modalign.eval.shards import (
    INDEX_FILE,
    iter_embedding_shards,
    load_embeddings,
    save_embeddings,
    write_embedding_shards,
)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.maps = nn.ModuleDict({"x": nn.Linear(3, 4), "y": nn.Linear(2, 5)})

    def embed(self, batch: Batch) -> dict[str, Tensor]:
        assert not self.training and not torch.is_grad_enabled()
        return {m: self.maps[m](v) for m, v in batch.data.items()}


def batch(start: int, size: int, with_y: bool) -> Batch:
    gen = torch.Generator().manual_seed(start)
    data = {"x": torch.randn(size, 3, generator=gen)}
    present = {"x": torch.ones(size, dtype=torch.bool)}
    labels = {}
    if with_y:  # 'y' and the label appear only in some batches, the first not among them
        data["y"] = torch.randn(size, 2, generator=gen)
        present["y"] = torch.arange(size) % 2 == 0
        labels["digit"] = torch.arange(size) % 3
    return Batch(data=data, present=present, ids=torch.arange(start, start + size) * 7, labels=labels)


BATCHES = [batch(0, 4, False), batch(4, 3, False), batch(7, 5, True), batch(12, 1, True), batch(13, 6, False)]


def assert_same(got: EmbeddingSet, want: EmbeddingSet) -> None:
    assert torch.equal(got.ids, want.ids)
    assert set(got.embeddings) == set(want.embeddings) and set(got.labels) == set(want.labels)
    for m in want.embeddings:
        assert torch.equal(got.embeddings[m], want.embeddings[m])
        assert torch.equal(got.present[m], want.present[m])
    for k in want.labels:
        assert torch.equal(got.labels[k], want.labels[k])


@pytest.mark.parametrize("shard_size", [1, 3, 5, 19, 100])
def test_shards_round_trip(tmp_path: Path, shard_size: int) -> None:
    model = Toy()
    model.train()
    want = embed_loader(model, BATCHES)
    index = write_embedding_shards(model, BATCHES, tmp_path / "emb", shard_size)
    assert model.training  # mode restored
    meta = json.loads(index.read_text())
    sizes = [s["rows"] for s in meta["shards"]]
    assert meta["rows"] == 19 and sum(sizes) == 19
    assert sizes[:-1] == [shard_size] * (len(sizes) - 1) and 0 < sizes[-1] <= shard_size
    assert meta["modalities"] == {"x": 4, "y": 5} and meta["labels"] == ["digit"]
    shards = list(iter_embedding_shards(tmp_path / "emb"))
    assert [len(s) for s in shards] == sizes
    assert all(set(s.embeddings) == {"x", "y"} and set(s.labels) == {"digit"} for s in shards)
    assert_same(load_embeddings(tmp_path / "emb"), want)
    assert_same(load_embeddings(index), want)


def test_single_file_round_trip_and_rewrite(tmp_path: Path) -> None:
    want = embed_loader(Toy(), BATCHES)
    assert_same(load_embeddings(save_embeddings(want, tmp_path / "emb.npz")), want)
    write_embedding_shards(Toy(), BATCHES, tmp_path / "emb", 2)
    write_embedding_shards(Toy(), BATCHES, tmp_path / "emb", 10)  # stale shards are removed
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == [INDEX_FILE, "shard-00000.npz", "shard-00001.npz"]
    assert_same(load_embeddings(tmp_path / "emb"), want)


def test_shard_errors(tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match="shard_size"):
        write_embedding_shards(Toy(), BATCHES, tmp_path / "a", 0)
    with pytest.raises(EvalInputError, match="no rows"):
        write_embedding_shards(Toy(), [], tmp_path / "b", 4)
    assert not (tmp_path / "b" / INDEX_FILE).exists()
    with pytest.raises(FileNotFoundError, match="no embedding shard index"):
        load_embeddings(tmp_path / "b")
