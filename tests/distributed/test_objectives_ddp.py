"""Distributed equals single process for VICReg, Barlow Twins, DCL and MoCo's queue loss on 2 gloo ranks.

Each rank holds a slice of one global batch and calls the loss with ``gather=True``. DDP
averages gradients over ranks, so the mean of the per-rank losses must equal the single-process
loss on the full batch, and the per-rank input gradients, concatenated and divided by the world
size, the single-process input gradients. VICReg and Barlow Twins read batch statistics, which
must therefore be global; DCL reads negatives from every rank. Modelled on
``tests/distributed/test_gather_ddp.py`` (gloo on loopback, one port for all ranks).
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
from modalign.objectives.decoupled import dcl_loss
from modalign.objectives.momentum import queue_infonce_loss
from modalign.objectives.noncontrastive import barlow_twins_loss, vicreg_loss
from support.ddp import init_gloo, spawn_ranks

WORLD = 2
N = 8
KINDS = ("vicreg", "barlow", "dcl", "dcl_b", "moco")
# (rows on rank 0, rows on rank 1): equal, uneven and one empty rank
SPLITS = [(4, 4), (3, 5), (0, 8)]
IDS = torch.tensor([0, 1, 2, 5, 4, 5, 6, 1])  # ids 1 and 5 repeat across the rank boundary
IDS_B = torch.tensor([3, 9, 2, 8, 9, 7, 0, 4])  # "dcl_b": separate b-side ids, 9 repeats across ranks
TINY = (0, 1)  # a global batch of one row: no batch statistics

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available() or sys.platform in ("win32", "cygwin"),
        reason="needs torch.distributed with the gloo backend",
    ),
]


def global_batch() -> tuple[Tensor, Tensor, Tensor]:
    """Raw ``a, b [N, 5]`` whose column stds straddle 1 (VICReg's hinge partly active), and a scale."""
    g = torch.Generator().manual_seed(0)
    col_scale = torch.linspace(0.3, 1.8, 5, dtype=torch.float64)
    a = torch.randn(N, 5, generator=g, dtype=torch.float64) * col_scale + 0.5
    b = a + 0.6 * torch.randn(N, 5, generator=g, dtype=torch.float64)
    return a, b, torch.tensor(1.2, dtype=torch.float64)


def run_loss(kind: str, rows: slice, gather: bool) -> dict[str, Tensor]:
    """Loss (VICReg: and its terms) and gradients wrt a, b (dcl: and the scale) for one slice."""
    a0, b0, scale0 = global_batch()
    scale = scale0.clone().requires_grad_()
    a, b = a0[rows].clone().requires_grad_(), b0[rows].clone().requires_grad_()
    out: dict[str, Tensor] = {}
    if kind == "vicreg":
        terms = vicreg_loss(a, b, gather=gather)
        loss = terms.loss
        out.update(invariance=terms.invariance.detach(), variance=terms.variance.detach())
        out["covariance"] = terms.covariance.detach()
    elif kind == "barlow":
        loss = barlow_twins_loss(a, b, lambd=0.05, gather=gather)
    elif kind == "moco":  # both directions, keys from the other side, a fixed queue with ids
        qa, qb = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        queue = F.normalize(torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=-1)
        queue_ids = torch.tensor([1, -1, 6, 3])
        ab = queue_infonce_loss(qa, qb, queue, scale, IDS[rows], queue_ids, gather)
        loss = ab + queue_infonce_loss(qb, qa, queue, scale, IDS[rows], queue_ids, gather)
    else:
        ids_b = IDS_B[rows] if kind == "dcl_b" else None
        loss = dcl_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1), scale, IDS[rows], gather, ids_b)
    loss.backward()
    out.update(loss=loss.detach(), a=a.grad, b=b.grad, scale=scale.grad)
    return {k: v if v is not None else torch.zeros(()) for k, v in out.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD)
    try:
        assert mdist.is_initialized() and mdist.world_size() == WORLD
        results: dict[str, dict[str, Tensor]] = {}
        for split in [*SPLITS, TINY]:
            lo = sum(split[:rank])
            sl = slice(lo, lo + split[rank])
            for kind in KINDS:
                results[f"{kind}{split}"] = run_loss(kind, sl, gather=True)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Tensor]]]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp_objectives"), WORLD, timeout_s=60)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", SPLITS, ids=[f"{x}+{y}" for x, y in SPLITS])
def test_gathered_loss_and_gradients_equal_single_process(
    rank_results: list[dict[str, dict[str, Tensor]]], kind: str, split: tuple[int, int]
) -> None:
    single = run_loss(kind, slice(0, N), gather=False)
    per_rank = [r[f"{kind}{split}"] for r in rank_results]
    scalars = ["loss", "invariance", "variance", "covariance"] if kind == "vicreg" else ["loss"]
    for key in scalars:
        mean = sum(r[key] for r in per_rank) / WORLD
        torch.testing.assert_close(mean, single[key], atol=1e-10, rtol=1e-10)
    for key in ("a", "b"):
        grads = [r[key] for r, n in zip(per_rank, split, strict=True) if n > 0]
        torch.testing.assert_close(torch.cat(grads) / WORLD, single[key], atol=1e-10, rtol=1e-10)
        assert single[key].abs().sum() > 0
    if kind.startswith("dcl") or kind == "moco":
        scale_grad = sum(r["scale"] for r in per_rank) / WORLD
        torch.testing.assert_close(scale_grad, single["scale"], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_gathered_loss_differs_from_local_loss(rank_results: list[dict[str, dict[str, Tensor]]], kind: str) -> None:
    """Guard against a gather that silently stays local: the local half-batch loss is different."""
    local = run_loss(kind, slice(0, 4), gather=False)["loss"]
    assert abs(float(local) - float(rank_results[0][f"{kind}(4, 4)"]["loss"])) > 1e-3


@pytest.mark.parametrize("kind", ["vicreg", "barlow"])
def test_statistics_losses_are_the_same_global_value_on_every_rank(
    rank_results: list[dict[str, dict[str, Tensor]]], kind: str
) -> None:
    for split in SPLITS:
        r0, r1 = (r[f"{kind}{split}"]["loss"] for r in rank_results)
        torch.testing.assert_close(r0, r1, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "moco"])  # moco: the queue holds negatives
def test_global_batch_of_one_row_gives_connected_zero(
    rank_results: list[dict[str, dict[str, Tensor]]], kind: str
) -> None:
    """VICReg/Barlow: no statistics over one row -> 0; DCL: the single row has no negative -> 0."""
    for rank, res in enumerate(rank_results):
        out = res[f"{kind}{TINY}"]
        assert out["loss"].item() == 0.0
        for key in ("a", "b"):
            assert out[key].shape == (TINY[rank], 5) and torch.equal(out[key], torch.zeros_like(out[key]))
    if kind.startswith("dcl"):  # single process agrees
        assert run_loss(kind, slice(0, 1), gather=False)["loss"].item() == 0.0


def test_b_side_ids_change_the_dcl_loss() -> None:
    """Guard for "dcl_b": its b-side ids remove negatives, so it differs from plain "dcl"."""
    plain, with_b = (run_loss(kind, slice(0, N), gather=False)["loss"] for kind in ("dcl", "dcl_b"))
    assert float(with_b) < float(plain) - 1e-3
