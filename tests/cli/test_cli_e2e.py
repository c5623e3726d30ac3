"""Tiny end-to-end runs of the CLI on real data (../shared/data or $MODALIGN_DATA)."""

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from modalign.cli.main import app
from support.colours import COLOURS, colour_rows

runner = CliRunner()


def _train(args):
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_train_av_digits_beats_chance_and_eval_embed(data_root, tmp_path):
    run = tmp_path / "run"
    result = _train(
        [
            "av-digits-clip",
            "train.epochs=2",
            "train.batch_size=128",
            "data.test_size=500",
            "model.encoders.image.widths=[16,32]",
            "model.encoders.audio.widths=[16,32]",
            "--run-dir",
            str(run),
            "--data-root",
            str(data_root),
        ]
    )
    metrics = json.loads((run / "eval.json").read_text())
    assert all(isinstance(v, float) for v in metrics.values())
    # chance is 0.1 for 10 digits; a 2-epoch run must be far above it
    assert metrics["image->audio/p@1"] > 0.5, metrics
    assert metrics["audio->image/p@1"] > 0.3, metrics
    assert metrics["image/linear_probe"] > 0.8, metrics
    assert "image->audio" in result.output and "p@1" in result.output  # the printed table
    for name in ("loss.png", "similarity.png", "projection.png"):
        assert (run / "plots" / name).stat().st_size > 1000
    assert (run / "config.yaml").exists() and (run / "metrics.jsonl").stat().st_size > 0

    again = runner.invoke(app, ["eval", str(run)])
    assert again.exit_code == 0, again.output
    assert json.loads((run / "eval.json").read_text()) == pytest.approx(metrics)

    out = tmp_path / "emb.npz"
    emb = runner.invoke(app, ["embed", str(run), "--data", "test", "--out", str(out)])
    assert emb.exit_code == 0, emb.output
    import numpy as np

    arrays = np.load(out)
    assert arrays["embeddings/image"].shape == (500, 128)
    assert np.allclose(np.linalg.norm(arrays["embeddings/audio"], axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_emoji_recipe_word_tokenizer_end_to_end(data_root, tmp_path):
    """The committed emoji recipe (word tokenizer, min_frequency 2) trains, saves its word
    vocabulary, and re-evaluates from the run directory to the same figures."""
    run = tmp_path / "run"
    _train(["emoji-clip", "train.epochs=4", "eval.probe=false", "eval.plots=false", "--run-dir", str(run),
            "--data-root", str(data_root)])  # fmt: skip
    metrics = json.loads((run / "eval.json").read_text())
    # 400 held-out emoji: chance for R@10 is 0.025
    assert metrics["image->text/R@10"] > 0.1, metrics
    assert metrics["text->image/R@10"] > 0.1, metrics
    vocab = json.loads((run / "artifacts" / "tokenizer.json").read_text())
    assert vocab["model"]["type"] == "WordLevel"
    again = runner.invoke(app, ["eval", str(run)])
    assert again.exit_code == 0, again.output
    assert json.loads((run / "eval.json").read_text()) == pytest.approx(metrics)


def test_resume_equals_uninterrupted(data_root, tmp_path):
    common = ["basicmotions-clip", "train.epochs=6", "train.log_every=1", "--data-root", str(data_root)]
    _train([*common, "--run-dir", str(tmp_path / "full")])
    first = _train([*common, "--run-dir", str(tmp_path / "split"), "--max-epochs", "4"])
    assert "stopped early" in first.output
    assert not (tmp_path / "split" / "eval.json").exists()
    _train([*common, "--run-dir", str(tmp_path / "split")])
    full = json.loads((tmp_path / "full" / "eval.json").read_text())
    split = json.loads((tmp_path / "split" / "eval.json").read_text())
    assert split == full
    w_full = load_file(tmp_path / "full" / "checkpoints" / "epoch-0006" / "model.safetensors")
    w_split = load_file(tmp_path / "split" / "checkpoints" / "epoch-0006" / "model.safetensors")
    assert w_full.keys() == w_split.keys()
    assert all((w_full[k] == w_split[k]).all() for k in w_full)
    lines_full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    lines_split = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()

    def strip(lines):  # wall-clock fields differ between runs
        return [{k: v for k, v in json.loads(x).items() if "seconds" not in k and k != "samples_per_s"} for x in lines]

    assert strip(lines_full) == strip(lines_split)


def test_bad_config_exits_with_key_path(tmp_path):
    result = runner.invoke(app, ["train", "av-digits-clip", "train.epoch=1", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in result.output


def test_missing_data_root_lists_expected_files(tmp_path):
    result = runner.invoke(
        app, ["train", "av-digits-clip", "--run-dir", str(tmp_path / "r"), "--data-root", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "mnist_mlxtend5k/mnist_5k.csv.gz" in result.output
    assert "modalign datasets fetch av-digits" in result.output


def test_corrupt_manifest_row_is_reported(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    rows = [
        {"image": "ok.png", "caption": "a red square"},
        {"image": "bad.png", "caption": "broken"},
        {"image": "ok.png", "caption": "red again"},
    ]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "train",
        "av-digits-clip",
        "data={name: manifest, train_file: " + str(manifest) + "}",
        "model.encoders={image: {name: image_cnn}, caption: {name: text_bow}}",
        "--run-dir",
        str(tmp_path / "r"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "row 2" in result.output and "bad.png" in result.output


def test_recipes_and_datasets_commands():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0 and "av-digits-clip" in result.output
    result = runner.invoke(app, ["datasets"])
    assert result.exit_code == 0 and "basicmotions" in result.output
    result = runner.invoke(app, ["recipes", "--keys"])
    assert result.exit_code == 0 and "train.warmup_steps (int, default 100): Linear warm-up" in result.output
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "--run-dir" in result.output


@pytest.mark.parametrize(
    "extra",
    [["method.name=clip"], ["method.name=siglip"], ["method.name=clip", "train.precision=bf16"]],
    ids=["clip", "siglip", "clip-bf16"],
)
def test_basicmotions_methods_beat_chance(data_root, tmp_path, extra):
    _train(["basicmotions-clip", "train.epochs=80", *extra, "--run-dir", str(tmp_path), "--data-root", str(data_root)])
    metrics = json.loads((tmp_path / "eval.json").read_text())
    # 40 test recordings: instance retrieval chance at R@1 is 1/40 = 0.025
    assert metrics["accel->gyro/R@1"] >= 0.15, metrics
    assert metrics["gyro->accel/R@1"] >= 0.15, metrics


def test_manifest_train_and_embed_new_file(tmp_path):
    train_rows = colour_rows(tmp_path, 12, seed=0)
    test_rows = colour_rows(tmp_path, 4, seed=1)
    for name, rows in (("train.jsonl", train_rows), ("test.jsonl", test_rows)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = (
        f"data={{name: manifest, train_file: {tmp_path / 'train.jsonl'}, test_file: {tmp_path / 'test.jsonl'}, "
        "label_columns: [colour], image_size: 16, max_tokens: 8}"
    )
    run = tmp_path / "run"
    _train(
        [
            "av-digits-clip",
            data,
            "model.encoders={image: {name: image_cnn, widths: [16, 32]}, caption: {name: text_bow}}",
            "eval.label=colour",
            "train.epochs=15",
            "train.batch_size=16",
            "train.warmup_steps=5",
            "--run-dir",
            str(run),
        ]
    )
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["image->caption/p@1"] >= 0.5, metrics  # 8 colours: chance 0.125
    out = tmp_path / "emb.npz"
    result = runner.invoke(app, ["embed", str(run), "--data", str(tmp_path / "test.jsonl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    import numpy as np

    arrays = np.load(out)
    assert arrays["embeddings/image"].shape == (len(test_rows), 128)
    assert set(np.unique(arrays["labels/colour"])) == set(range(len(COLOURS)))

    shards = tmp_path / "shards"
    args = ["embed", str(run), "--data", str(tmp_path / "test.jsonl"), "--out", str(shards), "--shard-size", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    from modalign.eval.shards import iter_embedding_shards, load_embeddings

    assert [len(s) for s in iter_embedding_shards(shards)] == [5] * (len(arrays["ids"]) // 5) + (
        [len(arrays["ids"]) % 5] if len(arrays["ids"]) % 5 else []
    )
    sharded = load_embeddings(shards)
    assert np.array_equal(sharded.ids.numpy(), arrays["ids"])
    assert np.allclose(sharded.embeddings["image"].numpy(), arrays["embeddings/image"], atol=1e-6)
    assert np.array_equal(sharded.labels["colour"].numpy(), arrays["labels/colour"])


def test_datasets_fetch_command_from_file_mirror(data_root, tmp_path):
    import zipfile

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / "BasicMotions.zip", "w") as zf:
        for split in ("TRAIN", "TEST"):
            zf.write(data_root / "basicmotions" / f"BasicMotions_{split}.ts", f"BasicMotions/BasicMotions_{split}.ts")
    root = tmp_path / "data"
    result = runner.invoke(app, ["datasets", "fetch", "basicmotions", "--root", str(root), "--mirror", mirror.as_uri()])
    assert result.exit_code == 0, result.output
    for split in ("TRAIN", "TEST"):
        got = (root / "basicmotions" / f"BasicMotions_{split}.ts").read_bytes()
        assert got == (data_root / "basicmotions" / f"BasicMotions_{split}.ts").read_bytes()
    # a corrupted mirror fails with the checksum named, and installs nothing
    with zipfile.ZipFile(mirror / "BasicMotions.zip", "w") as zf:
        zf.writestr("BasicMotions/BasicMotions_TRAIN.ts", "corrupt")
        zf.writestr("BasicMotions/BasicMotions_TEST.ts", "corrupt")
    fresh = tmp_path / "fresh"
    result = runner.invoke(
        app, ["datasets", "fetch", "basicmotions", "--root", str(fresh), "--mirror", mirror.as_uri()]
    )
    assert result.exit_code == 2
    assert "sha256" in result.output
    assert not (fresh / "basicmotions").exists()
