"""The trainer under data parallelism equals one process on the global batch, and sends no B x B tensor.

Two CPU gloo ranks each run ``Trainer.fit`` (DDP over ``TrainingStep``, ``gather`` set by the
trainer, ``ShardedBatches``) on a small float64 problem for every method whose objectives read
other samples; the test process runs the same recipe in one process with the same global batch.
Compared: the first step's loss (mean over ranks) and every parameter's gradient after DDP's
averaging (rtol 1e-5), and the weights after two epochs (which also covers the lifecycle hooks:
MoCo's queues and teacher, the k-means and Sinkhorn epoch-start passes of XDC, MCN and SeLaVi).

Every collective the ranks run during training is recorded (the ``torch.distributed`` calls and,
through a DDP communication hook, the gradient buckets DDP reduces in C++): no message may hold
``B * B / W`` elements or more for the global batch ``B`` and ``W`` ranks, so not even one rank's
rows of a similarity matrix travel, let alone the whole ``B x B`` one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import modalign.train.loop as loop_module
from modalign.core import LossOutput
from modalign.methods import Method
from modalign.train.distributed import wrap_ddp
from modalign.train.recipe import TrainConfig
from support.ddp import init_gloo, spawn_ranks
from support.triples import Triples, make_method

WORLD = 2
B = 64  # global batch: 2 steps per epoch, 32 rows per rank
#: method -> (modalities of the model, extra preset arguments)
METHODS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "clip": (("x", "y"), {}),
    "siglip": (("x", "y"), {}),
    "cmc": (("x", "y", "z"), {}),
    "imagebind": (("x", "y", "z"), {"anchor": "x"}),
    "moco": (("x", "y"), {"queue_size": 48, "momentum": 0.9}),
    "dcl": (("x", "y"), {}),
    "vicreg": (("x", "y"), {}),
    "barlow": (("x", "y"), {}),
    "xdc": (("x", "y"), {"clusters": 4, "iterations": 5}),
    "mcn": (("x", "y"), {"clusters": 4, "iterations": 5}),
    "selavi": (("x", "y"), {"prototypes": 4, "temperature": 0.3}),
}
#: methods with random negatives, run for the communication record only
RECORD_ONLY: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {"avc": (("x", "y"), {})}

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.slow,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available() or sys.platform in ("win32", "cygwin"),
        reason="needs torch.distributed with the gloo backend",
    ),
]


def config() -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=B, lr=5e-3, warmup_steps=1, log_every=1, seed=3, progress_every=None)


class FirstStepTrainer(loop_module.Trainer):
    """Keeps the first step's loss and the gradients it leaves (after DDP's averaging)."""

    first: dict[str, Tensor]

    def _update(self, out: LossOutput) -> None:
        if not hasattr(self, "first"):
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            self.first = {"loss": out.loss.detach().clone()}
            for n, p in self.method.named_parameters():
                if p.grad is not None:
                    self.first[f"grad/{n}"] = p.grad.detach().clone()
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.cfg.grad_clip or float("inf"))
            self.optimizer.step()
            self.scheduler.step()
            return
        super()._update(out)


def train(name: str, run_dir: Path) -> dict[str, Tensor]:
    """Fit the method two epochs; its first step and final weights (``weight/...``)."""
    modalities, args = {**METHODS, **RECORD_ONLY}[name]
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = FirstStepTrainer(make_method(name, modalities, args), Triples(), config(), run_dir, torch.device("cpu"))
    trainer.fit(resume=False)
    weights = {f"weight/{k}": v.detach().clone() for k, v in trainer.method.state_dict().items()}
    return {**trainer.first, **weights}


class Recorder:
    """Shapes of every tensor this rank hands to a collective, by call."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[int, ...]]] = []

    def wrap(self, name: str, fn: Callable[..., Any], picks: Callable[..., list[Tensor]]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            for t in picks(*args, **kwargs):
                self.sent.append((name, tuple(t.shape)))
            return fn(*args, **kwargs)

        return recorded

    def install(self, patch: pytest.MonkeyPatch) -> None:
        """Record ``torch.distributed``'s collectives, DDP's initial broadcast and its gradient buckets."""
        first = lambda t, *a, **k: [t]  # noqa: E731
        second = lambda out, t, *a, **k: [t]  # noqa: E731
        every = lambda out, ins, *a, **k: list(ins)  # noqa: E731
        for name, picks in [
            ("all_reduce", first),
            ("broadcast", first),
            ("all_gather", second),
            ("all_gather_into_tensor", second),
            ("reduce_scatter", every),
            ("all_to_all", every),
            ("_broadcast_coalesced", lambda pg, ts, *a, **k: list(ts)),
        ]:
            patch.setattr(dist, name, self.wrap(name, getattr(dist, name), picks))
        patch.setattr(dist, "all_gather_object", self.wrap_object(dist.all_gather_object))
        patch.setattr(loop_module, "wrap_ddp", self.recorded_ddp)

    def wrap_object(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(out: list[Any], obj: Any, *args: Any, **kwargs: Any) -> Any:
            self.sent.append(("all_gather_object", (len(repr(obj)),)))
            return fn(out, obj, *args, **kwargs)

        return recorded

    def recorded_ddp(self, method: Method, device: torch.device) -> nn.Module:
        ddp = wrap_ddp(method, device)

        def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
            self.sent.append(("ddp_bucket", tuple(bucket.buffer().shape)))
            return default_hooks.allreduce_hook(state, bucket)

        # DDP checks the annotations themselves, which ``from __future__ import annotations`` turned into strings
        hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[Tensor]}
        ddp.register_comm_hook(None, hook)
        return ddp


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD, timeout_s=120)
    torch.set_num_threads(1)
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in [*METHODS, *RECORD_ONLY]:
            recorder = Recorder()
            with pytest.MonkeyPatch.context() as patch:
                recorder.install(patch)
                out = train(name, Path(out_dir) / f"{name}-rank{rank}")
            results[name] = {"result": out, "sent": recorder.sent}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Any]]]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp_trainer"), WORLD, timeout_s=600)


@pytest.mark.parametrize("name", list(METHODS))
def test_first_step_loss_and_gradients_equal_single_process(
    rank_results: list[dict[str, dict[str, Any]]], name: str, tmp_path: Path
) -> None:
    single = train(name, tmp_path)
    ranks = [r[name]["result"] for r in rank_results]
    loss = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(loss, single["loss"], rtol=1e-5, atol=1e-8)
    grads = sorted(k for k in single if k.startswith("grad/"))
    assert grads and all(sorted(k for k in r if k.startswith("grad/")) == grads for r in ranks)
    for key in grads:
        for r in ranks:  # DDP leaves the same averaged gradient on every rank
            torch.testing.assert_close(r[key], single[key], rtol=1e-5, atol=1e-9, msg=key)
    for key in (k for k in single if k.startswith("weight/")):  # two epochs later, hooks included
        for r in ranks:
            torch.testing.assert_close(r[key], single[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", [*METHODS, *RECORD_ONLY])
def test_no_collective_sends_a_batch_by_batch_tensor(rank_results: list[dict[str, dict[str, Any]]], name: str) -> None:
    limit = B * B // WORLD  # one rank's rows of the global similarity matrix
    for r in rank_results:
        sent = r[name]["sent"]
        assert any(kind == "ddp_bucket" for kind, _ in sent)  # the record does see DDP's reductions
        assert any(kind == "all_gather" for kind, _ in sent)  # and the objectives' gathers
        too_big = [(kind, shape) for kind, shape in sent if torch.Size(shape).numel() >= limit]
        assert not too_big, f"{name}: collectives sent {too_big} (limit {limit} elements)"
