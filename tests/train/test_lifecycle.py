"""The step lifecycle: epoch-start and after-step hooks, their state in checkpoints, exact resume."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core import Batch, LossOutput, ModalitySpec, Objective, Outputs, Sample
from modalign.core.types import EpochContext, StepContext
from modalign.data.base import MultimodalDataset
from modalign.encoders.vector import VectorMLP
from modalign.fusion.two_tower import NoFusion
from modalign.methods import Method, MultimodalModel
from modalign.objectives import InfoNCE
from modalign.train.loop import Trainer
from modalign.train.recipe import TrainConfig
from modalign.train.records import read_metrics


class PairedVectors(MultimodalDataset):
    """x and y = a fixed random map of x plus noise; modality y is absent for every 5th sample."""

    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 5, generator=g)
        self.y = self.x @ torch.randn(5, 4, generator=g) + 0.1 * torch.randn(n, 4, generator=g)

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {"x": ModalitySpec("vector", channels=5), "y": ModalitySpec("vector", channels=4)}

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> Sample:
        values = {"x": self.x[index]} if index % 5 == 0 else {"x": self.x[index], "y": self.y[index]}
        return Sample(id=index, values=values)


class Centering(Objective):
    """A test objective using both hooks: an EMA teacher buffer and an epoch-start dataset mean."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ema", torch.zeros(8))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.center = torch.zeros(8)
        self.epoch_calls: list[tuple[int, int]] = []

    def bind(self, model: nn.Module) -> None:
        self.head = model.heads["x"]  # type: ignore[index]

    def on_epoch_start(self, model: nn.Module, ctx: EpochContext) -> None:
        self.epoch_calls.append((ctx.epoch, ctx.step))
        with torch.no_grad():
            rows = [model(b).projections["x"] for b in ctx.batches()]
        self.center = torch.cat(rows).mean(dim=0)

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        with torch.no_grad():
            weight = self.head.proj.weight.sum(dim=1)
            self.ema.mul_(0.9).add_(0.1 * weight * (1.0 + ctx.progress))
            self.updates += 1

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        proj = outputs.projections["x"]
        loss = F.mse_loss(proj.mean(dim=0), self.center) + 0.01 * (proj * self.ema).mean()
        return LossOutput(loss=loss, metrics={"ema_norm": float(self.ema.norm())})


def make_method() -> Method:
    torch.manual_seed(0)
    encoders = {"x": VectorMLP(5, dim=16, hidden=16), "y": VectorMLP(4, dim=16, hidden=16)}
    heads: dict[str, nn.Module] = {m: _Linear(16, 8) for m in encoders}
    model = MultimodalModel(encoders, heads, NoFusion())
    return Method(model, [("infonce", InfoNCE(temperature=0.2), 1.0), ("center", Centering(), 0.5)])


class _Linear(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def train(run_dir: Path, epochs: int, max_epochs: int | None = None) -> Method:
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, warmup_steps=2, log_every=1, device="cpu")
    method = make_method()
    run_dir.mkdir(parents=True, exist_ok=True)
    Trainer(method, PairedVectors(), cfg, run_dir, torch.device("cpu")).fit(resume=True, max_epochs=max_epochs)
    return method


def test_hooks_run_with_progress_and_their_state_resumes_exactly(tmp_path: Path) -> None:
    full = train(tmp_path / "full", epochs=3)
    centering = full.objectives["center"]
    assert isinstance(centering, Centering)
    assert centering.epoch_calls == [(0, 0), (1, 3), (2, 6)]  # 48 samples / 16 = 3 steps per epoch
    assert int(centering.updates) == 9
    records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    step_records = [r for r in records if "loss" in r]
    assert {"loss/infonce", "loss/center", "center/ema_norm", "infonce/temperature"} <= set(step_records[0])
    for r in step_records:
        assert abs(r["loss"] - (r["loss/infonce"] + 0.5 * r["loss/center"])) < 1e-5

    train(tmp_path / "cut", epochs=3, max_epochs=1)
    resumed = train(tmp_path / "cut", epochs=3)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    resumed_centering = resumed.objectives["center"]
    assert isinstance(resumed_centering, Centering)
    assert resumed_centering.epoch_calls == [(1, 3), (2, 6)]
    assert int(resumed_centering.updates) == 9  # the after-step buffer came back from the checkpoint
    timing = {"samples_per_s", "epoch_seconds"}

    def untimed(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    assert untimed(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == untimed(records)
