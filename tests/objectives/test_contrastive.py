"""Reference tests of the symmetric InfoNCE loss (lightly ``tests/loss/test_ntx_ent_loss.py`` style)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from modalign.core import Batch, ConfigError, Outputs, create
from modalign.objectives import InfoNCE, infonce_loss


def normed(n: int, e: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g, dtype=dtype), dim=-1)


def loop_infonce(a: Tensor, b: Tensor, logit_scale: Tensor, ids: list[int] | None = None) -> Tensor:
    """Direct formula with Python loops over scalar tensors (independent of the vectorised code)."""
    n = a.shape[0]
    ids = ids if ids is not None else list(range(n))
    s = torch.exp(logit_scale)
    total = torch.zeros((), dtype=a.dtype)
    for q, k in ((a, b), (b, a)):
        for i in range(n):
            terms = [s * (q[i] * k[j]).sum() for j in range(n) if j == i or ids[j] != ids[i]]
            total = total + torch.log(torch.stack(terms).exp().sum()) - s * (q[i] * k[i]).sum()
    return total / (2 * n)


def numpy_infonce(a: np.ndarray, b: np.ndarray, logit_scale: float, ids: list[int]) -> float:
    logits = math.exp(logit_scale) * a @ b.T
    same = np.equal.outer(ids, ids) & ~np.eye(len(ids), dtype=bool)
    total = 0.0
    for mat in (logits, logits.T):
        masked = np.where(same, -np.inf, mat)
        total += float(np.sum(np.log(np.exp(masked).sum(axis=1)) - np.diag(mat)))
    return total / (2 * len(ids))


@pytest.mark.parametrize("ids", [None, [0, 1, 2, 3, 4, 5], [7, 3, 7, 1, 3, 9]])
def test_value_matches_loop_and_numpy_reference(ids: list[int] | None) -> None:
    a, b = normed(6, 4, 0), normed(6, 4, 1)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    id_t = torch.tensor(ids) if ids is not None else None
    loss = infonce_loss(a, b, scale, ids=id_t)
    torch.testing.assert_close(loss, loop_infonce(a, b, scale, ids), rtol=1e-12, atol=1e-12)
    ref_ids = ids if ids is not None else list(range(6))
    assert loss.item() == pytest.approx(numpy_infonce(a.numpy(), b.numpy(), scale.item(), ref_ids), rel=1e-10)


@pytest.mark.parametrize("ids", [None, [7, 3, 7, 1, 3, 9]])
def test_gradient_matches_loop_autograd(ids: list[int] | None) -> None:
    a, b = normed(6, 4, 2).requires_grad_(), normed(6, 4, 3).requires_grad_()
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    id_t = torch.tensor(ids) if ids is not None else None
    got = torch.autograd.grad(infonce_loss(a, b, scale, ids=id_t), (a, b, scale))
    want = torch.autograd.grad(loop_infonce(a, b, scale, ids), (a, b, scale))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        assert g.abs().sum() > 0


def test_gradient_matches_finite_differences() -> None:
    a, b = normed(5, 3, 4).requires_grad_(), normed(5, 3, 5).requires_grad_()
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 0, 2, 3])
    assert torch.autograd.gradcheck(lambda x, y, s: infonce_loss(x, y, s, ids=ids), (a, b, scale))


def test_shared_ids_are_not_negatives() -> None:
    a, b = normed(6, 4, 6), normed(6, 4, 7)
    scale = torch.tensor(2.0, dtype=torch.float64)
    plain = infonce_loss(a, b, scale)
    shared = infonce_loss(a, b, scale, ids=torch.tensor([0, 0, 1, 2, 3, 4]))
    assert shared < plain  # removing negatives strictly lowers every affected cross-entropy
    torch.testing.assert_close(shared, loop_infonce(a, b, scale, [0, 0, 1, 2, 3, 4]))


def test_perfect_alignment_gives_zero_loss() -> None:
    eye = torch.eye(8, dtype=torch.float64)
    loss = infonce_loss(eye, eye.clone(), torch.tensor(math.log(100.0), dtype=torch.float64))
    assert 0.0 <= loss.item() < 1e-12


def test_identical_embeddings_give_log_n() -> None:
    v = normed(1, 5, 8).expand(7, 5)
    loss = infonce_loss(v, v, torch.tensor(3.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log(7), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9), scale=st.floats(-1.0, 4.0))
def test_permuting_the_batch_leaves_the_loss_unchanged(seed: int, n: int, scale: float) -> None:
    a, b = normed(n, 3, seed), normed(n, 3, seed + 1)
    ids = torch.randint(0, max(2, n // 2), (n,), generator=torch.Generator().manual_seed(seed))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))
    s = torch.tensor(scale, dtype=torch.float64)
    torch.testing.assert_close(infonce_loss(a, b, s, ids), infonce_loss(a[perm], b[perm], s, ids[perm]))


def test_gather_without_process_group_is_local() -> None:
    a, b = normed(5, 3, 9), normed(5, 3, 10)
    s = torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(infonce_loss(a, b, s, gather=True), infonce_loss(a, b, s))


@pytest.mark.parametrize(
    ("a", "b", "scale", "ids", "match"),
    [
        (torch.zeros(4, 3), torch.zeros(5, 3), torch.tensor(1.0), None, r"\(4, 3\).*\(5, 3\)"),
        (torch.zeros(4), torch.zeros(4), torch.tensor(1.0), None, r"\(4,\)"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(2), None, r"logit_scale.*\(2,\)"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.tensor(1.0), torch.zeros(3), r"ids.*\(3,\)"),
        (torch.zeros(0, 3), torch.zeros(0, 3), torch.tensor(1.0), None, "empty"),
    ],
)
def test_bad_inputs_raise(a: Tensor, b: Tensor, scale: Tensor, ids: Tensor | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        infonce_loss(a, b, scale, ids=ids)


def make_outputs(n: int, scale: float | None = 2.0) -> tuple[Outputs, Batch]:
    emb = {"image": normed(n, 4, 11, torch.float32).requires_grad_(), "text": normed(n, 4, 12, torch.float32)}
    logit_scale = torch.tensor(scale, requires_grad=True) if scale is not None else None
    outputs = Outputs(embeddings=emb, logit_scale=logit_scale)
    batch = Batch(data={}, present={}, ids=torch.arange(n))
    return outputs, batch


def test_module_uses_only_paired_rows_and_reports_metrics() -> None:
    outputs, batch = make_outputs(6)
    batch.present = {
        "image": torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool),
        "text": torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool),
    }
    batch.ids = torch.tensor([0, 1, 2, 1, 4, 5])
    obj = create("objective", "infonce", modalities=["image", "text"])
    assert isinstance(obj, InfoNCE)
    out = obj(outputs, batch)
    keep = torch.tensor([0, 1, 3, 5])
    a, b = outputs.embeddings["image"][keep], outputs.embeddings["text"][keep]
    assert outputs.logit_scale is not None
    torch.testing.assert_close(out.loss, infonce_loss(a, b, outputs.logit_scale, batch.ids[keep]))
    assert out.parts == {"infonce": out.loss}
    assert out.metrics["temperature"] == pytest.approx(math.exp(-2.0))
    assert out.metrics["paired"] == 4
    assert 0.0 <= out.metrics["acc_a2b"] <= 1.0 and 0.0 <= out.metrics["acc_b2a"] <= 1.0


def test_module_accuracy_is_one_for_aligned_embeddings() -> None:
    eye = torch.eye(5)
    out = InfoNCE(["a", "b"])(
        Outputs(embeddings={"a": eye, "b": eye}, logit_scale=torch.tensor(1.0)),
        Batch(data={}, present={}, ids=torch.arange(5)),
    )
    assert out.metrics["acc_a2b"] == 1.0 and out.metrics["acc_b2a"] == 1.0


@pytest.mark.parametrize("paired", [0, 1])
def test_module_with_fewer_than_two_pairs_gives_connected_zero(paired: int) -> None:
    outputs, batch = make_outputs(4)
    batch.present = {"image": torch.arange(4) < paired, "text": torch.ones(4, dtype=torch.bool)}
    out = InfoNCE(["image", "text"])(outputs, batch)
    assert out.loss.item() == 0.0 and out.metrics["paired"] == paired
    out.loss.backward()
    grad = outputs.embeddings["image"].grad
    assert grad is not None and torch.equal(grad, torch.zeros_like(grad))


def test_module_errors_name_the_problem() -> None:
    outputs, batch = make_outputs(4, scale=None)
    with pytest.raises(ValueError, match="logit_scale"):
        InfoNCE(["image", "text"])(outputs, batch)
    outputs, batch = make_outputs(4)
    with pytest.raises(ConfigError, match=r"'audio'.*allowed: image, text"):
        InfoNCE(["image", "audio"])(outputs, batch)
    with pytest.raises(ConfigError, match="two distinct"):
        InfoNCE(["image"])
    with pytest.raises(ConfigError, match="two distinct"):
        InfoNCE(["image", "image"])
