"""What the trainer refuses around streamed shards, with messages that name the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from modalign.core.errors import CheckpointError, ConfigError
from modalign.data.shards import ShardStream, read_index, write_shards
from modalign.train.loop import Trainer
from modalign.train.recipe import TrainConfig
from support.triples import Triples, make_method


def stream(tmp_path: Path) -> ShardStream:
    write_shards(Triples(), tmp_path / "shards", shard_size=16)
    return ShardStream(read_index(tmp_path / "shards"), shuffle_buffer=8)


def cfg(**kw: object) -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=32, warmup_steps=1, progress_every=None, **kw)  # type: ignore[arg-type]


def test_mid_epoch_checkpoints_need_a_stream(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.save_every_steps") as err:
        Trainer(make_method("clip", ("x", "y"), {}), Triples(), cfg(save_every_steps=2), tmp_path, _cpu())
    assert "not seeded per sample" in str(err.value)


def test_epoch_start_passes_are_refused_on_a_stream(tmp_path: Path) -> None:
    method = make_method("xdc", ("x", "y"), {"clusters": 4, "iterations": 2})
    with pytest.raises(ConfigError, match=r"train\.shards") as err:
        Trainer(method, stream(tmp_path), cfg(), tmp_path, _cpu())
    assert "XDC" in str(err.value) or "xdc" in str(err.value)


def test_a_stream_trains_its_rank_share_and_a_mid_epoch_checkpoint_needs_the_same_workers(tmp_path: Path) -> None:
    data = stream(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    trainer = Trainer(make_method("clip", ("x", "y"), {}), data, cfg(save_every_steps=3), run, _cpu())
    assert trainer.steps_per_epoch == 128 // 32
    trainer.fit(max_epochs=1)
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert names == ["epoch-0000-step-00000003", "epoch-0001"]  # the step-4 save is the epoch's end
    (run / "checkpoints" / "epoch-0001").rename(run / "checkpoints" / "zz-moved")  # leave the mid-epoch one latest
    (run / "checkpoints" / "latest").write_text("epoch-0000-step-00000003")
    other = Trainer(make_method("clip", ("x", "y"), {}), data, cfg(save_every_steps=3, num_workers=2), run, _cpu())
    with pytest.raises(CheckpointError, match=r"train\.num_workers=0") as err:
        other.fit()
    assert "resume with the same" in str(err.value)


def _cpu():  # type: ignore[no-untyped-def]
    import torch

    return torch.device("cpu")
