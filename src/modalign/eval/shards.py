"""Embedding export in shards: numbered ``.npz`` files plus an ``index.json``, and their readers.

A single ``.npz`` (``save_embeddings``) holds a whole split in memory; for millions of rows
``write_embedding_shards`` streams instead: it embeds batch by batch and writes a shard every
``shard_size`` rows, so memory holds at most one shard plus one batch. Layout of ``OUT_DIR``::

    shard-00000.npz ... shard-NNNNN.npz   # same keys as the single file, rows in loader order
    index.json                            # written last: shards, rows, modalities, labels

Keys of every ``.npz`` (single file or shard): ``ids``, ``embeddings/<m>`` (``float32 [n, E]``),
``present/<m>`` (``bool [n]``), ``labels/<name>`` (``int64 [n]``, ``-1`` unknown) and, for a
modality whose rows carry their own content ids, ``content/<m>`` (``int64 [n]``). A shard where
a modality or label never occurred is filled on reading (zeros and ``present = False``, or
``-1``), so every ``EmbeddingSet`` that ``iter_embedding_shards`` yields has the same keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalign.core.types import Batch, Embedder
from modalign.eval.embed import EmbeddingSet, EvalInputError, _assemble, _embed_batch, batch_content_ids

INDEX_FILE = "index.json"
SHARD_NAME = "shard-{:05d}.npz"
FORMAT = "modalign-embeddings/1"


def save_embeddings(emb: EmbeddingSet, out: Path) -> Path:
    """Write ``emb`` as one ``.npz`` file (keys in the module docstring); returns ``out``."""
    arrays: dict[str, Any] = {"ids": emb.ids.numpy()}
    for m, x in emb.embeddings.items():
        arrays[f"embeddings/{m}"] = x.numpy()
        arrays[f"present/{m}"] = emb.present[m].numpy()
    for name, y in emb.labels.items():
        arrays[f"labels/{name}"] = y.numpy()
    for m, c in emb.content_ids.items():
        arrays[f"content/{m}"] = c.numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return out


def _read_npz(path: Path, widths: dict[str, int] | None = None, labels: Iterable[str] = ()) -> EmbeddingSet:
    """One ``.npz`` as an ``EmbeddingSet``; modalities of ``widths`` and ``labels`` it lacks are filled."""
    with np.load(path) as arrays:
        ids = torch.from_numpy(arrays["ids"]).long()
        n = len(ids)
        emb = {
            k.split("/", 1)[1]: torch.from_numpy(arrays[k]).float() for k in arrays.files if k.startswith("embeddings/")
        }
        present = {m: torch.from_numpy(arrays[f"present/{m}"]).bool() for m in emb}
        ints = {k: torch.from_numpy(arrays[k]).long() for k in arrays.files if k.startswith(("labels/", "content/"))}
    labs = {k.split("/", 1)[1]: v for k, v in ints.items() if k.startswith("labels/")}
    content = {k.split("/", 1)[1]: v for k, v in ints.items() if k.startswith("content/")}
    for m, width in (widths or {}).items():
        if m not in emb:
            emb[m], present[m] = torch.zeros(n, width), torch.zeros(n, dtype=torch.bool)
    for name in labels:
        labs.setdefault(name, torch.full((n,), -1, dtype=torch.long))
    return EmbeddingSet(embeddings=emb, present=present, ids=ids, labels=labs, content_ids=content)


def concat_embedding_sets(sets: list[EmbeddingSet]) -> EmbeddingSet:
    """Rows of ``sets`` in order; a modality or label missing from some set is filled there.

    Raises:
        EvalInputError: If ``sets`` is empty or a modality's width differs between sets.
    """
    if not sets:
        raise EvalInputError("concat_embedding_sets: no sets given")
    widths: dict[str, int] = {}
    for s in sets:
        for m, x in s.embeddings.items():
            if widths.setdefault(m, int(x.shape[1])) != x.shape[1]:
                raise EvalInputError(f"modality {m!r} has width {widths[m]} in one set and {x.shape[1]} in another")
    names = sorted({k for s in sets for k in s.labels})
    content = sorted({m for s in sets for m in s.content_ids})
    filled = [_fill(s, widths, names) for s in sets]
    return EmbeddingSet(
        embeddings={m: torch.cat([s.embeddings[m] for s in filled]) for m in widths},
        present={m: torch.cat([s.present[m] for s in filled]) for m in widths},
        ids=torch.cat([s.ids for s in filled]),
        labels={k: torch.cat([s.labels[k] for s in filled]) for k in names},
        content_ids={m: torch.cat([s.content_of(m) for s in filled]) for m in content},
    )


def _fill(s: EmbeddingSet, widths: dict[str, int], names: list[str]) -> EmbeddingSet:
    """``s`` with zero embeddings (absent) for modalities of ``widths`` and ``-1`` for labels it lacks."""
    n = len(s)
    return EmbeddingSet(
        embeddings={m: s.embeddings.get(m, torch.zeros(n, w)) for m, w in widths.items()},
        present={m: s.present.get(m, torch.zeros(n, dtype=torch.bool)) for m in widths},
        ids=s.ids,
        labels={k: s.labels.get(k, torch.full((n,), -1, dtype=torch.long)) for k in names},
        content_ids=s.content_ids,
    )


class ShardWriter:
    """Buffer ``EmbeddingSet`` rows and write a shard of ``shard_size`` rows whenever one is full.

    Args:
        out_dir: Directory of the shards (created; an existing ``index.json`` is replaced on
            ``close``, stale shards of an earlier export are removed).
        shard_size: Rows per shard (the last shard may be shorter).

    Raises:
        EvalInputError: If ``shard_size < 1``.
    """

    def __init__(self, out_dir: Path, shard_size: int) -> None:
        if int(shard_size) != shard_size or shard_size < 1:
            raise EvalInputError(f"shard_size: must be a positive integer, got {shard_size!r}")
        self.out_dir, self.shard_size = Path(out_dir), int(shard_size)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for old in [self.out_dir / INDEX_FILE, *self.out_dir.glob("shard-*.npz")]:
            old.unlink(missing_ok=True)
        self.buffer: list[EmbeddingSet] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.widths: dict[str, int] = {}
        self.labels: set[str] = set()

    def add(self, emb: EmbeddingSet) -> None:
        """Append the rows of ``emb``; writes every shard that becomes full."""
        self.buffer.append(emb)
        self.buffered += len(emb)
        while self.buffered >= self.shard_size:
            rows = concat_embedding_sets(self.buffer)
            self._write(rows.subset(torch.arange(len(rows)) < self.shard_size))
            rest = rows.subset(torch.arange(len(rows)) >= self.shard_size)
            self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)

    def _write(self, emb: EmbeddingSet) -> None:
        name = SHARD_NAME.format(len(self.shards))
        save_embeddings(emb, self.out_dir / name)
        self.shards.append({"file": name, "rows": len(emb)})
        self.widths |= {m: int(x.shape[1]) for m, x in emb.embeddings.items()}
        self.labels |= set(emb.labels)

    def close(self) -> Path:
        """Write the last partial shard and ``index.json`` (atomically); returns the index path.

        Raises:
            EvalInputError: If no row was added.
        """
        if self.buffered:
            self._write(concat_embedding_sets(self.buffer))
            self.buffer, self.buffered = [], 0
        if not self.shards:
            raise EvalInputError("ShardWriter: no rows were added")
        index = {
            "format": FORMAT,
            "rows": sum(s["rows"] for s in self.shards),
            "shard_size": self.shard_size,
            "modalities": dict(sorted(self.widths.items())),
            "labels": sorted(self.labels),
            "shards": self.shards,
        }
        path, tmp = self.out_dir / INDEX_FILE, self.out_dir / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, path)
        return path


def write_embedding_shards(
    embedder: Embedder,
    batches: Iterable[Batch],
    out_dir: Path,
    shard_size: int,
    device: torch.device | str = "cpu",
) -> Path:
    """Embed every batch and stream the rows into shards (see the module docstring).

    Like ``embed_loader`` (no grad, eval mode restored afterwards), but memory holds at most one
    shard and one batch, never the whole split.

    Args:
        embedder: Anything implementing ``modalign.core.Embedder``.
        batches: Iterable of ``Batch``.
        out_dir: Output directory.
        shard_size: Rows per shard.
        device: Device each batch is moved to before ``embed``.

    Returns:
        Path of ``index.json``.

    Raises:
        EvalInputError: If the loader is empty, the embedder returns tensors of the wrong shape or
            ``shard_size < 1``.
    """
    writer = ShardWriter(out_dir, shard_size)
    was_training = getattr(embedder, "training", None)
    set_eval = getattr(embedder, "eval", None)
    if callable(set_eval):
        set_eval()
    try:
        with torch.no_grad():
            for batch in batches:
                embeddings, present, labels = _assemble([_embed_batch(embedder, batch, device)], [batch])
                ids = batch.ids.to("cpu", torch.long)
                content = batch_content_ids([batch], set(embeddings))
                writer.add(EmbeddingSet(embeddings, present, ids, labels, content))
    finally:
        set_train = getattr(embedder, "train", None)
        if isinstance(was_training, bool) and callable(set_train):
            set_train(was_training)
    return writer.close()


def _index(path: Path) -> tuple[Path, dict[str, Any]]:
    """``(directory, parsed index)`` of a shard directory or its ``index.json``."""
    index_path = path / INDEX_FILE if path.is_dir() else path
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no embedding shard index (write one with --shard-size)")
    index: dict[str, Any] = json.loads(index_path.read_text())
    if index.get("format") != FORMAT:
        raise EvalInputError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index_path.parent, index


def iter_embedding_shards(path: Path) -> Iterator[EmbeddingSet]:
    """Yield the shards of an export in order, each an ``EmbeddingSet`` with the index's keys.

    Args:
        path: The shard directory or its ``index.json``.

    Raises:
        FileNotFoundError: If there is no index or a shard it lists is missing.
        EvalInputError: If the index is not a modalign embedding index.
    """
    folder, index = _index(Path(path))
    for shard in index["shards"]:
        emb = _read_npz(folder / shard["file"], index["modalities"], index["labels"])
        if len(emb) != shard["rows"]:
            raise EvalInputError(f"{folder / shard['file']}: {len(emb)} rows, the index says {shard['rows']}")
        yield emb


def load_embeddings(path: Path) -> EmbeddingSet:
    """Read an export whole: a single ``.npz`` file, or a shard directory / ``index.json``."""
    path = Path(path)
    if path.suffix == ".npz":
        return _read_npz(path)
    return concat_embedding_sets(list(iter_embedding_shards(path)))
