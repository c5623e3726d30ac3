"""``torchrun --nproc_per_node 2 -m modalign train ...`` on CPU (gloo): one run directory written by
rank 0, exact resume, and a failure on the ranks ends the launch with their error lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from safetensors.torch import load_file

from modalign.train.checkpoint import latest_checkpoint
from modalign.train.records import read_metrics
from support.procs import descendants, kill_tree

#: BasicMotions (40 training samples): global batch 8 = 4 per rank, 5 steps per epoch.
SMALL = ["basicmotions-clip", "train.batch_size=8", "eval.probe=false", "eval.plots=false", "eval.report=false"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ddp,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available() or sys.platform in ("win32", "cygwin"),
        reason="needs torch.distributed with the gloo backend",
    ),
]


def torchrun(args: list[str], data_root: Path, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 -m modalign train ...`` (the real entry point).

    A launch still running after ``timeout_s`` (these take well under a minute) fails the test
    with every rank's stack: the ranks get SIGUSR1 (``modalign``'s CLI dumps all threads' stacks
    on it), then torchrun and the ranks are killed.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "modalign"]
    cmd += ["train", *args, "--data-root", str(data_root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        ranks = descendants(proc.pid)  # torchrun starts each rank in a session of its own
        for pid in ranks:
            os.kill(pid, signal.SIGUSR1)
        time.sleep(3)
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout_s} s; stacks and output of the ranks:\n{err[-20000:]}\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def weights(run: Path) -> dict[str, object]:
    folder = latest_checkpoint(run / "checkpoints")
    assert folder is not None
    return dict(load_file(str(folder / "model.safetensors")))


def test_two_ranks_write_one_run_and_resume_exactly(data_root: Path, tmp_path: Path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = torchrun([*SMALL, "train.epochs=2", "--run-dir", str(full)], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1 and proc.stdout.count("metrics in") == 1  # rank 0 prints
    assert "torchrun --nproc_per_node 2 -m modalign train basicmotions-clip" in (full / "command.txt").read_text()
    metrics = json.loads((full / "eval.json").read_text())
    assert metrics["accel->gyro/R@10"] > 0.25 + 0.1  # chance is 10/40
    records = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in records if "epoch_loss" in r] == [5, 10]  # 40 / 8 steps per epoch, one writer
    assert len({r["step"] for r in records if "loss" in r}) == len([r for r in records if "loss" in r])

    first = torchrun([*SMALL, "train.epochs=2", "--run-dir", str(cut), "--max-epochs", "1"], data_root)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped early" in first.stdout
    resumed = torchrun([*SMALL, "train.epochs=2", "--run-dir", str(cut)], data_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = weights(full), weights(cut)
    assert sorted(want) == sorted(got)
    for name in want:
        assert (want[name] == got[name]).all(), name  # type: ignore[union-attr]


def test_a_failing_run_ends_every_rank_with_an_error_line(data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = torchrun(
        [*SMALL, "train.epochs=2", "train.lr=1e30", "train.warmup_steps=0", "--run-dir", str(run)], data_root
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: [rank ")]
    assert errors, proc.stderr[-3000:]
    assert any("non-finite loss" in line for line in errors)
    assert not (run / "eval.json").exists()
