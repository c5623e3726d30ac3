"""``emoji-multilingual``: Twemoji images paired with CLDR names and keywords in several languages.

The catalogue, images, held-out split and labels are those of ``emoji``
(:mod:`modalign.data.datasets.emoji`, whose functions this module calls): the English emojibase
file decides which images exist and which base emoji are held out, so the test split is exactly
``emoji``'s (same sample ids, same emoji) and results compare across the two datasets.

Each chosen language ``xx`` adds a text modality ``text_xx``: ``"{label}. {tag}, {tag}, ..."``
from ``emojibase/xx/data.json`` (Unicode CLDR annotations in that language), joined on the
emojibase hexcode exactly as ``emoji`` builds its English text (a skin-tone variant has its own
label and its base's tags). An image without a label in a language has no ``text_xx`` in
``Sample.values`` (counted per language in ``n_missing``, and logged): no text is invented or
borrowed from another language. emojibase-data 17.0.0 labels every emoji in all six languages,
so on the shipped data every count is 0. Each language gets its own tokenizer, fitted on its
train texts with ``emoji``'s settings and saved as the artifact ``tokenizer_xx.json``.

Japanese and Chinese are written without spaces. The word tokenizer splits on non-letters only,
so a whole label or tag (``"モノクルを付けた顔"``) was one token and most held-out phrases were
out of vocabulary (word model, ``min_frequency=2``: 52 % of the ja and 58 % of the zh test-split
tokens were ``[UNK]``; per character 5 % and 9 %); WordPiece learns arbitrary multi-character
pieces instead. For
``ja`` and ``zh`` each CJK ideograph, hiragana and katakana character is therefore made a word
of its own (:func:`split_characters`, applied to the train and test texts before either
tokenizer model sees them) -- a character vocabulary, the unit BERT uses for Chinese (Devlin et
al. 2019); Latin words inside these texts stay whole. Note: the shared text normaliser (NFD,
strip accents) also strips the voicing marks of kana (``ガ`` -> ``カ``).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Sequence
from typing import Literal, get_args

from torch import Tensor

from modalign.core.errors import ConfigError
from modalign.core.registry import register
from modalign.core.types import ModalitySpec, Sample
from modalign.data.base import MultimodalDataset, check_split
from modalign.data.datasets.emoji import (
    EMOJI_JSON,
    IMAGES,
    LABELS_JSON,
    EmojiEntry,
    entry_texts,
    fitted_tokenizer,
    load_catalogue,
    prepare_images,
    read_json,
    require_artifacts,
    split_entries,
)
from modalign.data.locate import dataset_root
from modalign.data.preview import Preview, sample_previews
from modalign.data.transforms.image import ImageTransform
from modalign.data.transforms.text import TextTokenizer, TokenizerModel, TokenizerSettings

logger = logging.getLogger(__name__)

NAME = "emoji-multilingual"
HINT = f"obtain them with: modalign datasets fetch {NAME} --root DIR"
#: Languages of the emojibase-data package (``emoji_twemoji/emojibase/<lang>/data.json``).
Language = Literal["de", "en", "es", "fr", "ja", "zh"]
LANGUAGES: tuple[str, ...] = get_args(Language)
DEFAULT_LANGUAGES: tuple[Language, ...] = ("en", "de")
#: Languages written without spaces: split into characters before tokenisation.
CHARACTER_LANGUAGES = frozenset({"ja", "zh"})
#: CJK ideographs (unified, extension A, compatibility, supplementary planes), iteration marks,
#: hiragana, katakana (with its phonetic extensions and half-width forms).
_CJK = re.compile(
    "([\u3005-\u3007\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
    "\U00020000-\U0002fa1f])"
)


def labels_file(language: str) -> str:
    """Path of ``language``'s emojibase file under the data root."""
    return f"emoji_twemoji/emojibase/{language}/data.json"


def tokenizer_file(language: str) -> str:
    """Artifact file name of ``language``'s tokenizer (``tokenizer_de.json``)."""
    return f"tokenizer_{language}.json"


def text_modality(language: str) -> str:
    """Modality name of ``language``'s text (``text_de``)."""
    return f"text_{language}"


def split_characters(text: str) -> str:
    """Make every CJK ideograph and kana of ``text`` a space-separated word of its own.

    ``"口が斜めの顔. OK"`` -> ``"口 が 斜 め の 顔 . OK"``; other characters are unchanged
    (runs of whitespace become one space).
    """
    return " ".join(_CJK.sub(r" \1 ", text).split())


def check_languages(languages: Sequence[str]) -> list[str]:
    """Return ``languages`` as a list after checking it names distinct known languages.

    Raises:
        ConfigError: If it is a string or empty, repeats a language, or names one that is not
            in ``LANGUAGES`` (the message lists the allowed languages).
    """
    allowed = list(LANGUAGES)
    if isinstance(languages, str) or not languages:
        raise ConfigError("languages", f"expected a non-empty list of languages, got {languages!r}", allowed)
    for lang in languages:
        if lang not in LANGUAGES:
            close = difflib.get_close_matches(str(lang), allowed, n=2)
            raise ConfigError("languages", f"unknown language {lang!r} of dataset {NAME!r}", allowed, close)
    repeated = sorted({lang for lang in languages if list(languages).count(lang) > 1})
    if repeated:
        raise ConfigError("languages", f"languages repeated: {repeated}", allowed)
    return list(languages)


@register("dataset", NAME)
class EmojiMultilingualDataset(MultimodalDataset):
    """Twemoji images (``image``, ``[3, S, S]``) with CLDR texts in each language (``text_<lang>``).

    Args:
        root: Data root, only read (``None``: the per-user data cache, downloaded into on first use;
            see ``modalign.data.locate``).
        split: ``"train"`` or ``"test"`` (the fixed 400 held-out base emoji of ``emoji``).
        seed: Unused by the split (fixed); augmentation draws from the torch RNG.
        augment: Random image affine (``None``: on for ``train``).
        artifacts: ``{"tokenizer_<lang>.json": ...}`` from the train split's ``artifacts()``;
            required by the test split for every language, optional for train.
        languages: Text languages, each a modality ``text_<lang>``; any of ``LANGUAGES``.
        image_size: Image side in pixels (the PNGs are 64).
        vocab_size: Largest vocabulary of each language's tokenizer.
        max_tokens: Longest token sequence (``[CLS]`` included).
        train_variants: Include skin-tone variants in the train split.
        test_variants: Include skin-tone variants in the test split.
        tokenizer: ``"wordpiece"`` or ``"word"``, for every language (ja/zh: per character).
        min_frequency: Fewest train-text occurrences for a vocabulary entry.

    Labels (evaluation only): ``category`` and ``group_id``, as in ``emoji``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        seed: int = 0,
        augment: bool | None = None,
        artifacts: dict[str, str] | None = None,
        languages: Sequence[Language] = DEFAULT_LANGUAGES,
        image_size: int = 32,
        vocab_size: int = 2000,
        max_tokens: int = 32,
        train_variants: bool = True,
        test_variants: bool = False,
        tokenizer: TokenizerModel = "wordpiece",
        min_frequency: int = 1,
    ) -> None:
        check_split(NAME, split)
        self.languages = check_languages(languages)
        files = [EMOJI_JSON, LABELS_JSON, *(labels_file(lang) for lang in self.languages), IMAGES]
        base = dataset_root(NAME, root, list(dict.fromkeys(files)), hint=HINT)
        require_artifacts(NAME, split, artifacts, [tokenizer_file(lang) for lang in self.languages])
        self.split = split
        self.seed = seed
        self.augment = split == "train" if augment is None else augment
        self.max_tokens = max_tokens
        entries, self.n_skipped, self.category_names = load_catalogue(base, NAME)
        self.entries: list[EmojiEntry] = split_entries(
            entries, split, train_variants if split == "train" else test_variants
        )
        self.texts = {lang: entry_texts(self.entries, read_json(base / labels_file(lang))) for lang in self.languages}
        self.n_missing = {lang: sum(t is None for t in texts) for lang, texts in self.texts.items()}
        self._log_missing()
        settings = TokenizerSettings(model=tokenizer, vocab_size=vocab_size, min_frequency=min_frequency)
        self.tokenizers = {lang: self._tokenizer(lang, artifacts or {}, settings) for lang in self.languages}
        self._tokens = {lang: self._encode(lang) for lang in self.languages}
        self.image_tf = ImageTransform(image_size, 3, augment=self.augment)
        self._images = prepare_images(base / IMAGES, self.entries, self.image_tf)

    def _log_missing(self) -> None:
        for lang, n in self.n_missing.items():
            if n:
                what = f"{n} of {len(self.entries)} {self.split} images"
                logger.warning("%s: %s have no %r label; their %s is absent", NAME, what, lang, text_modality(lang))

    def _tokenizer_input(self, lang: str) -> list[str | None]:
        """The texts of ``lang`` as the tokenizer reads them (ja/zh: split into characters)."""
        if lang not in CHARACTER_LANGUAGES:
            return self.texts[lang]
        return [None if t is None else split_characters(t) for t in self.texts[lang]]

    def _tokenizer(self, lang: str, artifacts: dict[str, str], settings: TokenizerSettings) -> TextTokenizer:
        texts = [t for t in self._tokenizer_input(lang) if t is not None]
        return fitted_tokenizer(artifacts, tokenizer_file(lang), texts, settings)

    def _encode(self, lang: str) -> list[Tensor | None]:
        tok = self.tokenizers[lang]
        return [None if t is None else tok.encode(t, self.max_tokens) for t in self._tokenizer_input(lang)]

    def artifacts(self) -> dict[str, str]:
        """``{"tokenizer_<lang>.json": ...}``: one tokenizer per language, for the test split."""
        return {tokenizer_file(lang): tok.to_json() for lang, tok in self.tokenizers.items()}

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        """``image``: ``[3, S, S]``; ``text_<lang>``: token ids ``[T <= max_tokens]``; sorted by name."""
        specs = {"image": ModalitySpec("image", channels=3, size=self.image_tf.size)}
        for lang, tok in self.tokenizers.items():
            specs[text_modality(lang)] = ModalitySpec("text", channels=0, vocab_size=tok.vocab_size)
        return dict(sorted(specs.items()))

    @property
    def label_names(self) -> tuple[str, ...]:
        """``("category", "group_id")``."""
        return ("category", "group_id")

    def __len__(self) -> int:
        return len(self.entries)

    def text(self, index: int, language: str) -> str | None:
        """The raw text of sample ``index`` in ``language`` (``None`` where it has none).

        Raises:
            KeyError: If ``language`` is not one of this dataset's languages.
        """
        return self.texts[language][index]

    def previews(self, index: int) -> dict[str, Preview]:
        """The un-normalised image and the raw text of each language the sample has."""
        out = sample_previews(self, index)
        for lang in self.languages:
            text = self.text(index, lang)
            if text is not None:
                out[text_modality(lang)] = Preview("text", text)
        return out

    def __getitem__(self, index: int) -> Sample:
        e = self.entries[index]
        values: dict[str, Tensor] = {"image": self.image_tf(self._images[index])}
        for lang in self.languages:
            tokens = self._tokens[lang][index]
            if tokens is not None:
                values[text_modality(lang)] = tokens
        return Sample(id=e.uid, values=values, labels={"category": e.category, "group_id": e.group})
