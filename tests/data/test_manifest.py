"""The ``manifest`` dataset: a user's own paired data from JSONL/CSV, with row-precise errors."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from modalign.core.config import check_component
from modalign.core.errors import ConfigError, DataError
from modalign.core.registry import create
from modalign.data.collate import collate
from modalign.data.datasets.manifest import ManifestDataset, holdout_split, stable_id

SMALL = {
    "image_size": 16,
    "sample_rate": 8000,
    "n_mels": 16,
    "n_fft": 256,
    "hop_length": 80,
    "max_seconds": 0.5,
    "vocab_size": 60,
    "max_tokens": 8,
}
CAPTIONS = [
    "a red square",
    "a green square",
    "a blue circle",
    "a red circle",
    "a big green square",
    "a tiny blue dot",
    "two red squares",
    "a green circle",
    "a blue square",
    "one red dot",
]


def _write_assets(folder: Path, n: int) -> list[dict[str, Any]]:
    """Write ``n`` PNG/WAV/NPY files under ``folder``; return the manifest rows (paths relative)."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    (folder / "wav").mkdir()
    (folder / "npy").mkdir()
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "img" / f"{i}.png")
        wave = 0.3 * np.sin(np.arange(2000 + 100 * i) * (0.05 + 0.01 * i))
        sf.write(folder / "wav" / f"{i}.wav", wave, 8000)
        np.save(folder / "npy" / f"s{i}.npy", rng.normal(size=(3, 20 + i)).astype(np.float32))
        np.save(folder / "npy" / f"v{i}.npy", rng.normal(size=5))
        rows.append(
            {
                "id": f"item-{i}",
                "photo": f"img/{i}.png",
                "sound": f"wav/{i}.wav",
                "caption": CAPTIONS[i % len(CAPTIONS)],
                "motion": f"npy/s{i}.npy",
                "feat": f"npy/v{i}.npy",
                "colour": ["red", "green", "blue"][i % 3],
            }
        )
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns = list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows([{c: "" if r.get(c) is None else r[c] for c in columns} for r in rows])
    return path


def _dataset(path: Path, **kwargs: Any) -> ManifestDataset:
    """Train split over every row (``test_file`` = the same file) unless kwargs say otherwise."""
    args = {**SMALL, "label_columns": ["colour"], "augment": False, "test_file": str(path), **kwargs}
    return ManifestDataset(train_file=str(path), **args)


@pytest.fixture
def rows(tmp_path: Path) -> list[dict[str, Any]]:
    return _write_assets(tmp_path, 10)


EXPECTED_KINDS = {"caption": "text", "feat": "vector", "motion": "series", "photo": "image", "sound": "audio"}


def test_jsonl_infers_kinds_and_yields_tensors(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    ds = _dataset(_write_jsonl(tmp_path / "m.jsonl", rows))
    assert ds.kinds == EXPECTED_KINDS
    assert len(ds) == 10 and ds.n_skipped == 0 and ds.label_names == ("colour",)
    specs = ds.modalities
    assert (specs["photo"].channels, specs["photo"].size) == (3, 16)
    assert specs["sound"].channels == 16 and specs["motion"].channels == 3 and specs["feat"].channels == 5
    assert specs["caption"].vocab_size == ds.tokenizers["caption"].vocab_size
    s = ds[4]
    assert s.values["photo"].shape == (3, 16, 16)
    assert s.values["sound"].shape[0] == 16 and s.values["sound"].shape[1] > 1
    assert s.values["motion"].shape == (3, 24)
    assert torch.allclose(s.values["feat"], torch.from_numpy(np.load(tmp_path / "npy/v4.npy")).float())
    assert s.values["caption"][0] == ds.tokenizers["caption"].cls_id
    assert s.id == stable_id("item-4") and ds.label_classes("colour") == ("blue", "green", "red")
    assert s.labels == {"colour": 1}  # "green" is index 1 of the sorted classes


def test_csv_gives_the_same_samples_as_jsonl(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    a = _dataset(_write_jsonl(tmp_path / "m.jsonl", rows))
    b = _dataset(_write_csv(tmp_path / "m.csv", rows))
    assert b.kinds == EXPECTED_KINDS
    for i in (0, 7):
        sa, sb = a[i], b[i]
        assert sa.id == sb.id and sa.labels == sb.labels
        for k in EXPECTED_KINDS:
            assert torch.equal(sa.values[k], sb.values[k]), k


def test_missing_values_collate_as_absent(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    rows[1]["sound"] = None
    rows[2]["caption"] = ""
    del rows[3]["photo"]  # an absent JSONL key is missing too
    ds = _dataset(_write_jsonl(tmp_path / "m.jsonl", rows))
    batch = collate([ds[i] for i in range(4)], ds.modalities)
    assert batch.present["sound"].tolist() == [True, False, True, True]
    assert batch.present["caption"].tolist() == [True, True, False, True]
    assert batch.present["photo"].tolist() == [True, True, True, False]
    assert batch.data["sound"][1].abs().sum() == 0 and batch.padding["sound"][1].all()


def test_csv_empty_cell_is_missing(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    rows[0]["feat"] = None
    ds = _dataset(_write_csv(tmp_path / "m.csv", rows))
    assert "feat" not in ds[0].values and "feat" in ds[1].values


def test_missing_file_names_row_column_and_path(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    rows[2]["sound"] = "wav/nope.wav"
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError) as e:
        _dataset(path)
    msg = str(e.value)
    assert "data row 3" in msg and "'sound'" in msg and str(tmp_path / "wav" / "nope.wav") in msg
    assert str(path) in msg and "does not exist" in msg


def test_corrupt_png_names_row_and_path(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    (tmp_path / "img" / "1.png").write_bytes(np.random.default_rng(1).bytes(300))
    with pytest.raises(DataError) as e:
        _dataset(_write_csv(tmp_path / "m.csv", rows))
    msg = str(e.value)
    assert "data row 2" in msg and str(tmp_path / "img" / "1.png") in msg and "'photo'" in msg


def test_npy_rank_and_channels_are_checked(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    np.save(tmp_path / "npy" / "s5.npy", np.zeros((4, 20), np.float32))  # 4 channels, not 3
    np.save(tmp_path / "npy" / "v6.npy", np.zeros((2, 5)))  # a vector of rank 2
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError, match=r"data row 6 .*'motion'.*s5\.npy.*4 channels.*has 3"):
        _dataset(path)
    ds = _dataset(path, skip_bad=True)
    assert ds.n_skipped == 2 and "data row 7" in ds.skipped[1] and "rank 1" in ds.skipped[1]


def test_skip_bad_skips_and_counts(
    tmp_path: Path, rows: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    rows[2]["sound"] = "wav/nope.wav"
    (tmp_path / "img" / "5.png").write_bytes(b"not a png at all")
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        ds = _dataset(path, skip_bad=True)
    assert len(ds) == 8 and ds.n_skipped == 2
    assert "data row 3" in ds.skipped[0] and "nope.wav" in ds.skipped[0]
    assert "data row 6" in ds.skipped[1] and "5.png" in ds.skipped[1]
    assert sorted(ds.row_number(i) for i in range(len(ds))) == [1, 2, 4, 5, 7, 8, 9, 10]
    assert any("skipped 2 of 10 rows" in r.getMessage() for r in caplog.records)


def test_every_row_bad_raises_even_with_skip_bad(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    path = _write_jsonl(tmp_path / "m.jsonl", [{**r, "photo": "img/gone.png"} for r in rows])
    with pytest.raises(DataError, match="no usable row"):
        _dataset(path, skip_bad=True, modalities={"photo": "image"}, label_columns=[])
    path = _write_jsonl(tmp_path / "n.jsonl", [{**r, "motion": "npy/v0.npy"} for r in rows])  # rank 1
    with pytest.raises(DataError, match=r"column 'motion' \(series\) has no readable \.npy value"):
        _dataset(path, skip_bad=True, modalities={"motion": "series"}, label_columns=[])


def test_unknown_modality_column_lists_the_header(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError) as e:
        _dataset(path, modalities={"photo": "image", "picture": "image"})
    assert "'picture'" in str(e.value) and "'photo'" in str(e.value) and "'caption'" in str(e.value)
    with pytest.raises(ConfigError, match=r"modalities\.photo"):
        _dataset(path, modalities={"photo": "picture"})


def test_explicit_modalities_select_columns(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    ds = _dataset(
        _write_csv(tmp_path / "m.csv", rows), modalities={"photo": "image", "caption": "text"}, image_channels=1
    )
    assert ds.kinds == {"caption": "text", "photo": "image"}
    assert set(ds[0].values) == {"caption", "photo"} and ds[0].values["photo"].shape == (1, 16, 16)


def test_holdout_split_and_artifacts(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    rows = [{k: v for k, v in r.items() if k != "id"} for r in rows * 2]  # 20 rows, no ids: index = id
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    train = _dataset(path, seed=3, test_file=None)
    assert sorted(train.artifacts()) == ["series-motion.json", "tokenizer-caption.json"]
    with pytest.raises(DataError, match=r"tokenizer-caption\.json"):
        _dataset(path, seed=3, split="test", test_file=None)
    test = _dataset(path, seed=3, split="test", test_file=None, artifacts=train.artifacts())
    train_ids = {train[i].id for i in range(len(train))}
    test_ids = {test[i].id for i in range(len(test))}
    assert len(test) == 2 and len(train) == 18 and not train_ids & test_ids
    assert train_ids | test_ids == set(range(20))
    assert test.tokenizers["caption"].to_json() == train.tokenizers["caption"].to_json()
    assert torch.equal(
        test[0].values["caption"], train.tokenizers["caption"].encode(rows[test.row_number(0) - 1]["caption"], 8)
    )
    assert np.array_equal(holdout_split(20, 3)[1], holdout_split(20, 3)[1])
    other = _dataset(path, seed=4, split="test", test_file=None, artifacts=train.artifacts())
    assert {other[i].id for i in range(len(other))} != test_ids


def test_word_tokenizer_option(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    ds = _dataset(path, tokenizer="word", min_frequency=2)
    tok = ds.tokenizers["caption"]
    # 3 leading specials, the words in at least two of the ten captions (a, red, green, blue,
    # square, circle, dot), then the 3 appended specials [MASK], [BOS], [EOS]
    assert tok.vocab_size == 3 + 7 + 3
    assert tok.tokens("a big red squares!") == ["a", "[UNK]", "red", "[UNK]"]
    assert ds[0].values["caption"].tolist() == tok.encode(rows[0]["caption"], 8).tolist()


def test_ids_and_unseen_test_labels(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    train_path = _write_jsonl(tmp_path / "train.jsonl", rows)
    test_rows = [{**rows[0], "colour": "purple"}, {**rows[1], "id": 42}, {**rows[2], "id": "item-0"}]
    test_path = _write_jsonl(tmp_path / "test.jsonl", test_rows)
    train = _dataset(train_path)
    test = _dataset(train_path, test_file=str(test_path), split="test", artifacts=train.artifacts())
    assert test[0].labels == {} and test[1].labels == {"colour": 1}
    assert test[1].id == 42 and test[2].id == test[0].id == train[0].id  # equal ids, same content


def test_relative_paths_resolve_against_root(
    tmp_path: Path, rows: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_jsonl(tmp_path / "m.jsonl", rows)
    assert len(_dataset(Path("m.jsonl"), root=str(tmp_path), test_file=None)) == 9
    monkeypatch.chdir(tmp_path)
    assert len(_dataset(Path("m.jsonl"), root=str(tmp_path / "absent"), test_file=None)) == 9
    with pytest.raises(DataError, match="does not exist"):
        _dataset(Path("other.jsonl"), root=str(tmp_path))


def test_registry_and_config_validation(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    name, kwargs = check_component(
        "dataset",
        {"name": "manifest", "train_file": str(path), "modalities": {"photo": "image"}, "image_size": "16"},
        "data",
    )
    assert kwargs["image_size"] == 16
    ds = create("dataset", name, **kwargs)
    assert isinstance(ds, ManifestDataset) and ds.kinds == {"photo": "image"}
    with pytest.raises(ConfigError, match="train_file"):
        check_component("dataset", {"name": "manifest"}, "data")


def test_bad_manifest_format_and_json(tmp_path: Path) -> None:
    (tmp_path / "m.txt").write_text("x\n")
    with pytest.raises(DataError, match="unknown format"):
        _dataset(tmp_path / "m.txt")
    (tmp_path / "m.csv").write_text('caption,colour\n"a cat\non two lines",red\ndog,blue,extra\n')
    with pytest.raises(DataError, match=r"data row 2 \(1-based.*more fields than the header's 2"):
        _dataset(tmp_path / "m.csv")
    (tmp_path / "m.jsonl").write_text('{"caption": "a cat"}\n\n[1, 2]\n')
    with pytest.raises(DataError, match=r"data row 2 \(1-based"):
        _dataset(tmp_path / "m.jsonl", label_columns=[])


def test_holdout_keeps_the_rows_of_one_id_together(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    # five captions per photo (the COCO layout): 10 ids x 5 rows; a held-out id takes all its rows
    many = [{**r, "id": f"photo-{i}", "caption": f"{r['caption']} {k}"} for i, r in enumerate(rows) for k in range(5)]
    path = _write_jsonl(tmp_path / "m.jsonl", many)
    train = _dataset(path, seed=3, test_file=None)
    test = _dataset(path, seed=3, split="test", test_file=None, artifacts=train.artifacts())
    train_ids = [train[i].id for i in range(len(train))]
    test_ids = [test[i].id for i in range(len(test))]
    assert not set(train_ids) & set(test_ids)
    assert len(set(test_ids)) == 1 and len(test_ids) == 5 and len(train) == 45
    # all groups distinct: the same split as one group per row; group sizes are respected
    keys = [f"k{i}" for i in range(20)]
    for a, b in zip(holdout_split(20, 3, keys), holdout_split(20, 3), strict=True):
        assert np.array_equal(a, b)
    groups = [i // 4 for i in range(40)]  # 10 groups of 4 rows
    tr, te = holdout_split(40, 5, groups)
    assert len(te) == 4 and {groups[i] for i in te}.isdisjoint({groups[i] for i in tr})
    with pytest.raises(DataError, match="2 distinct ids"):
        holdout_split(3, 0, ["same"] * 3)


def test_raw_inputs_for_pretrained_encoders(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    """Text inline, images from their files at their own size, audio decoded; rows without a value have no content."""
    from modalign.core.errors import DataError
    from modalign.data.raw import Waveform

    rows[2]["caption"] = ""
    del rows[3]["photo"]
    ds = _dataset(_write_jsonl(tmp_path / "m.jsonl", rows))
    assert ds.raw_count("caption") == 9 and ds.raw_count("photo") == 9 and ds.raw_count("sound") == 10
    assert [ds.raw_index(i, "caption") for i in (0, 1, 3, 4)] == [0, 1, 2, 3]  # row 2 has no caption
    assert ds.raw_value(ds.raw_index(4, "caption"), "caption") == rows[4]["caption"]
    pixels = ds.raw_value(ds.raw_index(5, "photo"), "photo")
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, np.asarray(Image.open(tmp_path / "img/5.png").convert("RGB")))  # 17 x 10, not 16
    wave = ds.raw_value(ds.raw_index(6, "sound"), "sound")
    assert isinstance(wave, Waveform) and wave.sample_rate == 8000 and wave.samples.shape == (2600,)
    with pytest.raises(DataError, match=r"row 3.*caption.*no value"):
        ds.raw_index(2, "caption")
    with pytest.raises(NotImplementedError, match="raw 'motion'"):
        ds.raw_count("motion")
