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
* ``clean_posterior`` (NCR's two-component mixture) turns the scores into weights; with
  ``rounds > 1`` the maps are refitted with those weights as sample weights (the suspected pairs
  count less) and the pairs scored again.
* Training is ``ncr_infonce``'s weighted InfoNCE with these weights.

With frozen features the weights can be fitted before any training (``warmup_epochs: 0``). The
ridge solve is ``D x D`` per fold and direction (``D`` the feature width); the scoring is
``block x N`` at a time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.registry import register
from modalign.objectives.noisy_pairs import NCRInfoNCE, pair_keys, split_pair_losses
from modalign.objectives.unaligned import check_arg, clean_posterior


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
        a, b, w = centred(a), centred(b), weights.to(torch.float64)
        b_hat = F.normalize(crossfit_predictions(a, b, folds, w, ridge), dim=1)
        a_hat = F.normalize(crossfit_predictions(b, a, folds, w, ridge), dim=1)
        scale = logit_scale.detach().to(device=a.device, dtype=torch.float64)
        return 0.5 * (
            split_pair_losses(b_hat, b, scale, ids_a, ids_b, block)
            + split_pair_losses(a_hat, a, scale, ids_b, ids_a, block)
        )


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

    min_warmup_epochs = 0

    def __init__(
        self,
        folds: int = 5,
        ridge: float = 1.0,
        rounds: int = 2,
        score_temperature: float = 0.05,
        features: str = "pooled",
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
        self.folds, self.ridge, self.rounds, self.seed = folds, ridge, rounds, seed
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
        folds = fold_of(pair_keys(ids_a, ids_b), self.folds, self.seed)
        weights = torch.ones(ids_a.shape[0], dtype=torch.float64, device=a.device)
        for _ in range(self.rounds):
            losses = agreement_losses(a, b, ids_a, ids_b, folds, weights, self.ridge, self.score_scale, self.block)
            weights = clean_posterior(losses, self.iterations, reg=self.reg)
        if self.threshold is not None:
            weights = (weights > self.threshold).to(weights.dtype)
        return weights.float()
