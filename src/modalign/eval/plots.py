"""PNG plots for a run directory: loss curve, cross-modal similarity matrix, 2-D projection.

Headless: this module selects matplotlib's ``Agg`` backend before importing ``pyplot`` (so
importing it in a notebook switches that session to ``Agg`` as well). Each function writes one
PNG, creates missing parent folders, closes its figure and returns the path written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: headless PNG output

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from modalign.eval.embed import EvalInputError, check_matrix, check_vector, l2_normalise

#: Marker per modality, in sorted modality order.
MARKERS: tuple[str, ...] = ("o", "^", "s", "D", "v", "P", "X", "*")


def _save(fig: Figure, out: str | Path) -> Path:
    """Write ``fig`` as PNG to ``out`` (parents created), close it, return the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average: point ``i`` is the mean of ``values[max(0, i-window+1) : i+1]``."""
    csum = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the records that carry ``key``, in step order."""
    pairs = []
    for i, r in enumerate(records):
        if key in r and r[key] is not None:
            if "step" not in r:
                raise EvalInputError(f"records[{i}]: has {key!r} but no 'step'")
            pairs.append((float(r["step"]), float(r[key])))
    if not pairs:
        raise EvalInputError(f"no record has the key {key!r}")
    arr = np.array(sorted(pairs))
    return arr[:, 0], arr[:, 1]


def _epoch_starts(records: Sequence[dict[str, Any]]) -> list[float]:
    """Steps at which the whole part of the ``epoch`` field changes (empty without epochs).

    Step records carry a fractional epoch (``1.25``: a quarter into the second epoch) and epoch
    summaries the number of epochs completed, so only a change of ``floor(epoch)`` is a boundary.
    """
    marks = sorted((float(r["step"]), math.floor(r["epoch"])) for r in records if "epoch" in r and "step" in r)
    return [step for (step, ep), (_, prev) in zip(marks[1:], marks[:-1], strict=True) if ep != prev]


def plot_loss_curve(records: Sequence[dict[str, Any]], out: str | Path, keys: Sequence[str] = ("loss",)) -> Path:
    """Plot training curves from ``metrics.jsonl``-style records.

    Each key is drawn raw (faint) and smoothed by a trailing moving average over about a tenth
    of its points (at most 50); epoch boundaries, when records carry ``"epoch"``, are dotted
    vertical lines. Records without a key (e.g. evaluation records) are skipped for that key.

    Args:
        records: Dicts with ``"step"`` and the plotted keys, optionally ``"epoch"``.
        out: PNG path to write.
        keys: Record fields to plot against ``step``.

    Returns:
        The path written.

    Raises:
        EvalInputError: If a key occurs in no record, or a record with a key lacks ``"step"``.
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, key in enumerate(keys):
        steps, values = _series(records, key)
        colour = f"C{i % 10}"
        window = max(1, min(50, len(values) // 10))
        ax.plot(steps, values, color=colour, alpha=0.3, linewidth=1)
        ax.plot(steps, smooth(values, window), color=colour, linewidth=2, label=f"{key} (avg {window})")
    for step in _epoch_starts(records):
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(", ".join(keys))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def plot_similarity_matrix(
    a: Tensor,
    b: Tensor,
    labels: Tensor | None,
    out: str | Path,
    max_items: int = 64,
    names: tuple[str, str] = ("a", "b"),
) -> Path:
    """Heat map of cosine similarities between the first ``max_items`` paired rows of ``a`` and ``b``.

    With labels the rows are stably sorted by label and class boundaries are drawn, so a good
    model shows a bright diagonal and bright class blocks.

    Args:
        a: ``Tensor[N, E]`` embeddings of modality ``names[0]`` (rows of the plot).
        b: ``Tensor[N, E]`` embeddings of modality ``names[1]`` (columns), paired with ``a``.
        labels: ``LongTensor[N]`` or ``None``.
        out: PNG path to write.
        max_items: Number of pairs shown.
        names: Modality names used as axis titles.

    Returns:
        The path written.

    Raises:
        EvalInputError: On mismatched shapes or ``max_items < 1``.
    """
    a = check_matrix("a", a)
    b = check_matrix("b", b, dim=a.shape[1])
    if a.shape[0] != b.shape[0]:
        raise EvalInputError(f"a and b must be paired row by row, got {a.shape[0]} and {b.shape[0]} rows")
    if max_items < 1:
        raise EvalInputError(f"max_items: must be at least 1, got {max_items}")
    lab = None if labels is None else check_vector("labels", labels, a.shape[0])[:max_items].cpu()
    a, b = a[:max_items].cpu(), b[:max_items].cpu()
    if lab is not None:
        order = torch.sort(lab, stable=True).indices
        a, b, lab = a[order], b[order], lab[order]
    sims = (l2_normalise(a) @ l2_normalise(b).T).numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(sims, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    if lab is not None:
        for edge in (np.flatnonzero(np.diff(lab.numpy())) + 0.5).tolist():
            ax.axhline(edge, color="white", linewidth=0.8)
            ax.axvline(edge, color="white", linewidth=0.8)
    ax.set_ylabel(f"{names[0]} (query)")
    ax.set_xlabel(f"{names[1]} (gallery)")
    ax.set_title(f"{names[0]} vs {names[1]}" + (" (sorted by label)" if lab is not None else ""))
    return _save(fig, out)


def _project(x: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D PCA or t-SNE coordinates of the rows of ``x`` (``[N, E]`` -> ``[N, 2]``)."""
    if method == "pca":
        from sklearn.decomposition import PCA

        components = min(2, x.shape[0], x.shape[1])
        coords = PCA(n_components=components, random_state=seed).fit_transform(x)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(1.0, (x.shape[0] - 1) / 3)))
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    else:
        raise EvalInputError(f"method: unknown projection {method!r}; allowed: pca, tsne")
    return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))


def _check_present(present: dict[str, Tensor] | None, names: list[str], n: int) -> dict[str, Tensor]:
    """Presence masks per modality (all ``True`` where ``present`` is ``None`` or lacks the name)."""
    masks = {}
    for m in names:
        mask = None if present is None else present.get(m)
        if mask is not None and (mask.dtype != torch.bool or mask.shape != (n,)):
            raise EvalInputError(f"present[{m!r}]: expected a BoolTensor[{n}], got {mask.dtype} {tuple(mask.shape)}")
        masks[m] = torch.ones(n, dtype=torch.bool) if mask is None else mask.cpu()
    return masks


def _stack_modalities(
    embeddings: dict[str, Tensor],
    labels: Tensor | None,
    present: dict[str, Tensor] | None,
    max_points: int,
    seed: int,
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
    """Subsample rows (the same rows in every modality), keep the present ones, stack them.

    Returns:
        ``(names, points [P, E] normalised, modality index per point [P], label per point [P] or None)``.
    """
    if not embeddings:
        raise EvalInputError("embeddings: no modality given")
    names = sorted(embeddings)
    mats = {m: check_matrix(f"embeddings[{m!r}]", embeddings[m]).cpu() for m in names}
    n, dim = mats[names[0]].shape
    for m in names:
        if mats[m].shape != (n, dim):
            raise EvalInputError(f"embeddings[{m!r}]: shape {tuple(mats[m].shape)}, expected [{n}, {dim}]")
    lab = None if labels is None else check_vector("labels", labels, n).cpu()
    masks = _check_present(present, names, n)
    per = max(1, min(n, max_points // len(names)))
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:per].sort().values
    rows = {m: keep[masks[m][keep]] for m in names}
    if sum(len(r) for r in rows.values()) < 2:
        raise EvalInputError("plot_projection: fewer than two present points to project")
    points = torch.cat([l2_normalise(mats[m][rows[m]]) for m in names]).numpy().astype(np.float64)
    owner = np.concatenate([np.full(len(rows[m]), i) for i, m in enumerate(names)])
    point_labels = None if lab is None else torch.cat([lab[rows[m]] for m in names]).numpy()
    return names, points, owner, point_labels


def plot_projection(
    embeddings: dict[str, Tensor],
    labels: Tensor | None,
    out: str | Path,
    method: Literal["pca", "tsne"] = "pca",
    max_points: int = 2000,
    seed: int = 0,
    present: dict[str, Tensor] | None = None,
) -> Path:
    """Joint 2-D projection of every modality's embeddings: marker per modality, colour per label.

    All modalities are projected together (one PCA / t-SNE fit on the stacked, L2-normalised
    rows), so a modality gap shows as separated marker clouds. At most ``max_points`` points are
    drawn: the same seeded random rows of every modality, minus the rows where ``present`` says
    the modality was not observed.

    Args:
        embeddings: ``{modality: Tensor[N, E]}``, row ``i`` of each modality is the same sample.
        labels: ``LongTensor[N]`` or ``None`` (then colour is per modality).
        out: PNG path to write.
        method: ``"pca"`` or ``"tsne"``.
        max_points: Cap on the total number of points.
        seed: Seed of the subsample and of the projection.
        present: Optional ``{modality: BoolTensor[N]}`` (e.g. ``EmbeddingSet.present``); absent
            rows are not drawn. ``None`` or a missing modality means all rows are present.

    Returns:
        The path written.

    Raises:
        EvalInputError: On mismatched shapes, an unknown method, or fewer than two points.
    """
    names, points, owner, lab = _stack_modalities(embeddings, labels, present, max_points, seed)
    coords = _project(points, method, seed)
    classes = [] if lab is None else np.unique(lab).tolist()
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7, 6))
    for i, m in enumerate(names):
        xy = coords[owner == i]
        marker = MARKERS[i % len(MARKERS)]
        if lab is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=12, marker=marker, color=f"C{i % 10}", alpha=0.7, label=m)
            continue
        colours = cmap(np.searchsorted(classes, lab[owner == i]) % cmap.N)
        ax.scatter(xy[:, 0], xy[:, 1], s=12, marker=marker, c=colours, alpha=0.7)
        ax.scatter([], [], marker=marker, color="black", label=m)
    for j, c in enumerate(classes[:20]):
        ax.scatter([], [], marker="s", color=cmap(j % cmap.N), label=f"label {c}")
    ax.legend(fontsize="small", loc="best", ncol=2 if len(classes) > 10 else 1)
    ax.set_title(f"{method.upper()} of {', '.join(names)}")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, out)


def plot_signal(values: np.ndarray, out: str | Path, image: bool = False) -> Path:
    """Small thumbnail of one sample's values: a line per channel, or a heat map.

    Args:
        values: ``[T]`` or ``[D]`` (one line), ``[C, T]`` (one line per channel, or rows of a
            heat map such as log-mel features when ``image``).
        out: PNG path to write.
        image: Draw ``[C, T]`` as a heat map (low channel at the bottom) instead of lines.

    Returns:
        The path written.

    Raises:
        EvalInputError: If ``values`` is not 1-D or 2-D, or is empty.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise EvalInputError(f"values: expected a non-empty [T] or [C, T] array, got shape {arr.shape}")
    fig, ax = plt.subplots(figsize=(2.4, 1.6))
    if image and arr.ndim == 2:
        ax.imshow(arr, origin="lower", aspect="auto", cmap="magma", interpolation="nearest")
    else:
        for i, row in enumerate(np.atleast_2d(arr)):
            ax.plot(row, linewidth=1, color=f"C{i % 10}")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout(pad=0.1)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=60)
    plt.close(fig)
    return path
