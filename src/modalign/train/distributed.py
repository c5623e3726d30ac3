"""Data-parallel training under ``torchrun``: the process group, DDP, per-rank batches, reductions.

``torchrun --nproc_per_node N -m modalign train RECIPE`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; ``distributed_session``
joins their group (``gloo`` on CPU, ``nccl`` on CUDA, one device per local rank) and leaves it
when training ends. Without those variables (or with ``WORLD_SIZE=1``) nothing changes: one
process, no group.

What a rank does (see ``docs/architecture.md``, "Data parallel training"):

* ``train.batch_size`` is the **global** batch; each rank takes ``batch_size / world`` rows of
  every global batch of the single-process order (``ShardedBatches``), so the ranks together see
  exactly the batches one process would, and the steps per epoch and the LR schedule are the same;
* the whole training step (``method.loss(method(batch), batch)``, ``TrainingStep``) is DDP's
  forward, so the objectives' own parameters (temperature, prototypes, decoders) are inside it
  and ``find_unused_parameters`` sees every parameter;
* objectives that read other samples get ``gather=True`` (``enable_gather``), so each rank
  computes its rows' share of the global-batch loss, with gradient; batch norms normalise
  with the global batch's statistics (``GlobalBatchNorm``);
* logged scalars are averaged over ranks at ``log_every`` steps (``mean_over_ranks``,
  ``average_records``).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from modalign.core.errors import ConfigError
from modalign.core.types import Batch, LossOutput
from modalign.distributed import is_initialized, rank, world_size
from modalign.methods.base import Method

logger = logging.getLogger(__name__)

#: Seconds a collective may wait for the other ranks before the group fails (env override).
TIMEOUT_ENV = "MODALIGN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run.

    Attributes:
        rank: Global rank (0 writes the run directory).
        world: Number of processes.
        local_rank: Rank on this node (picks the CUDA device).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def lead(self) -> bool:
        """Whether this process writes checkpoints, metrics, ``eval.json`` and the report."""
        return self.rank == 0

    def tag(self) -> str:
        """``"[rank r/W] "`` under data parallelism, else ``""`` (prefix of error lines)."""
        return f"[rank {self.rank}/{self.world}] " if self.world > 1 else ""


def launch_context() -> DistContext:
    """The rank, world size and local rank ``torchrun`` put in the environment (defaults: one process)."""
    env = os.environ
    return DistContext(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


def launcher_command() -> list[str]:
    """How this process was started: ``["modalign"]``, or ``torchrun``'s line under data parallelism.

    ``torchrun --nproc_per_node N [--nnodes M] -m modalign`` (for ``RUN_DIR/command.txt``).
    """
    ctx = launch_context()
    if ctx.world <= 1:
        return ["modalign"]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(ctx.world)))
    nodes = ["--nnodes", str(ctx.world // per_node)] if per_node != ctx.world else []
    return ["torchrun", "--nproc_per_node", str(per_node), *nodes, "-m", "modalign"]


def _device_of(device: torch.device, local_rank: int) -> torch.device:
    """One CUDA device per local rank (``cuda`` -> ``cuda:LOCAL_RANK``); CPU unchanged."""
    if device.type != "cuda":
        return device
    chosen = torch.device("cuda", local_rank if device.index is None else device.index)
    torch.cuda.set_device(chosen)
    return chosen


@contextmanager
def distributed_session(device: torch.device) -> Iterator[tuple[DistContext, torch.device]]:
    """Join the ``torchrun`` group for the block (if launched by it) and leave it afterwards.

    A group that already exists (a test that initialised one) is used as it is and left alone.

    Args:
        device: The configured device; under CUDA each local rank gets ``cuda:LOCAL_RANK``.

    Yields:
        ``(context, device)`` of this process.
    """
    if is_initialized():
        yield DistContext(rank(), world_size(), launch_context().local_rank), device
        return
    ctx = launch_context()
    if ctx.world <= 1:
        yield DistContext(), device
        return
    device = _device_of(device, ctx.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend, timeout=timeout)
    logger.info("rank %d of %d joined the %s group on %s", ctx.rank, ctx.world, backend, device)
    try:
        yield ctx, device
    finally:
        dist.destroy_process_group()


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's Python, NumPy and torch RNG states, in rank order (on every rank)."""
    mine = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if not is_initialized():
        return [mine]
    states: list[Any] = [None] * world_size()
    dist.all_gather_object(states, mine)
    return states


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_initialized():
        dist.barrier()


def per_rank_batch(batch_size: int, world: int) -> int:
    """Rows per rank of a global batch of ``batch_size``.

    Raises:
        ConfigError: ``batch_size`` is not a multiple of the world size.
    """
    if batch_size % world:
        raise ConfigError(
            "train.batch_size", f"the global batch {batch_size} must be a multiple of the {world} processes"
        )
    return batch_size // world


def single_process_order(n: int, seed: int) -> Tensor:
    """The sample order of one process's shuffled loader (``make_loader(..., shuffle=True, seed=seed)``).

    A ``DataLoader`` with a generator first draws its workers' base seed from it, then its
    ``RandomSampler`` draws ``randperm(n)``; this replays both (pinned by a test).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(n, generator=generator)


class ShardedBatches(Sampler[int]):
    """This rank's rows of every global batch of the single-process order.

    Global batch ``k`` is ``order[k*B : (k+1)*B]`` (``B`` = ``global_batch``, incomplete last
    batch dropped); rank ``r`` of ``W`` takes its ``r``-th contiguous slice of ``B / W`` rows. The
    ranks together therefore see exactly the batches of one process, in the same rank order
    that gathers concatenate them.

    Args:
        n: Samples in the dataset.
        global_batch: ``B``, a multiple of ``world``.
        rank: This rank.
        world: ``W``.
        seed: The epoch's shuffling seed (``None``: dataset order, for epoch-start passes).
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int | None) -> None:
        self.n, self.global_batch, self.rank, self.seed = n, global_batch, rank, seed
        self.per_rank = per_rank_batch(global_batch, world)

    def __iter__(self) -> Iterator[int]:
        order = single_process_order(self.n, self.seed) if self.seed is not None else torch.arange(self.n)
        for k in range(self.n // self.global_batch):
            start = k * self.global_batch + self.rank * self.per_rank
            yield from order[start : start + self.per_rank].tolist()

    def __len__(self) -> int:
        return (self.n // self.global_batch) * self.per_rank


class ContiguousShard(Sampler[int]):
    """Rank ``r``'s contiguous share of ``range(n)`` (the first ``n % W`` ranks get one more).

    Concatenated in rank order (as ``all_gather_no_grad`` does) the shards are ``range(n)``, so
    an epoch-start pass over them equals one process's pass.
    """

    def __init__(self, n: int, rank: int, world: int) -> None:
        base, extra = divmod(n, world)
        self.start = rank * base + min(rank, extra)
        self.stop = self.start + base + (1 if rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s augmentation and per-step randomness (``seed`` on rank 0)."""
    return (seed + rank * 104_729) % (2**31)


def enable_gather(method: Method, on: bool = True) -> list[str]:
    """Set ``gather`` on every objective that has it (the labels of those changed).

    Under data parallelism every objective that reads other samples (contrastive galleries,
    batch statistics, clustering, matching negatives, token means) must see the global batch.
    """
    changed = []
    for label, objective in method.objectives.items():
        if isinstance(getattr(objective, "gather", None), bool) and objective.gather != on:
            setattr(objective, "gather", on)  # noqa: B010 (an attribute of some objectives only)
            changed.append(label)
    return changed


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the rows of every rank (the statistics of the global batch).

    ``torch.nn.SyncBatchNorm`` runs on accelerators only; this one runs wherever the process
    group does (gloo on CPU included). In training it all-reduces, with gradient, one
    ``[2C + 1]`` vector per call (per-channel sums and sums of squares, and the row count),
    so each rank normalises with, and back-propagates through, the global statistics, as one
    process would on the whole batch. Evaluation uses the running statistics. Parameters and
    buffers are those of the ``BatchNorm`` it replaces (same checkpoint keys).
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (rows, channels, ...), got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x: [N, C, ...]`` with the global batch statistics in training."""
        if not (self.training and is_initialized()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), x.numel() / max(1, x.shape[1]))])
        total = dist_fn.all_reduce(local.to(torch.promote_types(x.dtype, torch.float32)))
        channels = x.shape[1]
        count = total[-1].clamp_min(1)
        mean = total[:channels] / count
        var = (total[channels : 2 * channels] / count - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            self._update_running(mean.detach(), var.detach() * count / (count - 1).clamp_min(1))
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running(self, mean: Tensor, unbiased_var: Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked or 1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


def global_batch_norm(module: nn.Module) -> int:
    """Replace every ``BatchNorm1d/2d/3d`` of ``module`` by a ``GlobalBatchNorm`` in place; how many.

    Parameters and buffers move over unchanged (the same tensors), so optimisers built before and
    checkpoints written after see the same names.
    """
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            args = (child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new = GlobalBatchNorm(*args)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
            replaced += 1
        else:
            replaced += global_batch_norm(child)
    return replaced


class TrainingStep(nn.Module):
    """``method.loss(method(batch), batch)`` as one module: what DDP wraps.

    The objectives' parameters are used in the loss, not in ``Method.forward``; DDP's
    unused-parameter search only follows the graph of its own forward, so the whole step is that
    forward (a temperature outside it would be marked unused, then ready again in backward).
    """

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: Batch) -> LossOutput:
        """The step's loss."""
        out: LossOutput = self.method.loss(self.method(batch), batch)
        return out


def wrap_ddp(method: Method, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(TrainingStep(method))``.

    ``find_unused_parameters`` is on: a modality missing from a batch or an objective that
    returns a connected zero leaves parameters without gradient on some steps. Buffers are synced
    once, at construction, not before every forward: every hook keeps them equal across ranks
    (queues enqueue the gathered keys, clustering tables are computed from gathered rows), and
    batch-norm running statistics stay per rank (rank 0's are the ones checkpointed and
    evaluated, as they would be with broadcasting).
    """
    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DistributedDataParallel(
        TrainingStep(method), device_ids=ids, find_unused_parameters=True, forward_sync_buffers=False
    )


def mean_over_ranks(t: Tensor) -> Tensor:
    """The mean of ``t`` over ranks (``t`` itself in one process)."""
    if not is_initialized():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (``flag`` in one process)."""
    if not is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def average_records(record: dict[str, Any]) -> dict[str, Any]:
    """Average the numeric values of ``record`` over ranks (keys a rank lacks are averaged over the others).

    Called at ``log_every`` steps only; the records are small dicts of floats, so they travel as
    pickled objects.
    """
    if not is_initialized():
        return record
    records: list[dict[str, Any] | None] = [None] * world_size()
    dist.all_gather_object(records, record)
    out = dict(record)
    for key, value in record.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = [r[key] for r in records if r is not None and isinstance(r.get(key), int | float)]
            out[key] = type(value)(sum(values) / len(values)) if isinstance(value, float) else value
    return out
