"""Per-modality transforms: log-mel, audio, image, text tokenizer, series."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from modalign.core.errors import DataError
from modalign.data.transforms import (
    AudioTransform,
    ImageTransform,
    LogMel,
    SeriesTransform,
    TextTokenizer,
    TextTransform,
    draw_offsets,
    load_audio,
    load_image,
    mel_filterbank,
    offset_crop_windows,
    paired_crop_window,
)
from modalign.data.transforms.audio import hz_to_mel, mel_to_hz

SR = 8000


def tone(freq: float, seconds: float = 0.5, sr: int = SR) -> torch.Tensor:
    t = torch.arange(int(seconds * sr), dtype=torch.float32) / sr
    return 0.5 * torch.sin(2 * torch.pi * freq * t)


# ----------------------------------------------------------------------------------- log-mel


def test_logmel_shape_and_finite() -> None:
    lm = LogMel(sample_rate=SR, n_fft=256, hop_length=80, n_mels=40)
    out = lm(torch.randn(4000))
    assert out.shape == (40, 1 + 4000 // 80)
    assert torch.isfinite(out).all()
    silent = lm(torch.zeros(100))  # shorter than the window, all zeros: log(eps), still finite
    assert silent.shape == (40, 2) and torch.isfinite(silent).all()


@pytest.mark.parametrize("freq", [300.0, 1000.0, 2500.0])
def test_logmel_pure_tone_lands_in_nearest_mel_band(freq: float) -> None:
    lm = LogMel(sample_rate=SR, n_fft=256, hop_length=80, n_mels=40)
    energy = lm(tone(freq)).mean(dim=1)
    points = torch.linspace(float(hz_to_mel(torch.tensor(0.0))), float(hz_to_mel(torch.tensor(SR / 2.0))), 42)
    centers = mel_to_hz(points[1:-1])
    assert int(energy.argmax()) == int((centers - freq).abs().argmin())


def test_logmel_batched_equals_per_sample() -> None:
    torch.manual_seed(0)
    waves = torch.randn(3, 2400)
    lm = LogMel()
    batched = lm(waves)
    single = torch.stack([lm(w) for w in waves])
    assert batched.shape == (3, 40, 31)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_logmel_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[N\] or \[B, N\]"):
        LogMel()(torch.zeros(2, 3, 100))
    with pytest.raises(ValueError, match="N > 0"):
        LogMel()(torch.zeros(0))


def test_mel_filterbank_peaks_and_empty_filters() -> None:
    fb = mel_filterbank(SR, 256, 40)
    assert fb.shape == (129, 40)
    assert float(fb.max()) <= 1.0 and bool((fb.sum(0) > 0).all())
    with pytest.raises(ValueError, match="cover no STFT bin"):
        mel_filterbank(SR, 64, 80)


@pytest.mark.gpu
def test_logmel_on_gpu_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    lm = LogMel()
    wave = torch.randn(2, 8000)
    torch.testing.assert_close(lm.to("cuda")(wave.cuda()).cpu(), LogMel()(wave), rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------------- audio


def test_audio_transform_crops_long_and_keeps_short() -> None:
    at = AudioTransform(sample_rate=SR, max_seconds=1.0)
    assert at.max_frames == 101
    long = at(torch.randn(3 * SR))
    short = at(torch.randn(SR // 4))
    assert long.shape == (40, 101)
    assert short.shape == (40, 1 + (SR // 4) // 80)
    assert abs(float(long.mean())) < 1e-4 and abs(float(long.std(unbiased=False)) - 1) < 1e-3


def test_audio_transform_centre_crop_is_deterministic() -> None:
    at = AudioTransform(sample_rate=SR, max_seconds=0.5, normalize=False)
    wave = torch.randn(2 * SR)
    expected = at.logmel(wave[(2 * SR - SR // 2) // 2 :][: SR // 2])
    torch.testing.assert_close(at(wave), expected)


def test_audio_augmentation_seeded() -> None:
    at = AudioTransform(sample_rate=SR, augment=True, normalize=False)
    wave = tone(440.0, seconds=1.5)
    torch.manual_seed(1)
    a = at(wave)
    torch.manual_seed(1)
    b = at(wave)
    torch.manual_seed(2)
    c = at(wave)
    torch.testing.assert_close(a, b)
    assert a.shape[1] <= at.max_frames
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="mono waveform"):
        at(torch.zeros(2, 100))


def test_load_audio_real_file_and_resampling(data_root: Path) -> None:
    path = data_root / "fsdd" / "recordings" / "0_george_0.wav"
    native = load_audio(path, 8000)
    up = load_audio(path, 16000)
    assert native.dtype == torch.float32 and native.dim() == 1
    assert abs(up.shape[0] - 2 * native.shape[0]) <= 1
    assert float(native.abs().max()) <= 1.0


def test_load_audio_mixes_down_and_reports_bad_files(tmp_path: Path) -> None:
    stereo = np.stack([np.full(800, 0.5), np.full(800, -0.25)], axis=1).astype(np.float32)
    sf.write(tmp_path / "st.wav", stereo, 8000, subtype="FLOAT")
    torch.testing.assert_close(load_audio(tmp_path / "st.wav", 8000), torch.full((800,), 0.125))
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    with pytest.raises(DataError, match=r"bad\.wav"):
        load_audio(tmp_path / "bad.wav", 8000)
    with pytest.raises(DataError, match=r"missing\.wav"):
        load_audio(tmp_path / "missing.wav", 8000)


# ------------------------------------------------------------------------------------- image


def test_image_transform_grey_normalisation() -> None:
    img = np.zeros((28, 28), dtype=np.uint8)
    img[10:18, 10:18] = 255
    out = ImageTransform(28, 1)(img)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    assert float(out.min()) == -1.0 and float(out.max()) == 1.0
    assert float(out[0, 12, 12]) == 1.0 and float(out[0, 0, 0]) == -1.0


def test_image_transform_rgba_on_white_resize_and_channels() -> None:
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[16:48, 16:48] = (255, 0, 0, 255)  # opaque red square; the rest fully transparent
    out = ImageTransform(32, 3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(rgba)
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out[:, 0, 0], torch.ones(3))  # transparent -> white
    torch.testing.assert_close(out[:, 16, 16], torch.tensor([1.0, 0.0, 0.0]))
    grey = ImageTransform(32, 1, mean=0.0, std=1.0)(rgba)
    assert grey.shape == (1, 32, 32)
    assert abs(float(grey[0, 16, 16]) - 0.299) < 0.01  # BT.601 luma of pure red
    assert ImageTransform(16, 3)(np.full((28, 28), 128, dtype=np.uint8)).shape == (3, 16, 16)


def test_image_augmentation_seeded_and_identity() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    aug = ImageTransform(28, 1, augment=True)
    torch.manual_seed(3)
    a = aug(img)
    torch.manual_seed(3)
    b = aug(img)
    torch.manual_seed(4)
    c = aug(img)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    identity = ImageTransform(28, 1, augment=True, max_shift=0.0, max_rotate=0.0, scale=(1.0, 1.0))
    torch.testing.assert_close(identity(img), ImageTransform(28, 1)(img), atol=1e-5, rtol=0)


def test_image_transform_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="channels"):
        ImageTransform(28, 2)
    with pytest.raises(ValueError, match="mean has 2 values for 3 channels"):
        ImageTransform(28, 3, mean=(0.5, 0.5))
    with pytest.raises(DataError, match="uint8"):
        ImageTransform(28, 1)(np.zeros((28, 28), dtype=np.float32))
    with pytest.raises(DataError, match="shape"):
        ImageTransform(28, 1)(np.zeros((28, 28, 5), dtype=np.uint8))
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"x\.png"):
        load_image(tmp_path / "x.png")
    with pytest.raises(DataError, match=r"nope\.png"):
        load_image(tmp_path / "nope.png")


def test_load_image_real_png(data_root: Path) -> None:
    arr = load_image(data_root / "emoji_twemoji" / "img64" / "1f600.png")
    assert arr.shape == (64, 64, 4) and arr.dtype == np.uint8


# -------------------------------------------------------------------------------------- text

TEXTS = [
    "grinning face. face, grin",
    "waving hand: light skin tone. hand, wave, waving",
    "Café au lait. coffee, drink",
    "red heart. heart, love",
]


def test_tokenizer_round_trip_and_specials(tmp_path: Path) -> None:
    tok = TextTokenizer.fit(TEXTS, vocab_size=200)
    assert tok.pad_id == 0 and tok.vocab_size <= 200
    ids = tok.encode("a waving red heart in a café", max_tokens=32)
    assert int(ids[0]) == tok.cls_id and ids.dtype == torch.long
    again = TextTokenizer.from_json(tok.to_json())
    torch.testing.assert_close(again.encode("a waving red heart in a café"), ids)
    (tmp_path / "tok.json").write_text(tok.to_json())
    loaded = TextTokenizer.from_file(tmp_path / "tok.json")
    torch.testing.assert_close(loaded.encode("café"), tok.encode("café"))
    torch.testing.assert_close(tok.encode("CAFE"), tok.encode("café"))  # lowercase + strip accents
    assert (tok.encode("heart heart heart heart", max_tokens=3) > 0).all()


def test_tokenizer_truncation_and_never_empty() -> None:
    tok = TextTokenizer.fit(TEXTS, vocab_size=200)
    long = ", ".join(["hand"] * 50)
    assert tok.encode(long, max_tokens=8).shape == (8,)
    assert tok.encode("", max_tokens=8).tolist() == [tok.cls_id]
    assert TextTransform(tok, max_tokens=5)(long).shape == (5,)
    with pytest.raises(ValueError, match="max_tokens"):
        tok.encode("x", max_tokens=0)


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no non-empty text"):
        TextTokenizer.fit(["", "  "])
    with pytest.raises(DataError, match=r"missing\.json"):
        TextTokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(DataError, match="invalid"):
        TextTokenizer.from_json("{not json")


def test_word_tokenizer_keeps_whole_words_and_drops_punctuation() -> None:
    tok = TextTokenizer.fit(TEXTS, vocab_size=200, model="word")
    assert tok.tokens("Grinning face, red-heart!") == ["grinning", "face", "red", "heart"]
    assert tok.tokens("café au lait") == ["cafe", "au", "lait"]  # accents stripped
    ids = tok.encode("zebra face", max_tokens=8)
    assert ids.tolist() == [tok.cls_id, tok.unk_id, tok.encode("face")[1].item()]
    # the vocabulary is exactly the training words plus the 3 trained and 3 appended specials
    words = {w for t in TEXTS for w in re.findall(r"[a-z]+", t.lower().replace("é", "e"))}
    assert tok.vocab_size == len(words) + 6
    again = TextTokenizer.from_json(tok.to_json())
    assert again.tokens("red heart, coffee.") == ["red", "heart", "coffee"]
    small = TextTokenizer.fit(TEXTS, vocab_size=5, model="word")  # 3 specials + 2 of the 4 words seen twice
    assert small.vocab_size == 5 + 3 and small.tokens("face hand heart waving").count("[UNK]") == 2


def test_word_tokenizer_min_frequency_maps_rare_words_to_unk() -> None:
    tok = TextTokenizer.fit(TEXTS, vocab_size=200, min_frequency=2, model="word")
    # words seen at least twice in TEXTS: face, waving, hand, heart (+ 3 trained, 3 appended specials)
    assert tok.vocab_size == 6 + 4
    assert tok.tokens("grinning face, red heart") == ["[UNK]", "face", "[UNK]", "heart"]
    assert tok.encode("waving grin").tolist() == [tok.cls_id, tok.encode("waving")[1].item(), tok.unk_id]


def test_tokenizer_rejects_unknown_model() -> None:
    with pytest.raises(ValueError, match="model must be one of"):
        TextTokenizer.fit(TEXTS, model="bpe")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ series


def test_series_fit_statistics_and_normalisation() -> None:
    rng = np.random.default_rng(0)
    series = [rng.normal([[1.0], [-2.0], [5.0]], [[0.5], [2.0], [3.0]], size=(3, n)) for n in (50, 80, 120)]
    mean, std = SeriesTransform.fit(series)
    joined = np.concatenate(series, axis=1)
    np.testing.assert_allclose(mean, joined.mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(std, joined.std(axis=1), rtol=1e-10)
    tf = SeriesTransform(mean, std)
    out = torch.cat([tf(s) for s in series], dim=1)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=1, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)


def test_series_crop_windows() -> None:
    x = torch.arange(100, dtype=torch.float32).repeat(2, 1)
    centred = SeriesTransform(None, None, crop=80)(x)
    torch.testing.assert_close(centred[0], torch.arange(10, 90, dtype=torch.float32))
    assert paired_crop_window(100, 80, augment=False) == (10, 90)
    assert paired_crop_window(50, 80, augment=True) == (0, 50)
    torch.manual_seed(0)
    starts = {paired_crop_window(100, 80, augment=True)[0] for _ in range(50)}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 20
    explicit = SeriesTransform(None, None, crop=80, augment=True)(x, window=(3, 83))
    torch.testing.assert_close(explicit[1], torch.arange(3, 83, dtype=torch.float32))


def test_series_augmentation_and_errors() -> None:
    x = np.ones((3, 100), dtype=np.float32)
    plain = SeriesTransform([0.0] * 3, [1.0] * 3, jitter=0.1, scale=0.1)
    torch.testing.assert_close(plain(x), torch.ones(3, 100))  # no augment: jitter/scale off
    aug = SeriesTransform([0.0] * 3, [1.0] * 3, augment=True, jitter=0.1, scale=0.1)
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    torch.testing.assert_close(aug(x), a)
    assert not torch.allclose(a, torch.ones(3, 100))
    with pytest.raises(DataError, match=r"\[3, T\]"):
        plain(np.ones((4, 100), dtype=np.float32))
    with pytest.raises(DataError, match="one C"):
        SeriesTransform.fit([np.ones((3, 10)), np.ones((2, 10))])
    with pytest.raises(ValueError, match="both mean and std"):
        SeriesTransform([0.0], None)


def test_offset_crop_windows_fit_and_shift() -> None:
    assert offset_crop_windows(100, 80, 0, augment=False) == ((10, 90), (10, 90))  # paired_crop_window's
    assert offset_crop_windows(100, 80, 6, augment=False) == ((7, 87), (13, 93))  # the span is centred
    assert offset_crop_windows(100, 80, -6, augment=False) == ((13, 93), (7, 87))
    assert offset_crop_windows(100, 80, 20, augment=False) == ((0, 80), (20, 100))
    torch.manual_seed(0)
    for offset in (-20, -7, 0, 3, 20):
        starts = set()
        for _ in range(40):
            (a0, a1), (g0, g1) = offset_crop_windows(100, 80, offset, augment=True)
            assert g0 - a0 == offset and a1 - a0 == g1 - g0 == 80
            assert min(a0, g0) >= 0 and max(a1, g1) <= 100
            starts.add(a0)
        feasible = set(range(max(0, -offset), min(20, 20 - offset) + 1))
        assert starts <= feasible and len(starts) >= min(len(feasible), 5)
    with pytest.raises(ValueError, match="length - crop = 20"):
        offset_crop_windows(100, 80, 21, augment=False)
    with pytest.raises(ValueError, match="crop"):
        offset_crop_windows(100, 120, 0, augment=False)


def test_draw_offsets_range_and_generator() -> None:
    drawn = draw_offsets(5, 2000, torch.Generator().manual_seed(1))
    assert drawn.dtype == torch.int64 and set(drawn.tolist()) == set(range(-5, 6))
    torch.testing.assert_close(draw_offsets(5, 2000, torch.Generator().manual_seed(1)), drawn)
    assert draw_offsets(0, 7).tolist() == [0] * 7
    with pytest.raises(ValueError, match="max_offset"):
        draw_offsets(-1)
