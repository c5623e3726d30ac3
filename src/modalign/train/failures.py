"""One-line training errors that say what happened, where, and what to do.

``Trainer`` turns a non-finite loss and an out-of-memory error on a batch into a
``TrainingError`` built here; the CLI prints it as one ``error: ...`` line with exit status 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from modalign.core.errors import TrainingError

#: Sample ids shown in a message before it says how many there are in all.
SHOWN_IDS = 8


@dataclass(frozen=True)
class StepPlace:
    """Where a failing step is: 1-based step and epoch of the run, and the batch.

    Attributes:
        step: The failing step, 1-based.
        total_steps: Steps of the whole run.
        epoch: The epoch, 1-based.
        epochs: Epochs of the whole run.
        ids: Sample ids of the batch.
    """

    step: int
    total_steps: int
    epoch: int
    epochs: int
    ids: list[int]

    def describe(self) -> str:
        """``step 3/200 (epoch 1/10, batch of 40 samples, ids 3, 17, ... )``."""
        shown = ", ".join(str(i) for i in self.ids[:SHOWN_IDS])
        more = ", ..." if len(self.ids) > SHOWN_IDS else ""
        batch = f"batch of {len(self.ids)} samples, ids {shown}{more}"
        return f"step {self.step}/{self.total_steps} (epoch {self.epoch}/{self.epochs}, {batch})"


def nonfinite_error(place: StepPlace, loss: float, lr: float, allowed: int, checkpoint: Path | None) -> TrainingError:
    """The error for a non-finite loss once ``allowed`` skipped batches (``train.skip_nonfinite``) are used up.

    Args:
        place: Where it happened.
        loss: The loss value (nan or inf).
        lr: The configured peak learning rate (``train.lr``).
        allowed: ``train.skip_nonfinite``.
        checkpoint: The last complete checkpoint of the run, if any.
    """
    used = f" after skipping the {allowed} allowed by train.skip_nonfinite" if allowed else ""
    text = f"non-finite loss ({loss}) at {place.describe()}{used}; lower train.lr (now {lr:g})"
    if checkpoint is None:
        text += ", or set train.skip_nonfinite=N to skip up to N such batches; no checkpoint was written yet"
    else:
        text += (
            " and start over with --no-resume, or resume from the last good checkpoint "
            f"{checkpoint} by rerunning with train.skip_nonfinite={allowed + 1} or more"
        )
    return TrainingError(text)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error (host or accelerator)."""
    oom_types: tuple[type[BaseException], ...] = (MemoryError, torch.cuda.OutOfMemoryError)
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if isinstance(oom_type, type):
        oom_types += (oom_type,)
    return isinstance(err, oom_types) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def out_of_memory_error(place: StepPlace, batch_size: int, device: torch.device, precision: str) -> TrainingError:
    """The error for running out of memory on a batch."""
    bf16 = ", or use train.precision=bf16" if precision == "fp32" and device.type == "cuda" else ""
    return TrainingError(
        f"out of memory on {device} at {place.describe()}; lower train.batch_size (now {batch_size}){bf16} "
        "and start over with --no-resume or a new --run-dir"
    )
