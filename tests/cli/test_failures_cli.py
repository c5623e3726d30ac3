"""Errors a user can cause end as one `error:` line on stderr, exit status 2, no traceback and
nothing half-written; progress in a log file is a few plain lines per epoch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modalign.cli.main import app
from modalign.core import LossOutput
from modalign.train.loop import Trainer

runner = CliRunner()
#: A small real run: BasicMotions (40 training samples), 5 steps per epoch, no probes or plots.
SMALL = ["basicmotions-clip", "train.batch_size=8", "eval.probe=false", "eval.plots=false"]


def modalign(args: list[str], data_root: Path) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point with stderr captured in a pipe (not a terminal)."""
    code = "from modalign.cli.main import main; main()"
    cmd = [sys.executable, "-c", code, *args, "--data-root", str(data_root)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def assert_one_error_line(stderr: str, start: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(f"error: {start}"), errors[0]
    return errors[0]


def assert_failed_cleanly(result, start: str) -> str:
    """A CliRunner result: exit 2 through typer.Exit (no exception escaped), one error line."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    return assert_one_error_line(result.stderr, start)


def assert_nothing_half_written(run: Path) -> None:
    assert not (run / "eval.json").exists()
    checkpoints = run / "checkpoints"
    assert not checkpoints.exists() or not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp")]
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


@pytest.mark.slow
def test_diverging_run_ends_in_one_error_line(data_root, tmp_path):
    run = tmp_path / "run"
    args = ["train", *SMALL, "train.epochs=2", "train.lr=1e30", "train.warmup_steps=0", "--run-dir", str(run)]
    proc = modalign(args, data_root)
    assert proc.returncode == 2, proc.stderr
    line = assert_one_error_line(proc.stderr, "non-finite loss (nan) at step ")
    assert "(epoch 1/2, batch of 8 samples, ids " in line
    assert "lower train.lr (now 1e+30)" in line and "train.skip_nonfinite=N" in line
    assert proc.stderr.rstrip().endswith(line)
    assert_nothing_half_written(run)


@pytest.mark.slow
def test_log_file_gets_one_plain_line_per_epoch(data_root, tmp_path):
    run = tmp_path / "run"
    proc = modalign(["train", *SMALL, "train.epochs=2", "train.track=none", "--run-dir", str(run)], data_root)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    lines = proc.stderr.splitlines()
    progress = [line for line in lines if line.startswith("epoch ")]
    assert len(progress) == 2, proc.stderr
    assert progress[1].startswith("epoch 2/2 step 10/10: epoch loss ")
    assert "samples/s" in progress[0] and " left " in progress[0]
    assert len(lines) <= 3 * 2, proc.stderr  # at most a few lines per epoch
    assert not (run / "tensorboard").exists()  # train.track=none turns tracking off


def test_out_of_memory_on_a_batch(data_root, tmp_path, monkeypatch):
    def exhausted(self: Trainer, batch) -> LossOutput:
        raise MemoryError

    monkeypatch.setattr(Trainer, "_forward", exhausted)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", *SMALL, "--run-dir", str(run), "--data-root", str(data_root)])
    line = assert_failed_cleanly(result, "out of memory on cpu at step 1/")
    assert "batch of 8 samples" in line and "lower train.batch_size (now 8)" in line
    assert_nothing_half_written(run)


def test_unreadable_checkpoint_on_resume(data_root, tmp_path):
    run = tmp_path / "run"
    args = ["train", *SMALL, "train.epochs=3", "--run-dir", str(run), "--data-root", str(data_root)]
    first = runner.invoke(app, [*args, "--max-epochs", "2"])
    assert first.exit_code == 0, first.output
    broken = run / "checkpoints" / "epoch-0002" / "trainer.pt"
    broken.write_bytes(b"truncated")
    result = runner.invoke(app, args)
    line = assert_failed_cleanly(result, f"checkpoint file {broken} cannot be read")
    assert "rerun with --no-resume" in line
    assert f"previous checkpoint {run / 'checkpoints' / 'epoch-0001'}" in line
    assert_nothing_half_written(run)


def test_run_dir_that_is_not_writable(data_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = blocker / "run"
    result = runner.invoke(app, ["train", *SMALL, "--run-dir", str(run), "--data-root", str(data_root)])
    line = assert_failed_cleanly(result, f"run directory {run} is not writable (")
    assert "pick another --run-dir" in line


def test_recipe_for_another_version(tmp_path):
    from modalign.train.recipe import packaged_recipes

    recipe = tmp_path / "old.yaml"
    recipe.write_text("version: '9.3'\n" + packaged_recipes()["basicmotions-clip"].read_text())
    result = runner.invoke(app, ["train", str(recipe), "--run-dir", str(tmp_path / "run")])
    line = assert_failed_cleanly(result, f"version: recipe {recipe} is written for modalign 9.3, this is modalign ")
    assert "pip install 'modalign==9.3.*'" in line
    assert not (tmp_path / "run").exists()
