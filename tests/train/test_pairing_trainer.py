"""The trainer draws `data.paired_per_batch` batches (MixedBatches) from a PairingView, and trains on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from modalign.data.pairing import PairingView
from modalign.train import loop
from modalign.train.recipe import TrainConfig
from support.triples import Triples, make_method


def test_every_step_holds_the_promised_pairs_and_unimodal_rows(tmp_path: Path, monkeypatch: Any) -> None:
    view = PairingView(Triples(), paired_fraction=0.5, seed=0, paired_per_batch=8)
    seen: list[tuple[int, int, list[int]]] = []
    original = loop.Trainer._step

    def recording(self: loop.Trainer, batch: Any, epoch: int) -> Any:
        both = int((batch.present["x"] & batch.present["y"] & batch.present["z"]).sum())
        seen.append((both, batch.size, batch.ids.tolist()))
        return original(self, batch, epoch)

    monkeypatch.setattr(loop.Trainer, "_step", recording)
    cfg = TrainConfig(epochs=2, batch_size=32, warmup_steps=1, progress_every=None, seed=0)
    trainer = loop.Trainer(make_method("cmc", ("x", "y", "z"), {}), view, cfg, tmp_path, torch.device("cpu"))
    # 64 kept pairs (8 per batch) and 64 x 3 unimodal samples (24 per batch): 8 batches
    assert trainer.steps_per_epoch == 8
    trainer.fit()
    assert len(seen) == 16
    assert all(both == 8 and size == 32 for both, size, _ in seen)
    first, second = [i for s in seen[:8] for i in s[2]], [i for s in seen[8:] for i in s[2]]
    assert first != second  # reshuffled per epoch
