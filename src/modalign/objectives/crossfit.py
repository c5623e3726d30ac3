"""Pair weights from out-of-sample cross-modal agreement (cross-fitted ridge maps), for noisy pairs.

NCR (``ncr_infonce``) scores each pair by the loss of the model being trained. A model that can
memorise its training pairs (a wide adapter on frozen pretrained features fits 1,500 random
pairs in a few epochs) soon gives mismatched pairs a low loss too, and the scores stop telling
clean from noisy. Confident Learning (Northcutt, Jiang and Chuang 2021, "Confident Learning:
Estimating Uncertainty in Dataset Labels", JAIR) scores each example by *out-of-sample*
predictions (cross-validation), which a memorising model cannot fake; DivideMix and NCR's
co-divide use a second network for the same reason. ``crossfit_infonce`` applies that to pairs:

* At each fitting epoch the training split is passed once (eval mode, no gradient) and each
  paired row's features are read: by default the encoders' pooled vectors (``features:
  pooled``, the frozen pretrained features of a stitched model), centred and L2-normalised.
* The pairs are split into ``folds`` folds (a seeded permutation of the pairs sorted by their
  content ids, so the folds do not depend on the pass order). For each fold, a ridge map
  ``a -> b`` and one ``b -> a`` are fitted in closed form on the other folds' pairs
  (``crossfit_predictions``), and each held-out pair is scored by the symmetric InfoNCE of its
  predicted partner against the whole split at ``score_temperature`` (``split_pair_losses``).
* The scores become clean posteriors, either by NCR's two-component mixture on the scores
  (``posterior: mixture``, ``clean_posterior``) or as local false discovery rates of rank
  p-values (``posterior: lfdr``): a pair whose partner was replaced by a random other sample
  ranks its given partner like a random alternative, so its p-value (``pairing_pvalues``: the
  rank of the given pairing's symmetric InfoNCE loss among those of the same ``a`` with every
  other ``b``) is uniform on ``[0, 1]``, while clean pairs' p-values pile up near 0; Storey's
  null share and Grenander's decreasing density give each pair's posterior of being a
  mismatch (``modalign.objectives.local_fdr``; Efron et al. 2001). Unlike a two-component
  mixture, which splits any split in two, the null share is estimated (near 0 on clean
  pairs), and it is reported as the metric ``noise_estimate``. With ``rounds > 1`` the maps are
  refitted with the posteriors as sample weights (the suspected pairs count less) and the pairs
  scored again.
* Training is ``ncr_infonce``'s weighted InfoNCE with these weights.

With frozen features the weights can be fitted before any training (``warmup_epochs: 0``). The
ridge solve is ``D x D`` per fold and direction (``D`` the feature width); the scoring is
``block x N`` at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.objectives.local_fdr import local_fdr
from modalign.objectives.noisy_pairs import NCRInfoNCE, pair_keys, split_pair_losses
from modalign.objectives.unaligned import check_arg, clean_posterior, scale_of


def ridge_map(x: Tensor, y: Tensor, weights: Tensor, ridge: float) -> Tensor:
    """``Tensor[D_x, D_y]``: the ``W`` minimising ``sum_i w_i |x_i W - y_i|^2 + ridge |W|_F^2``.

    Args:
        x: ``Tensor[N, D_x]`` inputs.
        y: ``Tensor[N, D_y]`` targets.
        weights: ``Tensor[N]`` non-negative sample weights.
        ridge: The penalty (> 0), which keeps the normal equations solvable for any ``N``.
    """
    gram = x.T @ (x * weights[:, None]) + ridge * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(gram, x.T @ (y * weights[:, None]))


def crossfit_predictions(x: Tensor, y: Tensor, folds: Tensor, weights: Tensor, ridge: float) -> Tensor:
    """``Tensor[N, D_y]``: each row's prediction of ``y`` by a ridge map fitted without its fold.

    Args:
        x: ``Tensor[N, D_x]`` inputs.
        y: ``Tensor[N, D_y]`` targets.
        folds: ``LongTensor[N]`` fold of each row; a row is predicted by the map fitted on the
            rows of every other fold, so its own target never reaches its prediction.
        weights: ``Tensor[N]`` sample weights of the fits.
        ridge: The ridge penalty (> 0).
    """
    out = torch.zeros(x.shape[0], y.shape[1], dtype=x.dtype, device=x.device)
    for fold in torch.unique(folds).tolist():
        held = folds == fold
        out[held] = x[held] @ ridge_map(x[~held], y[~held], weights[~held], ridge)
    return out


def fold_of(keys: Tensor, folds: int, seed: int) -> Tensor:
    """``LongTensor[N]``: fold of each row, balanced, a function of the set of ``keys`` and ``seed`` only.

    The rows are sorted by key and dealt round-robin in a seeded random order, so the same pairs
    get the same folds whatever order a pass yields them in.
    """
    n = keys.shape[0]
    order = torch.argsort(keys.cpu())
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(n, dtype=torch.long)
    out[order[perm]] = torch.arange(n) % folds
    return out.to(keys.device)


def centred(x: Tensor) -> Tensor:
    """``x [N, D]`` minus its mean row, each row then L2-normalised (float64)."""
    x = x.to(torch.float64)
    return F.normalize(x - x.mean(dim=0, keepdim=True), dim=1)


def crossfit_views(
    a: Tensor, b: Tensor, folds: Tensor, weights: Tensor, ridge: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a, b, a_hat, b_hat)`` of a split's pairs, in float64.

    ``a, b`` centred and unit (``centred``); ``b_hat`` from ``a`` and ``a_hat`` from ``b`` by the
    cross-fitted ridge maps (``crossfit_predictions``, arguments as ``agreement_losses``), unit rows.
    """
    a, b, w = centred(a), centred(b), weights.to(torch.float64)
    b_hat = F.normalize(crossfit_predictions(a, b, folds, w, ridge), dim=1)
    a_hat = F.normalize(crossfit_predictions(b, a, folds, w, ridge), dim=1)
    return a, b, a_hat, b_hat


def agreement_losses(
    a: Tensor,
    b: Tensor,
    ids_a: Tensor,
    ids_b: Tensor,
    folds: Tensor,
    weights: Tensor,
    ridge: float,
    logit_scale: Tensor,
    block: int = 1024,
) -> Tensor:
    """``Tensor[N]``: each pair's out-of-sample disagreement (high = suspect), without gradient.

    ``a, b`` are centred and normalised (``centred``); ``b_hat`` (from ``a`` by the cross-fitted
    ridge map) and ``a_hat`` (from ``b``) are normalised; the score is the mean of
    ``split_pair_losses(b_hat, b)`` and ``split_pair_losses(a_hat, a)`` (rows of the same
    content are not each other's negatives).

    Args:
        a: ``Tensor[N, D_a]`` first-modality features of the pairs.
        b: ``Tensor[N, D_b]`` their partners' features.
        ids_a: ``LongTensor[N]`` content ids of the ``a`` rows.
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows.
        folds: ``LongTensor[N]`` (``fold_of``).
        weights: ``Tensor[N]`` sample weights of the ridge fits.
        ridge: The ridge penalty (> 0).
        logit_scale: Scalar tensor, log of the inverse scoring temperature.
        block: Rows per block of ``split_pair_losses``.
    """
    with torch.no_grad():
        a, b, a_hat, b_hat = crossfit_views(a, b, folds, weights, ridge)
        scale = logit_scale.detach().to(device=a.device, dtype=torch.float64)
        return 0.5 * (
            split_pair_losses(b_hat, b, scale, ids_a, ids_b, block)
            + split_pair_losses(a_hat, a, scale, ids_b, ids_a, block)
        )


def pairing_pvalues(
    a: Tensor,
    b: Tensor,
    a_hat: Tensor,
    b_hat: Tensor,
    ids_a: Tensor,
    ids_b: Tensor,
    logit_scale: Tensor,
    block: int = 1024,
) -> Tensor:
    """``Tensor[N]`` in ``(0, 1]``: each pair's p-value under "its ``b`` is a random other ``b``", no gradient.

    The pairing score of ``a_i`` with ``b_j`` is ``S(i, j) = s (b_hat_i . b_j + a_i . a_hat_j) / 2``
    (``s = exp(logit_scale)``; ``b_hat_i`` predicted from ``a_i``, ``a_hat_j`` from ``b_j``), and
    its symmetric InfoNCE loss ``l(i, j) = (LSE_k S(i, k) + LSE_k S(k, j)) / 2 - S(i, j)``; the
    column term corrects for ``b`` values that score high with every ``a`` (hubs). The
    alternatives of pair ``i`` are the ``j`` sharing neither content id with it (as
    ``split_pair_losses``' negatives; the column sums leave out the same rows), and
    ``p_i = (1 + #{alternatives j: l(i, j) <= l(i, i)}) / (1 + #alternatives)``: uniform if ``b_i`` is
    a random draw of the alternatives, near 0 if the two sides predict each other. Memory is
    ``block x N``.

    Args:
        a: ``Tensor[N, D_a]`` first-modality features of the pairs (centred, unit rows).
        b: ``Tensor[N, D_b]`` their partners'.
        a_hat: ``Tensor[N, D_a]`` each ``b_j``'s prediction of its ``a`` (unit rows).
        b_hat: ``Tensor[N, D_b]`` each ``a_i``'s prediction of its ``b`` (unit rows).
        ids_a: ``LongTensor[N]`` content ids of the ``a`` rows.
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows.
        logit_scale: Scalar tensor, log of the inverse scoring temperature.
        block: Rows per block (>= 1).

    Raises:
        ValueError: On shapes that do not fit, an empty split or ``block < 1``.
    """
    n = a.shape[0]
    if n == 0 or block < 1 or a_hat.shape != a.shape or b_hat.shape != b.shape or b.shape[0] != n:
        raise ValueError(
            f"pairing_pvalues needs a, a_hat [N, D_a], b, b_hat [N, D_b] with N >= 1 and block >= 1; got "
            f"{tuple(a.shape)}, {tuple(a_hat.shape)}, {tuple(b.shape)}, {tuple(b_hat.shape)}, block={block}"
        )
    if ids_a.shape != (n,) or ids_b.shape != (n,):
        raise ValueError(f"pairing_pvalues needs ids_a, ids_b [{n}], got {tuple(ids_a.shape)}, {tuple(ids_b.shape)}")
    with torch.no_grad():
        scale = scale_of(logit_scale.detach()).to(a.dtype)
        every = torch.arange(n, device=a.device)
        blocks = every.split(block)
        column_lse = torch.full((n,), float("-inf"), dtype=a.dtype, device=a.device)
        for rows in blocks:
            s, same = _pairing_block(rows, (a, b, a_hat, b_hat), (ids_a, ids_b), scale)
            s = s.masked_fill(same & (rows[:, None] != every[None, :]), float("-inf"))
            column_lse = torch.logaddexp(column_lse, torch.logsumexp(s, dim=0))
        out = []
        for rows in blocks:
            s, same = _pairing_block(rows, (a, b, a_hat, b_hat), (ids_a, ids_b), scale)
            key = s - 0.5 * column_lse[None, :]  # -l(i, j) up to the row's constant
            own = key[torch.arange(rows.shape[0]), rows]
            beaten = ((key >= own[:, None]) & ~same).sum(dim=1)
            out.append((1.0 + beaten.to(a.dtype)) / (1.0 + (~same).sum(dim=1).to(a.dtype)))
        return torch.cat(out)


def _pairing_block(
    rows: Tensor, views: tuple[Tensor, Tensor, Tensor, Tensor], ids: tuple[Tensor, Tensor], scale: Tensor
) -> tuple[Tensor, Tensor]:
    """``pairing_pvalues``' ``S(rows, :) [r, N]`` and which ``(row, j)`` share a content id (``j = row`` included)."""
    a, b, a_hat, b_hat = views
    ids_a, ids_b = ids
    s = 0.5 * scale * (b_hat[rows] @ b.T + a[rows] @ a_hat.T)
    same = (ids_a[rows, None] == ids_a[None, :]) | (ids_b[rows, None] == ids_b[None, :])
    return s, same


@dataclass
class PairAudit:
    """Which pairs of a split look mismatched (``audit_pairs``).

    Attributes:
        pvalues: ``Tensor[N]`` rank p-values (``pairing_pvalues``; uniform for a random partner).
        lfdr: ``Tensor[N]`` local false discovery rates: each pair's posterior of being a mismatch.
        noise_estimate: Estimated share of mismatched pairs (Storey's ``pi0``).
    """

    pvalues: Tensor
    lfdr: Tensor
    noise_estimate: float


def audit_pairs(
    a: Tensor,
    b: Tensor,
    ids_a: Tensor,
    ids_b: Tensor,
    folds: int = 5,
    rounds: int = 2,
    ridge: float = 1.0,
    temperature: float = 0.05,
    null_above: float = 0.5,
    seed: int = 0,
    block: int = 1024,
) -> PairAudit:
    """Score every pair of a split as ``crossfit_infonce`` with ``posterior: lfdr`` does, without training.

    Folds by ``fold_of(pair_keys(ids_a, ids_b), folds, seed)``; each round fits the cross-fitted
    ridge maps with the previous round's ``1 - lfdr`` as sample weights (all 1 in the first),
    takes the rank p-values of the pairs (``pairing_pvalues`` at ``temperature``) and their local
    false discovery rates (``local_fdr`` with Storey's ``lambda = null_above``). No gradient.

    Args:
        a: ``Tensor[N, D_a]`` first-modality features of the pairs (e.g. frozen pretrained vectors).
        b: ``Tensor[N, D_b]`` their partners'.
        ids_a: ``LongTensor[N]`` content ids of the ``a`` rows (equal ids are never alternatives).
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows.
        folds: Folds of the cross-fitting (>= 2).
        rounds: Fits (>= 1).
        ridge: Ridge penalty on centred unit-norm features (> 0).
        temperature: Scoring temperature (> 0).
        null_above: Storey's ``lambda``, in ``[0, 1)``.
        seed: Seed of the folds.
        block: Rows per scoring block (memory ``block x N``).

    Raises:
        ValueError: On shapes that do not fit, fewer pairs than folds, or arguments out of range.
    """
    n = ids_a.shape[0]
    if folds < 2 or n < folds or rounds < 1 or ridge <= 0 or temperature <= 0 or not 0 <= null_above < 1:
        raise ValueError(
            f"audit_pairs needs folds >= 2 with at least as many pairs, rounds >= 1, ridge > 0, temperature > 0 "
            f"and null_above in [0, 1); got {n} pairs, folds={folds}, rounds={rounds}, ridge={ridge}, "
            f"temperature={temperature}, null_above={null_above}"
        )
    with torch.no_grad():
        fold = fold_of(pair_keys(ids_a, ids_b), folds, seed)
        scale = torch.log(torch.tensor(1.0 / temperature))
        weights = torch.ones(n, dtype=torch.float64, device=a.device)
        for _ in range(rounds):
            views = crossfit_views(a, b, fold, weights, ridge)
            p = pairing_pvalues(*views, ids_a, ids_b, scale, block)
            lfdr, pi0 = local_fdr(p, null_above)
            weights = 1.0 - lfdr
    return PairAudit(p, lfdr, float(pi0))


@register("objective", "crossfit_infonce")
class CrossFitInfoNCE(NCRInfoNCE):
    """InfoNCE weighted by the out-of-sample agreement of each pair (see the module docstring).

    State and schedule as ``ncr_infonce`` (weights stored per pair of content ids, refitted at
    ``warmup_epochs`` and then every ``refresh_every`` epochs; resume-safe buffers); only how a
    pair is scored differs. Labels are never read.

    Args:
        folds: Folds of the cross-fitting (>= 2).
        ridge: Ridge penalty of the maps, on centred unit-norm features (> 0).
        rounds: Fits per fitting epoch; each after the first weights the maps by the previous
            round's posterior (>= 1).
        score_temperature: Temperature of the scoring InfoNCE (> 0).
        features: ``pooled`` (the encoders' vectors before the heads: frozen pretrained
            features stay out of reach of memorisation) or ``embeddings`` (the heads' outputs).
        posterior: ``mixture`` (NCR's two-component mixture on the agreement losses) or
            ``lfdr`` (one minus the local false discovery rate of the rank p-values).
        null_above: ``posterior: lfdr``: Storey's ``lambda``, p-values above it count as
            mismatches when estimating their share (in ``[0, 1)``).
        warmup_epochs: Epochs of plain InfoNCE before the first fit (>= 0; 0 with frozen features).
        threshold: Hard weights (1 where the clean posterior exceeds it, else 0; default 0.5:
            measured on emoji-stitch at 50% noise, soft posteriors still give the mismatched
            pairs a quarter of the weight), or ``null`` for the soft posterior.
        seed: Seed of the folds.
        **kwargs: ``ncr_infonce``'s other arguments (temperature, schedule, mixture, gather).

    Raises:
        ConfigError: Naming the argument; at ``bind``, ``modalities`` when ``features: pooled``
            and an encoder has no width ``dim``.
    """

    noise_estimate: Tensor
    min_warmup_epochs = 0

    def __init__(
        self,
        folds: int = 5,
        ridge: float = 1.0,
        rounds: int = 2,
        score_temperature: float = 0.05,
        features: str = "pooled",
        posterior: str = "mixture",
        null_above: float = 0.5,
        warmup_epochs: int = 0,
        threshold: float | None = 0.5,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(warmup_epochs=warmup_epochs, threshold=threshold, **kwargs)
        self.name = "crossfit_infonce"
        check_arg("folds", folds >= 2, f"must be >= 2, got {folds}")
        check_arg("ridge", ridge > 0, f"must be > 0, got {ridge}")
        check_arg("rounds", rounds >= 1, f"must be >= 1, got {rounds}")
        check_arg("score_temperature", score_temperature > 0, f"must be > 0, got {score_temperature}")
        check_arg("features", features in ("pooled", "embeddings"), f"must be pooled or embeddings, got {features!r}")
        check_arg("posterior", posterior in ("mixture", "lfdr"), f"must be mixture or lfdr, got {posterior!r}")
        check_arg("null_above", 0 <= null_above < 1, f"must lie in [0, 1), got {null_above}")
        self.folds, self.ridge, self.rounds, self.seed = folds, ridge, rounds, seed
        self.posterior, self.null_above = posterior, null_above
        # the share of mismatched pairs of the last fit (posterior lfdr; NaN until then or with mixture)
        self.register_buffer("noise_estimate", torch.full((), float("nan")))
        self.register_load_state_dict_pre_hook(_default_noise_estimate)
        self.score_temperature = score_temperature
        self.score_scale = torch.log(torch.tensor(1.0 / score_temperature))
        self.split_source = features

    def bind(self, model: nn.Module) -> None:
        """Resolve the modalities, the embedding width and, for ``features: pooled``, the encoders' widths."""
        super().bind(model)
        if self.split_source == "pooled":
            encoders = getattr(model, "encoders", {})
            widths = {m: int(getattr(encoders[m], "dim", 0)) if m in encoders else 0 for m in self.modalities}
            if 0 in widths.values():
                raise ConfigError(
                    "modalities", f"{self.name}: features: pooled needs encoders with a width dim, got {widths}"
                )
            self.split_widths = widths

    def fit_weights(self, a: Tensor, b: Tensor, ids_a: Tensor, ids_b: Tensor) -> Tensor:
        """``Tensor[P]`` weights of the split's pairs from features ``a [P, D_a]``, ``b [P, D_b]``.

        All 1 when there are fewer pairs than folds.
        """
        if ids_a.numel() < max(2, self.folds):
            return torch.ones(ids_a.shape[0])
        if self.posterior == "lfdr":
            audit = audit_pairs(a, b, ids_a, ids_b, self.folds, self.rounds, self.ridge, self.score_temperature,
                                self.null_above, self.seed, self.block)  # fmt: skip
            weights = 1.0 - audit.lfdr
            self.noise_estimate.fill_(audit.noise_estimate)
        else:
            folds = fold_of(pair_keys(ids_a, ids_b), self.folds, self.seed)
            weights = torch.ones(ids_a.shape[0], dtype=torch.float64, device=a.device)
            for _ in range(self.rounds):
                losses = agreement_losses(a, b, ids_a, ids_b, folds, weights, self.ridge, self.score_scale, self.block)
                weights = clean_posterior(losses, self.iterations, reg=self.reg)
        if self.threshold is not None:
            weights = (weights > self.threshold).to(weights.dtype)
        return weights.float()

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """``ncr_infonce``'s weighted InfoNCE; with ``posterior: lfdr`` also the metric ``noise_estimate``."""
        out = super().forward(outputs, batch)
        if self.posterior == "lfdr":
            out.metrics["noise_estimate"] = float(self.noise_estimate)
        return out


def _default_noise_estimate(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Checkpoints written before ``noise_estimate`` existed load with it unset (NaN)."""
    state_dict.setdefault(prefix + "noise_estimate", torch.full((), float("nan")))
