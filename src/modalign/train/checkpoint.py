"""Atomic checkpoints: safetensors weights + optimiser/scheduler/RNG state.

Layout under ``RUN_DIR/checkpoints``::

    epoch-0003/model.safetensors   weights and buffers (safetensors)
    epoch-0003/trainer.pt          optimiser, scheduler, epoch, step, RNG states
    latest                         text file naming the newest complete checkpoint

A checkpoint folder is written under a temporary name and renamed when complete; ``latest`` is
replaced atomically afterwards. A crash mid-write therefore leaves the previous checkpoint valid.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

WEIGHTS = "model.safetensors"
STATE = "trainer.pt"
LATEST = "latest"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: Path, tag: str, module: nn.Module, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``module`` weights and trainer ``state`` as checkpoint ``tag``; keep the newest ``keep``.

    Returns:
        The checkpoint folder.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / tag
    tmp = ckpt_dir / f".tmp-{tag}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(module, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(ckpt_dir / LATEST, tag)
    old = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for stale in old[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The folder named by ``latest``, or ``None`` if there is no complete checkpoint."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    folder = ckpt_dir / pointer.read_text().strip()
    return folder if (folder / WEIGHTS).is_file() and (folder / STATE).is_file() else None


def load_weights(folder: Path, module: nn.Module) -> None:
    """Load ``model.safetensors`` from ``folder`` into ``module`` (strict)."""
    missing, unexpected = load_model(module, str(folder / WEIGHTS), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {folder / WEIGHTS} does not match the model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def load_state(folder: Path) -> dict[str, Any]:
    """Load the trainer state saved next to the weights."""
    state: dict[str, Any] = torch.load(folder / STATE, map_location="cpu", weights_only=False)
    return state
