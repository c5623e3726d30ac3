"""Benchmark: every registered fusion module at one budget, on av-digits and basicmotions.

Each row trains a base recipe (``av-digits-gmc``, ``basicmotions-gmc``: the CLIP towers plus a
fusion module trained by GMC) with ``model.fusion`` swapped for one module, in a fresh
subprocess, exactly as ``modalign train RECIPE model.fusion={...} --run-dir DIR`` does. Every
module gets the same width (``dim``) and, where it has them, the same depth and heads. The
figures come from the run's ``eval.json`` (``eval.robustness`` is on in both recipes):

* linear-probe accuracy of the fused representation with both modalities, with each one
  missing (``missing:<m>/fused/linear_probe``) and with noise on each (``noise:<m>/...``,
  Gaussian noise of one standard deviation: 0 dB);
* the towers' own probes for reference (a fusion module should not need both modalities to
  beat the better tower by much, and should degrade gracefully without one);
* training seconds (whole run), fusion parameters (module + its head), peak memory.

Results merge into ``benchmarks/results/fusion.json``; the table is rewritten between the
markers of ``docs/fusion.md``.

    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/fusion.py                 # every row
    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/fusion.py --only early concat
    MODALIGN_DATA=../shared/data .venv/bin/python benchmarks/fusion.py --table         # doc only

Chance: av-digits probes 0.10 (ten digits), basicmotions 0.25 (four activities).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fusion.json"
DOC = ROOT / "docs" / "fusion.md"
START, END = "<!-- fusion-bench:start -->", "<!-- fusion-bench:end -->"
#: Base recipes and their modalities (in eval.json key order) and chance level.
DATASETS: dict[str, tuple[tuple[str, str], float]] = {
    "av-digits-gmc": (("audio", "image"), 0.10),
    "basicmotions-gmc": (("accel", "gyro"), 0.25),
}
#: The shared budget: every module's width, and depth/heads where it has them.
BUDGET = {"dim": 64, "depth": 1, "heads": 4}


def fusion_names() -> list[str]:
    """Every registered fusion module with a joint representation (all but ``none``)."""
    from modalign.core.registry import available

    return [n for n in available("fusion") if n != "none"]


def fusion_entry(name: str) -> dict[str, Any]:
    """``model.fusion`` for ``name`` at the shared budget (only the arguments it takes)."""
    from modalign.core.registry import lookup

    params = inspect.signature(lookup("fusion", name)).parameters
    return {"name": name, **{k: v for k, v in BUDGET.items() if k in params}}


def overrides(name: str) -> list[str]:
    """The command-line overrides of a row."""
    entry = ", ".join(f"{k}: {v}" for k, v in fusion_entry(name).items())
    # checkpoints only every 25 epochs: basicmotions' epochs are one step, and writing a
    # checkpoint after each would take longer than training it
    controls = ["eval.plots=false", "eval.report=false", "train.track=none", "train.save_every=25"]
    return [f"model.fusion={{{entry}}}", *controls]


def _fusion_params(run_dir: Path) -> tuple[int, int]:
    """``(fusion module + fusion head, whole method)`` parameter counts, read from the last checkpoint."""
    from safetensors import safe_open

    from modalign.train.checkpoint import WEIGHTS, latest_checkpoint

    folder = latest_checkpoint(run_dir / "checkpoints")
    if folder is None:
        raise SystemExit(f"{run_dir} has no checkpoint to count parameters from")
    fusion = total = 0
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            count = math.prod(f.get_slice(key).get_shape())
            total += count
            if key.startswith(("model.fusion.", "model.fusion_head.")):
                fusion += count
    return fusion, total


def _child(recipe: str, name: str, run_dir: Path) -> dict[str, Any]:
    """Train one row in this process; the figures of the run."""
    from modalign.train.recipe import load_recipe
    from modalign.train.run import train_run

    start = time.perf_counter()
    metrics = train_run(load_recipe(recipe, overrides(name)), run_dir, resume=False)
    seconds = time.perf_counter() - start
    fusion_params, total_params = _fusion_params(run_dir)
    return {
        "metrics": metrics,
        "seconds": seconds,
        "fusion_params": fusion_params,
        "total_params": total_params,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_avg_5min": os.getloadavg()[1],
    }


def _run_row(recipe: str, name: str, runs: Path) -> dict[str, Any]:
    run_dir = runs / f"{recipe}-{name}"
    cmd = [sys.executable, __file__, "--child", recipe, name, "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {done.returncode}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    quoted = " ".join(f"'{o}'" if " " in o else o for o in overrides(name))
    result["command"] = f"modalign train {recipe} {quoted} --run-dir {run_dir}"
    result["machine"] = f"{platform.machine()}, {platform.python_version()}"
    return result


def _fmt(value: float | None, chance: float) -> str:
    if value is None:
        return "—"
    text = f"{value:.3f}"
    return f"**{text}**" if value <= chance else text


def table(results: dict[str, Any]) -> str:
    """The markdown tables (one per dataset) of ``results``."""
    out = []
    for recipe, (mods, chance) in DATASETS.items():
        a, b = mods
        out += [
            f"### {recipe.removesuffix('-gmc')} (chance {chance:.2f})",
            "",
            f"| fusion | fused probe | fused, {a} missing | fused, {b} missing | fused, noise on {a} "
            f"| fused, noise on {b} | {a} probe | {b} probe | train s | fusion params | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        rows = {k.removeprefix(f"{recipe}/"): v for k, v in results.items() if k.startswith(f"{recipe}/")}
        for name in sorted(rows):
            r = rows[name]
            if "error" in r:
                out.append(f"| {name} | error: {r['error']} |" + " |" * 10)
                continue
            m = r["metrics"]
            cells = [
                m.get("fused/linear_probe"),
                m.get(f"missing:{a}/fused/linear_probe"),
                m.get(f"missing:{b}/fused/linear_probe"),
                m.get(f"noise:{a}/fused/linear_probe"),
                m.get(f"noise:{b}/fused/linear_probe"),
                m.get(f"{a}/linear_probe"),
                m.get(f"{b}/linear_probe"),
            ]
            shown = " | ".join(_fmt(c, chance) for c in cells)
            out.append(f"| {name} | {shown} | {r['seconds']:.0f} | {r['fusion_params']:,} | {r['peak_mib']:.0f} |")
        out.append("")
    out.append("Commands (load average over 5 minutes at the end of each run):")
    out.append("")
    for key in sorted(results):
        r = results[key]
        if "command" in r:
            out.append(f"- `{r['command']}` ({r['seconds']:.0f} s, {r['machine']}, load {r['load_avg_5min']:.1f})")
    return "\n".join(out)


def write_doc(results: dict[str, Any]) -> None:
    """Replace the text between the markers of ``docs/fusion.md`` with the tables."""
    text = DOC.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the markers {START} / {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{table(results)}\n{END}{tail}")


def main() -> None:
    """Run the rows asked for (or every row), merge the JSON, rewrite the doc, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="Fusion modules to run (default: every registered one).")
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), help="Base recipes to run.")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench-fusion"), help="Folder of the run directories.")
    parser.add_argument("--table", action="store_true", help="Only rewrite docs/fusion.md from the JSON.")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], Path(args.run_dir))))
        return
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.table:
        for recipe in args.datasets:
            for name in args.only or fusion_names():
                print(f"{recipe} / {name} ...", file=sys.stderr, flush=True)
                results[f"{recipe}/{name}"] = _run_row(recipe, name, Path(args.runs))
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    write_doc(results)
    print(table(results))


if __name__ == "__main__":
    main()
