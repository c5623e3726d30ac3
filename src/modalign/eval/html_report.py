"""A run report: one self-contained HTML file with metrics, plots, retrieval examples and config.

Everything is embedded as base64 ``data:`` URIs (PNG plots and images, WAV audio), with no
script and no external link, so the file can be mailed or archived alone. Rendering uses the
standard library only (``html.escape`` and ``string.Template``); plots come from
``modalign.eval.plots``.

Sections (each an HTML ``<section>`` with this id): ``metrics``, ``loss``, ``similarity``,
``embedding-map``, ``retrieval``, ``config``, ``command``.
"""

from __future__ import annotations

import base64
import html
import io
import os
import string
import tempfile
import time
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from modalign.data.preview import Preview
from modalign.eval.embed import EmbeddingSet, l2_normalise
from modalign.eval.plots import plot_loss_curve, plot_projection, plot_signal, plot_similarity_matrix

#: Section ids, in page order.
SECTIONS: tuple[str, ...] = ("metrics", "loss", "similarity", "embedding-map", "retrieval", "config", "command")

_PAGE = string.Template(
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
td.num{text-align:right;font-family:monospace}pre{background:#f6f6f6;padding:1em;overflow-x:auto}
img.thumb{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;border:1px solid #ddd}
img.plot{max-width:100%}.item{display:inline-block;vertical-align:top;width:170px;margin:4px;font-size:small}
.query{background:#eef}.hit{outline:3px solid #4a4}.text{max-height:8em;overflow:auto}
audio{width:165px}
</style></head><body>
<h1>$title</h1>
<p>$summary</p>
$sections
</body></html>
"""
)


@dataclass
class ReportInputs:
    """What a run report shows.

    Attributes:
        title: Page title (e.g. the run directory).
        metrics: Flat test metrics (``eval.json``) or ``None`` if the run was not evaluated.
        records: ``metrics.jsonl`` records (``step``, ``loss``, ``loss/<part>``, ...).
        config_text: The resolved recipe (``config.yaml``).
        command: The command line(s) that produced the run, or ``None`` if not recorded.
        test: Test-split embeddings; row ``i`` is sample ``i`` of the test dataset.
        previews: ``row -> {modality: Preview}`` of a test sample (``dataset.previews``).
        label: Evaluation label colouring the plots and shown beside examples, or ``None``.
        projection: 2-D projection of the embedding map.
        n_queries: Retrieval queries shown per direction.
        top_k: Matches shown per query.
        max_directions: Most query->gallery modality directions shown.
        seed: Seed of the choice of queries.
    """

    title: str
    metrics: dict[str, float] | None
    records: list[dict[str, Any]]
    config_text: str
    command: str | None
    test: EmbeddingSet
    previews: Callable[[int], dict[str, Preview]]
    label: str | None = None
    projection: Literal["pca", "tsne"] = "pca"
    n_queries: int = 4
    top_k: int = 5
    max_directions: int = 4
    seed: int = 0
    _cache: dict[tuple[int, str], str] = field(default_factory=dict, repr=False)

    def media_html(self, row: int, modality: str) -> str:
        """HTML of ``modality`` of test row ``row`` (rendered once, however often it is shown)."""
        key = (row, modality)
        if key not in self._cache:
            p = self.previews(row).get(modality)
            self._cache[key] = preview_html(p) if p is not None else "<em>absent</em>"
        return self._cache[key]


@dataclass(frozen=True)
class RetrievalExample:
    """One retrieval query and what it found.

    Attributes:
        query: Test row of the query.
        matches: Best gallery rows as ``(row, cosine similarity)``, best first.
        pair_rank: Rank of the query's own pair among all gallery rows (1 + rows scoring higher).
    """

    query: int
    matches: list[tuple[int, float]]
    pair_rank: int


# --- encoding -------------------------------------------------------------------------------


def data_uri(mime: str, payload: bytes) -> str:
    """``data:<mime>;base64,...`` of ``payload``."""
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG file of a ``uint8 [H, W, 1|3]`` (or ``[H, W]``) image."""
    arr = pixels[:, :, 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """16-bit mono PCM WAV file of a waveform in ``[-1, 1]`` (clipped)."""
    pcm = (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def plot_png(draw: Callable[[Path], Path]) -> bytes:
    """Bytes of the PNG that ``draw(path)`` writes (through a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="modalign-report-") as tmp:
        return draw(Path(tmp) / "plot.png").read_bytes()


# --- retrieval examples ---------------------------------------------------------------------


def retrieval_examples(
    test: EmbeddingSet, query: str, gallery: str, n_queries: int, top_k: int, seed: int = 0
) -> list[RetrievalExample]:
    """Best ``gallery`` matches of a few seeded ``query`` rows, by cosine similarity.

    Queries are drawn among rows where both modalities are present (so each has its own pair
    in the gallery); the gallery is every row where ``gallery`` is present. Gallery rows with
    identical embeddings (one recording paired with several images) are shown once, the
    query's own row first among equals.

    Returns:
        One ``RetrievalExample`` per query (fewer if fewer rows qualify), in row order.
    """
    both = (test.present[query] & test.present[gallery]).nonzero().flatten()
    pick = torch.randperm(len(both), generator=torch.Generator().manual_seed(seed))[:n_queries]
    rows = both[pick].sort().values.tolist()
    allowed = test.present[gallery].nonzero().flatten()
    g = l2_normalise(test.embeddings[gallery][allowed])
    q = l2_normalise(test.embeddings[query][rows]) if rows else g[:0]
    sims = q @ g.T
    return [_top_matches(r, sims[i], allowed, top_k) for i, r in enumerate(rows)]


def _top_matches(row: int, sims: torch.Tensor, allowed: torch.Tensor, top_k: int) -> RetrievalExample:
    """The ``top_k`` distinct-similarity gallery rows of one query (own row first among ties)."""
    is_own = allowed == row
    own = is_own.float() * 1e-6  # breaks exact ties in favour of the true pair
    pair_rank = 1 + int((sims > sims[is_own].max()).sum())
    order = torch.argsort(sims + own, descending=True, stable=True).tolist()
    matches: list[tuple[int, float]] = []
    seen: set[float] = set()
    for j in order:
        key = round(float(sims[j]), 6)
        if key in seen:
            continue
        seen.add(key)
        matches.append((int(allowed[j]), float(sims[j])))
        if len(matches) == top_k:
            break
    return RetrievalExample(row, matches, pair_rank)


def directions(modalities: Sequence[str], limit: int) -> list[tuple[str, str]]:
    """Ordered ``(query, gallery)`` modality pairs: ``(a, b)`` then ``(b, a)`` per pair, at most ``limit``."""
    names = sorted(modalities)
    out = [d for i, a in enumerate(names) for b in names[i + 1 :] for d in ((a, b), (b, a))]
    return out[:limit]


# --- HTML pieces ----------------------------------------------------------------------------


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _plot_img(png: bytes, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="{data_uri("image/png", png)}">'


def preview_html(p: Preview) -> str:
    """HTML of one preview: an image, an audio player, escaped text, or a small plot."""
    if p.kind == "text":
        return f'<div class="text">{html.escape(str(p.value))}</div>'
    value = np.asarray(p.value)
    if p.kind == "image":
        return f'<img class="thumb" alt="image" src="{data_uri("image/png", png_bytes(value))}">'
    if p.is_waveform and p.sample_rate is not None:
        return f'<audio controls preload="none" src="{data_uri("audio/wav", wav_bytes(value, p.sample_rate))}"></audio>'
    if p.kind == "vector" and value.size <= 16:
        cells = "".join(f'<td class="num">{v:.3g}</td>' for v in value.reshape(-1).tolist())
        return f"<table><tr>{cells}</tr></table>"
    png = plot_png(lambda out: plot_signal(value, out, image=p.kind == "audio"))
    return f'<img class="thumb" alt="{p.kind}" src="{data_uri("image/png", png)}">'


def metrics_table(metrics: dict[str, float] | None) -> str:
    """Two-column table of the flat metrics, sorted by key."""
    if not metrics:
        return "<p>not evaluated (no eval.json)</p>"
    rows = "".join(
        f'<tr><td>{html.escape(k)}</td><td class="num">{v:.4f}</td></tr>' for k, v in sorted(metrics.items())
    )
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def loss_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """``loss`` then every ``loss/<part>`` key logged in the records, sorted."""
    keys = {k for r in records for k in r if (k == "loss" or k.startswith("loss/")) and "step" in r}
    return sorted(keys, key=lambda k: (k != "loss", k))


def loss_section(records: list[dict[str, Any]]) -> str:
    """Training curves of the total loss and every logged part."""
    keys = loss_keys(records)
    if not keys:
        return "<p>no loss was logged (metrics.jsonl is missing or empty)</p>"
    return _plot_img(plot_png(lambda out: plot_loss_curve(records, out, keys=keys)), "loss curves")


def _labels(inputs: ReportInputs, test: EmbeddingSet) -> torch.Tensor | None:
    return test.labels.get(inputs.label) if inputs.label else None


def similarity_section(inputs: ReportInputs) -> str:
    """Cosine similarity matrix of the first two modalities on rows where both are present."""
    names = sorted(inputs.test.embeddings)
    if len(names) < 2:
        return "<p>one modality only: no cross-modal similarity</p>"
    a, b = names[:2]
    sub = inputs.test.subset(inputs.test.present[a] & inputs.test.present[b])
    if len(sub) == 0:
        return f"<p>no test sample has both {html.escape(a)} and {html.escape(b)}</p>"
    labels = _labels(inputs, sub)
    png = plot_png(lambda out: plot_similarity_matrix(sub.embeddings[a], sub.embeddings[b], labels, out, names=(a, b)))
    return _plot_img(png, "similarity matrix")


def embedding_map_section(inputs: ReportInputs) -> str:
    """Joint 2-D projection of the test embeddings, coloured by label."""
    test = inputs.test
    png = plot_png(
        lambda out: plot_projection(
            test.embeddings, _labels(inputs, test), out, method=inputs.projection, present=test.present
        )
    )
    by = f" coloured by {html.escape(inputs.label)}" if inputs.label else ""
    return f"<p>{inputs.projection.upper()} of the test embeddings{by}.</p>" + _plot_img(png, "embedding map")


def _item(inputs: ReportInputs, row: int, modality: str, note: str, css: str) -> str:
    """One example cell: the preview of ``modality`` of test row ``row`` with a caption."""
    body = inputs.media_html(row, modality)
    label = ""
    if inputs.label and inputs.label in inputs.test.labels:
        label = f"<br>{html.escape(inputs.label)} {int(inputs.test.labels[inputs.label][row])}"
    return f'<div class="item {css}">{body}<br>row {row}{label}<br>{note}</div>'


def _example_html(inputs: ReportInputs, ex: RetrievalExample, query: str, gallery: str) -> str:
    cells = [_item(inputs, ex.query, query, f"query; its pair ranks {ex.pair_rank}", "query")]
    labels = inputs.test.labels.get(inputs.label) if inputs.label else None
    for rank, (row, sim) in enumerate(ex.matches, start=1):
        own = row == ex.query
        same = labels is not None and int(labels[row]) == int(labels[ex.query])
        note = f"#{rank} cos {sim:.3f}" + (" · its pair" if own else "") + (" · same label" if same else "")
        cells.append(_item(inputs, row, gallery, note, "hit" if own else ""))
    return f"<div>{''.join(cells)}</div>"


def retrieval_section(inputs: ReportInputs) -> str:
    """For each direction, a few test queries and their top matches, with the media embedded."""
    parts = []
    for query, gallery in directions(inputs.test.modalities, inputs.max_directions):
        examples = retrieval_examples(inputs.test, query, gallery, inputs.n_queries, inputs.top_k, inputs.seed)
        parts.append(f"<h3>{html.escape(query)} &rarr; {html.escape(gallery)}</h3>")
        parts += [_example_html(inputs, ex, query, gallery) for ex in examples] or ["<p>no paired test rows</p>"]
    if not parts:
        return "<p>one modality only: no cross-modal retrieval</p>"
    return "<p>Green outline: the query's own pair. Ties of identical gallery items are shown once.</p>" + "\n".join(
        parts
    )


def render_report(inputs: ReportInputs) -> str:
    """The whole report as one HTML string (sections in ``SECTIONS`` order)."""
    command = inputs.command.strip() if inputs.command else ""
    bodies = {
        "metrics": ("Test metrics", metrics_table(inputs.metrics)),
        "loss": ("Loss curves", loss_section(inputs.records)),
        "similarity": ("Similarity matrix", similarity_section(inputs)),
        "embedding-map": ("Embedding map", embedding_map_section(inputs)),
        "retrieval": ("Retrieval examples", retrieval_section(inputs)),
        "config": ("Resolved config", f"<pre>{html.escape(inputs.config_text)}</pre>"),
        "command": ("Command", f"<pre>{html.escape(command)}</pre>" if command else "<p>not recorded</p>"),
    }
    mods = ", ".join(inputs.test.modalities)
    summary = f"{len(inputs.test)} test samples; modalities {mods}"
    return render_page(inputs.title, summary, [(sid, *bodies[sid]) for sid in SECTIONS])


def render_page(title: str, summary: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """A self-contained page: ``title``, ``summary`` (time written added), ``(id, heading, body HTML)`` sections."""
    body = "\n".join(_section(*section) for section in sections)
    line = f"{summary}; written {time.strftime('%Y-%m-%d %H:%M:%S')}"
    return _PAGE.substitute(title=html.escape(title), summary=html.escape(line), sections=body)


def write_page(text: str, out: str | Path) -> Path:
    """Write a page to ``out`` atomically (parents created); returns the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_report(inputs: ReportInputs, out: str | Path) -> Path:
    """Render the report and write it to ``out`` atomically (parents created); returns the path."""
    return write_page(render_report(inputs), out)
