"""`modalign generate`: greedy captions of a trained coca run, on a manifest and on real emoji data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from modalign.cli.main import app
from support.colours import COLOURS as ALL_COLOURS

runner = CliRunner()

COLOURS = dict(list(ALL_COLOURS.items())[:6])  # red, green, blue, yellow, black, white
TINY_MODEL = "model.encoders={image: {name: image_cnn, widths: [16, 32], dim: 32}, caption: {name: text_bow, dim: 32}}"


def colour_manifest(folder: Path, name: str, n_per_colour: int, seed: int, captions: bool = True) -> list[dict]:
    """Noisy 16 px patches of one colour, captioned '<colour> patch'; rows written to ``folder/name``."""
    rng = np.random.default_rng(seed)
    rows = []
    for colour, rgb in COLOURS.items():
        for i in range(n_per_colour):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype("uint8")
            path = folder / f"{colour}-{seed}-{i}.png"
            Image.fromarray(pixels).save(path)
            caption = f"{colour} patch" if captions or i % 2 == 0 else None
            rows.append({"image": path.name, "caption": caption, "colour": colour})
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def train_manifest_run(folder: Path, method: str, epochs: int) -> Path:
    colour_manifest(folder, "train.jsonl", 10, seed=0)
    data = (
        f"data={{name: manifest, train_file: {folder / 'train.jsonl'}, label_columns: [colour], "
        "image_size: 16, max_tokens: 8, tokenizer: word}"
    )
    run = folder / "run"
    args = ["train", "av-digits-clip", data, TINY_MODEL, f"method={method}", "model.embed_dim=32",
            f"train.epochs={epochs}", "train.batch_size=16", "train.warmup_steps=5", "eval.probe=false",
            "eval.plots=false", "eval.label=colour", "--run-dir", str(run)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def coca_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    method = "{name: coca, decoder_dim: 32, decoder_depth: 1, decoder_heads: 2, max_len: 8}"
    return train_manifest_run(tmp_path_factory.mktemp("coca"), method, epochs=15)


@pytest.mark.slow
def test_generate_captions_a_new_manifest_with_and_without_references(coca_run: Path) -> None:
    folder = coca_run.parent
    rows = colour_manifest(folder, "new.jsonl", 4, seed=1, captions=False)
    out = folder / "captions.jsonl"
    result = runner.invoke(app, ["generate", str(coca_run), "--data", str(folder / "new.jsonl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {len(rows)} captions" in result.output
    assert "token accuracy" in result.output and "unigram" in result.output  # half the rows have references
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(len(rows)))
    assert [("reference" in line) for line in lines] == [r["caption"] is not None for r in rows]
    for line, row in zip(lines, rows, strict=True):
        if row["caption"] is not None:
            assert line["reference"] == row["caption"]
    right = sum(line["text"].split()[:1] == [row["colour"]] for line, row in zip(lines, rows, strict=True))
    assert right / len(rows) >= 0.6, lines  # 6 colours: chance 1/6 of the first words
    assert sum(line["text"] == f"{row['colour']} patch" for line, row in zip(lines, rows, strict=True)) >= 12


@pytest.mark.slow
def test_generate_rejects_a_max_tokens_the_decoder_cannot_hold(coca_run: Path) -> None:
    out = coca_run / "x.jsonl"
    result = runner.invoke(app, ["generate", str(coca_run), "--out", str(out), "--max-tokens", "8"])
    assert result.exit_code == 2
    assert "error: --max-tokens: must be in [1, 7], got 8" in result.output
    assert not out.exists()


@pytest.mark.slow
def test_generate_needs_a_captioning_objective(tmp_path: Path) -> None:
    run = train_manifest_run(tmp_path, "{name: clip}", epochs=1)
    result = runner.invoke(app, ["generate", str(run), "--out", str(tmp_path / "c.jsonl")])
    assert result.exit_code == 2
    assert "error: method: the method has no captioning objective" in result.output


def test_generate_on_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", str(tmp_path), "--out", str(tmp_path / "c.jsonl")])
    assert result.exit_code == 2
    assert "error:" in result.output and "not a run directory" in result.output


@pytest.mark.slow
def test_emoji_coca_one_epoch_then_generate_test_split(data_root: Path, tmp_path: Path) -> None:
    """The packaged recipe trains on real emoji and captions the 400 held-out emoji."""
    run = tmp_path / "run"
    args = ["train", "emoji-coca", "train.epochs=1", "method.decoder_depth=1", "eval.probe=false",
            "eval.plots=false", "--run-dir", str(run), "--data-root", str(data_root)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "captions.jsonl"
    args = ["generate", str(run), "--out", str(out), "--max-tokens", "6", "--data-root", str(data_root)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 400 and all(isinstance(x["text"], str) and x["reference"] for x in lines)
    assert all(len(x["text"].split()) <= 6 for x in lines)
    # one epoch already beats the unigram baseline on held-out captions (teacher-forced)
    accuracy, unigram = (
        float(result.output.split(k)[1].split()[0].strip("(),")) for k in ("token accuracy", "unigram")
    )
    assert accuracy > unigram, result.output
