"""Running a test worker on a CPU ``gloo`` process group of several ranks.

A test module defines ``_worker(rank, port, out_dir)`` that calls ``init_gloo``, computes its
results, saves them to ``out_dir/rank{rank}.pt`` and destroys the group; a module-scoped
fixture calls ``spawn_ranks(_worker, out_dir, world)`` and compares the ranks' results with one
process on the global batch.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def init_gloo(rank: int, port: int, world: int, timeout_s: float = 30.0) -> None:
    """Join the ``gloo`` group of ``world`` ranks rendezvousing on ``127.0.0.1:port``."""
    init = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_ranks(worker: Callable[[int, int, str], None], out_dir: Path, world: int, timeout_s: float = 90) -> list[Any]:
    """Run ``worker(rank, port, str(out_dir))`` in ``world`` processes; each rank's saved results.

    The group runs over the loopback interface (no network needed). The children unpickle
    ``worker`` by its module name (``tests.distributed.test_x`` under ``--import-mode=importlib``),
    so the folder that name is relative to is put on their path. Fails the test (killing the
    workers) if they have not finished after ``timeout_s`` seconds: a deadlock in a collective.
    """
    if not dist.is_available() or not dist.is_gloo_available() or sys.platform in ("win32", "cygwin"):
        pytest.skip("needs torch.distributed with the gloo backend")
    set_ifname = "GLOO_SOCKET_IFNAME" not in os.environ
    if set_ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    module = sys.modules[worker.__module__]
    root = str(Path(str(module.__file__)).resolve().parents[worker.__module__.count(".")])
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        ctx = mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=False)
    finally:
        if added:
            sys.path.remove(root)
        if set_ifname:
            del os.environ["GLOO_SOCKET_IFNAME"]
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers did not finish within {timeout_s:.0f} s (deadlock in a collective?)")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
