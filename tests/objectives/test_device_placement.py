"""Device placement without a GPU: the meta device stands in for CUDA.

Like a CUDA tensor, a meta tensor refuses to meet a CPU tensor of more than one element in an
operation, so a function that creates such a tensor on the CPU beside its (device) input fails
here with a device error before it gets to its first data read (which meta tensors cannot do).
The full CUDA checks are in ``tests/gpu``.
"""

from __future__ import annotations

import pytest
import torch

from modalign.objectives.unaligned import fit_gmm_1d


def test_gmm_fit_creates_nothing_on_the_cpu_beside_its_input() -> None:
    """``fit_gmm_1d`` made its initial weights on the CPU: on CUDA losses (``weighted_infonce``
    after its warm-up, ``ncr_infonce`` at its fitting epochs) the first E-step raised
    "Expected all tensors to be on the same device"."""
    with pytest.raises((RuntimeError, NotImplementedError)) as err:
        fit_gmm_1d(torch.rand(16, device="meta"))
    assert "device" not in str(err.value), err.value  # it reached the first value read
