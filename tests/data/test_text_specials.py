"""Tokenizer special tokens [MASK], [BOS], [EOS]: appended after the trained vocabulary."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from modalign.core.errors import DataError
from modalign.data.transforms.text import (
    APPENDED_SPECIAL_TOKENS,
    NON_WORD,
    SPECIAL_TOKENS,
    TextTokenizer,
    TextTransform,
    TokenizerModel,
)
from modalign.encoders import TextTransformer

TEXTS = [
    "grinning face. face, grin",
    "waving hand: light skin tone. hand, wave, waving",
    "Café au lait. coffee, drink",
    "red heart. heart, love",
    "smiling face with heart-eyes. face, love, smile",
]
MODELS: tuple[TokenizerModel, ...] = ("wordpiece", "word")
FITTED = {m: TextTokenizer.fit(TEXTS, vocab_size=200, model=m) for m in MODELS}


def without_appended(tok: TextTokenizer) -> str:
    """The tokenizer JSON as it was written before [MASK]/[BOS]/[EOS] existed."""
    data = json.loads(tok.to_json())
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] not in APPENDED_SPECIAL_TOKENS]
    return json.dumps(data)


def word_tokenizer_without_appended(texts: list[str], vocab_size: int) -> Tokenizer:
    """The word-level pipeline trained directly with ``tokenizers`` (the reference for the ids)."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(NON_WORD), behavior="removed")
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@pytest.mark.parametrize("model", MODELS)
def test_appended_specials_follow_the_trained_vocabulary(model: TokenizerModel) -> None:
    tok = TextTokenizer.fit(TEXTS, vocab_size=200, model=model)
    trained = Tokenizer.from_str(without_appended(tok))
    n = trained.get_vocab_size(with_added_tokens=True)
    assert (tok.mask_id, tok.bos_id, tok.eos_id) == (n, n + 1, n + 2)
    assert tok.vocab_size == n + 3
    assert (tok.pad_id, tok.unk_id, tok.cls_id) == (0, 1, 2)
    vocab = tok._tok.get_vocab(with_added_tokens=True)
    assert {t: i for t, i in vocab.items() if t not in APPENDED_SPECIAL_TOKENS} == trained.get_vocab()
    assert sorted(vocab.values()) == list(range(tok.vocab_size))  # contiguous ids, no holes


def test_word_ids_equal_a_vocabulary_trained_without_the_new_specials() -> None:
    tok = TextTokenizer.fit(TEXTS, vocab_size=200, model="word")
    reference = word_tokenizer_without_appended(TEXTS, 200).get_vocab()
    vocab = tok._tok.get_vocab()
    assert all(vocab[t] == i for t, i in reference.items())
    assert len(vocab) == len(reference) + 3


@pytest.mark.parametrize("model", MODELS)
def test_old_json_gains_the_specials_and_keeps_every_id(model: TokenizerModel) -> None:
    tok = FITTED[model]
    old_json = without_appended(tok)
    assert all(Tokenizer.from_str(old_json).token_to_id(t) is None for t in APPENDED_SPECIAL_TOKENS)
    loaded = TextTokenizer.from_json(old_json)
    assert loaded._tok.get_vocab() == tok._tok.get_vocab()
    assert loaded.special_ids == tok.special_ids
    for text in [*TEXTS, "an unseen zebra, café!"]:
        assert torch.equal(loaded.encode(text), tok.encode(text))


@pytest.mark.parametrize("model", MODELS)
def test_json_round_trip_keeps_the_specials(model: TokenizerModel) -> None:
    tok = FITTED[model]
    again = TextTokenizer.from_json(TextTokenizer.from_json(tok.to_json()).to_json())
    assert again.vocab_size == tok.vocab_size and again.special_ids == tok.special_ids
    assert again.to_json() == tok.to_json()
    assert torch.equal(again.encode("red heart", 8, bos_eos=True), tok.encode("red heart", 8, bos_eos=True))


@pytest.mark.parametrize("model", MODELS)
def test_default_encoding_is_cls_then_the_trained_pieces(model: TokenizerModel) -> None:
    tok = FITTED[model]
    trained = Tokenizer.from_str(without_appended(tok))
    for text in [*TEXTS, "", "zebra"]:
        want = [tok.cls_id, *trained.encode(text, add_special_tokens=False).ids[:4]]
        assert tok.encode(text, max_tokens=5).tolist() == want


def test_bos_eos_encoding_and_truncation() -> None:
    tok = TextTokenizer.fit(TEXTS, vocab_size=200, model="word")
    pieces = tok.encode("waving hand, red heart", max_tokens=32)[1:].tolist()
    assert len(pieces) == 4
    assert tok.encode("waving hand, red heart", 32, bos_eos=True).tolist() == [tok.bos_id, *pieces, tok.eos_id]
    assert tok.encode("waving hand, red heart", 4, bos_eos=True).tolist() == [tok.bos_id, *pieces[:2], tok.eos_id]
    assert tok.encode("waving hand", 2, bos_eos=True).tolist() == [tok.bos_id, tok.eos_id]
    assert tok.encode("", 8, bos_eos=True).tolist() == [tok.bos_id, tok.eos_id]
    with pytest.raises(ValueError, match="max_tokens must be >= 2"):
        tok.encode("x", max_tokens=1, bos_eos=True)
    assert TextTransform(tok, max_tokens=4, bos_eos=True)("waving hand, red heart").tolist()[-1] == tok.eos_id
    assert TextTransform(tok, max_tokens=4)("waving hand").tolist()[0] == tok.cls_id
    with pytest.raises(ValueError, match="max_tokens must be >= 2"):
        TextTransform(tok, max_tokens=1, bos_eos=True)


@settings(max_examples=40, deadline=None)
@given(
    words=st.lists(st.sampled_from(["face", "heart", "zebra", "café", ",", "!", "hand", "wave", "x"]), max_size=12),
    max_tokens=st.integers(2, 10),
    model=st.sampled_from(MODELS),
)
def test_bos_eos_wraps_the_same_pieces(words: list[str], max_tokens: int, model: TokenizerModel) -> None:
    tok = FITTED[model]
    text = " ".join(words)
    wrapped = tok.encode(text, max_tokens, bos_eos=True)
    plain = tok.encode(text, max_tokens - 1)
    assert wrapped[0] == tok.bos_id and wrapped[-1] == tok.eos_id and len(wrapped) <= max_tokens
    assert torch.equal(wrapped[1:-1], plain[1:])
    assert int(wrapped.max()) < tok.vocab_size
    assert not set(wrapped[1:-1].tolist()) & {tok.pad_id, tok.cls_id, tok.mask_id, tok.bos_id, tok.eos_id}


def test_special_ids_are_distinct_and_read_only() -> None:
    tok = FITTED["wordpiece"]
    assert len(set(tok.special_ids)) == 6
    assert tok.special_ids[:3] == (tok.pad_id, tok.unk_id, tok.cls_id)
    assert tok.special_ids[3:] == (tok.mask_id, tok.bos_id, tok.eos_id)
    with pytest.raises(AttributeError):
        tok.mask_id = 3  # type: ignore[misc]


def test_a_text_encoder_sized_by_the_tokenizer_accepts_every_special() -> None:
    tok = FITTED["word"]
    enc = TextTransformer(tok.vocab_size, dim=8, depth=1, heads=2)
    ids = torch.tensor([[tok.bos_id, tok.mask_id, tok.eos_id, tok.cls_id]])
    assert enc(ids).pooled.shape == (1, 8)
    assert torch.equal(enc.targets(ids), ids)


def test_wrapped_tokenizer_without_pad_at_zero_is_rejected() -> None:
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "[CLS]": 2}, unk_token="[UNK]"))
    with pytest.raises(DataError, match=r"\[PAD\]=0"):
        TextTokenizer(tok)
