import pytest
import torch
from torch import nn

from modalign.train import checkpoint as ckpt


def _module(value: float) -> nn.Module:
    m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def test_save_load_round_trip_and_keep(tmp_path):
    for epoch in range(1, 4):
        ckpt.save_checkpoint(tmp_path, f"epoch-{epoch:04d}", _module(float(epoch)), {"epoch": epoch}, keep=2)
    folder = ckpt.latest_checkpoint(tmp_path)
    assert folder is not None and folder.name == "epoch-0003"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["epoch-0002", "epoch-0003"]
    target = _module(0.0)
    ckpt.load_weights(folder, target)
    assert all((p == 3.0).all() for p in target.parameters())
    assert ckpt.load_state(folder)["epoch"] == 3


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, "epoch-0001", _module(1.0), {"epoch": 1})

    def exploding_save(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, "epoch-0002", _module(2.0), {"epoch": 2})
    folder = ckpt.latest_checkpoint(tmp_path)
    assert folder is not None and folder.name == "epoch-0001"
    assert not (tmp_path / "epoch-0002").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    target = _module(0.0)
    ckpt.load_weights(folder, target)
    assert all((p == 1.0).all() for p in target.parameters())


def test_mismatched_model_is_refused(tmp_path):
    ckpt.save_checkpoint(tmp_path, "epoch-0001", _module(1.0), {"epoch": 1})
    with pytest.raises(RuntimeError, match="does not match the model"):
        ckpt.load_weights(tmp_path / "epoch-0001", nn.Linear(3, 2))
