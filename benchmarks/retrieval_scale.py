"""Benchmark: retrieval and class-match memory stays flat in the gallery size (blocked evaluation).

For each N, queries = gallery = N embeddings of 256 dimensions (query i's positive is gallery
i; ten classes for p@1/mAP). Each (N, metric) runs in a fresh subprocess that reads its own
resident-memory high-water mark (``VmHWM`` of ``/proc/self/status``) after importing torch and
modalign (the baseline) and after the metric; the table shows the increase, the part of it that
is the two input matrices, and the time. Inputs are generated in chunks so that generating them
adds no temporaries of size N x 256.

    .venv/bin/python benchmarks/retrieval_scale.py [--sizes 10000 30000 100000]
        [--class-match-sizes 10000 30000] [--out benchmarks/results/retrieval_scale.json]

``retrieval`` is ``retrieval_metrics`` (R@1/5/10, median and mean rank); ``class_match`` is
``class_match_metrics`` (pessimistic p@1 and exact mAP), which costs ``O(log R)`` more per
score than retrieval (a binary search among the R relevant scores of each query).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

DIM = 256
MIB = 1024 * 1024


def _hwm_mib() -> float:
    """Resident-memory high-water mark of this process (``VmHWM``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(n: int, metric: str) -> dict[str, object]:
    import torch

    from modalign.eval import class_match_metrics, retrieval_metrics

    base = _hwm_mib()
    gen = torch.Generator().manual_seed(0)
    query, gallery = torch.empty(n, DIM), torch.empty(n, DIM)
    for start in range(0, n, 4096):  # chunked, so no N x DIM temporaries
        a = torch.randn(min(4096, n - start), DIM, generator=gen)
        query[start : start + len(a)] = a
        gallery[start : start + len(a)] = a + 0.5 * torch.randn(a.shape, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    inputs_mib = (query.nbytes + gallery.nbytes + labels.nbytes) / MIB
    start = time.perf_counter()
    if metric == "retrieval":
        values = retrieval_metrics(query, gallery)
    else:
        values = class_match_metrics(query, gallery, labels, labels)
    seconds = time.perf_counter() - start
    peak = _hwm_mib()
    return {
        "n": n,
        "metric": metric,
        "seconds": seconds,
        "baseline_mib": base,
        "peak_increase_mib": peak - base,
        "inputs_mib": inputs_mib,
        "working_mib": peak - base - inputs_mib,
        "values": values,
    }


def _run(n: int, metric: str) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", str(n), metric]
    row: dict[str, object] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(
        f"{row['n']:>7} {row['metric']:>12} {row['seconds']:>8.1f} {row['peak_increase_mib']:>10.0f}"
        f" {row['inputs_mib']:>7.0f} {row['working_mib']:>8.0f}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--class-match-sizes", type=int, nargs="*", default=[10_000, 30_000])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "retrieval_scale.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(int(args.child[0]), args.child[1])))
        return
    load_before = os.getloadavg()
    print(f"{'N':>7} {'metric':>12} {'seconds':>8} {'peak MiB':>10} {'inputs':>7} {'working':>8}", flush=True)
    rows = [_run(n, "retrieval") for n in args.sizes]
    rows += [_run(n, "class_match") for n in args.class_match_sizes]
    import torch

    meta = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dim": DIM,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "memory": "VmHWM increase over the baseline after importing torch and modalign",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"load average before {load_before}, after {meta['loadavg_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
