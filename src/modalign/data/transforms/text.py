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
token of every encoding, a pooling slot for encoders) are trained first (ids 0, 1, 2). ``[MASK]``
(masked language modelling, BERT), ``[BOS]`` and ``[EOS]`` (captioning decoders: CoCa, BLIP) are
appended after the trained vocabulary, so every other id is what it was before they existed; a
tokenizer JSON saved without them gets them on load, at the same ids.
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
MASK, BOS, EOS = "[MASK]", "[BOS]", "[EOS]"
#: Specials the trainer places first (ids 0, 1, 2).
SPECIAL_TOKENS = (PAD, UNK, CLS)
#: Specials appended after the trained vocabulary (ids ``V .. V + 2`` for ``V`` trained entries).
APPENDED_SPECIAL_TOKENS = (MASK, BOS, EOS)
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
    """WordPiece or word-level tokenizer with ``[PAD] = 0``, ``[UNK]``, ``[CLS]``, ``[MASK]``, ``[BOS]``, ``[EOS]``.

    Build one with :meth:`fit` (on training texts) or load one with :meth:`from_json` /
    :meth:`from_file`; :meth:`to_json` serialises it for the run directory. A wrapped
    tokenizer that lacks ``[MASK]``/``[BOS]``/``[EOS]`` (an older JSON) gets them appended.

    Raises:
        DataError: If ``[PAD]`` is not id 0 or ``[UNK]``/``[CLS]`` are missing.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        if ids[PAD] != 0 or ids[UNK] is None or ids[CLS] is None:
            raise DataError(f"tokenizer: special tokens must be {PAD}=0, {UNK}, {CLS}; got ids {ids}")
        missing = [t for t in APPENDED_SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(missing)
        self._tok = tokenizer
        self._ids: dict[str, int] = {}
        for token in (*SPECIAL_TOKENS, *APPENDED_SPECIAL_TOKENS):
            i = tokenizer.token_to_id(token)
            if i is None:  # add_special_tokens always succeeds; keeps the mapping total for the type checker
                raise DataError(f"tokenizer: could not add special token {token}")
            self._ids[token] = int(i)

    @property
    def pad_id(self) -> int:
        """Id of ``[PAD]`` (always 0)."""
        return self._ids[PAD]

    @property
    def unk_id(self) -> int:
        """Id of ``[UNK]``."""
        return self._ids[UNK]

    @property
    def cls_id(self) -> int:
        """Id of ``[CLS]`` (first token of :meth:`encode`)."""
        return self._ids[CLS]

    @property
    def mask_id(self) -> int:
        """Id of ``[MASK]`` (masked language modelling)."""
        return self._ids[MASK]

    @property
    def bos_id(self) -> int:
        """Id of ``[BOS]`` (first token of ``encode(..., bos_eos=True)``)."""
        return self._ids[BOS]

    @property
    def eos_id(self) -> int:
        """Id of ``[EOS]`` (last token of ``encode(..., bos_eos=True)``)."""
        return self._ids[EOS]

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids of all six special tokens (``[PAD]``, ``[UNK]``, ``[CLS]``, ``[MASK]``, ``[BOS]``, ``[EOS]``)."""
        return tuple(self._ids.values())

    @classmethod
    def fit(
        cls, texts: list[str], vocab_size: int = 4000, min_frequency: int = 1, model: TokenizerModel = "wordpiece"
    ) -> TextTokenizer:
        """Train a ``model`` vocabulary (see the module doc) of at most ``vocab_size`` entries.

        ``vocab_size`` bounds the trained vocabulary (``[PAD]``, ``[UNK]``, ``[CLS]`` included);
        ``[MASK]``, ``[BOS]`` and ``[EOS]`` are appended after it, so the resulting
        :attr:`vocab_size` is at most ``vocab_size + 3``.

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

    def decode(self, ids: list[int]) -> str:
        """Text of token ``ids`` with special tokens skipped (WordPiece pieces re-joined)."""
        return str(self._tok.decode(ids, skip_special_tokens=True))

    def encode(self, text: str, max_tokens: int = 32, bos_eos: bool = False) -> Tensor:
        """Encode ``text`` into ``LongTensor[T]`` of at most ``max_tokens`` ids.

        Args:
            text: Raw text (normalised by the tokenizer).
            max_tokens: Longest encoding, specials included.
            bos_eos: ``False``: ``[CLS]`` then pieces (``1 <= T``), for encoders. ``True``:
                ``[BOS]``, pieces, ``[EOS]`` (``2 <= T``; ``[EOS]`` is kept when the pieces are
                truncated), for captioning decoders.

        Raises:
            ValueError: If ``max_tokens`` is below 1 (below 2 with ``bos_eos``).
        """
        least = 2 if bos_eos else 1
        if max_tokens < least:
            raise ValueError(f"TextTokenizer.encode: max_tokens must be >= {least}, got {max_tokens}")
        ids = self._tok.encode(text, add_special_tokens=False).ids[: max_tokens - least]
        if bos_eos:
            return torch.tensor([self.bos_id, *ids, self.eos_id], dtype=torch.long)
        return torch.tensor([self.cls_id, *ids], dtype=torch.long)


class TextTransform:
    """``str`` -> ``LongTensor[T]`` token ids with a fitted :class:`TextTokenizer`.

    Args:
        tokenizer: The fitted tokenizer.
        max_tokens: Longest encoding, specials included.
        bos_eos: Encode as ``[BOS] ... [EOS]`` (captioning) instead of ``[CLS] ...``.

    Raises:
        ValueError: If ``max_tokens`` is below 1 (below 2 with ``bos_eos``).
    """

    def __init__(self, tokenizer: TextTokenizer, max_tokens: int = 32, bos_eos: bool = False) -> None:
        least = 2 if bos_eos else 1
        if max_tokens < least:
            raise ValueError(f"TextTransform: max_tokens must be >= {least}, got {max_tokens}")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.bos_eos = bos_eos

    def __call__(self, text: str) -> Tensor:
        """Encode ``text`` (``[CLS]`` or ``[BOS]`` first, truncated to ``max_tokens``)."""
        return self.tokenizer.encode(text, self.max_tokens, self.bos_eos)
