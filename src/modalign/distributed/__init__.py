"""Distributed helpers: rank/world size and all-gather with and without gradient."""

from modalign.distributed.ops import (
    all_gather_no_grad,
    all_gather_sizes,
    all_gather_with_grad,
    is_initialized,
    rank,
    world_size,
)

__all__ = [
    "all_gather_no_grad",
    "all_gather_sizes",
    "all_gather_with_grad",
    "is_initialized",
    "rank",
    "world_size",
]
