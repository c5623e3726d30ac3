"""``modalign.objectives.local_fdr``: Storey's null share, Grenander's density, local false discovery rates.

* ``storey_pi0`` against its formula on hand-made p-values.
* ``grenander_density`` against an independent construction: the antitonic regression
  (``sklearn.isotonic.IsotonicRegression``) of the empirical distribution's raw slopes weighted
  by the gaps; with ties; a density (integrates to 1) that never increases.
* ``local_fdr`` on simulated p-values with a known null share: the share recovered, the nulls
  told from the rest; no nulls give zeros.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression
from torch import Tensor

from modalign.objectives.local_fdr import grenander_density, local_fdr, storey_pi0

F64 = torch.float64


def simulated(n: int, pi0: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(p [n], null [n])``: a ``pi0`` share uniform, the rest ``Beta(0.2, 4)`` (near 0)."""
    g = torch.Generator().manual_seed(seed)
    null = torch.rand(n, generator=g) < pi0
    alt = torch.distributions.Beta(0.2, 4.0).sample((n,)).to(F64)
    p = torch.where(null, torch.rand(n, generator=g, dtype=F64), alt).clamp(min=1e-9)
    return p, null


def test_storey_pi0_is_its_formula() -> None:
    p = torch.tensor([0.01, 0.2, 0.49, 0.5, 0.51, 0.9, 1.0, 0.05], dtype=F64)
    assert storey_pi0(p, 0.5) == pytest.approx(3 / 8 / 0.5)
    assert storey_pi0(p, 0.0) == 1.0  # capped
    assert storey_pi0(torch.full((5,), 0.1, dtype=F64)) == 0.0


def antitonic_reference(p: Tensor) -> Tensor:
    """The decreasing density by sklearn's isotonic regression of the raw ECDF slopes, weighted by the gaps."""
    values, inverse, counts = np.unique(p.numpy(), return_inverse=True, return_counts=True)
    gaps = np.diff(np.concatenate([[0.0], values]))
    raw = counts / len(p) / gaps
    fitted = IsotonicRegression(increasing=False).fit(values, raw, sample_weight=gaps).predict(values)
    return torch.from_numpy(fitted[inverse])


@pytest.mark.parametrize("ties", [False, True])
def test_grenander_density_is_the_weighted_antitonic_regression(ties: bool) -> None:
    p, _ = simulated(300, 0.4, seed=0)
    if ties:
        p = (p * 40).ceil() / 40  # p-values of ranks among 40 alternatives
    got = grenander_density(p)
    torch.testing.assert_close(got, antitonic_reference(p))
    values, first = np.unique(p.numpy(), return_index=True)
    density = got[torch.from_numpy(first)]
    assert bool((density[1:] <= density[:-1] + 1e-12).all())  # never increases
    gaps = torch.diff(torch.cat([torch.zeros(1, dtype=F64), torch.from_numpy(values)]))
    assert float((density * gaps).sum()) == pytest.approx(1.0)  # a density on [0, max p]


@pytest.mark.parametrize("pi0", [0.0, 0.2, 0.5, 0.8])
def test_local_fdr_recovers_the_null_share_and_finds_the_nulls(pi0: float) -> None:
    p, null = simulated(4000, pi0, seed=1)
    lfdr, estimate = local_fdr(p)
    assert estimate == pytest.approx(pi0, abs=0.05)
    assert bool(((lfdr >= 0) & (lfdr <= 1)).all())
    if pi0 > 0:
        auc = float((lfdr[null][:, None] > lfdr[~null][None, :]).double().mean())
        assert auc >= 0.85, auc
        # calibrated: among the items called null with probability above 0.5, most are
        called = lfdr > 0.5
        assert float(null[called].double().mean()) >= 0.5
    else:
        assert float((lfdr < 0.5).double().mean()) >= 0.97  # almost nothing called a mismatch


def test_no_pvalue_above_lambda_gives_zero_rates() -> None:
    lfdr, estimate = local_fdr(torch.tensor([0.01, 0.02, 0.3], dtype=F64))
    assert estimate == 0.0 and torch.equal(lfdr, torch.zeros(3, dtype=F64))


@pytest.mark.parametrize(
    "p",
    [torch.zeros(0), torch.tensor([0.0, 0.5]), torch.tensor([0.5, 1.5]), torch.ones(2, 2)],
)
def test_bad_pvalues_raise(p: Tensor) -> None:
    with pytest.raises(ValueError, match="p-values"):
        local_fdr(p)
    with pytest.raises(ValueError, match="lam"):
        storey_pi0(torch.tensor([0.5]), 1.0)
