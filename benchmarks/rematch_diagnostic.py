"""How well can the mismatched pairs of a noisy-pair run be re-paired? (docs/unaligned.md, "Noisy pairs")

Reads a finished run of ``ncr_infonce`` or ``ncr_rematch`` trained with ``data.pair_noise``,
embeds its training split as the run saw it (same pairing, no augmentation) and matches the
images and captions of two sets of pairs to each other: the truly noisy pairs (an oracle that
knows which are wrong) and the suspects (the pairs the run's stored NCR weights put below 0.5).
For each: the one-to-one assignment (``mine_assignment``) and nearest neighbour, the fraction of
rows matched to their own partner (equal content ids), and that fraction among the most
confident assignments; mutual neighbours (``mine_mnn``, CSLS). Prints a table and writes JSON.

    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/rematch_diagnostic.py RUN_DIR [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modalign.objectives import NCRInfoNCE
from modalign.objectives.cluster_tables import embed_training_split
from modalign.objectives.mining import mine_assignment, mine_mnn
from modalign.train.build import build_train_split, make_loader
from modalign.train.run import load_artifacts, load_run

TOPS = (50, 100, 200, 400, 800)


def match_report(a: Tensor, b: Tensor, ids_a: Tensor, ids_b: Tensor) -> dict[str, Any]:
    """Right-partner fractions of assignment, nearest neighbour and mutual neighbours of ``a [N, E]``, ``b [N, E]``."""
    assigned = mine_assignment(a, b)
    right = (ids_a[assigned.i] == ids_b[assigned.j]).float()
    order = torch.argsort(assigned.confidence, descending=True)
    nearest = (a @ b.T).argmax(dim=1)
    mutual = mine_mnn(a, b, -1.0, 10)
    return {
        "rows": int(a.shape[0]),
        "assignment": float(right.mean()),
        "nearest": float((ids_a == ids_b[nearest]).float().mean()),
        "top": {k: float(right[order[:k]].mean()) for k in TOPS if k <= right.shape[0]},
        "mutual_pairs": mutual.size,
        "mutual": float((ids_a[mutual.i] == ids_b[mutual.j]).float().mean()) if mutual.size else None,
    }


def diagnose(run_dir: Path) -> dict[str, Any]:
    """The report of ``run_dir`` for the truly noisy pairs and for the suspects."""
    recipe, method = load_run(run_dir, os.environ.get("MODALIGN_DATA"))
    objective = next(o for o in method.objectives.values() if isinstance(o, NCRInfoNCE))
    a, b = objective.modalities
    split = build_train_split(recipe, load_artifacts(run_dir), augment=False)
    rows = embed_training_split(method.model, make_loader(split, 256, False), (a, b), objective.embed_dim)
    paired = rows.present[a] & rows.present[b]
    ids_a, ids_b = rows.content[a][paired], rows.content[b][paired]
    emb_a, emb_b = rows.embeddings[a][paired], rows.embeddings[b][paired]
    weights = objective.weights_of(ids_a, ids_b)
    noisy, suspect = ids_a != ids_b, weights < 0.5
    out: dict[str, Any] = {
        "run": str(run_dir),
        "pairs": int(paired.sum()),
        "noisy": int(noisy.sum()),
        "suspects": int(suspect.sum()),
        "noisy_among_suspects": int((noisy & suspect).sum()),
    }
    for name, keep in (("noisy (oracle)", noisy), ("suspects (weight < 0.5)", suspect)):
        out[name] = match_report(emb_a[keep], emb_b[keep], ids_a[keep], ids_b[keep])
    return out


def table(report: dict[str, Any]) -> list[str]:
    """Markdown rows of ``report``."""
    head = "| pairs matched | rows | assignment | nearest | " + " | ".join(f"top {k}" for k in TOPS)
    lines = [head + " | mutual neighbours |", "|---" * (len(TOPS) + 5) + "|"]
    for name in ("noisy (oracle)", "suspects (weight < 0.5)"):
        r = report[name]
        tops = " | ".join(f"{r['top'][k]:.3f}" if k in r["top"] else "—" for k in TOPS)
        mutual = f"{r['mutual']:.3f} of {r['mutual_pairs']}" if r["mutual"] is not None else "none"
        lines.append(f"| {name} | {r['rows']} | {r['assignment']:.3f} | {r['nearest']:.3f} | {tops} | {mutual} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "rematch_diagnostic.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    report = diagnose(args.run_dir)
    print(
        f"{report['pairs']} pairs, {report['noisy']} noisy, {report['suspects']} suspects "
        f"({report['noisy_among_suspects']} of them noisy)"
    )
    print("\n".join(table(report)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
