"""Benchmark: streaming training data from WebDataset shards against the map-style dataset.

On the av-digits training split (5 000 pairs; image 28 x 28 and a log-mel spectrogram each):

* **build**: ``modalign shards build``'s library call (``write_recipe_shards``): seconds and
  bytes on disk;
* **read**: one epoch of training batches (``--batch`` rows, shuffled) as the trainer draws
  them: the map-style split (decoding and augmenting each sample) through ``make_loader``, and
  the shard stream (``ShardStream`` + ``stream_samples`` + ``stream_batches``), each with 0 and 2
  DataLoader workers: samples/s and seconds to the first batch (median over ``--rounds``
  interleaved rounds);
* **resume**: the stream restarted at the middle of the epoch (``consumed`` = half the rank's
  samples): seconds to its first batch, against the fresh stream's, since a resumed worker
  reads (without decoding) what was consumed.

Prints a table, writes ``benchmarks/results/shards.json`` and rewrites the "Streaming from
shards" section of ``docs/scaling.md``.

    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/shards.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from docsection import write_section
from losses import cpu_name

from modalign.data.shards import ShardStream, StreamEpoch, read_index, stream_batches, stream_samples
from modalign.train.build import build_dataset, make_loader, write_recipe_shards
from modalign.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "shards.json"
DOC = ROOT / "docs" / "scaling.md"
RECIPE = "av-digits-clip"


def timed_epoch(batches: Iterable[Any], rows: int) -> tuple[float, float]:
    """``(samples/s over the epoch, seconds to the first batch)``."""
    start = time.perf_counter()
    first = None
    count = 0
    for batch in batches:
        if first is None:
            first = time.perf_counter() - start
        count += batch.size
    total = time.perf_counter() - start
    assert count == rows, (count, rows)
    return count / total, float(first or 0.0)


def readers(shards: Path, batch: int, seed: int) -> dict[str, Callable[[], tuple[float, float]]]:
    """One epoch's reading per setting, as the trainer does it."""
    recipe = load_recipe(RECIPE, [])
    dataset = build_dataset(recipe, "train")
    stream = ShardStream(read_index(shards), shuffle_buffer=recipe.train.shuffle_buffer)
    steps = len(dataset) // batch
    rows = steps * batch
    out: dict[str, Callable[[], tuple[float, float]]] = {}
    for workers in (0, 2):

        def mapped(workers: int = workers) -> tuple[float, float]:
            loader = make_loader(dataset, batch, True, num_workers=workers, seed=seed, drop_last=True)
            return timed_epoch(loader, rows)

        def streamed(workers: int = workers, consumed: int = 0) -> tuple[float, float]:
            epoch = StreamEpoch(seed=seed, consumed=consumed)
            samples = stream_samples(stream.with_epoch(epoch), workers)
            left = steps - consumed // batch
            return timed_epoch(stream_batches(samples, batch, left, stream.modalities), left * batch)

        out[f"map-style, {workers} workers"] = mapped
        out[f"shards, {workers} workers"] = streamed
        half = (steps // 2) * batch
        out[f"shards resumed at half, {workers} workers"] = lambda w=workers, h=half: streamed(w, h)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-doc", action="store_true", help="Do not rewrite docs/scaling.md.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        start = time.perf_counter()
        index = write_recipe_shards(load_recipe(RECIPE, []), shards, "train", args.shard_size)
        build_s = time.perf_counter() - start
        disk = sum(p.stat().st_size for p in shards.glob("*.tar"))
        fns = readers(shards, args.batch, seed=0)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                runs[name].append(fn())
    rows = [
        {
            "setting": name,
            "samples_per_s": statistics.median(r[0] for r in rs),
            "first_batch_s": statistics.median(r[1] for r in rs),
        }
        for name, rs in runs.items()
    ]
    machine = (
        f"Machine: {cpu_name()}, {os.cpu_count()} core(s), torch {torch.__version__}, one intra-op thread; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after. av-digits train split "
        f"({index.count} samples), batch {args.batch}, median of {args.rounds} interleaved rounds."
    )
    lines = [
        f"Build: {len(index.shards)} shards of {args.shard_size} samples, {disk / 2**20:.1f} MiB, {build_s:.1f} s.",
        "",
        "| reading one epoch | samples/s | first batch s |",
        "|---|---:|---:|",
        *[f"| {r['setting']} | {r['samples_per_s']:.0f} | {r['first_batch_s']:.2f} |" for r in rows],
    ]
    print("\n".join([machine, "", *lines]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__},
        "batch": args.batch,
        "shard_size": args.shard_size,
        "samples": index.count,
        "build_s": build_s,
        "disk_bytes": disk,
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_doc:
        command = "MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/shards.py"
        write_section(DOC, "shards", command, machine, lines, "Streaming from shards")


if __name__ == "__main__":
    main()
