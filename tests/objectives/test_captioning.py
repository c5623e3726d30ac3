"""Captioning (CoCa): teacher forcing, token cross-entropy, greedy decoding, the objective and the preset."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from modalign.core import Batch, ConfigError, ModalitySpec
from modalign.data.collate import collate
from modalign.data.transforms.text import TextTokenizer
from modalign.methods import Method
from modalign.objectives import Captioning, caption_loss, greedy_decode
from modalign.objectives.captioning import (
    CaptionDecoder,
    CaptionDetokenizer,
    CaptionTokens,
    caption_tokens,
    find_captioner,
    greedy_search,
    score_captions,
    target_counts,
    teacher_forcing,
    unigram_scores,
)
from modalign.train.build import build_method
from modalign.train.recipe import expand_method, validate_recipe
from support.ddp import init_gloo, spawn_ranks

TEXTS = [
    "grinning face. face, grin",
    "waving hand: light skin tone. hand, wave, waving",
    "red heart. heart, love",
    "smiling face with heart-eyes. face, love, smile",
    "ok",
]


# ---------------------------------------------------------------- special ids and teacher forcing


@pytest.mark.parametrize("model", ["word", "wordpiece"])
def test_special_ids_follow_the_tokenizer_convention(model: str) -> None:
    tok = TextTokenizer.fit(TEXTS, vocab_size=100, model=model)  # type: ignore[arg-type]
    ids = caption_tokens(tok.vocab_size)
    want = (tok.pad_id, tok.cls_id, tok.mask_id, tok.bos_id, tok.eos_id)
    assert (ids.pad, ids.cls, ids.mask, ids.bos, ids.eos) == want
    assert ids.bos == tok.vocab_size - 2 and ids.eos == tok.vocab_size - 1
    reloaded = TextTokenizer.from_json(tok.to_json())
    assert caption_tokens(reloaded.vocab_size) == ids


def test_too_small_vocabulary_raises() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        caption_tokens(5)


def encoded_batch(tok: TextTokenizer, texts: list[str], max_tokens: int = 32, bos_eos: bool = False) -> Batch:
    from modalign.core.types import Sample

    samples = [Sample(i, {"text": tok.encode(t, max_tokens, bos_eos)}) for i, t in enumerate(texts)]
    return collate(samples, {"text": ModalitySpec("text", vocab_size=tok.vocab_size)})


@pytest.mark.parametrize("bos_eos", [False, True])
@pytest.mark.parametrize("model", ["word", "wordpiece"])
def test_teacher_forcing_matches_the_bos_eos_encoding(model: str, bos_eos: bool) -> None:
    """Inputs/targets equal ``[BOS] w.. [EOS]`` from the tokenizer itself, shifted by one."""
    tok = TextTokenizer.fit(TEXTS, vocab_size=100, model=model)  # type: ignore[arg-type]
    batch = encoded_batch(tok, TEXTS, bos_eos=bos_eos)
    inputs, targets, padding = teacher_forcing(batch.data["text"], batch.padding["text"], tok.bos_id, tok.eos_id)
    for i, text in enumerate(TEXTS):
        full = tok.encode(text, 32, bos_eos=True).tolist()  # [BOS] w1 .. wn [EOS]
        n = len(full) - 1
        assert inputs[i, :n].tolist() == full[:-1] and targets[i, :n].tolist() == full[1:]
        assert not padding[i, :n].any() and padding[i, n:].all()
        assert (inputs[i, n:] == 0).all() and (targets[i, n:] == 0).all()
    assert inputs.shape[1] == max(len(tok.encode(t, 32, bos_eos=True)) for t in TEXTS) - 1


def test_teacher_forcing_padding_defaults_to_zero_ids_and_validates() -> None:
    ids = torch.tensor([[2, 7, 8, 0], [2, 0, 0, 0]])
    inputs, targets, padding = teacher_forcing(ids, None, bos=20, eos=21)
    assert inputs.tolist() == [[20, 7, 8], [20, 0, 0]]
    assert targets.tolist() == [[7, 8, 21], [21, 0, 0]]
    assert padding.tolist() == [[False, False, False], [False, True, True]]
    with pytest.raises(ValueError, match="first"):
        teacher_forcing(torch.tensor([[0, 0]]), None, 20, 21)
    with pytest.raises(ValueError, match="padding"):
        teacher_forcing(ids, torch.zeros(2, 3, dtype=torch.bool), 20, 21)
    with pytest.raises(ValueError, match="LongTensor"):
        teacher_forcing(ids.float(), None, 20, 21)


# ---------------------------------------------------------------- caption_loss against references


def loop_caption_loss(logits: Tensor, targets: Tensor, padding: Tensor, eps: float = 0.0) -> Tensor:
    """Direct formula: explicit loops over rows and positions, log-softmax written out."""
    total, count = torch.zeros((), dtype=logits.dtype), 0
    n, t, v = logits.shape
    for i in range(n):
        for j in range(t):
            if bool(padding[i, j]):
                continue
            z = logits[i, j]
            log_norm = torch.log(torch.stack([torch.exp(z[k]) for k in range(v)]).sum())
            nll = log_norm - z[int(targets[i, j])]
            uniform = torch.stack([log_norm - z[k] for k in range(v)]).mean()
            total = total + (1 - eps) * nll + eps * uniform
            count += 1
    return total / count


def numpy_caption_loss(logits: np.ndarray, targets: np.ndarray, padding: np.ndarray) -> float:
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return float(-(picked * ~padding).sum() / (~padding).sum())


def random_case(seed: int, n: int = 3, t: int = 5, v: int = 7) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, v, (n, t), generator=g)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    padding = torch.arange(t)[None, :] >= lengths[:, None]
    return logits, targets, padding


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_value_and_gradient_match_the_loop_reference(eps: float) -> None:
    logits, targets, padding = random_case(0)
    logits.requires_grad_()
    got = caption_loss(logits, targets, padding, label_smoothing=eps)
    want = loop_caption_loss(logits, targets, padding, eps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    assert g_got[padding].abs().sum() == 0 and g_got.abs().sum() > 0


def test_value_matches_numpy_and_finite_differences() -> None:
    logits, targets, padding = random_case(1)
    loss = caption_loss(logits, targets, padding)
    assert loss.item() == pytest.approx(numpy_caption_loss(logits.numpy(), targets.numpy(), padding.numpy()), rel=1e-12)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: caption_loss(z, targets, padding, label_smoothing=0.2), (x,))


def test_flat_valid_positions_give_the_same_loss() -> None:
    logits, targets, padding = random_case(2)
    valid = ~padding
    flat = caption_loss(logits[valid], targets[valid], torch.zeros(int(valid.sum()), dtype=torch.bool))
    torch.testing.assert_close(flat, caption_loss(logits, targets, padding))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shift=st.floats(-50, 50),
    junk=st.floats(-100, 100),
    eps=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_properties_shift_invariance_padding_ignored_nonnegative(
    seed: int, shift: float, junk: float, eps: float
) -> None:
    logits, targets, padding = random_case(seed)
    base = caption_loss(logits, targets, padding, label_smoothing=eps)
    assert base.item() >= 0
    shifted = logits + shift * torch.arange(logits.shape[1], dtype=logits.dtype)[None, :, None]
    torch.testing.assert_close(caption_loss(shifted, targets, padding, label_smoothing=eps), base)
    noisy = logits.masked_fill(padding[..., None], junk)
    other_targets = targets.masked_fill(padding, 0)
    torch.testing.assert_close(caption_loss(noisy, other_targets, padding, label_smoothing=eps), base)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), margin=st.floats(20, 60))
def test_confident_correct_logits_give_the_minimum(seed: int, margin: float) -> None:
    _, targets, padding = random_case(seed)
    logits = torch.nn.functional.one_hot(targets, 7).double() * margin
    assert caption_loss(logits, targets, padding).item() == pytest.approx(0.0, abs=10 * math.exp(-margin) * 7)
    assert caption_loss(-logits, targets, padding).item() > margin


def test_bad_inputs_raise() -> None:
    logits, targets, padding = random_case(3)
    with pytest.raises(ValueError, match="expects logits"):
        caption_loss(logits, targets[:, :-1], padding)
    with pytest.raises(ValueError, match="label_smoothing"):
        caption_loss(logits, targets, padding, label_smoothing=1.0)
    with pytest.raises(ValueError, match="no valid target"):
        caption_loss(logits, targets, torch.ones_like(padding))


# ---------------------------------------------------------------- greedy decoding

TOKENS = CaptionTokens(vocab_size=10, pad=0, cls=2, mask=7, bos=8, eos=9)


class MarkovDecoder:
    """Hand-built decoder: the logits of every position depend on its own input token only
    (a fixed transition table per row, chosen by the row's context value), and a call log."""

    def __init__(self, tables: Tensor) -> None:
        self.tables = tables  # [R, V, V]: row r, current token -> next-token logits
        self.calls: list[int] = []

    def __call__(self, inputs: Tensor, context: Tensor, context_padding: Tensor | None) -> Tensor:
        self.calls.append(inputs.shape[1])
        rows = context[:, 0, 0].long()
        return self.tables[rows[:, None], inputs]


def argmax_chain(table: Tensor, max_tokens: int, tokens: CaptionTokens) -> list[int]:
    """Reference: follow the argmax (over allowed ids) from [BOS] until [EOS] or max_tokens."""
    allowed = [k for k in range(tokens.vocab_size) if k not in tokens.never_generated]
    out, current = [], tokens.bos
    while len(out) < max_tokens:
        current = max(allowed, key=lambda k: float(table[current, k]))
        out.append(current)
        if current == tokens.eos:
            break
    return out


def test_greedy_search_follows_the_argmax_chain_and_stops_at_eos() -> None:
    g = torch.Generator().manual_seed(0)
    tables = torch.randn(3, 10, 10, generator=g)
    tables[:, :, 0] = 100.0  # [PAD] would win everywhere: must never be emitted
    tables[:, :, 8] = 90.0  # [BOS] as well
    tables[0, 8, 4], tables[0, 4, 5], tables[0, 5, 9] = 50, 50, 50  # row 0: 4 5 [EOS]
    tables[1, 8, 3], tables[1, 3, 3] = 50, 50  # row 1: 3 3 3 ... never stops
    tables[2, 8, 9] = 50  # row 2: [EOS] at once
    context = torch.arange(3, dtype=torch.float32)[:, None, None].expand(3, 2, 4)
    decoder = MarkovDecoder(tables)
    got = greedy_search(decoder, context, None, 6, TOKENS)
    assert got.tolist()[0][:3] == [4, 5, 9] and got.tolist()[1] == [3] * 6 and got.tolist()[2][0] == 9
    for r in range(3):
        want = argmax_chain(tables[r], 6, TOKENS)
        assert got[r, : len(want)].tolist() == want and (got[r, len(want) :] == TOKENS.pad).all()
    assert decoder.calls == list(range(1, 7))  # the prefix grows by one each step


def test_greedy_search_stops_when_every_row_is_done() -> None:
    tables = torch.zeros(1, 10, 10)
    tables[0, 8, 4], tables[0, 4, 9] = 1.0, 1.0
    decoder = MarkovDecoder(tables)
    got = greedy_search(decoder, torch.zeros(2, 1, 1), None, 20, TOKENS)
    assert got.tolist() == [[4, 9], [4, 9]] and decoder.calls == [1, 2]


def test_teacher_forced_logits_equal_incremental_decoding_logits() -> None:
    torch.manual_seed(0)
    decoder = CaptionDecoder(vocab_size=10, context_dim=6, dim=16, depth=2, heads=2, max_len=12).double().eval()
    context = torch.randn(3, 5, 6, dtype=torch.float64)
    context_padding = torch.tensor([[False] * 5, [False, False, True, True, True], [False] * 4 + [True]])
    steps: list[Tensor] = []

    def recording(inputs: Tensor, ctx: Tensor, pad: Tensor | None) -> Tensor:
        logits = decoder(inputs, ctx, pad)
        steps.append(logits[:, -1])
        return logits

    with torch.no_grad():
        out = greedy_search(recording, context, context_padding, 8, TOKENS)
        full = torch.cat([torch.full((3, 1), TOKENS.bos), out[:, :-1]], dim=1)
        forced = decoder(full, context, context_padding)
    assert len(steps) == out.shape[1]
    for t, step in enumerate(steps):
        torch.testing.assert_close(forced[:, t], step, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- the objective inside a method

VOCAB = 14  # 8 trained ids + [MASK] [BOS] [EOS] ... (ids 11, 12, 13 are the appended specials)
SPECS = {"image": ModalitySpec("image", channels=3, size=8), "text": ModalitySpec("text", vocab_size=VOCAB)}


def recipe_tree(method: dict) -> dict:
    return {
        "data": {"name": "emoji"},
        "model": {
            "embed_dim": 16,
            "encoders": {"image": {"name": "image_cnn", "widths": [8, 16], "dim": 16}, "text": {"name": "text_bow"}},
        },
        "method": method,
    }


def build(method: dict, seed: int = 0) -> Method:
    torch.manual_seed(seed)
    return build_method(validate_recipe(recipe_tree(method)), SPECS)


def coca(**kwargs: object) -> dict:
    return {"name": "coca", "decoder_dim": 16, "decoder_heads": 2, "decoder_depth": 1, "max_len": 12, **kwargs}


def make_batch(n: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (n,), generator=g)
    ids = torch.randint(3, VOCAB - 3, (n, 6), generator=g)
    ids[:, 0] = 2
    padding = torch.arange(6)[None, :] >= lengths[:, None]
    return Batch(
        data={"image": torch.randn(n, 3, 8, 8, generator=g), "text": ids.masked_fill(padding, 0)},
        present={"image": torch.ones(n, dtype=torch.bool), "text": torch.ones(n, dtype=torch.bool)},
        ids=torch.arange(n),
        padding={"text": padding},
    )


def test_coca_preset_weights_labels_and_loss() -> None:
    specs = expand_method(coca())
    assert [(s.label, s.name, s.weight) for s in specs] == [
        ("contrastive", "infonce", 1.0),
        ("caption", "captioning", 2.0),
    ]
    method = build(coca())
    cap = method.objectives["caption"]
    assert isinstance(cap, Captioning) and (cap.source, cap.target) == ("image", "text")
    assert cap.tokens.bos == VOCAB - 2 and cap.head.vocab_size == VOCAB
    batch = make_batch()
    outputs = method(batch)
    out = method.loss(outputs, batch)
    torch.testing.assert_close(out.loss, out.parts["contrastive"] + 2.0 * out.parts["caption"])
    # the caption part is caption_loss of the decoder run by hand on the teacher-forced batch
    inputs, targets, padding = teacher_forcing(batch.data["text"], batch.padding["text"], VOCAB - 2, VOCAB - 1)
    logits = cap.head(inputs, outputs.tokens["image"], outputs.padding.get("image"))
    torch.testing.assert_close(out.parts["caption"], caption_loss(logits, targets, padding))
    assert out.parts["caption"].item() == pytest.approx(math.log(VOCAB), abs=0.3)  # untrained: near uniform
    assert out.metrics["caption/tokens"] == float((~padding).sum())


def test_gradients_reach_the_decoder_and_the_image_encoder_only_through_paired_rows() -> None:
    method = build(coca(caption_weight=1.0, contrastive_weight=0.0))
    batch = make_batch(6, seed=1)
    batch.present["text"] = torch.tensor([True, True, False, True, True, False])
    outputs = method(batch)
    method.loss(outputs, batch).loss.backward()
    cap = method.objectives["caption"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cap.parameters())
    assert method.model.encoders["image"].to_tokens.weight.grad.abs().sum() > 0
    extras = outputs.extras["caption/targets"]
    keep = batch.present["text"]
    _, targets, padding = teacher_forcing(batch.data["text"][keep], batch.padding["text"][keep], VOCAB - 2, VOCAB - 1)
    assert extras.tolist() == targets[~padding].tolist()  # the unpaired rows are left out


def test_no_paired_rows_gives_a_connected_zero() -> None:
    method = build(coca())
    batch = make_batch()
    batch.present["text"] = torch.zeros(6, dtype=torch.bool)
    outputs = method(batch)
    out = method.objectives["caption"](outputs, batch)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    assert out.metrics["tokens"] == 0.0


def test_bind_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match=r"method\.objectives\.0\.target.*'image' must be a text modality"):
        build({"name": "composite", "objectives": [{"name": "captioning", "source": "text", "target": "image"}]})
    with pytest.raises(ConfigError, match=r"method\.objectives\.0\.source.*no encoder for 'audio'"):
        build({"name": "composite", "objectives": [{"name": "captioning", "source": "audio"}]})
    with pytest.raises(ConfigError, match="heads"):
        Captioning(dim=10, heads=3)
    with pytest.raises(ValueError, match="not bound"):
        _ = Captioning().head


def test_find_captioner_requires_exactly_one() -> None:
    with pytest.raises(ConfigError, match="no captioning objective"):
        find_captioner(build({"name": "clip"}))
    method = build(coca())
    assert find_captioner(method) is method.objectives["caption"]


def test_greedy_decode_through_the_method_and_rows_without_the_source() -> None:
    method = build(coca()).eval()
    batch = make_batch()
    batch.present["image"] = torch.tensor([True, False, True, True, True, True])
    got = greedy_decode(method, method.model, batch, max_tokens=5)
    cap = method.objectives["caption"]
    keep = batch.present["image"]
    with torch.no_grad():
        tokens = method.model(batch.select(["image"])).tokens["image"][keep]
        want = greedy_search(cap.head, tokens, None, 5, cap.tokens)
    assert got.shape == (6, want.shape[1]) and (got[1] == 0).all()
    assert torch.equal(got[keep], want)
    assert not torch.isin(got, torch.tensor(cap.tokens.never_generated[1:])).any()
    with pytest.raises(ValueError, match="max_tokens"):
        greedy_decode(method, method.model, batch, max_tokens=12)


# ---------------------------------------------------------------- scoring and detokenising


def test_score_captions_is_the_exponentiated_caption_loss() -> None:
    method = build(coca()).eval()
    batches = [make_batch(5, seed=s) for s in range(3)]
    cap = method.objectives["caption"]
    scores = score_captions(cap, method.model, batches)
    nll, count, hits = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            outputs = method(b)
            loss = cap(outputs, b)
            n = int(loss.metrics["tokens"])
            nll, count = nll + loss.loss.item() * n, count + n
            hits += round(loss.metrics["token_acc"] * n)
    assert scores.tokens == count and scores.correct == hits
    assert scores.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_unigram_baseline_and_target_counts() -> None:
    tok = TextTokenizer.fit(TEXTS, vocab_size=100, model="word")
    tokens = caption_tokens(tok.vocab_size)
    batch = encoded_batch(tok, TEXTS)
    counts = target_counts([batch], "text", tokens)
    words = [w for t in TEXTS for w in tok.tokens(t)]
    assert int(counts.sum()) == len(words) + len(TEXTS) and int(counts[tokens.eos]) == len(TEXTS)
    assert int(counts[tok.encode("face")[1]]) == words.count("face")
    train = torch.tensor([5, 0, 3, 1])
    test = torch.tensor([1, 2, 0, 4])
    scores = unigram_scores(train, test)
    p = [(c + 1) / (9 + 4) for c in (5, 0, 3, 1)]
    nll = -(1 * math.log(p[0]) + 2 * math.log(p[1]) + 4 * math.log(p[3]))
    assert scores.tokens == 7 and scores.correct == 1
    assert scores.perplexity == pytest.approx(math.exp(nll / 7))


@pytest.mark.parametrize("model", ["word", "wordpiece"])
def test_detokenizer_round_trips_and_stops_at_eos(model: str) -> None:
    tok = TextTokenizer.fit(TEXTS, vocab_size=100, model=model)  # type: ignore[arg-type]
    detok = CaptionDetokenizer(tok)
    ids = tok.encode("smiling face with heart", 32, bos_eos=True).tolist()
    assert detok(ids) == "smiling face with heart"
    assert detok([*ids[1:], tok.encode("love")[1], tok.eos_id]) == "smiling face with heart"
    assert detok([tok.unk_id, tok.pad_id, tok.cls_id]) == "[UNK]"


# ---------------------------------------------------------------- tiny end-to-end training

COLOURS = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])


def shape_batch(n: int, seed: int) -> Batch:
    """Images of one of 4 colours with horizontal or vertical stripes; caption '[CLS] colour stripe'."""
    g = torch.Generator().manual_seed(seed)
    colour, stripe = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    pattern = (torch.arange(8) % 2).float()
    images = torch.empty(n, 3, 8, 8)
    for i in range(n):
        grid = pattern[:, None].expand(8, 8) if stripe[i] == 0 else pattern[None, :].expand(8, 8)
        images[i] = COLOURS[colour[i]][:, None, None] * grid + 0.1 * torch.randn(3, 8, 8, generator=g)
    text = torch.stack([torch.full((n,), 2), 3 + colour, 7 + stripe], dim=1)  # ids 3..6 colours, 7..8 stripes
    return Batch(
        data={"image": images, "text": text},
        present={m: torch.ones(n, dtype=torch.bool) for m in ("image", "text")},
        ids=torch.arange(n) + 1000 * seed,
        padding={"text": torch.zeros(n, 3, dtype=torch.bool)},
    )


@pytest.mark.slow
def test_tiny_coca_learns_to_caption_held_out_images() -> None:
    method = build(coca(decoder_dim=32, decoder_heads=2), seed=0)
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    for step in range(60):
        batch = shape_batch(32, seed=step)
        loss = method.loss(method(batch), batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    method.eval()
    test = shape_batch(64, seed=999)
    got = greedy_decode(method, method.model, test, max_tokens=4)
    want = torch.cat([test.data["text"][:, 1:], torch.full((64, 1), VOCAB - 1)], dim=1)
    exact = (got[:, :3] == want).all(dim=1).float().mean().item()
    assert exact >= 0.8, exact  # chance: 1/8 of the captions
    cap = method.objectives["caption"]
    scores = score_captions(cap, method.model, [test])
    train_counts = target_counts([shape_batch(256, seed=s) for s in range(2)], "text", cap.tokens)
    unigram = unigram_scores(train_counts, target_counts([test], "text", cap.tokens))
    assert scores.accuracy > unigram.accuracy + 0.3 and scores.perplexity < unigram.perplexity / 2


# ---------------------------------------------------------------- 2-rank gloo: global token average

WORLD = 2
N = 8
SPLITS = [(4, 4), (3, 5), (0, 8)]


def global_case() -> tuple[Tensor, Tensor, Tensor]:
    logits, targets, padding = random_case(7, n=N, t=5, v=6)
    padding[5] = True  # a row without any valid token
    return logits, targets, padding


def run_caption(rows: slice, gather: bool, eps: float) -> dict[str, Tensor]:
    logits0, targets, padding = global_case()
    logits = logits0[rows].clone().requires_grad_()
    loss = caption_loss(logits, targets[rows], padding[rows], label_smoothing=eps, gather=gather)
    loss.backward()
    assert logits.grad is not None
    return {"loss": loss.detach(), "grad": logits.grad}


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD)
    try:
        results = {}
        for split in SPLITS:
            lo = sum(split[:rank])
            for eps in (0.0, 0.1):
                results[f"{split}{eps}"] = run_caption(slice(lo, lo + split[rank]), True, eps)
        only_pad = global_case()[2].clone()
        only_pad[:] = True  # no valid token on any rank: a connected zero everywhere
        z = global_case()[0][rank * 4 : rank * 4 + 4].clone().requires_grad_()
        results["empty"] = {"loss": caption_loss(z, global_case()[1][:4], only_pad[:4], gather=True).detach()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Tensor]]]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp_caption"), WORLD, timeout_s=60)


@pytest.mark.ddp
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("split", SPLITS, ids=[f"{x}+{y}" for x, y in SPLITS])
def test_gathered_caption_loss_equals_single_process(
    rank_results: list[dict[str, dict[str, Tensor]]], split: tuple[int, int], eps: float
) -> None:
    single = run_caption(slice(0, N), False, eps)
    per_rank = [r[f"{split}{eps}"] for r in rank_results]
    torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, single["loss"], rtol=1e-12, atol=1e-12)
    grads = torch.cat([r["grad"] for r in per_rank]) / WORLD
    torch.testing.assert_close(grads, single["grad"], rtol=1e-12, atol=1e-14)
    if split == (3, 5):  # guard: the local mean differs from the rank's share of the global mean
        local = run_caption(slice(0, 3), False, eps)["loss"]
        assert abs(float(local) - float(per_rank[0]["loss"])) > 1e-3


@pytest.mark.ddp
def test_gathered_loss_without_tokens_anywhere_is_zero(rank_results: list[dict[str, dict[str, Tensor]]]) -> None:
    assert all(r["empty"]["loss"].item() == 0.0 for r in rank_results)
