"""Benchmark: modalign's InfoNCE and sigmoid losses against open_clip's, forward + backward.

For each (B, D) it times ``loss(a, b, ...).backward()`` for open_clip's ``ClipLoss`` /
``SigLipLoss``, modalign's plain path (``chunk_size=0``: full ``B x B`` logits) and its default
path (``chunk_size=None``: streamed in blocks above ``PLAIN_MAX_ROWS`` rows), all in this one
process, on one thread unless ``--threads`` says otherwise. Repetitions are interleaved
(every implementation once per round) so that load from other processes hits them alike; the
table gives the median. Prints a table, writes ``benchmarks/results/losses.json`` and rewrites
the "Losses" section of ``docs/scaling.md``.

    .venv/bin/python benchmarks/losses.py                       # the three default sizes
    .venv/bin/python benchmarks/losses.py --sizes 1024x512 --reps 3 --no-doc
    python benchmarks/losses.py --device cuda --sizes 4096x256 65536x256 --chunks 4096

With ``--device cuda`` the inputs live on the GPU, each timed call is bracketed by
``torch.cuda.synchronize()``, peak memory is ``torch.cuda.max_memory_allocated()`` during the
call minus the memory held before it (after ``reset_peak_memory_stats``), an implementation
that runs out of GPU memory is reported as ``OOM``, the figures go to
``benchmarks/results/losses_cuda.json`` and ``docs/scaling.md`` is left alone (``--no-doc``).
``--chunks N ...`` also times the streamed path with blocks of ``N`` rows.

Peak memory is the peak of the bytes held by tensors allocated during one forward + backward
(inputs excluded, the returned gradients included), replayed from ``torch.profiler``'s
allocation and free events (``profile_memory=True``) in a separate, untimed call. It counts
tensor memory only, independent of the allocator's caching, which ``ru_maxrss`` would mix in.

open_clip is a benchmark-only tool, never a dependency of modalign:
``pip install --no-deps open-clip-torch`` (``--no-deps``, or pip replaces the CPU build of
torch). Its ``loss.py`` needs only torch, and is loaded from the installed package's folder
without running ``open_clip/__init__.py``, which imports torchvision: PyPI's
``torchvision==0.28.0`` is a CUDA build whose operators fail to load next to the CPU torch
(``RuntimeError: operator torchvision::nms does not exist``), so it is better left uninstalled.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from modalign.objectives import infonce_loss, sigmoid_loss
from modalign.objectives.streamed import resolve_chunk

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "losses.json"
RESULTS_CUDA = ROOT / "benchmarks" / "results" / "losses_cuda.json"
DOC = ROOT / "docs" / "scaling.md"
BEGIN, END = "<!-- losses:begin -->", "<!-- losses:end -->"
IMPLS = ("open_clip", "plain", "default")


def load_open_clip_loss() -> ModuleType:
    """open_clip's ``loss`` module, loaded without importing the ``open_clip`` package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip is not installed: pip install --no-deps open-clip-torch")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    loss_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    assert loss_spec is not None and loss_spec.loader is not None
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


class Inputs:
    """Leaf tensors of one configuration: ``a, b [B, D]`` L2-normalised, a log scale and a bias."""

    def __init__(self, loss: str, batch: int, dim: int, device: str = "cpu") -> None:
        g = torch.Generator().manual_seed(0)
        a = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
        b = F.normalize(a + 0.7 * torch.randn(batch, dim, generator=g), dim=-1)
        self.a, self.b = a.to(device).requires_grad_(), b.to(device).requires_grad_()
        scale = math.log(1 / 0.07) if loss == "infonce" else math.log(10.0)
        self.scale = torch.tensor(scale, device=device, requires_grad=True)
        self.bias = torch.tensor(-10.0, device=device, requires_grad=True)

    def leaves(self, loss: str) -> list[Tensor]:
        """The tensors whose gradients are compared."""
        return [self.a, self.b, self.scale] + ([self.bias] if loss == "sigmoid" else [])

    def clear(self) -> None:
        """Drop the gradients of the previous call."""
        for t in (self.a, self.b, self.scale, self.bias):
            t.grad = None


def step_fn(loss: str, impl: str, x: Inputs, oc: ModuleType) -> Callable[[], Tensor]:
    """A closure running forward + backward of one implementation; returns the loss."""

    def run() -> Tensor:
        if impl == "open_clip" and loss == "infonce":
            value = oc.ClipLoss()(x.a, x.b, x.scale.exp())
        elif impl == "open_clip":
            value = oc.SigLipLoss()(x.a, x.b, x.scale.exp(), x.bias)
        else:
            chunk = impl_chunk(impl)
            if loss == "infonce":
                value = infonce_loss(x.a, x.b, x.scale, chunk_size=chunk)
            else:
                value = sigmoid_loss(x.a, x.b, x.scale, x.bias, chunk_size=chunk)
        value.backward()
        return value.detach()

    return run


def impl_chunk(impl: str) -> int | None:
    """``chunk_size`` of a modalign implementation: ``plain`` 0, ``default`` None, ``chunkN`` N."""
    return 0 if impl == "plain" else int(impl.removeprefix("chunk")) if impl.startswith("chunk") else None


def peak_cuda_bytes(fn: Callable[[], Tensor]) -> tuple[int, Tensor]:
    """Peak of the GPU memory allocated while ``fn`` runs, minus what was allocated before, and ``fn``'s result."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the previous implementation's cached blocks do not crowd this one
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    value = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, value


def peak_bytes(fn: Callable[[], Tensor], device: str) -> tuple[int, Tensor]:
    """``peak_cuda_bytes`` on a GPU, else ``peak_tensor_bytes``."""
    return peak_cuda_bytes(fn) if device.startswith("cuda") else peak_tensor_bytes(fn)


def timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds ``fn`` takes; on a GPU the queued work is waited for before and after."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_tensor_bytes(fn: Callable[[], Tensor]) -> tuple[int, Tensor]:
    """Peak of the bytes held by tensors allocated while ``fn`` runs, and ``fn``'s result.

    Replays the allocation and free events that ``torch.profiler`` records with
    ``profile_memory=True`` in time order; tensors that existed before the call count as zero.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak, value


def measure(
    loss: str, batch: int, dim: int, reps: int, impls: tuple[str, ...], oc: ModuleType, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Time, peak memory and agreement with open_clip of each implementation on one (B, D).

    On a GPU an implementation that runs out of memory in its first call is left out of the
    timed rounds and reported as ``OOM``.
    """
    x = Inputs(loss, batch, dim, device)
    fns = {impl: step_fn(loss, impl, x, oc) for impl in impls}
    results: dict[str, dict[str, Any]] = {}
    for impl, fn in list(fns.items()):  # warm-up: peak memory, value and gradients
        x.clear()
        try:
            peak, value = peak_bytes(fn, device)
        except torch.cuda.OutOfMemoryError:
            peak = -1  # released below, once the exception's frames are gone
        if peak < 0:
            x.clear()
            torch.cuda.empty_cache()
            del fns[impl]
            continue
        grads = [t.grad.clone() for t in x.leaves(loss) if t.grad is not None]
        results[impl] = {"value": value, "grads": grads, "peak_mib": peak / 2**20, "times": []}
    for _ in range(reps):
        for impl, fn in fns.items():
            x.clear()
            results[impl]["times"].append(timed(fn, device))
    x.clear()
    return [
        row(loss, batch, dim, impl, results) if impl in results else oom_row(loss, batch, dim, impl) for impl in impls
    ]


def oom_row(loss: str, batch: int, dim: int, impl: str) -> dict[str, Any]:
    """Row of an implementation that ran out of GPU memory."""
    return {"loss": loss, "B": batch, "D": dim, "impl": impl_name(impl, batch), "path": impl, "oom": True}


def impl_name(impl: str, batch: int) -> str:
    """Table name of an implementation; the default path names the block size it resolves to."""
    if impl in ("open_clip", "plain"):
        return impl
    chunk = resolve_chunk(impl_chunk(impl), batch)
    return f"streamed/{chunk}" if chunk else "default (plain)"


def rel_diff(x: Tensor, ref: Tensor) -> float:
    """``max |x - ref| / max |ref|``."""
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def row(loss: str, batch: int, dim: int, impl: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One table row: figures of ``impl`` and, when open_clip ran, the ratios and differences."""
    r = results[impl]
    out: dict[str, Any] = {
        "loss": loss,
        "B": batch,
        "D": dim,
        "impl": impl_name(impl, batch),
        "path": impl,
        "median_s": statistics.median(r["times"]),
        "times_s": r["times"],
        "peak_mib": r["peak_mib"],
        "value": float(r["value"]),
    }
    ref = results.get("open_clip")
    if ref is not None:
        out["time_ratio"] = out["median_s"] / statistics.median(ref["times"])
        out["mem_ratio"] = r["peak_mib"] / ref["peak_mib"]
        out["loss_rel_diff"] = rel_diff(r["value"], ref["value"])
        out["grad_rel_diff"] = max(rel_diff(g, h) for g, h in zip(r["grads"], ref["grads"], strict=True))
    return out


def table(rows: list[dict[str, Any]], digits: int = 3) -> list[str]:
    """Markdown table of the rows; ``digits`` decimals of the seconds."""
    lines = [
        "| loss | B | D | implementation | median s | peak MiB | time / open_clip | memory / open_clip"
        " | loss rel. diff | grad rel. diff |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("oom"):
            lines.append("| " + " | ".join([r["loss"], str(r["B"]), str(r["D"]), r["impl"], "OOM", *["-"] * 5]) + " |")
            continue
        ratios = [f"{r[k]:.2f}x" if k in r else "-" for k in ("time_ratio", "mem_ratio")]
        diffs = [f"{r[k]:.1e}" if k in r else "-" for k in ("loss_rel_diff", "grad_rel_diff")]
        cells = [r["loss"], str(r["B"]), str(r["D"]), r["impl"], f"{r['median_s']:.{digits}f}", f"{r['peak_mib']:.1f}"]
        lines.append("| " + " | ".join(cells + ratios + diffs) + " |")
    return lines


def growth(rows: list[dict[str, Any]]) -> list[str]:
    """Peak-memory growth of each modalign path from the smallest to the largest B at equal D."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["impl"] != "open_clip" and not r.get("oom"):
            groups.setdefault((r["loss"], r["path"], r["D"]), []).append(r)
    lines = []
    for (loss, _, dim), rs in groups.items():
        if len(rs) > 1:
            lo, hi = min(rs, key=lambda r: r["B"]), max(rs, key=lambda r: r["B"])
            lines.append(
                f"- {loss}, {hi['impl']}: peak memory x{hi['peak_mib'] / lo['peak_mib']:.2f}"
                f" from B={lo['B']} to B={hi['B']} (D={dim})"
            )
    return lines


BARS = {  # loss: (time ratio, memory ratio) at B = 4096, issue 8's acceptance bar
    "infonce": (0.75, 0.15),
    "sigmoid": (0.75, 0.10),
}


def bars(rows: list[dict[str, Any]]) -> list[str]:
    """The acceptance bar of the default path, checked on the rows that were measured."""
    mine = {(r["loss"], r["B"]): r for r in rows if r.get("path") == "default" and "time_ratio" in r}
    mine = {k: r for k, r in mine.items() if r["impl"] != "open_clip"}
    lines = []
    for (loss, batch), r in sorted(mine.items()):
        if batch == 4096:
            t, m = BARS[loss]
            ok = r["time_ratio"] <= t and r["mem_ratio"] <= m
            lines.append(
                f"- {loss}, B=4096: time {r['time_ratio']:.2f}x (bar <= {t}x), peak memory"
                f" {r['mem_ratio']:.2f}x (bar <= {m}x): {'met' if ok else 'NOT met'}"
            )
        if batch == 1024:
            ok = r["time_ratio"] <= 1.05
            lines.append(f"- {loss}, B=1024: time {r['time_ratio']:.2f}x (bar <= 1.05x): {'met' if ok else 'NOT met'}")
    for loss in BARS:
        lo, hi = mine.get((loss, 4096)), mine.get((loss, 16384))
        if lo and hi:
            g = hi["peak_mib"] / lo["peak_mib"]
            lines.append(
                f"- {loss}, B=4096 -> 16384: peak memory x{g:.2f} (bar <= 4.5x): {'met' if g <= 4.5 else 'NOT met'}"
            )
    return lines


def cpu_name() -> str:
    """The processor's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine(threads: int, load: tuple[float, float, float], device: str = "cpu") -> dict[str, Any]:
    """Where the figures were measured (with the GPU's name and CUDA version on a GPU)."""
    meta = {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "load_avg_before": load,
        "load_avg_after": os.getloadavg(),
    }
    if device.startswith("cuda"):
        meta |= {"device": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
        meta["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return meta


def write_doc(rows: list[dict[str, Any]], meta: dict[str, Any], command: str) -> None:
    """Rewrite the "Losses" section (between the markers) of ``docs/scaling.md``."""
    load = ", ".join(f"{v:.1f}" for v in meta["load_avg_before"])
    load_after = ", ".join(f"{v:.1f}" for v in meta["load_avg_after"])
    section = [
        BEGIN,
        "",
        "Written by `benchmarks/losses.py` (do not edit by hand); raw figures in `benchmarks/results/losses.json`.",
        "",
        f"    {command}",
        "",
        f"Machine: {meta['processor']}, {meta['cpus']} shared cores, {meta['threads']} thread(s), torch"
        f" {meta['torch']}, {meta['platform']}; load average (1, 5, 15 min) {load} before, {load_after} after.",
        "",
        *table(rows),
        "",
        *growth(rows),
        "",
        "Acceptance bar (issue 8), default path against open_clip:",
        "",
        *bars(rows),
        END,
    ]
    text = DOC.read_text() if DOC.exists() else "# Scaling\n\n## Losses\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN not in text:
        text = text.rstrip("\n") + "\n\n## Losses\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = text.split(BEGIN, 1)
    DOC.write_text(head + "\n".join(section) + rest.split(END, 1)[1])


def parse_size(text: str) -> tuple[int, int]:
    """``"4096x256"`` -> ``(4096, 256)``."""
    batch, dim = text.lower().split("x")
    return int(batch), int(dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1024x512", "4096x256", "16384x256"], help="BxD")
    parser.add_argument("--losses", nargs="+", default=["infonce", "sigmoid"], choices=["infonce", "sigmoid"])
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (each implementation once per round)")
    parser.add_argument("--big-reps", type=int, default=3, help="timed rounds for B >= 16384")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--chunks", nargs="*", type=int, default=[], help="also the streamed path in blocks of N")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: --no-doc, results in losses_cuda.json)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default by device)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/scaling.md")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    out = args.out or (RESULTS_CUDA if cuda else RESULTS)
    torch.set_num_threads(args.threads)
    oc = load_open_clip_loss()
    load = os.getloadavg()
    impls = tuple(args.impls) + tuple(f"chunk{n}" for n in args.chunks)
    digits = 5 if cuda else 3
    rows: list[dict[str, Any]] = []
    for batch, dim in map(parse_size, args.sizes):
        for loss in args.losses:
            reps = args.big_reps if batch >= 16384 else args.reps
            rows += measure(loss, batch, dim, reps, impls, oc, args.device)
            print("\n".join(table(rows[-len(impls) :], digits)[2:]), flush=True)
    print("\n".join([*table(rows, digits), "", *growth(rows), "", *bars(rows)]))
    meta = machine(args.threads, load, args.device)
    print(f"load average before {meta['load_avg_before']}, after {meta['load_avg_after']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    if not (args.no_doc or cuda):  # the doc's section holds the CPU figures
        write_doc(rows, meta, " ".join(["OMP_NUM_THREADS=1 .venv/bin/python benchmarks/losses.py", *sys.argv[1:]]))
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
