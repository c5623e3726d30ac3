"""Collectives of the solvers: in-place all-reduce and broadcast that are no-ops when disabled.

The solvers of this package run without gradient, so they use ``torch.distributed`` directly
(``modalign.distributed`` holds the gathers with gradient used by the losses). Every function
takes ``enabled`` (``gather`` and an initialised process group) so a single process runs the
same code path.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from modalign.distributed import is_initialized


def distributed_enabled(gather: bool) -> bool:
    """Whether a solver called with ``gather`` must talk to the other ranks."""
    return bool(gather and is_initialized())


def all_reduce_(t: Tensor, enabled: bool, op: str = "sum") -> Tensor:
    """Reduce ``t`` in place over all ranks (``op`` is ``"sum"`` or ``"max"``) and return it.

    Args:
        t: Tensor of the same shape on every rank.
        enabled: Whether to reduce at all (``False``: ``t`` is returned unchanged).
        op: Reduction.
    """
    if enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def broadcast_(t: Tensor, src: int, enabled: bool) -> Tensor:
    """Overwrite ``t`` in place with rank ``src``'s ``t`` and return it (no-op when disabled)."""
    if enabled:
        dist.broadcast(t, src=src)
    return t
