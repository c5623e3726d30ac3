"""Benchmark: how much digit structure the frozen towers of ``av-digits-stitch`` offer to 1% of pairs.

The mix-paired methods of ``docs/unaligned.md`` mine pseudo-pairs or neighbours from the unimodal
pools; on ``av-digits-stitch`` they can only be as right as the frozen features' own structure
lets the 50 known pairs (1%, about five per digit) spread. This script measures that structure
on the training split of the recipe at ``data.paired_fraction=0.01`` (features from the feature
cache, one row per distinct content), per modality, using the digit labels for scoring only:

* ``1-NN purity``: the nearest other row has the same digit.
* ``probe, all labels``: logistic regression trained on half of the rows with their digits,
  accuracy on the other half (what the features hold linearly).
* ``probe, 5 per digit``: the same with five labelled rows per digit (mean of 5 draws): what a
  linear map learns from as many labels as the 1% pairs give.
* ``label propagation from the anchors``: label spreading (Zhou et al. 2004, "Learning with Local
  and Global Consistency") over a symmetric ``k``-NN graph of the pool, seeded with the digits of
  the rows that are paired (the anchors' digits are not known to a method; this is an upper
  bound for propagating anything from the anchors).

Prints a table and writes ``benchmarks/results/stitch_ceiling.json``.

    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/stitch_ceiling.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from modalign.train.build import build_dataset
from modalign.train.recipe import load_recipe

RESULTS = Path(__file__).parent / "results" / "stitch_ceiling.json"


def pools(recipe: str, fraction: float) -> dict[str, tuple[Tensor, np.ndarray, np.ndarray]]:
    """Per modality: pooled frozen features ``[N, C]`` (L2-normalised, one per content), digits, anchor flags."""
    dataset = build_dataset(load_recipe(recipe, [f"data.paired_fraction={fraction}"]), "train", augment=False)
    rows: dict[str, dict[int, tuple[Tensor, int, bool]]] = {}
    for i in range(len(dataset)):
        sample = dataset[i]
        paired = len(sample.values) >= 2
        for modality, value in sample.values.items():
            content = sample.modality_ids.get(modality, sample.id)
            seen = rows.setdefault(modality, {}).get(content)
            rows[modality][content] = (value[:, 0], sample.labels["digit"], paired or bool(seen and seen[2]))
    out = {}
    for modality, by_content in rows.items():
        feats, digits, anchors = zip(*by_content.values(), strict=True)
        out[modality] = (F.normalize(torch.stack(feats).double(), dim=1), np.array(digits), np.array(anchors))
    return out


def purity_1nn(x: Tensor, y: np.ndarray) -> float:
    """Fraction of rows whose nearest other row (cosine) has the same label."""
    sim = x @ x.T
    sim.fill_diagonal_(-2.0)
    return float((y[sim.argmax(dim=1).numpy()] == y).mean())


def probes(x: Tensor, y: np.ndarray, per_class: int, draws: int, seed: int) -> tuple[float, float]:
    """Held-out accuracy of logistic regression on half the rows: all their labels, and ``per_class`` per label."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    train, test = order[: len(y) // 2], order[len(y) // 2 :]
    xs = x.float().numpy()
    full = LogisticRegression(max_iter=2000).fit(xs[train], y[train]).score(xs[test], y[test])
    few = []
    for d in range(draws):
        r = np.random.default_rng([seed, d])
        pick = np.concatenate([r.choice(train[y[train] == c], per_class, replace=False) for c in np.unique(y)])
        few.append(LogisticRegression(max_iter=2000).fit(xs[pick], y[pick]).score(xs[test], y[test]))
    return float(full), float(np.mean(few))


def label_spreading(x: Tensor, y: np.ndarray, seeds: np.ndarray, k: int, alpha: float, steps: int = 50) -> float:
    """Accuracy on the unseeded rows of label spreading over a symmetric ``k``-NN cosine graph."""
    sim = x @ x.T
    sim.fill_diagonal_(-2.0)
    value, index = sim.topk(k, dim=1)
    w = torch.zeros_like(sim).scatter_(1, index, value.clamp_min(0.0))
    w = w + w.T
    d = w.sum(dim=1).clamp_min(1e-12).rsqrt()
    s = d[:, None] * w * d[None, :]
    labels = np.unique(y)
    prior = torch.zeros(len(y), len(labels), dtype=x.dtype)
    prior[torch.from_numpy(np.flatnonzero(seeds)), torch.from_numpy(np.searchsorted(labels, y[seeds]))] = 1.0
    f = prior.clone()
    for _ in range(steps):
        f = alpha * s @ f + (1 - alpha) * prior
    predicted = labels[f.argmax(dim=1).numpy()]
    return float((predicted[~seeds] == y[~seeds]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="av-digits-stitch")
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--k", type=int, default=10, help="Neighbours of the propagation graph.")
    parser.add_argument("--alpha", type=float, default=0.9, help="Label spreading's alpha.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for modality, (x, y, anchors) in sorted(pools(args.recipe, args.fraction).items()):
        full, few = probes(x, y, per_class=5, draws=5, seed=args.seed)
        rows.append(
            {
                "modality": modality,
                "contents": len(y),
                "anchors": int(anchors.sum()),
                "purity_1nn": purity_1nn(x, y),
                "probe_all": full,
                "probe_5": few,
                "propagation": label_spreading(x, y, anchors, args.k, args.alpha),
            }
        )
    lines = [
        "| modality | contents | paired (anchors) | 1-NN purity | probe, all labels | probe, 5 per digit | "
        f"label propagation from the anchors (k {args.k}) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['modality']} | {r['contents']} | {r['anchors']} | {r['purity_1nn']:.3f} | {r['probe_all']:.3f} | "
        f"{r['probe_5']:.3f} | {r['propagation']:.3f} |"
        for r in rows
    ]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
