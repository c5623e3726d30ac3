"""Point 4 of issue 8: the training loop reads the device only at ``log_every`` steps and epoch ends.

Every ``Tensor.item``/``tolist``/``__float__``/``__bool__`` call made from the trainer's own
modules is counted while a method without host reads of its own trains; the count must not grow
with the number of steps.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from modalign.core import Batch, LossOutput, ModalitySpec, Outputs, Sample
from modalign.core.modules import Objective
from modalign.data.base import MultimodalDataset
from modalign.encoders.vector import VectorMLP
from modalign.fusion.two_tower import NoFusion
from modalign.methods import Method, MultimodalModel
from modalign.train.loop import Trainer
from modalign.train.progress import LineProgress
from modalign.train.recipe import TrainConfig

TRAINER_FILES = ("train/loop.py", "train/distributed.py", "train/progress.py")


class Vectors(MultimodalDataset):
    """64 samples of two vector modalities, without presence masks."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {"x": ModalitySpec("vector", channels=4), "y": ModalitySpec("vector", channels=4)}

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> Sample:
        return Sample(id=index, values={"x": self.x[index], "y": self.x[index].flip(0)})


class Align(Objective):
    """Mean squared distance of the two embeddings: no metrics, no host reads."""

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        return LossOutput(loss=(outputs.embeddings["x"] - outputs.embeddings["y"]).pow(2).sum(1).mean())


def count_trainer_reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, log_every: int, skip: int = 0) -> int:
    """Host reads from the trainer's modules during a 2-epoch run of 16 steps per epoch."""
    count = 0

    def counting(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(self: Tensor, *args: Any) -> Any:
            nonlocal count
            if sys._getframe(1).f_code.co_filename.endswith(TRAINER_FILES):
                count += 1
            return fn(self, *args)

        return wrapped

    for name in ("item", "tolist", "__float__", "__bool__"):
        monkeypatch.setattr(Tensor, name, counting(getattr(Tensor, name)))
    torch.manual_seed(0)
    encoders = {m: VectorMLP(4, dim=4, hidden=8) for m in ("x", "y")}
    heads: dict[str, nn.Module] = {m: nn.Identity() for m in encoders}
    method = Method(MultimodalModel(encoders, heads, NoFusion()), [("align", Align(), 1.0)])
    cfg = TrainConfig(epochs=2, batch_size=4, log_every=log_every, skip_nonfinite=skip, warmup_steps=1)
    tmp_path.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(method, Vectors(), cfg, tmp_path, torch.device("cpu"))
    trainer.fit(resume=False, progress=LineProgress(cfg.epochs, trainer.total_steps, io.StringIO()))
    monkeypatch.undo()
    return count


def test_host_reads_only_at_log_steps_and_epoch_ends(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rare = count_trainer_reads(monkeypatch, tmp_path / "rare", log_every=16)  # 2 log steps, 2 epoch ends
    every = count_trainer_reads(monkeypatch, tmp_path / "every", log_every=1)  # 32 log steps
    assert rare <= 8, rare
    assert every >= 32  # the counter does see the reads of a log step


def test_skipping_nonfinite_batches_checks_every_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert count_trainer_reads(monkeypatch, tmp_path, log_every=16, skip=1) >= 32  # the documented trade-off
