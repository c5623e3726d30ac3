"""Checks of a loss against a direct reference formula: value and gradient, float64."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

F64 = torch.float64


def normed(n: int, e: int, seed: int) -> Tensor:
    """Seeded L2-normalised rows ``[n, e]`` in float64."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g, dtype=F64), dim=-1)


def leaves(*ts: Tensor) -> list[Tensor]:
    """Detached copies of ``ts`` that require gradient."""
    return [t.detach().clone().requires_grad_() for t in ts]


def assert_same_value_and_grad(fn: Callable[..., Tensor], ref: Callable[..., Tensor], *inputs: Tensor) -> None:
    """``fn`` and ``ref`` agree in value and in the gradient of every input (float64, rtol 1e-8)."""
    xs, ys = leaves(*inputs), leaves(*inputs)
    got, want = fn(*xs), ref(*ys)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    got.backward()
    want.backward()
    for x, y in zip(xs, ys, strict=True):
        assert x.grad is not None and y.grad is not None
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-8, atol=1e-10)
