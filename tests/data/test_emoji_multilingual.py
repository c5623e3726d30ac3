"""``emoji-multilingual``: emoji's split with one text modality per language (real and tiny data)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from modalign.core.config import check_component
from modalign.core.errors import ConfigError, DataError
from modalign.core.registry import available, create
from modalign.data.catalog import CATALOG
from modalign.data.collate import collate
from modalign.data.datasets import emoji
from modalign.data.datasets.emoji import TEST_BASES, EmojiDataset
from modalign.data.datasets.emoji_multilingual import (
    LANGUAGES,
    EmojiMultilingualDataset,
    labels_file,
    split_characters,
    text_modality,
    tokenizer_file,
)
from modalign.data.transforms.text import TextTokenizer
from modalign.train.run import load_artifacts, save_artifacts

CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def dummy_artifacts(files: list[str]) -> dict[str, str]:
    """Tokenizers that only let a test split load (its texts are compared raw)."""
    tok = TextTokenizer.fit(["a b c"], vocab_size=10).to_json()
    return {f: tok for f in files}


# ----------------------------------------------------------------------------- no data needed


def test_registered_catalogued_and_configurable() -> None:
    assert "emoji-multilingual" in available("dataset")
    info = CATALOG["emoji-multilingual"]
    assert set(info.files) == {emoji.EMOJI_JSON, emoji.IMAGES, *(labels_file(lang) for lang in LANGUAGES)}
    installed = {m.dest for s in info.sources for m in s.members}
    assert set(info.files) <= installed  # `datasets fetch` installs every language the loader accepts
    assert {d for d in installed if d.endswith("data.json")} == {labels_file(lang) for lang in LANGUAGES}
    assert info.splits == CATALOG["emoji"].splits and info.labels == CATALOG["emoji"].labels
    name, kwargs = check_component("dataset", {"name": "emoji-multilingual", "languages": ["ja", "zh"]}, "data")
    assert name == "emoji-multilingual" and list(kwargs["languages"]) == ["ja", "zh"]
    with pytest.raises(ConfigError, match=r"data\.languages: invalid value \['en', 'xx'\]"):
        check_component("dataset", {"name": "emoji-multilingual", "languages": ["en", "xx"]}, "data")


@pytest.mark.parametrize(
    ("languages", "message"),
    [
        (["en", "fra"], r"languages: unknown language 'fra' of dataset 'emoji-multilingual' \(did you mean 'fr'\?\)"),
        (["klingon"], "unknown language 'klingon'"),
        ([], "expected a non-empty list of languages, got"),
        ("de", "expected a non-empty list of languages, got 'de'"),
        (["de", "en", "de"], r"languages repeated: \['de'\]"),
    ],
)
def test_bad_languages_list_the_allowed_ones(tmp_path: Path, languages: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        EmojiMultilingualDataset(root=tmp_path, languages=languages)
    assert str(info.value).endswith("; allowed: de, en, es, fr, ja, zh")


def test_split_characters() -> None:
    assert split_characters("口が斜めの顔. OK, ハート") == "口 が 斜 め の 顔 . OK, ハ ー ト"
    assert split_characters("带单片眼镜的脸") == "带 单 片 眼 镜 的 脸"
    assert split_characters("lächelndes  Gesicht") == "lächelndes Gesicht"


# ------------------------------------------------------------------- tiny synthetic data root


def write_tiny_root(root: Path, n_bases: int = TEST_BASES + 100) -> None:
    """``n_bases`` emoji (the first with two skin variants); German lacks some labels and tags."""
    folder = root / "emoji_twemoji"
    (folder / "img64").mkdir(parents=True)
    png = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    emoji_json, labels = [], {"en": [], "de": []}
    for i in range(n_bases):
        hexcode = f"{0x1F000 + i:X}"
        entry: dict[str, Any] = {"unified": hexcode, "image": f"{hexcode}.png", "category": f"c{i % 3}"}
        entry["sort_order"] = i
        skins = [f"{hexcode}-1F3FB", f"{hexcode}-1F3FC"] if i == 0 else []
        entry["skin_variations"] = {s: {"unified": s, "image": f"{s}.png"} for s in skins}
        emoji_json.append(entry)
        for code in (hexcode, *skins):
            png.save(folder / "img64" / f"{code}.png")
        labels["en"].append(
            {
                "hexcode": hexcode,
                "label": f"thing {i}",
                "tags": [f"t{i}"],
                "skins": [{"hexcode": s, "label": f"thing {i}: {s}"} for s in skins],
            }
        )
        if i % 5 == 1:
            continue  # no German entry at all
        de: dict[str, Any] = {
            "hexcode": hexcode,
            "label": f"Ding {i}",
            "skins": [{"hexcode": skins[0], "label": "Ding hell"}] if skins else [],
        }
        if i % 5 != 2:
            de["tags"] = [f"d{i}"]
        labels["de"].append(de)
    (folder / "emoji.json").write_text(json.dumps(emoji_json))
    for lang, items in labels.items():
        (folder / "emojibase" / lang).mkdir(parents=True)
        (folder / "emojibase" / lang / "data.json").write_text(json.dumps(items, ensure_ascii=False))


def base_index(hexcode: str) -> int:
    return int(hexcode, 16) - 0x1F000


def test_absent_language_rows_are_absent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_tiny_root(tmp_path)
    kw: dict[str, Any] = {"root": tmp_path, "image_size": 4, "languages": ["en", "de"]}
    with caplog.at_level("WARNING"):
        train = EmojiMultilingualDataset(split="train", **kw)
    test = EmojiMultilingualDataset(split="test", artifacts=train.artifacts(), test_variants=True, **kw)
    for ds in (train, test):
        expected_missing = [e for e in ds.entries if base_index(e.base_hexcode) % 5 == 1 or e.hexcode.endswith("1F3FC")]
        assert ds.n_missing == {"en": 0, "de": len(expected_missing)}
        for i, e in enumerate(ds.entries):
            s = ds[i]
            assert s.values["text_en"].tolist() == ds.tokenizers["en"].encode(e.text, ds.max_tokens).tolist()
            base = base_index(e.base_hexcode)
            if e in expected_missing:  # never borrowed from English
                assert "text_de" not in s.values and ds.text(i, "de") is None
                continue
            if e.variant:
                assert ds.text(i, "de") == f"Ding hell. d{base}"  # own label, its base's tags
            else:
                assert ds.text(i, "de") == (f"Ding {base}." if base % 5 == 2 else f"Ding {base}. d{base}")
            assert s.values["text_de"].tolist() == ds.tokenizers["de"].encode(ds.text(i, "de") or "", 32).tolist()
    n_bases = TEST_BASES + 100
    assert train.n_missing["de"] + test.n_missing["de"] == sum(i % 5 == 1 for i in range(n_bases)) + 1
    assert f"{train.n_missing['de']} of {len(train)} train images have no 'de' label" in caplog.text
    rows = {has: [i for i in range(len(train)) if ("text_de" in train[i].values) == has][:3] for has in (True, False)}
    batch = collate([train[i] for i in rows[True][:2] + rows[False]], train.modalities)
    assert batch.present["text_de"].tolist() == [True, True, False, False, False]
    assert batch.present["text_en"].all() and batch.present["image"].all()


def test_language_file_missing_names_it(tmp_path: Path) -> None:
    write_tiny_root(tmp_path, n_bases=3)
    with pytest.raises(DataError, match=r"emojibase/fr/data.json  \(missing\)"):
        EmojiMultilingualDataset(root=tmp_path, languages=["en", "fr"])


# -------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_same_test_split_as_emoji(data_root: Path) -> None:
    files = [tokenizer_file(lang) for lang in LANGUAGES]
    for variants in (False, True):
        ml = EmojiMultilingualDataset(
            root=data_root,
            split="test",
            artifacts=dummy_artifacts(files),
            languages=list(LANGUAGES),
            image_size=8,
            test_variants=variants,
        )
        en = EmojiDataset(
            root=data_root,
            split="test",
            artifacts=dummy_artifacts(["tokenizer.json"]),
            image_size=8,
            test_variants=variants,
        )
        assert len(ml) == len(en) >= TEST_BASES
        assert [(e.uid, e.hexcode, e.group, e.category) for e in ml.entries] == [
            (e.uid, e.hexcode, e.group, e.category) for e in en.entries
        ]
        assert ml.texts["en"] == [e.text for e in en.entries]  # English text is emoji's text
        assert ml.n_missing == dict.fromkeys(LANGUAGES, 0)  # emojibase 17 labels every emoji everywhere
        for i in (0, len(ml) - 1):
            a, b = ml[i], en[i]
            assert a.id == b.id and a.labels == b.labels
            torch.testing.assert_close(a.values["image"], b.values["image"])
    assert len({ml.text(0, lang) for lang in LANGUAGES}) >= 5  # really different languages


@pytest.fixture(scope="module")
def ml_train(data_root: Path) -> EmojiMultilingualDataset:
    return EmojiMultilingualDataset(
        root=data_root,
        languages=["en", "de", "ja", "zh"],
        tokenizer="word",
        min_frequency=2,
        vocab_size=4000,
        max_tokens=64,
        image_size=8,
    )


@pytest.mark.slow
def test_modalities_and_tokenizers_saved_and_reloaded(
    data_root: Path, tmp_path: Path, ml_train: EmojiMultilingualDataset
) -> None:
    names = ["image", "text_de", "text_en", "text_ja", "text_zh"]
    assert list(ml_train.modalities) == names
    arts = ml_train.artifacts()
    assert sorted(arts) == ["tokenizer_de.json", "tokenizer_en.json", "tokenizer_ja.json", "tokenizer_zh.json"]
    assert len(set(arts.values())) == 4  # one tokenizer per language
    save_artifacts(ml_train, tmp_path)  # as `modalign train` does; `eval` reloads them from files
    reloaded = load_artifacts(tmp_path)
    test = create(
        "dataset",
        "emoji-multilingual",
        root=data_root,
        split="test",
        artifacts=reloaded,
        languages=["en", "de", "ja", "zh"],
        max_tokens=64,
        image_size=8,
    )
    assert test.artifacts() == arts
    for lang in ("en", "de", "ja", "zh"):
        spec = test.modalities[text_modality(lang)]
        assert spec.kind == "text" and spec.vocab_size == ml_train.tokenizers[lang].vocab_size
    with pytest.raises(DataError, match=r"needs artifacts\['tokenizer_ja.json'\]: pass the train split"):
        EmojiMultilingualDataset(
            root=data_root,
            split="test",
            artifacts={k: v for k, v in arts.items() if "ja" not in k},
            languages=["en", "de", "ja", "zh"],
        )


@pytest.mark.slow
def test_samples_per_language(ml_train: EmojiMultilingualDataset) -> None:
    for i in (0, 100, len(ml_train) - 1):
        s, e = ml_train[i], ml_train.entries[i]
        assert set(s.values) == {"image", "text_de", "text_en", "text_ja", "text_zh"}
        assert s.values["image"].shape == (3, 8, 8) and s.labels == {"category": e.category, "group_id": e.group}
        for lang in ("de", "ja"):
            tok = ml_train.tokenizers[lang]
            text = ml_train.text(i, lang)
            assert text is not None
            ids = s.values[text_modality(lang)]
            assert ids.dtype == torch.long and int(ids[0]) == tok.cls_id and len(ids) <= 64
            source = split_characters(text) if lang == "ja" else text
            assert ids.tolist() == tok.encode(source, 64).tolist()


@pytest.mark.slow
def test_ja_zh_are_tokenised_per_character(data_root: Path, ml_train: EmojiMultilingualDataset) -> None:
    held_out = EmojiMultilingualDataset(
        root=data_root, split="test", artifacts=ml_train.artifacts(), languages=["en", "de", "ja", "zh"], image_size=8
    )
    for lang in ("ja", "zh"):
        tok = ml_train.tokenizers[lang]
        text = ml_train.text(0, lang) or ""
        cjk_tokens = [t for t in tok.tokens(split_characters(text)) if CJK.search(t)]
        assert cjk_tokens and all(len(t) == 1 for t in cjk_tokens)
        # whole phrases as words: held-out text is mostly [UNK]; per character it is mostly known
        phrases = TextTokenizer.fit(
            [t for t in ml_train.texts[lang] if t], vocab_size=4000, min_frequency=2, model="word"
        )
        test_texts = [t for t in held_out.texts[lang] if t]
        unk_phrases = np.mean([t == "[UNK]" for x in test_texts for t in phrases.tokens(x)])
        unk_chars = np.mean([t == "[UNK]" for x in test_texts for t in tok.tokens(split_characters(x))])
        assert unk_chars < unk_phrases / 3, (lang, unk_chars, unk_phrases)
