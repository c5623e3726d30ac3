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


def make_outputs(n: int) -> tuple[Outputs, Batch]:
    emb = {"image": normed(n, 4, 11, torch.float32).requires_grad_(), "text": normed(n, 4, 12, torch.float32)}
    return Outputs(embeddings=emb), Batch(data={}, present={}, ids=torch.arange(n))


def test_module_uses_only_paired_rows_and_reports_metrics() -> None:
    outputs, batch = make_outputs(6)
    batch.present = {
        "image": torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool),
        "text": torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool),
    }
    batch.ids = torch.tensor([0, 1, 2, 1, 4, 5])
    obj = create("objective", "infonce", modalities=["image", "text"], temperature=math.exp(-2.0))
    assert isinstance(obj, InfoNCE)
    out = obj(outputs, batch)
    keep = torch.tensor([0, 1, 3, 5])
    a, b = outputs.embeddings["image"][keep], outputs.embeddings["text"][keep]
    torch.testing.assert_close(out.loss, infonce_loss(a, b, torch.tensor(2.0), batch.ids[keep]))
    assert out.metrics["temperature"] == pytest.approx(math.exp(-2.0))
    assert out.metrics["paired"] == 4
    assert 0.0 <= out.metrics["acc_a2b"] <= 1.0 and 0.0 <= out.metrics["acc_b2a"] <= 1.0
    out.loss.backward()
    assert obj.scale.logit_scale.grad is not None


def test_module_temperature_is_clamped_and_can_be_fixed() -> None:
    obj = InfoNCE(["image", "text"], temperature=0.001, max_logit_scale=50.0, learn_temperature=False)
    assert obj.scale().item() == pytest.approx(math.log(50.0))
    assert not obj.scale.logit_scale.requires_grad


def test_module_accuracy_is_one_for_aligned_embeddings() -> None:
    eye = torch.eye(5)
    out = InfoNCE(["a", "b"])(Outputs(embeddings={"a": eye, "b": eye}), Batch(data={}, present={}, ids=torch.arange(5)))
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


def test_module_with_a_modality_absent_from_the_batch_gives_connected_zero() -> None:
    outputs, batch = make_outputs(4)
    del outputs.embeddings["text"]
    out = InfoNCE(["image", "text"])(outputs, batch)
    assert out.loss.item() == 0.0 and out.metrics["paired"] == 0
    out.loss.backward()
    assert outputs.embeddings["image"].grad is not None


def test_module_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="two distinct"):
        InfoNCE(["image"])
    with pytest.raises(ConfigError, match="two distinct"):
        InfoNCE(["image", "image"])
    with pytest.raises(ValueError, match="no modalities given"):
        _ = InfoNCE().modalities


def test_bind_resolves_and_checks_modalities() -> None:
    model = torch.nn.Module()
    model.modalities = ("audio", "image")  # type: ignore[assignment]
    obj = InfoNCE()
    obj.bind(model)
    assert obj.modalities == ("audio", "image")
    with pytest.raises(ConfigError, match=r"modalities: infonce: the model has no encoder for \['text'\]"):
        InfoNCE(["image", "text"]).bind(model)
    model.modalities = ("audio", "image", "text")  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="two distinct"):
        InfoNCE().bind(model)


# ---- per-modality ids and multi-positive InfoNCE ------------------------------------------------


def loop_multi_positive(a: Tensor, b: Tensor, logit_scale: Tensor, ids_a: list[int], ids_b: list[int]) -> Tensor:
    """-1/|P_i| sum_{j in P_i} log softmax_j, both directions, with P_i = same a or same b content."""
    n = a.shape[0]
    s = torch.exp(logit_scale)
    total = torch.zeros((), dtype=a.dtype)
    for q, k in ((a, b), (b, a)):
        for i in range(n):
            logits = torch.stack([s * (q[i] * k[j]).sum() for j in range(n)])
            log_norm = torch.log(logits.exp().sum())
            pos = [j for j in range(n) if ids_a[j] == ids_a[i] or ids_b[j] == ids_b[i]]
            total = total - sum(logits[j] - log_norm for j in pos) / len(pos)
    return total / (2 * n)


def loop_masked_two_ids(a: Tensor, b: Tensor, logit_scale: Tensor, ids_a: list[int], ids_b: list[int]) -> Tensor:
    """InfoNCE whose softmax leaves out every other same-content row (same a or same b)."""
    n = a.shape[0]
    s = torch.exp(logit_scale)
    total = torch.zeros((), dtype=a.dtype)
    for q, k in ((a, b), (b, a)):
        for i in range(n):
            keep = [j for j in range(n) if j == i or (ids_a[j] != ids_a[i] and ids_b[j] != ids_b[i])]
            terms = torch.stack([s * (q[i] * k[j]).sum() for j in keep])
            total = total + torch.log(terms.exp().sum()) - s * (q[i] * k[i]).sum()
    return total / (2 * n)


IDS_A = [0, 1, 2, 3, 1, 5]
IDS_B = [7, 8, 7, 9, 10, 11]  # rows 0 and 2 share a b; rows 1 and 4 share an a


@pytest.mark.parametrize("multi", [False, True])
def test_two_id_sets_match_loop_reference_value_and_gradient(multi: bool) -> None:
    a, b = normed(6, 4, 20).requires_grad_(), normed(6, 4, 21).requires_grad_()
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    loss = infonce_loss(a, b, scale, torch.tensor(IDS_A), ids_b=torch.tensor(IDS_B), multi_positive=multi)
    ref_fn = loop_multi_positive if multi else loop_masked_two_ids
    ref = ref_fn(a, b, scale, IDS_A, IDS_B)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(loss, (a, b, scale))
    want = torch.autograd.grad(ref, (a, b, scale))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_multi_positive_with_distinct_ids_equals_plain_infonce() -> None:
    a, b = normed(7, 3, 30), normed(7, 3, 31)
    s = torch.tensor(2.0, dtype=torch.float64)
    torch.testing.assert_close(infonce_loss(a, b, s, multi_positive=True), infonce_loss(a, b, s))


def test_multi_positive_minimum_is_log_of_positive_count_for_duplicates() -> None:
    # two copies of each item, perfectly aligned, at a huge scale: each row's positives split the
    # probability evenly, so the loss tends to log(2)
    base = torch.eye(3, dtype=torch.float64)
    a = torch.cat([base, base])
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = infonce_loss(a, a.clone(), torch.tensor(6.0, dtype=torch.float64), ids, multi_positive=True)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-3)


def test_module_reads_per_modality_ids() -> None:
    outputs, batch = make_outputs(6)
    batch.ids = torch.tensor(IDS_A)
    batch.modality_ids = {"text": torch.tensor(IDS_B)}
    obj = InfoNCE(["image", "text"], temperature=1.0, multi_positive=True)
    a, b = outputs.embeddings["image"], outputs.embeddings["text"]
    want = infonce_loss(a, b, torch.tensor(0.0), batch.ids, ids_b=torch.tensor(IDS_B), multi_positive=True)
    torch.testing.assert_close(obj(outputs, batch).loss, want)
