"""Reading and validating manifest files (JSONL/CSV/TSV) for the ``manifest`` dataset.

Row numbers in messages are 1-based and count data rows only (the CSV header is not a row).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modalign.core.errors import DataError

NAME = "manifest"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
#: Fraction of ``train_file`` rows held out as the test split when there is no ``test_file``.
HOLDOUT_FRACTION = 0.1
ROW_NOTE = "1-based, counting data rows only"
#: Series augmentation (Um et al. 2017): Gaussian jitter and per-channel scale, in std units.
SERIES_JITTER = 0.03
SERIES_SCALE = 0.1


class BadValueError(Exception):
    """A value of one row that cannot be used; ``file`` is the path it points to, if any."""

    def __init__(self, why: str, file: Path | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.file = file


@dataclass
class ManifestRow:
    """A decoded row: ``values`` holds prepared raw values (not yet transformed).

    ``sources`` names each value's content (the resolved file, or the inline text);
    ``modality_ids`` are the content ids ``assign_content_ids`` gives.
    """

    number: int
    id: int
    values: dict[str, Any]
    labels: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    modality_ids: dict[str, int] = field(default_factory=dict)


def assign_content_ids(rows: list[ManifestRow]) -> None:
    """Give a column's value its own content id where rows sharing an id differ in that column.

    Several rows with one id are one pair group (never each other's negatives); a column whose
    value is the same on all of them (the photo of five captions) holds one item, whose content
    id is the sample id (nothing is stored). A column whose values differ within the group (the
    five captions) holds one item per distinct value: ``modality_ids[column]`` becomes a stable
    hash of the id and the value's source, so evaluation ranks each caption once and the photo
    once (``modalign.eval.items``). Rows with a unique id get nothing.
    """
    seen: dict[tuple[str, int], set[str]] = {}
    for r in rows:
        for col, src in r.sources.items():
            seen.setdefault((col, r.id), set()).add(src)
    for r in rows:
        for col, src in r.sources.items():
            if len(seen[(col, r.id)]) > 1:
                digest = hashlib.sha256(f"{col}\x00{r.id}\x00{src}".encode()).digest()
                r.modality_ids[col] = int.from_bytes(digest[:8], "big") >> 1


def read_manifest(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Read a JSONL (``.jsonl``/``.ndjson``) or CSV/TSV (``.csv``/``.tsv``) manifest.

    Returns:
        ``(columns, rows)``: the header's columns (JSONL: every key, in first-seen order) and one
        dict per data row.

    Raises:
        DataError: Unknown extension, unreadable file, or a JSONL line that is not an object.
    """
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read manifest {str(path)!r}: {e}") from None
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        rows = [dict(r) for r in reader]
        extra = next((i for i, r in enumerate(rows) if None in r), None)
        if extra is not None:
            raise DataError(
                f"manifest {str(path)!r}: data row {extra + 1} ({ROW_NOTE}) has more fields "
                f"than the header's {len(reader.fieldnames or [])} columns"
            )
        return list(reader.fieldnames or []), rows
    if suffix not in (".jsonl", ".ndjson"):
        raise DataError(f"manifest {str(path)!r}: unknown format {suffix!r}; use .jsonl, .ndjson, .csv or .tsv")
    rows, columns = [], {}
    for line in (ln for ln in text.splitlines() if ln.strip()):
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(
                f"manifest {str(path)!r}: data row {len(rows) + 1} ({ROW_NOTE}) is not valid JSON: {e}"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"manifest {str(path)!r}: data row {len(rows) + 1} ({ROW_NOTE}) is "
                f"{type(row).__name__}, expected a JSON object"
            )
        rows.append(row)
        columns.update(dict.fromkeys(row))
    return list(columns), rows


def is_empty(value: Any) -> bool:
    """Whether a manifest cell counts as missing (``None`` or blank text)."""
    return value is None or (isinstance(value, str) and not value.strip())


def _kind_of(value: Any, base: Path) -> str | None:
    """Kind of a manifest value by its extension (``None``: not a string, cannot tell)."""
    if not isinstance(value, str):
        return None
    low = value.strip().lower()
    if low.endswith(IMAGE_EXTENSIONS):
        return "image"
    if low.endswith(AUDIO_EXTENSIONS):
        return "audio"
    if low.endswith(".npy"):
        try:
            return "series" if np.load(base / value.strip(), mmap_mode="r").ndim == 2 else "vector"
        except (OSError, ValueError):
            return None
    return "text"


def infer_kinds(columns: list[str], rows: list[dict[str, Any]], base: Path) -> dict[str, str]:
    """Kind of each column from its first non-empty value that tells (see the module doc).

    Raises:
        DataError: If a column's values are not strings or no ``.npy`` of it can be read.
    """
    kinds: dict[str, str] = {}
    for col in columns:
        values = [r.get(col) for r in rows if not is_empty(r.get(col))]
        if not values:
            continue
        kind = next((k for k in (_kind_of(v, base) for v in values) if k is not None), None)
        if kind is None:
            raise DataError(
                f"column {col!r}: cannot infer a modality kind from {values[0]!r} (need a "
                "file path or inline text); pass modalities={column: kind} to choose columns"
            )
        kinds[col] = kind
    return kinds


def stable_id(value: Any) -> int:
    """Integer id of an id value: ints (or decimal strings) as they are, other strings hashed.

    Raises:
        ValueError: If ``value`` is empty or neither an int nor a string.
    """
    if isinstance(value, bool) or is_empty(value) or not isinstance(value, (int, str)):
        raise ValueError(f"id must be an int or a non-empty string, got {value!r}")
    if isinstance(value, int):
        return value
    text = value.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def label_classes(rows: list[dict[str, Any]], column: str) -> tuple[str, ...] | None:
    """Class names of a label column over ``rows`` (sorted), or ``None`` if all are ints >= 0."""
    values = [r.get(column) for r in rows if not is_empty(r.get(column))]
    as_text = [str(v).strip() for v in values]
    if all(not isinstance(v, (bool, float)) and t.isdigit() for v, t in zip(values, as_text, strict=True)):
        return None
    return tuple(sorted(set(as_text)))


def holdout_split(n: int, seed: int, groups: Sequence[Hashable] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train rows, test rows)``: a seeded hold-out of ``HOLDOUT_FRACTION`` of the groups (>= 1).

    Rows of one group (the rows sharing an id: five captions of one photo) land in the same
    split, so no item is both trained on and evaluated. Without ``groups`` every row is its own
    group; with all groups distinct the split is the same as without them.

    Args:
        n: Number of rows.
        seed: Seed of the permutation.
        groups: One hashable group key per row (``None``: one group per row).

    Raises:
        DataError: If there are fewer than 2 groups.
    """
    keys = list(range(n)) if groups is None else list(groups)
    if len(keys) != n:
        raise ValueError(f"expected {n} group keys, got {len(keys)}")
    order = list(dict.fromkeys(keys))  # distinct groups in order of first appearance
    if len(order) < 2:
        what = "rows" if groups is None else "distinct ids"
        raise DataError(
            f"a hold-out test split needs at least 2 {what}, the train file has {len(order)}; pass test_file"
        )
    n_test = max(1, round(len(order) * HOLDOUT_FRACTION))
    perm = np.random.default_rng([seed, 10]).permutation(len(order))
    test_groups = {order[g] for g in perm[:n_test]}
    test = np.array([i for i, k in enumerate(keys) if k in test_groups], dtype=np.int64)
    train = np.array([i for i, k in enumerate(keys) if k not in test_groups], dtype=np.int64)
    return train, test


def resolve_manifest(name: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> Path:
    """Resolve a manifest path.

    Absolute paths are kept; relative ones resolve against ``root`` if it is an existing
    folder, else against the current directory.

    Raises:
        DataError: If the file does not exist.
    """
    path = Path(name).expanduser()
    if not path.is_absolute():
        base = Path(root).expanduser() if root is not None else None
        path = (base if base is not None and base.is_dir() else Path.cwd()) / path
    if not path.is_file():
        raise DataError(
            f"manifest {str(path)!r} does not exist (relative manifest paths resolve against "
            "the data root if it exists, else the current directory)"
        )
    return path


def file_of(value: Any, base: Path) -> Path:
    """Resolve a manifest value naming a file, relative to the manifest's folder ``base``."""
    if not isinstance(value, str):
        raise BadValueError(f"expected a file path, got {value!r}")
    path = Path(value.strip()).expanduser()
    return path if path.is_absolute() else base / path


def load_array(path: Path, kind: str) -> np.ndarray:
    """Load a ``.npy`` series ``[C, T]`` or vector ``[D]`` as finite ``float32``.

    Raises:
        DataError: Unreadable file, non-numeric dtype, wrong rank, empty or non-finite array.
    """
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read .npy file: {e}") from None
    if (
        not isinstance(arr, np.ndarray)
        or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool)
        or np.iscomplexobj(arr)
    ):
        raise DataError(f"expected a real numeric array, got dtype {getattr(arr, 'dtype', type(arr))}")
    rank = 2 if kind == "series" else 1
    if arr.ndim != rank:
        what = "a series [C, T]" if kind == "series" else "a vector [D]"
        raise DataError(f"expected {what} (rank {rank}), got an array of shape {arr.shape} (rank {arr.ndim})")
    if arr.size == 0 or not np.isfinite(arr).all():
        raise DataError(f"array of shape {arr.shape} is empty or holds NaN/infinite values")
    return arr.astype(np.float32)


def reference_channels(kinds: dict[str, str], rows: list[dict[str, Any]], manifest: Path) -> dict[str, int]:
    """Channels (series ``C``, vector ``D``) of each ``.npy`` column: those of its first readable value.

    Raises:
        DataError: If a series or vector column of ``manifest`` has no readable value.
    """
    ref: dict[str, int] = {}
    base = manifest.parent
    for col, kind in kinds.items():
        if kind not in ("series", "vector"):
            continue
        for row in rows:
            if is_empty(row.get(col)):
                continue
            try:
                ref[col] = int(load_array(file_of(row[col], base), kind).shape[0])
                break
            except (DataError, BadValueError):
                continue
        if col not in ref:
            raise DataError(f"manifest {str(manifest)!r}: column {col!r} ({kind}) has no readable .npy value")
    return ref
