"""Within-modality instance discrimination: ``unimodal_infonce_loss`` and the ``unimodal_infonce`` objective.

The loss is checked against a direct loop over anchors and positives (SupCon "L_out", anchor
left out of its denominator) in float64, value and gradient; two views per content against
SimCLR's NT-Xent (``nt_xent_loss``); the module on hand-built batches (present rows only, mean
over modalities, missing modalities, connected zero), its projection head, its argument errors
and its registration in a composite recipe.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core import Batch, ConfigError, ModalitySpec, Outputs
from modalign.core.registry import create, lookup
from modalign.methods import Method
from modalign.objectives import UnimodalInfoNCE, nt_xent_loss, unimodal_infonce_loss
from modalign.objectives.unimodal import feature_neighbours, positive_infonce_loss
from support.reference import assert_same_value_and_grad, composite_method, leaves, normed

F64 = torch.float64
SCALE = torch.tensor(math.log(1 / 0.2), dtype=F64)
EMBED = 16
SPECS = {"x": ModalitySpec("vector", channels=32), "y": ModalitySpec("vector", channels=32)}


def loop_loss(z: Tensor, content: list[int], logit_scale: Tensor) -> Tensor:
    """Mean over anchors ``i`` of ``-(1/|P(i)|) sum_p log(exp(s_ip) / sum_{k != i} exp(s_ik))``."""
    s = logit_scale.exp()
    n = len(content)
    terms = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and content[p] == content[i]]
        if not positives:
            continue
        den = torch.stack([torch.exp(s * (z[i] * z[k]).sum()) for k in range(n) if k != i]).sum()
        logs = [torch.log(torch.exp(s * (z[i] * z[p]).sum()) / den) for p in positives]
        terms.append(-torch.stack(logs).sum() / len(positives))
    return torch.stack(terms).mean()


# ---------------------------------------------------------------- unimodal_infonce_loss

CONTENTS = [
    [0, 1, 2, 0, 1, 2],  # two views each (SimCLR)
    [0, 1, 0, 2, 3, 1],  # rows 3 and 4 have no positive: negatives only
    [5, 5, 5, 7, 7, 9, 4],  # a group of three views, a pair, two singletons
]


@pytest.mark.parametrize("content", CONTENTS)
def test_loss_equals_the_loop_formula_value_and_gradient(content: list[int]) -> None:
    z = normed(len(content), 4, 0)
    ids = torch.tensor(content)
    assert_same_value_and_grad(
        lambda z, s: unimodal_infonce_loss(z, ids, s), lambda z, s: loop_loss(z, content, s), z, SCALE
    )


def test_two_views_per_content_is_simclr_nt_xent() -> None:
    a, b = normed(5, 6, 1), normed(5, 6, 2)
    content = torch.arange(5).repeat(2)
    loss = unimodal_infonce_loss(torch.cat([a, b]), content, SCALE)
    torch.testing.assert_close(loss, nt_xent_loss(a, b, 0.2), rtol=1e-10, atol=0)


def test_rows_without_positive_are_negatives_of_the_anchors() -> None:
    z = normed(5, 4, 3)
    with_singletons = unimodal_infonce_loss(z, torch.tensor([0, 0, 1, 1, 2]), SCALE)
    without = unimodal_infonce_loss(z[:4], torch.tensor([0, 0, 1, 1]), SCALE)
    assert float(with_singletons) > float(without)  # one more term in every denominator
    z = leaves(z)[0]
    unimodal_infonce_loss(z, torch.tensor([0, 0, 1, 1, 2]), SCALE).backward()
    assert z.grad is not None and float(z.grad[4].abs().sum()) > 0.0


@pytest.mark.parametrize("n", [0, 1, 4])
def test_no_anchor_gives_a_connected_zero(n: int) -> None:
    z, s = leaves(normed(n, 4, 4), SCALE)
    loss = unimodal_infonce_loss(z, torch.arange(n), s)  # all singletons
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert z.grad is not None and s.grad is not None
    assert float(z.grad.abs().sum()) == 0.0 and float(s.grad.abs()) == 0.0


def test_bad_shapes_are_refused() -> None:
    z = normed(4, 3, 5)
    with pytest.raises(ValueError, match="z must be"):
        unimodal_infonce_loss(z[0], torch.arange(3), SCALE)
    with pytest.raises(ValueError, match="content must be"):
        unimodal_infonce_loss(z, torch.arange(3), SCALE)
    with pytest.raises(ValueError, match="logit_scale"):
        unimodal_infonce_loss(z, torch.arange(4), SCALE.repeat(2))


# ---------------------------------------------------------------- the module on hand-built batches


def hand_built(learn: bool = True) -> tuple[UnimodalInfoNCE, Outputs, Batch]:
    """8 rows; x observed on 0-5, y on 2-7; views: x contents 1 (rows 0, 3), 2 (rows 1, 4, 5);
    y contents 7 (rows 2, 6). Absent rows carry ids that would make extra views if they were read."""
    obj = UnimodalInfoNCE(["x", "y"], temperature=0.2, learn_temperature=learn).double()
    x_rows = torch.tensor([True] * 6 + [False] * 2)
    y_rows = torch.tensor([False] * 2 + [True] * 6)
    x = (normed(8, 4, 10) * x_rows[:, None]).requires_grad_()
    y = (normed(8, 4, 11) * y_rows[:, None]).requires_grad_()
    batch = Batch(
        data={"x": torch.zeros(8, 1), "y": torch.zeros(8, 1)},
        present={"x": x_rows, "y": y_rows},
        ids=torch.arange(100, 108),
        modality_ids={
            "x": torch.tensor([1, 2, 3, 1, 2, 2, 3, 1]),
            "y": torch.tensor([2, 2, 7, 4, 5, 6, 7, 4]),
        },
    )
    return obj, Outputs(embeddings={"x": x, "y": y}), batch


X_CONTENT, Y_CONTENT = [1, 2, 3, 1, 2, 2], [7, 4, 5, 6, 7, 4]


def test_module_uses_present_rows_and_averages_the_modalities() -> None:
    obj, outputs, batch = hand_built()
    out = obj(outputs, batch)
    x, y = outputs.embeddings["x"], outputs.embeddings["y"]
    scale = obj.scale.logit_scale
    ref_x = loop_loss(F.normalize(x[:6], dim=-1), X_CONTENT, scale)
    ref_y = loop_loss(F.normalize(y[2:], dim=-1), Y_CONTENT, scale)
    ref = 0.5 * (ref_x + ref_y)
    torch.testing.assert_close(out.loss, ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out.parts["x"], ref_x, rtol=1e-8, atol=1e-10)
    got = torch.autograd.grad(out.loss, (x, y, scale))
    want = torch.autograd.grad(ref, (x, y, scale))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    assert float(got[0][6:].abs().sum()) == 0.0 and float(got[1][:2].abs().sum()) == 0.0  # absent rows
    assert out.metrics["anchors"] == 9.0  # x: 0, 1, 3, 4, 5; y: 2, 3, 6, 7
    assert out.metrics["anchors/x"] == 5.0 and out.metrics["anchors/y"] == 4.0
    assert out.metrics["temperature"] == pytest.approx(0.2)
    assert 0.0 <= out.metrics["top1"] <= 1.0


def test_top1_counts_anchors_whose_nearest_row_is_a_view() -> None:
    obj, outputs, batch = hand_built()
    x = outputs.embeddings["x"].detach().clone()
    x[3], x[4], x[5] = x[0], x[1], x[1]  # identical views: every x anchor finds one
    outputs = Outputs(embeddings={"x": x})
    out = obj(outputs, batch)
    assert out.metrics["top1"] == 1.0 and out.metrics["top1/x"] == 1.0
    e = torch.eye(4, dtype=F64)
    far = torch.zeros(8, 4, dtype=F64)
    far[0], far[3] = e[0], e[0]  # content 1: views agree (2 hits)
    far[1], far[2] = e[1], e[1]  # content 2's row 1 is nearest the singleton row 2 (a miss)
    far[4], far[5] = F.normalize(e[2] + 0.5 * e[3], dim=0), F.normalize(e[3] + 0.5 * e[2], dim=0)  # 2 hits
    out = obj(Outputs(embeddings={"x": far}), batch)
    assert out.metrics["anchors"] == 5.0 and out.metrics["top1"] == pytest.approx(0.8)


def test_a_modality_missing_from_the_batch_is_skipped() -> None:
    obj, outputs, batch = hand_built()
    x = outputs.embeddings["x"]
    out = obj(Outputs(embeddings={"x": x}), batch.select(["x"]))
    ref = loop_loss(F.normalize(x[:6], dim=-1), X_CONTENT, obj.scale.logit_scale)
    torch.testing.assert_close(out.loss, ref, rtol=1e-8, atol=1e-10)
    assert set(out.parts) == {"x"} and "anchors/y" not in out.metrics


def test_a_modality_without_views_is_left_out_of_the_mean() -> None:
    obj, outputs, batch = hand_built()
    batch.modality_ids["y"] = torch.arange(8)  # y rows all distinct
    out = obj(outputs, batch)
    x = outputs.embeddings["x"]
    torch.testing.assert_close(out.loss, loop_loss(F.normalize(x[:6], dim=-1), X_CONTENT, obj.scale.logit_scale))
    assert set(out.parts) == {"x"} and out.metrics["anchors/y"] == 0.0


def test_no_anchor_anywhere_gives_a_connected_zero() -> None:
    obj, outputs, batch = hand_built()
    batch.modality_ids = {}  # the sample ids: all distinct
    out = obj(outputs, batch)
    assert float(out.loss.detach()) == 0.0 and out.metrics["anchors"] == 0.0 and "top1" not in out.metrics
    grads = torch.autograd.grad(out.loss, (outputs.embeddings["x"], outputs.embeddings["y"], obj.scale.logit_scale))
    assert all(float(g.abs().sum()) == 0.0 for g in grads)
    out = obj(Outputs(embeddings={}), batch.select([]))  # nothing observed at all
    assert float(out.loss.detach()) == 0.0


def test_temperature_is_fixed_by_default() -> None:
    obj = UnimodalInfoNCE(["x"])
    assert not obj.scale.logit_scale.requires_grad
    assert float(obj.scale()) == pytest.approx(math.log(10.0))


# ---------------------------------------------------------------- arguments, registration, recipes


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"dim": 0}, "dim"),
        ({"max_logit_scale": 0.0}, "max_logit_scale"),
        ({"modalities": []}, "modalities"),
        ({"modalities": ["x", "x"]}, "modalities"),
        ({"neighbours": -1}, "neighbours"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        UnimodalInfoNCE(**kwargs)
    assert info.value.path == key


def test_registered() -> None:
    assert lookup("objective", "unimodal_infonce") is UnimodalInfoNCE
    obj = create("objective", "unimodal_infonce", modalities=["x"], dim=8)
    assert isinstance(obj, UnimodalInfoNCE) and obj.dim == 8


def make_method(objectives: list[dict[str, Any]], seed: int = 0) -> Method:
    return composite_method(objectives, SPECS, EMBED, seed)


def the_objective(method: Method) -> UnimodalInfoNCE:
    (obj,) = [o for o in method.objectives.values() if isinstance(o, UnimodalInfoNCE)]
    return obj


def test_builds_from_a_composite_recipe_with_default_modalities_and_weight() -> None:
    method = make_method([{"name": "infonce"}, {"name": "unimodal_infonce", "label": "views", "weight": 0.25}])
    obj = the_objective(method)
    assert obj.modalities == ("x", "y") and method.weights["views"] == 0.25
    assert len(obj.heads) == 0


def test_bad_recipe_arguments_and_unknown_modalities_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="dim"):
        make_method([{"name": "unimodal_infonce", "dim": 0}])
    with pytest.raises(ConfigError, match="modalities"):
        make_method([{"name": "unimodal_infonce", "modalities": ["x", "z"]}])


def view_batch() -> Batch:
    """6 rows, both modalities observed on rows 0-4; views: sample 0 twice, sample 1 twice."""
    g = torch.Generator().manual_seed(7)
    present = torch.tensor([True] * 5 + [False])
    return Batch(
        data={m: torch.randn(6, 32, generator=g) * present[:, None] for m in SPECS},
        present={m: present for m in SPECS},
        ids=torch.tensor([0, 0, 1, 1, 2, 3]),
    )


def test_projection_head_changes_the_loss_and_is_trained() -> None:
    method = make_method([{"name": "unimodal_infonce", "dim": 8}])
    obj = the_objective(method)
    assert set(obj.heads) == {"x", "y"}
    first, last = obj.heads["x"][0], obj.heads["x"][2]
    assert (first.in_features, first.out_features, last.out_features) == (EMBED, EMBED, 8)
    batch = view_batch()
    outputs = method(batch)
    out = method.loss(outputs, batch)
    plain = UnimodalInfoNCE(["x", "y"])(outputs, batch)
    assert out.metrics["unimodal_infonce/anchors"] == 8.0
    assert not torch.allclose(out.parts["unimodal_infonce"], plain.loss)
    out.loss.backward()
    for head in obj.heads.values():
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in head.parameters())
    encoder_grads = [p.grad for p in method.model.encoders["x"].parameters()]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in encoder_grads)


def test_heads_need_bind_and_get_zero_gradients_without_views() -> None:
    obj = UnimodalInfoNCE(["x"], dim=4)
    _, outputs, batch = hand_built()
    with pytest.raises(ValueError, match="bind"):
        obj(Outputs(embeddings={"x": outputs.embeddings["x"].float()}), batch)
    method = make_method([{"name": "unimodal_infonce", "dim": 8}])
    batch = view_batch()
    batch.ids = torch.arange(6)  # no views
    out = method.training_step(batch)
    assert float(out.loss.detach()) == 0.0
    out.loss.backward()
    trained = [p for p in the_objective(method).parameters() if p.requires_grad]
    assert len(trained) == 8  # two heads of two linear layers (the temperature is fixed)
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0.0 for p in trained)


# ---------------------------------------------------------------- feature neighbours as positives


def loop_positive_loss(z: Tensor, positive: list[list[int]], logit_scale: Tensor) -> Tensor:
    """Mean over rows with positives of ``-(1/|P(i)|) sum_{p in P(i)} log(exp(s_ip) / sum_{k != i} exp(s_ik))``."""
    s = logit_scale.exp()
    n = z.shape[0]
    terms = []
    for i in range(n):
        if not positive[i]:
            continue
        den = torch.stack([torch.exp(s * (z[i] * z[k]).sum()) for k in range(n) if k != i]).sum()
        logs = [torch.log(torch.exp(s * (z[i] * z[p]).sum()) / den) for p in positive[i]]
        terms.append(-torch.stack(logs).sum() / len(positive[i]))
    return torch.stack(terms).mean()


def loop_neighbours(features: Tensor, content: list[int], k: int) -> list[list[int]]:
    """Each row's ``k`` rows of other content with the largest cosine, by sorting."""
    unit = F.normalize(features, dim=1)
    out = []
    for i in range(len(content)):
        others = [j for j in range(len(content)) if content[j] != content[i]]
        others.sort(key=lambda j: -float(unit[i] @ unit[j]))
        out.append(sorted(others[:k]))
    return out


@pytest.mark.parametrize("k", [0, 1, 2, 5, 9])
def test_feature_neighbours_equal_a_sort_and_skip_own_content(k: int) -> None:
    features = torch.randn(7, 5, generator=torch.Generator().manual_seed(k), dtype=F64)
    content = [0, 1, 0, 2, 3, 3, 4]
    got = feature_neighbours(features, torch.tensor(content), k)
    want = loop_neighbours(features, content, k)
    assert [sorted(torch.nonzero(r).squeeze(1).tolist()) for r in got] == want
    assert not bool((got & (torch.tensor(content)[:, None] == torch.tensor(content)[None, :])).any())


def test_positive_loss_equals_the_loop_formula_value_and_gradient() -> None:
    z = normed(6, 4, 20)
    positive = [[1, 2], [], [0], [4, 5, 0], [], [3]]
    mask = torch.zeros(6, 6, dtype=torch.bool)
    for i, row in enumerate(positive):
        mask[i, row] = True
    mask[4, 4] = True  # the diagonal is ignored: row 4 has no positive
    assert_same_value_and_grad(
        lambda z, s: positive_infonce_loss(z, mask, s), lambda z, s: loop_positive_loss(z, positive, s), z, SCALE
    )


def test_neighbours_add_the_pooled_features_nearest_rows_to_the_views() -> None:
    obj, outputs, batch = hand_built()
    obj.neighbours = 2
    pooled = {
        "x": torch.randn(8, 3, generator=torch.Generator().manual_seed(3), dtype=F64),
        "y": torch.randn(8, 3, dtype=F64),
    }
    outputs = Outputs(embeddings=outputs.embeddings, pooled=pooled)
    out = obj(outputs, batch)
    scale = obj.scale.logit_scale
    refs = []
    for m, rows, content in (("x", slice(0, 6), X_CONTENT), ("y", slice(2, 8), Y_CONTENT)):
        near = loop_neighbours(pooled[m][rows], content, 2)
        views = [[j for j in range(6) if j != i and content[j] == content[i]] for i in range(6)]
        positive = [sorted(set(a) | set(b)) for a, b in zip(near, views, strict=True)]
        refs.append(loop_positive_loss(F.normalize(outputs.embeddings[m][rows], dim=-1), positive, scale))
    ref = 0.5 * (refs[0] + refs[1])
    torch.testing.assert_close(out.loss, ref, rtol=1e-8, atol=1e-10)
    x = outputs.embeddings["x"]
    torch.testing.assert_close(
        torch.autograd.grad(out.loss, x)[0], torch.autograd.grad(ref, x)[0], rtol=1e-8, atol=1e-10
    )
    obj.neighbours = 0
    assert abs(float(obj(outputs, batch).loss.detach()) - float(ref.detach())) > 1e-3  # the neighbours change it


def test_neighbours_train_a_modality_without_views_and_need_pooled_features() -> None:
    obj, outputs, batch = hand_built()
    batch.modality_ids = {"x": torch.arange(8), "y": torch.arange(8, 16)}  # no views anywhere
    assert obj(outputs, batch).parts == {}
    obj.neighbours = 1
    with pytest.raises(ValueError, match="pooled features of 'x'"):
        obj(outputs, batch)
    pooled = {m: torch.randn(8, 3, dtype=F64) for m in ("x", "y")}
    out = obj(Outputs(embeddings=outputs.embeddings, pooled=pooled), batch)
    assert set(out.parts) == {"x", "y"} and "top1" not in out.metrics and out.metrics["anchors"] == 0.0
