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
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from docsection import write_section
from losses import cpu_name

from modalign.alignment import (
    gromov_wasserstein,
    mutual_neighbours,
    orthogonal_procrustes,
    refine_procrustes,
    wasserstein_procrustes,
)
from modalign.core.types import ModalitySpec, Sample
from modalign.data.base import resolve_data_root
from modalign.data.collate import collate
from modalign.encoders.stitch import MiniLMText

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "unaligned.json"
DOC = ROOT / "docs" / "unaligned.md"


def read_lines(root: Path, split: str, lang: str) -> list[str]:
    """Sentences of Multi30k task 1 ``split`` in ``lang``."""
    path = root / "multi30k" / "data" / "task1" / "raw" / f"{split}.{lang}.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


@torch.no_grad()
def embed(encoder: MiniLMText, texts: list[str], batch: int = 256) -> Tensor:
    """MiniLM sentence embeddings ``[N, 384]``, through modalign's ``text_minilm`` wrapper."""
    spec = {"text": ModalitySpec("text", vocab_size=30522)}
    out = []
    for start in range(0, len(texts), batch):
        samples = [
            Sample(id=i, values={"text": encoder.preprocess(t)}) for i, t in enumerate(texts[start : start + batch])
        ]
        b = collate(samples, spec)
        out.append(encoder.encode_live(b.data["text"], b.padding["text"]).pooled)
    return torch.cat(out)


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def centred(x: Tensor) -> Tensor:
    """Mean-centred, then L2-normalised rows (the usual preprocessing of embedding alignment)."""
    return F.normalize(x - x.mean(dim=0), dim=1)


def retrieval(src: Tensor, tgt: Tensor, w: Tensor, csls_k: int | None) -> dict[str, float]:
    """P@1 and P@10 of translating row ``i`` of ``src @ w`` to row ``i`` of ``tgt`` (cosine or CSLS)."""
    a, b = F.normalize(src @ w, dim=1), F.normalize(tgt, dim=1)
    scores = a @ b.T
    if csls_k is not None:
        ra = scores.topk(csls_k, dim=1).values.mean(1)
        rb = scores.T.topk(csls_k, dim=1).values.mean(1)
        scores = 2 * scores - ra[:, None] - rb[None, :]
    top = scores.topk(10, dim=1).indices
    truth = torch.arange(len(src))[:, None]
    return {
        "p@1": float((top[:, :1] == truth).any(1).float().mean()),
        "p@10": float((top == truth).any(1).float().mean()),
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["translation"], default="translation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gw", type=int, default=1000, help="Sentences per side of the Gromov-Wasserstein start.")
    parser.add_argument("--gw-iterations", type=int, default=10, help="Mirror-descent steps per epsilon.")
    parser.add_argument("--gw-sinkhorn", type=int, default=100, help="Sinkhorn iterations per mirror-descent step.")
    parser.add_argument("--wp", type=int, default=4000, help="Sentences per side of Wasserstein-Procrustes.")
    parser.add_argument("--wp-iterations", type=int, default=5)
    parser.add_argument("--wp-epsilon", type=float, default=0.05)
    parser.add_argument("--refine", type=int, default=10, help="Mutual-neighbour Procrustes iterations.")
    parser.add_argument("--cache", help="File keeping the sentence embeddings between runs (written if absent).")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    lines, result = translation(args)
    machine = (
        f"Machine: {cpu_name()}, {os.cpu_count()} core(s), torch {torch.__version__}; load average {load:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after."
    )
    print("\n".join([machine, "", *lines]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged[args.only] = result
    RESULTS.write_text(json.dumps(merged, indent=1) + "\n")
    if not args.no_doc:
        command = f"MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/unaligned.py --only {args.only}"
        heading = "Fully unpaired: Multi30k English vs German"
        write_section(DOC, f"unaligned_{args.only}", command, machine, lines, heading, script="unaligned")


if __name__ == "__main__":
    main()
