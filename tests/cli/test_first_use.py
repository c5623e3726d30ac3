"""Built-in datasets on first use: fetched into the per-user cache, never into an explicit root."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modalign.cli.main import app
from modalign.data.catalog import CATALOG
from modalign.data.datasets.basicmotions import BasicMotions
from modalign.data.locate import MIRROR_ENV, default_data_root

runner = CliRunner()
FILES = CATALOG["basicmotions"].files


@pytest.fixture
def mirror(data_root: Path, tmp_path: Path) -> Path:
    """A ``file://`` mirror standing in for basicmotions' upstream zip, built from the shared data."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    with zipfile.ZipFile(folder / "BasicMotions.zip", "w") as zf:
        for rel in FILES:
            zf.write(data_root / rel, f"BasicMotions/{Path(rel).name}")
    return folder


@pytest.fixture
def no_data_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ``$MODALIGN_DATA``; the platform cache under ``tmp_path``. Returns the cache data root."""
    monkeypatch.delenv("MODALIGN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = default_data_root()
    assert root.is_relative_to(tmp_path / "cache"), root
    return root


def test_train_downloads_verifies_and_trains_on_first_use(
    no_data_env: Path, mirror: Path, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MIRROR_ENV, mirror.as_uri())
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "basicmotions-clip", "train.epochs=2", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    for rel in FILES:
        assert (no_data_env / rel).read_bytes() == (data_root / rel).read_bytes()
    assert "accel->gyro/R@1" in json.loads((run / "eval.json").read_text())
    # installed once: with the mirror gone, a second run reads the cache without downloading
    (mirror / "BasicMotions.zip").unlink()
    result = runner.invoke(app, ["train", "basicmotions-clip", "train.epochs=1", "--run-dir", str(tmp_path / "r2")])
    assert result.exit_code == 0, result.output


def test_offline_first_use_fails_with_one_actionable_line(
    no_data_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "offline"
    empty.mkdir()
    monkeypatch.setenv(MIRROR_ENV, empty.as_uri())  # every source unreachable, as without a network
    result = runner.invoke(app, ["train", "basicmotions-clip", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    error = [line for line in lines if line.startswith("error:")]
    assert len(error) == 1 and error[0] == lines[-1], result.output
    assert "Traceback" not in result.output
    for needle in ("modalign datasets fetch basicmotions", "BasicMotions.zip", str(no_data_env), *FILES):
        assert needle in error[0], needle
    assert not (no_data_env / "basicmotions").exists()  # nothing half-installed


def test_explicit_root_is_never_written(tmp_path: Path, mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIRROR_ENV, mirror.as_uri())
    root = tmp_path / "mine"
    root.mkdir()
    result = runner.invoke(
        app, ["train", "basicmotions-clip", "--run-dir", str(tmp_path / "r"), "--data-root", str(root)]
    )
    assert result.exit_code == 2
    assert "modalign datasets fetch basicmotions" in result.output
    assert list(root.iterdir()) == []


def test_modalign_data_is_the_cache_when_set(tmp_path: Path, mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "data-env"
    monkeypatch.setenv("MODALIGN_DATA", str(cache))
    monkeypatch.setenv(MIRROR_ENV, str(mirror))  # a plain folder works as a mirror too
    assert default_data_root() == cache
    ds = BasicMotions(root=None, split="test")
    assert len(ds) == CATALOG["basicmotions"].splits["test"]
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*.ts")) == sorted(FILES)
