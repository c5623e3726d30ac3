"""The training loop: the same for every method.

Per step it calls ``method(batch) -> Outputs`` (the features), ``method.loss(outputs, batch)``
(the maths), then the optimiser, then ``method.after_step(ctx)``; per epoch
``method.on_epoch_start(ctx)`` before the first batch. It knows nothing else of methods.

AdamW with decoupled weight decay (not on biases, norms or the temperature), linear warm-up
then cosine decay, gradient clipping, optional bf16 autocast, seeded per-epoch randomness,
a progress bar, ``metrics.jsonl`` and atomic checkpoints at epoch ends.

Determinism and resume: every epoch re-seeds Python/NumPy/torch and the shuffling generator
from ``(seed, epoch)`` and re-pairs the dataset with ``set_epoch``; a checkpoint holds the
weights, optimiser and scheduler after a whole epoch. Resuming therefore replays exactly the
epochs an uninterrupted run would have run (same losses, same final weights on one device).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from modalign.core.types import Batch, EpochContext, LossOutput, StepContext
from modalign.data.base import MultimodalDataset
from modalign.methods.base import Method
from modalign.train.build import make_loader
from modalign.train.checkpoint import latest_checkpoint, load_state, load_weights, save_checkpoint
from modalign.train.recipe import TrainConfig

METRICS_FILE = "metrics.jsonl"


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch`` (0-based) of a run seeded with ``seed``."""
    return (seed * 1_000_003 + epoch * 7_919) % (2**31)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_optimizer(method: Method, cfg: TrainConfig) -> AdamW:
    """AdamW with weight decay only on weight matrices/kernels (ndim >= 2)."""
    skip = method.no_weight_decay()
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in method.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Any:
    """LR multiplier: linear warm-up over ``warmup`` steps, cosine to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class TrainState:
    """Progress of a run: epochs completed and optimiser steps taken."""

    epoch: int = 0
    step: int = 0


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, records past the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            keep = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict[str, Any]) -> None:
        """Append one JSON record."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Trainer:
    """Optimises a ``Method`` on a dataset; checkpoints into ``run_dir/checkpoints``.

    Args:
        method: The method (model + objectives).
        dataset: Training split.
        cfg: ``TrainConfig``.
        run_dir: Run directory.
        device: Device to train on.
    """

    def __init__(
        self, method: Method, dataset: MultimodalDataset, cfg: TrainConfig, run_dir: Path, device: torch.device
    ) -> None:
        self.method = method.to(device)
        self.dataset = dataset
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = device
        self.steps_per_epoch = len(dataset) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"train.batch_size={cfg.batch_size} exceeds the {len(dataset)} training samples")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.optimizer = make_optimizer(method, cfg)
        self.scheduler = LambdaLR(self.optimizer, warmup_cosine(cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio))
        self.state = TrainState()

    @property
    def ckpt_dir(self) -> Path:
        """``run_dir/checkpoints``."""
        return self.run_dir / "checkpoints"

    def resume(self) -> bool:
        """Load the latest checkpoint if there is one; returns whether it did."""
        folder = latest_checkpoint(self.ckpt_dir)
        if folder is None:
            return False
        load_weights(folder, self.method)
        state = load_state(folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = TrainState(epoch=state["epoch"], step=state["step"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        return True

    def fit(self, resume: bool = True, max_epochs: int | None = None) -> TrainState:
        """Train until ``cfg.epochs`` are done (or ``max_epochs`` more epochs in this call)."""
        resumed = self.resume() if resume else False
        log = MetricsLog(self.run_dir / METRICS_FILE, self.state.step if resumed else None)
        end = self.cfg.epochs if max_epochs is None else min(self.cfg.epochs, self.state.epoch + max_epochs)
        while self.state.epoch < end:
            summary = self._run_epoch(self.state.epoch, log)
            self.state.epoch += 1
            log.write({"step": self.state.step, "epoch": self.state.epoch, **summary})
            if self.state.epoch % self.cfg.save_every == 0 or self.state.epoch == self.cfg.epochs:
                self._save()
        return self.state

    def _save(self) -> None:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        }
        save_checkpoint(self.ckpt_dir, f"epoch-{self.state.epoch:04d}", self.method, state, self.cfg.keep_checkpoints)

    def _run_epoch(self, epoch: int, log: MetricsLog) -> dict[str, float]:
        seed = epoch_seed(self.cfg.seed, epoch)
        seed_everything(seed)
        self.dataset.set_epoch(epoch)
        ctx = EpochContext(self.state.step, epoch, self.total_steps, self.steps_per_epoch, self._dataset_pass)
        self.method.on_epoch_start(ctx)
        loader = make_loader(
            self.dataset, self.cfg.batch_size, shuffle=True, num_workers=self.cfg.num_workers, seed=seed, drop_last=True
        )
        self.method.train()
        total, count, start = 0.0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False, mininterval=1.0)
        for batch in bar:
            out = self._step(batch.to(self.device))
            loss = out.loss.detach().item()
            total += loss
            count += batch.size
            self.state.step += 1
            self.method.after_step(self._context(epoch))
            rate = count / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.0f}")
            if self.state.step % self.cfg.log_every == 0:
                log.write(
                    {
                        "step": self.state.step,
                        "epoch": epoch + count / len(self.dataset),
                        "loss": loss,
                        "lr": self.scheduler.get_last_lr()[0],
                        "samples_per_s": rate,
                        **{f"loss/{k}": float(v.detach()) for k, v in out.parts.items()},
                        **out.metrics,
                    }
                )
        bar.close()
        steps = max(1, count // self.cfg.batch_size)
        return {"epoch_loss": total / steps, "epoch_seconds": time.perf_counter() - start}

    def _context(self, epoch: int) -> StepContext:
        return StepContext(self.state.step, epoch, self.total_steps, self.steps_per_epoch)

    def _dataset_pass(self) -> Any:
        """One unshuffled pass over the training split, on the device (for epoch-start hooks)."""
        loader = make_loader(self.dataset, self.cfg.batch_size, shuffle=False, num_workers=self.cfg.num_workers)
        return (batch.to(self.device) for batch in loader)

    def _step(self, batch: Batch) -> LossOutput:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            out = self.method.loss(self.method(batch), batch)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"non-finite loss {out.loss.item()} at step {self.state.step}")
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return out
