"""Checks of a loss against a direct reference formula: value and gradient, float64."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core import ModalitySpec
from modalign.methods import Method
from modalign.train.build import build_method
from modalign.train.recipe import validate_recipe

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


def composite_method(
    objectives: list[dict[str, Any]], specs: dict[str, ModalitySpec], embed: int, seed: int = 0
) -> Method:
    """A ``composite`` method of ``objectives`` over small ``vector_mlp`` towers for ``specs``, seeded."""
    recipe = {
        "data": {"name": "av-digits"},
        "model": {
            "embed_dim": embed,
            "encoders": {m: {"name": "vector_mlp", "dim": 32, "hidden": 64} for m in specs},
        },
        "method": {"name": "composite", "objectives": objectives},
    }
    torch.manual_seed(seed)
    return build_method(validate_recipe(recipe), specs)
