"""A trainable tokenizer (HF ``tokenizers``) and the text transform.

Normalisation: Unicode NFD, lowercase, strip accents. Two models, both fitted on training text:

- ``"wordpiece"``: BERT's pre-tokenisation (whitespace and punctuation, punctuation kept as
  tokens) and WordPiece (Wu et al. 2016, "Google's Neural Machine Translation System") with
  ``##`` continuation pieces. Suits sequence encoders: nothing is out of vocabulary.
- ``"word"``: whole words (runs of letters and digits; punctuation is dropped) in a word-level
  vocabulary of the most frequent words, rarer ones mapping to ``[UNK]``. Suits bag-of-words
  encoders on keyword-like text (CLDR tags, labels): every token is a content word, so none of
  the ``max_tokens`` budget or the mean is spent on commas, and a word keeps one embedding
  instead of being split into pieces shared with unrelated words.

Special tokens: ``[PAD]`` (id 0, the padding id collation uses), ``[UNK]`` and ``[CLS]`` (first
token of every encoding, a pooling slot for encoders).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import Tensor

from modalign.core.errors import DataError

PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"
SPECIAL_TOKENS = (PAD, UNK, CLS)
#: Tokenizer models :meth:`TextTokenizer.fit` can train.
TokenizerModel = Literal["wordpiece", "word"]
TOKENIZER_MODELS: tuple[str, ...] = get_args(TokenizerModel)
#: Word tokenizer delimiters: any run of characters that are neither letters nor digits.
NON_WORD = r"[^\p{L}\p{N}]+"


class TokenizerSettings(NamedTuple):
    """The keyword arguments of :meth:`TextTokenizer.fit` besides the texts (``fit(texts, **s._asdict())``)."""

    model: TokenizerModel = "wordpiece"
    vocab_size: int = 4000
    min_frequency: int = 1


class TextTokenizer:
    """WordPiece or word-level tokenizer with ``[PAD] = 0``, ``[UNK]`` and ``[CLS]``.

    Build one with :meth:`fit` (on training texts) or load one with :meth:`from_json` /
    :meth:`from_file`; :meth:`to_json` serialises it for the run directory.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        unk, cls = ids[UNK], ids[CLS]
        if ids[PAD] != 0 or unk is None or cls is None:
            raise DataError(f"tokenizer: special tokens must be {PAD}=0, {UNK}, {CLS}; got ids {ids}")
        self._tok = tokenizer
        self.pad_id = 0
        self.unk_id = int(unk)
        self.cls_id = int(cls)

    @classmethod
    def fit(
        cls, texts: list[str], vocab_size: int = 4000, min_frequency: int = 1, model: TokenizerModel = "wordpiece"
    ) -> TextTokenizer:
        """Train a ``model`` vocabulary (see the module doc) of at most ``vocab_size`` entries.

        Raises:
            DataError: If ``texts`` is empty or holds no non-blank text.
            ValueError: If ``model`` is not one of ``TOKENIZER_MODELS`` or ``vocab_size`` is too small.
        """
        if model not in TOKENIZER_MODELS:
            raise ValueError(f"TextTokenizer.fit: model must be one of {TOKENIZER_MODELS}, got {model!r}")
        if not any(t.strip() for t in texts):
            raise DataError("TextTokenizer.fit: no non-empty text to train on")
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"TextTokenizer.fit: vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
        specials = list(SPECIAL_TOKENS)
        trainer: trainers.Trainer
        if model == "wordpiece":
            tok = Tokenizer(models.WordPiece(unk_token=UNK))
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            trainer = trainers.WordPieceTrainer(
                vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False
            )
        else:
            tok = Tokenizer(models.WordLevel(unk_token=UNK))
            tok.pre_tokenizer = pre_tokenizers.Split(Regex(NON_WORD), behavior="removed")
            trainer = trainers.WordLevelTrainer(
                vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False
            )
        tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> TextTokenizer:
        """Load a tokenizer serialised by :meth:`to_json`.

        Raises:
            DataError: If ``text`` is not a valid tokenizer JSON or lacks the special tokens.
        """
        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
            raise DataError(f"tokenizer JSON is invalid: {e}") from None
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TextTokenizer:
        """Load a tokenizer JSON file (as written from :meth:`to_json`).

        Raises:
            DataError: Naming ``path`` if it is missing or invalid.
        """
        p = Path(path)
        if not p.is_file():
            raise DataError(f"tokenizer file {str(p)!r} does not exist")
        try:
            return cls.from_json(p.read_text(encoding="utf-8"))
        except DataError as e:
            raise DataError(f"tokenizer file {str(p)!r}: {e}") from None

    def to_json(self) -> str:
        """Serialise the whole tokenizer (normaliser, vocabulary, specials) to JSON text."""
        return str(self._tok.to_str())

    @property
    def vocab_size(self) -> int:
        """Number of token ids (specials included); ids lie in ``[0, vocab_size)``."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def tokens(self, text: str) -> list[str]:
        """The token strings of ``text`` (no specials), for inspection."""
        return list(self._tok.encode(text, add_special_tokens=False).tokens)

    def encode(self, text: str, max_tokens: int = 32) -> Tensor:
        """Encode ``text`` into ``LongTensor[T]``: ``[CLS]`` then pieces, ``1 <= T <= max_tokens``.

        Raises:
            ValueError: If ``max_tokens < 1``.
        """
        if max_tokens < 1:
            raise ValueError(f"TextTokenizer.encode: max_tokens must be >= 1, got {max_tokens}")
        ids = self._tok.encode(text, add_special_tokens=False).ids[: max_tokens - 1]
        return torch.tensor([self.cls_id, *ids], dtype=torch.long)


class TextTransform:
    """``str`` -> ``LongTensor[T]`` token ids with a fitted :class:`TextTokenizer`."""

    def __init__(self, tokenizer: TextTokenizer, max_tokens: int = 32) -> None:
        if max_tokens < 1:
            raise ValueError(f"TextTransform: max_tokens must be >= 1, got {max_tokens}")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def __call__(self, text: str) -> Tensor:
        """Encode ``text`` (``[CLS]`` first, truncated to ``max_tokens``)."""
        return self.tokenizer.encode(text, self.max_tokens)
