"""Distributed equals single process for the solvers and the swapped prediction loss (2-rank gloo).

Each rank holds a slice of one global batch (equal, uneven, one empty rank) and calls with
``gather=True``:

* ``balanced_assignments``: the codes of the ranks, concatenated, equal the single-process
  codes of the global batch (the equipartition is global);
* ``swapped_prediction_loss``: the mean of the per-rank losses equals the global loss and the
  per-rank input gradients divided by the world size the single-process gradients (DDP
  averages gradients);
* ``kmeans``: every rank holds the single-process centroids, inertia and iteration count of the
  concatenated data, and its slice of the assignments (k-means++, explicit init with an empty
  cluster to re-seed, spherical).

Modelled on ``tests/distributed/test_gather_ddp.py`` (gloo on loopback, one port for all ranks).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from modalign import distributed as mdist
from modalign.alignment import balanced_assignments, kmeans
from modalign.objectives.clustering import swapped_prediction_loss
from support.ddp import init_gloo, spawn_ranks

WORLD = 2
N, K = 10, 4
SPLITS = [(5, 5), (3, 7), (0, 10)]  # rows of rank 0 and rank 1 of the code/loss batch
N_POINTS = 40
POINT_SPLITS = [(20, 20), (13, 27), (0, 40)]  # rows of the k-means data
FAR_INIT = torch.tensor([[0.0, 0.0, 0.0], [50.0, 50.0, 50.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0]], dtype=torch.float64)
KMEANS_CASES: dict[str, dict[str, Any]] = {
    "plusplus": {"k": 4, "seed": 3, "tol": 0.0},
    "far_init": {"k": 4, "init": FAR_INIT, "tol": 0.0},  # cluster 1 starts empty and is re-seeded
    "spherical": {"k": 3, "seed": 5, "spherical": True},
    "two_steps": {"k": 5, "seed": 1, "iterations": 2, "chunk_size": 3},
}

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.slow,  # spawning two interpreters with torch takes ~10 s on a 2-core machine
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available() or sys.platform in ("win32", "cygwin"),
        reason="needs torch.distributed with the gloo backend",
    ),
]


def global_scores() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(2.0 * torch.rand(N, K, generator=g, dtype=torch.float64) - 1.0 for _ in range(2))  # type: ignore[return-value]


def global_points() -> Tensor:
    g = torch.Generator().manual_seed(1)
    centers = 4.0 * torch.eye(4, 3, dtype=torch.float64)
    return centers.repeat(N_POINTS // 4, 1) + torch.randn(N_POINTS, 3, generator=g, dtype=torch.float64)


def run_loss(rows: slice, gather: bool) -> dict[str, Tensor]:
    sa0, sb0 = global_scores()
    sa, sb = sa0[rows].clone().requires_grad_(), sb0[rows].clone().requires_grad_()
    loss = swapped_prediction_loss(sa, sb, temperature=0.2, gather=gather)
    loss.backward()
    assert sa.grad is not None and sb.grad is not None
    return {"loss": loss.detach(), "a": sa.grad, "b": sb.grad}


def run_kmeans(rows: slice, gather: bool, case: str) -> dict[str, Any]:
    res = kmeans(global_points()[rows], gather=gather, **KMEANS_CASES[case])
    return {"centroids": res.centroids, "assign": res.assignments, "inertia": res.inertia, "iterations": res.iterations}


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD)
    try:
        assert mdist.is_initialized() and mdist.world_size() == WORLD
        results: dict[str, Any] = {}
        for split in SPLITS:
            rows = slice(sum(split[:rank]), sum(split[: rank + 1]))
            results[f"codes{split}"] = balanced_assignments(global_scores()[0][rows], epsilon=0.1, gather=True)
            results[f"loss{split}"] = run_loss(rows, gather=True)
        for split in POINT_SPLITS:
            rows = slice(sum(split[:rank]), sum(split[: rank + 1]))
            for case in KMEANS_CASES:
                results[f"{case}{split}"] = run_kmeans(rows, gather=True, case=case)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("alignment_ddp"), WORLD, timeout_s=90)


@pytest.mark.parametrize("split", SPLITS, ids=[f"{x}+{y}" for x, y in SPLITS])
def test_codes_are_balanced_over_the_global_batch(rank_results: list[dict[str, Any]], split: tuple[int, int]) -> None:
    single = balanced_assignments(global_scores()[0], epsilon=0.1)
    got = torch.cat([r[f"codes{split}"] for r in rank_results])
    torch.testing.assert_close(got, single, atol=1e-12, rtol=1e-10)
    if split[0] > 0:  # a local equipartition would give different codes
        local = balanced_assignments(global_scores()[0][: split[0]], epsilon=0.1)
        assert (local - rank_results[0][f"codes{split}"]).abs().max() > 1e-3


@pytest.mark.parametrize("split", SPLITS, ids=[f"{x}+{y}" for x, y in SPLITS])
def test_swapped_prediction_loss_and_gradients_equal_single_process(
    rank_results: list[dict[str, Any]], split: tuple[int, int]
) -> None:
    single = run_loss(slice(0, N), gather=False)
    per_rank = [r[f"loss{split}"] for r in rank_results]
    torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, single["loss"], atol=1e-12, rtol=1e-10)
    for key in ("a", "b"):
        grads = torch.cat([r[key] for r in per_rank]) / WORLD
        torch.testing.assert_close(grads, single[key], atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("case", list(KMEANS_CASES))
@pytest.mark.parametrize("split", POINT_SPLITS, ids=[f"{x}+{y}" for x, y in POINT_SPLITS])
def test_kmeans_equals_single_process_on_the_concatenated_data(
    rank_results: list[dict[str, Any]], split: tuple[int, int], case: str
) -> None:
    single = run_kmeans(slice(0, N_POINTS), gather=False, case=case)
    per_rank = [r[f"{case}{split}"] for r in rank_results]
    for res in per_rank:
        torch.testing.assert_close(res["centroids"], single["centroids"], atol=1e-10, rtol=0)
        assert res["inertia"] == pytest.approx(single["inertia"], rel=1e-10)
        assert res["iterations"] == single["iterations"]
    assert torch.equal(torch.cat([r["assign"] for r in per_rank]), single["assign"])


def test_far_init_really_reseeds_an_empty_cluster() -> None:
    """Guard that the ``far_init`` case exercises relocation: cluster 1 ends up populated."""
    res = run_kmeans(slice(0, N_POINTS), gather=False, case="far_init")
    assert (res["assign"] == 1).any()
    assert res["centroids"][1].norm() < 20.0
