"""Experiment tracking: TensorBoard event files in ``RUN_DIR/tensorboard`` when it is installed.

TensorBoard is an optional extra (``pip install 'modalign[track]'``); without it, and with
``train.track: none``, the ``Tracker`` base class does nothing. What is logged: every
``metrics.jsonl`` record as ``train/...`` scalars at its step, the resolved config as text, and
after evaluation the test metrics as ``eval/...`` scalars and the plots as images.

On resume, events after the checkpoint's step are purged (as ``metrics.jsonl`` records are);
on a fresh start the folder's old event files are removed.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modalign.core.errors import ConfigError

TRACKING_DIR = "tensorboard"


class Tracker:
    """The tracking interface; this base class logs nothing (``train.track: none``)."""

    def start(self, resume_step: int | None) -> None:
        """Open the log; ``resume_step`` is the checkpoint's step when resuming, else ``None``."""

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "train") -> None:
        """Log the numeric entries of ``values`` as ``prefix/key`` at ``step``."""

    def image(self, tag: str, path: Path, step: int) -> None:
        """Log the PNG file ``path`` as image ``tag`` at ``step``."""

    def close(self) -> None:
        """Flush and close the log."""


class TensorBoardTracker(Tracker):
    """Writes TensorBoard event files into ``log_dir``; the resolved ``config`` goes in as text.

    Args:
        log_dir: Folder of the event files (``RUN_DIR/tensorboard``).
        config: The resolved recipe (YAML), logged as text ``config`` when the log opens.
    """

    def __init__(self, log_dir: Path, config: str) -> None:
        self.log_dir = log_dir
        self.config = config
        self.writer: Any = None

    def start(self, resume_step: int | None) -> None:
        """Open the writer; purge events past ``resume_step``, or every old event on a fresh start."""
        from torch.utils.tensorboard import SummaryWriter

        if resume_step is None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge)
        fenced = "\n".join("    " + line for line in self.config.splitlines())  # a markdown code block
        self.writer.add_text("config", fenced, global_step=resume_step or 0)

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "train") -> None:
        """Log the numeric entries of ``values`` (not ``step``) as ``prefix/key`` at ``step``."""
        if self.writer is None:
            return
        for key, value in values.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", float(value), global_step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """Log the PNG file ``path`` (read as RGB) as image ``tag`` at ``step``."""
        from PIL import Image

        if self.writer is None:
            return
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        self.writer.add_image(tag, pixels, global_step=step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close the writer."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def tensorboard_installed() -> bool:
    """Whether the ``tensorboard`` package can be imported."""
    return importlib.util.find_spec("tensorboard") is not None


def make_tracker(mode: str, run_dir: Path, config: str) -> Tracker:
    """The tracker of ``train.track``: ``auto`` (TensorBoard if installed), ``tensorboard`` or ``none``.

    Raises:
        ConfigError: ``tensorboard`` is asked for but not installed.
    """
    if mode == "none":
        return Tracker()
    if not tensorboard_installed():
        if mode == "tensorboard":
            raise ConfigError(
                "train.track",
                "tensorboard is not installed; pip install 'modalign[track]' or set train.track=none",
            )
        return Tracker()
    return TensorBoardTracker(run_dir / TRACKING_DIR, config)


def log_evaluation(tracker: Tracker, metrics: Mapping[str, float], plots_dir: Path, step: int) -> None:
    """Log test ``metrics`` as ``eval/...`` scalars and every PNG in ``plots_dir`` as ``plots/NAME``."""
    tracker.scalars(step, metrics, prefix="eval")
    if plots_dir.is_dir():
        for path in sorted(plots_dir.glob("*.png")):
            tracker.image(f"plots/{path.stem}", path, step)
