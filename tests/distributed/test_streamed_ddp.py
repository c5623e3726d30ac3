"""Distributed equals single process for the streamed InfoNCE and sigmoid losses on 2 gloo ranks.

Each rank holds a slice of one global batch and calls the streamed loss (blocks of 4 rows,
which straddle the rank boundary in the gathered gallery) with ``gather=True``: its own rows
are queries against every rank's rows, and the gallery's gradients flow back through
``all_gather_with_grad``. The mean of the per-rank losses must equal the plain loss of one
process on the global batch, and the per-rank gradients, concatenated and divided by the world
size, its gradients; the scale's and bias's gradients averaged over ranks likewise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from modalign import distributed as mdist
from modalign.objectives import infonce_loss, sigmoid_loss
from support.ddp import init_gloo, spawn_ranks

WORLD = 2
N = 12
CHUNK = 4
KINDS = ("infonce", "infonce_multi", "infonce_b", "sigmoid", "sigmoid_b")
SPLITS = [(6, 6), (5, 7), (0, 12)]  # equal, uneven, one empty rank
IDS = torch.tensor([0, 1, 2, 3, 11, 5, 6, 1, 8, 3, 10, 11])  # 1, 3 and 11 repeat across the rank boundary
IDS_B = torch.tensor([4, 9, 2, 7, 9, 0, 6, 5, 8, 1, 10, 3])  # 9 repeats across the boundary

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available() or sys.platform in ("win32", "cygwin"),
        reason="needs torch.distributed with the gloo backend",
    ),
]


def run_loss(kind: str, rows: slice, gather: bool, chunk: int) -> dict[str, Tensor]:
    """Loss and gradients wrt a, b, scale and bias of the rows ``rows`` of the global batch."""
    g = torch.Generator().manual_seed(0)
    a0 = F.normalize(torch.randn(N, 5, generator=g, dtype=torch.float64), dim=-1)
    b0 = F.normalize(a0 + 0.7 * torch.randn(N, 5, generator=g, dtype=torch.float64), dim=-1)
    a, b = a0[rows].clone().requires_grad_(), b0[rows].clone().requires_grad_()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    ids, ids_b = IDS[rows], IDS_B[rows] if kind.endswith("_b") else None
    if kind.startswith("infonce"):
        multi = kind == "infonce_multi"
        loss = infonce_loss(a, b, scale, ids, gather, ids_b, multi, chunk_size=chunk)
    else:
        loss = sigmoid_loss(a, b, scale, bias, ids, gather, ids_b, chunk_size=chunk)
    loss.backward()
    grads = {"a": a.grad, "b": b.grad, "scale": scale.grad, "bias": bias.grad}
    out = {k: v if v is not None else torch.zeros(()) for k, v in grads.items()}
    return {"loss": loss.detach(), **out}


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD)
    try:
        assert mdist.is_initialized() and mdist.world_size() == WORLD
        results: dict[str, dict[str, Tensor]] = {}
        for split in SPLITS:
            lo = sum(split[:rank])
            for kind in KINDS:
                results[f"{kind}{split}"] = run_loss(kind, slice(lo, lo + split[rank]), True, CHUNK)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Tensor]]]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp_streamed"), WORLD, timeout_s=60)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", SPLITS, ids=[f"{x}+{y}" for x, y in SPLITS])
def test_gathered_streamed_loss_and_gradients_equal_single_process(
    rank_results: list[dict[str, dict[str, Tensor]]], kind: str, split: tuple[int, int]
) -> None:
    single = run_loss(kind, slice(0, N), gather=False, chunk=0)  # the plain N x N path
    per_rank = [r[f"{kind}{split}"] for r in rank_results]
    for key in ("loss", "scale", "bias"):
        torch.testing.assert_close(sum(r[key] for r in per_rank) / WORLD, single[key], atol=1e-10, rtol=1e-10)
    for key in ("a", "b"):
        grads = [r[key] for r, n in zip(per_rank, split, strict=True) if n > 0]
        torch.testing.assert_close(torch.cat(grads) / WORLD, single[key], atol=1e-10, rtol=1e-10)
        assert single[key].abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_gathered_streamed_loss_differs_from_local_loss(
    rank_results: list[dict[str, dict[str, Tensor]]], kind: str
) -> None:
    """Guard against a gather that silently stays local: the local half-batch loss is different."""
    local = run_loss(kind, slice(0, 6), gather=False, chunk=CHUNK)["loss"]
    assert abs(float(local) - float(rank_results[0][f"{kind}(6, 6)"]["loss"])) > 1e-3
