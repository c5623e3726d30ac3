"""Benchmark: one full CLIP training step, modalign against open_clip, same architecture, same process.

The architecture is an open_clip model config (default ``ViT-S-32``: a 12-layer, 384-wide ViT
with 32 px patches at 224 px, and a 12-layer, 384-wide text transformer over 77 tokens). open_clip
builds ``open_clip.model.CLIP`` from the config; modalign builds the same widths, depths, heads,
patch, context length and vocabulary from its own components (``image_vit``,
``text_transformer``, linear heads, ``clip`` method). A step is forward, InfoNCE loss, backward
and an AdamW update on random images ``[B, 3, 224, 224]`` and token ids ``[B, 77]``, in fp32 and
under bf16 autocast. Each library's step uses the optimizer its trainer builds: open_clip's
``train.py`` ``torch.optim.AdamW`` with torch's default implementation (per-parameter loop on
CPU), modalign's ``make_optimizer`` with ``train.fused_adamw: true`` (torch's fused kernel;
off by default in recipes). Rounds are interleaved (every implementation once per round) so load from
other processes hits them alike, and each round starts one implementation later than the last,
so no implementation always runs right after the same one (a step after a checkpointed step
or after the other library's step can differ by ~5% from allocator and cache state); the table
gives the median.

Also measured: activation checkpointing (modalign ``checkpoint: true`` on both towers;
open_clip's ``set_grad_checkpointing``): step time and peak tensor memory (bytes held by tensors
allocated during one step, from ``torch.profiler``'s allocation events, as in
``benchmarks/losses.py``).

Prints a table, writes ``benchmarks/results/train_step.json`` and rewrites the "Training step"
section of ``docs/scaling.md``.

    .venv/bin/python benchmarks/train_step.py                    # ViT-S-32, B = 32, 2 rounds
    .venv/bin/python benchmarks/train_step.py --batch 8 --rounds 1 --no-doc
    python benchmarks/train_step.py --device cuda --batch 256 --rounds 5

With ``--device cuda`` models and data live on the GPU, each timed step is bracketed by
``torch.cuda.synchronize()``, bf16 is ``torch.autocast("cuda", ...)``, the peak memory of a step
is ``torch.cuda.max_memory_allocated()`` during it minus the memory held before it (weights,
optimizer state, inputs), the figures go to ``benchmarks/results/train_step_cuda.json`` and
``docs/scaling.md`` is left alone. On CUDA open_clip's default AdamW is torch's ``foreach``
implementation (multi-tensor kernels), modalign's the fused kernel.

open_clip is a benchmark-only tool (``pip install --no-deps open-clip-torch``). Its model files
are loaded from the installed package without running ``open_clip/__init__.py``; where
torchvision is missing (PyPI's ``torchvision==0.28.0`` is a CUDA build that fails next to the
CPU torch), ``open_clip.utils``' one torchvision import (``FrozenBatchNorm2d``, used only to
freeze ResNet batch norms) is answered by a placeholder class.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from docsection import write_section
from losses import cpu_name, peak_bytes, timed

from modalign.core import Batch, ModalitySpec
from modalign.train.build import build_method
from modalign.train.optim import make_optimizer
from modalign.train.recipe import validate_recipe

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "train_step.json"
RESULTS_CUDA = ROOT / "benchmarks" / "results" / "train_step_cuda.json"
DOC = ROOT / "docs" / "scaling.md"


def load_open_clip() -> tuple[types.ModuleType, types.ModuleType, Path]:
    """``open_clip.model`` and ``open_clip.loss`` (package ``__init__`` not run), and the config folder."""
    import transformers  # noqa: F401  (imported before any placeholder, so it sees the real environment)

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip is not installed: pip install --no-deps open-clip-torch")
    folder = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("open_clip")
    package.__path__ = [str(folder)]
    sys.modules.setdefault("open_clip", package)
    try:
        importlib.import_module("torchvision.ops.misc")
    except Exception:
        vision, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc"))

        class FrozenBatchNorm2d(nn.Module):
            """Placeholder: only ResNet towers use it, and this benchmark builds ViTs."""

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d  # type: ignore[attr-defined]
        vision.ops, ops.misc = ops, misc  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": vision, "torchvision.ops": ops, "torchvision.ops.misc": misc})
    model, loss = importlib.import_module("open_clip.model"), importlib.import_module("open_clip.loss")
    return model, loss, folder / "model_configs"


def modalign_recipe(cfg: dict[str, Any], checkpoint: bool | int) -> tuple[dict[str, Any], dict[str, ModalitySpec]]:
    """The modalign recipe with the open_clip config's architecture, and the modality specs."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    v_heads = v["width"] // v.get("head_width", 64)
    encoders = {
        "image": {
            "name": "image_vit",
            "patch": v["patch_size"],
            "dim": v["width"],
            "depth": v["layers"],
            "heads": v_heads,
            "mlp_ratio": v.get("mlp_ratio", 4.0),
            "pool": "cls",
            "pre_norm": True,  # open_clip's ln_pre
            "checkpoint": checkpoint,
        },
        "text": {
            "name": "text_transformer",
            "dim": t["width"],
            "depth": t["layers"],
            "heads": t["heads"],
            "mlp_ratio": t.get("mlp_ratio", 4.0),
            "max_len": t["context_length"],
            "causal": True,  # open_clip's causal text tower, pooled at the end-of-text token
            "pool": "last",
            "checkpoint": checkpoint,
        },
    }
    recipe = {
        "data": {"name": "av-digits"},
        "model": {"embed_dim": cfg["embed_dim"], "encoders": encoders, "head": {"name": "linear"}},
        "method": {"name": "clip"},
        "train": {"fused_adamw": True},
    }
    specs = {
        "image": ModalitySpec("image", channels=3, size=v["image_size"]),
        "text": ModalitySpec("text", vocab_size=t["vocab_size"]),
    }
    return recipe, specs


def make_steps(
    cfg: dict[str, Any],
    batch: int,
    oc_model: types.ModuleType,
    oc_loss: types.ModuleType,
    open_clip_ckpt: bool,
    device: str = "cpu",
    ckpt_blocks: int | None = None,
) -> tuple[dict[str, Callable[[bool], Tensor]], dict[str, int]]:
    """``{implementation: step(bf16) -> loss}`` and parameter counts; models and data on ``device``."""
    g = torch.Generator().manual_seed(0)
    size, context = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    tokens = torch.randint(1, cfg["text_cfg"]["vocab_size"], (batch, context), generator=g).to(device)
    kind = torch.device(device).type
    steps: dict[str, Callable[[bool], Tensor]] = {}
    params: dict[str, int] = {}

    for name, ckpt in (("open_clip", False), ("open_clip+ckpt", True))[: 2 if open_clip_ckpt else 1]:
        torch.manual_seed(0)
        model = oc_model.CLIP(**cfg).to(device)
        model.set_grad_checkpointing(ckpt)
        model.train()
        loss_fn = oc_loss.ClipLoss()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def oc_step(bf16: bool, model: Any = model, loss_fn: Any = loss_fn, opt: Any = opt) -> Tensor:
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
                image_features, text_features, scale = model(images, tokens)[:3]
                loss = loss_fn(image_features, text_features, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        steps[name] = oc_step
        params[name] = sum(p.numel() for p in model.parameters())

    data = Batch(
        data={"image": images, "text": tokens},
        present={m: torch.ones(batch, dtype=torch.bool) for m in ("image", "text")},
        ids=torch.arange(batch),
        padding={"text": torch.zeros(batch, context, dtype=torch.bool)},
    ).to(device)
    variants: list[tuple[str, bool | int]] = [("modalign", False), ("modalign+ckpt", True)]
    if ckpt_blocks is not None:  # the first ckpt_blocks blocks of each tower recomputed
        variants.append((f"modalign+ckpt:{ckpt_blocks}", ckpt_blocks))
    for name, ckpt in variants:
        recipe, specs = modalign_recipe(cfg, ckpt)
        torch.manual_seed(0)
        validated = validate_recipe(recipe)
        method = build_method(validated, specs).to(device)
        method.train()
        opt = make_optimizer(method, validated.train)  # the trainer's AdamW, with train.fused_adamw

        def ma_step(bf16: bool, method: Any = method, opt: Any = opt) -> Tensor:
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
                loss = method.loss(method(data), data).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        steps[name] = ma_step
        params[name] = sum(p.numel() for p in method.parameters())
    return steps, params


def measure(
    steps: dict[str, Callable[[bool], Tensor]], rounds: int, batch: int, memory: bool, device: str = "cpu"
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for bf16 in (False, True):
        times: dict[str, list[float]] = {name: [] for name in steps}
        for fn in steps.values():  # warm-up
            fn(bf16)
        names = list(steps)
        for r in range(rounds):  # each round starts one implementation later: no fixed predecessor
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(timed(lambda name=name, bf16=bf16: steps[name](bf16), device))
        for name, fn in steps.items():
            peak = peak_bytes(lambda fn=fn, bf16=bf16: fn(bf16), device)[0] if memory else 0
            median = statistics.median(times[name])
            rows.append(
                {
                    "impl": name,
                    "precision": "bf16" if bf16 else "fp32",
                    "median_s": median,
                    "samples_per_s": batch / median,
                    "peak_tensor_mib": peak / 2**20,
                }
            )
    return rows


def table(rows: list[dict[str, Any]], params: dict[str, int]) -> list[str]:
    ref = {(r["impl"], r["precision"]): r for r in rows}
    lines = [
        "| implementation | precision | params (M) | step s | samples/s | vs open_clip | peak tensor MiB | "
        "vs same without ckpt |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = ref[("open_clip", r["precision"])]
        plain = ref[(r["impl"].split("+")[0], r["precision"])]
        ckpt = (
            f"{r['peak_tensor_mib'] / plain['peak_tensor_mib']:.2f}x mem, {r['median_s'] / plain['median_s']:.2f}x time"
            if "+ckpt" in r["impl"]
            else ""
        )
        digits = 2 if r["median_s"] >= 1 else 3  # GPU steps take milliseconds
        lines.append(
            f"| {r['impl']} | {r['precision']} | {params[r['impl']] / 1e6:.1f} | {r['median_s']:.{digits}f} | "
            f"{r['samples_per_s']:.1f} | {r['samples_per_s'] / base['samples_per_s']:.2f}x | "
            f"{r['peak_tensor_mib']:.0f} | {ckpt} |"
        )
    return lines


def write_doc(lines: list[str], meta: dict[str, Any], command: str) -> None:
    machine = (
        f"Machine: {meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}; load average "
        f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after. open_clip config "
        f"`{meta['config']}`, batch {meta['batch']}, median of {meta['rounds']} interleaved rounds."
    )
    write_section(DOC, "train_step", command, machine, lines, "Training step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ViT-S-32", help="open_clip model config name.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--open-clip-ckpt", action="store_true", help="Also open_clip with grad checkpointing.")
    parser.add_argument(
        "--ckpt-blocks", type=int, default=None, help="Also modalign recomputing only the first K blocks per tower."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--no-memory", action="store_true", help="Skip the profiled memory step.")
    parser.add_argument("--no-doc", action="store_true", help="Do not rewrite docs/scaling.md.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: --no-doc, train_step_cuda.json).")
    parser.add_argument("--out", type=Path, default=None, help="Results JSON (default by device).")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    out = args.out or (RESULTS_CUDA if cuda else RESULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    oc_model, oc_loss, configs = load_open_clip()
    cfg = json.loads((configs / f"{args.config}.json").read_text())
    steps, params = make_steps(cfg, args.batch, oc_model, oc_loss, args.open_clip_ckpt, args.device, args.ckpt_blocks)
    rows = measure(steps, args.rounds, args.batch, not args.no_memory, args.device)
    meta: dict[str, Any] = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "config": args.config,
        "batch": args.batch,
        "rounds": args.rounds,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    if cuda:
        meta |= {"device": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
        meta["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    lines = table(rows, params)
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "params": params, "rows": rows}, indent=2) + "\n")
    if not (args.no_doc or cuda):  # the doc's section holds the CPU figures
        write_doc(
            lines,
            meta,
            f".venv/bin/python benchmarks/train_step.py --config {args.config} --batch {args.batch} "
            f"--rounds {args.rounds}" + (f" --ckpt-blocks {args.ckpt_blocks}" if args.ckpt_blocks is not None else ""),
        )


if __name__ == "__main__":
    main()
