"""Built-in real datasets: av-digits, emoji, basicmotions (read from ``$MODALIGN_DATA``)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from modalign.core.config import check_component
from modalign.core.errors import ConfigError, DataError, MissingDataRootError
from modalign.core.registry import available, create
from modalign.data.collate import collate
from modalign.data.datasets.av_digits import AVDigits
from modalign.data.datasets.basicmotions import BasicMotions
from modalign.data.datasets.emoji import TEST_BASES, EmojiDataset

FRAMEWORK_ARGS = frozenset({"root", "split", "seed", "augment", "artifacts"})


def take(name: str) -> tuple[int, str, int]:
    m = re.fullmatch(r"(\d)_([a-z]+)_(\d+)\.wav", name)
    assert m is not None, name
    return int(m.group(1)), m.group(2), int(m.group(3))


def test_registered_and_configurable() -> None:
    assert {"av-digits", "basicmotions", "emoji"} <= set(available("dataset"))
    name, kwargs = check_component(
        "dataset",
        {"name": "emoji", "test_variants": "true", "image_size": 24},
        "data.dataset",
        FRAMEWORK_ARGS,
    )
    assert name == "emoji" and kwargs == {"test_variants": True, "image_size": 24}
    with pytest.raises(ConfigError, match="test_size"):
        check_component("dataset", {"name": "av-digits", "test_sise": 5}, "data.dataset", FRAMEWORK_ARGS)
    with pytest.raises(ConfigError, match="crop"):
        check_component("dataset", {"name": "basicmotions", "crop": "long"}, "data.dataset", FRAMEWORK_ARGS)


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (AVDigits, ["mnist_mlxtend5k/mnist_5k.csv.gz", "fsdd/recordings"]),
        (
            EmojiDataset,
            ["emoji_twemoji/emoji.json", "emoji_twemoji/emojibase/en/data.json", "emoji_twemoji/img64"],
        ),
        (BasicMotions, ["basicmotions/BasicMotions_TRAIN.ts", "basicmotions/BasicMotions_TEST.ts"]),
    ],
)
def test_missing_files_list_expected_paths(tmp_path: Path, cls: type, expected: list[str]) -> None:
    with pytest.raises(MissingDataRootError) as info:
        cls(root=tmp_path, split="train")
    for rel in expected:
        assert str(tmp_path / rel) in str(info.value)
    assert "modalign datasets fetch" in str(info.value)


def test_bad_split_names_allowed_values(data_root: Path) -> None:
    for cls in (AVDigits, EmojiDataset, BasicMotions):
        with pytest.raises(ConfigError, match="allowed: train, test"):
            cls(root=data_root, split="valid")


# --------------------------------------------------------------------------------- av-digits


@pytest.fixture(scope="module")
def av_train(data_root: Path) -> AVDigits:
    return AVDigits(root=data_root, split="train", seed=0)


@pytest.fixture(scope="module")
def av_test(data_root: Path) -> AVDigits:
    return AVDigits(root=data_root, split="test", seed=0, test_size=500)


def test_av_lengths_specs_and_shapes(av_train: AVDigits, av_test: AVDigits) -> None:
    assert len(av_train) == 5000 and len(av_test) == 500
    assert av_train.augment and not av_test.augment
    specs = av_test.modalities
    assert specs["image"].kind == "image" and specs["image"].channels == 1 and specs["image"].size == 28
    assert specs["audio"].kind == "audio" and specs["audio"].channels == 40
    s = av_test[0]
    assert s.values["image"].shape == (1, 28, 28)
    assert s.values["audio"].shape[0] == 40 and 1 <= s.values["audio"].shape[1] <= 101
    torch.testing.assert_close(av_test[0].values["audio"], s.values["audio"])  # test: deterministic
    digits = Counter(av_test[i].labels["digit"] for i in range(len(av_test)))
    assert len(digits) == 10 and max(digits.values()) - min(digits.values()) <= 20  # stratified subset


def test_av_full_test_split(data_root: Path) -> None:
    full = AVDigits(root=data_root, split="test")
    assert len(full) == 10000
    assert {take(full.recording_name(i))[2] for i in range(len(full))} == set(range(5))


def test_av_recording_takes_follow_official_split(av_train: AVDigits, av_test: AVDigits) -> None:
    train_takes = {take(av_train.recording_name(i))[2] for i in range(len(av_train))}
    test_takes = {take(av_test.recording_name(i))[2] for i in range(len(av_test))}
    assert train_takes <= set(range(5, 50)) and len(train_takes) == 45
    assert test_takes <= set(range(5))


def test_av_pairs_share_digit_and_speaker_label(av_train: AVDigits) -> None:
    speakers = sorted({take(av_train.recording_name(i))[1] for i in range(len(av_train))})
    for i in range(0, len(av_train), 25):
        s = av_train[i]
        digit, speaker, _ = take(av_train.recording_name(i))
        assert s.labels["digit"] == digit
        assert s.labels["speaker"] == speakers.index(speaker)
        assert s.id == i


def test_av_pairing_is_balanced(av_train: AVDigits) -> None:
    uses = Counter(av_train.recording_name(i) for i in range(len(av_train)))
    assert len(uses) == 2700  # every training recording is used
    for d in range(10):
        counts = [c for name, c in uses.items() if name.startswith(f"{d}_")]
        assert max(counts) - min(counts) <= 1


def test_av_pairing_seeded_and_repaired_per_epoch(data_root: Path, av_train: AVDigits) -> None:
    names = [av_train.recording_name(i) for i in range(len(av_train))]
    again = AVDigits(root=data_root, split="train", seed=0)
    assert [again.recording_name(i) for i in range(len(again))] == names
    av_train.set_epoch(1)
    epoch1 = [av_train.recording_name(i) for i in range(len(av_train))]
    av_train.set_epoch(0)
    assert [av_train.recording_name(i) for i in range(len(av_train))] == names
    assert sum(a != b for a, b in zip(names, epoch1, strict=True)) > 4000
    fixed = AVDigits(root=data_root, split="train", seed=0, repair_each_epoch=False)
    fixed.set_epoch(5)
    assert [fixed.recording_name(i) for i in range(len(fixed))] == names


def test_av_test_pairing_depends_only_on_seed(data_root: Path, av_test: AVDigits) -> None:
    names = [av_test.recording_name(i) for i in range(len(av_test))]
    av_test.set_epoch(3)
    assert [av_test.recording_name(i) for i in range(len(av_test))] == names
    other = AVDigits(root=data_root, split="test", seed=1, test_size=500)
    assert [other.recording_name(i) for i in range(len(other))] != names


def test_av_augmentation_is_seeded(av_train: AVDigits) -> None:
    torch.manual_seed(0)
    a = av_train[7]
    torch.manual_seed(0)
    b = av_train[7]
    torch.manual_seed(1)
    c = av_train[7]
    torch.testing.assert_close(a.values["image"], b.values["image"])
    torch.testing.assert_close(a.values["audio"], b.values["audio"])
    assert not torch.allclose(a.values["image"], c.values["image"])


def test_av_image_augmentation_strength_is_configurable(data_root: Path) -> None:
    """No shift, rotation or zoom leaves the images as they are; a larger range moves them further."""
    plain = AVDigits(root=data_root, split="train", seed=0, augment=False)
    still = AVDigits(root=data_root, split="train", seed=0, max_shift=0.0, max_rotate=0.0, zoom=[1.0, 1.0])
    strong = AVDigits(root=data_root, split="train", seed=0, max_shift=0.2, max_rotate=30.0, zoom=[0.7, 1.3])
    default = AVDigits(root=data_root, split="train", seed=0)
    for i in range(5):
        torch.testing.assert_close(still[i].values["image"], plain[i].values["image"], atol=1e-5, rtol=0)

    def moved(ds: AVDigits) -> float:
        torch.manual_seed(3)
        return sum(float((ds[i].values["image"] - plain[i].values["image"]).abs().mean()) for i in range(40))

    assert moved(strong) > 1.3 * moved(default) > 0
    with pytest.raises(ConfigError, match="zoom"):
        AVDigits(root=data_root, split="train", zoom=[0.9])


def test_av_collate_pads_audio(av_test: AVDigits) -> None:
    samples = [av_test[i] for i in range(6)]
    batch = collate(samples, av_test.modalities)
    lengths = [s.values["audio"].shape[1] for s in samples]
    assert batch.data["image"].shape == (6, 1, 28, 28)
    assert batch.data["audio"].shape == (6, 40, max(lengths))
    assert batch.padding["audio"].sum(dim=1).tolist() == [max(lengths) - n for n in lengths]
    assert batch.labels["digit"].tolist() == [s.labels["digit"] for s in samples]


def test_av_bad_test_size(data_root: Path) -> None:
    with pytest.raises(ConfigError, match="test_size"):
        AVDigits(root=data_root, split="test", test_size=20000)


# ------------------------------------------------------------------------------------- emoji


@pytest.fixture(scope="module")
def emoji_train(data_root: Path) -> EmojiDataset:
    return EmojiDataset(root=data_root, split="train")


@pytest.fixture(scope="module")
def emoji_test(data_root: Path, emoji_train: EmojiDataset) -> EmojiDataset:
    return EmojiDataset(root=data_root, split="test", artifacts=emoji_train.artifacts())


def test_emoji_split_sizes_and_no_group_leakage(emoji_train: EmojiDataset, emoji_test: EmojiDataset) -> None:
    assert len(emoji_test) == TEST_BASES == 400
    assert not any(e.variant for e in emoji_test.entries)
    train_groups = {e.group for e in emoji_train.entries}
    test_groups = {e.group for e in emoji_test.entries}
    assert len(test_groups) == 400 and not train_groups & test_groups
    assert any(e.variant for e in emoji_train.entries)
    uids = [e.uid for e in emoji_train.entries + emoji_test.entries]
    assert len(uids) == len(set(uids))
    assert emoji_train.n_skipped == 0  # every Twemoji image has an English label


def test_emoji_variants_follow_their_base(data_root: Path, emoji_train: EmojiDataset, emoji_test: EmojiDataset) -> None:
    with_variants = EmojiDataset(
        root=data_root, split="test", artifacts=emoji_train.artifacts(), test_variants=True, seed=123
    )
    groups = {e.group for e in emoji_test.entries}
    extra = [e for e in with_variants.entries if e.variant]
    assert extra and {e.group for e in extra} <= groups
    assert {e.uid for e in with_variants.entries if not e.variant} == {e.uid for e in emoji_test.entries}
    assert any(": light skin tone." in e.text for e in extra)
    bases = {e.group: e for e in with_variants.entries if not e.variant}
    for e in extra:  # a variant has its own label and its base's tags
        base = bases[e.group]
        assert "skin tone" in e.label and e.label != base.label
        assert e.text[len(e.label) :] == base.text[len(base.label) :]


def test_emoji_tokenizer_required_and_shared(
    data_root: Path, emoji_train: EmojiDataset, emoji_test: EmojiDataset
) -> None:
    with pytest.raises(DataError, match="artifacts"):
        EmojiDataset(root=data_root, split="test")
    assert emoji_test.tokenizer.to_json() == emoji_train.tokenizer.to_json()
    # the cap bounds the trained vocabulary; [MASK], [BOS], [EOS] are appended after it
    assert emoji_test.modalities["text"].vocab_size == emoji_train.tokenizer.vocab_size <= 2000 + 3


def test_emoji_word_tokenizer(data_root: Path, emoji_train: EmojiDataset) -> None:
    train = EmojiDataset(root=data_root, split="train", tokenizer="word", vocab_size=10000, max_tokens=64, image_size=8)
    test = EmojiDataset(root=data_root, split="test", artifacts=train.artifacts(), image_size=8)
    assert test.tokenizer.to_json() == train.tokenizer.to_json()  # the test split reuses the word vocabulary
    e = train.entries[0]
    words = re.findall(r"[a-z0-9]+", e.text.lower())
    assert train.tokenizer.tokens(e.text) == words  # whole words, no commas or full stops
    ids = train[0].values["text"].tolist()
    assert ids == train.tokenizer.encode(e.text, 64).tolist() and len(ids) == len(words) + 1
    # every training word is in the vocabulary; held-out words it never saw map to [UNK]
    assert all(t != train.tokenizer.unk_id for i in range(len(train)) for t in train[i].values["text"].tolist())
    assert any(train.tokenizer.unk_id in test[i].values["text"].tolist() for i in range(len(test)))
    with pytest.raises(ValueError, match=r"model must be one of \('wordpiece', 'word'\), got 'bpe'"):
        EmojiDataset(root=data_root, split="train", tokenizer="bpe", image_size=8)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"data\.tokenizer: invalid value 'bpe'"):
        check_component("dataset", {"name": "emoji", "tokenizer": "bpe"}, "data")


def test_emoji_samples(emoji_train: EmojiDataset, emoji_test: EmojiDataset) -> None:
    s = emoji_test[0]
    assert s.values["image"].shape == (3, 32, 32)
    assert float(s.values["image"][:, 0, 0].min()) == 1.0  # transparent corner -> white -> +1
    tokens = s.values["text"]
    assert tokens.dtype == torch.long and int(tokens[0]) == emoji_test.tokenizer.cls_id and len(tokens) <= 32
    assert s.labels["group_id"] == emoji_test.entries[0].group
    assert 0 <= s.labels["category"] < len(emoji_test.category_names)
    batch = collate([emoji_test[i] for i in range(8)], emoji_test.modalities)
    assert batch.data["text"].shape[0] == 8 and batch.padding["text"].shape == batch.data["text"].shape
    assert (batch.data["text"][batch.padding["text"]] == 0).all()


def test_emoji_text_views(data_root: Path, emoji_train: EmojiDataset) -> None:
    """Keyword rewritings: fixed across runs, name first, a non-empty subset of the keywords."""
    train = EmojiDataset(root=data_root, split="train", image_size=8, text_views=4, seed=7)
    again = EmojiDataset(root=data_root, split="train", image_size=8, text_views=4, seed=8)
    assert train.raw_view_count("text") == 4 and train.raw_view_count("image") == 1
    differ = 0
    for c in range(0, len(train), 97):
        e = train.entries[c]
        views = [train.raw_view(c, "text", v) for v in range(4)]
        assert views == [again.raw_view(c, "text", v) for v in range(4)]  # independent of the run seed
        assert views[0] == e.text == train.raw_value(c, "text")
        for text in views[1:]:
            assert text.startswith(f"{e.label}.")
            kept = [t for t in text[len(e.label) + 2 :].split(", ") if t]
            assert (not e.tags and not kept) or (kept and set(kept) <= set(e.tags) and len(set(kept)) == len(kept))
        differ += len(set(views)) > 1
    assert differ > 0
    with pytest.raises(IndexError, match="view 1"):
        train.raw_view(0, "image", 1)
    # the dataset's own tokenizer path draws among the views; without augmentation only the text
    torch.manual_seed(0)
    rich = next(c for c in range(len(train)) if len({train.raw_view(c, "text", v) for v in range(4)}) == 4)
    drawn = {tuple(train[rich].values["text"].tolist()) for _ in range(40)}
    assert drawn == {tuple(train.tokenizer.encode(train.raw_view(rich, "text", v), 32).tolist()) for v in range(4)}
    test = EmojiDataset(root=data_root, split="test", artifacts=train.artifacts(), image_size=8, text_views=4)
    assert test.raw_view_count("text") == 1
    assert test[0].values["text"].tolist() == test.tokenizer.encode(test.entries[0].text, 32).tolist()
    with pytest.raises(DataError, match="text_views"):
        EmojiDataset(root=data_root, split="train", image_size=8, text_views=0)


# ------------------------------------------------------------------------------ basicmotions


@pytest.fixture(scope="module")
def motions(data_root: Path) -> dict[str, BasicMotions]:
    return {
        "train": BasicMotions(root=data_root, split="train"),
        "test": BasicMotions(root=data_root, split="test"),
        "full": BasicMotions(root=data_root, split="train", crop=100, augment=False),
    }


def test_basicmotions_sizes_labels_and_stats(motions: dict[str, BasicMotions]) -> None:
    assert len(motions["train"]) == 40 and len(motions["test"]) == 40
    assert motions["train"].class_names == ["Standing", "Running", "Walking", "Badminton"]
    full = motions["full"]
    for name in ("accel", "gyro"):
        x = torch.cat([full[i].values[name] for i in range(len(full))], dim=1)
        assert x.shape == (3, 4000)
        torch.testing.assert_close(x.mean(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(x.std(dim=1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
        torch.testing.assert_close(motions["test"].transforms[name].mean, full.transforms[name].mean)
    assert Counter(motions["test"][i].labels["activity"] for i in range(40)) == {0: 10, 1: 10, 2: 10, 3: 10}


def _offset(cropped: torch.Tensor, full: torch.Tensor) -> int:
    hits = [
        o
        for o in range(full.shape[1] - cropped.shape[1] + 1)
        if torch.allclose(full[:, o : o + cropped.shape[1]], cropped)
    ]
    assert len(hits) == 1
    return hits[0]


def test_basicmotions_crop_is_synchronised(data_root: Path, motions: dict[str, BasicMotions]) -> None:
    train, full = motions["train"], motions["full"]
    offsets = set()
    for seed in range(8):
        torch.manual_seed(seed)
        s = train[seed]
        ref = full[seed]
        o = _offset(s.values["accel"], ref.values["accel"])
        assert _offset(s.values["gyro"], ref.values["gyro"]) == o
        offsets.add(o)
    assert len(offsets) > 2  # a random window, not always the centre
    test_full = BasicMotions(root=data_root, split="test", crop=100)
    centred = motions["test"][3]
    assert _offset(centred.values["accel"], test_full[3].values["accel"]) == 10


def test_basicmotions_collate(motions: dict[str, BasicMotions]) -> None:
    ds = motions["test"]
    batch = collate([ds[i] for i in range(5)], ds.modalities)
    assert batch.data["accel"].shape == (5, 3, 80) and batch.data["gyro"].shape == (5, 3, 80)
    assert not batch.padding["accel"].any()
    assert batch.ids.tolist() == [0, 1, 2, 3, 4] and batch.labels["activity"].shape == (5,)
    assert ds.modalities["accel"].length == 80 and ds.modalities["gyro"].channels == 3


def test_create_from_registry(data_root: Path) -> None:
    ds = create("dataset", "basicmotions", root=data_root, split="test", crop=100)
    assert ds[0].values["gyro"].shape == (3, 100)


def test_basicmotions_offsets_shift_the_gyro_window(data_root: Path, motions: dict[str, BasicMotions]) -> None:
    """``max_offset``: gyro = the raw gyro series shifted by the offset of its accel window, |offset| <= K."""
    full = motions["full"]
    train = BasicMotions(root=data_root, split="train", max_offset=12)
    drawn = []
    for seed in range(40):
        torch.manual_seed(seed)
        s, ref = train[seed % 40], full[seed % 40]
        a, g = _offset(s.values["accel"], ref.values["accel"]), _offset(s.values["gyro"], ref.values["gyro"])
        drawn.append(g - a)
    assert all(-12 <= o <= 12 for o in drawn) and len(set(drawn)) > 8 and max(map(abs, drawn)) > 6
    torch.manual_seed(0)
    first = train.windows(3)
    assert first["gyro"][0] - first["accel"][0] in range(-12, 13)


def test_basicmotions_test_offsets_are_fixed(data_root: Path) -> None:
    """The test split's offsets are ``offsets`` (seeded by ``offset_seed``), the same on every read and run."""
    test = BasicMotions(root=data_root, split="test", max_offset=20)
    test_full = BasicMotions(root=data_root, split="test", crop=100)
    again = BasicMotions(root=data_root, split="test", max_offset=20, seed=5)
    torch.testing.assert_close(again.offsets, test.offsets)
    assert test.offsets.abs().max() <= 20 and len(set(test.offsets.tolist())) > 8
    other = BasicMotions(root=data_root, split="test", max_offset=20, offset_seed=1)
    assert not torch.equal(other.offsets, test.offsets)
    for i in range(len(test)):
        torch.manual_seed(i)
        s, ref = test[i], test_full[i]
        a, g = _offset(s.values["accel"], ref.values["accel"]), _offset(s.values["gyro"], ref.values["gyro"])
        assert g - a == int(test.offsets[i])
        torch.testing.assert_close(test[i].values["gyro"], s.values["gyro"])


def test_basicmotions_zero_offset_is_unchanged(data_root: Path, motions: dict[str, BasicMotions]) -> None:
    """``max_offset=0`` reads the same tensors with the same torch RNG draws as before the option."""
    explicit = BasicMotions(root=data_root, split="train", max_offset=0)
    for i in (0, 7, 39):
        torch.manual_seed(i)
        a = motions["train"][i]
        after_a = torch.rand(())
        torch.manual_seed(i)
        b = explicit[i]
        assert torch.rand(()) == after_a
        for name in ("accel", "gyro"):
            assert torch.equal(a.values[name], b.values[name])


def test_basicmotions_max_offset_errors_name_the_key(data_root: Path) -> None:
    with pytest.raises(ConfigError, match="max_offset: must be >= 0"):
        BasicMotions(root=data_root, split="train", max_offset=-1)
    with pytest.raises(ConfigError, match=r"max_offset: must be <= length - crop = 20"):
        BasicMotions(root=data_root, split="test", max_offset=21)
    with pytest.raises(ConfigError, match=r"max_offset.*= 0"):
        BasicMotions(root=data_root, split="train", crop=100, max_offset=1)


def test_basicmotions_max_offset_from_a_recipe(data_root: Path) -> None:
    """``data.max_offset=N`` reaches the dataset through the recipe."""
    from modalign.train.build import build_dataset
    from modalign.train.recipe import load_recipe

    recipe = load_recipe("basicmotions-clip", ["data.max_offset=5"])
    ds = build_dataset(recipe, "test", data_root=str(data_root))
    assert isinstance(ds, BasicMotions) and ds.max_offset == 5
