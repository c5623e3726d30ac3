"""Rank helpers and all-gather collectives (with and without gradient).

Every function works without an initialised process group (single process): rank 0, world size
1 and the gathers are the identity. Gathers accept a different number of rows on each rank
(e.g. after dropping unpaired samples): rows are padded to the largest rank before the
collective and the padding is stripped afterwards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is available and initialised."""
    return bool(dist.is_available() and dist.is_initialized())


def rank() -> int:
    """This process's rank in the default group (``0`` when not initialised)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes in the default group (``1`` when not initialised)."""
    return dist.get_world_size() if is_initialized() else 1


def all_gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Gather the integer ``n`` from every rank (``[n]`` when not initialised).

    Args:
        n: This rank's row count.
        device: Device of the helper tensor (must suit the backend: CUDA for NCCL).

    Returns:
        ``[n_0, ..., n_{W-1}]`` in rank order.
    """
    if not is_initialized():
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return [int(t.item()) for t in out]


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad], dim=0)


def _strip(parts: list[Tensor] | tuple[Tensor, ...], sizes: list[int]) -> Tensor:
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)], dim=0)


def all_gather_with_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph.

    The backward pass sums, over ranks, the gradients that reach each rank's slice and returns
    them to that rank (``torch.distributed.nn.functional.all_gather``), so a loss computed on
    the gathered tensor trains every rank's inputs.

    Args:
        x: ``Tensor[n_r, ...]`` this rank's rows.
        sizes: Row counts of all ranks if already known (from ``all_gather_sizes``); gathered
            here otherwise.

    Returns:
        ``Tensor[sum_r n_r, ...]`` in rank order; ``x`` itself when not initialised.
    """
    if not is_initialized():
        return x
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], x.device)
    parts = dist_fn.all_gather(_pad_rows(x, max(sizes)))
    return _strip(parts, sizes)


def all_gather_no_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Like ``all_gather_with_grad`` but detached (ids, labels, metrics).

    Args:
        x: ``Tensor[n_r, ...]`` this rank's rows.
        sizes: Row counts of all ranks if already known.

    Returns:
        ``Tensor[sum_r n_r, ...]`` without a graph; ``x.detach()`` when not initialised.
    """
    if not is_initialized():
        return x.detach()
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], x.device)
    padded = _pad_rows(x.detach(), max(sizes)).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return _strip(parts, sizes)
