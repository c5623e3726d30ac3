"""Distributed equals single process: gathered losses on a 2-rank CPU gloo group.

Each rank holds a slice of one global batch and calls the loss with ``gather=True``. DDP
averages gradients over ranks, so the mean of the per-rank losses and the per-rank input
gradients averaged over ranks (i.e. concatenated and divided by the world size; the logit
scale/bias gradients all-reduced and divided) must equal the single-process loss and gradients
on the full batch. Style of lightly's ``tests/ddp_helpers.py`` (gloo, one port for all ranks).
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
N = 8
# (rows on rank 0, rows on rank 1): equal, uneven and one empty rank
SPLITS = [(4, 4), (3, 5), (0, 8)]
IDS = torch.tensor([0, 1, 2, 5, 4, 5, 6, 1])  # ids 1 and 5 repeat across the rank boundary
IDS_B = torch.tensor([9, 8, 7, 6, 9, 4, 3, 2])  # rows 0 and 4 share their b content
KINDS = ("infonce", "sigmoid", "multi_positive")

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available() or sys.platform in ("win32", "cygwin"),
        reason="needs torch.distributed with the gloo backend",
    ),
]


def global_batch() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(N, 5, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(N, 5, generator=g, dtype=torch.float64), dim=-1)
    return a, b, torch.tensor(1.2, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)


def run_loss(kind: str, a: Tensor, b: Tensor, ids: Tensor, ids_b: Tensor, gather: bool) -> dict[str, Tensor]:
    """Loss and gradients wrt a, b, scale (and bias) for one slice."""
    _, _, scale0, bias0 = global_batch()
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    scale, bias = scale0.clone().requires_grad_(), bias0.clone().requires_grad_()
    if kind == "infonce":
        loss = infonce_loss(a, b, scale, ids=ids, gather=gather)
    elif kind == "multi_positive":
        loss = infonce_loss(a, b, scale, ids=ids, gather=gather, ids_b=ids_b, multi_positive=True)
    else:
        loss = sigmoid_loss(a, b, scale, bias, ids=ids, gather=gather)
    loss.backward()
    out = {"loss": loss.detach(), "a": a.grad, "b": b.grad, "scale": scale.grad}
    if kind == "sigmoid":
        out["bias"] = bias.grad
    return {k: v if v is not None else torch.zeros(()) for k, v in out.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD)
    try:
        assert mdist.is_initialized() and mdist.rank() == rank and mdist.world_size() == WORLD
        a, b, _, _ = global_batch()
        results: dict[str, object] = {}
        for split in SPLITS:
            lo = sum(split[:rank])
            sl = slice(lo, lo + split[rank])
            for kind in KINDS:
                results[f"{kind}{split}"] = run_loss(kind, a[sl], b[sl], IDS[sl], IDS_B[sl], gather=True)
        x = torch.full((rank + 1, 2), float(rank), requires_grad=True)
        gathered = mdist.all_gather_with_grad(x)
        (gathered * torch.arange(1.0, 4.0)[:, None]).sum().backward()
        results["gather"] = {
            "value": gathered.detach(),
            "grad": x.grad,
            "no_grad": mdist.all_gather_no_grad(x),
            "sizes": mdist.all_gather_sizes(rank + 1),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Tensor]]]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp"), WORLD, timeout_s=60)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", SPLITS, ids=[f"{x}+{y}" for x, y in SPLITS])
def test_gathered_loss_and_gradients_equal_single_process(
    rank_results: list[dict[str, dict[str, Tensor]]], kind: str, split: tuple[int, int]
) -> None:
    a, b, _, _ = global_batch()
    single = run_loss(kind, a, b, IDS, IDS_B, gather=False)
    per_rank = [r[f"{kind}{split}"] for r in rank_results]
    loss = sum(r["loss"] for r in per_rank) / WORLD
    torch.testing.assert_close(loss, single["loss"], atol=1e-6, rtol=0)
    for key in ("a", "b"):
        grads = [r[key] for r, n in zip(per_rank, split, strict=True) if n > 0]
        torch.testing.assert_close(torch.cat(grads) / WORLD, single[key], atol=1e-6, rtol=0)
    for key in ("scale", "bias") if kind == "sigmoid" else ("scale",):
        torch.testing.assert_close(sum(r[key] for r in per_rank) / WORLD, single[key], atol=1e-6, rtol=0)


def test_gathered_loss_differs_from_local_loss(rank_results: list[dict[str, dict[str, Tensor]]]) -> None:
    """Guard against a gather that silently stays local: the local half-batch loss is different."""
    a, b, _, _ = global_batch()
    local = run_loss("infonce", a[:4], b[:4], IDS[:4], IDS_B[:4], gather=False)["loss"]
    assert abs(float(local) - float(rank_results[0]["infonce(4, 4)"]["loss"])) > 1e-3


def test_all_gather_with_grad_concatenates_and_routes_gradients(
    rank_results: list[dict[str, dict[str, Tensor]]],
) -> None:
    want = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for rank, res in enumerate(rank_results):
        g = res["gather"]
        assert torch.equal(g["value"], want) and torch.equal(g["no_grad"], want)
        assert g["sizes"] == [1, 2]
        # both ranks' losses weight row k by (k + 1): summed over 2 ranks -> 2 (k + 1)
        rows = torch.arange(1.0, 4.0)[[0] if rank == 0 else [1, 2]]
        torch.testing.assert_close(g["grad"], 2 * rows[:, None].expand(-1, 2))
