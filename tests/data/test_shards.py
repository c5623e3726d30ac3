"""WebDataset shards: writing and reading back, the epoch order over ranks and workers, the resume
position against the real DataLoader, and errors that name the shard."""

from __future__ import annotations

import itertools
import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from modalign.core.errors import ConfigError, DataError
from modalign.core.types import ModalitySpec, Sample
from modalign.data.base import MultimodalDataset
from modalign.data.shards import (
    ShardStream,
    StreamEpoch,
    interleave_skips,
    rank_samples,
    read_index,
    shuffled,
    stream_batches,
    stream_samples,
    verify_shards,
    write_shards,
)


class Toy(MultimodalDataset):
    """Image, variable-length text (absent in every 5th sample), a vector; labels and modality ids."""

    def __init__(self, n: int) -> None:
        self.n = n

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {
            "image": ModalitySpec("image", channels=1, size=4),
            "text": ModalitySpec("text", vocab_size=50),
            "vec": ModalitySpec("vector", channels=3),
        }

    @property
    def label_names(self) -> tuple[str, ...]:
        return ("cls",)

    def artifacts(self) -> dict[str, str]:
        return {"tokenizer.json": '{"vocab": 50}'}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Sample:
        g = torch.Generator().manual_seed(index)
        values = {"image": torch.rand(1, 4, 4, generator=g), "vec": torch.randn(3, generator=g)}
        if index % 5:
            values["text"] = torch.randint(1, 50, (1 + index % 7,), generator=g)
        return Sample(id=1000 + index, values=values, labels={"cls": index % 3}, modality_ids={"vec": index // 2})


def same(a: Sample, b: Sample) -> bool:
    return (
        a.id == b.id
        and a.labels == b.labels
        and a.modality_ids == b.modality_ids
        and sorted(a.values) == sorted(b.values)
        and all(a.values[k].dtype == b.values[k].dtype and torch.equal(a.values[k], b.values[k]) for k in a.values)
    )


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    write_shards(Toy(48), tmp_path / "s", shard_size=6, source={"data": {"name": "toy"}})
    return tmp_path / "s"


def ids(samples: object) -> list[int]:
    return [s.id for s in samples]  # type: ignore[attr-defined]


def test_round_trip_keeps_every_value_dtype_label_and_id(shards: Path) -> None:
    index = read_index(shards)
    assert [s.count for s in index.shards] == [6] * 8 and index.count == 48
    assert index.modalities == Toy(1).modalities and index.label_names == ("cls",)
    assert index.artifacts == {"tokenizer.json": '{"vocab": 50}'} and index.source == {"data": {"name": "toy"}}
    assert read_index(shards / "index.json").count == 48
    stream = ShardStream(index)
    got = list(stream.samples())
    assert len(got) == len(stream) == 48
    assert all(same(g, Toy(48)[i]) for i, g in enumerate(got))
    assert verify_shards(index) == []


def test_a_last_short_shard_and_the_webdataset_layout(tmp_path: Path) -> None:
    import tarfile

    index = write_shards(Toy(10), tmp_path, shard_size=4)
    assert [s.count for s in index.shards] == [4, 4, 2]
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["000000000.image.npy", "000000000.meta.json", "000000000.vec.npy"]  # no text in sample 0
    assert "000000001.text.npy" in names and "000000000.text.npy" not in names
    assert not list(tmp_path.glob(".*"))  # no temporary file left


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_gives_every_sample_once_over_ranks_and_workers(shards: Path, world: int, workers: int) -> None:
    stream = ShardStream(read_index(shards), shuffle_buffer=10)
    seen: list[int] = []
    for r in range(world):
        seen += ids(stream_samples(stream.with_epoch(StreamEpoch(seed=7, rank=r, world=world)), workers))
    assert sorted(seen) == [1000 + i for i in range(48)]
    again = ids(stream_samples(stream.with_epoch(StreamEpoch(seed=7, rank=0, world=world)), workers))
    assert again == seen[: len(again)]  # a function of the seed, rank and worker count only
    other = ids(stream_samples(stream.with_epoch(StreamEpoch(seed=8, rank=0, world=world)), workers))
    assert other != again


@pytest.mark.parametrize(("workers", "chunk"), [(0, 1), (2, 1), (2, 3), (2, 32)])
def test_a_stream_resumed_at_any_position_continues_exactly(tmp_path: Path, workers: int, chunk: int) -> None:
    index = write_shards(Toy(45), tmp_path, shard_size=4)  # 12 shards, the last of 1: workers run out unevenly
    stream = ShardStream(index, shuffle_buffer=5)
    epoch = StreamEpoch(seed=3, rank=1, world=2)
    full = ids(stream_samples(stream.with_epoch(epoch), workers, chunk))
    for consumed in (0, 1, 2, 5, 11, len(full) - 1, len(full)):
        rest = stream.with_epoch(StreamEpoch(seed=3, rank=1, world=2, consumed=consumed))
        assert ids(stream_samples(rest, workers, chunk)) == full[consumed:], consumed


class Counted(IterableDataset[list[tuple[int, int]]]):
    """Worker ``w`` hands over ``(w, k)`` for its ``counts[w]`` samples, ``chunk`` at a time."""

    def __init__(self, counts: list[int], chunk: int) -> None:
        self.counts, self.chunk = counts, chunk

    def __iter__(self):  # type: ignore[no-untyped-def]
        info = get_worker_info()
        assert info is not None
        n = self.counts[info.id]
        return ([(info.id, k) for k in range(s, min(s + self.chunk, n))] for s in range(0, n, self.chunk))


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("counts", [[1, 3], [5, 2, 7], [0, 4], [3, 3, 1], [4, 0, 2], [8, 8]])
def test_interleave_skips_follow_the_real_dataloader(counts: list[int], chunk: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # more workers than this machine's cores
        chunks = list(DataLoader(Counted(counts, chunk), batch_size=None, num_workers=len(counts)))
    order = [(int(w), int(k)) for c in chunks for w, k in c]
    for consumed in range(sum(counts) + 1):
        prefix = order[:consumed]
        want = [sum(w == j for w, _ in prefix) for j in range(len(counts))]
        assert interleave_skips(counts, consumed, chunk) == want, consumed
    with pytest.raises(ValueError):
        interleave_skips(counts, sum(counts) + 1, chunk)


def test_rank_samples_is_the_fewest_any_rank_gets() -> None:
    rng = random.Random(0)
    for _ in range(20):
        counts = [rng.randint(1, 9) for _ in range(rng.randint(2, 7))]
        for world in range(1, len(counts) + 1):
            worst = min(
                sum(perm[r::world][i] for i in range(len(perm[r::world])))
                for perm in itertools.permutations(counts)
                for r in range(world)
            )
            assert rank_samples(counts, world) == worst
    with pytest.raises(ConfigError, match="3 shards cannot be split over 4 ranks"):
        rank_samples([1, 2, 3], 4)


def test_shuffle_buffer_permutes_and_a_buffer_of_one_keeps_order() -> None:
    items = [{"k": i} for i in range(50)]
    out = list(shuffled(iter(items), 8, random.Random(1)))
    assert sorted(x["k"] for x in out) == list(range(50)) and out != items
    assert list(shuffled(iter(items), 1, random.Random(1))) == items


def test_batches_collate_in_the_main_process_and_a_short_stream_is_an_error(shards: Path) -> None:
    stream = ShardStream(read_index(shards))
    batches = list(stream_batches(stream.samples(), 10, 4, stream.modalities))
    assert [b.size for b in batches] == [10] * 4
    assert batches[0].present["text"].tolist() == [i % 5 != 0 for i in range(10)]
    with pytest.raises(DataError, match="ended after 4 of 5 batches"):
        list(stream_batches(stream.samples(), 10, 5, stream.modalities))


def test_damaged_shards_and_indexes_are_named(shards: Path, tmp_path: Path) -> None:
    index = read_index(shards)
    victim = shards / "train-000003.tar"
    victim.write_bytes(victim.read_bytes()[:3000])
    assert verify_shards(index) == ["train-000003.tar"]
    with pytest.raises(DataError, match=r"train-000003\.tar"):
        list(ShardStream(index).samples())
    tree = json.loads((shards / "index.json").read_text())
    tree["shards"][3]["count"] = 7
    (shards / "index.json").write_text(json.dumps(tree))
    with pytest.raises(DataError, match=r"train-000003\.tar"):
        list(ShardStream(read_index(shards)).samples())
    with pytest.raises(DataError, match="cannot be read"):
        read_index(tmp_path / "nowhere")
    (tmp_path / "index.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="not a modalign-shards/1 index"):
        read_index(tmp_path)
