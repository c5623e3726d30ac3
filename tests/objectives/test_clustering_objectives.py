"""Clustering objectives: XDC, SeLaVi and MCN (maths against references, hooks, determinism, end to end)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from modalign.alignment import kmeans
from modalign.core import Batch, ConfigError, ModalitySpec
from modalign.core.types import EpochContext, StepContext
from modalign.eval.clustering import cluster_scores, kmeans_assignments
from modalign.methods import Method
from modalign.objectives.cluster_tables import content_means, embed_training_split, lookup_labels
from modalign.objectives.clustering import (
    XDC,
    MCNCluster,
    SeLaVi,
    centroid_contrastive_loss,
    pooled_swapped_prediction_loss,
    swapped_prediction_loss,
    xdc_loss,
)
from modalign.train.build import build_method
from modalign.train.recipe import expand_method, validate_recipe


def normed(n: int, e: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g, dtype=dtype), dim=-1)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# lookup_labels and content_means


def test_lookup_matches_a_dictionary_and_names_unknown_ids() -> None:
    table_ids = torch.tensor([2, 5, 9, 11, 40])
    table_labels = torch.tensor([3, 0, 3, 1, 2])
    queries = torch.tensor([40, 2, 9, 9, 11, 5])
    ref = dict(zip(table_ids.tolist(), table_labels.tolist(), strict=True))
    assert lookup_labels(queries, table_ids, table_labels).tolist() == [ref[i] for i in queries.tolist()]
    with pytest.raises(ValueError, match=r"2 content id\(s\) have no pseudo-label, e\.g\. \[7, 41\]"):
        lookup_labels(torch.tensor([5, 7, 41, 7]), table_ids, table_labels)
    with pytest.raises(ValueError, match="table is empty"):
        lookup_labels(queries, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels \(4,\)"):
        lookup_labels(queries, table_ids, table_labels[:4])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 30), n=st.integers(0, 40))
def test_lookup_property_random_tables(seed: int, m: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    table_ids = torch.randperm(200, generator=g)[:m].sort().values
    labels = torch.randint(0, 7, (m,), generator=g)
    queries = table_ids[torch.randint(0, m, (n,), generator=g)]
    ref = dict(zip(table_ids.tolist(), labels.tolist(), strict=True))
    assert lookup_labels(queries, table_ids, labels).tolist() == [ref[i] for i in queries.tolist()]


def test_content_means_match_a_loop() -> None:
    ids = torch.tensor([7, 3, 7, 9, 3, 7])
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unique, means = content_means(ids, x)
    assert unique.tolist() == [3, 7, 9]
    for row, i in enumerate(unique.tolist()):
        want = torch.stack([x[j] for j in range(6) if int(ids[j]) == i]).mean(dim=0)
        torch.testing.assert_close(means[row], want)


# ---------------------------------------------------------------------------------------------
# xdc_loss (with looked-up labels) and centroid_contrastive_loss against references


def numpy_xdc(la: np.ndarray, lb: np.ndarray, ya: np.ndarray, yb: np.ndarray) -> float:
    n = la.shape[0]
    pa, pb = np_log_softmax(la), np_log_softmax(lb)
    return float(0.5 * (-pa[np.arange(n), yb].mean() - pb[np.arange(n), ya].mean()))


def loop_xdc(la: Tensor, lb: Tensor, ya: list[int], yb: list[int]) -> Tensor:
    total = torch.zeros((), dtype=la.dtype)
    n, k = la.shape
    for logits, target in ((la, yb), (lb, ya)):
        for i in range(n):
            log_z = torch.log(sum(torch.exp(logits[i, j]) for j in range(k)))
            total = total + log_z - logits[i, target[i]]
    return total / (2 * n)


def test_xdc_loss_with_looked_up_labels_matches_numpy_and_loop_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    n, k = 7, 4
    la = torch.randn(n, k, generator=g, dtype=torch.float64).requires_grad_()
    lb = torch.randn(n, k, generator=g, dtype=torch.float64).requires_grad_()
    ids_a, ids_b = torch.tensor([10, 11, 12, 13, 14, 15, 16]), torch.tensor([3, 1, 3, 0, 2, 1, 0])
    table_a = (torch.arange(10, 17), torch.tensor([0, 1, 2, 3, 0, 1, 2]))
    table_b = (torch.arange(4), torch.tensor([2, 3, 1, 0]))
    ya, yb = lookup_labels(ids_a, *table_a), lookup_labels(ids_b, *table_b)
    assert yb.tolist() == [0, 3, 0, 2, 1, 3, 2]
    loss = xdc_loss(la, lb, ya, yb)
    assert loss.item() == pytest.approx(numpy_xdc(la.detach().numpy(), lb.detach().numpy(), ya.numpy(), yb.numpy()))
    ref = loop_xdc(la, lb, ya.tolist(), yb.tolist())
    for got, want in zip(torch.autograd.grad(loss, (la, lb)), torch.autograd.grad(ref, (la, lb)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: xdc_loss(a, b, ya, yb), (la, lb))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), k=st.integers(2, 6))
def test_xdc_loss_is_symmetric_permutation_invariant_and_minimal_when_confident(seed: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(seed)
    la, lb = torch.randn(n, k, generator=g, dtype=torch.float64), torch.randn(n, k, generator=g, dtype=torch.float64)
    ya, yb = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
    loss = xdc_loss(la, lb, ya, yb)
    torch.testing.assert_close(xdc_loss(lb, la, yb, ya), loss)
    perm = torch.randperm(n, generator=g)
    torch.testing.assert_close(xdc_loss(la[perm], lb[perm], ya[perm], yb[perm]), loss)
    confident = xdc_loss(50.0 * F.one_hot(yb, k).double(), 50.0 * F.one_hot(ya, k).double(), ya, yb)
    assert 0.0 <= confident.item() < 1e-18
    assert loss.item() > confident.item()


def numpy_centroid_loss(z: np.ndarray, c: np.ndarray, t: np.ndarray, temp: float) -> float:
    logp = np_log_softmax(z @ c.T / temp)
    return float(-logp[np.arange(len(t)), t].mean())


@pytest.mark.parametrize(("n", "k", "temp"), [(6, 3, 0.1), (9, 5, 0.5), (1, 2, 1.0)])
def test_centroid_contrastive_matches_numpy_and_analytic_gradient(n: int, k: int, temp: float) -> None:
    z = normed(n, 4, 0).requires_grad_()
    c = normed(k, 4, 1).requires_grad_()
    t = torch.arange(n) % k
    loss = centroid_contrastive_loss(z, c, t, temp)
    assert loss.item() == pytest.approx(numpy_centroid_loss(z.detach().numpy(), c.detach().numpy(), t.numpy(), temp))
    (gz,) = torch.autograd.grad(loss, (z,))
    p = torch.softmax(z.detach() @ c.detach().T / temp, dim=1)
    torch.testing.assert_close(gz, (p - F.one_hot(t, k).double()) @ c.detach() / (n * temp), rtol=1e-10, atol=1e-12)
    loss2 = centroid_contrastive_loss(z, c, t, temp)
    loss2.backward()
    assert c.grad is None  # the centroids are constants


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), k=st.integers(2, 6))
def test_centroid_loss_property_own_centroid_beats_its_antipode(seed: int, n: int, k: int) -> None:
    # On its own centroid every other logit is at most the target's, so each term of
    # log(1 + sum_j exp((s_j - s_t) / T)) is <= 1; on the antipode each is >= 1. (Sitting on the
    # centroid is not the minimum in general: a point farther from the other centroids can do
    # better, which hypothesis found.)
    c = normed(k, 5, seed)
    t = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))
    on_centroid = centroid_contrastive_loss(c[t], c, t, temperature=0.05)
    antipode = centroid_contrastive_loss(-c[t], c, t, temperature=0.05)
    assert on_centroid.item() <= math.log(k) + 1e-12 <= antipode.item() + 2e-12
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(centroid_contrastive_loss(c[t][perm], c, t[perm], 0.05), on_centroid)


L3 = torch.zeros(3, dtype=torch.long)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: xdc_loss(torch.zeros(3, 4), torch.zeros(3, 4), L3, torch.zeros(2)), "a predicts b"),
        (lambda: xdc_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor([0, 4, 1]), L3), r"\[0, 4\)"),
        (lambda: xdc_loss(torch.zeros(0, 4), torch.zeros(0, 4), L3[:0], L3[:0]), "empty"),
        (lambda: centroid_contrastive_loss(torch.zeros(3, 4), torch.zeros(2, 5), L3), "centroids"),
        (lambda: centroid_contrastive_loss(torch.zeros(3, 4), torch.zeros(2, 4), L3, 0.0), "temperature"),
        (lambda: centroid_contrastive_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([0, 2])), r"\[0, 2\)"),
    ],
)
def test_bad_inputs_raise(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# Modules on a tiny model: the epoch pass, determinism, lookups by content id, hooks

SPECS = {"x": ModalitySpec("vector", channels=6), "y": ModalitySpec("vector", channels=5)}


def tree(method: dict) -> dict:
    return {
        "data": {"name": "av-digits"},
        "model": {
            "embed_dim": 8,
            "encoders": {m: {"name": "vector_mlp", "dim": 16, "hidden": 16} for m in SPECS},
        },
        "method": method,
    }


def make_method(method: dict, seed: int = 0) -> Method:
    torch.manual_seed(seed)
    return build_method(validate_recipe(tree(method)), SPECS)


def synthetic_batches(n_batches: int = 3, size: int = 10, seed: int = 0) -> list[Batch]:
    """Batches whose ``y`` content ids repeat (two rows share a ``y`` content, as av-digits audio)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        ids = torch.arange(size) + b * size
        out.append(
            Batch(
                data={"x": torch.randn(size, 6, generator=g), "y": torch.randn(size, 5, generator=g)},
                present={"y": torch.arange(size) % 7 != 3},
                ids=ids,
                modality_ids={"y": 1000 + ids // 2},
            )
        )
    return out


def context(batches: list[Batch], epoch: int = 0) -> EpochContext:
    return EpochContext(0, epoch, 10, 5, lambda: iter(batches))


def test_epoch_pass_runs_in_eval_mode_without_gradient_and_restores_train_mode() -> None:
    method = make_method({"name": "xdc", "clusters": 3})
    seen: list[tuple[bool, bool]] = []
    hook = method.model.encoders["x"].register_forward_hook(
        lambda mod, inp, out: seen.append((mod.training, torch.is_grad_enabled()))
    )
    method.train()
    batches = synthetic_batches()
    rows = embed_training_split(method.model, batches, ("x", "y"), 8)
    hook.remove()
    assert seen == [(False, False)] * 3 and method.model.training
    with torch.no_grad():
        method.eval()
        want = torch.cat([method.model(b).embeddings["y"] for b in batches])
    torch.testing.assert_close(rows.embeddings["y"], want)
    assert rows.present["y"].tolist() == torch.cat([b.present["y"] for b in batches]).tolist()
    assert rows.content["y"].tolist() == torch.cat([b.ids_of("y") for b in batches]).tolist()
    with pytest.raises(ValueError, match="no rows"):
        embed_training_split(method.model, [], ("x", "y"), 8)


def test_xdc_labels_are_kmeans_of_content_means_keyed_by_content_id() -> None:
    method = make_method({"name": "xdc", "clusters": 3, "seed": 5})
    xdc = method.objectives["xdc"]
    assert isinstance(xdc, XDC) and xdc.modalities == ("x", "y")
    batches = synthetic_batches()
    method.on_epoch_start(context(batches, epoch=2))
    rows = embed_training_split(method.model, batches, ("x", "y"), 8)
    for i, m in enumerate(("x", "y")):
        ids, feats = content_means(rows.content[m][rows.present[m]], rows.embeddings[m][rows.present[m]])
        ref = kmeans(feats, 3, 20, seed=(5 * 1_000_003 + 2 * 7_919) % 2**31 + i, spherical=True)
        table_ids, labels = xdc.labels.tables[m]
        assert table_ids.tolist() == ids.tolist()
        assert labels.tolist() == ref.assignments.tolist()
        torch.testing.assert_close(xdc.centroids[i], ref.centroids)
    assert xdc.labels.tables["y"][0].min() >= 1000  # keyed by the y content ids, not sample ids
    with pytest.raises(ValueError, match="no pseudo-label"):
        xdc.labels("y", torch.tensor([3]))


def test_xdc_imprinted_classifier_rows_are_cross_modal_cluster_means() -> None:
    method = make_method({"name": "xdc", "clusters": 3})
    xdc = method.objectives["xdc"]
    assert isinstance(xdc, XDC)
    batches = synthetic_batches()
    method.on_epoch_start(context(batches))
    rows = embed_training_split(method.model, batches, ("x", "y"), 8)
    both = rows.present["x"] & rows.present["y"]
    y_labels = xdc.labels("y", rows.content["y"][both])
    for j in range(3):
        members = [rows.embeddings["x"][both][r] for r in range(int(both.sum())) if int(y_labels[r]) == j]
        if members:
            torch.testing.assert_close(xdc.classifiers[0, j], F.normalize(torch.stack(members).sum(0), dim=0))


def test_xdc_epoch_start_is_deterministic_and_resumes_from_the_weights() -> None:
    method = make_method({"name": "xdc", "clusters": 4})
    xdc = method.objectives["xdc"]
    assert isinstance(xdc, XDC)
    batches = synthetic_batches()
    saved = {k: v.clone() for k, v in method.state_dict().items()}
    method.on_epoch_start(context(batches, epoch=1))
    first = {m: tuple(t.clone() for t in xdc.labels.tables[m]) for m in ("x", "y")}
    classifiers = xdc.classifiers.detach().clone()
    method.on_epoch_start(context(batches, epoch=1))
    resumed = make_method({"name": "xdc", "clusters": 4}, seed=123)  # other random init, then the checkpoint
    resumed.load_state_dict(saved)
    resumed.on_epoch_start(context(batches, epoch=1))
    for again in (xdc, resumed.objectives["xdc"]):
        assert isinstance(again, XDC)
        for m in ("x", "y"):
            assert all(torch.equal(a, b) for a, b in zip(first[m], again.labels.tables[m], strict=True))
        assert torch.equal(again.classifiers.detach(), classifiers)
    assert {"objectives.xdc.classifiers", "objectives.xdc.centroids", "objectives.xdc.fitted"} <= set(saved)


def test_xdc_forward_is_xdc_loss_of_cosine_logits_on_paired_rows() -> None:
    method = make_method({"name": "xdc", "clusters": 3, "temperature": 0.2})
    xdc = method.objectives["xdc"]
    assert isinstance(xdc, XDC)
    batches = synthetic_batches()
    batch = batches[1]
    with pytest.raises(ValueError, match="on_epoch_start must run first"):
        method.loss(method(batch), batch)
    method.on_epoch_start(context(batches))
    outputs = method(batch)
    out = method.loss(outputs, batch)
    keep = batch.present["y"]
    zx, zy = outputs.embeddings["x"][keep], outputs.embeddings["y"][keep]
    lx = zx @ F.normalize(xdc.classifiers[0], dim=1).T / 0.2
    ly = zy @ F.normalize(xdc.classifiers[1], dim=1).T / 0.2
    ya, yb = xdc.labels("x", batch.ids[keep]), xdc.labels("y", batch.ids_of("y")[keep])
    torch.testing.assert_close(out.loss, xdc_loss(lx, ly, ya, yb))
    out.loss.backward()
    assert xdc.classifiers.grad is not None and xdc.classifiers.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.model.parameters())


def test_selavi_forward_frozen_prototypes_and_after_step_normalisation() -> None:
    method = make_method({"name": "selavi", "prototypes": 5, "freeze_steps": 2, "temperature": 0.2})
    sel = method.objectives["selavi"]
    assert isinstance(sel, SeLaVi) and tuple(sel.prototypes.shape) == (5, 8)
    torch.testing.assert_close(sel.prototypes.detach().norm(dim=1), torch.ones(5))
    batch = synthetic_batches()[0]
    outputs = method(batch)
    out = method.loss(outputs, batch)
    keep = batch.present["y"]
    c = F.normalize(sel.prototypes.detach(), dim=1)
    want = swapped_prediction_loss(outputs.embeddings["x"][keep] @ c.T, outputs.embeddings["y"][keep] @ c.T, 0.2)
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert sel.prototypes.grad is None  # frozen for the first two steps
    with torch.no_grad():
        sel.prototypes.mul_(torch.linspace(0.5, 3.0, 5)[:, None])
    method.after_step(StepContext(2, 0, 10, 5))
    torch.testing.assert_close(sel.prototypes.detach().norm(dim=1), torch.ones(5))
    assert int(sel.steps) == 2 and "objectives.selavi.steps" in method.state_dict()
    method.loss(method(batch), batch).loss.backward()
    assert sel.prototypes.grad is not None and sel.prototypes.grad.abs().sum() > 0
    assigned = sel.cluster_assignments({"x": outputs.embeddings["x"].detach()})
    assert assigned["x"].tolist() == (outputs.embeddings["x"].detach() @ c.T).argmax(1).tolist()


def test_selavi_prototypes_start_at_kmeans_of_the_joint_embeddings_once() -> None:
    method = make_method({"name": "selavi", "prototypes": 4, "seed": 3})
    sel = method.objectives["selavi"]
    assert isinstance(sel, SeLaVi) and not bool(sel.initialised)
    batches = synthetic_batches()
    method.on_epoch_start(context(batches, epoch=0))
    rows = embed_training_split(method.model, batches, ("x", "y"), 8)
    px, py = rows.present["x"].float()[:, None], rows.present["y"].float()[:, None]
    joint = (rows.embeddings["x"] * px + rows.embeddings["y"] * py) / (px + py)
    ref = kmeans(joint, 4, 20, seed=3 * 1_000_003 % 2**31, spherical=True)
    torch.testing.assert_close(sel.prototypes.detach(), ref.centroids)
    assert bool(sel.initialised) and "objectives.selavi.initialised" in method.state_dict()
    with torch.no_grad():
        sel.prototypes.mul_(-1.0)
    method.on_epoch_start(context(batches, epoch=1))  # done once: a resumed run keeps its prototypes
    torch.testing.assert_close(sel.prototypes.detach(), -ref.centroids)
    off = make_method({"name": "selavi", "prototypes": 4, "init_prototypes": False})
    before = off.objectives["selavi"].prototypes.detach().clone()
    off.on_epoch_start(context(batches))
    assert torch.equal(off.objectives["selavi"].prototypes.detach(), before)


def test_mcn_centroids_cluster_the_joint_space_and_the_loss_matches_the_reference() -> None:
    method = make_method({"name": "mcn", "clusters": 3, "cluster_temperature": 0.3, "cluster_weight": 0.5})
    assert list(method.weights.items()) == [("infonce", 1.0), ("mcn_cluster", 0.5)]
    mcn = method.objectives["mcn_cluster"]
    assert isinstance(mcn, MCNCluster) and mcn.modalities == ("x", "y")
    batches = synthetic_batches()
    method.on_epoch_start(context(batches, epoch=0))
    rows = embed_training_split(method.model, batches, ("x", "y"), 8)
    px, py = rows.present["x"].float()[:, None], rows.present["y"].float()[:, None]
    joint = (rows.embeddings["x"] * px + rows.embeddings["y"] * py) / (px + py)
    ref = kmeans(joint, 3, 20, seed=0, spherical=True)
    torch.testing.assert_close(mcn.centroids, ref.centroids)
    assert mcn.labels.tables["joint"][1].tolist() == ref.assignments.tolist()
    batch = batches[2]
    outputs = method(batch)
    out = method.loss(outputs, batch)
    targets = mcn.labels("joint", batch.ids)
    keep = batch.present["y"]
    want = 0.5 * (
        centroid_contrastive_loss(outputs.embeddings["x"], ref.centroids, targets, 0.3)
        + centroid_contrastive_loss(outputs.embeddings["y"][keep], ref.centroids, targets[keep], 0.3)
    )
    torch.testing.assert_close(out.parts["mcn_cluster"], want)
    torch.testing.assert_close(out.loss, out.parts["infonce"] + 0.5 * want)
    nearest = mcn.cluster_assignments({"x": outputs.embeddings["x"].detach()})["x"]
    assert nearest.tolist() == (outputs.embeddings["x"].detach() @ ref.centroids.T).argmax(1).tolist()


def test_presets_expand_to_their_objectives_and_bad_arguments_fail() -> None:
    def names(method: dict) -> list[tuple[str, str, float]]:
        return [(s.label, s.name, s.weight) for s in expand_method(method)]

    assert names({"name": "xdc"}) == [("xdc", "xdc", 1.0)]
    assert names({"name": "xdc", "contrastive_weight": 0.3}) == [("xdc", "xdc", 1.0), ("infonce", "infonce", 0.3)]
    assert names({"name": "selavi"}) == [("selavi", "selavi", 1.0)]
    assert names({"name": "mcn"}) == [("infonce", "infonce", 1.0), ("mcn_cluster", "mcn_cluster", 1.0)]
    with pytest.raises(ConfigError, match="clusters"):
        make_method({"name": "xdc", "clusters": 1})
    with pytest.raises(ConfigError, match="temperature"):
        make_method({"name": "selavi", "temperature": 0.0})
    with pytest.raises(ConfigError, match="no encoder"):
        make_method({"name": "composite", "objectives": [{"name": "mcn_cluster", "modalities": ["x", "z"]}]})


def test_absent_modality_gives_a_connected_zero_for_pairs_and_mcn_keeps_the_observed_one() -> None:
    for spec in ({"name": "xdc", "clusters": 2}, {"name": "selavi", "prototypes": 3}, {"name": "mcn", "clusters": 2}):
        method = make_method(spec)
        batches = synthetic_batches()
        method.on_epoch_start(context(batches))
        batch = Batch(data={"x": batches[0].data["x"]}, present={}, ids=batches[0].ids)
        outputs = method(batch)
        out = method.loss(outputs, batch)
        for label, objective in method.objectives.items():
            if isinstance(objective, MCNCluster):  # the x term alone, over the two modalities
                targets = objective.labels("joint", batch.ids)
                want = centroid_contrastive_loss(outputs.embeddings["x"], objective.centroids, targets, 0.1) / 2
                torch.testing.assert_close(out.parts[label], want)
            elif label != "infonce":
                assert out.parts[label].item() == 0.0 and out.parts[label].requires_grad


# ---------------------------------------------------------------------------------------------
# End to end: synthetic clusters hidden under per-modality nuisance dimensions


def hidden_clusters(n: int = 384, noise: float = 1.5) -> tuple[Tensor, Tensor, Tensor]:
    """``x [n, 12]``, ``y [n, 10]`` and labels: 4 latent clusters shared by x and y (3 dims each,
    y's rotated) next to independent nuisance dims of each modality.

    Raw-input k-means barely sees the clusters; only the shared dims predict one modality from
    the other, which is what the clustering objectives pick up.
    """
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 4
    shared = (1.5 * torch.randn(4, 3, generator=g))[labels]
    x = torch.cat([shared + 0.3 * torch.randn(n, 3, generator=g), noise * torch.randn(n, 9, generator=g)], 1)
    mix = torch.linalg.qr(torch.randn(3, 3, generator=g))[0]
    y = torch.cat([shared @ mix + 0.3 * torch.randn(n, 3, generator=g), noise * torch.randn(n, 7, generator=g)], 1)
    return x, y, labels


def train_hidden(entry: dict, epochs: int = 20, batch_size: int = 64) -> tuple[float, float, float, float]:
    """Train a method built from a recipe on ``hidden_clusters`` with the step lifecycle.

    Returns:
        (raw-input NMI of x, x NMI at initialisation, x and y NMI after training).
    """
    x, y, labels = hidden_clusters()
    n = x.shape[0]
    recipe = {
        "data": {"name": "av-digits"},
        "model": {"embed_dim": 16, "encoders": {m: {"name": "vector_mlp", "dim": 32, "hidden": 32} for m in "xy"}},
        "method": entry,
    }
    torch.manual_seed(0)
    specs = {"x": ModalitySpec("vector", channels=12), "y": ModalitySpec("vector", channels=10)}
    method = build_method(validate_recipe(recipe), specs)

    def batches(order: Tensor) -> list[Batch]:
        return [Batch(data={"x": x[i], "y": y[i]}, present={}, ids=i) for i in order.split(batch_size)]

    full = Batch(data={"x": x, "y": y}, present={}, ids=torch.arange(n))

    def nmi(m: str) -> float:
        with torch.no_grad():
            method.eval()
            emb = method.model(full).embeddings[m]
            method.train()
        return cluster_scores(kmeans_assignments(emb, 4, n_init=3), labels)["nmi"]

    before = nmi("x")
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3, weight_decay=0.0)
    per_epoch, step = n // batch_size, 0
    passes = batches(torch.arange(n))
    for epoch in range(epochs):
        method.on_epoch_start(EpochContext(step, epoch, epochs * per_epoch, per_epoch, lambda: iter(passes)))
        for batch in batches(torch.randperm(n, generator=torch.Generator().manual_seed(epoch))):
            out = method.loss(method(batch), batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            step += 1
            method.after_step(StepContext(step, epoch, epochs * per_epoch, per_epoch))
    raw = cluster_scores(kmeans_assignments(x, 4, n_init=3), labels)["nmi"]
    return raw, before, nmi("x"), nmi("y")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "entry",
    [
        {"name": "xdc", "clusters": 8},
        {"name": "selavi", "prototypes": 8, "freeze_steps": 6},
        {"name": "mcn", "clusters": 8},
    ],
    ids=["xdc", "selavi", "mcn"],
)
def test_end_to_end_training_recovers_the_hidden_clusters(entry: dict) -> None:
    """Chance NMI is ~0; raw inputs give < 0.35, the initial network < 0.3, trained > 0.75."""
    raw, before, after_x, after_y = train_hidden(entry)
    assert raw < 0.35 and before < 0.3, (raw, before)
    assert after_x > 0.75 and after_y > 0.75, (raw, before, after_x, after_y)


@pytest.mark.slow
def test_av_digits_xdc_recipe_reports_its_own_clusters(data_root: Path, tmp_path: Path) -> None:
    """A short real run: eval.json carries k-means and XDC's own NMI/ARI, both far above chance (0)."""
    from typer.testing import CliRunner

    from modalign.cli.main import app

    run = tmp_path / "run"
    args = ["train", "av-digits-xdc", "train.epochs=2", "data.test_size=500", "eval.plots=false"]
    result = CliRunner().invoke(app, [*args, "--run-dir", str(run), "--data-root", str(data_root)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval.json").read_text())
    for m in ("image", "audio"):
        # Own-cluster image NMI after 2 epochs depends strongly on the batch order: 0.12 / 0.29 /
        # 0.19 for train.seed 0 / 1 / 2 (and 0.42 before 4f58678, whose tqdm.auto wrapper drew a
        # second iterator from the seeded loader, so each epoch used another order). The bound
        # checks the keys carry the method's clusters (chance NMI/ARI are 0); quality is the
        # benchmark's bar (>= 0.80 after the full recipe).
        assert metrics[f"xdc/{m}/nmi"] > 0.1 and metrics[f"xdc/{m}/ari"] > 0.01, metrics
        assert metrics[f"{m}/nmi"] > 0.3 and metrics[f"{m}/linear_probe"] > 0.6, metrics


def mixed_batch(seed: int = 0) -> Batch:
    """Rows 0-3 paired; rows 4-7 ``x`` only (two samples, two views each); rows 8-11 ``y`` only (likewise)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([0, 1, 2, 3, 10, 10, 11, 11, 20, 20, 21, 21])
    return Batch(
        data={"x": torch.randn(12, 6, generator=g), "y": torch.randn(12, 5, generator=g)},
        present={"x": torch.arange(12) < 8, "y": (torch.arange(12) < 4) | (torch.arange(12) >= 8)},
        ids=ids,
    )


def test_selavi_views_predicts_partners_and_other_views_on_the_shared_prototypes() -> None:
    method = make_method(
        {"name": "selavi", "prototypes": 5, "temperature": 0.2, "views": True, "init_prototypes": False}
    )
    sel = method.objectives["selavi"]
    assert isinstance(sel, SeLaVi) and sel.views
    batch = mixed_batch()
    outputs = method(batch)
    out = method.loss(outputs, batch)
    c = F.normalize(sel.prototypes.detach(), dim=1)
    rx, ry = batch.present["x"], batch.present["y"]
    sx, sy = outputs.embeddings["x"][rx] @ c.T, outputs.embeddings["y"][ry] @ c.T
    ix, iy = rx.nonzero().squeeze(1), ry.nonzero().squeeze(1)
    positives = (
        batch.ids[ix][:, None] == batch.ids[ix][None, :],
        batch.ids[iy][:, None] == batch.ids[iy][None, :],
        ix[:, None] == iy[None, :],
    )
    assert int(positives[2].sum()) == 4
    torch.testing.assert_close(out.loss, pooled_swapped_prediction_loss((sx, sy), positives, 0.2))
    assert out.metrics["selavi/paired"] == 4.0 and out.metrics["selavi/viewed"] == 8.0
    # Without views only the four pairs count: the loss of the plain objective on the same rows.
    plain = make_method({"name": "selavi", "prototypes": 5, "temperature": 0.2, "init_prototypes": False})
    plain.load_state_dict(method.state_dict())
    keep = rx & ry
    want = swapped_prediction_loss(outputs.embeddings["x"][keep] @ c.T, outputs.embeddings["y"][keep] @ c.T, 0.2)
    torch.testing.assert_close(plain.loss(plain(batch), batch).loss, want)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.model.encoders.parameters())


def test_selavi_views_is_refused_with_gather() -> None:
    with pytest.raises(ConfigError, match="views"):
        make_method({"name": "selavi", "views": True, "gather": True})
