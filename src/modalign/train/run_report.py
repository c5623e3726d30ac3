"""The run report of a run directory (``RUN_DIR/report.html``) and the command that made the run.

``modalign train`` appends its command line to ``RUN_DIR/command.txt`` (one entry per call,
so a resumed run lists every call); the report shows it, or "not recorded" for runs made
before this file existed.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from modalign.data.base import MultimodalDataset
from modalign.eval import EmbeddingSet
from modalign.eval.html_report import ReportInputs, write_report
from modalign.train.recipe import Recipe
from modalign.train.records import METRICS_FILE, read_metrics

log = logging.getLogger(__name__)

COMMAND_FILE = "command.txt"
REPORT_FILE = "report.html"


def record_command(run_dir: Path, argv: Sequence[str]) -> Path:
    """Append ``argv`` (shell-quoted, with the time and working folder) to ``run_dir/command.txt``."""
    path = run_dir / COMMAND_FILE
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with path.open("a", encoding="utf-8") as f:
        f.write(f"# {stamp} in {Path.cwd()}\n{shlex.join(argv)}\n")
    return path


def read_command(run_dir: Path) -> str | None:
    """The recorded command line(s) of ``run_dir``, or ``None`` if none was recorded."""
    path = run_dir / COMMAND_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def write_run_report(
    run_dir: Path,
    recipe: Recipe,
    config_text: str,
    metrics: dict[str, float] | None,
    test: EmbeddingSet,
    dataset: MultimodalDataset,
    out: Path | None = None,
) -> Path:
    """Write the HTML report of ``run_dir`` (default ``run_dir/report.html``).

    Args:
        run_dir: The run directory (``metrics.jsonl`` and ``command.txt`` are read from it).
        recipe: The run's recipe (evaluation label and projection).
        config_text: The resolved config shown in the report (``config.yaml``).
        metrics: Flat test metrics, or ``None`` if the run has no ``eval.json``.
        test: Test-split embeddings, row ``i`` being ``dataset[i]``.
        dataset: The test split (the media of the retrieval examples).
        out: Output file.

    Returns:
        The path written.

    Raises:
        ValueError: If ``test`` and ``dataset`` differ in length.
    """
    if len(test) != len(dataset):
        raise ValueError(f"report: {len(test)} test embeddings for a dataset of {len(dataset)} samples")
    metrics_path = run_dir / METRICS_FILE
    inputs = ReportInputs(
        title=f"modalign run {run_dir.resolve().name}",
        metrics=metrics,
        records=read_metrics(metrics_path) if metrics_path.is_file() else [],
        config_text=config_text,
        command=read_command(run_dir),
        test=test,
        previews=dataset.previews,
        label=recipe.eval.label,
        projection=recipe.eval.projection,
        seed=recipe.train.seed,
    )
    start = time.perf_counter()
    path = write_report(inputs, out or run_dir / REPORT_FILE)
    log.info("wrote %s (%.1f MB) in %.1f s", path, path.stat().st_size / 1e6, time.perf_counter() - start)
    return path
