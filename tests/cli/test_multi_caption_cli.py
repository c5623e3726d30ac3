"""The multi-caption retrieval protocol through the CLI: a manifest with five captions per photo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from modalign.cli.main import app
from modalign.eval.shards import load_embeddings

runner = CliRunner()
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
WORDS = ("a", "one", "this", "the", "some")


def _write(folder: Path, n_per_colour: int, seed: int) -> Path:
    """``n_per_colour`` photos per colour, five captions each (five rows sharing the photo's id)."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, rgb in COLOURS.items():
        for i in range(n_per_colour):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype("uint8")
            photo = f"{name}-{seed}-{i}.png"
            Image.fromarray(pixels).save(folder / photo)
            rows += [{"id": photo, "image": photo, "caption": f"{w} {name} patch {i}"} for w in WORDS]
    path = folder / f"captions-{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ranks(query: np.ndarray, gallery: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Rank of each query's best relevant gallery row among ``gallery`` (ties pessimistic)."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sims = q @ g.T
    best = np.where(relevant, sims, -np.inf).max(axis=1, keepdims=True)
    return 1 + ((sims >= best) & ~relevant).sum(axis=1)


@pytest.mark.slow
def test_multi_caption_manifest_run_ranks_distinct_photos(tmp_path: Path) -> None:
    train, test = _write(tmp_path, 3, seed=0), _write(tmp_path, 2, seed=1)
    run = tmp_path / "run"
    data = f"data={{name: manifest, train_file: {train}, test_file: {test}, image_size: 16, max_tokens: 8}}"
    encoders = "model.encoders={image: {name: image_cnn, widths: [8, 16]}, caption: {name: text_bow}}"
    args = ["av-digits-clip", data, encoders, "eval.label=null", "eval.plots=false", "eval.report=false"]
    result = runner.invoke(app, ["train", *args, "train.epochs=2", "train.batch_size=20", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval.json").read_text())
    out = tmp_path / "emb.npz"
    result = runner.invoke(app, ["embed", str(run), "--data", str(test), "--out", str(out)])
    assert result.exit_code == 0, result.output
    emb = load_embeddings(out)
    caption_ids = emb.content_of("caption").numpy()
    assert len(np.unique(caption_ids)) == len(emb) == 8 * 5  # every caption its own item
    ids = emb.ids.numpy()
    photos = np.unique(ids, return_index=True)[1]  # 8 distinct photos: one row each
    image, caption = emb.embeddings["image"].numpy(), emb.embeddings["caption"].numpy()
    t2i = _ranks(caption, image[photos], ids[:, None] == ids[photos][None, :])
    i2t = _ranks(image[photos], caption, ids[photos][:, None] == ids[None, :])
    assert len(t2i) == 40 and len(i2t) == 8 and t2i.max() <= 8
    for name, ranks in (("caption->image", t2i), ("image->caption", i2t)):
        assert metrics[f"{name}/R@1"] == pytest.approx(float(np.mean(ranks <= 1)))
        assert metrics[f"{name}/R@5"] == pytest.approx(float(np.mean(ranks <= 5)))
        assert metrics[f"{name}/median_rank"] == pytest.approx(float(np.median(ranks)))
