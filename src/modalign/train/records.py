"""What the training loop records: ``metrics.jsonl`` and the first non-finite loss of a stretch of steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modalign.train.tracking import Tracker

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, records past the checkpoint's step are dropped.

    Each record is also sent to ``tracker`` as scalars at its step. With ``lead=False`` (ranks
    other than 0 under data parallelism) nothing is written.
    """

    def __init__(self, path: Path, resume_step: int | None, tracker: Tracker | None = None, lead: bool = True) -> None:
        self.path = path
        self.tracker = tracker or Tracker()
        self.lead = lead
        if not lead:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            keep = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict[str, Any]) -> None:
        """Append one JSON record (one ``write`` call per line) and send it to the tracker."""
        if not self.lead:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.tracker.scalars(int(record["step"]), record)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file; a last line cut short by a crash is ignored."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records


class NonfiniteWatch:
    """The first non-finite loss since the last check, recorded on the device (no host sync per step).

    Args:
        device: Where the losses are.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step: Tensor | None = None
        self.value = torch.zeros((), device=device)
        self.ids: Tensor | None = None

    def observe(self, loss: Tensor, step: int, ids: Tensor) -> None:
        """Remember ``(step, loss, ids)`` if ``loss`` is the first non-finite one since ``reset``."""
        bad = ~torch.isfinite(loss.detach())
        first = self.step if self.step is not None else torch.full((), -1, dtype=torch.long, device=self.device)
        new = bad & (first < 0)
        self.step = torch.where(new, torch.full_like(first, step), first)
        self.value = torch.where(new, loss.detach().float(), self.value)
        self.ids = ids.clone() if self.ids is None or self.ids.shape != ids.shape else torch.where(new, ids, self.ids)

    def first(self) -> tuple[int, float, list[int]] | None:
        """``(step, loss, batch ids)`` of the first non-finite loss seen, or ``None`` (reads the device)."""
        if self.step is None or int(self.step.item()) < 0:
            return None
        assert self.ids is not None
        return int(self.step.item()), float(self.value.item()), [int(i) for i in self.ids.tolist()]
