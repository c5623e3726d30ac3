"""One flat dictionary of every evaluation metric for a model's embeddings, its JSON file and table.

Key scheme of ``evaluate_embeddings`` (modalities in sorted order, ``a != b``):

* ``"{a}->{b}/R@1"``, ``"/R@5"``, ``"/R@10"``, ``"/median_rank"``: instance retrieval of ``b`` by
  ``a`` over the test rows where both modalities are present, **one query per distinct ``a``
  item and one gallery entry per distinct ``b`` item** (``modalign.eval.items``: several
  captions of one photo are several ``text`` items but one ``image`` item). Positives are the
  gallery items paired with the query (same sample id or shared content, transitively); the
  rank is that of the best-ranked positive, so image->text scores a hit when any caption of
  the image is in the top K and text->image ranks each caption's photo among distinct photos.
* with a label: ``"{a}->{b}/p@1"``, ``"{a}->{b}/mAP"`` (class-match retrieval over the same
  distinct items, restricted to items whose label, read from the item's first row, is known)
  and ``"{a}->{b}/zero_shot"`` (those ``a`` items classified by the nearest class prototype of
  modality ``b``; prototypes are built from the TRAIN set's labelled ``b`` rows when ``train``
  is given, otherwise from the distinct labelled ``b`` items of the test rows).
* with a label: ``"{a}/nmi"`` and ``"{a}/ari"`` for every modality: k-means with ``k`` = the
  number of distinct labels on the test rows where ``a`` is present and labelled, scored against
  the label (``modalign.eval.clustering``; ``seed`` is the k-means ``random_state``).
* with a label and a train set: ``"{a}/linear_probe"`` (unless ``probe=False``) and ``"{a}/knn"``
  for every modality, trained on the train rows where ``a`` is present and labelled, tested on
  the test rows where ``a`` is present and labelled.
* ``"{a}|{b}/modality_gap"`` for every unordered pair ``a < b``, over the co-present test rows.

``own_cluster_metrics`` adds, for a method with clustering objectives, ``"{label}/{a}/nmi"`` and
``"{label}/{a}/ari"``: the objective's own assignments (its centroids or prototypes, not a new
k-means) of the labelled test rows, scored the same way.

A pair without any co-present test row gets no keys; a pair whose co-present rows all lack the
label gets no label keys, nor does a modality without a labelled test row get clustering keys.
Unknown labels are ``-1`` and are always left out.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from modalign.eval.classification import (
    class_prototypes,
    knn_accuracy,
    linear_probe_accuracy,
    zero_shot_accuracy,
)
from modalign.eval.clustering import cluster_scores, kmeans_scores
from modalign.eval.embed import EmbeddingSet, EvalInputError
from modalign.eval.gap import modality_gap
from modalign.eval.items import distinct_rows, item_groups
from modalign.eval.retrieval import class_match_metrics, retrieval_metrics

#: Retrieval metrics reported per ordered pair.
RETRIEVAL_KEYS: tuple[str, ...] = ("R@1", "R@5", "R@10", "median_rank")


def _labels(es: EmbeddingSet, label: str, split: str) -> Tensor:
    """The ``label`` vector of ``es``, or a clear error naming the labels it does have."""
    if label not in es.labels:
        raise EvalInputError(f"{split} set has no label {label!r}; available: {sorted(es.labels)}")
    return es.labels[label]


def _labelled(es: EmbeddingSet, modality: str, label: str, split: str) -> Tensor:
    """``BoolTensor[N]``: rows of ``es`` where ``modality`` is present and ``label`` is known."""
    if modality not in es.present:
        raise EvalInputError(f"{split} set has no modality {modality!r}; available: {list(es.modalities)}")
    return es.present[modality] & (_labels(es, label, split) >= 0)


def _prototypes(
    train: EmbeddingSet | None, test: EmbeddingSet, rows: Tensor, b: str, label: str
) -> tuple[Tensor, Tensor]:
    """Class prototypes of modality ``b``: from the train set if given, else from test ``rows``."""
    if train is None:
        return class_prototypes(test.embeddings[b][rows], test.labels[label][rows])
    keep = _labelled(train, b, label, "train")
    if not bool(keep.any()):
        raise EvalInputError(f"train set has no row with modality {b!r} and a known {label!r} label")
    return class_prototypes(train.embeddings[b][keep], train.labels[label][keep])


def _pair_items(test: EmbeddingSet, a: str, b: str) -> tuple[Tensor, Tensor, Tensor] | None:
    """Distinct items of the ordered pair ``a -> b`` over the test rows where both are present.

    Returns:
        ``(query rows LongTensor[Q], gallery rows LongTensor[G], groups LongTensor[N])``: one
        row per distinct ``a`` item and per distinct ``b`` item, and every test row's relevance
        group (``modalign.eval.items``); ``None`` when no row holds both modalities.
    """
    rows = (test.present[a] & test.present[b]).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    content_a, content_b = test.content_of(a)[rows], test.content_of(b)[rows]
    groups = torch.full((len(test),), -1, dtype=torch.long)
    groups[rows] = item_groups(test.ids[rows], content_a, content_b)
    return rows[distinct_rows(content_a)], rows[distinct_rows(content_b)], groups


def _pair_metrics(
    train: EmbeddingSet | None, test: EmbeddingSet, a: str, b: str, label: str | None, chunk_size: int
) -> dict[str, float]:
    """Metrics of the ordered pair ``a -> b`` over its distinct items (see the module docstring)."""
    items = _pair_items(test, a, b)
    if items is None:
        return {}
    qrows, grows, groups = items
    ea, eb = test.embeddings[a], test.embeddings[b]
    ret = retrieval_metrics(ea[qrows], eb[grows], groups[qrows], groups[grows], chunk_size)
    out = {f"{a}->{b}/{k}": ret[k] for k in RETRIEVAL_KEYS}
    if label is None:
        return out
    y = _labels(test, label, "test")
    qrows, grows = qrows[y[qrows] >= 0], grows[y[grows] >= 0]
    if not bool(torch.isin(y[qrows], y[grows]).any()):  # no labelled query with a labelled match
        return out
    qa, ya = ea[qrows], y[qrows]
    match = class_match_metrics(qa, eb[grows], ya, y[grows], chunk_size)
    out[f"{a}->{b}/p@1"] = match["p@1"]
    out[f"{a}->{b}/mAP"] = match["mAP"]
    classes, protos = _prototypes(train, test, grows, b, label)
    out[f"{a}->{b}/zero_shot"] = zero_shot_accuracy(qa, ya, protos, classes, chunk_size)
    return out


def _probe_metrics(
    train: EmbeddingSet, test: EmbeddingSet, a: str, label: str, chunk_size: int, knn_k: int, probe: bool
) -> dict[str, float]:
    """Linear-probe and kNN accuracy of modality ``a`` (train split -> test split)."""
    tr, te = _labelled(train, a, label, "train"), _labelled(test, a, label, "test")
    for split, rows in (("train", tr), ("test", te)):
        if not bool(rows.any()):
            raise EvalInputError(f"{split} set has no row with modality {a!r} and a known {label!r} label")
    x_tr, y_tr = train.embeddings[a][tr], train.labels[label][tr]
    x_te, y_te = test.embeddings[a][te], test.labels[label][te]
    out = {f"{a}/knn": knn_accuracy(x_tr, y_tr, x_te, y_te, k=knn_k, chunk_size=chunk_size)}
    if probe:
        out[f"{a}/linear_probe"] = linear_probe_accuracy(x_tr, y_tr, x_te, y_te)
    return out


def _cluster_metrics(test: EmbeddingSet, a: str, label: str, seed: int) -> dict[str, float]:
    """k-means NMI and ARI of modality ``a`` over its labelled test rows (none: no keys)."""
    rows = _labelled(test, a, label, "test")
    if not bool(rows.any()):
        return {}
    scores = kmeans_scores(test.embeddings[a][rows], test.labels[label][rows], seed=seed)
    return {f"{a}/nmi": scores["nmi"], f"{a}/ari": scores["ari"]}


@runtime_checkable
class Clusterer(Protocol):
    """An objective that clusters embeddings itself (XDC, SeLaVi, MCN)."""

    def cluster_assignments(self, embeddings: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{modality: LongTensor[N]}`` cluster of each row of ``embeddings[modality] [N, E]``."""
        ...


def own_cluster_metrics(
    objectives: Mapping[str, object], test: EmbeddingSet, label: str, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """NMI and ARI of each clustering objective's own assignments of the labelled test rows.

    Args:
        objectives: ``{label: objective}`` of a method; those without ``cluster_assignments``
            are skipped, as is one whose clusters are not fitted yet (it raises ``ValueError``).
        test: Embedded evaluation split (normalised embeddings, the space the objectives cluster).
        label: Name of the label in ``test.labels``.
        device: Where the objectives' centroids live.

    Returns:
        ``{"<objective label>/<modality>/nmi": float, ".../ari": float}``.
    """
    out: dict[str, float] = {}
    for name, objective in objectives.items():
        if not isinstance(objective, Clusterer):
            continue
        for m in test.modalities:
            rows = _labelled(test, m, label, "test")
            if not bool(rows.any()):
                continue
            try:
                with torch.no_grad():
                    got = objective.cluster_assignments({m: test.embeddings[m][rows].to(device)})
            except ValueError:
                break
            if m in got:
                scores = cluster_scores(got[m].cpu(), test.labels[label][rows])
                out |= {f"{name}/{m}/nmi": scores["nmi"], f"{name}/{m}/ari": scores["ari"]}
    return out


def evaluate_embeddings(
    train: EmbeddingSet | None,
    test: EmbeddingSet,
    label: str | None,
    chunk_size: int = 1024,
    knn_k: int = 10,
    probe: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Every metric of ``modalign.eval`` for the modalities of ``test``, as one flat dict.

    See the module docstring for the exact key scheme. Memory grows with ``chunk_size`` times the
    gallery size (never gallery squared).

    Args:
        train: Embedded training split (for prototypes, linear probe and kNN) or ``None``.
        test: Embedded evaluation split.
        label: Name of the label in ``test.labels`` (and ``train.labels``) to use, or ``None``
            for label-free metrics only.
        chunk_size: Query rows per similarity block.
        knn_k: Neighbours of the kNN classifier.
        probe: Whether to fit the (slowest) linear probe.
        seed: ``random_state`` of the k-means behind the clustering metrics.

    Returns:
        ``{metric key: float}`` with plain Python floats.

    Raises:
        EvalInputError: If ``label`` is missing from a set, or the train set lacks a modality
            or labelled rows the metrics need.
    """
    if label is not None:
        _labels(test, label, "test")
        if train is not None:
            _labels(train, label, "train")
    names = test.modalities
    out: dict[str, float] = {}
    for a in names:
        for b in names:
            if a != b:
                out.update(_pair_metrics(train, test, a, b, label, chunk_size))
            rows = test.present[a] & test.present[b]
            if a < b and bool(rows.any()):
                gap = modality_gap(test.embeddings[a][rows], test.embeddings[b][rows])
                out[f"{a}|{b}/modality_gap"] = gap
        if label is not None:
            out.update(_cluster_metrics(test, a, label, seed))
            if train is not None:
                out.update(_probe_metrics(train, test, a, label, chunk_size, knn_k, probe))
    return {k: float(v) for k, v in out.items()}


def write_eval_json(metrics: dict[str, float], path: str | Path) -> Path:
    """Write ``metrics`` as one flat JSON object with sorted keys, atomically.

    The file is written to a temporary file in the same folder and moved into place with
    ``os.replace``, so a reader never sees a half-written file.

    Args:
        metrics: ``{key: number}``; values must be finite ints or floats.
        path: Destination file; parent folders are created.

    Returns:
        The path written.

    Raises:
        EvalInputError: If a value is not a finite number.
    """
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise EvalInputError(f"metric {k!r}: value {v!r} is not a finite number")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({k: float(v) for k, v in metrics.items()}, sort_keys=True, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _group(key: str) -> tuple[str, str]:
    """Split ``"image->text/R@1"`` into ``("image->text", "R@1")``; keys without ``/`` group as ``""``."""
    head, sep, tail = key.rpartition("/")
    return (head, tail) if sep else ("", key)


def _render_block(rows: list[str], columns: list[str], groups: dict[str, dict[str, float]]) -> list[str]:
    """Aligned lines of one table: a header of ``columns`` and one line per group in ``rows``."""
    cells = [["", *columns]] + [[r or "(all)", *(f"{groups[r][c]:.4f}" for c in columns)] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns) + 1)]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_table(metrics: dict[str, float]) -> str:
    """Render ``metrics`` as aligned plain-text tables, one row per metric group.

    A group is the key up to its last ``/`` (``"image->text"``, ``"audio"``, ``"audio|image"``);
    groups with the same set of metric names share one table, so retrieval, probe and gap rows
    each get their own header. Values are printed with four decimals.

    Args:
        metrics: A flat dict as returned by ``evaluate_embeddings``.

    Returns:
        The table text (no trailing newline); ``""`` for an empty dict.
    """
    groups: dict[str, dict[str, float]] = {}
    for key in sorted(metrics):
        head, name = _group(key)
        groups.setdefault(head, {})[name] = float(metrics[key])
    by_columns: dict[tuple[str, ...], list[str]] = {}
    for head, values in groups.items():
        by_columns.setdefault(tuple(values), []).append(head)
    blocks = []
    for columns, rows in by_columns.items():
        blocks.append("\n".join(_render_block(rows, _column_order(columns), groups)))
    return "\n\n".join(blocks)


def _column_order(columns: tuple[str, ...]) -> list[str]:
    """Put retrieval metrics first in their natural order, then the rest alphabetically."""
    known = [c for c in (*RETRIEVAL_KEYS, "mean_rank", "p@1", "mAP", "zero_shot") if c in columns]
    return known + sorted(c for c in columns if c not in known)
