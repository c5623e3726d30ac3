"""FSDP (``train.fsdp``) on 2 gloo ranks equals one plain process, and checkpoints cross world sizes.

Each rank trains the float64 problem of ``support.triples`` with its parameters sharded
(``fully_shard`` per encoder, then the training step); the test process trains the same recipe
unsharded on the global batch. Compared after two epochs: every weight (rtol 1e-5). Then the
checkpoints: the sharded run's epoch-2 checkpoint, extended to a third epoch by one plain
process, must give the weights of the plain 2-epoch run extended the same way, and the plain
epoch-2 checkpoint extended by the 2 sharded ranks must too (weights and the AdamW state travel
in the one checkpoint format, full tensors keyed as an unsharded optimiser keys them).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from modalign.core import ConfigError, Sample
from modalign.core.errors import TrainingError
from modalign.train.fsdp import full_model_state
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
}

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.slow,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available() or sys.platform in ("win32", "cygwin"),
        reason="needs torch.distributed with the gloo backend",
    ),
]


def train(name: str, run_dir: Path, epochs: int, fsdp: bool) -> dict[str, Tensor]:
    """Fit (resuming from ``run_dir`` if it has a checkpoint); the full weights afterwards."""
    modalities, args = METHODS[name]
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(
        epochs=epochs, batch_size=B, lr=5e-3, warmup_steps=1, seed=3, progress_every=None, fsdp=fsdp, grad_clip=0.05
    )
    trainer = Trainer(make_method(name, modalities, args), Triples(), cfg, run_dir, torch.device("cpu"))
    trainer.fit(resume=True)
    assert trainer.fsdp == (fsdp and dist.is_initialized())
    return full_model_state(trainer.method) if trainer.fsdp else dict(trainer.method.state_dict())


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD, timeout_s=120)
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        results: dict[str, Any] = {}
        for name in METHODS:
            results[name] = train(name, out / f"{name}-fsdp", 2, fsdp=True)
            # the plain run's epoch-2 checkpoint (copied in by the fixture), resumed sharded
            results[f"{name}/from-plain"] = train(name, out / f"{name}-plain-copy-rank{rank}", 3, fsdp=True)
        results["refused"] = refusal(out / f"xdc-rank{rank}")
        results["split"] = split_modality(out / f"split-rank{rank}")
        torch.save(results if rank == 0 else {}, out / f"rank{rank}.pt")
        # every rank done with its collectives (and FSDP's mesh) before the group is torn down: one
        # CI run saw rank 1 abort in teardown ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


class MostlyUnpaired(Triples):
    """``Triples`` whose ``y`` is observed in sample 0 only: some batch puts it on one rank alone."""

    def __getitem__(self, index: int) -> Sample:
        sample = super().__getitem__(index)
        values = {m: (None if m == "y" and index else v) for m, v in sample.values.items()}
        return Sample(sample.id, values)


def split_modality(run_dir: Path) -> str:
    """The error when one rank's batch observes ``y`` and the other's does not (instead of a hang)."""
    run_dir.mkdir(parents=True)
    cfg = TrainConfig(epochs=1, batch_size=4, fsdp=True, progress_every=None)
    trainer = Trainer(make_method("clip", ("x", "y"), {}), MostlyUnpaired(), cfg, run_dir, torch.device("cpu"))
    try:
        trainer.fit(resume=False)
    except TrainingError as e:
        return str(e)
    return "no error"


def refusal(run_dir: Path) -> str:
    """The error for XDC (an epoch-start k-means pass over the model) under FSDP."""
    cfg = TrainConfig(epochs=1, batch_size=B, fsdp=True, progress_every=None)
    method = make_method("xdc", ("x", "y"), {"clusters": 4, "iterations": 5})
    try:
        Trainer(method, Triples(), cfg, run_dir, torch.device("cpu"))
    except ConfigError as e:
        return str(e)
    return "not refused"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("fsdp")
    for name in ("clip", "cmc", "vicreg"):  # plain epoch-2 checkpoints for the sharded ranks to resume
        train(name, out / f"{name}-plain", 2, fsdp=False)
        for rank in range(WORLD):
            shutil.copytree(out / f"{name}-plain", out / f"{name}-plain-copy-rank{rank}")
    spawn_ranks(_worker, out, WORLD, timeout_s=300)
    return out, torch.load(out / "rank0.pt")


def assert_same(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", ["clip", "cmc", "vicreg"])
def test_sharded_ranks_equal_one_plain_process(runs: tuple[Path, dict[str, Any]], name: str) -> None:
    out, results = runs
    assert_same(results[name], train(name, out / f"{name}-plain-again", 2, fsdp=False))


@pytest.mark.parametrize("name", ["clip", "cmc", "vicreg"])
def test_checkpoints_resume_at_another_world_size(runs: tuple[Path, dict[str, Any]], name: str, tmp_path: Path) -> None:
    out, results = runs
    # the reference: a plain 2-epoch run extended to 3 epochs (its LR schedule is that procedure's)
    shutil.copytree(out / f"{name}-plain", tmp_path / "plain")
    reference = train(name, tmp_path / "plain", 3, fsdp=False)
    shutil.copytree(out / f"{name}-fsdp", tmp_path / "from-fsdp")
    assert_same(train(name, tmp_path / "from-fsdp", 3, fsdp=False), reference)  # 2 sharded ranks -> 1
    assert_same(results[f"{name}/from-plain"], reference)  # 1 process -> 2 sharded ranks


def test_objectives_with_model_hooks_are_refused(runs: tuple[Path, dict[str, Any]]) -> None:
    assert "train.fsdp" in runs[1]["refused"] and "on_epoch_start" in runs[1]["refused"]


def test_a_modality_observed_on_some_ranks_only_fails_instead_of_hanging(runs: tuple[Path, dict[str, Any]]) -> None:
    message = runs[1]["split"]
    assert message.startswith("train.fsdp: at step ") and "modalities ['y']" in message and "DDP" in message
