"""``manifest``: your own paired data from a JSONL or CSV file, with no code.

One row per sample, one column per modality::

    {"id": "cat-01", "photo": "img/cat01.png", "caption": "a grey cat", "sound": "wav/cat01.wav"}
    {"id": "dog-07", "photo": "img/dog07.jpg", "caption": "a dog asleep", "sound": null}

* Image (``.png .jpg .jpeg .bmp .gif .webp``), audio (``.wav .flac .ogg``) and NumPy (``.npy``:
  ``[C, T]`` series or ``[D]`` vector) values are paths relative to the manifest's folder (or
  absolute); text is inline.
* An empty value (``""``, JSON ``null``, an absent JSON key) means the modality is missing for
  that row: partially paired data is allowed and collates with ``present = False``.
* Kinds are given (``modalities={"photo": "image", ...}``) or inferred from each column's first
  non-empty value (extension as above, ``.npy`` by its rank, any other string: text).
* Rows are numbered 1-based over data rows (a CSV header and blank JSONL lines are not counted).

Everything is decoded and validated when the dataset is built (eagerly, in memory), so a bad
file fails at once with the manifest, row, column, file and reason; data that does not fit in
memory belongs in streamed shards instead. With ``skip_bad=True`` bad rows are skipped,
counted in ``n_skipped`` and listed in ``skipped``.

Several rows may share an id: five rows holding one photo and five captions are one photo
with five captions (the COCO / Flickr30k layout). They are never each other's negatives, and
a column whose value differs within such a group gets a content id per value
(``Sample.modality_ids``, ``assign_content_ids``), so evaluation ranks the photo once and each
caption once.

Splits: ``train_file`` is the training split and ``test_file`` the test split. Without a
``test_file`` the test split is a hold-out of 10% of ``train_file``'s ids (at least one;
rows sharing an id, such as the captions of one photo, stay together), drawn with ``seed``:
build both splits with the same seed. State fitted on the train split (one tokenizer per
text column, per-channel statistics per series column) is
returned by ``artifacts()`` and must be passed to the test split.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from modalign.core.errors import ConfigError, DataError
from modalign.core.registry import register
from modalign.core.types import MODALITY_KINDS, ModalitySpec, Sample
from modalign.data.base import MultimodalDataset, check_split
from modalign.data.manifest_io import (
    NAME,
    ROW_NOTE,
    SERIES_JITTER,
    SERIES_SCALE,
    BadValueError,
    ManifestRow,
    assign_content_ids,
    file_of,
    holdout_split,
    infer_kinds,
    is_empty,
    label_classes,
    load_array,
    read_manifest,
    reference_channels,
    resolve_manifest,
    stable_id,
)
from modalign.data.preview import Preview, sample_previews
from modalign.data.raw import RAW_KINDS, RawValue, Waveform
from modalign.data.transforms.audio import AudioTransform, load_audio
from modalign.data.transforms.image import ImageTransform, load_image, rgb_pixels
from modalign.data.transforms.series import SeriesTransform
from modalign.data.transforms.text import TextTokenizer, TextTransform, TokenizerModel, TokenizerSettings

logger = logging.getLogger(__name__)


@register("dataset", NAME)
class ManifestDataset(MultimodalDataset):
    """Paired samples listed in a JSONL or CSV manifest (see the module docstring).

    Args:
        root: Folder that relative manifest paths resolve against (if it exists; else the
            current directory).
        split: ``"train"`` (``train_file``) or ``"test"`` (``test_file``, or the hold-out).
        seed: Seeds the hold-out test split (use the same seed for both splits).
        augment: Random transforms (``None``: on for ``train``).
        artifacts: ``artifacts()`` of the train split: ``tokenizer-<column>.json`` and
            ``series-<column>.json``; required by the test split.
        train_file: Training manifest (``.jsonl``/``.ndjson``/``.csv``/``.tsv``).
        test_file: Test manifest, or ``None`` to hold out 10% of ``train_file``'s ids (all rows of
            a held-out id: the captions of one photo stay together).
        modalities: ``{column: kind}`` with kinds among image/audio/text/series/vector;
            ``None`` infers every column except ``id_column`` and ``label_columns``.
        id_column: Column of sample ids (ints, or strings hashed stably); if the header lacks
            it, the 0-based row index is the id. Rows sharing an id are one pair group (never
            each other's negatives): five rows with one photo and five captions are one photo
            with five captions, and evaluation ranks the photo once and each caption once
            (``assign_content_ids``).
        label_columns: Evaluation-only labels: non-negative ints kept as they are, other
            values mapped to the index of their sorted unique value over ``train_file``.
        skip_bad: Skip bad rows (counted in ``n_skipped``, listed in ``skipped``) instead of
            raising.
        image_size: Side of the square images. image_channels: 1 (grey) or 3 (RGB).
        sample_rate: Audio rate in Hz. n_mels, n_fft, hop_length: log-mel parameters.
        max_seconds: Longest audio clip kept (longer ones are cropped).
        vocab_size: Largest vocabulary per text column. max_tokens: tokens per text.
        tokenizer: Tokenizer model fitted per text column, ``"wordpiece"`` or ``"word"``.
        min_frequency: Fewest train occurrences for a vocabulary entry (rarer ones -> ``[UNK]``).

    Raises:
        DataError: Naming the manifest, 1-based data row, column, file and reason of a bad
            value; a column missing from the header; a split without a good row.
        ConfigError: Unknown split or modality kind.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        seed: int = 0,
        augment: bool | None = None,
        artifacts: dict[str, str] | None = None,
        *,
        train_file: str,
        test_file: str | None = None,
        modalities: dict[str, str] | None = None,
        id_column: str = "id",
        label_columns: list[str] | None = None,
        skip_bad: bool = False,
        image_size: int = 64,
        image_channels: int = 3,
        sample_rate: int = 16000,
        n_mels: int = 64,
        max_seconds: float = 4.0,
        n_fft: int = 512,
        hop_length: int = 160,
        vocab_size: int = 8000,
        max_tokens: int = 64,
        tokenizer: TokenizerModel = "wordpiece",
        min_frequency: int = 1,
    ) -> None:
        check_split(NAME, split)
        self.split, self.seed, self.skip_bad = split, seed, skip_bad
        self.augment = split == "train" if augment is None else augment
        self.sample_rate = sample_rate
        self.train_path = resolve_manifest(train_file, root)
        own_file = split == "test" and test_file is not None
        self.path = resolve_manifest(test_file, root) if own_file and test_file else self.train_path
        train_columns, train_rows = read_manifest(self.train_path)
        columns, rows = read_manifest(self.path) if own_file else (train_columns, train_rows)
        self.id_column = id_column if id_column in columns else None
        self.label_columns = list(label_columns or [])
        self.kinds = self._choose_kinds(train_columns, train_rows, modalities, id_column)
        self._require_columns(columns, [*self.kinds, *self.label_columns])
        self._channels = reference_channels(self.kinds, train_rows, self.train_path)
        self._classes = {c: label_classes(train_rows, c) for c in self.label_columns}
        self._class_index = {
            c: {name: i for i, name in enumerate(names)} for c, names in self._classes.items() if names is not None
        }
        self.image_tf = ImageTransform(image_size, image_channels, augment=self.augment)
        self.audio_tf = AudioTransform(sample_rate, max_seconds, n_mels, n_fft, hop_length, augment=self.augment)
        self._rows = self._decode_rows(rows, self._split_indices(rows, test_file is None))
        self._raw: dict[str, np.ndarray] = {}  # per column: the rows holding a value (raw inputs)
        settings = TokenizerSettings(model=tokenizer, vocab_size=vocab_size, min_frequency=min_frequency)
        self._fit(artifacts or {}, settings, max_tokens)

    def _choose_kinds(
        self, columns: list[str], rows: list[dict[str, Any]], modalities: dict[str, str] | None, id_column: str
    ) -> dict[str, str]:
        if modalities is None:
            skip = {id_column, *self.label_columns}
            kinds = infer_kinds([c for c in columns if c not in skip], rows, self.train_path.parent)
        else:
            for col, kind in modalities.items():
                if kind not in MODALITY_KINDS:
                    raise ConfigError(f"modalities.{col}", f"unknown modality kind {kind!r}", list(MODALITY_KINDS))
            kinds = dict(modalities)
        self._require_columns(columns, [*kinds, *self.label_columns], self.train_path)
        both = sorted(set(kinds) & set(self.label_columns))
        if both:
            raise ConfigError("label_columns", f"columns {both} are both modalities and labels")
        if not kinds:
            raise DataError(f"manifest {str(self.train_path)!r}: no modality column (columns: {columns})")
        return dict(sorted(kinds.items()))

    def _require_columns(self, columns: list[str], needed: list[str], path: Path | None = None) -> None:
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(
                f"manifest {str(path or self.path)!r}: column(s) {missing} not in its header; "
                f"the header's columns are {columns}"
            )

    def _split_indices(self, rows: list[dict[str, Any]], holdout: bool) -> list[int]:
        """Rows of this split: all of them, or a hold-out by id (rows sharing an id stay together)."""
        if not holdout:
            return list(range(len(rows)))
        groups = None if self.id_column is None else [str(r.get(self.id_column)) for r in rows]
        train, test = holdout_split(len(rows), self.seed, groups)
        return [int(i) for i in (train if self.split == "train" else test)]

    def _where(self, number: int, column: str, file: Path | None) -> str:
        where = f"manifest {str(self.path)!r}, data row {number} ({ROW_NOTE}), column {column!r}"
        return where + (f", file {str(file)!r}" if file is not None else "")

    def _decode_rows(self, rows: list[dict[str, Any]], indices: list[int]) -> list[ManifestRow]:
        """Decode and validate ``rows[i]`` for ``i`` in ``indices``; bad rows raise or are skipped."""
        good: list[ManifestRow] = []
        self.skipped: list[str] = []
        self._unseen: dict[str, int] = {}
        for i in indices:
            try:
                good.append(self._decode_row(rows[i], i))
            except DataError as e:
                if not self.skip_bad:
                    raise
                self.skipped.append(str(e))
        self.n_skipped = len(self.skipped)
        if self.skipped:
            logger.warning(
                "%s: skipped %d of %d rows with bad values; first: %s",
                self.path,
                self.n_skipped,
                len(indices),
                self.skipped[0],
            )
        for col, n in self._unseen.items():
            logger.warning(
                "%s: %d rows of label %r have values absent from %s (label -1)", self.path, n, col, self.train_path
            )
        if not good:
            detail = "; ".join(self.skipped[:3]) if self.skipped else "it has no data rows"
            raise DataError(f"manifest {str(self.path)!r}: no usable row in split {self.split!r}: {detail}")
        assign_content_ids(good)
        return good

    def _decode_row(self, row: dict[str, Any], index: int) -> ManifestRow:
        """Decode one row (``index`` is 0-based in its file).

        Raises:
            DataError: Naming the manifest, row, column, file and reason.
        """
        number = index + 1
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for col, kind in self.kinds.items():
            if is_empty(row.get(col)):
                continue
            file = None if kind == "text" else file_of(row[col], self.path.parent)
            sources[col] = str(row[col]) if file is None else str(file.resolve())
            try:
                values[col] = self._decode_value(kind, row[col], file, col)
            except BadValueError as e:
                raise DataError(f"{self._where(number, col, e.file or file)}: {e.why}") from None
        if not values:
            raise DataError(f"{self._where(number, ', '.join(self.kinds), None)}: no modality has a value")
        sample_id = index
        if self.id_column is not None:
            try:
                sample_id = stable_id(row.get(self.id_column))
            except ValueError as e:
                raise DataError(f"{self._where(number, self.id_column, None)}: {e}") from None
        return ManifestRow(number, sample_id, values, self._labels(row, number), sources)

    def _decode_value(self, kind: str, value: Any, file: Path | None, column: str) -> Any:
        """Decode one value (``file is None`` for inline text) into a prepared raw value.

        Returns:
            Image ``uint8 [S, S, C]``, audio ``FloatTensor[N]``, text ``str``, series
            ``float32 [C, T]`` or vector ``FloatTensor[D]``.
        """
        if file is None:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise BadValueError(f"expected inline text, got {value!r}")
            return str(value)
        if not file.is_file():
            raise BadValueError("file does not exist", file)
        try:
            if kind == "image":
                return self.image_tf.prepare(load_image(file))
            if kind == "audio":
                return load_audio(file, self.sample_rate)
            arr = load_array(file, kind)
        except DataError as e:
            raise BadValueError(str(e), file) from None
        ref = self._channels.get(column)
        if ref is not None and arr.shape[0] != ref:
            raise BadValueError(
                f"{arr.shape[0]} {'channels' if kind == 'series' else 'values'} (shape "
                f"{arr.shape}), but the first readable row of {self.train_path.name} has {ref}"
            )
        return torch.from_numpy(arr) if kind == "vector" else arr

    def _labels(self, row: dict[str, Any], number: int) -> dict[str, int]:
        labels: dict[str, int] = {}
        for col in self.label_columns:
            value = row.get(col)
            if is_empty(value):
                continue
            index, text = self._class_index.get(col), str(value).strip()
            if index is None:
                if isinstance(value, (bool, float)) or not text.isdigit():
                    raise DataError(
                        f"{self._where(number, col, None)}: label {value!r} is not an int >= 0 "
                        f"like the train file's values"
                    )
                labels[col] = int(text)
            elif text in index:
                labels[col] = index[text]
            else:
                self._unseen[col] = self._unseen.get(col, 0) + 1
        return labels

    def _need(self, artifacts: dict[str, str], key: str) -> str | None:
        """``artifacts[key]``, or ``None`` on the train split (fit it); the test split requires it."""
        if key in artifacts:
            return artifacts[key]
        if self.split == "test":
            raise DataError(
                f"manifest {str(self.path)!r}: the test split needs {key!r} from the train "
                f"split's artifacts() (got {sorted(artifacts)})"
            )
        return None

    def _fit(self, artifacts: dict[str, str], tok: TokenizerSettings, max_tokens: int) -> None:
        """Build per-column text tokenizers and series statistics; encode the texts once."""
        self.tokenizers: dict[str, TextTokenizer] = {}
        self._series_tf: dict[str, SeriesTransform] = {}
        self._stats: dict[str, dict[str, list[float]]] = {}
        for col, kind in self.kinds.items():
            present = [r.values[col] for r in self._rows if col in r.values]
            if kind == "text":
                self.tokenizers[col] = self._tokenizer(col, artifacts, present, tok)
                text_tf = TextTransform(self.tokenizers[col], max_tokens)
                for r in self._rows:
                    if col in r.values:
                        r.values[col] = text_tf(r.values[col])
            elif kind == "series":
                self._series_tf[col] = self._series_transform(col, artifacts, present)

    def _tokenizer(
        self, col: str, artifacts: dict[str, str], texts: list[str], tok: TokenizerSettings
    ) -> TextTokenizer:
        key = f"tokenizer-{col}.json"
        stored = self._need(artifacts, key)
        if stored is not None:
            try:
                return TextTokenizer.from_json(stored)
            except DataError as e:
                raise DataError(f"artifact {key!r}: {e}") from None
        try:
            return TextTokenizer.fit(texts, **tok._asdict())
        except DataError as e:
            raise DataError(f"manifest {str(self.path)!r}, text column {col!r}: {e}") from None

    def _series_transform(self, col: str, artifacts: dict[str, str], series: list[np.ndarray]) -> SeriesTransform:
        key = f"series-{col}.json"
        stored = self._need(artifacts, key)
        if stored is None:
            if not series:
                raise DataError(f"manifest {str(self.path)!r}, series column {col!r}: no value in the train split")
            mean, std = SeriesTransform.fit(series)
        else:
            try:
                stats = json.loads(stored)
                mean, std = [float(m) for m in stats["mean"]], [float(s) for s in stats["std"]]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"artifact {key!r} is not {{'mean': [...], 'std': [...]}}: {e}") from None
            if self._channels.get(col, len(mean)) != len(mean):
                raise DataError(
                    f"artifact {key!r} has {len(mean)} channels, column {col!r} of "
                    f"{str(self.train_path)!r} has {self._channels[col]}"
                )
        self._stats[col] = {"mean": mean, "std": std}
        return SeriesTransform(mean, std, augment=self.augment, jitter=SERIES_JITTER, scale=SERIES_SCALE)

    def artifacts(self) -> dict[str, str]:
        """``tokenizer-<column>.json`` per text column and ``series-<column>.json`` per series column."""
        out = {f"tokenizer-{c}.json": tok.to_json() for c, tok in self.tokenizers.items()}
        out.update({f"series-{c}.json": json.dumps(s) for c, s in self._stats.items()})
        return out

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        """One spec per modality column, sorted by name."""
        specs: dict[str, ModalitySpec] = {}
        for col, kind in self.kinds.items():
            if kind == "image":
                specs[col] = ModalitySpec("image", channels=self.image_tf.channels, size=self.image_tf.size)
            elif kind == "audio":
                specs[col] = ModalitySpec("audio", channels=self.audio_tf.n_mels)
            elif kind == "text":
                specs[col] = ModalitySpec("text", vocab_size=self.tokenizers[col].vocab_size)
            else:
                specs[col] = ModalitySpec(kind, channels=self._channels[col])
        return specs

    @property
    def label_names(self) -> tuple[str, ...]:
        """The ``label_columns``."""
        return tuple(self.label_columns)

    def label_classes(self, column: str) -> tuple[str, ...] | None:
        """Class names of a string label column (index = label), ``None`` for an int column."""
        return self._classes[column]

    def row_number(self, index: int) -> int:
        """1-based data row (in ``self.path``) of sample ``index``."""
        return self._rows[index].number

    def __len__(self) -> int:
        return len(self._rows)

    def previews(self, index: int) -> dict[str, Preview]:
        """As the default, but audio columns are the decoded waveform (resampled, uncropped)."""
        out = sample_previews(self, index)
        for col, raw in self._rows[index].values.items():
            if self.kinds[col] == "audio":
                out[col] = Preview("audio", raw.numpy(), self.sample_rate)
        return out

    def raw_count(self, modality: str) -> int:
        """The rows holding a ``modality`` value, one content each (the feature cache keys by value)."""
        return len(self._raw_rows(modality))

    def raw_value(self, content: int, modality: str) -> RawValue:
        """The raw value of the ``content``-th row holding ``modality``.

        ``text``: the inline text; ``image``: the file at its own size, ``uint8 [H, W, 3]`` on
        white; ``audio``: the decoded waveform at ``sample_rate``.

        Raises:
            NotImplementedError: For a ``series`` or ``vector`` column (no pretrained encoder reads them).
        """
        row = self._rows[self._raw_rows(modality)[content]]
        kind = self.kinds[modality]
        if kind == "image":
            return rgb_pixels(load_image(Path(row.sources[modality])))
        if kind == "audio":
            return Waveform(row.values[modality].numpy(), self.sample_rate)
        return row.sources[modality]  # the inline text itself (``values`` holds its tokens)

    def raw_index(self, index: int, modality: str) -> int:
        """The content of sample ``index``'s ``modality`` value: its rank among the rows holding one.

        Raises:
            DataError: If sample ``index`` has no ``modality`` value.
        """
        rows = self._raw_rows(modality)
        position = int(np.searchsorted(rows, index))
        if position == len(rows) or rows[position] != index:
            where = self._where(self._rows[index].number, modality, None)
            raise DataError(f"{where}: the row has no value to encode")
        return position

    def _raw_rows(self, modality: str) -> np.ndarray:
        """Sorted indices of the rows holding a ``modality`` value (computed once per column).

        Raises:
            NotImplementedError: For a kind pretrained encoders do not read raw (series, vector).
        """
        if self.kinds[modality] not in RAW_KINDS:
            raise NotImplementedError(self._no_raw(modality))
        if modality not in self._raw:
            self._raw[modality] = np.array(
                [i for i, r in enumerate(self._rows) if modality in r.values], dtype=np.int64
            )
        return self._raw[modality]

    def __getitem__(self, index: int) -> Sample:
        row = self._rows[index]
        values: dict[str, Tensor] = {}
        for col, raw in row.values.items():
            kind = self.kinds[col]
            if kind == "image":
                values[col] = self.image_tf(raw)
            elif kind == "audio":
                values[col] = self.audio_tf(raw)
            elif kind == "series":
                values[col] = self._series_tf[col](raw)
            else:
                values[col] = raw
        return Sample(id=row.id, values=values, labels=dict(row.labels), modality_ids=dict(row.modality_ids))
