"""Gradient caching under data parallelism equals one plain process on the global batch.

Two CPU gloo ranks train with ``train.grad_cache`` (chunks of 8 of each rank's 32 rows, the
gradients averaged once per step by ``all_reduce_gradients`` instead of DDP); the test process
trains the same float64 problem (``support.triples``) without caching on the global batch of 64.
The weights after two epochs must agree (rtol 1e-5) for methods whose objectives gather other
ranks' rows (InfoNCE, the multi-view sum, VICReg's global statistics, XDC's epoch-start k-means).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from modalign.train.loop import Trainer
from modalign.train.recipe import TrainConfig
from support.ddp import init_gloo, spawn_ranks
from support.triples import Triples, make_method

WORLD = 2
B = 64
METHODS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "clip": (("x", "y"), {}),
    "cmc": (("x", "y", "z"), {}),
    "vicreg": (("x", "y"), {}),
    "xdc": (("x", "y"), {"clusters": 4, "iterations": 5}),
}

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.slow,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available() or sys.platform in ("win32", "cygwin"),
        reason="needs torch.distributed with the gloo backend",
    ),
]


def train(name: str, run_dir: Path, grad_cache: int | None) -> dict[str, Tensor]:
    modalities, args = METHODS[name]
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(
        epochs=2, batch_size=B, lr=5e-3, warmup_steps=1, log_every=1, seed=3, progress_every=None, grad_cache=grad_cache
    )
    trainer = Trainer(make_method(name, modalities, args), Triples(), cfg, run_dir, torch.device("cpu"))
    trainer.fit(resume=False)
    assert trainer.step_module is None or grad_cache is None  # caching bypasses DDP's reducer
    return {k: v.detach().clone() for k, v in trainer.method.state_dict().items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD, timeout_s=120)
    torch.set_num_threads(1)
    try:
        results = {name: train(name, Path(out_dir) / f"{name}-rank{rank}", grad_cache=8) for name in METHODS}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Tensor]]]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp_grad_cache"), WORLD, timeout_s=300)


@pytest.mark.parametrize("name", list(METHODS))
def test_cached_ranks_equal_one_plain_process(
    rank_results: list[dict[str, dict[str, Tensor]]], name: str, tmp_path: Path
) -> None:
    single = train(name, tmp_path, grad_cache=None)
    for r in rank_results:
        assert r[name].keys() == single.keys()
        for key, want in single.items():
            torch.testing.assert_close(r[name][key], want, rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")


def test_single_process_cache_equals_plain(tmp_path: Path) -> None:
    plain = train("clip", tmp_path / "plain", grad_cache=None)
    cached = train("clip", tmp_path / "cached", grad_cache=5)  # 64 rows: chunks of 5, the last of 4
    for key, want in plain.items():
        torch.testing.assert_close(cached[key], want, rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
