"""``emoji``: Twemoji images paired with their English CLDR names and keywords.

Images are the 64 px Twemoji PNGs of ``emoji-datasource-twitter`` (RGBA, composited on white);
texts are ``"{label}. {tag}, {tag}, ..."`` from ``emojibase-data`` (Unicode CLDR annotations),
joined on the code-point sequence (``emoji.json`` ``unified``, falling back to its
``non_qualified`` form, which is how emojibase spells e.g. ``00A9``). Skin-tone variants get
their own image and CLDR label (``"waving hand: light skin tone"``) plus their base's tags.

Held-out split: a fixed choice (``SPLIT_SEED``, independent of the run seed) of ``TEST_BASES``
base emoji; skin-tone variants always follow their base, so no group is on both sides.

``emoji-multilingual`` (:mod:`modalign.data.datasets.emoji_multilingual`) reuses the catalogue,
split, image and tokenizer functions below, so both datasets hold out the same emoji.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from modalign.core.errors import DataError
from modalign.core.registry import register
from modalign.core.types import ModalitySpec, Sample
from modalign.data.base import MultimodalDataset, check_split
from modalign.data.locate import dataset_root
from modalign.data.preview import Preview, sample_previews
from modalign.data.raw import RawValue
from modalign.data.transforms.image import ImageTransform, load_image, rgb_pixels
from modalign.data.transforms.text import TextTokenizer, TokenizerModel, TokenizerSettings

logger = logging.getLogger(__name__)

NAME = "emoji"
HINT = f"obtain them with: modalign datasets fetch {NAME} --root DIR"
EMOJI_JSON = "emoji_twemoji/emoji.json"
LABELS_JSON = "emoji_twemoji/emojibase/en/data.json"
IMAGES = "emoji_twemoji/img64"
#: Seed of the held-out choice; a constant so every run evaluates on the same emoji.
SPLIT_SEED = 0
#: Seed of the text views (``text_views``); a constant so the views (and their cache) are fixed.
VIEW_SEED = 1
#: Number of base emoji held out for the test split.
TEST_BASES = 400
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class EmojiEntry:
    """One image of the catalogue.

    Attributes:
        uid: Unique id over the whole catalogue (bases and variants).
        image: PNG file name under ``img64/``.
        text: ``"{label}. {tags}"``.
        group: Index of the base emoji (variants share their base's group).
        category: Index of the ``emoji.json`` category in the sorted category names.
        variant: Whether this is a skin-tone variant.
        label: The CLDR name alone (the start of ``text``).
        hexcode: The emojibase ``hexcode`` of this image (the key of its label in every language).
        base_hexcode: The emojibase ``hexcode`` of its base emoji (whose tags a variant shares).
        tags: The CLDR keywords (the rest of ``text``).
    """

    uid: int
    image: str
    text: str
    group: int
    category: int
    variant: bool
    label: str
    hexcode: str
    base_hexcode: str
    tags: tuple[str, ...] = ()


def read_json(path: Path) -> Any:
    """The parsed JSON file at ``path``.

    Raises:
        DataError: Naming ``path`` if it cannot be read or parsed.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read JSON file {str(path)!r}: {e}") from None


def _label_tables(labels_json: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``({hexcode: label}, {hexcode: tags})`` over emojibase entries and their skins."""
    names: dict[str, str] = {}
    tags: dict[str, list[str]] = {}
    for item in labels_json:
        names[item["hexcode"]] = item["label"]
        tags[item["hexcode"]] = list(item.get("tags", []))
        for skin in item.get("skins", []):
            names[skin["hexcode"]] = skin["label"]
    return names, tags


def _find(table: dict[str, Any], entry: dict[str, Any]) -> str | None:
    """The key of ``table`` that ``entry`` matches (``unified``, else ``non_qualified``)."""
    for key in (entry.get("unified"), entry.get("non_qualified")):
        if key and key in table:
            return str(key)
    return None


def _text(label: str, tags: list[str]) -> str:
    return f"{label}. {', '.join(tags)}" if tags else f"{label}."


def entry_texts(entries: list[EmojiEntry], labels_json: list[dict[str, Any]]) -> list[str | None]:
    """The text of each entry in another emojibase label file (``"{label}. {tags}"``, as ``text``).

    An entry's label is looked up by its ``hexcode`` and its tags by its ``base_hexcode``, as
    :func:`build_catalogue` does for English; ``None`` where the file has no label for it.
    """
    names, tags = _label_tables(labels_json)
    return [_text(names[e.hexcode], tags.get(e.base_hexcode, [])) if e.hexcode in names else None for e in entries]


def build_catalogue(
    emoji_json: list[dict[str, Any]], labels_json: list[dict[str, Any]], image_dir: Path
) -> tuple[list[EmojiEntry], int, list[str]]:
    """Join images and English labels.

    Returns:
        ``(entries, n_skipped, category_names)``: entries in ``sort_order`` with each base
        followed by its variants; ``n_skipped`` counts images dropped for a missing file or
        label (a dropped base drops its variants too).
    """
    names, tags = _label_tables(labels_json)
    categories = sorted({str(e.get("category", "")) for e in emoji_json})
    entries: list[EmojiEntry] = []
    skipped = 0
    group = 0
    for base in sorted(emoji_json, key=lambda e: (e.get("sort_order", 0), e.get("unified", ""))):
        variants = list((base.get("skin_variations") or {}).values())
        key = _find(names, base)
        if key is None or not (image_dir / str(base.get("image"))).is_file():
            skipped += 1 + len(variants)
            continue
        cat = categories.index(str(base.get("category", "")))
        keywords = tuple(tags.get(key, []))
        text = _text(names[key], list(keywords))
        entries.append(EmojiEntry(len(entries), base["image"], text, group, cat, False, names[key], key, key, keywords))
        for var in variants:
            vkey = _find(names, var)
            if vkey is None or not (image_dir / str(var.get("image"))).is_file():
                skipped += 1
                continue
            text = _text(names[vkey], list(keywords))
            entries.append(
                EmojiEntry(len(entries), var["image"], text, group, cat, True, names[vkey], vkey, key, keywords)
            )
        group += 1
    return entries, skipped, categories


def keyword_views(entry: EmojiEntry, views: int) -> list[str]:
    """``views`` texts of ``entry``: its ``text``, then rewritings keeping the CLDR name first.

    View ``v >= 1`` is ``"{label}. {tags}"`` with a random non-empty subset of the keywords in
    random order (keyword dropout and shuffling, a text augmentation in the spirit of EDA's
    random deletion and swap, Wei & Zou 2019). The draws are seeded by ``(uid, v)`` alone, so
    the views are the same in every run and a feature cache can hold them.
    """
    out = [entry.text]
    for v in range(1, views):
        rng = np.random.default_rng([VIEW_SEED, entry.uid, v])
        tags = list(entry.tags)
        if tags:
            keep = int(rng.integers(1, len(tags) + 1))
            tags = [tags[i] for i in rng.permutation(len(tags))[:keep]]
        out.append(_text(entry.label, tags))
    return out


def held_out_groups(n_groups: int) -> set[int]:
    """The fixed held-out base groups (``TEST_BASES`` of them, drawn with ``SPLIT_SEED``).

    Raises:
        DataError: If there are not more than ``TEST_BASES`` base emoji.
    """
    if n_groups <= TEST_BASES:
        raise DataError(f"{NAME}: only {n_groups} labelled base emoji; need more than {TEST_BASES}")
    rng = np.random.default_rng(SPLIT_SEED)
    return {int(g) for g in rng.choice(n_groups, size=TEST_BASES, replace=False)}


def load_catalogue(base: Path, dataset: str) -> tuple[list[EmojiEntry], int, list[str]]:
    """Read ``emoji.json`` and the English labels under data root ``base`` and join them.

    Logs a warning naming ``dataset`` when images were skipped.

    Returns:
        ``(entries, n_skipped, category_names)`` of :func:`build_catalogue`.

    Raises:
        DataError: If a JSON file cannot be read.
    """
    entries, skipped, categories = build_catalogue(
        read_json(base / EMOJI_JSON), read_json(base / LABELS_JSON), base / IMAGES
    )
    if skipped:
        logger.warning("%s: skipped %d images without a file or an English label", dataset, skipped)
    return entries, skipped, categories


def split_entries(entries: list[EmojiEntry], split: str, variants: bool) -> list[EmojiEntry]:
    """The entries of ``split``: the held-out groups for ``"test"``, the others for ``"train"``.

    Args:
        entries: The whole catalogue from :func:`build_catalogue`.
        split: ``"train"`` or ``"test"``.
        variants: Keep skin-tone variants (bases are always kept).

    Raises:
        DataError: If there are not more than ``TEST_BASES`` base emoji.
    """
    held_out = held_out_groups(entries[-1].group + 1 if entries else 0)
    return [e for e in entries if (e.group in held_out) == (split == "test") and (variants or not e.variant)]


def require_artifacts(dataset: str, split: str, artifacts: dict[str, str] | None, files: list[str]) -> None:
    """Fail unless the test split got every fitted tokenizer file of the train split.

    Raises:
        DataError: Naming the missing ``artifacts`` entries.
    """
    missing = [f for f in files if f not in (artifacts or {})]
    if split == "test" and missing:
        names = ", ".join(f"artifacts[{f!r}]" for f in missing)
        raise DataError(
            f"{dataset} test split needs {names}: pass the train split's artifacts() so both splits share "
            "the fitted tokenizers"
        )


def fitted_tokenizer(
    artifacts: dict[str, str], file: str, texts: list[str], settings: TokenizerSettings
) -> TextTokenizer:
    """The tokenizer saved as ``artifacts[file]`` if present, else one fitted on ``texts``."""
    if file in artifacts:
        return TextTokenizer.from_json(artifacts[file])
    return TextTokenizer.fit(texts, **settings._asdict())


def prepare_images(folder: Path, entries: list[EmojiEntry], transform: ImageTransform) -> np.ndarray:
    """``[N, ...]``: the deterministic part of ``transform`` applied to each entry's PNG."""
    return np.stack([transform.prepare(load_image(folder / e.image)) for e in entries])


@register("dataset", NAME)
class EmojiDataset(MultimodalDataset):
    """Twemoji images (``image``, ``[3, S, S]``) with CLDR names and keywords (``text``).

    Args:
        root: Data root, only read (``None``: the per-user data cache, downloaded into on first use;
            see ``modalign.data.locate``).
        split: ``"train"`` or ``"test"`` (the fixed 400 held-out base emoji).
        seed: Unused by the split (fixed); augmentation draws from the torch RNG.
        augment: Random image affine (``None``: on for ``train``).
        artifacts: ``{"tokenizer.json": ...}`` from the train split's ``artifacts()``; required
            by the test split, optional for train (otherwise the tokenizer is fitted).
        image_size: Image side in pixels (the PNGs are 64).
        vocab_size: Largest vocabulary fitted on the train texts.
        max_tokens: Longest token sequence (``[CLS]`` included).
        tokenizer: Tokenizer model fitted on the train texts: ``"wordpiece"`` or ``"word"``
            (whole words, punctuation dropped; see :mod:`modalign.data.transforms.text`).
        min_frequency: Fewest train-text occurrences for a vocabulary entry. With ``2`` and the
            word model, words seen once map to ``[UNK]``, so ``[UNK]`` is trained (as "a rare
            word") rather than left at its random initialisation for held-out words.
        train_variants: Include skin-tone variants in the train split.
        test_variants: Include skin-tone variants in the test split (default: bases only, so
            retrieval chance is 10/400 at R@10).
        text_views: Texts per sample while augmenting (:func:`keyword_views`: the text, then
            rewritings with re-sampled keywords); each epoch draws one per sample, for the
            dataset's tokenizer and for pretrained encoders (``raw_view``) alike. ``1``: the
            text only. Without augmentation (the test split) only the text is used.

    Labels (evaluation only): ``category`` and ``group_id`` (base emoji; variants share it).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        seed: int = 0,
        augment: bool | None = None,
        artifacts: dict[str, str] | None = None,
        image_size: int = 32,
        vocab_size: int = 2000,
        max_tokens: int = 32,
        train_variants: bool = True,
        test_variants: bool = False,
        tokenizer: TokenizerModel = "wordpiece",
        min_frequency: int = 1,
        text_views: int = 1,
    ) -> None:
        check_split(NAME, split)
        if text_views < 1:
            raise DataError(f"{NAME}: text_views must be >= 1, got {text_views}")
        base = dataset_root(NAME, root, [EMOJI_JSON, LABELS_JSON, IMAGES], hint=HINT)
        require_artifacts(NAME, split, artifacts, [TOKENIZER_FILE])
        self.split = split
        self.seed = seed
        self.augment = split == "train" if augment is None else augment
        self.max_tokens = max_tokens
        entries, self.n_skipped, self.category_names = load_catalogue(base, NAME)
        self.entries = split_entries(entries, split, train_variants if split == "train" else test_variants)
        settings = TokenizerSettings(model=tokenizer, vocab_size=vocab_size, min_frequency=min_frequency)
        texts = [e.text for e in self.entries]
        self.tokenizer = fitted_tokenizer(artifacts or {}, TOKENIZER_FILE, texts, settings)
        self.text_views = text_views if self.augment else 1
        self._views = [keyword_views(e, self.text_views) for e in self.entries]
        self._tokens = [[self.tokenizer.encode(t, max_tokens) for t in views] for views in self._views]
        self.image_tf = ImageTransform(image_size, 3, augment=self.augment)
        self._images = prepare_images(base / IMAGES, self.entries, self.image_tf)
        self._image_dir = base / IMAGES

    def raw_count(self, modality: str) -> int:
        """One content per sample."""
        return len(self.entries)

    def raw_value(self, content: int, modality: str) -> RawValue:
        """``text``: the raw text; ``image``: the 64 px PNG as ``uint8 [64, 64, 3]`` on white."""
        if modality == "text":
            return self.text(content)
        if modality == "image":
            return rgb_pixels(load_image(self._image_dir / self.entries[content].image))
        return super().raw_value(content, modality)

    def raw_view_count(self, modality: str) -> int:
        """``text``: ``text_views`` while augmenting; ``image``: 1."""
        return self.text_views if modality == "text" else 1

    def raw_view(self, content: int, modality: str, view: int) -> RawValue:
        """``text``: view ``view`` of :func:`keyword_views`; ``image``: the PNG (view 0 only)."""
        if modality == "text":
            return self._views[content][view]
        return super().raw_view(content, modality, view)

    def artifacts(self) -> dict[str, str]:
        """``{"tokenizer.json": ...}``: the tokenizer the test split must reuse."""
        return {TOKENIZER_FILE: self.tokenizer.to_json()}

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        """``image``: ``[3, S, S]``; ``text``: token ids ``[T <= max_tokens]``."""
        return {
            "image": ModalitySpec("image", channels=3, size=self.image_tf.size),
            "text": ModalitySpec("text", channels=0, vocab_size=self.tokenizer.vocab_size),
        }

    @property
    def label_names(self) -> tuple[str, ...]:
        """``("category", "group_id")``."""
        return ("category", "group_id")

    def __len__(self) -> int:
        return len(self.entries)

    def text(self, index: int) -> str:
        """The raw text of sample ``index``."""
        return self.entries[index].text

    def previews(self, index: int) -> dict[str, Preview]:
        """The un-normalised image and the raw text (not its truncated tokens)."""
        return {**sample_previews(self, index), "text": Preview("text", self.text(index))}

    def __getitem__(self, index: int) -> Sample:
        return self.item(index)

    def item(self, index: int, skip: frozenset[str] = frozenset()) -> Sample:
        """The sample at ``index``; a skipped modality is ``None`` (its transform or view draw not run)."""
        e = self.entries[index]
        image = None if "image" in skip else self.image_tf(self._images[index])
        views = self._tokens[index]
        text = None if "text" in skip else views[int(torch.randint(len(views), ()))] if len(views) > 1 else views[0]
        values: dict[str, Tensor | None] = {"image": image, "text": text}
        return Sample(id=e.uid, values=values, labels={"category": e.category, "group_id": e.group})
