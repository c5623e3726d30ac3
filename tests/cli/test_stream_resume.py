"""Streamed training from WebDataset shards: `modalign shards build` from a manifest, training with 2
DataLoader workers and mid-epoch checkpoints, a `kill -9` inside an epoch, and a resume that sees
every sample exactly once per epoch and ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from modalign.train.checkpoint import latest_checkpoint
from support.procs import kill_tree

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).parents[1] / "support" / "stream_run.py"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
ROWS = 96  # 12 shards of 8; batch 16 -> 6 steps per epoch
STEPS_PER_EPOCH, EPOCHS = 6, 3


def write_manifest(folder: Path, per_colour: int, seed: int, name: str) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for colour, rgb in COLOURS.items():
        for i in range(per_colour):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype("uint8")
            path = folder / f"{name}-{colour}-{i}.png"
            Image.fromarray(pixels).save(path)
            shade = rng.choice(["a", "one", "this", "the", "some"])
            rows.append({"image": path.name, "caption": f"{shade} {colour} patch", "colour": colour})
    out = folder / f"{name}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def recipe_args(folder: Path, shards: Path) -> list[str]:
    data = (
        f"data={{name: manifest, train_file: {folder / 'train.jsonl'}, test_file: {folder / 'test.jsonl'}, "
        "label_columns: [colour], image_size: 16, max_tokens: 8}"
    )
    return [
        "av-digits-clip",
        data,
        "model.encoders={image: {name: image_cnn, widths: [16, 32]}, caption: {name: text_bow}}",
        "eval.label=colour",
        "eval.plots=false",
        "eval.report=false",
        f"train.epochs={EPOCHS}",
        "train.batch_size=16",
        "train.warmup_steps=2",
        "train.num_workers=2",
        "train.shuffle_buffer=20",
        "train.save_every_steps=4",
        "train.log_every=1",
        "train.modality_dropout=0.2",  # per-step randomness: the RNG state must resume exactly too
        f"train.shards={shards}",
    ]


def driver(ids_log: Path, args: list[str], stall_after: int | None = None, ranks: int = 1) -> subprocess.Popen[str]:
    """The recording ``modalign train`` (under ``torchrun`` with ``ranks > 1``)."""
    own = [str(ids_log)] + ([str(stall_after)] if stall_after is not None else [])
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    cmd = [*launch, str(DRIVER), *own, "--", "train", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when_stalled(proc: subprocess.Popen[str], markers: list[Path]) -> None:
    """Wait until every rank wrote its stall marker, then ``kill -9`` the whole process group."""
    deadline = time.monotonic() + 300
    while not all(m.exists() for m in markers) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert all(m.exists() for m in markers), proc.communicate(timeout=5)[1][-3000:]
    finally:
        kill_tree(proc.pid)  # torchrun's ranks run in sessions of their own
        proc.wait()


def finish(proc: subprocess.Popen[str]) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def steps(ids_log: Path) -> dict[int, list[int]]:
    """``{step: ids}``; a step logged twice (redone after a resume) keeps its last record."""
    records = [json.loads(line) for line in ids_log.read_text().splitlines()]
    return {r["step"]: r["ids"] for r in records}


def weights(run: Path) -> dict[str, object]:
    folder = latest_checkpoint(run / "checkpoints")
    assert folder is not None
    return dict(load_file(str(folder / "model.safetensors")))


def build_shards(folder: Path) -> Path:
    """The train and test manifests, and `modalign shards build` of the train split: 12 shards of 8."""
    write_manifest(folder, ROWS // len(COLOURS), 0, "train")
    write_manifest(folder, 4, 1, "test")
    shards = folder / "shards"
    recipe, *overrides = recipe_args(folder, shards)
    build = [sys.executable, "-m", "modalign", "shards", "build", recipe, str(shards), *overrides, "--shard-size", "8"]
    made = subprocess.run(build, capture_output=True, text=True, timeout=300, check=False)
    assert made.returncode == 0, made.stderr[-3000:]
    index = json.loads((shards / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [8] * 12 and index["count"] == ROWS
    return shards


def test_killed_mid_epoch_resumes_every_sample_once_and_same_weights(tmp_path: Path) -> None:
    shards = build_shards(tmp_path)

    full_log, cut_log, resumed_log = tmp_path / "full.jsonl", tmp_path / "cut.jsonl", tmp_path / "resumed.jsonl"
    full, cut = tmp_path / "full", tmp_path / "cut"
    finish(driver(full_log, [*recipe_args(tmp_path, shards), "--run-dir", str(full)]))

    # checkpoints at steps 4 and 8 (inside epochs 1 and 2); stall at step 9 and kill there
    proc = driver(cut_log, [*recipe_args(tmp_path, shards), "--run-dir", str(cut)], stall_after=9)
    kill_when_stalled(proc, [Path(f"{cut_log}.stalled")])
    assert latest_checkpoint(cut / "checkpoints") == cut / "checkpoints" / "epoch-0001-step-00000008"
    finish(driver(resumed_log, [*recipe_args(tmp_path, shards), "--run-dir", str(cut)]))

    want = steps(full_log)
    first = {s: ids for s, ids in steps(cut_log).items() if s <= 8}
    got = first | steps(resumed_log)
    assert min(steps(resumed_log)) == 9  # step 9 was lost with the kill and is redone
    assert sorted(want) == sorted(got) == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    assert got == want  # the same batches in the same order
    orders = []
    for epoch in range(EPOCHS):
        seen = [i for s in range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1) for i in got[s]]
        assert sorted(seen) == list(range(ROWS)), f"epoch {epoch}: every sample exactly once"
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch

    w_full, w_cut = weights(full), weights(cut)
    assert sorted(w_full) == sorted(w_cut)
    for name in w_full:
        assert (w_full[name] == w_cut[name]).all(), name  # type: ignore[union-attr]
    m_full = json.loads((full / "eval.json").read_text())
    assert m_full == json.loads((cut / "eval.json").read_text())
    assert m_full["image->caption/p@1"] > 0.25 + 0.2  # 4 colours: chance 0.25


@pytest.mark.ddp
def test_two_ranks_killed_mid_epoch_resume_exactly(tmp_path: Path) -> None:
    """torchrun, 2 ranks x 2 workers: each rank streams its own shards; every rank's RNG is restored."""
    shards = build_shards(tmp_path)
    full, cut = tmp_path / "full", tmp_path / "cut"
    full_log, cut_log, resumed_log = tmp_path / "full.jsonl", tmp_path / "cut.jsonl", tmp_path / "resumed.jsonl"
    finish(driver(full_log, [*recipe_args(tmp_path, shards), "--run-dir", str(full)], ranks=2))
    proc = driver(cut_log, [*recipe_args(tmp_path, shards), "--run-dir", str(cut)], stall_after=9, ranks=2)
    kill_when_stalled(proc, [Path(f"{cut_log}.rank{r}.stalled") for r in range(2)])
    assert latest_checkpoint(cut / "checkpoints") == cut / "checkpoints" / "epoch-0001-step-00000008"
    finish(driver(resumed_log, [*recipe_args(tmp_path, shards), "--run-dir", str(cut)], ranks=2))

    for epoch in range(EPOCHS):
        seen = []
        for r in range(2):
            want = steps(Path(f"{full_log}.rank{r}"))
            got = {s: i for s, i in steps(Path(f"{cut_log}.rank{r}")).items() if s <= 8}
            got |= steps(Path(f"{resumed_log}.rank{r}"))
            assert got == want, f"rank {r}"
            seen += [i for s in range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1) for i in got[s]]
        assert sorted(seen) == list(range(ROWS)), f"epoch {epoch}: every sample exactly once over the ranks"
    w_full, w_cut = weights(full), weights(cut)
    for name in w_full:
        assert (w_full[name] == w_cut[name]).all(), name  # type: ignore[union-attr]
