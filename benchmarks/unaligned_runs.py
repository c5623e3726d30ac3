"""Training sweeps of ``benchmarks/unaligned.py``: paired fraction and pair noise (docs/unaligned.md).

Every row is one ``modalign train RECIPE KEY=VALUE ... --run-dir DIR`` in a fresh subprocess,
exactly the command printed in the table; its figures are read from the run's ``eval.json``.
Finished rows are kept in ``benchmarks/results/unaligned.json`` (under ``runs``, by row key), so
a sweep can be run a few rows at a time (``--rows``) and is never rerun unless ``--rerun``.

* ``pairing``: ``data.paired_fraction`` in {100, 10, 1, 0.1}% (the rest split into unimodal
  samples, ``modalign.data.pairing``) on ``av-digits`` and ``emoji``, for plain contrastive
  training (the packaged recipe, batches shuffled as usual), plain contrastive with the pairs
  cycled through every batch (``data.paired_per_batch``), and the mix-paired methods.
* ``noise``: ``data.pair_noise`` in {0, 20, 50}% of the training pairs given a random other
  partner, for plain InfoNCE and the noise-robust objectives.

The figure per dataset is the mean of the two retrieval directions: class-match p@1 for
av-digits (the pairs are right at the digit level; chance 0.10), held-out R@10 for emoji
(400 held-out emoji; chance 0.025).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Per dataset: packaged recipe, its epochs, the two modalities, the recipe's temperature, the metric pair.
DATASETS: dict[str, dict[str, Any]] = {
    "av-digits": {
        "recipe": "av-digits-clip",
        "epochs": 15,
        "modalities": ["image", "audio"],
        "temperature": 0.1,
        "keys": ["image->audio/p@1", "audio->image/p@1"],
        "metric": "p@1",
        "chance": 0.10,
        "probes": ["image/linear_probe", "audio/linear_probe"],
    },
    "emoji": {
        "recipe": "emoji-clip",
        "epochs": 30,
        "modalities": ["image", "text"],
        "temperature": 0.07,
        "keys": ["image->text/R@10", "text->image/R@10"],
        "metric": "R@10",
        "chance": 0.025,
        "probes": ["image/linear_probe", "text/linear_probe"],
    },
    "basicmotions": {
        "recipe": "basicmotions-clip",
        "modalities": ["accel", "gyro"],
        "temperature": 0.1,
        "keys": ["accel->gyro/R@1", "gyro->accel/R@1"],
        "metric": "R@1",
        "chance": 0.025,
        "probes": ["accel/linear_probe", "gyro/linear_probe"],
    },
}
# The stitched recipes (frozen pretrained encoders, cached features, trained adapters): the same
# figures as their datasets, swept at 100% and 1% only.
DATASETS["av-digits-stitch"] = {**DATASETS["av-digits"], "recipe": "av-digits-stitch", "fractions": (1.0, 0.01)}
DATASETS["emoji-stitch"] = {
    **DATASETS["emoji"],
    "recipe": "emoji-stitch",
    "temperature": 0.05,
    "infonce": ", learn_temperature: false",
    "fractions": (1.0, 0.01),
}
for _name in ("av-digits-stitch", "emoji-stitch"):
    DATASETS[_name]["crossfit_warmup"] = 0  # frozen pooled features: the weights need no training
#: The datasets of the paired-fraction and noise sweeps.
SWEPT = ("av-digits", "emoji")
#: The paired-fraction (at 100% and 1% only) and noise sweeps also run on the stitched recipes.
STITCHED = ("av-digits-stitch", "emoji-stitch")

FRACTIONS = (1.0, 0.1, 0.01, 0.001)
NOISES = (0.0, 0.2, 0.5)
PAIRS_PER_BATCH = 32


@dataclass(frozen=True)
class Method:
    """A training method of a sweep: a name and how it turns into recipe overrides."""

    name: str
    overrides: Callable[[dict[str, Any]], list[str]]
    cycled: bool = False  # the pairs are cycled through every batch (data.paired_per_batch)
    mixed: bool = False  # a mix-paired method (uses the unimodal samples)
    recipe: str | None = None  # another packaged recipe than the dataset's
    only: tuple[str, ...] | None = None  # run on these datasets only (None: on every swept dataset)
    # noise sweep: not a method but the ceiling of any filter: the noisy share of the pairs left
    # out instead of replaced (``data.paired_fraction = 1 - noise``), so every pair trained on is clean
    oracle: bool = False


def _objectives(*objectives: str) -> str:
    """A ``method=`` override of a composite method of the given objective mappings."""
    return "method={name: composite, objectives: [" + ", ".join(objectives) + "]}"


def _infonce(d: dict[str, Any]) -> str:
    extra = d.get("infonce", "")
    return f"{{name: infonce, modalities: [{', '.join(d['modalities'])}], temperature: {d['temperature']}{extra}}}"


def _pseudo(d: dict[str, Any], extra: str) -> str:
    return f"{{name: pseudo_pairs, modalities: [{', '.join(d['modalities'])}], {extra}}}"


def _swav(d: dict[str, Any]) -> str:
    """InfoNCE on the pairs plus ``selavi`` with ``views: true`` (SwAV on the pools, 10 shared prototypes)."""
    m = ", ".join(d["modalities"])
    return _objectives(_infonce(d), f"{{name: selavi, modalities: [{m}], prototypes: 10, views: true, weight: 1.0}}")


PAIRING_METHODS: tuple[Method, ...] = (
    Method("plain contrastive", lambda d: []),
    Method("plain contrastive, pairs in every batch", lambda d: [], cycled=True),
    Method(
        "mix-paired: + pseudo-pairs (mnn)",
        lambda d: [
            _objectives(_infonce(d), _pseudo(d, "warmup_epochs: 6, threshold: 0.8, max_pairs: 500, weight: 0.5"))
        ],
        cycled=True,
        mixed=True,
    ),
    Method(
        "mix-paired: + pseudo-pairs (anchor-guided clusters)",
        lambda d: [
            _objectives(
                _infonce(d),
                _pseudo(d, "matching: clusters, clusters: 10, threshold: -1.0, warmup_epochs: 4, weight: 1.0"),
            )
        ],
        cycled=True,
        mixed=True,
    ),
    Method(
        "mix-paired: + unimodal SimCLR on the pools (2 views)",
        lambda d: [
            "data.unimodal_views=2",
            _objectives(
                _infonce(d),
                f"{{name: unimodal_infonce, modalities: [{', '.join(d['modalities'])}], "
                "temperature: 0.1, dim: 128, weight: 0.5}",
            ),
        ],
        cycled=True,
        mixed=True,
    ),
    Method(
        "mix-paired: + feature-neighbour positives on the pools (k 3)",
        lambda d: [
            _objectives(
                _infonce(d),
                f"{{name: unimodal_infonce, modalities: [{', '.join(d['modalities'])}], "
                "temperature: 0.1, neighbours: 3, weight: 1.0}",
            ),
        ],
        cycled=True,
        mixed=True,
    ),
    Method(
        "mix-paired: + SwAV on the pools, prototypes shared with the pairs (2 views, K 10)",
        lambda d: ["data.unimodal_views=2", _swav(d)],
        cycled=True,
        mixed=True,
    ),
    # Two views of every unimodal sample double the rows, hence the steps, of an epoch: the
    # cycled pairs alone at twice the epochs are the control at the 2-view rows' step count.
    Method(
        "plain contrastive, pairs in every batch (twice the epochs: the steps of the 2-view rows)",
        lambda d: [f"train.epochs={2 * d['epochs']}"],
        cycled=True,
        only=SWEPT,
    ),
    # SwAV is known to need long schedules (Caron et al. 2020 train for hundreds of epochs): the
    # same row at twice the epochs, and its control at the same number of steps.
    Method(
        "mix-paired: + SwAV on the pools, prototypes shared with the pairs (2 views, K 10; twice the epochs)",
        lambda d: ["data.unimodal_views=2", f"train.epochs={2 * d['epochs']}", _swav(d)],
        cycled=True,
        mixed=True,
        only=("av-digits",),
    ),
    Method(
        "plain contrastive, pairs in every batch (four times the epochs: the steps of the row above)",
        lambda d: [f"train.epochs={4 * d['epochs']}"],
        cycled=True,
        only=("av-digits",),
    ),
    # The stitched towers train in seconds per epoch from cached features, and a larger batch gives
    # the in-batch neighbours a larger pool (the frozen image features' 1-NN is of the same digit
    # for 0.74 of the rows among 144 image rows, 0.82 among 512, 0.92 in the whole split): both
    # are compared at the same budget, the plain row with it too.
    Method(
        "plain contrastive, pairs in every batch (batch 1024, 60 epochs)",
        lambda d: ["train.batch_size=1024", "train.epochs=60"],
        cycled=True,
        only=("av-digits-stitch",),
    ),
    Method(
        "mix-paired: + feature-neighbour positives on the images (k 1; batch 1024, 60 epochs)",
        lambda d: [
            "train.batch_size=1024",
            "train.epochs=60",
            _objectives(
                _infonce(d),
                f"{{name: unimodal_infonce, modalities: [{d['modalities'][0]}], "
                "temperature: 0.1, neighbours: 1, weight: 1.0}",
            ),
        ],
        cycled=True,
        mixed=True,
        only=("av-digits-stitch",),
    ),
)


def _robust(name: str, args: str) -> Callable[[dict[str, Any]], list[str]]:
    """Overrides of a one-objective composite ``name`` on the dataset's pair, at its temperature."""

    def overrides(d: dict[str, Any]) -> list[str]:
        m = ", ".join(d["modalities"])
        extra = d.get("infonce", "")  # the stitched recipes keep their temperature fixed
        return [_objectives(f"{{name: {name}, modalities: [{m}], temperature: {d['temperature']}{extra}, {args}}}")]

    return overrides


NOISE_METHODS: tuple[Method, ...] = (
    Method("InfoNCE", lambda d: []),
    Method("soft InfoNCE (alpha 0.2)", _robust("soft_infonce", "alpha: 0.2")),
    Method("weighted InfoNCE (NCR weights)", _robust("weighted_infonce", "warmup_steps: 100")),
    Method("NCR InfoNCE (split-level weights)", _robust("ncr_infonce", "warmup_epochs: 5")),
    # L2RM-style re-pairing: the suspects' images and captions matched to each other (assignment).
    Method(
        "NCR InfoNCE + re-pairing of the suspects (rematch 0.25)",
        _robust("ncr_rematch", "warmup_epochs: 5, rematch: 0.25"),
    ),
    # Confident-learning-style weights: out-of-sample agreement of cross-fitted ridge maps between
    # the encoders' pooled vectors (frozen in the stitched recipes: fitted before any training).
    Method(
        "cross-fitted agreement weights (crossfit, hard 0.5)",
        lambda d: _robust("crossfit_infonce", f"warmup_epochs: {d.get('crossfit_warmup', 5)}")(d),
    ),
    # The same scores as rank p-values, weighted by local false discovery rates: the share of
    # mismatched pairs is estimated (near 0 on clean pairs) instead of splitting the split in two.
    # Not on av-digits from scratch, where no noise level costs InfoNCE anything to recover.
    Method(
        "cross-fitted agreement, local FDR (crossfit lfdr, hard 0.5)",
        lambda d: _robust("crossfit_infonce", f"warmup_epochs: {d.get('crossfit_warmup', 5)}, posterior: lfdr")(d),
        only=("emoji", "av-digits-stitch", "emoji-stitch"),
    ),
    # A bounded loss instead of a filter: only the batch's negatives are used (RCL), which a
    # mismatched pair gets right far more often than its positive.
    Method(
        "complementary contrastive (RCL, -log(1 - p))",
        _robust("complementary_infonce", "variant: log"),
        only=("emoji", "av-digits-stitch", "emoji-stitch"),
    ),
    Method(
        "oracle: clean pairs only (the noisy share left out, InfoNCE)",
        lambda d: [],
        only=("emoji", "av-digits-stitch", "emoji-stitch"),
        oracle=True,
    ),
)


@dataclass(frozen=True)
class Row:
    """One training run of a sweep."""

    section: str
    dataset: str
    method: Method
    fraction: float = 1.0
    noise: float = 0.0
    offset: int = 0
    seed: int | None = None

    @property
    def key(self) -> str:
        """The row's key in the results file."""
        key = f"{self.section}|{self.dataset}|{self.method.name}|{self.fraction:g}|{self.noise:g}"
        return key + (f"|offset {self.offset}|seed {self.seed}" if self.section == "offsets" else "")

    @property
    def recipe(self) -> str:
        """The packaged recipe the row trains."""
        return self.method.recipe or str(DATASETS[self.dataset]["recipe"])

    @property
    def slug(self) -> str:
        """A run-directory name."""
        name = "".join(c if c.isalnum() else "-" for c in self.method.name.lower()).strip("-")
        slug = f"{self.section}-{self.dataset}-{name}-f{self.fraction:g}-n{self.noise:g}"
        if self.section == "offsets":
            slug += f"-o{self.offset}-s{self.seed}"
        return slug.replace("--", "-")

    def overrides(self) -> list[str]:
        """``KEY=VALUE`` overrides of the packaged recipe."""
        out = []
        if self.fraction < 1.0:
            out.append(f"data.paired_fraction={self.fraction:g}")
            if self.method.cycled:
                out.append(f"data.paired_per_batch={PAIRS_PER_BATCH}")
        if self.noise > 0.0 and self.method.oracle:
            out.append(f"data.paired_fraction={1.0 - self.noise:g}")
        elif self.noise > 0.0:
            out.append(f"data.pair_noise={self.noise:g}")
        if self.offset:
            out.append(f"data.max_offset={self.offset}")
        if self.seed is not None:
            out.append(f"train.seed={self.seed}")
        return out + self.method.overrides(DATASETS[self.dataset])

    def command(self, run_dir: Path | str) -> list[str]:
        """The ``modalign train`` argv of this row."""
        return ["modalign", "train", self.recipe, *self.overrides(), "--run-dir", str(run_dir)]


def pairing_rows(datasets: list[str]) -> list[Row]:
    """The paired-fraction sweep; at 100% every method is the packaged recipe, so one row."""
    rows = []
    for dataset in datasets:
        rows.append(Row("pairing", dataset, PAIRING_METHODS[0], 1.0))
        fractions = DATASETS[dataset].get("fractions", FRACTIONS)[1:]
        methods = [m for m in PAIRING_METHODS if m.only is None or dataset in m.only]
        rows += [Row("pairing", dataset, m, f) for f in fractions for m in methods]
    return rows


def noise_rows(datasets: list[str]) -> list[Row]:
    """The pair-noise sweep (0% of the robust objectives too: what robustness costs on clean pairs)."""
    return [
        Row("noise", d, m, noise=n)
        for d in datasets
        for n in NOISES
        for m in NOISE_METHODS
        if (m.only is None or d in m.only) and not (m.oracle and n == 0.0)
    ]


OFFSET = 20  # basicmotions: a quarter of the 80-step crop, the most the 100-step series allows
OFFSET_SEEDS = (0, 1, 2)
OFFSET_METHODS: tuple[Method, ...] = (
    Method("InfoNCE (basicmotions-clip)", lambda d: []),
    Method("InfoNCE + soft-DTW on steps (basicmotions-dtw)", lambda d: [], recipe="basicmotions-dtw"),
    Method("InfoNCE + MIL-NCE over windows (basicmotions-milnce)", lambda d: [], recipe="basicmotions-milnce"),
)


def offset_rows() -> list[Row]:
    """basicmotions with the gyroscope window shifted by up to ``OFFSET`` steps, per method and seed.

    The first row is the synchronised reference (no offset, the recipe's seed).
    """
    rows = [Row("offsets", "basicmotions", OFFSET_METHODS[0], offset=0)]
    return rows + [
        Row("offsets", "basicmotions", m, offset=OFFSET, seed=s) for m in OFFSET_METHODS for s in OFFSET_SEEDS
    ]


#: Overrides that do not change what is trained or measured (ignored when adopting a run).
NEUTRAL = ("eval.plots=", "eval.report=")


def adopt(rows: list[Row], run_dirs: list[Path], results: Path, log: Callable[[str], None]) -> None:
    """Store finished runs made by hand with a row's exact recipe and overrides, under that row.

    The command recorded is the run's own (``command.txt``), so the table shows what really ran.

    Raises:
        ValueError: If a run directory matches no row, or has no ``eval.json``.
    """
    adopted: dict[str, Any] = {}
    for run_dir in run_dirs:
        line = (run_dir / "command.txt").read_text().splitlines()[-1]
        argv = shlex.split(line)
        kv = sorted(a for a in argv[3:] if "=" in a and not a.startswith("-") and not a.startswith(NEUTRAL))
        match = [r for r in rows if r.recipe == argv[2] and sorted(r.overrides()) == kv]
        if not match:
            raise ValueError(f"{run_dir}: `{line}` matches no row")
        metrics = json.loads((run_dir / "eval.json").read_text())
        adopted[match[0].key] = {
            "command": line,
            "seconds": _wall_seconds(run_dir),
            "adopted": str(run_dir),
            "recipe": match[0].recipe,
            "overrides": match[0].overrides(),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
        }
        log(f"adopted {run_dir} as {match[0].key}")
    update_results(results, lambda store: store.setdefault("runs", {}).update(adopted))


def _wall_seconds(run_dir: Path) -> float:
    """Seconds from the run's first start (``command.txt``'s ``# YYYY-MM-DD HH:MM:SS``, local time) to ``eval.json``.

    Wall time, as the sweep's own rows report it (fitting passes and evaluation included); runs
    whose ``command.txt`` has no start time fall back to the sum of their epochs' ``epoch_seconds``.
    """
    first = (run_dir / "command.txt").read_text().splitlines()[0]
    try:
        start = time.mktime(time.strptime(" ".join(first.split()[1:3]), "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        epochs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return float(sum(e.get("epoch_seconds", 0.0) for e in epochs))
    return (run_dir / "eval.json").stat().st_mtime - start


def update_results(results: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Apply ``change`` to the results file's JSON under an exclusive lock, then replace the file atomically.

    The file is read again inside the lock, so sweeps running in other processes (or a table
    rewrite) never drop each other's rows; the write goes to a temporary file first.
    """
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results.with_name(results.name + ".lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        store = json.loads(results.read_text()) if results.exists() else {}
        change(store)
        tmp = results.with_name(results.name + ".tmp")
        tmp.write_text(json.dumps(store, indent=1) + "\n")
        os.replace(tmp, results)


def shell(argv: list[str]) -> str:
    """``argv`` as one copy-pasteable shell line (single quotes around arguments with spaces)."""
    return " ".join(f"'{a}'" if any(c in a for c in " {}[],") else a for a in argv)


def run_row(row: Row, runs: Path, threads: int) -> dict[str, Any]:
    """Train ``row`` in a subprocess; its figures (or the error) and the command."""
    run_dir = runs / row.slug
    argv = row.command(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "modalign", *argv[1:]], capture_output=True, text=True, env=env, check=False
    )
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "command": shell(argv),
        "seconds": seconds,
        "threads": threads,
        "load_avg_5min": os.getloadavg()[1],
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    result["recipe"], result["overrides"] = row.recipe, row.overrides()
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:] or [f"exit {done.returncode}"]
        return {**result, "error": " | ".join(tail)}
    metrics = json.loads((run_dir / "eval.json").read_text())
    return {**result, "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)}}


def run_rows(
    rows: list[Row],
    runs: Path,
    results: Path,
    jobs: int,
    rerun: bool,
    log: Callable[[str], None],
    threads: int | None = None,
) -> None:
    """Run the rows not yet in ``results`` (all with ``rerun``), ``jobs`` at a time, saving each.

    Each run gets ``threads`` intra-op threads (default: the cores shared among the jobs).
    """
    lock = threading.Lock()
    store = json.loads(results.read_text()) if results.exists() else {}
    todo = [r for r in rows if rerun or "metrics" not in store.get("runs", {}).get(r.key, {})]
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    log(f"{len(todo)} of {len(rows)} rows to run, {jobs} at a time, {threads} thread(s) each")

    def one(row: Row) -> None:
        same = _same_run(row, store.get("runs", {})) if not rerun else None
        if same is not None:
            log(f"{row.key}: the same training as {same[0]}, not run again")
            result = {**same[1], "same_as": same[0]}
        else:
            log(f"start {row.key}")
            result = run_row(row, runs, threads)
        with lock:
            update_results(results, lambda store: store.setdefault("runs", {}).__setitem__(row.key, result))
        log(f"done {row.key} in {result['seconds']:.0f} s: {figure(row, result)}")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))


def _same_run(row: Row, runs: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """A finished run of another row with the same recipe and overrides (e.g. 0% noise = 100% pairs)."""
    recipe, overrides = row.recipe, row.overrides()
    for key, result in runs.items():
        if "metrics" in result and result.get("recipe") == recipe and result.get("overrides") == overrides:
            return key, result
    return None


def figure(row: Row, result: dict[str, Any] | None) -> float | None:
    """The row's figure: mean of the two retrieval directions (``None`` if not run or failed)."""
    if not result or "metrics" not in result:
        return None
    keys = DATASETS[row.dataset]["keys"]
    return sum(result["metrics"][k] for k in keys) / len(keys)


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _pct(x: float) -> str:
    return f"{100 * x:g}%"


def pairing_table(dataset: str, store: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Markdown table of the paired-fraction sweep of ``dataset`` and the gap-recovery verdict at 1%."""
    d = DATASETS[dataset]
    rows = pairing_rows([dataset])
    runs = store.get("runs", {})
    full = figure(rows[0], runs.get(rows[0].key))
    head = (
        f"| paired | method | {d['keys'][0]} | {d['keys'][1]} | mean | probe {d['modalities'][0]} | "
        f"probe {d['modalities'][1]} | minutes | command |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        result = runs.get(row.key)
        m = (result or {}).get("metrics", {})
        if result and "error" in result:
            lines.append(f"| {_pct(row.fraction)} | {row.method.name} | failed: {result['error'][:120]} ||||||| |")
            continue
        cells = [_cell(m.get(k)) for k in d["keys"]] + [_cell(figure(row, result))]
        cells += [_cell(m.get(k)) for k in d["probes"]]
        minutes = f"{result['seconds'] / 60:.1f}" if result else "—"
        command = f"`{result['command']}`" if result else "not run yet"
        lines.append(f"| {_pct(row.fraction)} | {row.method.name} | {' | '.join(cells)} | {minutes} | {command} |")
    verdict = recovery(dataset, 0.01, store, full)
    lines += ["", verdict["text"]]
    return lines, {"verdict_1pct": verdict}


def recovery(dataset: str, fraction: float, store: dict[str, Any], full: float | None) -> dict[str, Any]:
    """Gap recovered at ``fraction`` by the best mix-paired method over the best plain contrastive one.

    The baseline is the better of the two plain contrastive rows (shuffled, or pairs in every
    batch), so a mix-paired method is credited only for what the unimodal samples add.
    """
    runs = store.get("runs", {})
    at = [r for r in pairing_rows([dataset]) if r.fraction == fraction]
    plain = [(figure(r, runs.get(r.key)), r.method.name) for r in at if not r.method.mixed]
    mixed = [(figure(r, runs.get(r.key)), r.method.name) for r in at if r.method.mixed]
    plain = [p for p in plain if p[0] is not None]
    mixed = [p for p in mixed if p[0] is not None]
    if full is None or not plain or not mixed:
        return {"text": f"Gap recovery at {_pct(fraction)}: not all rows are measured yet.", "met": None}
    base, base_name = max(plain)
    best, best_name = max(mixed)
    gap = full - base
    share = (best - base) / gap if gap > 0 else float("nan")
    met = share >= 0.5
    text = (
        f"At {_pct(fraction)} pairs: best plain contrastive {base:.3f} ({base_name}), 100% pairs {full:.3f}, best "
        f"mix-paired {best:.3f} ({best_name}): it recovers {100 * share:.0f}% of the gap "
        f"({'meets' if met else '**does not meet**'} the bar of 50%)."
    )
    return {"text": text, "met": met, "share": share, "base": base, "full": full, "best": best}


def noise_table(dataset: str, store: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Markdown table of the pair-noise sweep of ``dataset`` and the robustness verdict at 50%."""
    d = DATASETS[dataset]
    runs = store.get("runs", {})
    rows = noise_rows([dataset])
    lines = [
        f"| pairs replaced | objective | {d['keys'][0]} | {d['keys'][1]} | mean | minutes | command |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        result = runs.get(row.key)
        m = (result or {}).get("metrics", {})
        if result and "error" in result:
            lines.append(f"| {_pct(row.noise)} | {row.method.name} | failed: {result['error'][:120]} ||||| |")
            continue
        cells = [_cell(m.get(k)) for k in d["keys"]] + [_cell(figure(row, result))]
        minutes = f"{result['seconds'] / 60:.1f}" if result else "—"
        command = f"`{result['command']}`" if result else "not run yet"
        lines.append(f"| {_pct(row.noise)} | {row.method.name} | {' | '.join(cells)} | {minutes} | {command} |")

    def value(method: Method, noise: float) -> float | None:
        r = Row("noise", dataset, method, noise=noise)
        return figure(r, runs.get(r.key))

    clean = value(NOISE_METHODS[0], 0.0)
    noisy = value(NOISE_METHODS[0], 0.5)
    verdict: dict[str, Any] = {"met": None}
    if clean is not None and noisy is not None:
        lost = clean - noisy
        robust = [(value(m, 0.5), m.name) for m in NOISE_METHODS[1:] if not m.oracle]
        robust = [r for r in robust if r[0] is not None]
        if robust:
            best, name = max(robust)
            own_loss = clean - best
            met = own_loss <= 0.5 * lost
            verdict = {"met": met, "infonce_loss": lost, "best_loss": own_loss, "best": name}
            lines += [
                "",
                f"At 50% noise InfoNCE loses {lost:.3f} (from {clean:.3f} with clean pairs); the best robust "
                f"objective ({name}) is at {best:.3f}, {own_loss:.3f} below clean InfoNCE "
                f"({'meets' if met else '**does not meet**'} the bar: at most half of InfoNCE's loss).",
            ]
            oracle = [value(m, 0.5) for m in NOISE_METHODS if m.oracle]
            if oracle and oracle[0] is not None:
                verdict["oracle"] = oracle[0]
                lines[-1] += (
                    f" A perfect filter (the oracle row) reaches {oracle[0]:.3f}, "
                    f"{'above' if clean - oracle[0] <= 0.5 * lost else 'below'} the bar's {clean - 0.5 * lost:.3f}."
                )
    return lines, verdict


def offsets_table(store: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Markdown table of the temporal-offset rows, per seed and averaged, and the verdict."""
    d, runs = DATASETS["basicmotions"], store.get("runs", {})
    lines = [
        f"Each gyroscope window is shifted against its accelerometer window by a random offset in "
        f"[-{OFFSET}, {OFFSET}] steps (`data.max_offset={OFFSET}`: fresh per read in training, fixed per "
        f"test sample by `offset_seed`, so every row is scored on the same 40 unaligned test pairs; "
        f"chance R@1 {d['chance']}; one query is 0.025).",
        "",
        f"| method | offset | seed | {d['keys'][0]} | {d['keys'][1]} | minutes | command |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in offset_rows():
        result = runs.get(row.key)
        m = (result or {}).get("metrics", {})
        minutes = f"{result['seconds'] / 60:.1f}" if result else "—"
        command = f"`{result['command']}`" if result else "not run yet"
        cells = " | ".join(_cell(m.get(k)) for k in d["keys"])
        seed = "recipe's" if row.seed is None else row.seed
        lines.append(f"| {row.method.name} | {row.offset} | {seed} | {cells} | {minutes} | {command} |")
    means: dict[str, list[float | None]] = {}
    for method in OFFSET_METHODS:
        got = [runs.get(Row("offsets", "basicmotions", method, offset=OFFSET, seed=s).key) for s in OFFSET_SEEDS]
        done = [g["metrics"] for g in got if g and "metrics" in g]
        means[method.name] = [sum(x[k] for x in done) / len(done) if done else None for k in d["keys"]]
    lines += [
        "",
        f"| method (offset {OFFSET}) | mean {d['keys'][0]} | mean {d['keys'][1]} | seeds |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {_cell(v[0])} | {_cell(v[1])} | {len(OFFSET_SEEDS)} |" for name, v in means.items()]
    base = means[OFFSET_METHODS[0].name]
    verdict: dict[str, Any] = {"means": means, "met": None, "beats": {}}
    for method in OFFSET_METHODS[1:]:
        ours = means[method.name]
        if None in base or None in ours:
            continue
        beats = all(b is not None and t is not None and t > b for b, t in zip(base, ours, strict=True))
        verdict["beats"][method.name] = beats
        lines += [
            "",
            f"Mean over {len(OFFSET_SEEDS)} seeds: {method.name} {'beats' if beats else '**does not beat**'} "
            f"plain InfoNCE in both directions ({ours[0]:.3f} vs {base[0]:.3f}, {ours[1]:.3f} vs {base[1]:.3f}).",
        ]
    if verdict["beats"]:
        verdict["met"] = any(verdict["beats"].values())
    return lines, verdict
