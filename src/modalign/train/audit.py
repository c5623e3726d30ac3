"""Audit a recipe's training pairs for mismatches before (or after) training: ``modalign audit-pairs``.

Web-crawled or hand-joined pairs are partly wrong, and a user wants to know how many and which
before spending a training run on them. ``audit_recipe_pairs`` reads the encoders' pooled
vectors of every pair of the training split (frozen pretrained encoders as they are, or a
trained run's encoders) and scores each pair as ``crossfit_infonce`` with ``posterior: lfdr``
does (``modalign.objectives.crossfit.audit_pairs``): ridge maps between the two modalities
cross-fitted over folds, the rank p-value of each pair's agreement (uniform for a random
partner), local false discovery rates and the estimated share of mismatched pairs. Under
``data.pair_noise`` (injected noise, for measurement) the truth is known and the report adds
the AUC and the precision and recall of the flagged pairs.
"""

from __future__ import annotations

import csv
import html
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

from modalign.core.errors import ConfigError
from modalign.data.base import MultimodalDataset
from modalign.data.pairing import PairingView
from modalign.eval.html_report import metrics_table, preview_html, render_page, write_page
from modalign.methods import Method
from modalign.objectives.cluster_tables import embed_training_split
from modalign.objectives.crossfit import PairAudit, audit_pairs
from modalign.train.build import build_method, build_train_split, make_loader
from modalign.train.recipe import Recipe
from modalign.train.run import load_artifacts, load_run


@dataclass
class PairAuditReport:
    """The audit of a training split's pairs (one row per pair holding both modalities).

    Attributes:
        modalities: The two audited modalities ``(a, b)``.
        sample_ids: ``LongTensor[N]`` the pairs' sample ids.
        content: ``(LongTensor[N], LongTensor[N])`` content ids of their ``a`` and ``b`` values.
        audit: p-values, local false discovery rates and the estimated share of mismatches.
        injected: ``BoolTensor[N]`` pairs made wrong by ``data.pair_noise``, or ``None`` (truth unknown).
        indices: ``LongTensor[N]`` the pairs' indices in ``dataset``, or ``None``.
        dataset: The audited split, whose text previews ``write_csv`` adds, or ``None``.
    """

    modalities: tuple[str, str]
    sample_ids: Tensor
    content: tuple[Tensor, Tensor]
    audit: PairAudit
    injected: Tensor | None = None
    indices: Tensor | None = None
    dataset: MultimodalDataset | None = field(default=None, repr=False)

    def flagged(self, above: float = 0.5) -> Tensor:
        """``BoolTensor[N]``: pairs whose posterior of being a mismatch (lfdr) exceeds ``above``."""
        return self.audit.lfdr > above

    def summary(self) -> dict[str, float]:
        """``pairs``, ``noise_estimate``, ``flagged``; with the truth ``injected``, ``auc``, ``precision``, ``recall``.

        ``auc``: the probability that an injected pair has a higher p-value than a clean one (ties
        half); precision and recall of the flagged pairs (lfdr > 0.5) against the injected ones.
        """
        flagged = self.flagged()
        out = {
            "pairs": float(self.sample_ids.numel()),
            "noise_estimate": self.audit.noise_estimate,
            "flagged": float(flagged.double().mean()) if flagged.numel() else 0.0,
        }
        if self.injected is None:
            return out
        truth = self.injected.cpu()
        out["injected"] = float(truth.double().mean())
        if 0 < int(truth.sum()) < truth.numel():
            out["auc"] = float(roc_auc_score(truth.numpy(), self.audit.pvalues.cpu().numpy()))
        hits = int((flagged.cpu() & truth).sum())
        out["precision"] = hits / int(flagged.sum()) if int(flagged.sum()) else float("nan")
        out["recall"] = hits / int(truth.sum()) if int(truth.sum()) else float("nan")
        return out

    def write_csv(self, path: Path) -> Path:
        """One row per pair, most suspect first.

        Columns: sample id, content ids, p-value, lfdr, flagged, ``injected`` when the truth is
        known, and ``text_<m>`` for each audited text modality when the dataset is known (its
        previews: the text a pair really holds, a noisy pair's donor's).
        """
        a, b = self.modalities
        order = torch.argsort(self.audit.lfdr.cpu(), descending=True, stable=True).tolist()
        header = ["sample_id", f"content_{a}", f"content_{b}", "p_value", "lfdr", "flagged"]
        columns = [self.sample_ids, *self.content, self.audit.pvalues, self.audit.lfdr, self.flagged()]
        if self.injected is not None:
            header, columns = [*header, "injected"], [*columns, self.injected]
        lists: list[list[object]] = [c.cpu().tolist() for c in columns]
        texts = self._texts()
        header, lists = header + [f"text_{m}" for m in texts], lists + list(texts.values())
        numbers = self._manifest_rows()
        if numbers is not None:
            header, lists = ["manifest_row", *header], [numbers, *lists]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for i in order:
                writer.writerow([_cell(col[i]) for col in lists])
        return path

    def write_html(self, path: Path, top: int = 40, trusted: int = 10) -> Path:
        """A self-contained page: the summary, the ``top`` most suspect pairs and the ``trusted`` least, values shown.

        Each pair shows both values as the pair holds them (``dataset.previews``: images, audio
        players, text), its p-value and local FDR, and whether it was injected when known.

        Raises:
            ValueError: Without the dataset (``indices``/``dataset`` unset).
        """
        if self.dataset is None or self.indices is None:
            raise ValueError("write_html needs the audited dataset (PairAuditReport.dataset and .indices)")
        order = torch.argsort(self.audit.lfdr.cpu(), descending=True, stable=True).tolist()
        a, b = self.modalities
        sections = [
            ("summary", "Summary", metrics_table(self.summary())),
            ("suspect", f"The {min(top, len(order))} most suspect pairs", self._pairs_html(order[:top])),
            ("trusted", f"The {min(trusted, len(order))} least suspect pairs", self._pairs_html(order[::-1][:trusted])),
        ]
        summary = (
            f"{len(order)} pairs of {a} and {b}; estimated share of mismatched pairs {self.audit.noise_estimate:.3f}"
        )
        return write_page(render_page("Pair audit", summary, sections), path)

    def _pairs_html(self, rows: list[int]) -> str:
        """A table of the pairs ``rows`` (positions in this report) with their previews."""
        assert self.dataset is not None and self.indices is not None
        a, b = self.modalities
        known = self.injected is not None
        head = "<tr><th>pair</th><th>sample id</th><th>p-value</th><th>lfdr</th>" + (
            "<th>injected</th>" if known else ""
        )
        lines = [f"<table>{head}<th>{html.escape(a)}</th><th>{html.escape(b)}</th></tr>"]
        for rank, r in enumerate(rows, 1):
            previews = self.dataset.previews(int(self.indices[r]))
            cells = [
                str(rank),
                str(int(self.sample_ids[r])),
                f"{float(self.audit.pvalues[r]):.4f}",
                f"{float(self.audit.lfdr[r]):.3f}",
            ]
            if self.injected is not None:
                cells.append("yes" if bool(self.injected[r]) else "no")
            shown = [preview_html(previews[m]) if m in previews else "" for m in (a, b)]
            lines.append(
                "<tr>"
                + "".join(f'<td class="num">{c}</td>' for c in cells)
                + "".join(f"<td>{v}</td>" for v in shown)
                + "</tr>"
            )
        return "\n".join([*lines, "</table>"])

    def _manifest_rows(self) -> list[object] | None:
        """Each pair's 1-based data row in its manifest file (``manifest`` datasets only), else ``None``."""
        if self.dataset is None or self.indices is None:
            return None
        view, inner = pairing_view(self.dataset), self.dataset
        while not hasattr(inner, "row_number") and hasattr(inner, "dataset"):
            inner = inner.dataset
        if not hasattr(inner, "row_number"):
            return None
        sources = [view.origin(i).source if view is not None else i for i in self.indices.tolist()]
        return [inner.row_number(i) for i in sources]

    def _texts(self) -> dict[str, list[object]]:
        """``{modality: [text of each pair]}`` for the audited text modalities (none without the dataset)."""
        if self.dataset is None or self.indices is None:
            return {}
        kinds = self.dataset.modalities
        chosen = [m for m in self.modalities if kinds[m].kind == "text"]
        if not chosen:
            return {}
        previews = [self.dataset.previews(i) for i in self.indices.tolist()]
        return {m: [p[m].value if m in p else "" for p in previews] for m in chosen}


def _cell(value: object) -> object:
    return f"{value:.6g}" if isinstance(value, float) else int(value) if isinstance(value, bool) else value


def pairing_view(dataset: object) -> PairingView | None:
    """The ``PairingView`` inside ``dataset``'s chain of views, if any."""
    while dataset is not None:
        if isinstance(dataset, PairingView):
            return dataset
        dataset = getattr(dataset, "dataset", None)
    return None


def audit_modalities(dataset: MultimodalDataset, modalities: tuple[str, ...] | None) -> tuple[str, str]:
    """The two modalities to audit: ``modalities``, or the dataset's two.

    Raises:
        ConfigError: At ``--modalities`` unless two distinct modalities of the dataset are named
            (or, without it, the dataset has exactly two).
    """
    names = tuple(sorted(dataset.modalities))
    chosen = modalities or names
    if len(chosen) != 2 or len(set(chosen)) != 2 or not set(chosen) <= set(names):
        raise ConfigError("--modalities", f"name two of the dataset's modalities {list(names)}, got {list(chosen)}")
    return chosen[0], chosen[1]


@dataclass(frozen=True)
class AuditOptions:
    """``audit_pairs``' settings (the defaults are ``crossfit_infonce``'s)."""

    folds: int = 5
    rounds: int = 2
    ridge: float = 1.0
    temperature: float = 0.05
    null_above: float = 0.5
    seed: int = 0


def audit_recipe_pairs(
    recipe: Recipe | None,
    run_dir: Path | None = None,
    modalities: tuple[str, ...] | None = None,
    options: AuditOptions = AuditOptions(),
    data_root: Path | None = None,
) -> PairAuditReport:
    """Audit the pairs of ``recipe``'s training split, or of ``run_dir``'s with its trained encoders.

    Reads each encoder's pooled vector (before its head) in one pass without augmentation, keeps
    the rows holding both modalities and runs ``audit_pairs`` on them with ``options``.
    ``data_root`` overrides ``data.root``.

    Raises:
        ConfigError: As ``audit_modalities``; at ``--modalities`` if an encoder has no width ``dim``
            or fewer rows than folds hold both modalities; at ``train.shards`` for a shard stream.
        ValueError: If neither or both of ``recipe`` and ``run_dir`` are given.
    """
    if (recipe is None) == (run_dir is None):
        raise ValueError("audit_recipe_pairs needs exactly one of a recipe and a run directory")
    root = str(data_root.resolve()) if data_root is not None else None
    if run_dir is not None:
        recipe, method = load_run(run_dir, root)
        dataset = build_train_split(recipe, artifacts=load_artifacts(run_dir), augment=False)
    else:
        assert recipe is not None
        if root is not None:
            recipe.data = {**recipe.data, "root": root}
        dataset = build_train_split(recipe, augment=False)
        method = build_method(recipe, dataset.modalities)
    if not isinstance(dataset, MultimodalDataset):
        raise ConfigError("train.shards", "the audit reads a dataset split, not a stream of shards")
    pair = audit_modalities(dataset, modalities)
    loader = make_loader(dataset, recipe.eval.batch_size, shuffle=False, num_workers=recipe.train.num_workers)
    rows = embed_training_split(method.model, loader, pair, _widths(method, pair), source="pooled")
    both = rows.present[pair[0]] & rows.present[pair[1]]
    content = (rows.content[pair[0]][both], rows.content[pair[1]][both])
    if int(both.sum()) < max(2, options.folds):
        raise ConfigError(
            "--modalities", f"{int(both.sum())} rows hold both {list(pair)}: too few for {options.folds} folds"
        )
    features = rows.embeddings[pair[0]][both], rows.embeddings[pair[1]][both]
    audit = audit_pairs(*features, *content, **asdict(options))
    view = pairing_view(dataset)
    injected = torch.isin(rows.ids[both], view.noisy_ids) if view is not None and view.pair_noise > 0 else None
    indices = torch.arange(both.shape[0])[both.cpu()]  # one unshuffled pass: row r is sample r
    return PairAuditReport(pair, rows.ids[both], content, audit, injected, indices, dataset)


def _widths(method: Method, pair: tuple[str, str]) -> dict[str, int]:
    """The pooled widths of the two encoders.

    Raises:
        ConfigError: At ``--modalities`` if an encoder has no width ``dim``.
    """
    widths = {m: int(getattr(method.model.encoders[m], "dim", 0)) for m in pair}
    if 0 in widths.values():
        raise ConfigError("--modalities", f"the audit reads the encoders' pooled vectors; widths {widths}")
    return widths
