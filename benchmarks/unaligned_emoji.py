"""Benchmark: unaligned data on emoji (docs/unaligned.md): lexicon induction and word-region OT plans.

Two sections, each a function ``NAME(args) -> (Markdown lines, JSON-able dict)`` that
``benchmarks/unaligned.py`` can call:

* ``lexicon``: English -> German lexicon induction on the CLDR labels of the emoji base
  glyphs, **fully unpaired**. Labels are embedded by the frozen all-MiniLM-L6-v2 through
  modalign's ``text_minilm`` wrapper (``unaligned.embed``). The emoji of ``emoji``'s train split
  are cut into two seeded halves: the English side holds the labels of one half, the German
  side those of the other, so no label has its translation on the other side. Evaluated on the
  400 held-out base emoji of ``emoji``'s test split (their true English/German label pairs),
  P@1 and P@10 with cosine and CSLS. Rows: the identity, the mutual-neighbour Procrustes
  refinement from the identity, the Gromov-Wasserstein -> Wasserstein-Procrustes -> refinement
  route (no use of the shared encoder), the supervised Procrustes bound on every train pair, and
  a control (the refinement with every training emoji on both sides), plus two diagnostics of
  the GW start on the test labels.
* ``plans``: entropic optimal-transport plans between the words of an emoji's label and the
  regions of its image, from the recipe ``emoji-ot`` (InfoNCE plus the token-level
  ``ot_tokens`` objective, trained here into ``--plans-run-dir`` unless a finished run is
  there), computed with the library's ``ot_token_plan`` on held-out emoji and plotted to
  ``docs/img/unaligned_ot_plans.png``.

    MODALIGN_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unaligned_emoji.py --only lexicon
    MODALIGN_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unaligned_emoji.py --only plans
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from unaligned_common import centred, embed, log, retrieval

from modalign.alignment import (
    gromov_wasserstein,
    mutual_neighbours,
    orthogonal_procrustes,
    refine_procrustes,
    wasserstein_procrustes,
)
from modalign.core.types import Batch, Sample
from modalign.data.base import resolve_data_root
from modalign.data.collate import collate
from modalign.data.datasets.emoji import EmojiDataset, EmojiEntry, load_catalogue, read_json, split_entries
from modalign.data.datasets.emoji_multilingual import labels_file
from modalign.encoders.stitch import MiniLMText
from modalign.methods.base import Method
from modalign.objectives.token_alignment import OTTokens, ot_token_distance, ot_token_plan
from modalign.train.build import build_dataset
from modalign.train.recipe import Recipe, load_recipe
from modalign.train.records import METRICS_FILE, read_metrics
from modalign.train.run import EVAL_FILE, load_artifacts, load_run, train_run

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DEFAULT_PNG = DOCS / "img" / "unaligned_ot_plans.png"
DEFAULT_RUN = ROOT / "runs" / "unaligned" / "emoji-ot"

# ---------------------------------------------------------------- options


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """``parser.add_argument(flag, ...)`` unless the parser already has ``flag`` (shared with unaligned.py)."""
    with contextlib.suppress(argparse.ArgumentError):
        parser.add_argument(flag, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lexicon`` and ``plans``; those ``benchmarks/unaligned.py`` already has are reused as they are."""
    _add(parser, "--seed", type=int, default=0)
    _add(parser, "--gw-iterations", type=int, default=10, help="Mirror-descent steps per epsilon.")
    _add(parser, "--gw-sinkhorn", type=int, default=100, help="Sinkhorn iterations per mirror-descent step.")
    _add(parser, "--wp-iterations", type=int, default=5)
    _add(parser, "--wp-epsilon", type=float, default=0.05)
    _add(parser, "--refine", type=int, default=10, help="Mutual-neighbour Procrustes iterations.")
    parser.add_argument(
        "--lexicon-gw", type=int, default=0, help="Labels per side of the GW start (0: the whole half)."
    )
    parser.add_argument("--plans-recipe", default="emoji-ot", help="Recipe trained for the plans (name or YAML).")
    parser.add_argument("--plans-run-dir", default=str(DEFAULT_RUN), help="Run directory (reused when finished).")
    parser.add_argument("--plans-override", action="append", default=[], help="Recipe override KEY=VALUE.")
    parser.add_argument("--plans-examples", type=int, default=6, help="Held-out emoji plotted.")
    parser.add_argument("--plans-epsilon", type=float, default=0.05, help="Entropic regularisation of the plans.")
    parser.add_argument("--plans-iterations", type=int, default=200, help="Sinkhorn iterations of the plans.")
    parser.add_argument("--plans-png", default=str(DEFAULT_PNG), help="Figure written (under docs/img/).")


# ---------------------------------------------------------------- lexicon


@dataclass
class Labels:
    """English and German CLDR labels of the base emoji of one split (row ``i`` of both is emoji ``i``)."""

    en: list[str]
    de: list[str]


def emoji_labels(root: Path) -> tuple[Labels, Labels]:
    """``(train, test)`` labels of the base emoji of ``emoji``'s train and held-out splits."""
    entries, _, _ = load_catalogue(root, "emoji")
    german = {item["hexcode"]: item["label"] for item in read_json(root / labels_file("de"))}

    def labels(split: list[EmojiEntry]) -> Labels:
        kept = [e for e in split if e.hexcode in german]
        return Labels([e.label for e in kept], [german[e.hexcode] for e in kept])

    return labels(split_entries(entries, "train", False)), labels(split_entries(entries, "test", False))


def isometry(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of the pairwise cosines within ``x`` and within ``y`` (row ``i`` of both paired).

    1 for two spaces that differ by a rotation; what GW's matching of intra-space similarities needs.
    """
    cx, cy = (F.normalize(t, dim=1) @ F.normalize(t, dim=1).T for t in (x, y))
    off = ~torch.eye(len(x), dtype=torch.bool)
    return float(torch.corrcoef(torch.stack([cx[off], cy[off]]))[0, 1])


def lexicon_rows(
    x_all: Tensor, y_all: Tensor, tx: Tensor, ty: Tensor, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of the lexicon table from centred embeddings (train pairs ``x_all``/``y_all``, test ``tx``/``ty``).

    The alignment sees the English of one seeded half and the German of the other half only.
    """
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(args.seed))
    half = len(x_all) // 2
    x, y = x_all[order[:half]], y_all[order[half:]]
    g = torch.Generator().manual_seed(args.seed + 1)
    rows: list[dict[str, Any]] = []

    def report(name: str, w: Tensor, seconds: float) -> None:
        log(f"lexicon: {name}")
        cos, csls = retrieval(tx, ty, w, None), retrieval(tx, ty, w, 10)
        rows.append({"method": name, "seconds": seconds, "cosine": cos, "csls": csls})

    eye = torch.eye(x.shape[1], dtype=torch.float64)
    report("identity (no map)", eye, 0.0)
    t0 = time.perf_counter()
    report("refine from identity", refine_procrustes(x, y, eye, iterations=args.refine).w, time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = args.lexicon_gw or min(len(x), len(y))
    sx, sy = torch.randperm(len(x), generator=g)[:n], torch.randperm(len(y), generator=g)[:n]
    plan = gromov_wasserstein(x[sx], y[sy], iterations=args.gw_iterations, sinkhorn_iterations=args.gw_sinkhorn)
    gw_s = time.perf_counter() - t0
    w0 = orthogonal_procrustes(x[sx], len(sx) * plan @ y[sy])
    report("GW only", w0, time.perf_counter() - t0)
    w1 = wasserstein_procrustes(x, y, w0, iterations=args.wp_iterations, epsilon=args.wp_epsilon)
    report("GW + Wasserstein-Procrustes", w1, time.perf_counter() - t0)
    full = refine_procrustes(x, y, w1, iterations=args.refine)
    report("GW + WP + refine (unsupervised)", full.w, time.perf_counter() - t0)
    t0 = time.perf_counter()
    report(f"supervised Procrustes ({len(x_all)} pairs)", orthogonal_procrustes(x_all, y_all), time.perf_counter() - t0)
    t0 = time.perf_counter()
    control = refine_procrustes(x_all, y_all, eye, iterations=args.refine).w
    report(f"control: refine from identity, both sides all {len(x_all)} emoji", control, time.perf_counter() - t0)
    t0 = time.perf_counter()
    test_plan = gromov_wasserstein(tx, ty, iterations=args.gw_iterations, sinkhorn_iterations=args.gw_sinkhorn)
    matched = float((test_plan.argmax(dim=1) == torch.arange(len(tx))).double().mean())
    info = {
        "isometry_r": isometry(tx, ty),
        "gw_test_matched": matched,
        "gw_test_s": time.perf_counter() - t0,
        "english_half": len(x),
        "german_half": len(y),
        "gw_labels": n,
        "gw_s": gw_s,
        "mutual_neighbours_end": int(mutual_neighbours(x @ full.w, y, 10)[0].numel()),
    }
    return rows, info


def table(rows: list[dict[str, Any]], first: str) -> list[str]:
    """The Markdown table of retrieval rows (as ``unaligned.translation`` prints them)."""
    return [
        f"| {first} | P@1 cosine | P@10 cosine | P@1 CSLS | P@10 CSLS | seconds |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {r['method']} | {r['cosine']['p@1']:.3f} | {r['cosine']['p@10']:.3f} | {r['csls']['p@1']:.3f} | "
            f"{r['csls']['p@10']:.3f} | {r['seconds']:.1f} |"
            for r in rows
        ],
    ]


def lexicon(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """English -> German lexicon induction on emoji CLDR labels from disjoint halves (no pairs)."""
    root = resolve_data_root(os.environ.get("MODALIGN_DATA"))
    train, test = emoji_labels(root)
    torch.manual_seed(0)
    encoder = MiniLMText().eval()
    t0 = time.perf_counter()
    e_en, e_de, t_en, t_de = (embed(encoder, texts) for texts in (train.en, train.de, test.en, test.de))
    embed_s = time.perf_counter() - t0
    x_all, y_all = centred(e_en).double(), centred(e_de).double()
    tx, ty = centred(t_en).double(), centred(t_de).double()
    rows, info = lexicon_rows(x_all, y_all, tx, ty, args)
    identical = sum(a == b for a, b in zip(test.en, test.de, strict=True))
    lines = [
        f"Labels: the CLDR names of the base emoji (emojibase 17.0.0, en and de), not their keywords. English "
        f"side: {info['english_half']} labels of one half of the {len(train.en)} training emoji; German side: "
        f"{info['german_half']} labels of the other half; test: the {len(test.en)} held-out base emoji of `emoji` "
        f"(true English -> German label pairs; chance P@1 = 1/{len(test.en)}; {identical} of them spelled the "
        f"same in both languages). Embedding {2 * (len(train.en) + len(test.en))} labels: {embed_s:.0f} s. "
        f"GW on {info['gw_labels']} + {info['gw_labels']} labels: {info['gw_s']:.0f} s; mutual neighbours found "
        f"at the end: {info['mutual_neighbours_end']}.",
        "",
        *table(rows, "map (English -> German labels)"),
        "",
        "The control row is not unpaired in the same sense: no pair is given, but each side holds every "
        "training emoji, so every label has its translation on the other side. Diagnostic of the GW start: "
        f"GW between the {len(test.en)} test labels of each language themselves (every translation present) "
        f"sends {info['gw_test_matched']:.3f} of the English labels' largest mass to their translation "
        f"(chance {1 / len(test.en):.4f}; {info['gw_test_s']:.0f} s); the correlation of the pairwise cosines "
        f"among those English labels with those among their German translations is {info['isometry_r']:.2f} "
        "(1 for spaces that differ by a rotation).",
    ]
    return lines, {"rows": rows, "embed_s": embed_s, **info, "test": len(test.en), "args": _jsonable(vars(args))}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with values JSON cannot hold turned into strings."""
    return {k: v if isinstance(v, str | int | float | bool | list | type(None)) else str(v) for k, v in d.items()}


# ---------------------------------------------------------------- plans


def trained_run(args: argparse.Namespace, root: Path) -> tuple[Path, bool]:
    """The run directory of ``--plans-recipe``: reused if it holds a finished run, else trained now.

    Returns:
        ``(run_dir, reused)``.
    """
    run_dir = Path(args.plans_run_dir)
    if (run_dir / EVAL_FILE).is_file():
        log(f"plans: reusing the finished run {run_dir}")
        return run_dir, True
    recipe = load_recipe(args.plans_recipe, args.plans_override)
    recipe.data = {**recipe.data, "root": str(root)}
    log(f"plans: training {args.plans_recipe} into {run_dir}")
    train_run(recipe, run_dir, command=["benchmarks/unaligned_emoji.py", "--only", "plans"])
    return run_dir, False


def epoch_seconds(run_dir: Path) -> list[float]:
    """The ``epoch_seconds`` that ``metrics.jsonl`` records, one per epoch (training alone, not the evaluation)."""
    return [float(r["epoch_seconds"]) for r in read_metrics(run_dir / METRICS_FILE) if "epoch_seconds" in r]


def token_objective(method: Method) -> OTTokens:
    """The method's ``ot_tokens`` objective (whose projections map both towers' tokens to one space).

    Raises:
        ValueError: If the method has none.
    """
    for objective in method.objectives.values():
        if isinstance(objective, OTTokens):
            return objective
    raise ValueError("the recipe has no ot_tokens objective: no token space to plan in")


@torch.no_grad()
def projected_tokens(method: Method, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """``(text [N, T, E], text padding [N, T], image [N, S, E])`` in the ``ot_tokens`` space."""
    objective = token_objective(method)
    text, image = objective.modalities
    outputs = method(batch)
    maps = objective.project.maps
    padding = outputs.padding.get(text, torch.zeros(outputs.tokens[text].shape[:2], dtype=torch.bool))
    return maps[text](outputs.tokens[text]), padding, maps[image](outputs.tokens[image])


def label_batch(dataset: EmojiDataset, indices: list[int]) -> Batch:
    """The images of ``indices`` with their CLDR label alone as text (``[CLS]`` then the label's words)."""
    samples = [
        Sample(
            id=i,
            values={
                "image": dataset[i].values["image"],
                "text": dataset.tokenizer.encode(dataset.entries[i].label, dataset.max_tokens),
            },
        )
        for i in indices
    ]
    return collate(samples, dataset.modalities)


def choose_examples(dataset: EmojiDataset, count: int, seed: int) -> list[int]:
    """``count`` held-out emoji drawn (seeded) among those whose label is 2-4 words, all in the vocabulary.

    A word is a whitespace-separated piece that the tokenizer keeps as one token (so no ``men's``).
    """
    unk = dataset.tokenizer.unk_id
    eligible = []
    for i, entry in enumerate(dataset.entries):
        ids = dataset.tokenizer.encode(entry.label, dataset.max_tokens)[1:]
        if 2 <= len(ids) <= 4 and len(ids) == len(entry.label.split()) and bool((ids != unk).all()):
            eligible.append(i)
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(eligible, size=min(count, len(eligible)), replace=False))


def word_names(dataset: EmojiDataset, ids: Tensor) -> list[str]:
    """The vocabulary words of the token ids ``ids``."""
    return [dataset.tokenizer.decode([int(i)]) for i in ids]


@torch.no_grad()
def ot_retrieval(
    method: Method, dataset: EmojiDataset, epsilon: float, iterations: int, chunk: int = 25
) -> dict[str, float]:
    """Held-out text -> image and image -> text R@1/R@10 ranked by the token-OT score ``-W`` (full texts)."""
    batch = collate([dataset[i] for i in range(len(dataset))], dataset.modalities)
    text, padding, image = projected_tokens(method, batch)
    w = torch.cat(
        [
            ot_token_distance(text[s : s + chunk], padding[s : s + chunk], image, None, epsilon, iterations)
            for s in range(0, len(text), chunk)
        ]
    )
    truth = torch.arange(len(w))[:, None]
    out = {}
    for name, scores in (("text->image", -w), ("image->text", -w.T)):
        top = scores.topk(10, dim=1).indices
        out[f"{name}/R@1"] = float((top[:, :1] == truth).any(1).float().mean())
        out[f"{name}/R@10"] = float((top == truth).any(1).float().mean())
    return out


def plot_plans(
    dataset: EmojiDataset, indices: list[int], words: list[list[str]], plans: list[Tensor], path: Path
) -> None:
    """One row per emoji: the image, then each label word's share of the plan over the region grid, overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + max(len(w) for w in words)
    fig, axes = plt.subplots(len(indices), cols, figsize=(1.9 * cols, 2.0 * len(indices)), squeeze=False)
    for row, (i, ws, plan) in enumerate(zip(indices, words, plans, strict=True)):
        picture = np.asarray(dataset.raw_value(i, "image"))
        side = round(plan.shape[1] ** 0.5)
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title(dataset.entries[i].label, fontsize=8)
        for col in range(1, cols):
            ax = axes[row, col]
            ax.axis("off")
            if col > len(ws):
                continue
            share = (plan[col - 1] / plan[col - 1].sum()).reshape(side, side).numpy()
            ax.imshow(picture.mean(axis=2), cmap="gray", vmin=0, vmax=255)
            ax.imshow(share, cmap="magma", alpha=0.6, extent=(0, picture.shape[1], picture.shape[0], 0), vmin=0)
            ax.set_title(f"'{ws[col - 1]}' (max {share.max():.2f})", fontsize=8)
        axes[row, 0].axis("off")
    fig.suptitle("OT plan, label words -> image regions (each word's mass over the 8x8 cells, sums to 1)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cell_purity(plan: Tensor) -> float:
    """Mean over regions of the largest share one word takes of its mass (1: a hard partition, ``1/T``: even)."""
    return float((plan.amax(dim=0) / plan.sum(dim=0)).mean())


def plan_entropy(plan: Tensor) -> float:
    """Mean over words of the entropy (bits) of the word's normalised plan row over the regions."""
    rows = plan / plan.sum(dim=1, keepdim=True)
    return float(-(rows * rows.clamp_min(1e-30).log2()).sum(dim=1).mean())


def plans(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """Train (or reuse) the ``ot_tokens`` model and plot word -> region plans on held-out emoji."""
    root = resolve_data_root(os.environ.get("MODALIGN_DATA"))
    load = os.getloadavg()[0]
    run_dir, reused = trained_run(args, root)
    load_after = os.getloadavg()[0]
    epochs = epoch_seconds(run_dir)
    train_s = sum(epochs)
    metrics = json.loads((run_dir / EVAL_FILE).read_text())
    recipe, method = load_run(run_dir, str(root))
    method.eval()
    dataset = build_dataset(recipe, "test", artifacts=load_artifacts(run_dir), augment=False)
    assert isinstance(dataset, EmojiDataset)
    objective = token_objective(method)
    t0 = time.perf_counter()
    ot_metrics = ot_retrieval(method, dataset, objective.epsilon, objective.iterations)
    ot_s = time.perf_counter() - t0
    indices = choose_examples(dataset, args.plans_examples, args.seed)
    text, padding, image = projected_tokens(method, label_batch(dataset, indices))
    padding = padding.clone()
    padding[:, 0] = True  # [CLS] is not a word of the label: it gets no mass
    plan = ot_token_plan(text, padding, image, None, args.plans_epsilon, args.plans_iterations)
    words, per_example = [], []
    for n, i in enumerate(indices):
        valid = (~padding[n]).nonzero().squeeze(1)
        ids = label_batch(dataset, [i]).data["text"][0][valid]
        words.append(word_names(dataset, ids))
        per_example.append(plan[n][valid])
    png = Path(args.plans_png)
    plot_plans(dataset, indices, words, per_example, png)
    entropy = float(np.mean([plan_entropy(p) for p in per_example]))
    purity = float(np.mean([cell_purity(p) for p in per_example]))
    side = round(image.shape[1] ** 0.5)
    link = os.path.relpath(png.resolve(), DOCS)
    ot = objective_summary(recipe)
    lines = [
        f"Recipe `{args.plans_recipe}` ({ot}), trained on the train split of `emoji` (the {len(dataset)} "
        f"held-out emoji never seen) into `{run_dir}`{' (reused)' if reused else ''}: {train_s:.0f} s of training "
        f"({len(epochs)} epochs of {min(epochs):.0f}-{max(epochs):.0f} s on a shared machine"
        f"{'' if reused else f', load average {load:.1f} before and {load_after:.1f} after'}). Plans: "
        f"`modalign.objectives.token_alignment.ot_token_plan` (cost 1 - cosine in the objective's token space, "
        f"uniform marginals, epsilon {args.plans_epsilon}, {args.plans_iterations} Sinkhorn iterations) between "
        f"the label's words (the text is the CLDR label alone, `[CLS]` left out) and the {side} x {side} cells "
        f"of the CNN's last feature map, on {len(indices)} held-out emoji drawn (seed {args.seed}) among those "
        f"whose label has 2-4 words, all in the vocabulary.",
        "",
        "| held-out retrieval (400 emoji, full texts) | text->image R@1 | text->image R@10 | image->text R@1 | "
        "image->text R@10 |",
        "|---|---:|---:|---:|---:|",
        f"| pooled embeddings (InfoNCE head, `eval.json`) | {metrics['text->image/R@1']:.3f} | "
        f"{metrics['text->image/R@10']:.3f} | {metrics['image->text/R@1']:.3f} | {metrics['image->text/R@10']:.3f} |",
        f"| token OT score -W (`ot_token_distance`, {ot_s:.0f} s) | {ot_metrics['text->image/R@1']:.3f} | "
        f"{ot_metrics['text->image/R@10']:.3f} | {ot_metrics['image->text/R@1']:.3f} | "
        f"{ot_metrics['image->text/R@10']:.3f} |",
        "",
        f"Chance: R@1 = 0.0025, R@10 = 0.025. Each region receives the same total mass (uniform marginals), so a "
        f"plan can only divide the image among the words; mean entropy of a word's share over the {side * side} "
        f"regions: {entropy:.2f} bits (uniform: {np.log2(side * side):.2f}); on average the word with the most "
        f"mass in a region holds {purity:.2f} of it (1: a hard partition of the regions among the words).",
        "",
        f"![OT plans between label words and image regions, held-out emoji]({link})",
    ]
    result = {
        "run_dir": str(run_dir),
        "reused": reused,
        "train_s": train_s,
        "epoch_seconds": epochs,
        "eval": metrics,
        "ot_retrieval": ot_metrics,
        "examples": [dataset.entries[i].label for i in indices],
        "words": words,
        "mean_entropy_bits": entropy,
        "cell_purity": purity,
        "png": str(png),
    }
    return lines, result


def objective_summary(recipe: Recipe) -> str:
    """``infonce + ot_tokens``-style summary of the recipe's method and towers."""
    method = recipe.method
    names = [o["name"] for o in method.get("objectives", [])] or [method["name"]]
    towers = ", ".join(f"{m}: {e['name']}" for m, e in sorted(recipe.model.encoders.items()))
    return f"{' + '.join(names)}; {towers}"


# ---------------------------------------------------------------- main


def main() -> None:
    """Run the chosen section(s) and print their lines; ``--json`` also writes the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["lexicon", "plans", "all"], default="all")
    parser.add_argument("--json", help="Write the results (by section) to this file.")
    add_arguments(parser)
    args = parser.parse_args()
    sections = {"lexicon": lexicon, "plans": plans}
    results = {}
    for name, fn in sections.items():
        if args.only in (name, "all"):
            lines, results[name] = fn(args)
            print("\n".join([f"## {name}", "", *lines, ""]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
