"""Distributed equals single process for the clustering objectives on a 2-rank CPU gloo group.

Each rank holds a slice of one global batch (equal, uneven, one empty) and calls with
``gather=True``. DDP averages gradients, so the mean over ranks of the losses must equal the
single-process loss of the global batch, the per-rank input gradients divided by the world
size the single-process input gradients, and the mean over ranks of the parameter gradients
(prototypes, classifiers) the single-process parameter gradient. SeLaVi balances its codes
over the global batch; XDC and MCN average over it, and their epoch-start pass clusters the
rows of every rank (each rank passes half of the training batches). Modelled on
``tests/distributed/test_objectives_ddp.py``.
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
from modalign.core import Batch, ModalitySpec, Outputs
from modalign.core.types import EpochContext
from modalign.methods import Method
from modalign.objectives.clustering import XDC, MCNCluster, SeLaVi, centroid_contrastive_loss, xdc_loss
from modalign.train.build import build_method
from modalign.train.recipe import validate_recipe
from support.ddp import init_gloo, spawn_ranks

WORLD = 2
N = 8
K = 3
SPLITS = [(4, 4), (3, 5), (0, 8)]
KINDS = ("xdc_loss", "centroid", "selavi", "xdc", "mcn")
SPECS = {"x": ModalitySpec("vector", channels=6), "y": ModalitySpec("vector", channels=5)}

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available() or sys.platform in ("win32", "cygwin"),
        reason="needs torch.distributed with the gloo backend",
    ),
]


def make_method(name: str) -> Method:
    """The same small method on every rank (seeded), with ``gather=True``."""
    method = {"name": name, "gather": True}
    method.update({"clusters": K} if name in ("xdc", "mcn") else {"prototypes": K, "temperature": 0.3})
    recipe = {
        "data": {"name": "av-digits"},
        "model": {"embed_dim": 4, "encoders": {m: {"name": "vector_mlp", "dim": 8, "hidden": 8} for m in SPECS}},
        "method": method,
    }
    torch.manual_seed(0)
    return build_method(validate_recipe(recipe), SPECS)


def global_rows() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalised ``a, b [N, 4]`` (float64), labels of a and b, and ``y`` content ids (repeating)."""
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(N, 4, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(a + 0.5 * torch.randn(N, 4, generator=g, dtype=torch.float64), dim=1)
    return a, b, torch.randint(0, K, (N,), generator=g), torch.tensor([0, 1, 2, 0, 3, 1, 4, 2]) + 50


def seeded_tables(obj: XDC | MCNCluster) -> None:
    """Fixed pseudo-labels and centroids (the epoch pass is tested separately)."""
    g = torch.Generator().manual_seed(1)
    if isinstance(obj, XDC):
        obj.labels.tables = {
            "x": (torch.arange(N), torch.arange(N) % K),
            "y": (torch.arange(50, 55), torch.arange(5) % K),
        }
        obj.classifiers.data = F.normalize(torch.randn(2, K, 4, generator=g), dim=2).to(obj.classifiers)
    else:
        obj.labels.tables = {"joint": (torch.arange(N), (torch.arange(N) * 2) % K)}
        obj.centroids.copy_(F.normalize(torch.randn(K, 4, generator=g), dim=1))


def run_module(kind: str, rows: slice) -> dict[str, Tensor]:
    """Loss and gradients (inputs and the objective's parameter) of a module on rows ``rows``."""
    method = make_method("mcn" if kind == "mcn" else kind).double()
    obj = method.objectives["mcn_cluster" if kind == "mcn" else kind]
    if isinstance(obj, XDC | MCNCluster):
        seeded_tables(obj)
    a0, b0, _, content = global_rows()
    a, b = a0[rows].clone().requires_grad_(), b0[rows].clone().requires_grad_()
    n, ids = a.shape[0], torch.arange(N)[rows]
    batch = Batch(data={"x": a, "y": b}, present={}, ids=ids, modality_ids={"y": content[rows]})
    outputs = Outputs(embeddings={"x": a, "y": b} if n > 0 else {})
    loss = obj(outputs, batch).loss
    if loss.requires_grad:  # an empty rank of mcn has no parameter in its (zero) loss
        loss.backward()
    param = obj.prototypes if isinstance(obj, SeLaVi) else obj.classifiers if isinstance(obj, XDC) else None
    return {
        "loss": loss.detach(),
        "a": grad_of(a),
        "b": grad_of(b),
        "param": grad_of(param) if param is not None else torch.zeros(()),
    }


def run_loss(kind: str, rows: slice, gather: bool) -> dict[str, Tensor]:
    """Loss and input gradients of a plain function, or of a module (``gather`` implied)."""
    if kind not in ("xdc_loss", "centroid"):
        return run_module(kind, rows)
    a0, b0, labels, _ = global_rows()
    a, b = a0[rows].clone().requires_grad_(), b0[rows].clone().requires_grad_()
    if kind == "xdc_loss":
        loss = xdc_loss(3.0 * a[:, :K], 3.0 * b[:, :K], labels[rows], (labels[rows] + 1) % K, gather=gather)
    else:
        centroids = F.normalize(torch.arange(12, dtype=torch.float64).reshape(K, 4).cos(), dim=1)
        loss = centroid_contrastive_loss(a, centroids, labels[rows], 0.2, gather)
        loss = loss + centroid_contrastive_loss(b, centroids, (labels[rows] + 2) % K, 0.2, gather)
    loss.backward()
    return {"loss": loss.detach(), "a": grad_of(a), "b": grad_of(b), "param": torch.zeros(())}


def grad_of(t: Tensor | None) -> Tensor:
    """The gradient of ``t`` (zeros of its shape when it got none)."""
    assert t is not None
    return t.grad if t.grad is not None else torch.zeros_like(t)


def pass_batches() -> list[Batch]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(4):
        ids = torch.arange(6) + 6 * i
        data = {"x": torch.randn(6, 6, generator=g), "y": torch.randn(6, 5, generator=g)}
        out.append(Batch(data=data, present={}, ids=ids, modality_ids={"y": 100 + ids // 2}))
    return out


def run_epoch_start(name: str, batches: list[Batch]) -> dict[str, Tensor]:
    """Tables and centroids after ``on_epoch_start`` over ``batches``."""
    method = make_method(name)
    method.on_epoch_start(EpochContext(0, 3, 10, 5, lambda: iter(batches)))
    obj = method.objectives["xdc" if name == "xdc" else "mcn_cluster"]
    assert isinstance(obj, XDC | MCNCluster)
    out = {f"{k}/{i}": t for k, v in obj.labels.tables.items() for i, t in enumerate(v)}
    out["centroids"] = obj.centroids.clone()
    if isinstance(obj, XDC):
        out["classifiers"] = obj.classifiers.detach().clone()
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD)
    try:
        assert mdist.is_initialized() and mdist.world_size() == WORLD
        results: dict[str, dict[str, Tensor]] = {}
        for split in SPLITS:
            lo = sum(split[:rank])
            for kind in KINDS:
                results[f"{kind}{split}"] = run_loss(kind, slice(lo, lo + split[rank]), gather=True)
        batches = pass_batches()
        for name in ("xdc", "mcn"):  # rank 0 passes 1 batch, rank 1 the other 3
            results[f"pass_{name}"] = run_epoch_start(name, batches[:1] if rank == 0 else batches[1:])
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Tensor]]]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp_clustering"), WORLD, timeout_s=120)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", SPLITS, ids=[f"{x}+{y}" for x, y in SPLITS])
def test_gathered_loss_and_gradients_equal_single_process(
    rank_results: list[dict[str, dict[str, Tensor]]], kind: str, split: tuple[int, int]
) -> None:
    single = run_loss(kind, slice(0, N), gather=False)
    per_rank = [r[f"{kind}{split}"] for r in rank_results]
    torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, single["loss"], atol=1e-10, rtol=1e-10)
    for key in ("a", "b"):
        grads = [r[key] for r, n in zip(per_rank, split, strict=True) if n > 0]
        torch.testing.assert_close(torch.cat(grads) / WORLD, single[key], atol=1e-10, rtol=1e-10)
        assert single[key].abs().sum() > 0
    if kind in ("selavi", "xdc"):
        torch.testing.assert_close(sum(r["param"] for r in per_rank) / WORLD, single["param"], atol=1e-10, rtol=1e-10)
        assert single["param"].abs().sum() > 0


def test_selavi_codes_are_balanced_over_the_global_batch(rank_results: list[dict[str, dict[str, Tensor]]]) -> None:
    """Guard against codes that stay local: the half-batch loss differs from the gathered one."""
    local = run_loss("selavi", slice(0, 4), gather=False)["loss"]
    assert abs(float(local) - float(rank_results[0]["selavi(4, 4)"]["loss"])) > 1e-4


@pytest.mark.parametrize("name", ["xdc", "mcn"])
def test_epoch_start_pass_over_sharded_batches_equals_one_process(
    rank_results: list[dict[str, dict[str, Tensor]]], name: str
) -> None:
    single = run_epoch_start(name, pass_batches())
    for res in rank_results:
        got = res[f"pass_{name}"]
        assert sorted(got) == sorted(single)
        for key, want in single.items():
            if want.dtype == torch.long:
                assert torch.equal(got[key], want), key
            else:
                torch.testing.assert_close(got[key], want, atol=1e-6, rtol=1e-6)
