"""Benchmark: every objective trained by its packaged recipe, one comparable table.

Each row is a recipe ``<dataset>-<method>`` trained from scratch in a fresh subprocess (so its
peak resident memory is its own) exactly as ``modalign train RECIPE --run-dir DIR`` does; the
row's figures are read from the run's ``eval.json`` and ``metrics.jsonl``. Raw-input linear
probes (flattened pixels; per-mel-bin mean and standard deviation of the log-mel frames) are
measured on the same av-digits splits as the reference every av-digits row must beat on at least
one modality. Results merge into ``benchmarks/results/objectives.json`` (so rows can be run a
few at a time) and the whole table is rewritten into ``docs/objectives.md``.

    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/objectives.py            # every row
    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/objectives.py --only av-digits-clip
    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/objectives.py --table    # rewrite doc only

Chance levels: av-digits class-match p@1 and probes 0.10 (ten balanced digits), NMI 0;
emoji held-out retrieval R@1 0.0025 and R@10 0.025 (400 held-out emoji).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "objectives.json"
DOC = ROOT / "docs" / "objectives.md"
CHANCE = {"p@1": 0.10, "probe": 0.10, "nmi": 0.0, "R@1": 0.0025, "R@10": 0.025}


@dataclass(frozen=True)
class Row:
    """A benchmark row: a packaged recipe and what it is judged on."""

    recipe: str
    method: str
    kind: str  # "av" (av-digits), "emoji" (image-text) or "multi" (emoji-multilingual)
    shared: bool = True  # the method learns a shared space, so cross-modal retrieval is reported


ROWS: tuple[Row, ...] = (
    Row("av-digits-clip", "clip", "av"),
    Row("av-digits-siglip", "siglip", "av"),
    Row("av-digits-moco", "moco", "av"),
    Row("av-digits-dcl", "dcl", "av"),
    Row("av-digits-vicreg", "vicreg", "av"),
    Row("av-digits-barlow", "barlow", "av"),
    Row("av-digits-xdc", "xdc", "av", shared=False),
    Row("av-digits-selavi", "selavi", "av"),
    Row("av-digits-mcn", "mcn", "av"),
    Row("av-digits-avc", "avc", "av"),
    Row("av-digits-multimae", "multimae", "av", shared=False),
    Row("av-digits-data2vec", "data2vec", "av", shared=False),
    Row("emoji-clip", "clip", "emoji"),
    Row("emoji-itm", "itm", "emoji"),
    Row("emoji-mlm", "mlm", "emoji"),
    Row("emoji-coca", "coca", "emoji"),
    Row("emoji-albef", "albef", "emoji"),
    Row("emoji-flava", "flava", "emoji"),
    Row("emoji-multilingual-cmc", "cmc", "multi"),
    Row("emoji-multilingual-imagebind", "imagebind", "multi"),
)


def _child(recipe: str, run_dir: Path) -> dict[str, Any]:
    """Train ``recipe`` into ``run_dir`` in this process; the figures of the run."""
    from modalign.train.recipe import load_recipe
    from modalign.train.records import read_metrics
    from modalign.train.run import train_run

    start = time.perf_counter()
    metrics = train_run(load_recipe(recipe), run_dir, resume=False)
    seconds = time.perf_counter() - start
    epochs = [r["epoch_seconds"] for r in read_metrics(run_dir / "metrics.jsonl") if "epoch_seconds" in r]
    return {
        "metrics": metrics,
        "seconds": seconds,
        "seconds_per_epoch": sum(epochs) / max(1, len(epochs)),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_avg_5min": os.getloadavg()[1],
    }


def _untrained(recipe: str, run_dir: Path) -> dict[str, float]:
    """The evaluation of ``recipe``'s towers at their seeded initialisation (no training step)."""
    import torch

    from modalign.train.build import build_dataset, build_method
    from modalign.train.loop import seed_everything
    from modalign.train.recipe import load_recipe
    from modalign.train.run import evaluate_method, prepare_run_dir, save_artifacts

    loaded = load_recipe(recipe, ["eval.plots=false"])
    prepare_run_dir(loaded, run_dir, resume=False)
    seed_everything(loaded.train.seed)
    train_ds = build_dataset(loaded, "train")
    save_artifacts(train_ds, run_dir)
    method = build_method(loaded, train_ds.modalities).eval()
    return evaluate_method(loaded, method, run_dir, torch.device("cpu"))


def _raw_probes() -> dict[str, float]:
    """Linear probes on raw inputs of av-digits (pixels; log-mel mean and std per mel bin)."""
    import torch

    from modalign.data.datasets.av_digits import AVDigits
    from modalign.eval import linear_probe_accuracy

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ds = AVDigits(split=split, augment=False)
        samples = [ds[i] for i in range(len(ds))]
        image = torch.stack([s.values["image"].flatten() for s in samples])
        audio = torch.stack([torch.cat([s.values["audio"].mean(-1), s.values["audio"].std(-1)]) for s in samples])
        return image, audio, torch.tensor([s.labels["digit"] for s in samples])

    (tr_i, tr_a, tr_y), (te_i, te_a, te_y) = features("train"), features("test")
    return {
        "image": linear_probe_accuracy(tr_i, tr_y, te_i, te_y),
        "audio": linear_probe_accuracy(tr_a, tr_y, te_a, te_y),
    }


def _run_row(row: Row, runs: Path) -> dict[str, Any]:
    run_dir = runs / row.recipe
    cmd = [sys.executable, __file__, "--child", row.recipe, "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["command"] = f"modalign train {row.recipe} --run-dir {run_dir}"
    return result


def _fmt(value: float | None, chance: float | None = None) -> str:
    if value is None:
        return "—"
    text = f"{value:.3f}"
    return text if chance is None or value > chance else f"**{text} (≤ chance)**"


def _av_cells(row: Row, m: dict[str, float], raw: dict[str, float]) -> list[str]:
    p1 = [m.get("image->audio/p@1"), m.get("audio->image/p@1")] if row.shared else [None, None]
    probes = [m.get("image/linear_probe"), m.get("audio/linear_probe")]
    beats = any(p is not None and p > raw.get(k, 1.0) for p, k in zip(probes, ("image", "audio"), strict=True))
    cells = [_fmt(v, CHANCE["p@1"]) for v in p1] + [_fmt(v, CHANCE["probe"]) for v in probes]
    own = [v for k, v in m.items() if k.endswith("/image/nmi") and k.count("/") == 2]
    nmi = [_fmt(m.get("image/nmi"), CHANCE["nmi"]), _fmt(own[0], CHANCE["nmi"]) if own else "—"]
    return [*cells, "yes" if beats else "**no**", *nmi]


def _emoji_cells(row: Row, m: dict[str, float]) -> list[str]:
    if row.kind == "multi":
        keys = ["image->text_en/R@1", "image->text_en/R@10", "text_en->text_de/R@10", "text_de->text_en/R@10"]
        chances = [CHANCE["R@1"], CHANCE["R@10"], CHANCE["R@10"], CHANCE["R@10"]]
    else:
        keys = ["image->text/R@1", "image->text/R@10", "text->image/R@1", "text->image/R@10"]
        chances = [CHANCE["R@1"], CHANCE["R@10"], CHANCE["R@1"], CHANCE["R@10"]]
    return [_fmt(m.get(k), c) for k, c in zip(keys, chances, strict=True)]


def _versus_untrained(name: str, untrained: dict[str, float], results: dict[str, Any]) -> str:
    """`` (trained: above on image, audio)``: where training moved each probe past its initialisation."""
    trained = results.get("rows", {}).get(name, {}).get("metrics", {})
    verdicts = []
    for m in ("image", "audio"):
        key = f"{m}/linear_probe"
        if key in trained and key in untrained:
            above = trained[key] > untrained[key]
            verdicts.append(f"{m} {trained[key]:.3f} {'above' if above else '**not above**'}")
    return f" (trained: {', '.join(verdicts)})" if verdicts else ""


def write_doc(results: dict[str, Any]) -> None:
    """Rewrite ``docs/objectives.md`` from the merged results."""
    raw = results.get("raw_probes", {})
    av = [
        "| method | recipe | p@1 image→audio | p@1 audio→image | probe image | probe audio "
        "| beats raw probe | image NMI (k-means) | image NMI (own clusters) | s/epoch | peak MiB |"
    ]
    em = [
        "| method | recipe | R@1 image→text | R@10 image→text | R@1 text→image | R@10 text→image | s/epoch | peak MiB |"
    ]
    mu = ["| method | recipe | R@1 image→en | R@10 image→en | R@10 en→de | R@10 de→en | s/epoch | peak MiB |"]
    commands = []
    for row in ROWS:
        res = results.get("rows", {}).get(row.recipe)
        if res is None:
            continue
        if "error" in res:
            commands.append(f"- `{row.recipe}`: **failed**: {res['error']}")
            continue
        m, tail = res["metrics"], [f"{res['seconds_per_epoch']:.1f}", f"{res['peak_mib']:.0f}"]
        if row.kind == "av":
            av.append("| " + " | ".join([row.method, row.recipe, *_av_cells(row, m, raw), *tail]) + " |")
        else:
            table = mu if row.kind == "multi" else em
            table.append("| " + " | ".join([row.method, row.recipe, *_emoji_cells(row, m), *tail]) + " |")
        load = f", load {res['load_avg_5min']:.1f}" if "load_avg_5min" in res else ""
        commands.append(f"- `{res['command']}` ({res['seconds']:.0f} s, {res['machine']}{load})")
    sep = lambda t: [t[0], "|" + "---|" * t[0].count(" | ") + "---|", *t[1:]]  # noqa: E731
    raw_line = ", ".join(f"{k} {v:.3f}" for k, v in raw.items()) or "not measured"
    untrained_line = "; ".join(
        f"`{name}` "
        + ", ".join(f"{k} {v:.3f}" for k, v in sorted(vals.items()))
        + _versus_untrained(name, vals, results)
        for name, vals in results.get("untrained", {}).items()
    )
    text = [
        "# Objectives benchmark",
        "",
        "Written by `benchmarks/objectives.py` (do not edit by hand); raw figures in",
        "`benchmarks/results/objectives.json`. Each row trains its packaged recipe from scratch on",
        "the 2-core CPU machine; timings are wall-clock on a shared box (noise of tens of percent;",
        "the load average during each run is listed with its command).",
        "Chance: p@1 and probes 0.10, NMI 0, emoji R@1 0.0025 and R@10 0.025. A figure at or",
        "below chance is marked in bold.",
        "",
        f"Raw-input linear probes on av-digits (the bar each av-digits row beats on one modality): {raw_line}.",
        "",
        "## av-digits (image ↔ audio), test split",
        "",
        *sep(av),
        "",
        "XDC (each modality predicts the other's k-means clusters through its own classifier) and the",
        "masked-prediction rows (multimae, data2vec) learn no shared space: cross-modal p@1 is not",
        "reported for them. Their untrained towers (seeded initialisation, no step) give: "
        + (untrained_line or "not measured")
        + ". *image NMI (k-means)*: k-means with k = 10 on the test embeddings;",
        "*own clusters*: the clustering objective's own assignments (its centroids or prototypes).",
        "",
        "## emoji (image ↔ English text), 400 held-out emoji",
        "",
        *sep(em),
        "",
        "## emoji-multilingual (image, English, German)",
        "",
        *sep(mu),
        "",
        "## Commands",
        "",
        *commands,
        "",
    ]
    DOC.write_text("\n".join(text))


def main() -> None:
    """Run the selected rows (or only rewrite the table), merge and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="Recipes to run (default: every row).")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench", help="Folder of the run directories.")
    parser.add_argument("--table", action="store_true", help="Only rewrite docs/objectives.md from the JSON.")
    parser.add_argument("--no-raw", action="store_true", help="Skip the raw-input probes.")
    parser.add_argument("--untrained", nargs="*", default=[], help="Also evaluate these rows' untrained towers.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.run_dir)))
        return
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    if not args.table:
        if not args.no_raw:
            results["raw_probes"] = _raw_probes()
        known = {r.recipe: r for r in ROWS}
        for name in args.only or list(known):
            if name not in known:
                raise SystemExit(f"unknown row {name!r}; rows: {', '.join(known)}")
            res = _run_row(known[name], args.runs)
            res["machine"] = f"{platform.machine()}, {platform.python_version()}"
            results["rows"][name] = res
            print(name, json.dumps({k: v for k, v in res.items() if k != "metrics"}), flush=True)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True))
        for name in args.untrained:
            metrics = _untrained(name, args.runs / f"{name}-untrained")
            keep = ("image/linear_probe", "audio/linear_probe", "image/nmi")
            results.setdefault("untrained", {})[name] = {k: metrics[k] for k in keep if k in metrics}
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True))
    write_doc(results)
    print(DOC.read_text())


if __name__ == "__main__":
    main()
