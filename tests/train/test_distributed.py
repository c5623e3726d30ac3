"""The pieces of ``train.distributed`` that need no process group: batch sharding and seeds."""

from __future__ import annotations

import pytest
import torch

from modalign.core import ModalitySpec, Sample
from modalign.core.errors import ConfigError
from modalign.data.base import MultimodalDataset
from modalign.train.build import make_loader
from modalign.train.distributed import (
    ContiguousShard,
    DistContext,
    ShardedBatches,
    launcher_command,
    per_rank_batch,
    rank_seed,
    single_process_order,
)


class Numbers(MultimodalDataset):
    """``n`` one-value samples whose id is their index."""

    def __init__(self, n: int) -> None:
        self.n = n

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {"v": ModalitySpec("vector", channels=1)}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Sample:
        return Sample(id=index, values={"v": torch.tensor([float(index)])})


@pytest.mark.parametrize("seed", [0, 7, 12345])
def test_single_process_order_is_the_shuffled_loaders_order(seed: int) -> None:
    loader = make_loader(Numbers(50), 10, shuffle=True, seed=seed, drop_last=True)
    seen = torch.cat([batch.ids for batch in loader])
    assert torch.equal(seen, single_process_order(50, seed)[:50])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_together_see_the_single_process_batches(world: int) -> None:
    n, batch, seed = 53, 12, 3  # 4 global batches, 5 samples dropped
    one = [b.ids for b in make_loader(Numbers(n), batch, shuffle=True, seed=seed, drop_last=True)]
    per = [
        [
            b.ids
            for b in make_loader(Numbers(n), batch // world, False, sampler=ShardedBatches(n, batch, r, world, seed))
        ]
        for r in range(world)
    ]
    assert all(len(p) == len(one) == 4 for p in per)
    for k, want in enumerate(one):
        assert torch.equal(torch.cat([per[r][k] for r in range(world)]), want)  # rank order = gather order


def test_contiguous_shards_concatenate_to_the_dataset() -> None:
    shards = [list(ContiguousShard(10, r, 3)) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(ContiguousShard(10, r, 3)) for r in range(3)] == [4, 3, 3]


def test_global_batch_must_split_evenly() -> None:
    assert per_rank_batch(64, 4) == 16
    with pytest.raises(ConfigError, match=r"train\.batch_size.*multiple of the 3 processes"):
        per_rank_batch(64, 3)


def test_rank_seeds_differ_and_rank_zero_keeps_the_seed() -> None:
    assert rank_seed(11, 0) == 11
    assert len({rank_seed(11, r) for r in range(8)}) == 8


def test_launcher_command_names_torchrun_under_data_parallelism(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_command() == ["modalign"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launcher_command() == ["torchrun", "--nproc_per_node", "2", "--nnodes", "2", "-m", "modalign"]


def test_context_tags_errors_only_under_data_parallelism() -> None:
    assert DistContext().tag() == "" and DistContext().lead
    assert DistContext(1, 2).tag() == "[rank 1/2] " and not DistContext(1, 2).lead
