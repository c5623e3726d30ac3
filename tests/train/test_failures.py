"""Failures a person can act on, at the trainer level: non-finite losses (skipped up to
train.skip_nonfinite, then a one-line TrainingError), out of memory on a batch, unreadable
checkpoints on resume."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from modalign.core import Batch, LossOutput, ModalitySpec, Outputs, Sample
from modalign.core.errors import CheckpointError, TrainingError
from modalign.data.base import MultimodalDataset
from modalign.encoders.vector import VectorMLP
from modalign.fusion.two_tower import NoFusion
from modalign.methods import Method, MultimodalModel
from modalign.objectives import InfoNCE
from modalign.train.checkpoint import latest_checkpoint
from modalign.train.loop import Trainer
from modalign.train.progress import LineProgress
from modalign.train.recipe import TrainConfig
from modalign.train.records import read_metrics

POISON = 5  # the sample id whose batch gets a non-finite loss


class Pairs(MultimodalDataset):
    """32 pairs of random vectors; x and y are linked by a fixed linear map."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.randn(4, 3, generator=g)

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {"x": ModalitySpec("vector", channels=4), "y": ModalitySpec("vector", channels=3)}

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> Sample:
        return Sample(id=index, values={"x": self.x[index], "y": self.y[index]})


class PoisonedMethod(Method):
    """A CLIP-like method whose loss is NaN for every batch that holds sample ``POISON``."""

    def loss(self, outputs: Outputs, batch: Batch) -> LossOutput:
        out = super().loss(outputs, batch)
        if bool((batch.ids == POISON).any()):
            return LossOutput(loss=out.loss * float("nan"), parts=out.parts, metrics=out.metrics)
        return out


def make_method(cls: type[Method] = PoisonedMethod) -> Method:
    torch.manual_seed(0)
    encoders = {"x": VectorMLP(4, dim=8, hidden=8), "y": VectorMLP(3, dim=8, hidden=8)}
    heads: dict[str, nn.Module] = {m: nn.Identity() for m in encoders}
    return cls(MultimodalModel(encoders, heads, NoFusion()), [("infonce", InfoNCE(temperature=0.2), 1.0)])


def config(**kwargs: object) -> TrainConfig:
    base: dict[str, object] = {"epochs": 3, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "log_every": 1}
    return TrainConfig(**(base | kwargs))


def fit(run_dir: Path, cfg: TrainConfig, max_epochs: int | None = None, method: Method | None = None) -> Trainer:
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(method or make_method(), Pairs(), cfg, run_dir, torch.device("cpu"))
    progress = LineProgress(cfg.epochs, trainer.total_steps, io.StringIO())
    trainer.fit(resume=True, max_epochs=max_epochs, progress=progress)
    return trainer


def test_nonfinite_batches_are_skipped_counted_and_resumed_exactly(tmp_path: Path) -> None:
    cfg = config(skip_nonfinite=3)
    full = fit(tmp_path / "full", cfg)
    # 4 steps per epoch, one batch per epoch holds the poisoned sample: 3 skipped, 9 optimiser steps
    assert full.state.skipped_nonfinite == 3
    assert full.state.step == 9
    assert all(torch.isfinite(p).all() for p in full.method.parameters())
    records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    epoch_ends = [r for r in records if "epoch_loss" in r]
    assert [r["skipped_nonfinite"] for r in epoch_ends] == [1, 2, 3]
    assert all(json.dumps(r["loss"]) != "NaN" for r in records if "loss" in r)

    fit(tmp_path / "cut", cfg, max_epochs=1)
    resumed = fit(tmp_path / "cut", cfg)
    assert resumed.state.skipped_nonfinite == 3  # the counter came back from the checkpoint
    for (name, a), (_, b) in zip(full.method.state_dict().items(), resumed.method.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_nonfinite_beyond_the_allowance_names_step_batch_and_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingError) as info:
        fit(tmp_path, config(skip_nonfinite=1))
    message = str(info.value)
    checkpoint = tmp_path / "checkpoints" / "epoch-0001"
    assert "non-finite loss (nan) at step " in message
    assert "(epoch 2/3, batch of 8 samples, ids " in message and str(POISON) in message
    assert "after skipping the 1 allowed by train.skip_nonfinite" in message
    assert "lower train.lr (now 0.01)" in message
    assert f"last good checkpoint {checkpoint}" in message and "train.skip_nonfinite=2" in message
    assert "\n" not in message
    assert latest_checkpoint(tmp_path / "checkpoints") == checkpoint  # nothing written for the failed epoch


def test_first_nonfinite_loss_without_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"epoch 1/3, .*train\.skip_nonfinite=N .*no checkpoint was written yet"):
        fit(tmp_path, config())
    assert latest_checkpoint(tmp_path / "checkpoints") is None


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: out of memory"),
        MemoryError(),
    ],
)
def test_out_of_memory_names_step_and_batch_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error) -> None:
    def exhausted(self: Trainer, batch: Batch) -> LossOutput:
        raise error

    monkeypatch.setattr(Trainer, "_forward", exhausted)
    with pytest.raises(TrainingError) as info:
        fit(tmp_path, config(), method=make_method(Method))
    assert str(info.value).startswith("out of memory on cpu at step 1/12 (epoch 1/3, batch of 8 samples, ids ")
    assert "lower train.batch_size (now 8)" in str(info.value)


def test_other_runtime_errors_are_not_disguised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Trainer, batch: Batch) -> LossOutput:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(Trainer, "_forward", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fit(tmp_path, config(), method=make_method(Method))


@pytest.mark.parametrize("file", ["trainer.pt", "model.safetensors"])
def test_unreadable_checkpoint_names_file_and_previous_one(tmp_path: Path, file: str) -> None:
    cfg = config()
    fit(tmp_path, cfg, max_epochs=2, method=make_method(Method))
    broken = tmp_path / "checkpoints" / "epoch-0002" / file
    broken.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError) as info:
        fit(tmp_path, cfg, method=make_method(Method))
    message = str(info.value)
    assert message.startswith(f"checkpoint file {broken} cannot be ")
    assert "rerun with --no-resume to start over" in message
    previous = tmp_path / "checkpoints" / "epoch-0001"
    assert f"delete {broken.parent} to resume from the previous checkpoint {previous}" in message
    assert "\n" not in message

    # following the advice: without the broken folder the run resumes from epoch 1 and finishes
    shutil.rmtree(broken.parent)
    trainer = fit(tmp_path, cfg, method=make_method(Method))
    assert trainer.state.epoch == 3
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl") if "epoch_loss" in r] == [1, 2, 3]


def test_metrics_reader_ignores_a_last_line_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
    with pytest.raises(json.JSONDecodeError):
        read_metrics(path)
