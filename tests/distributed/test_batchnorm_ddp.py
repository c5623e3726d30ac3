"""``GlobalBatchNorm`` on 2 CPU gloo ranks equals ``BatchNorm`` in one process on the global batch.

Output rows, input gradients, the affine parameters' gradients (summed over ranks, as the
per-rank losses are summed) and the running statistics after a step, for 1-D and 2-D inputs
split evenly, unevenly and with one rank empty.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from modalign.train.distributed import GlobalBatchNorm, global_batch_norm
from support.ddp import init_gloo, spawn_ranks

WORLD = 2
N = 8
SPLITS = [(4, 4), (3, 5), (0, 8)]
SHAPES = {"bn1d": (N, 4, 6), "bn2d": (N, 3, 4, 4), "bn1d_flat": (N, 5)}

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available() or sys.platform in ("win32", "cygwin"),
        reason="needs torch.distributed with the gloo backend",
    ),
]


def make(kind: str) -> nn.Module:
    """A seeded BatchNorm with non-trivial affine parameters, inside a container."""
    torch.manual_seed(0)
    channels = SHAPES[kind][1]
    norm = nn.BatchNorm2d(channels) if kind == "bn2d" else nn.BatchNorm1d(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(norm).double()


def run(kind: str, rows: slice, sync: bool) -> dict[str, Tensor]:
    """One training-mode forward and backward on ``rows`` of the global batch."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(*SHAPES[kind], generator=g, dtype=torch.float64) * 2 + 0.7
    w = torch.randn(*SHAPES[kind], generator=g, dtype=torch.float64)
    model = make(kind)
    if sync:
        assert global_batch_norm(model) == 1 and isinstance(model[0], GlobalBatchNorm)
    x = x0[rows].clone().requires_grad_()
    y = model(x)
    (y * w[rows]).sum().backward()
    norm = model[0]
    return {
        "y": y.detach(),
        "x": x.grad if x.grad is not None else torch.zeros(0),
        "weight": norm.weight.grad,
        "bias": norm.bias.grad,
        "running_mean": norm.running_mean.clone(),
        "running_var": norm.running_var.clone(),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD)
    try:
        results = {}
        for split in SPLITS:
            lo = sum(split[:rank])
            for kind in SHAPES:
                results[f"{kind}{split}"] = run(kind, slice(lo, lo + split[rank]), sync=True)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Tensor]]]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp_batchnorm"), WORLD, timeout_s=60)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("kind", list(SHAPES))
def test_global_batch_norm_equals_one_process(
    rank_results: list[dict[str, dict[str, Tensor]]], kind: str, split: tuple[int, int]
) -> None:
    single = run(kind, slice(0, N), sync=False)
    ranks = [r[f"{kind}{split}"] for r in rank_results]
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), single["y"], rtol=1e-9, atol=1e-9)
    grads = [r["x"] for r in ranks if r["x"].numel()]
    torch.testing.assert_close(torch.cat(grads), single["x"], rtol=1e-9, atol=1e-9)
    for name in ("weight", "bias"):
        torch.testing.assert_close(sum(r[name] for r in ranks), single[name], rtol=1e-9, atol=1e-9)
    for r in ranks:
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(r[name], single[name], rtol=1e-9, atol=1e-9)


def test_outside_a_process_group_it_is_plain_batch_norm() -> None:
    plain = run("bn2d", slice(0, N), sync=False)
    synced = run("bn2d", slice(0, N), sync=True)
    for name, value in plain.items():
        torch.testing.assert_close(synced[name], value)
