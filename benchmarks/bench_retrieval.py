"""Benchmark: chunked retrieval keeps memory ~ chunk x gallery, not gallery^2.

Each configuration runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its
own. Prints a table and writes benchmarks/results/retrieval.json.

    .venv/bin/python benchmarks/bench_retrieval.py [--sizes 5000 20000] [--chunks 256 1024 0]

chunk 0 means "one chunk holding every query" (the full N x N similarity matrix).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from modalign.eval import class_match_metrics, retrieval_metrics


def _child(n: int, chunk: int, dim: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    a = torch.nn.functional.normalize(torch.randn(n, dim), dim=-1)
    b = torch.nn.functional.normalize(a + 0.5 * torch.randn(n, dim), dim=-1)
    labels = torch.randint(0, 10, (n,))
    size = chunk or n
    start = time.perf_counter()
    r = retrieval_metrics(a, b, chunk_size=size)
    c = class_match_metrics(a, b, labels, labels, chunk_size=size)
    seconds = time.perf_counter() - start
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {
        "n": n,
        "chunk": size,
        "seconds": seconds,
        "peak_rss_increase_mib": peak_mib,
        "R@1": r["R@1"],
        "p@1": c["p@1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024, 0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "retrieval.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.dim)))
        return
    rows = []
    for n in args.sizes:
        for chunk in args.chunks:
            cmd = [sys.executable, __file__, "--child", str(n), str(chunk), "--dim", str(args.dim)]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    print(f"{'gallery':>8} {'chunk':>8} {'seconds':>8} {'peak MiB':>9} {'R@1':>6} {'p@1':>6}")
    for r in rows:
        print(
            f"{r['n']:>8} {r['chunk']:>8} {r['seconds']:>8.2f} {r['peak_rss_increase_mib']:>9.0f}"
            f" {r['R@1']:>6.3f} {r['p@1']:>6.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
