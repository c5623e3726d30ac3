"""The unaligned-sensor recipes (``basicmotions-dtw``, ``basicmotions-milnce``) train on real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modalign.cli.main import app
from modalign.train.recipe import load_recipe

RECIPES = {"basicmotions-dtw": "soft_dtw", "basicmotions-milnce": "window_milnce"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_alignment_recipes_train_on_offset_pairs(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.data["max_offset"] == 20
    assert [o["name"] for o in recipe.method["objectives"]] == ["infonce", RECIPES[name]]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_alignment_recipes_beat_chance_on_unaligned_pairs(name: str, data_root: Path, tmp_path: Path) -> None:
    """A tiny run on offset windows retrieves far above chance, with both losses logged."""
    run = tmp_path / "run"
    args = ["train", name, "train.epochs=25", "train.warmup_steps=5", "model.encoders.accel.token_pool=8"]
    args += ["model.encoders.gyro.token_pool=8", "eval.probe=false", "eval.plots=false", "eval.report=false"]
    result = CliRunner().invoke(app, [*args, "--run-dir", str(run), "--data-root", str(data_root)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval.json").read_text())
    # 40 test recordings, each gyroscope window offset by up to 20 steps: chance R@1 is 1/40
    assert metrics["accel->gyro/R@1"] >= 0.1 and metrics["gyro->accel/R@1"] >= 0.1, metrics
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(f"loss/{RECIPES[name]}" in row for row in log) and any("loss/infonce" in row for row in log)
