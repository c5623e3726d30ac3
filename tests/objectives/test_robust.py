"""Bounded contrastive losses for mismatched pairs: RCL's complementary loss and RINCE.

Each loss against a direct loop over pairs in float64 (value and gradient, with and without
same-content ids); the limits the papers state (RINCE -> InfoNCE + log lam as q -> 0, RCL's
gce -> log as q -> 0, abs = 1 - p_ii); the property they exist for (a mismatched pair pulls
less, relative to the clean pairs, than under InfoNCE); the modules on the paired rows, their
configuration errors, and a tiny real run that must beat chance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from modalign.core import Batch, ConfigError, ModalitySpec, Outputs
from modalign.core.registry import create
from modalign.objectives import RINCE, ComplementaryInfoNCE, complementary_infonce_loss, infonce_loss, rince_loss
from modalign.objectives.robust import log1mexp
from support.reference import assert_same_value_and_grad, composite_method, normed

F64 = torch.float64
SCALE = torch.tensor(math.log(1 / 0.2), dtype=F64)
IDS = [None, [0, 1, 0, 2, 3, 1]]


def allowed(ids: list[int] | None, i: int, j: int) -> bool:
    """Column ``j`` is in row ``i``'s softmax: itself, or not the same content."""
    return i == j or ids is None or ids[i] != ids[j]


def loop_rows(a: Tensor, b: Tensor, ids: list[int] | None, row: Callable[[int, list[int], Tensor], Tensor]) -> Tensor:
    """``(mean_i row(i, cols, logits_i) + the same with a and b swapped) / 2``."""
    s, n = SCALE.exp(), a.shape[0]
    total = torch.zeros((), dtype=F64)
    for q, k in ((a, b), (b, a)):
        for i in range(n):
            cols = [j for j in range(n) if allowed(ids, i, j)]
            total = total + row(i, cols, torch.stack([s * (q[i] * k[j]).sum() for j in cols])) / n
    return total / 2


def phi(variant: str, q: float) -> Callable[[Tensor], Tensor]:
    return {
        "log": lambda p: -torch.log(1 - p),
        "gce": lambda p: (1 - (1 - p) ** q) / q,
        "abs": lambda p: p,
    }[variant]


def loop_complementary(a: Tensor, b: Tensor, variant: str, q: float, ids: list[int] | None) -> Tensor:
    def row(i: int, cols: list[int], logits: Tensor) -> Tensor:
        p = torch.exp(logits) / torch.exp(logits).sum()
        return torch.stack([phi(variant, q)(p[c]) for c, j in enumerate(cols) if j != i]).sum()

    return loop_rows(a, b, ids, row)


def loop_rince(a: Tensor, b: Tensor, q: float, lam: float, ids: list[int] | None) -> Tensor:
    def row(i: int, cols: list[int], logits: Tensor) -> Tensor:
        pos = torch.exp(logits[cols.index(i)])
        return -(pos**q) / q + (lam * torch.exp(logits).sum()) ** q / q

    return loop_rows(a, b, ids, row)


@pytest.mark.parametrize("ids", IDS)
@pytest.mark.parametrize(("variant", "q"), [("log", 0.5), ("gce", 0.5), ("gce", 1.0), ("abs", 0.5)])
def test_complementary_matches_the_loop(variant: str, q: float, ids: list[int] | None) -> None:
    t = torch.tensor(ids) if ids is not None else None
    assert_same_value_and_grad(
        lambda a, b: complementary_infonce_loss(a, b, SCALE, variant, q, t, t),  # type: ignore[arg-type]
        lambda a, b: loop_complementary(a, b, variant, q, ids),
        normed(6, 4, 0),
        normed(6, 4, 1),
    )


@pytest.mark.parametrize("ids", IDS)
@pytest.mark.parametrize(("q", "lam"), [(0.5, 0.01), (1.0, 0.1), (0.1, 0.5)])
def test_rince_matches_the_loop(q: float, lam: float, ids: list[int] | None) -> None:
    t = torch.tensor(ids) if ids is not None else None
    assert_same_value_and_grad(
        lambda a, b: rince_loss(a, b, SCALE, q, lam, t, t),
        lambda a, b: loop_rince(a, b, q, lam, ids),
        normed(6, 4, 2),
        normed(6, 4, 3),
    )


def test_limits_the_papers_state() -> None:
    a, b = normed(7, 5, 4), normed(7, 5, 5)
    info = infonce_loss(a, b, SCALE)
    # RINCE: (x^q - 1) / q -> log x, so the loss -> InfoNCE + log(lam) as q -> 0 (Chuang et al., Thm 1)
    torch.testing.assert_close(rince_loss(a, b, SCALE, 1e-7, 0.05), info + math.log(0.05), rtol=1e-5, atol=0)
    # gce -> log as q -> 0; abs sums the negatives' probabilities: 1 - p_ii
    torch.testing.assert_close(
        complementary_infonce_loss(a, b, SCALE, "gce", 1e-7),
        complementary_infonce_loss(a, b, SCALE, "log"),
        rtol=1e-5,
        atol=0,
    )
    logits = SCALE.exp() * a @ b.T
    p_ii = 0.5 * (torch.softmax(logits, 1).diagonal() + torch.softmax(logits.T, 1).diagonal())
    torch.testing.assert_close(complementary_infonce_loss(a, b, SCALE, "abs"), 1 - p_ii.mean(), rtol=1e-12, atol=0)


def test_log1mexp_is_accurate_and_its_gradient_finite_at_both_ends() -> None:
    x = torch.tensor([-1e-12, -1e-6, -0.5, -math.log(2.0), -1.0, -40.0, -float("inf")], dtype=F64, requires_grad=True)
    y = log1mexp(x)
    want = [math.log(-math.expm1(v)) if v > -1.0 else math.log1p(-math.exp(v)) for v in x.tolist()]
    torch.testing.assert_close(y, torch.tensor(want, dtype=F64), rtol=1e-12, atol=0)
    assert float(y[-2].detach()) == pytest.approx(-math.exp(-40.0), rel=1e-12)  # not rounded to 0
    y.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def pull_ratio(loss: Callable[[Tensor, Tensor], Tensor]) -> float:
    """How hard descent pulls the mismatched pair's ``b`` towards its ``a``, over the mean clean pull."""
    a, b = normed(8, 6, 6), normed(8, 6, 7)
    b = torch.nn.functional.normalize(torch.cat([a[:7] + 0.3 * b[:7], b[7:]]), dim=1)  # 7 clean pairs, 1 mismatched
    b.requires_grad_()
    loss(a, b).backward()
    assert b.grad is not None
    pulls = -(b.grad * a).sum(dim=1)
    assert float(pulls[:7].mean()) > 0 and float(pulls[7]) > 0
    return float(pulls[7] / pulls[:7].mean())


def test_a_mismatched_pair_pulls_less_than_under_infonce() -> None:
    info = pull_ratio(lambda a, b: infonce_loss(a, b, SCALE))
    for loss in (
        lambda a, b: complementary_infonce_loss(a, b, SCALE, "log"),
        lambda a, b: complementary_infonce_loss(a, b, SCALE, "abs"),
        lambda a, b: rince_loss(a, b, SCALE, 0.5, 0.01),
        lambda a, b: rince_loss(a, b, SCALE, 1.0, 0.01),
    ):
        assert pull_ratio(loss) < 0.5 * info


def test_bad_inputs_raise() -> None:
    a, b = normed(4, 3, 8), normed(4, 3, 9)
    with pytest.raises(ValueError, match="variant"):
        complementary_infonce_loss(a, b, SCALE, "l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="q in"):
        complementary_infonce_loss(a, b, SCALE, "gce", 0.0)
    with pytest.raises(ValueError, match="lam"):
        rince_loss(a, b, SCALE, 0.5, 0.0)
    with pytest.raises(ValueError, match="empty"):
        rince_loss(a[:0], b[:0], SCALE)
    with pytest.raises(ValueError):
        complementary_infonce_loss(a, b[:3], SCALE)


# ---------------------------------------------------------------- modules

SPECS = {"x": ModalitySpec("vector", channels=5), "y": ModalitySpec("vector", channels=5)}


def module_outputs(n: int, seed: int) -> Outputs:
    return Outputs(embeddings={m: normed(n, 4, seed + k).requires_grad_() for k, m in enumerate(SPECS)})


@pytest.mark.parametrize(
    ("cls", "kwargs", "fn"),
    [
        (
            ComplementaryInfoNCE,
            {"variant": "gce", "q": 0.7},
            lambda a, b, s, t: complementary_infonce_loss(a, b, s, "gce", 0.7, t, t),
        ),
        (RINCE, {"q": 0.3, "lam": 0.05}, lambda a, b, s, t: rince_loss(a, b, s, 0.3, 0.05, t, t)),
    ],
)
def test_modules_are_the_function_on_the_paired_rows(cls: type, kwargs: dict, fn: Callable[..., Tensor]) -> None:
    obj = cls(modalities=["x", "y"], temperature=0.2, **kwargs).double()
    out = module_outputs(6, 10)
    present = torch.tensor([True, True, True, True, True, False])
    batch = Batch(
        data={m: torch.zeros(6, 5) for m in SPECS},
        present={"x": torch.ones(6, dtype=torch.bool), "y": present},
        ids=torch.tensor([0, 1, 0, 2, 3, 4]),
    )
    got = obj(out, batch)
    want = fn(out.embeddings["x"][:5], out.embeddings["y"][:5], obj.scale(), batch.ids[:5])
    torch.testing.assert_close(got.loss, want, rtol=1e-12, atol=0)
    assert got.metrics["paired"] == 5 and {"acc_a2b", "acc_b2a", "temperature"} <= got.metrics.keys()
    one = Batch(data=batch.data, present={"x": present.flip(0), "y": present.flip(0) & False}, ids=batch.ids)
    zero = obj(out, one).loss
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_registered_names_and_configuration_errors() -> None:
    assert isinstance(create("objective", "complementary_infonce"), ComplementaryInfoNCE)
    assert isinstance(create("objective", "rince"), RINCE)
    bad: list[tuple[type, dict[str, object], str]] = [
        (ComplementaryInfoNCE, {"variant": "mse"}, "variant"),
        (ComplementaryInfoNCE, {"q": 1.5}, "q"),
        (RINCE, {"q": 0.0}, "q"),
        (RINCE, {"lam": -1.0}, "lam"),
    ]
    for cls, kwargs, key in bad:
        with pytest.raises(ConfigError, match=rf"^{key}:"):
            cls(**kwargs)


# ---------------------------------------------------------------- a tiny real run


def train_top1(objective: dict, steps: int = 150) -> float:
    """Two views of a 5-d latent, half of each batch's 256 pairs' ``y`` shuffled; top-1 among 64 held-out pairs."""
    g = torch.Generator().manual_seed(0)
    mix = {m: torch.randn(5, 5, generator=g) for m in SPECS}
    method = composite_method([objective], SPECS, embed=8)
    opt = torch.optim.Adam(method.parameters(), lr=3e-3)

    def batch_of(n: int) -> Batch:
        z = torch.randn(n, 5, generator=g)
        data = {m: z @ w + 0.1 * torch.randn(n, 5, generator=g) for m, w in mix.items()}
        ones = torch.ones(n, dtype=torch.bool)
        return Batch(data=data, present={"x": ones, "y": ones}, ids=torch.arange(n))

    for _ in range(steps):
        batch = batch_of(256)
        batch.data["y"][:128] = batch.data["y"][torch.randperm(128, generator=g)]
        opt.zero_grad()
        method.loss(method(batch), batch).loss.backward()
        opt.step()
    with torch.no_grad():
        out = method(batch_of(64))
    return float((out.embeddings["x"] @ out.embeddings["y"].T).argmax(1).eq(torch.arange(64)).float().mean())


@pytest.mark.parametrize(
    "objective",
    [
        {"name": "complementary_infonce", "temperature": 0.1, "learn_temperature": False},
        # RINCE trains at a warmer temperature: at 0.1 its e^{q l_ii} weights favour the pairs
        # already fitted, mismatched ones included (top-1 0.14 at q 0.1, 0.09 at q 0.5; InfoNCE 0.44)
        {"name": "rince", "temperature": 0.5, "learn_temperature": False, "q": 0.1, "lam": 0.01},
    ],
)
def test_training_on_half_mismatched_pairs_finds_the_true_partners(objective: dict, one_thread: None) -> None:
    assert train_top1(objective) > 0.3  # chance 1/64; measured 0.62 (complementary), 0.50 (RINCE), InfoNCE 0.44
