"""Benchmark: how well ``modalign audit-pairs`` finds injected mismatches in the stitched recipes.

For each recipe (frozen pretrained encoders; features from the feature cache) and each share of
pairs replaced by ``data.pair_noise`` (a cyclic derangement, recorded), runs
``modalign.train.audit.audit_recipe_pairs`` as the command does and compares it with the truth:
the estimated share of mismatched pairs, the AUC of the p-values, and the precision and recall
of the flagged pairs (local FDR above 0.5). ``train.seed`` draws the noisy pairs.

Prints a table and writes ``benchmarks/results/pair_audit.json``.

    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/pair_audit.py [--recipes R ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from modalign.train.audit import audit_recipe_pairs
from modalign.train.recipe import load_recipe

RESULTS = Path(__file__).parent / "results" / "pair_audit.json"
KEYS = ("pairs", "injected", "noise_estimate", "auc", "precision", "recall")


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
        cells = [f"{r.get(k, float('nan')):.3f}" for k in ("noise_estimate", "auc", "precision", "recall")]
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
    args = parser.parse_args()
    rows = [measure(r, q, s) for r in args.recipes for q in args.noises for s in args.seeds]
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
