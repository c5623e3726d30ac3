"""MIL-NCE over temporal windows (``window_milnce``) against loops over windows and bags.

* ``temporal_windows``: window means over valid tokens, centres and validity by a loop.
* ``window_bags``: by a loop over window pairs (radius, the nearest window, invalid windows).
* ``window_milnce_loss`` against a loop over anchors (value and gradient, float64), with
  padding, rows sharing a content id, and sequences of different lengths.
* The registered objective on a hand-built batch; a zero loss below two pairs; argument errors.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core import Batch, ConfigError, ModalitySpec, Outputs
from modalign.objectives import WindowMILNCE, window_milnce_loss
from modalign.objectives.window_milnce import temporal_windows, window_bags
from support.reference import assert_same_value_and_grad, composite_method

F64 = torch.float64
SCALE = torch.tensor(math.log(5.0), dtype=F64)


def tokens(p: int, t: int, e: int, seed: int) -> Tensor:
    return torch.randn(p, t, e, generator=torch.Generator().manual_seed(seed), dtype=F64)


def loop_windows(x: Tensor, pad: Tensor, window: int, stride: int) -> tuple[Tensor, Tensor, Tensor]:
    p, t, e = x.shape
    k = max(1, math.ceil((t - window) / stride) + 1)
    w, c, v = torch.zeros(p, k, e, dtype=x.dtype), torch.zeros(p, k, dtype=x.dtype), torch.zeros(p, k, dtype=torch.bool)
    for i in range(p):
        length = int((~pad[i]).sum())
        for j in range(k):
            members = [s for s in range(j * stride, min(t, j * stride + window)) if not pad[i, s]]
            if members:
                w[i, j] = F.normalize(torch.stack([x[i, s] for s in members]).mean(0), dim=0)
                c[i, j] = (sum(members) / len(members) + 0.5) / length
                v[i, j] = True
    return w, c, v


@pytest.mark.parametrize(("window", "stride"), [(1, 1), (3, 2), (4, 4), (20, 3)])
def test_windows_equal_the_loop(window: int, stride: int) -> None:
    x = tokens(3, 9, 4, 0)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    pad[2, 2:4] = True
    got = temporal_windows(x, pad, window, stride)
    want = loop_windows(x, pad, window, stride)
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(got[0][want[2]], want[0][want[2]])
    torch.testing.assert_close(got[1][want[2]], want[1][want[2]])


def loop_bags(ca: Tensor, va: Tensor, cb: Tensor, vb: Tensor, radius: float) -> Tensor:
    p, ka = ca.shape
    kb = cb.shape[1]
    out = torch.zeros(p * ka, p * kb, dtype=torch.bool)
    for i in range(p):
        for k in range(ka):
            if not va[i, k] or not vb[i].any():
                continue
            gaps = [abs(float(ca[i, k] - cb[i, m])) if vb[i, m] else math.inf for m in range(kb)]
            nearest = min(range(kb), key=lambda m: gaps[m])
            for m in range(kb):
                if vb[i, m] and (gaps[m] <= radius or m == nearest):
                    out[i * ka + k, i * kb + m] = True
    return out


def test_bags_equal_the_loop() -> None:
    g = torch.Generator().manual_seed(1)
    ca, cb = torch.rand(3, 5, generator=g, dtype=F64), torch.rand(3, 4, generator=g, dtype=F64)
    va, vb = torch.rand(3, 5, generator=g) > 0.2, torch.rand(3, 4, generator=g) > 0.2
    vb[2] = False  # a sample without a valid b window: its a windows own nothing
    for radius in (0.0, 0.1, 0.3, 2.0):
        assert torch.equal(window_bags(ca, va, cb, vb, radius), loop_bags(ca, va, cb, vb, radius))


def loop_loss(
    a: Tensor, pa: Tensor, b: Tensor, pb: Tensor, ids: list[int], window: int, stride: int, r: float
) -> Tensor:
    """Both directions by loops: anchor windows, bags, denominators over allowed windows."""
    wa, ca, va = loop_windows(a, pa, window, stride)
    wb, cb, vb = loop_windows(b, pb, window, stride)
    s = SCALE.exp()

    def direction(wq: Tensor, cq: Tensor, vq: Tensor, wk: Tensor, ck: Tensor, vk: Tensor) -> Tensor:
        bags = loop_bags(cq, vq, ck, vk, r)
        p, kq, kk = wq.shape[0], wq.shape[1], wk.shape[1]
        terms = []
        for i in range(p):
            for k in range(kq):
                row = bags[i * kq + k]
                if not row.any():
                    continue
                allowed, positives = [], []
                for j in range(p):
                    if j != i and ids[j] == ids[i]:
                        continue
                    for m in range(kk):
                        if vk[j, m]:
                            allowed.append(s * wq[i, k] @ wk[j, m])
                            if row[j * kk + m]:
                                positives.append(s * wq[i, k] @ wk[j, m])
                terms.append(torch.logsumexp(torch.stack(allowed), 0) - torch.logsumexp(torch.stack(positives), 0))
        return torch.stack(terms).mean()

    return 0.5 * (direction(wa, ca, va, wb, cb, vb) + direction(wb, cb, vb, wa, ca, va))


@pytest.mark.parametrize(("window", "stride", "radius"), [(2, 1, 0.2), (3, 2, 0.0), (1, 1, 1.0)])
def test_loss_equals_the_loop_value_and_gradient(window: int, stride: int, radius: float) -> None:
    a, b = tokens(4, 8, 3, 2), tokens(4, 5, 3, 3)  # streams of different lengths (rates)
    pa, pb = torch.zeros(4, 8, dtype=torch.bool), torch.zeros(4, 5, dtype=torch.bool)
    pa[1, 5:] = True
    pb[3, 4:] = True
    ids = [0, 1, 0, 3]  # rows 0 and 2 hold the same content: never each other's negatives
    t = torch.tensor(ids)
    assert_same_value_and_grad(
        lambda x, y: window_milnce_loss(x, pa, y, pb, SCALE, window, stride, radius, t, t)[0],
        lambda x, y: loop_loss(x, pa, y, pb, ids, window, stride, radius),
        a,
        b,
    )


def test_loss_rejects_bad_input() -> None:
    a = tokens(2, 4, 3, 0)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="share P and E"):
        window_milnce_loss(a, pad, tokens(3, 4, 3, 1), torch.zeros(3, 4, dtype=torch.bool), SCALE, 2, 1, 0.1)
    with pytest.raises(ValueError, match="no window"):
        window_milnce_loss(a, ~pad, a, ~pad, SCALE, 2, 1, 0.1)
    with pytest.raises(ValueError, match="stride"):
        temporal_windows(a, pad, 2, 0)


SPECS = {"x": ModalitySpec("vector", channels=6), "y": ModalitySpec("vector", channels=6)}


def hand_outputs(n: int, t: int, s: int, e: int = 8, width: int = 32) -> Outputs:
    g = torch.Generator().manual_seed(5)
    return Outputs(
        embeddings={m: F.normalize(torch.randn(n, e, generator=g), dim=1) for m in "xy"},
        tokens={
            "x": torch.randn(n, t, width, generator=g, requires_grad=True),
            "y": torch.randn(n, s, width, generator=g),
        },
        padding={"x": torch.zeros(n, t, dtype=torch.bool), "y": torch.zeros(n, s, dtype=torch.bool)},
    )


def hand_batch(n: int) -> Batch:
    return Batch(
        data={m: torch.zeros(n, 6) for m in "xy"},
        present={m: torch.ones(n, dtype=torch.bool) for m in "xy"},
        ids=torch.arange(n),
    )


def bound(**kwargs: Any) -> WindowMILNCE:
    method = composite_method([{"name": "window_milnce", **kwargs}], SPECS, 8, 0)
    obj = method.objectives["window_milnce"]
    assert isinstance(obj, WindowMILNCE)
    return obj


def test_objective_projects_the_tokens_and_matches_the_loss() -> None:
    obj, out, batch = bound(window=2, stride=1, radius=0.3), hand_outputs(5, 6, 4), hand_batch(5)
    got = obj(out, batch)
    pa = obj.project.maps["x"](out.tokens["x"])
    pb = obj.project.maps["y"](out.tokens["y"])
    want = window_milnce_loss(pa, out.padding["x"], pb, out.padding["y"], obj.scale(), 2, 1, 0.3, batch.ids, batch.ids)[
        0
    ]
    torch.testing.assert_close(got.loss, want)
    assert got.metrics["paired"] == 5 and 0.0 <= got.metrics["acc_a2b"] <= 1.0
    got.loss.backward()
    assert out.tokens["x"].grad is not None and obj.project.maps["x"].weight.grad is not None
    one = obj(hand_outputs(1, 6, 4), hand_batch(1))
    assert float(one.loss.detach()) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "key"), [({"window": 0}, "window"), ({"stride": 0}, "stride"), ({"radius": -0.1}, "radius")]
)
def test_bad_arguments_name_their_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        WindowMILNCE(**kwargs)
    assert err.value.path == key
