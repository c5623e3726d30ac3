"""Benchmark: how well ``modalign audit-pairs`` finds injected mismatches in the stitched recipes.

For each recipe (frozen pretrained encoders; features from the feature cache) and each share of
pairs replaced by ``data.pair_noise`` (a cyclic derangement, recorded), runs
``modalign.train.audit.audit_recipe_pairs`` as the command does and compares it with the truth:
the estimated share of mismatched pairs, the AUC of the p-values, and the precision and recall
of the flagged pairs (local FDR above 0.5). ``train.seed`` draws the noisy pairs.

Prints a table, writes ``benchmarks/results/pair_audit.json`` and the "Auditing pairs" section of
``docs/unaligned.md`` (``--no-doc``: not the section).

    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/pair_audit.py [--recipes R ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from docsection import write_section
from losses import cpu_name

from modalign.train.audit import audit_recipe_pairs
from modalign.train.recipe import load_recipe

RESULTS = Path(__file__).parent / "results" / "pair_audit.json"
DOC = Path(__file__).parents[1] / "docs" / "unaligned.md"
COMMAND = "MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/pair_audit.py --seeds 0 1 2"


def measure(recipe: str, noise: float, seed: int) -> dict[str, Any]:
    """One audit of ``recipe`` at ``noise`` and ``train.seed = seed``: its summary and seconds."""
    rec = load_recipe(recipe, [f"data.pair_noise={noise}", f"train.seed={seed}"])
    start = time.perf_counter()
    report = audit_recipe_pairs(rec)
    summary = report.summary()
    return {"recipe": recipe, "noise": noise, "seed": seed, "seconds": time.perf_counter() - start, **summary}


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the measured rows."""
    head = "| recipe | pairs replaced | seed | pairs | estimated share | AUC | precision | recall | seconds |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        values = [r.get(k, math.nan) for k in ("noise_estimate", "auc", "precision", "recall")]
        cells = ["—" if math.isnan(v) else f"{v:.3f}" for v in values]
        lines.append(
            f"| `{r['recipe']}` | {r['noise']:.0%} | {r['seed']} | {r['pairs']:.0f} | {' | '.join(cells)} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["emoji-stitch", "av-digits-stitch"])
    parser.add_argument("--noises", nargs="+", type=float, default=[0.0, 0.2, 0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--no-doc", action="store_true", help="Do not rewrite the docs/unaligned.md section.")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = [measure(r, q, s) for r in args.recipes for q in args.noises for s in args.seeds]
    lines = table(rows)
    print(lines)
    machine = (
        f"Machine: {cpu_name()}, {os.cpu_count()} core(s), {torch.get_num_threads()} thread(s), torch "
        f"{torch.__version__}; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after. Seconds include "
        "reading the cached features."
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    if not args.no_doc:
        write_section(DOC, "pair_audit", COMMAND, machine, lines.splitlines(), "Auditing pairs")
        print(f"wrote the pair_audit section of {DOC}")


if __name__ == "__main__":
    main()
