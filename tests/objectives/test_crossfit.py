"""``crossfit_infonce``: pair weights from out-of-sample agreement of cross-fitted ridge maps.

* ``ridge_map`` against the least-squares solution of the augmented system (an independent
  formula); ``crossfit_predictions`` against per-fold references, and out-of-sample: a row's
  own target never changes its prediction; ``fold_of`` balanced, seeded, independent of order.
* ``agreement_losses`` against a loop over the pairs (ridge by ``torch.linalg.lstsq``).
* The epoch-start fit on a noisy ``PairingView`` from the encoders' pooled features: no warm-up
  needed, clean pairs outweigh noisy ones, hard weights, the table through a checkpoint; the
  loss is ``weighted_infonce_loss`` with the stored weights (value and gradient).
* A tiny training run at 50% noise: beats ``infonce`` by far, as good as ``ncr_infonce``.
* ``pairing_pvalues`` against a loop over the pairs and their alternatives; uniform for pairs
  whose partner is random, near 0 for pairs that predict each other.
* ``posterior: lfdr``: the null share estimated (about 0.5 at 50% noise, near 0 without noise,
  where the mixture drops a third of the clean pairs), reported as a metric, kept through a
  checkpoint; checkpoints without it still load.
* A fit that weighs every pair 0 warns (a threshold above every posterior).
* ``ConfigError`` keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core import ConfigError
from modalign.data.pairing import PairingView
from modalign.methods import Method
from modalign.objectives import CrossFitInfoNCE, weighted_infonce_loss
from modalign.objectives.cluster_tables import embed_training_split
from modalign.objectives.crossfit import (
    agreement_losses,
    centred,
    crossfit_predictions,
    fold_of,
    pairing_pvalues,
    ridge_map,
)
from modalign.train.checkpoint import load_weights, save_checkpoint
from modalign.train.loop import Trainer
from modalign.train.recipe import TrainConfig
from support.linked import SPECS, Linked, context, noisy_batches, top1
from support.reference import composite_method

F64 = torch.float64
EMBED = 16


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def lstsq_ridge(x: Tensor, y: Tensor, w: Tensor, ridge: float) -> Tensor:
    """Weighted ridge as ordinary least squares on ``[sqrt(w) x; sqrt(ridge) I] W = [sqrt(w) y; 0]``."""
    lhs = torch.cat([x * w.sqrt()[:, None], ridge**0.5 * torch.eye(x.shape[1], dtype=x.dtype)])
    rhs = torch.cat([y * w.sqrt()[:, None], torch.zeros(x.shape[1], y.shape[1], dtype=y.dtype)])
    return torch.linalg.lstsq(lhs, rhs).solution


@pytest.mark.parametrize(("n", "dx", "dy"), [(20, 5, 3), (6, 9, 4)])
def test_ridge_map_is_the_weighted_least_squares_solution(n: int, dx: int, dy: int) -> None:
    x, y = randn(n, dx, seed=0), randn(n, dy, seed=1)
    w = torch.rand(n, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(ridge_map(x, y, w, 0.3), lstsq_ridge(x, y, w, 0.3))


def test_crossfit_predictions_are_out_of_sample() -> None:
    x, y = randn(30, 6, seed=0), randn(30, 4, seed=1)
    folds, w = torch.arange(30) % 3, torch.ones(30, dtype=F64)
    got = crossfit_predictions(x, y, folds, w, 0.5)
    for k in range(3):
        held = folds == k
        torch.testing.assert_close(got[held], x[held] @ lstsq_ridge(x[~held], y[~held], w[~held], 0.5))
    changed = y.clone()
    changed[4] += 10.0  # row 4's own target
    again = crossfit_predictions(x, changed, folds, w, 0.5)
    torch.testing.assert_close(again[4], got[4])
    assert not torch.allclose(again[folds != folds[4]], got[folds != folds[4]])  # it does reach the other folds


def test_folds_are_balanced_seeded_and_independent_of_order() -> None:
    keys = torch.randperm(23, generator=torch.Generator().manual_seed(0)) * 7
    folds = fold_of(keys, 5, seed=3)
    assert sorted(torch.bincount(folds).tolist()) == [4, 4, 5, 5, 5]
    shuffle = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fold_of(keys[shuffle], 5, seed=3), folds[shuffle])
    assert not torch.equal(fold_of(keys, 5, seed=4), folds)


def test_agreement_losses_against_a_loop() -> None:
    n, scale = 12, torch.tensor(2.0, dtype=F64)
    a, b = randn(n, 5, seed=0), randn(n, 4, seed=1) + 0.2
    ids_a, ids_b = torch.arange(n), torch.arange(n) + 100
    ids_b[3] = ids_b[7]  # two rows with the same b content: not each other's negatives
    folds, w = torch.arange(n) % 3, torch.linspace(0.2, 1.0, n, dtype=F64)
    got = agreement_losses(a, b, ids_a, ids_b, folds, w, 0.7, scale)
    ca = (a - a.mean(0)) / (a - a.mean(0)).norm(dim=1, keepdim=True)
    cb = (b - b.mean(0)) / (b - b.mean(0)).norm(dim=1, keepdim=True)
    s = float(scale.exp())

    def predicted(x: Tensor, y: Tensor) -> Tensor:
        """Every row's out-of-fold prediction of ``y``, by lstsq on the other folds, normalised."""
        rows = [
            x[i] @ lstsq_ridge(x[folds != folds[i]], y[folds != folds[i]], w[folds != folds[i]], 0.7) for i in range(n)
        ]
        return F.normalize(torch.stack(rows), dim=1)

    b_hats, a_hats = predicted(ca, cb), predicted(cb, ca)

    def symmetric(p: Tensor, t: Tensor, p_ids: Tensor, t_ids: Tensor) -> Tensor:
        out = []
        for i in range(n):
            keep = [j for j in range(n) if j == i or (p_ids[j] != p_ids[i] and t_ids[j] != t_ids[i])]
            fwd = torch.stack([s * p[i] @ t[j] for j in keep])
            bwd = torch.stack([s * t[i] @ p[j] for j in keep])
            own = keep.index(i)
            out.append(0.5 * ((torch.logsumexp(fwd, 0) - fwd[own]) + (torch.logsumexp(bwd, 0) - bwd[own])))
        return torch.stack(out)

    reference = 0.5 * (symmetric(b_hats, cb, ids_a, ids_b) + symmetric(a_hats, ca, ids_b, ids_a))
    torch.testing.assert_close(got, reference)
    torch.testing.assert_close(centred(a), ca)


def test_pairing_pvalues_against_a_loop() -> None:
    n, scale = 14, torch.tensor(1.5, dtype=F64)
    a, b = F.normalize(randn(n, 5, seed=0), dim=1), F.normalize(randn(n, 4, seed=1), dim=1)
    a_hat, b_hat = F.normalize(randn(n, 5, seed=2), dim=1), F.normalize(randn(n, 4, seed=3), dim=1)
    ids_a, ids_b = torch.arange(n), torch.arange(n) + 100
    ids_b[3] = ids_b[7]  # two rows with the same b content, two with the same a content
    ids_a[5] = ids_a[9]
    got = pairing_pvalues(a, b, a_hat, b_hat, ids_a, ids_b, scale, block=4)
    s = float(scale.exp())

    def score(i: int, j: int) -> Tensor:
        return 0.5 * s * (b_hat[i] @ b[j] + a[i] @ a_hat[j])

    def shares(i: int, j: int) -> bool:
        return bool(ids_a[i] == ids_a[j]) or bool(ids_b[i] == ids_b[j])

    def loss(i: int, j: int) -> Tensor:
        row = torch.stack([score(i, k) for k in range(n) if k == i or not shares(i, k)])
        column = torch.stack([score(k, j) for k in range(n) if k == j or not shares(k, j)])
        return 0.5 * (torch.logsumexp(row, 0) + torch.logsumexp(column, 0)) - score(i, j)

    reference = []
    for i in range(n):
        alternatives = [j for j in range(n) if not shares(i, j)]
        beaten = sum(int(loss(i, j) <= loss(i, i)) for j in alternatives)
        reference.append((1 + beaten) / (1 + len(alternatives)))
    torch.testing.assert_close(got, torch.tensor(reference, dtype=F64))
    with pytest.raises(ValueError, match="pairing_pvalues"):
        pairing_pvalues(a, b[:5], a_hat, b_hat, ids_a, ids_b, scale)


def test_pairing_pvalues_are_uniform_for_random_partners() -> None:
    n = 600
    a = randn(n, 8, seed=0)
    b = a @ randn(8, 6, seed=1) + 0.5 * randn(n, 6, seed=2)
    shuffled = torch.arange(n) >= n // 2
    b[shuffled] = b[shuffled][torch.randperm(n // 2, generator=torch.Generator().manual_seed(3))]
    ids = torch.arange(n)
    ca, cb = centred(a), centred(b)
    clean = ~shuffled
    # the maps of the clean pairs (the test isolates the p-values from the fitting)
    b_hat = F.normalize(ca @ ridge_map(ca[clean], cb[clean], torch.ones(int(clean.sum()), dtype=F64), 1.0), dim=1)
    a_hat = F.normalize(cb @ ridge_map(cb[clean], ca[clean], torch.ones(int(clean.sum()), dtype=F64), 1.0), dim=1)
    p = pairing_pvalues(ca, cb, a_hat, b_hat, ids, ids, torch.tensor(3.0, dtype=F64))
    null = p[shuffled]
    for q in (0.1, 0.25, 0.5, 0.75):  # the empirical CDF of the random pairs' p-values is the uniform's
        assert abs(float((null <= q).double().mean()) - q) < 0.08, q
    assert float(p[clean].median()) < 0.02


def make_method(extra: dict[str, Any] | None = None, seed: int = 0) -> Method:
    entry = {"name": "crossfit_infonce", "temperature": 0.1, **(extra or {})}
    return composite_method([entry], SPECS, EMBED, seed)


def objective(method: Method) -> CrossFitInfoNCE:
    obj = method.objectives["crossfit_infonce"]
    assert isinstance(obj, CrossFitInfoNCE)
    return obj


N = 200


def test_pooled_pass_reads_the_encoders_vectors() -> None:
    method, batches = make_method(), noisy_batches(N)
    rows = embed_training_split(method.model, batches, ("x", "y"), {"x": 32, "y": 32}, source="pooled")
    method.eval()
    with torch.no_grad():
        first = method.model(batches[0]).pooled["x"]
    torch.testing.assert_close(rows.embeddings["x"][:50], first)
    assert objective(method).split_widths == {"x": 32, "y": 32}
    with pytest.raises(ValueError, match="source"):
        embed_training_split(method.model, batches, ("x",), 32, source="tokens")


def test_fit_from_the_first_epoch_weighs_the_noisy_pairs_down(tmp_path: Path) -> None:
    method, batches = make_method({"threshold": None, "refresh_every": 2}), noisy_batches(N)
    obj = objective(method)
    obj.on_epoch_start(method.model, context(0, batches))  # untrained towers: the fit needs no warm-up
    assert int(obj.fitted_epoch) == 0 and obj.table_ids.shape[1] == N
    clean = obj.table_ids[0] == obj.table_ids[1]
    w = obj.table_weights
    auc = float((w[clean][:, None] > w[~clean][None, :]).double().mean())
    assert auc >= 0.9 and float(w[clean].mean() - w[~clean].mean()) >= 0.4, (auc, w[clean].mean(), w[~clean].mean())
    obj.on_epoch_start(method.model, context(1, batches))  # not a refit
    assert int(obj.fitted_epoch) == 0
    # the loss: weighted InfoNCE with the stored weights, value and gradient
    batch = batches[1]
    out = method(batch)
    got = method.loss(out, batch).loss
    ex, ey = out.embeddings["x"], out.embeddings["y"]
    ids_x, ids_y = batch.ids_of("x"), batch.ids_of("y")
    expected = weighted_infonce_loss(ex, ey, obj.scale(), obj.weights_of(ids_x, ids_y), ids_x, ids_y)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got, [ex, ey], retain_graph=True)
    for g, r in zip(grads, torch.autograd.grad(expected, [ex, ey]), strict=True):
        torch.testing.assert_close(g, r)
    # the table through a safetensors checkpoint
    folder = save_checkpoint(tmp_path, "epoch-0001", method, {})
    fresh = make_method({"threshold": None, "refresh_every": 2}, seed=1)
    load_weights(folder, fresh)
    for k, v in obj.state_dict().items():
        torch.testing.assert_close(objective(fresh).state_dict()[k], v, equal_nan=True)  # noise_estimate: NaN
    # the default hard weights: the posterior thresholded at 0.5
    hard = make_method()
    hard.model.load_state_dict(method.model.state_dict())
    objective(hard).on_epoch_start(hard.model, context(0, batches))
    torch.testing.assert_close(objective(hard).table_weights, (w > 0.5).float())


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_lfdr_posterior_estimates_the_noise(noise: float, tmp_path: Path) -> None:
    batches = noisy_batches(N, noise)
    lfdr = make_method({"posterior": "lfdr"})
    obj = objective(lfdr)
    assert torch.isnan(obj.noise_estimate)
    obj.on_epoch_start(lfdr.model, context(0, batches))
    clean = obj.table_ids[0] == obj.table_ids[1]
    kept = obj.table_weights > 0.5
    # measured (seed 0): estimates 0.00 and 0.44; every clean pair kept without noise (the
    # mixture: 0.92 of them), 0.99 of the clean and none of the noisy pairs at 50%
    assert float(obj.noise_estimate) == pytest.approx(noise, abs=0.1)
    assert float(kept[clean].float().mean()) >= 0.95
    if noise:
        assert float(kept[~clean].float().mean()) <= 0.1
    else:
        mixture = make_method()
        mixture.model.load_state_dict(lfdr.model.state_dict())
        objective(mixture).on_epoch_start(mixture.model, context(0, batches))
        assert float(objective(mixture).table_weights.mean()) <= float(kept.float().mean()) - 0.04
    batch = batches[0]
    metrics = lfdr.loss(lfdr(batch), batch).metrics
    assert metrics["crossfit_infonce/noise_estimate"] == pytest.approx(float(obj.noise_estimate))
    folder = save_checkpoint(tmp_path, "epoch-0001", lfdr, {})
    fresh = make_method({"posterior": "lfdr"}, seed=1)
    load_weights(folder, fresh)
    assert float(objective(fresh).noise_estimate) == float(obj.noise_estimate)
    # a checkpoint written before noise_estimate existed still loads (left unset)
    state = {k: v for k, v in obj.state_dict().items() if k != "noise_estimate"}
    older = make_method({"posterior": "lfdr"}, seed=1)
    objective(older).load_state_dict(state)
    assert torch.isnan(objective(older).noise_estimate)
    torch.testing.assert_close(objective(older).table_weights, obj.table_weights)


def test_a_fit_that_drops_every_pair_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batches = make_method({"threshold": 0.99}), noisy_batches(N)
    obj = objective(method)
    monkeypatch.setattr(obj, "fit_weights", lambda a, b, ids_a, ids_b: torch.zeros(ids_a.shape[0]))
    with pytest.warns(UserWarning, match="every one of the 200 pairs weighs 0"):
        obj.on_epoch_start(method.model, context(0, batches))
    assert int(obj.fitted_epoch) == 0 and float(obj.table_weights.sum()) == 0.0


def trained(entry: dict[str, Any], folder: Path) -> Method:
    method = composite_method([{"temperature": 0.1, **entry}], SPECS, EMBED, 0)
    cfg = TrainConfig(epochs=40, batch_size=50, lr=3e-3, warmup_steps=5, progress_every=None, track="none")
    folder.mkdir(parents=True, exist_ok=True)
    Trainer(method, PairingView(Linked(n=N), pair_noise=0.5, seed=0), cfg, folder, torch.device("cpu")).fit()
    return method


def test_crossfit_beats_infonce_at_half_noise(tmp_path: Path) -> None:
    infonce = top1(trained({"name": "infonce"}, tmp_path / "infonce"))
    ncr = top1(trained({"name": "ncr_infonce", "warmup_epochs": 4}, tmp_path / "ncr"))
    crossfit = top1(trained({"name": "crossfit_infonce"}, tmp_path / "crossfit"))
    # measured (seed 0): infonce 0.200 (200 pairs, 40 epochs: it memorises the noise), ncr_infonce
    # 0.985, crossfit_infonce 0.992 (weights fitted before any training, from the pooled vectors)
    assert crossfit >= infonce + 0.5 and crossfit >= ncr - 0.02, (crossfit, ncr, infonce)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"folds": 1}, "folds"),
        ({"ridge": 0.0}, "ridge"),
        ({"rounds": 0}, "rounds"),
        ({"score_temperature": 0.0}, "score_temperature"),
        ({"features": "tokens"}, "features"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"threshold": 1.0}, "threshold"),
        ({"posterior": "gmm"}, "posterior"),
        ({"null_above": 1.0}, "null_above"),
    ],
)
def test_bad_arguments_name_their_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        CrossFitInfoNCE(**kwargs)
    assert err.value.path == key
