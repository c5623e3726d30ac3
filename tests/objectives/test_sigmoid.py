"""Reference tests of the SigLIP pairwise sigmoid loss."""

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
from modalign.objectives import SigmoidLoss, sigmoid_loss


def normed(n: int, e: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g, dtype=dtype), dim=-1)


def loop_sigmoid(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, ids: list[int] | None = None) -> Tensor:
    """Direct formula with Python loops over scalar tensors."""
    n = a.shape[0]
    ids = ids if ids is not None else list(range(n))
    total = torch.zeros((), dtype=a.dtype)
    for i in range(n):
        for j in range(n):
            z = torch.exp(scale) * (a[i] * b[j]).sum() + bias
            label = 1.0 if ids[i] == ids[j] else -1.0
            total = total + torch.log1p(torch.exp(-label * z))
    return total / n


def numpy_sigmoid(a: np.ndarray, b: np.ndarray, scale: float, bias: float, ids: list[int]) -> float:
    z = math.exp(scale) * a @ b.T + bias
    labels = np.where(np.equal.outer(ids, ids), 1.0, -1.0)
    return float(np.log1p(np.exp(-labels * z)).sum() / len(ids))


@pytest.mark.parametrize("ids", [None, [4, 2, 4, 0, 2, 9]])
def test_value_matches_loop_and_numpy_reference(ids: list[int] | None) -> None:
    a, b = normed(6, 4, 0), normed(6, 4, 1)
    scale, bias = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    id_t = torch.tensor(ids) if ids is not None else None
    loss = sigmoid_loss(a, b, scale, bias, ids=id_t)
    torch.testing.assert_close(loss, loop_sigmoid(a, b, scale, bias, ids), rtol=1e-12, atol=1e-12)
    ref_ids = ids if ids is not None else list(range(6))
    want = numpy_sigmoid(a.numpy(), b.numpy(), scale.item(), bias.item(), ref_ids)
    assert loss.item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("ids", [None, [4, 2, 4, 0, 2, 9]])
def test_gradient_matches_loop_autograd(ids: list[int] | None) -> None:
    a, b = normed(6, 4, 2).requires_grad_(), normed(6, 4, 3).requires_grad_()
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    id_t = torch.tensor(ids) if ids is not None else None
    got = torch.autograd.grad(sigmoid_loss(a, b, scale, bias, ids=id_t), (a, b, scale, bias))
    want = torch.autograd.grad(loop_sigmoid(a, b, scale, bias, ids), (a, b, scale, bias))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        assert g.abs().sum() > 0


def test_gradient_matches_finite_differences() -> None:
    a, b = normed(5, 3, 4).requires_grad_(), normed(5, 3, 5).requires_grad_()
    scale = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 0, 2, 3])
    assert torch.autograd.gradcheck(lambda x, y, s, c: sigmoid_loss(x, y, s, c, ids=ids), (a, b, scale, bias))


def test_shared_ids_are_positives() -> None:
    v = normed(1, 4, 6).expand(4, 4)
    scale, bias = torch.tensor(math.log(20.0), dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    # all four rows are the same content: every pair is a positive with logit 20 - 10 = 10
    same = sigmoid_loss(v, v, scale, bias, ids=torch.zeros(4, dtype=torch.long))
    assert same.item() == pytest.approx(4 * math.log1p(math.exp(-10.0)), rel=1e-12)
    distinct = sigmoid_loss(v, v, scale, bias)
    want = math.log1p(math.exp(-10.0)) + 3 * math.log1p(math.exp(10.0))
    assert distinct.item() == pytest.approx(want, rel=1e-12)


def test_perfect_alignment_gives_zero_loss() -> None:
    eye = torch.eye(8, dtype=torch.float64)
    loss = sigmoid_loss(
        eye, eye.clone(), torch.tensor(math.log(100.0), dtype=torch.float64), torch.tensor(-50.0, dtype=torch.float64)
    )
    assert 0.0 <= loss.item() < 1e-18


def test_zero_logits_give_n_log_two() -> None:
    a = torch.eye(6, dtype=torch.float64)[:3]
    b = torch.eye(6, dtype=torch.float64)[3:]  # a @ b.T == 0
    loss = sigmoid_loss(a, b, torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(3 * math.log(2.0), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9), scale=st.floats(-1.0, 4.0), bias=st.floats(-10, 10))
def test_permuting_the_batch_leaves_the_loss_unchanged(seed: int, n: int, scale: float, bias: float) -> None:
    a, b = normed(n, 3, seed), normed(n, 3, seed + 1)
    ids = torch.randint(0, max(2, n // 2), (n,), generator=torch.Generator().manual_seed(seed))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))
    s, c = torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
    torch.testing.assert_close(sigmoid_loss(a, b, s, c, ids), sigmoid_loss(a[perm], b[perm], s, c, ids[perm]))


@pytest.mark.parametrize(
    ("a", "b", "bias", "match"),
    [
        (torch.zeros(4, 3), torch.zeros(4, 2), torch.tensor(0.0), r"\(4, 3\).*\(4, 2\)"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(1, 2), r"logit_bias.*\(1, 2\)"),
        (torch.zeros(0, 3), torch.zeros(0, 3), torch.tensor(0.0), "empty"),
    ],
)
def test_bad_inputs_raise(a: Tensor, b: Tensor, bias: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sigmoid_loss(a, b, torch.tensor(1.0), bias)


def make_outputs(n: int) -> tuple[Outputs, Batch]:
    emb = {"audio": normed(n, 4, 11, torch.float32).requires_grad_(), "text": normed(n, 4, 12, torch.float32)}
    return Outputs(embeddings=emb), Batch(data={}, present={}, ids=torch.arange(n))


def test_module_uses_only_paired_rows_and_reports_metrics() -> None:
    outputs, batch = make_outputs(5)
    batch.present = {"audio": torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool)}
    obj = create("objective", "sigmoid", modalities=["audio", "text"], temperature=math.exp(-1.0), bias=-3.0)
    assert isinstance(obj, SigmoidLoss)
    out = obj(outputs, batch)
    keep = torch.tensor([0, 2, 3, 4])
    want = sigmoid_loss(
        outputs.embeddings["audio"][keep],
        outputs.embeddings["text"][keep],
        torch.tensor(1.0),
        torch.tensor(-3.0),
        batch.ids[keep],
    )
    torch.testing.assert_close(out.loss, want)
    assert out.metrics["temperature"] == pytest.approx(math.exp(-1.0))
    assert out.metrics["bias"] == pytest.approx(-3.0) and out.metrics["paired"] == 4
    assert {"acc_a2b", "acc_b2a"} <= set(out.metrics)
    out.loss.backward()
    assert obj.logit_bias.grad is not None and obj.scale.logit_scale.grad is not None


def test_module_per_modality_ids_make_a_shared_b_row_a_positive() -> None:
    outputs, batch = make_outputs(4)
    batch.modality_ids = {"text": torch.tensor([0, 1, 0, 2])}  # rows 0 and 2 share one text
    obj = SigmoidLoss(["audio", "text"], temperature=1.0, bias=0.0)
    a, b = outputs.embeddings["audio"], outputs.embeddings["text"]
    want = sigmoid_loss(a, b, torch.tensor(0.0), torch.tensor(0.0), torch.arange(4), ids_b=torch.tensor([0, 1, 0, 2]))
    torch.testing.assert_close(obj(outputs, batch).loss, want)
    # the explicit positive-label formula: rows 0 and 2 are positives of each other
    logits = (a @ b.T).detach().double()
    labels = -torch.ones(4, 4, dtype=torch.float64)
    labels[torch.arange(4), torch.arange(4)] = 1.0
    labels[0, 2] = labels[2, 0] = 1.0
    ref = -torch.nn.functional.logsigmoid(labels * logits).sum() / 4
    torch.testing.assert_close(want.double().detach(), ref, rtol=1e-5, atol=1e-6)


def test_module_with_fewer_than_two_pairs_gives_connected_zero() -> None:
    outputs, batch = make_outputs(3)
    batch.present = {"audio": torch.tensor([0, 0, 1], dtype=torch.bool)}
    out = SigmoidLoss(["audio", "text"])(outputs, batch)
    assert out.loss.item() == 0.0 and out.metrics["paired"] == 1
    out.loss.backward()
    assert outputs.embeddings["audio"].grad is not None


def test_module_with_a_modality_absent_from_the_batch_gives_connected_zero() -> None:
    outputs, batch = make_outputs(3)
    del outputs.embeddings["text"]
    out = SigmoidLoss(["audio", "text"])(outputs, batch)
    assert out.loss.item() == 0.0 and out.metrics["paired"] == 0
    out.loss.backward()
    assert outputs.embeddings["audio"].grad is not None


def test_module_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="two distinct"):
        SigmoidLoss(["audio", "text", "image"])
    with pytest.raises(ConfigError, match="temperature: must be > 0"):
        SigmoidLoss(["audio", "text"], temperature=0.0)
