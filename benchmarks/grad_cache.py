"""Benchmark: gradient caching (``train.grad_cache``) on av-digits CLIP at an effective batch of 4096.

Two measurements per setting (``grad_cache`` off, and chunks of ``C`` rows):

* **step**: one training step (forward, loss, backward; no optimiser) on the same batch of
  ``B`` training samples in this process: median wall time over ``--reps`` interleaved rounds,
  peak tensor memory (bytes held by tensors allocated during the step, replayed from
  ``torch.profiler``'s allocation events, as in ``benchmarks/losses.py``), and the relative
  difference of the parameter gradients from the plain step's. The image tower's batch norm
  normalises each chunk by its own statistics, so the gradients differ slightly (a tower
  without batch-dependent layers gives equal gradients: ``tests/train/test_grad_cache.py``).
* **run**: a fresh process trains the recipe one epoch through ``Trainer.fit`` (one step of
  ``B`` rows: av-digits has 5 000 training pairs) and reports its peak resident memory
  (``ru_maxrss``), and its growth over the resident memory just before training (what the
  step adds to the dataset and the model).

Prints a table, writes ``benchmarks/results/grad_cache.json`` and rewrites the "Gradient
caching" section of ``docs/scaling.md``.

    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/grad_cache.py
    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/grad_cache.py --batch 1024 --chunks 256 --no-doc
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from docsection import write_section
from losses import cpu_name, peak_tensor_bytes

from modalign.data.collate import collate
from modalign.methods import Method
from modalign.train.build import build_dataset, build_method
from modalign.train.grad_cache import grad_cache_backward
from modalign.train.loop import Trainer
from modalign.train.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "grad_cache.json"
DOC = ROOT / "docs" / "scaling.md"
RECIPE = "av-digits-clip"


def recipe_for(batch: int, chunk: int) -> Recipe:
    overrides = [f"train.batch_size={batch}", "train.epochs=1", "train.warmup_steps=0", "train.threads=null"]
    if chunk:
        overrides.append(f"train.grad_cache={chunk}")
    return load_recipe(RECIPE, overrides)


def step(method: Method, batch: Any, chunk: int) -> torch.Tensor:
    """One forward + loss + backward; the loss (gradients left in ``.grad``)."""
    method.zero_grad(set_to_none=True)
    if chunk:
        return grad_cache_backward(method, batch, chunk).loss.detach()
    out = method.loss(method(batch), batch)
    out.loss.backward()
    return out.loss.detach()


def flat_grad(method: Method) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in method.parameters() if p.grad is not None])


def eval_mode_grad_diff(method: Method, batch: Any, chunks: list[int]) -> dict[int, float]:
    """Relative gradient difference from the plain step with batch norm on running statistics.

    In eval mode no layer depends on the batch, so caching must give the plain gradients.
    """
    method.eval()
    step(method, batch, 0)
    ref = flat_grad(method)
    out = {}
    for c in chunks:
        step(method, batch, c)
        out[c] = float((flat_grad(method) - ref).norm() / ref.norm())
    method.train()
    return out


def measure_steps(batch_size: int, chunks: list[int], reps: int) -> list[dict[str, Any]]:
    recipe = recipe_for(batch_size, 0)
    dataset = build_dataset(recipe, "train")
    torch.manual_seed(0)
    method = build_method(recipe, dataset.modalities)
    method.train()
    batch = collate([dataset[i] for i in range(batch_size)], dataset.modalities)
    settings = [0, *chunks]
    times: dict[int, list[float]] = {c: [] for c in settings}
    for _ in range(reps):
        for c in settings:
            torch.manual_seed(1)
            start = time.perf_counter()
            step(method, batch, c)
            times[c].append(time.perf_counter() - start)
    exact = eval_mode_grad_diff(method, batch, chunks)
    rows = []
    ref: torch.Tensor | None = None
    for c in settings:
        torch.manual_seed(1)
        peak, loss = peak_tensor_bytes(lambda c=c: step(method, batch, c))
        grad = flat_grad(method)
        ref = grad if ref is None else ref
        rows.append(
            {
                "grad_cache": c,
                "median_s": statistics.median(times[c]),
                "peak_tensor_mib": peak / 2**20,
                "loss": float(loss),
                "grad_rel_diff": float((grad - ref).norm() / ref.norm()),
                "grad_rel_diff_eval_mode": exact.get(c, 0.0),
            }
        )
    return rows


def current_rss_mib() -> float:
    """Resident memory of this process now (``/proc/self/statm``), in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler(threading.Thread):
    """Samples this process's resident memory every ``interval`` seconds; ``peak`` is the largest."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = current_rss_mib()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, current_rss_mib())
            time.sleep(self.interval)


def child(batch_size: int, chunk: int) -> None:
    """Train one epoch in this process; print its resident memory before and during ``fit`` as JSON."""
    recipe = recipe_for(batch_size, chunk)
    dataset = build_dataset(recipe, "train")
    torch.manual_seed(recipe.train.seed)
    method = build_method(recipe, dataset.modalities)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(method, dataset, recipe.train, Path(run_dir), torch.device("cpu"))
        before = current_rss_mib()
        sampler = RssSampler()
        sampler.start()
        start = time.perf_counter()
        trainer.fit(resume=False)
        seconds = time.perf_counter() - start
        sampler.done.set()
        sampler.join()
    print(json.dumps({"rss_before_mib": before, "rss_peak_mib": sampler.peak, "fit_s": seconds}))


def measure_runs(batch_size: int, chunks: list[int]) -> list[dict[str, Any]]:
    rows = []
    for c in [0, *chunks]:
        cmd = [sys.executable, __file__, "--child", str(c), "--batch", str(batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
        rows.append({"grad_cache": c, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def table(steps: list[dict[str, Any]], runs: list[dict[str, Any]], batch_size: int) -> list[str]:
    base_step = steps[0]
    base_run = runs[0]
    lines = [
        "| grad_cache (rows per chunk) | step s | step peak tensor MiB | vs off | grad rel. diff (train / eval mode) "
        "| RSS in fit: peak MiB | vs off | RSS growth in fit MiB | vs off |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, r in zip(steps, runs, strict=True):
        growth = r["rss_peak_mib"] - r["rss_before_mib"]
        base_growth = base_run["rss_peak_mib"] - base_run["rss_before_mib"]
        lines.append(
            f"| {s['grad_cache'] or 'off'} | {s['median_s']:.2f} | {s['peak_tensor_mib']:.0f} | "
            f"{s['peak_tensor_mib'] / base_step['peak_tensor_mib']:.3f}x | "
            f"{s['grad_rel_diff']:.1e} / {s['grad_rel_diff_eval_mode']:.1e} | "
            f"{r['rss_peak_mib']:.0f} | {r['rss_peak_mib'] / base_run['rss_peak_mib']:.3f}x | "
            f"{growth:.0f} | {growth / base_growth:.3f}x |"
        )
    return lines


def write_doc(lines: list[str], meta: dict[str, Any], command: str) -> None:
    machine = (
        f"Machine: {meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}; load average "
        f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after. Recipe `{RECIPE}` at "
        f"`train.batch_size={meta['batch']}`."
    )
    write_section(DOC, "grad_cache", command, machine, lines, "Gradient caching")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096, help="Effective batch B.")
    parser.add_argument("--chunks", type=int, nargs="*", default=[256, 1024], help="grad_cache settings.")
    parser.add_argument("--reps", type=int, default=2, help="Timed rounds per setting.")
    parser.add_argument("--no-doc", action="store_true", help="Do not rewrite docs/scaling.md.")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.batch, args.child)
        return
    load_before = os.getloadavg()
    steps = measure_steps(args.batch, args.chunks, args.reps)
    runs = measure_runs(args.batch, args.chunks)
    meta = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "batch": args.batch,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    lines = table(steps, runs, args.batch)
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "steps": steps, "runs": runs}, indent=2) + "\n")
    if not args.no_doc:
        chunks = " ".join(str(c) for c in args.chunks)
        command = f"MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/grad_cache.py --batch {args.batch}"
        write_doc(lines, meta, f"{command} --chunks {chunks}")


if __name__ == "__main__":
    main()
