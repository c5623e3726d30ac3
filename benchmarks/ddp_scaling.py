"""Benchmark: how a data-parallel CLIP step grows with the global batch and the world size.

For each world size ``W`` (CPU ``gloo`` ranks on the loopback interface, one thread each) and
global batch ``B``, every rank trains ``B / W`` rows of a two-tower CLIP model (``vector_mlp``
towers on synthetic vectors, so data loading does not count) through the trainer's own pieces:
``enable_gather`` (the InfoNCE gallery gathered with gradient), ``wrap_ddp`` (DDP over the
whole step) and AdamW. Measured on rank 0:

* median step time over ``--steps`` steps (after one warm-up step);
* peak tensor memory of one step (bytes held by tensors allocated during it, from
  ``torch.profiler``'s allocation events, as in ``benchmarks/losses.py``);
* bytes this rank hands to collectives in one step: every ``torch.distributed`` call (the
  objective's gathers of embeddings and ids, row counts) and DDP's gradient buckets (through a
  communication hook), by kind.

The machine has 2 cores, so ``W = 4`` oversubscribes it: times at ``W = 4`` measure contention,
not speed-up. Memory and bytes are exact whatever the load. Prints a table, writes
``benchmarks/results/ddp_scaling.json`` and rewrites the "Growth with batch and world size"
section of ``docs/scaling.md``.

    .venv/bin/python benchmarks/ddp_scaling.py
    .venv/bin/python benchmarks/ddp_scaling.py --worlds 1 2 --batches 256 --steps 2 --no-doc
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).parent))
from docsection import write_section
from losses import cpu_name, peak_tensor_bytes

from modalign.core import Batch, ModalitySpec
from modalign.train.build import build_method
from modalign.train.distributed import enable_gather, wrap_ddp
from modalign.train.recipe import validate_recipe

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ddp_scaling.json"
DOC = ROOT / "docs" / "scaling.md"
IN_DIM, WIDTH, HIDDEN, EMBED = 256, 256, 512, 128


def recipe() -> dict[str, Any]:
    encoders = {m: {"name": "vector_mlp", "dim": WIDTH, "hidden": HIDDEN} for m in ("x", "y")}
    return {
        "data": {"name": "av-digits"},
        "model": {"embed_dim": EMBED, "encoders": encoders, "head": {"name": "linear"}},
        "method": {"name": "clip"},
    }


def local_batch(rank: int, rows: int) -> Batch:
    g = torch.Generator().manual_seed(rank)
    return Batch(
        data={m: torch.randn(rows, IN_DIM, generator=g) for m in ("x", "y")},
        present={m: torch.ones(rows, dtype=torch.bool) for m in ("x", "y")},
        ids=torch.arange(rank * rows, (rank + 1) * rows),
    )


class Recorder:
    """Bytes this rank hands to collectives, by kind (patched ``torch.distributed`` + DDP hook)."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = defaultdict(int)
        self.on = False

    def add(self, kind: str, tensors: list[Tensor]) -> None:
        if self.on:
            self.sent[kind] += sum(t.numel() * t.element_size() for t in tensors)

    def wrap(self, name: str, picks: Callable[..., list[Tensor]]) -> None:
        fn = getattr(dist, name)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.add(name, picks(*args, **kwargs))
            return fn(*args, **kwargs)

        setattr(dist, name, recorded)

    def install(self) -> None:
        self.wrap("all_reduce", lambda t, *a, **k: [t])
        self.wrap("all_gather", lambda out, t, *a, **k: [t])
        self.wrap("all_gather_into_tensor", lambda out, t, *a, **k: [t])
        self.wrap("reduce_scatter", lambda out, ins, *a, **k: list(ins))
        self.wrap("broadcast", lambda t, *a, **k: [t])
        self.wrap("all_to_all", lambda out, ins, *a, **k: list(ins))
        # gloo has no reduce-scatter: the all-gather's backward scatters each rank's share
        self.wrap("scatter", lambda t, scatter_list=None, *a, **k: [x for x in scatter_list or [] if x is not t])

    def hook(self) -> Callable[..., Any]:
        def ddp_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
            self.add("ddp_gradients", [bucket.buffer()])
            on, self.on = self.on, False  # the hook's own all_reduce is the bucket above
            try:
                return default_hooks.allreduce_hook(state, bucket)
            finally:
                self.on = on

        ddp_hook.__annotations__ = {
            "state": object,
            "bucket": dist.GradBucket,
            "return": torch.futures.Future[Tensor],
        }
        return ddp_hook


def worker(rank: int, world: int, port: int, batches: list[int], steps: int, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
        )
    recorder = Recorder()
    if world > 1:
        recorder.install()
    specs = {m: ModalitySpec("vector", channels=IN_DIM) for m in ("x", "y")}
    rows_out = []
    for global_batch in batches:
        torch.manual_seed(0)
        method = build_method(validate_recipe(recipe()), specs)
        params = sum(p.numel() for p in method.parameters())
        if world > 1:
            enable_gather(method)
            module: Any = wrap_ddp(method, torch.device("cpu"))
            module.register_comm_hook(None, recorder.hook())
        else:
            module = None
        opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
        batch = local_batch(rank, global_batch // world)

        def step(module: Any = module, method: Any = method, opt: Any = opt, batch: Batch = batch) -> Tensor:
            loss = module(batch).loss if module is not None else method.loss(method(batch), batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        step()  # warm-up
        recorder.sent.clear()
        recorder.on = True
        step()
        recorder.on = False
        sent = dict(recorder.sent)
        times = []
        for _ in range(steps):
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        peak, _ = peak_tensor_bytes(step)
        rows_out.append(
            {
                "world": world,
                "batch": global_batch,
                "rows_per_rank": global_batch // world,
                "params": params,
                "median_s": statistics.median(times),
                "peak_tensor_mib": peak / 2**20,
                "sent_bytes": sent,
            }
        )
    if rank == 0:
        Path(out).write_text(json.dumps(rows_out))
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_world(world: int, batches: list[int], steps: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        if world == 1:
            worker(0, 1, 0, batches, steps, out)
        else:
            mp.spawn(worker, args=(world, free_port(), batches, steps, out), nprocs=world, join=True)
        rows: list[dict[str, Any]] = json.loads(Path(out).read_text())
        return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| W | global B | rows/rank | step s (rank 0) | peak tensor MiB (rank 0) | sent per step: gradients | "
        "sent: gathers and counts | sent total |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        grads = r["sent_bytes"].get("ddp_gradients", 0)
        other = sum(v for k, v in r["sent_bytes"].items() if k != "ddp_gradients")
        lines.append(
            f"| {r['world']} | {r['batch']} | {r['rows_per_rank']} | {r['median_s']:.3f} | "
            f"{r['peak_tensor_mib']:.1f} | {grads / 2**20:.2f} MiB | {other / 2**10:.1f} KiB | "
            f"{(grads + other) / 2**20:.2f} MiB |"
        )
    return lines


def write_doc(lines: list[str], meta: dict[str, Any], command: str) -> None:
    machine = (
        f"Machine: {meta['cpu']}, {meta['cpus']} cores, 1 thread per rank, torch {meta['torch']}; load "
        f"average {meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after. Model: two "
        f"`vector_mlp` towers ({IN_DIM} -> {HIDDEN} -> {WIDTH}), linear heads to {EMBED}, `clip`; "
        f"P = {meta['params']:,} parameters."
    )
    write_section(DOC, "ddp_scaling", command, machine, lines, "Growth with batch and world size")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--batches", type=int, nargs="*", default=[256, 1024, 4096])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = [r for w in args.worlds for r in run_world(w, args.batches, args.steps)]
    meta = {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "params": rows[0]["params"],
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    lines = table(rows)
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if not args.no_doc:
        worlds = " ".join(map(str, args.worlds))
        batches = " ".join(map(str, args.batches))
        write_doc(
            lines,
            meta,
            f".venv/bin/python benchmarks/ddp_scaling.py --worlds {worlds} --batches {batches} --steps {args.steps}",
        )


if __name__ == "__main__":
    main()
