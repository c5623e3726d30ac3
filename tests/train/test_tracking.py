"""Experiment tracking: TensorBoard event files read back with tensorboard's own reader."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from modalign.cli.main import app
from modalign.core.errors import ConfigError
from modalign.train import tracking
from modalign.train.tracking import TensorBoardTracker, Tracker, make_tracker


def test_track_none_and_missing_tensorboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert type(make_tracker("none", tmp_path, "config")) is Tracker
    monkeypatch.setattr(tracking, "tensorboard_installed", lambda: False)
    assert type(make_tracker("auto", tmp_path, "config")) is Tracker
    with pytest.raises(ConfigError, match=r"train\.track: tensorboard is not installed; pip install 'modalign\[track"):
        make_tracker("tensorboard", tmp_path, "config")


def test_tensorboard_events_hold_scalars_plots_and_config(data_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = ["train", "basicmotions-clip", "train.epochs=2", "train.batch_size=8", "train.log_every=1"]
    args += ["eval.probe=false", "train.track=tensorboard", "--run-dir", str(run), "--data-root", str(data_root)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()

    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 11))  # 5 steps per epoch
    assert [e.step for e in events.Scalars("train/epoch_loss")] == [5, 10]
    assert [e.value for e in events.Scalars("train/skipped_nonfinite")][-1] == 0
    recall = events.Scalars("eval/accel->gyro/R@10")
    assert len(recall) == 1 and recall[0].step == 10 and 0 <= recall[0].value <= 1

    assert {"plots/loss", "plots/similarity", "plots/projection"} <= set(tags["images"])
    for tag in ("plots/loss", "plots/similarity", "plots/projection"):
        (image,) = events.Images(tag)
        png = Image.open(io.BytesIO(image.encoded_image_string))
        assert png.size == (image.width, image.height) and image.width > 100

    (config,) = events.Tensors("config/text_summary")
    text = config.tensor_proto.string_val[0].decode()
    assert "name: basicmotions" in text and "track: tensorboard" in text


def test_fresh_start_removes_old_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    folder = tmp_path / "tensorboard"
    folder.mkdir()
    (folder / "events.out.tfevents.old").write_text("stale")
    tracker = TensorBoardTracker(folder, "a: 1")
    tracker.start(resume_step=None)
    tracker.close()
    assert not (folder / "events.out.tfevents.old").exists()
    assert len(list(folder.iterdir())) == 1
