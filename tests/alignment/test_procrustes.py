"""Orthogonal Procrustes against its closed form (scipy), mutual neighbours against a brute force,
Gromov-Wasserstein against POT, and unpaired recovery of a hidden rotation."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import scipy.linalg
import torch
from torch.nn import functional as F

from modalign.alignment.procrustes import (
    gromov_wasserstein,
    mutual_neighbours,
    orthogonal_procrustes,
    refine_procrustes,
    wasserstein_procrustes,
)


def rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q


def clouds(n: int = 300, d: int = 8, noise: float = 0.02, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Clustered points ``x``, and ``y = x R + noise`` shuffled: returns x, y, R, perm (y[k] = x[perm[k]] R)."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(12, d, dtype=torch.float64, generator=g)
    x = centres[torch.arange(n) % 12] + torch.randn(n, d, dtype=torch.float64, generator=g)
    r = rotation(d, seed + 1)
    perm = torch.randperm(n, generator=g)
    y = (x @ r)[perm] + noise * torch.randn(n, d, dtype=torch.float64, generator=g)
    return x, y, r, perm


def test_procrustes_equals_scipy_and_recovers_a_rotation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64, generator=g)
    y = torch.randn(50, 6, dtype=torch.float64, generator=g)
    want, _ = scipy.linalg.orthogonal_procrustes(x.numpy(), y.numpy())
    np.testing.assert_allclose(orthogonal_procrustes(x, y).numpy(), want, atol=1e-12)
    w = torch.rand(50, dtype=torch.float64, generator=g)
    want_w, _ = scipy.linalg.orthogonal_procrustes((x * w[:, None].sqrt()).numpy(), (y * w[:, None].sqrt()).numpy())
    np.testing.assert_allclose(orthogonal_procrustes(x, y, w).numpy(), want_w, atol=1e-12)
    r = rotation(6, 3)
    torch.testing.assert_close(orthogonal_procrustes(x, x @ r), r)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        orthogonal_procrustes(x, y[:10])


@pytest.mark.parametrize("csls_k", [None, 3])
def test_mutual_neighbours_equal_a_brute_force(csls_k: int | None) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 5, generator=g), torch.randn(55, 5, generator=g)
    sims = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    if csls_k is not None:
        ra = sims.topk(csls_k, dim=1).values.mean(1)
        rb = sims.T.topk(csls_k, dim=1).values.mean(1)
        sims = 2 * sims - ra[:, None] - rb[None, :]
    want = [(i, int(sims[i].argmax())) for i in range(40) if int(sims[:, int(sims[i].argmax())].argmax()) == i]
    i, j = mutual_neighbours(a, b, csls_k, block=7)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == want and want


def test_gromov_wasserstein_equals_pot_and_finds_the_hidden_matching() -> None:
    x, y, _, perm = clouds(n=24, d=5, noise=0.01, seed=2)
    plan = gromov_wasserstein(x, y, epsilons=(5e-3,), iterations=60, sinkhorn_iterations=2000)
    cx = (F.normalize(x, dim=1) @ F.normalize(x, dim=1).T).numpy()
    cy = (F.normalize(y, dim=1) @ F.normalize(y, dim=1).T).numpy()
    p = np.full(24, 1 / 24)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = ot.gromov.entropic_gromov_wasserstein(
                cx, cy, p, p, "square_loss", epsilon=5e-3, max_iter=60, tol=0, numItermax=2000, stopThr=0
            )
    np.testing.assert_allclose(plan.numpy(), want, atol=1e-10)
    # row i of x is y's row k with perm[k] = i
    assert (plan.argmax(dim=1) == torch.argsort(perm)).float().mean() >= 0.9


def test_unpaired_recovery_of_a_rotation_from_gw_then_refinement() -> None:
    """No pairs: GW on two independent subsamples -> Procrustes -> Wasserstein-Procrustes -> mutual-NN refinement."""
    x, y, r, perm = clouds(n=300, noise=0.02)
    g = torch.Generator().manual_seed(5)
    sx, sy = torch.randperm(300, generator=g)[:100], torch.randperm(300, generator=g)[:100]
    plan = gromov_wasserstein(x[sx], y[sy])
    cluster = torch.arange(300) % 12
    assert (cluster[perm[sy]][plan.argmax(dim=1)] == cluster[sx]).float().mean() > 0.5  # chance 1/12
    w0 = orthogonal_procrustes(F.normalize(x[sx], dim=1), len(sx) * plan @ F.normalize(y[sy], dim=1))
    w1 = wasserstein_procrustes(x, y, w0, iterations=5, epsilon=0.02)
    result = refine_procrustes(x, y, w1, iterations=3)
    assert (result.w - r).abs().max() < 0.05
    best = (F.normalize(x @ result.w, dim=1) @ F.normalize(y, dim=1).T).argmax(dim=1)
    assert (best == torch.argsort(perm)).float().mean() > 0.9  # translation retrieval p@1 with zero pairs
    assert result.pairs[-1] > 250
