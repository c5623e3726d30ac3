"""Training progress on standard error: a bar on a terminal, plain lines anywhere else.

On a terminal, a tqdm bar per epoch with the loss and samples/s. When standard error is a file,
a pipe or CI output, carriage-return updates would fill it with hundreds of partial lines, so
``LineProgress`` writes one line per epoch instead (and one per ``every`` steps if set), each with
the loss, samples/s and the estimated time left.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from torch import Tensor
from tqdm.auto import tqdm

#: Seconds between two loss readings of the bar (each reads the device).
SHOW_EVERY_S = 1.0


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` of a non-negative number of seconds (rounded)."""
    total = round(max(0.0, seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """Base of the progress reporters; the trainer calls these three methods.

    Args:
        epochs: Epochs of the whole run.
        total_steps: Optimiser steps of the whole run.
        stream: Where to write (standard error by default).
    """

    def __init__(self, epochs: int, total_steps: int, stream: TextIO | None = None) -> None:
        self.epochs = epochs
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stderr

    def start_epoch(self, epoch: int, steps: int) -> None:
        """Epoch ``epoch`` (0-based) of ``steps`` steps begins."""

    def step(self, step: int, loss: Tensor | float, samples: int) -> None:
        """Step ``step`` (1-based, of the run) ended with ``loss`` on a batch of ``samples``.

        ``loss`` may be a tensor still on the device: reporters read it only when they show it,
        so a step that shows nothing costs no host synchronisation.
        """

    def end_epoch(self, epoch: int, mean_loss: float) -> None:
        """Epoch ``epoch`` (0-based) ended with mean loss ``mean_loss``."""


class BarProgress(Progress):
    """A tqdm bar per epoch (for terminals)."""

    def __init__(self, epochs: int, total_steps: int, stream: TextIO | None = None) -> None:
        super().__init__(epochs, total_steps, stream)
        self.bar: tqdm | None = None
        self.samples, self.start = 0, time.perf_counter()
        self.shown = 0.0

    def start_epoch(self, epoch: int, steps: int) -> None:
        """Open the epoch's bar."""
        desc = f"epoch {epoch + 1}/{self.epochs}"
        self.bar = tqdm(total=steps, desc=desc, leave=False, mininterval=1.0, file=self.stream)
        self.samples, self.start = 0, time.perf_counter()

    def step(self, step: int, loss: Tensor | float, samples: int) -> None:
        """Advance the bar; show the loss and samples/s (read at most once per second)."""
        self.samples += samples
        now = time.perf_counter()
        if self.bar is not None:
            if now - self.shown >= SHOW_EVERY_S:
                rate = self.samples / max(now - self.start, 1e-9)
                self.bar.set_postfix(loss=f"{float(loss):.4f}", samples_s=f"{rate:.0f}", refresh=False)
                self.shown = now
            self.bar.update(1)

    def end_epoch(self, epoch: int, mean_loss: float) -> None:
        """Close the epoch's bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LineProgress(Progress):
    """One plain line per epoch, and per ``every`` steps if set (for logs and CI).

    The time left is the run's remaining steps times the mean seconds per step so far in this
    process (so a resumed run estimates from its own steps).
    """

    def __init__(self, epochs: int, total_steps: int, stream: TextIO | None = None, every: int | None = None) -> None:
        super().__init__(epochs, total_steps, stream)
        self.every = every
        self.run_start = time.perf_counter()
        self.steps_done = 0
        self.epoch, self.epoch_samples, self.epoch_start = 0, 0, self.run_start
        self.last_step = 0

    def start_epoch(self, epoch: int, steps: int) -> None:
        """Reset the epoch's counters."""
        self.epoch, self.epoch_samples, self.epoch_start = epoch, 0, time.perf_counter()

    def step(self, step: int, loss: Tensor | float, samples: int) -> None:
        """Count the step; every ``every`` steps write a line with this step's loss."""
        self.steps_done += 1
        self.epoch_samples += samples
        self.last_step = step
        if self.every is not None and step % self.every == 0:
            self._write(f"loss {float(loss):.4f}")

    def end_epoch(self, epoch: int, mean_loss: float) -> None:
        """Write the epoch's line with its mean loss."""
        self._write(f"epoch loss {mean_loss:.4f}")

    def _write(self, loss_text: str) -> None:
        now = time.perf_counter()
        rate = self.epoch_samples / max(now - self.epoch_start, 1e-9)
        per_step = (now - self.run_start) / max(self.steps_done, 1)
        left = per_step * max(self.total_steps - self.last_step, 0)
        line = (
            f"epoch {self.epoch + 1}/{self.epochs} step {self.last_step}/{self.total_steps}: {loss_text}, "
            f"{rate:.0f} samples/s, elapsed {format_duration(now - self.run_start)}, left {format_duration(left)}"
        )
        self.stream.write(line + "\n")
        self.stream.flush()


def make_progress(epochs: int, total_steps: int, every: int | None = None, stream: TextIO | None = None) -> Progress:
    """A bar when ``stream`` (standard error by default) is a terminal, plain lines otherwise."""
    stream = stream if stream is not None else sys.stderr
    if is_terminal(stream):
        return BarProgress(epochs, total_steps, stream)
    return LineProgress(epochs, total_steps, stream, every)
