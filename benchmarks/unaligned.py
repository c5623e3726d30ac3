"""Benchmark: learning with unaligned data (docs/unaligned.md).

Section ``translation`` (fully unpaired): English and German sentences of Multi30k (task 1),
embedded by the same frozen sentence encoder (all-MiniLM-L6-v2, trained on English, so German
lands in another region of its space), aligned **without a single pair**: the English side
is one half of the training sentences and the German side the *other* half, so no sentence
has its translation on the other side. Each side is mean-centred and L2-normalised.

* ``identity``: no map (what the shared encoder gives for free);
* ``refine from identity``: mutual-neighbour Procrustes refinement (CSLS) started at ``W = I``
  (Conneau et al. 2018), possible only because both sides share an encoder;
* ``GW + WP + refine``: no use of the shared encoder at all: an entropic Gromov-Wasserstein
  coupling of ``--gw`` random sentences per side (intra-space similarities only) gives a first
  Procrustes map, refined by Wasserstein-Procrustes on ``--wp`` sentences per side (Grave et
  al. 2019) and mutual-neighbour Procrustes on the whole halves;
* ``supervised Procrustes``: the upper bound, Procrustes on all 29 000 training translation
  pairs.

Reported: translation retrieval on the 1 000 pairs of ``test_2016_flickr`` (English -> German,
precision at 1 and 10, cosine and CSLS), i.e. lexicon induction at the sentence level.

Prints a table, writes ``benchmarks/results/unaligned.json`` (merged by section) and rewrites
the section of ``docs/unaligned.md``.

    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/unaligned.py --only translation
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
import unaligned_emoji
import unaligned_plots
import unaligned_runs as runs_mod
from docsection import write_section
from losses import cpu_name
from unaligned_common import centred, embed, log, retrieval

from modalign.alignment import (
    gromov_wasserstein,
    mutual_neighbours,
    orthogonal_procrustes,
    refine_procrustes,
    wasserstein_procrustes,
)
from modalign.data.base import resolve_data_root
from modalign.encoders.stitch import MiniLMText

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "unaligned.json"
DOC = ROOT / "docs" / "unaligned.md"


def read_lines(root: Path, split: str, lang: str) -> list[str]:
    """Sentences of Multi30k task 1 ``split`` in ``lang``."""
    path = root / "multi30k" / "data" / "task1" / "raw" / f"{split}.{lang}.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def translation(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The fully unpaired Multi30k section."""
    root = resolve_data_root(os.environ.get("MODALIGN_DATA"))
    en, de = read_lines(root, "train", "en"), read_lines(root, "train", "de")
    test_en, test_de = read_lines(root, "test_2016_flickr", "en"), read_lines(root, "test_2016_flickr", "de")
    torch.manual_seed(0)
    encoder = MiniLMText().eval()
    start = time.perf_counter()
    cache = Path(args.cache) if args.cache else None
    cached = cache is not None and cache.is_file()
    if cache is not None and cached:
        e_en, e_de, t_en, t_de = torch.load(cache)
        log(f"embeddings read from {cache}")
    else:
        log(f"embedding {len(en) + len(de) + len(test_en) + len(test_de)} sentences")
        e_en, e_de = embed(encoder, en), embed(encoder, de)
        t_en, t_de = embed(encoder, test_en), embed(encoder, test_de)
        if cache is not None:
            torch.save((e_en, e_de, t_en, t_de), cache)
    embed_s = time.perf_counter() - start
    x_all, y_all = centred(e_en).double(), centred(e_de).double()
    tx, ty = centred(t_en).double(), centred(t_de).double()
    order = torch.randperm(len(en), generator=torch.Generator().manual_seed(args.seed))
    half_a, half_b = order[: len(en) // 2], order[len(en) // 2 :]
    x, y = x_all[half_a], y_all[half_b]  # English of one half, German of the other: no translation pairs
    g = torch.Generator().manual_seed(args.seed + 1)
    rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}

    def report(name: str, w: Tensor, seconds: float) -> None:
        log(name)
        rows.append(
            {"method": name, "seconds": seconds, "cosine": retrieval(tx, ty, w, None), "csls": retrieval(tx, ty, w, 10)}
        )

    eye = torch.eye(x.shape[1], dtype=torch.float64)
    report("identity (no map)", eye, 0.0)
    t0 = time.perf_counter()
    refined = refine_procrustes(x, y, eye, iterations=args.refine)
    report("refine from identity", refined.w, time.perf_counter() - t0)
    t0 = time.perf_counter()
    sx = torch.randperm(len(x), generator=g)[: args.gw]
    sy = torch.randperm(len(y), generator=g)[: args.gw]
    log(f"Gromov-Wasserstein on {args.gw} + {args.gw} sentences")
    plan = gromov_wasserstein(x[sx], y[sy], iterations=args.gw_iterations, sinkhorn_iterations=args.gw_sinkhorn)
    timings["gw_s"] = time.perf_counter() - t0
    w0 = orthogonal_procrustes(x[sx], len(sx) * plan @ y[sy])
    report("GW only", w0, time.perf_counter() - t0)
    wx = torch.randperm(len(x), generator=g)[: args.wp]
    wy = torch.randperm(len(y), generator=g)[: args.wp]
    w1 = wasserstein_procrustes(x[wx], y[wy], w0, iterations=args.wp_iterations, epsilon=args.wp_epsilon)
    report("GW + Wasserstein-Procrustes", w1, time.perf_counter() - t0)
    full = refine_procrustes(x, y, w1, iterations=args.refine)
    report("GW + WP + refine (unsupervised)", full.w, time.perf_counter() - t0)
    t0 = time.perf_counter()
    report("supervised Procrustes (29k pairs)", orthogonal_procrustes(x_all, y_all), time.perf_counter() - t0)
    pairs_found = mutual_neighbours(x @ full.w, y, 10)[0].numel()
    lines = [
        f"English half: {len(x)} sentences; German half: {len(y)} other sentences; test: {len(tx)} translation "
        f"pairs (test_2016_flickr). Embedding all {len(en) + len(de) + len(tx) + len(ty)} sentences: {embed_s:.0f} s"
        f"{' (read from --cache)' if cached else ''}. "
        f"GW on {args.gw} + {args.gw} sentences: {timings['gw_s']:.0f} s; mutual neighbours found at the end: "
        f"{pairs_found}.",
        "",
        "| map (English -> German) | P@1 cosine | P@10 cosine | P@1 CSLS | P@10 CSLS | seconds |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {r['method']} | {r['cosine']['p@1']:.3f} | {r['cosine']['p@10']:.3f} | {r['csls']['p@1']:.3f} | "
            f"{r['csls']['p@10']:.3f} | {r['seconds']:.0f} |"
            for r in rows
        ],
    ]
    return lines, {"rows": rows, "embed_s": embed_s, "gw_s": timings["gw_s"], "args": vars(args)}


SECTIONS = ("translation", "lexicon", "pairing", "noise", "offsets", "plans")
SWEEPS = ("pairing", "noise", "offsets")
HEADINGS = {
    "translation": "Fully unpaired: Multi30k English vs German",
    "lexicon": "Fully unpaired: emoji English vs German labels (lexicon induction)",
    "pairing": "Mix-paired: paired fraction sweep",
    "pairing_stitched": "Mix-paired with stitched towers (frozen pretrained encoders): 100% and 1% pairs",
    "noise": "Noisy pairs: pair noise sweep",
    "noise_stitched": "Noisy pairs with stitched towers (frozen pretrained encoders)",
    "offsets": "Fine-grained: basicmotions with temporal offsets",
    "plans": "Fine-grained: OT plans between emoji label words and image regions",
}


def sweep_rows(args: argparse.Namespace) -> list[runs_mod.Row]:
    """The rows of the ``pairing``, ``noise`` or ``offsets`` sweep (``--rows`` filters by key)."""
    if args.only == "offsets":
        rows = runs_mod.offset_rows()
    elif args.only == "pairing":
        rows = runs_mod.pairing_rows(args.datasets)
    else:
        rows = runs_mod.noise_rows(args.datasets)
    return [r for r in rows if not args.rows or any(row_matches(r.key, part) for part in args.rows)]


def row_matches(key: str, part: str) -> bool:
    """``--rows`` filter: ``part`` occurs in the row key, or equals it when ``part`` ends with ``$``."""
    return key == part[:-1] if part.endswith("$") else part in key


def section_name(args: argparse.Namespace) -> str:
    """The doc section / results key: ``pairing_stitched``/``noise_stitched`` for the stitched recipes' sweeps.

    Raises:
        SystemExit: If one call mixes stitched and from-scratch datasets, or a stitched one outside
            ``pairing`` and ``noise``.
    """
    stitched = [d for d in args.datasets if d in runs_mod.STITCHED]
    if not stitched:
        return str(args.only)
    if args.only not in ("pairing", "noise") or len(stitched) != len(args.datasets):
        raise SystemExit(f"{', '.join(stitched)}: only in --only pairing or noise, without the other datasets")
    return f"{args.only}_stitched"


def sweep(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """A training sweep: adopt or run the missing rows, then the tables and curves."""
    rows = sweep_rows(args)
    if args.adopt:
        runs_mod.adopt(rows, [Path(d) for d in args.adopt], RESULTS, log)
    elif not args.table:
        runs_mod.run_rows(rows, Path(args.runs), RESULTS, args.jobs, args.rerun, log, args.threads)
    store = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.only == "offsets":
        return runs_mod.offsets_table(store)
    table = runs_mod.pairing_table if args.only == "pairing" else runs_mod.noise_table
    plot = unaligned_plots.plot_pairing if args.only == "pairing" else unaligned_plots.plot_noise
    # The figure belongs to the doc: without it (--no-doc) it is not rewritten (a sweep of one
    # dataset would otherwise replace the figure of all of them).
    png = DOC.parent / "img" / f"unaligned_{section_name(args)}.png"
    if not args.no_doc:
        plot(args.datasets, store, png)
    lines: list[str] = [runs_mod.__doc__.split("\n\n")[-1].replace("\n", " "), ""]
    verdicts: dict[str, Any] = {}
    for dataset in args.datasets:
        body, verdicts[dataset] = table(dataset, store)
        lines += [f"**{dataset}** (`{runs_mod.DATASETS[dataset]['recipe']}`)", "", *body, ""]
    lines.append(f"![{args.only} sweep]({png.relative_to(DOC.parent)})")
    return lines, {"verdicts": verdicts}


def run_section(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The Markdown lines and JSON result of section ``args.only``."""
    if args.only == "translation":
        return translation(args)
    if args.only in SWEEPS:
        return sweep(args)
    return unaligned_emoji.lexicon(args) if args.only == "lexicon" else unaligned_emoji.plans(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=SECTIONS, default="translation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gw", type=int, default=1000, help="Sentences per side of the Gromov-Wasserstein start.")
    parser.add_argument("--gw-iterations", type=int, default=10, help="Mirror-descent steps per epsilon.")
    parser.add_argument("--gw-sinkhorn", type=int, default=100, help="Sinkhorn iterations per mirror-descent step.")
    parser.add_argument("--wp", type=int, default=4000, help="Sentences per side of Wasserstein-Procrustes.")
    parser.add_argument("--wp-iterations", type=int, default=5)
    parser.add_argument("--wp-epsilon", type=float, default=0.05)
    parser.add_argument("--refine", type=int, default=10, help="Mutual-neighbour Procrustes iterations.")
    parser.add_argument("--cache", help="File keeping the sentence embeddings between runs (written if absent).")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=list(runs_mod.SWEPT),
        choices=[*runs_mod.SWEPT, *runs_mod.STITCHED],
        help="Sweeps: datasets (the stitched recipes take part in the pairing and noise sweeps).",
    )
    parser.add_argument(
        "--rows", nargs="*", help="Sweeps: only rows whose key contains one of these (or equals one ending in $)."
    )
    parser.add_argument("--jobs", type=int, default=1, help="Sweeps: training runs at a time.")
    parser.add_argument("--threads", type=int, help="Sweeps: threads per run (default: cores / jobs).")
    parser.add_argument("--runs", default="/tmp/modalign-unaligned", help="Sweeps: where the run directories go.")
    parser.add_argument("--rerun", action="store_true", help="Sweeps: run rows again even if stored.")
    parser.add_argument("--table", action="store_true", help="Sweeps: only rewrite the tables from stored rows.")
    parser.add_argument("--adopt", nargs="+", help="Sweeps: store these finished run dirs under their rows.")
    parser.add_argument("--no-doc", action="store_true")
    unaligned_emoji.add_arguments(parser)
    args = parser.parse_args()
    section_name(args)  # refuse a stitched dataset outside the pairing and noise sweeps before running anything
    load = os.getloadavg()[0]
    lines, result = run_section(args)
    machine = (
        f"Machine: {cpu_name()}, {os.cpu_count()} core(s), torch {torch.__version__}; load average {load:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after."
    )
    print("\n".join([machine, "", *lines]))
    runs_mod.update_results(RESULTS, lambda store: store.__setitem__(section_name(args), result))
    if not args.no_doc:
        command = f"MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/unaligned.py --only {args.only}"
        if args.only in ("pairing", "noise"):
            command += f" --datasets {' '.join(args.datasets)} [--jobs N] [--rows KEY ...] [--table]"
        elif args.only == "offsets":
            command += " [--jobs N] [--rows KEY ...] [--table]"
        name = section_name(args)
        write_section(DOC, f"unaligned_{name}", command, machine, lines, HEADINGS[name], script="unaligned")


if __name__ == "__main__":
    main()
