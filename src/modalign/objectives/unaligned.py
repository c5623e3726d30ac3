"""Learning with unaligned data: bags of positives and noisy pairs (token-level alignment: ``token_alignment``).

* Bags: ``milnce_loss`` (MIL-NCE; Miech et al. 2020, "End-to-End Learning of Visual
  Representations from Uncurated Instructional Videos", CVPR): an anchor's positive is any
  member of a bag of candidates.
* Noisy pairs: ``soft_infonce_loss`` (bootstrapped targets; Reed et al. 2015, "Training Deep
  Neural Networks on Noisy Labels with Bootstrapping", ICLR workshop) and
  ``weighted_infonce_loss`` with ``agreement_weights``, the posterior of the low-loss component
  of a two-component 1-D Gaussian mixture fitted to per-pair losses (Huang et al. 2021,
  "Learning with Noisy Correspondence for Cross-modal Matching" (NCR), NeurIPS).
* ``score_infonce_loss``: the symmetric InfoNCE of any ``[N, N]`` score matrix, which the
  token-level scores of ``modalign.objectives.token_alignment`` also use.

Each loss is a plain function; the registered modules ``milnce``, ``soft_infonce`` and
``weighted_infonce`` read pooled embeddings and select the paired rows. None of them runs
``features``, so all work under gradient caching; none gathers across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs, StepContext
from modalign.objectives.contrastive import LogitScale, Pair, PairObjective, batch_top1, check_pair_inputs

# ---------------------------------------------------------------- contrastive loss on a score matrix


def same_content(ids: Tensor | None, ids_b: Tensor | None, n: int, device: torch.device) -> Tensor:
    """``BoolTensor[n, n]``: pairs ``i != j`` holding the same ``a`` (``ids``) or ``b`` (``ids_b``) content."""
    same = torch.zeros(n, n, dtype=torch.bool, device=device)
    for x in (ids, ids_b):
        if x is not None:
            same = same | (x[:, None] == x[None, :])
    return same & ~torch.eye(n, dtype=torch.bool, device=device)


def _check_square(name: str, logits: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1] or logits.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, N] matrix, got shape {tuple(logits.shape)}")


def score_infonce_loss(
    logits: Tensor, ids: Tensor | None = None, ids_b: Tensor | None = None, logits_ba: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE on a precomputed score matrix (``infonce_loss`` for any pair score).

    ``logits[i, j]`` scores ``a_i`` against ``b_j``; ``logits_ba[j, i]`` scores ``b_j`` against
    ``a_i`` (default ``logits.T``; FILIP's two directions differ). The loss is the mean of the
    row cross-entropies of both with the diagonal as targets; pairs ``i != j`` holding the same
    content (``same_content``) are left out of the softmax, as in ``infonce_loss``.

    Args:
        logits: ``Tensor[N, N]`` a -> b logits (already scaled by the inverse temperature).
        ids: ``LongTensor[N]`` content ids of the ``a`` rows, or ``None`` (all distinct).
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows, or ``None``.
        logits_ba: ``Tensor[N, N]`` b -> a logits (rows are ``b``), or ``None``: ``logits.T``.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If the logits are not non-empty ``[N, N]`` or the ids not ``[N]``.
    """
    _check_square("logits", logits)
    logits_ba = logits.T if logits_ba is None else logits_ba
    if logits_ba.shape != logits.shape:
        raise ValueError(f"logits_ba must be {tuple(logits.shape)}, got {tuple(logits_ba.shape)}")
    n = logits.shape[0]
    for name, x in (("ids", ids), ("ids_b", ids_b)):
        if x is not None and x.shape != (n,):
            raise ValueError(f"{name} must be [N] with N={n}, got shape {tuple(x.shape)}")
    same = same_content(ids, ids_b, n, logits.device)
    targets = torch.arange(n, device=logits.device)
    ce_ab = F.cross_entropy(logits.masked_fill(same, float("-inf")), targets)
    ce_ba = F.cross_entropy(logits_ba.masked_fill(same, float("-inf")), targets)
    return 0.5 * (ce_ab + ce_ba)


def scale_of(logit_scale: Tensor) -> Tensor:
    """``exp(logit_scale)`` of a scalar (any shape with one element).

    Raises:
        ValueError: ``logit_scale`` has more than one element.
    """
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar tensor, got shape {tuple(logit_scale.shape)}")
    return logit_scale.reshape(()).exp()


# ---------------------------------------------------------------- MIL-NCE


def milnce_loss(a: Tensor, b: Tensor, positive: Tensor, logit_scale: Tensor, symmetric: bool = True) -> Tensor:
    """MIL-NCE: each anchor's positives form a bag (Miech et al. 2020, eq. 1).

    With ``l = exp(logit_scale) * a @ b.T``, anchor ``i`` scores
    ``-log(sum_{j in P(i)} exp(l_ij) / sum_j exp(l_ij))``, ``P(i) = {j: positive[i, j]}``: the
    denominator is the bag plus every other candidate (the negatives). Bags may differ in size
    and overlap. With ``symmetric`` the loss averages this a -> b term (mean over anchors) and
    the b -> a term (mean over candidates ``j``, positives ``{i: positive[i, j]}``, softmax over
    the anchors). A bag of one (``positive = eye``) gives ``infonce_loss``. (The authors' code
    instead puts both directions in one denominator.)

    Args:
        a: ``Tensor[N, E]`` anchors, assumed L2-normalised.
        b: ``Tensor[M, E]`` candidates of every bag, assumed L2-normalised.
        positive: ``BoolTensor[N, M]``, True where candidate ``j`` is in anchor ``i``'s bag
            (``bag_positives``, ``flatten_bags``).
        logit_scale: Scalar tensor, the log of the inverse temperature.
        symmetric: Average with the b -> a direction.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: On shapes that do not fit, an anchor without positive, or (``symmetric``)
            a candidate in no bag.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"a [N, E] and b [M, E] must be non-empty and share E, got {tuple(a.shape)}, {tuple(b.shape)}")
    if positive.shape != (a.shape[0], b.shape[0]) or positive.dtype != torch.bool:
        raise ValueError(f"positive must be a bool tensor [{a.shape[0]}, {b.shape[0]}], got {tuple(positive.shape)}")
    if not bool(positive.any(dim=1).all()) or (symmetric and not bool(positive.any(dim=0).all())):
        raise ValueError("every anchor needs a positive (and, symmetric, every candidate an anchor)")
    logits = scale_of(logit_scale) * a @ b.T
    loss = bag_nce(logits, positive)
    return 0.5 * (loss + bag_nce(logits.T, positive.T)) if symmetric else loss


def bag_nce(logits: Tensor, positive: Tensor) -> Tensor:
    """Mean over rows of ``LSE_j logits - LSE_{j positive} logits``."""
    bag = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - bag).mean()


def bag_positives(anchor_bags: Tensor, candidate_bags: Tensor) -> Tensor:
    """``BoolTensor[N, M]`` from bag ids: anchor ``i`` (``anchor_bags [N]``) owns candidates of its id (``[M]``)."""
    return anchor_bags[:, None] == candidate_bags[None, :]


def flatten_bags(candidates: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
    """Candidates ``[N, K, E]`` with ``padding [N, K]`` (True = no candidate) to ``milnce_loss`` inputs.

    Returns:
        ``(b Tensor[M, E], positive BoolTensor[N, M])``: the valid candidates, row-major.

    Raises:
        ValueError: If the shapes do not fit.
    """
    if candidates.dim() != 3 or padding.shape != candidates.shape[:2]:
        raise ValueError(
            f"candidates [N, K, E] and padding [N, K], got {tuple(candidates.shape)}, {tuple(padding.shape)}"
        )
    valid = ~padding
    owner = torch.arange(candidates.shape[0], device=candidates.device)[:, None].expand_as(valid)[valid]
    return candidates[valid], bag_positives(torch.arange(candidates.shape[0], device=owner.device), owner)


def content_bags(ids_a: Tensor, ids_b: Tensor) -> tuple[Tensor, Tensor]:
    """MIL-NCE bags of a batch's paired rows: one anchor per distinct ``a`` content.

    Anchor ``i`` is the first row of an ``a`` content; its bag holds every ``b`` row paired with
    that content, and every ``b`` row holding the same ``b`` content as one of those.

    Returns:
        ``(anchors LongTensor[N], positive BoolTensor[N, P])``.
    """
    same_a = ids_a[:, None] == ids_a[None, :]
    earlier = torch.ones_like(same_a).tril(diagonal=-1)  # [i, j]: j < i
    anchors = (~(same_a & earlier).any(dim=1)).nonzero().squeeze(1)
    same_b = (ids_b[:, None] == ids_b[None, :]).to(torch.float32)
    return anchors, (same_a[anchors].to(torch.float32) @ same_b) > 0


# ---------------------------------------------------------------- noisy pairs


def soft_infonce_loss(
    a: Tensor, b: Tensor, logit_scale: Tensor, alpha: float, ids: Tensor | None = None, ids_b: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE with soft bootstrapped targets (Reed et al. 2015's soft bootstrapping).

    Each row's target is ``(1 - alpha) * onehot(i) + alpha * softmax(l_i).detach()``, the model's
    own (constant) prediction; the loss is the cross-entropy ``-sum_j target_j log softmax(l_i)_j``
    averaged over the rows of ``l = exp(logit_scale) * a @ b.T`` and of ``l.T``. A noisy pair
    whose partner the model does not find pulls less towards its label. Same-content pairs are
    left out of both softmaxes; ``alpha = 0`` is ``infonce_loss``.

    Args:
        a: ``Tensor[N, E]``, assumed L2-normalised.
        b: ``Tensor[N, E]``, assumed L2-normalised.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        alpha: Weight of the model's prediction in the target, in ``[0, 1]``.
        ids: ``LongTensor[N]`` content ids of the ``a`` rows, or ``None``.
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows, or ``None``.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: On shapes that do not fit, an empty batch or ``alpha`` outside ``[0, 1]``.
    """
    check_pair_inputs(a, b, ids, logit_scale=logit_scale)
    check_pair_inputs(a, b, ids_b)
    if not 0.0 <= alpha <= 1.0 or a.shape[0] == 0:
        raise ValueError(f"need alpha in [0, 1] and a non-empty batch, got alpha={alpha}, N={a.shape[0]}")
    same = same_content(ids, ids_b, a.shape[0], a.device)
    logits = (scale_of(logit_scale) * a @ b.T).masked_fill(same, float("-inf"))
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    total = logits.new_zeros(())
    for rows in (logits, logits.T):
        log_p = F.log_softmax(rows, dim=1)
        target = (1.0 - alpha) * eye + alpha * log_p.detach().exp()
        total = total - (target * log_p.masked_fill(same, 0.0)).sum(dim=1).mean()
    return 0.5 * total


def per_pair_infonce(
    a: Tensor, b: Tensor, logit_scale: Tensor, ids: Tensor | None = None, ids_b: Tensor | None = None
) -> Tensor:
    """``Tensor[N]``: each pair's symmetric InfoNCE term, ``(CE(row i of l) + CE(column i of l)) / 2``.

    Its mean is ``infonce_loss(a, b, logit_scale, ids, ids_b=ids_b)``.

    Raises:
        ValueError: On shapes that do not fit or an empty batch.
    """
    check_pair_inputs(a, b, ids, logit_scale=logit_scale)
    check_pair_inputs(a, b, ids_b)
    if a.shape[0] == 0:
        raise ValueError("per_pair_infonce got an empty batch")
    same = same_content(ids, ids_b, a.shape[0], a.device)
    logits = (scale_of(logit_scale) * a @ b.T).masked_fill(same, float("-inf"))
    targets = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (
        F.cross_entropy(logits, targets, reduction="none") + F.cross_entropy(logits.T, targets, reduction="none")
    )


def weighted_infonce_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    weights: Tensor,
    ids: Tensor | None = None,
    ids_b: Tensor | None = None,
) -> Tensor:
    """InfoNCE with a weight per pair: ``mean_i weights_i * per_pair_infonce_i`` (NCR-style filtering).

    Every pair still serves as a negative of the others; ``weights`` only scales its own term
    (treated as given: pass detached weights, e.g. ``agreement_weights``). All-ones weights give
    ``infonce_loss``.

    Args:
        a: ``Tensor[N, E]``, assumed L2-normalised.
        b: ``Tensor[N, E]``, assumed L2-normalised.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        weights: ``Tensor[N]`` non-negative weight of each pair.
        ids: ``LongTensor[N]`` content ids of the ``a`` rows, or ``None``.
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows, or ``None``.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: On shapes that do not fit or an empty batch.
    """
    if weights.shape != a.shape[:1]:
        raise ValueError(f"weights must be [N] with N={a.shape[0]}, got shape {tuple(weights.shape)}")
    return (weights * per_pair_infonce(a, b, logit_scale, ids, ids_b)).mean()


@dataclass
class Mixture1D:
    """A 1-D Gaussian mixture: ``weights``, ``means``, ``variances``, each ``Tensor[K]``."""

    weights: Tensor
    means: Tensor
    variances: Tensor

    def log_joint(self, x: Tensor) -> Tensor:
        """``Tensor[N, K]``: ``log(weight_k N(x_n | mean_k, variance_k))``."""
        d = x[:, None] - self.means[None, :]
        return self.weights.log() - 0.5 * (torch.log(2 * math.pi * self.variances) + d * d / self.variances)

    def posterior(self, x: Tensor) -> Tensor:
        """``Tensor[N, K]``: the responsibility of each component for each ``x``."""
        return torch.softmax(self.log_joint(x), dim=1)


def fit_gmm_1d(x: Tensor, iterations: int = 100, tol: float = 1e-3, reg: float = 1e-6) -> Mixture1D:
    """Two-component 1-D Gaussian mixture by expectation-maximisation, without gradient.

    Initialised from the lower and upper halves of the sorted data (their means, the overall
    variance, equal weights), then ``sklearn.mixture.GaussianMixture``'s EM: an E-step and an
    M-step per iteration, variances ``+ reg``, stopping when the mean log-likelihood moves by
    less than ``tol`` (``tol = 0``: exactly ``iterations`` steps). Computed in ``float64``.

    Args:
        x: ``Tensor[N]`` data, ``N >= 2``.
        iterations: Maximum number of EM steps (>= 1).
        tol: Stopping threshold on the change of the mean log-likelihood.
        reg: Added to each variance (sklearn's ``reg_covar``), > 0.

    Returns:
        The fitted ``Mixture1D`` (float64).

    Raises:
        ValueError: If ``x`` is not ``[N]`` with ``N >= 2``, ``iterations < 1`` or ``reg <= 0``.
    """
    if x.dim() != 1 or x.shape[0] < 2 or iterations < 1 or reg <= 0:
        raise ValueError(f"need x [N >= 2], iterations >= 1, reg > 0; got {tuple(x.shape)}, {iterations}, {reg}")
    with torch.no_grad():
        x = x.detach().to(torch.float64)
        s = x.sort().values
        half = x.shape[0] // 2
        means = torch.stack([s[:half].mean(), s[half:].mean()])
        mix = Mixture1D(x.new_full((2,), 0.5), means, (x.var(unbiased=False) + reg).expand(2))
        bound = -math.inf
        for _ in range(iterations):
            log_joint = mix.log_joint(x)
            norm = torch.logsumexp(log_joint, dim=1)
            mix = _m_step(x, (log_joint - norm[:, None]).exp(), reg)
            bound, change = float(norm.mean()), float(norm.mean()) - bound
            if abs(change) < tol:
                break
    return mix


def _m_step(x: Tensor, resp: Tensor, reg: float) -> Mixture1D:
    """Maximum-likelihood mixture for responsibilities ``resp [N, K]`` (sklearn's ``_m_step``)."""
    nk = resp.sum(dim=0) + 10 * torch.finfo(resp.dtype).eps
    means = (resp * x[:, None]).sum(dim=0) / nk
    variances = (resp * (x[:, None] - means) ** 2).sum(dim=0) / nk + reg
    return Mixture1D(nk / nk.sum(), means, variances)


def clean_posterior(losses: Tensor, iterations: int = 10, tol: float = 1e-2, reg: float = 5e-4) -> Tensor:
    """``Tensor[N]`` in ``[0, 1]``: posterior of the low-mean component of a GMM on the losses (NCR).

    The losses are min-max normalised to ``[0, 1]`` and fitted with ``fit_gmm_1d`` (defaults:
    NCR's ``max_iter=10, tol=1e-2, reg_covar=5e-4``); no gradient. Equal losses give ones.

    Raises:
        ValueError: As ``fit_gmm_1d``.
    """
    with torch.no_grad():
        x = losses.detach().to(torch.float64)
        spread = x.max() - x.min() if x.numel() > 0 else x.new_zeros(())
        if float(spread) == 0.0:
            return torch.ones_like(losses)
        mix = fit_gmm_1d((x - x.min()) / spread, iterations, tol, reg)
        return mix.posterior((x - x.min()) / spread)[:, int(mix.means.argmin())].to(losses.dtype)


def agreement_weights(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    ids: Tensor | None = None,
    ids_b: Tensor | None = None,
    iterations: int = 10,
    reg: float = 5e-4,
) -> Tensor:
    """``Tensor[N]`` pair weights from cross-modal agreement: ``clean_posterior(per_pair_infonce)``, no gradient.

    A pair whose two sides find each other (low loss) is likely clean (weight near 1); a
    mismatched pair has a high loss (weight near 0). Huang et al. 2021 fit the mixture to a whole
    epoch's losses; this fits it to one batch's. ``iterations`` and ``reg`` go to ``fit_gmm_1d``.
    """
    with torch.no_grad():
        losses = per_pair_infonce(a.detach(), b.detach(), logit_scale.detach(), ids, ids_b)
        return clean_posterior(losses, iterations, reg=reg)


# ---------------------------------------------------------------- modules on pooled embeddings


def weighted_pair_output(
    objective: PairObjective, outputs: Outputs, batch: Batch, scale: Tensor, weigh: Callable[[Pair, Tensor], Tensor]
) -> LossOutput:
    """The weighted-InfoNCE objectives' forward: paired rows -> ``weigh`` -> ``weighted_infonce_loss``.

    Fewer than two paired rows give a zero loss connected to the graph. Metrics: ``temperature``,
    ``paired``, ``weight`` (mean), ``clean`` (fraction above 0.5), ``acc_a2b``, ``acc_b2a``.
    """
    pair = objective.pair(outputs, batch)
    metrics = pair_metrics(scale, pair.size if pair is not None else 0)
    if pair is None or objective.too_few(pair, False):
        return LossOutput(loss=outputs.zero(scale), metrics=metrics)
    weights = weigh(pair, scale).to(pair.a)
    loss = weighted_infonce_loss(pair.a, pair.b, scale, weights, pair.ids_a, pair.ids_b)
    metrics["weight"], metrics["clean"] = float(weights.mean()), float((weights > 0.5).float().mean())
    metrics["acc_a2b"], metrics["acc_b2a"] = batch_top1(pair)
    return LossOutput(loss=loss, metrics=metrics)


def pair_metrics(scale: Tensor, paired: int) -> dict[str, float]:
    """The logged metrics of a pair objective: temperature and paired rows."""
    return {"temperature": float(1.0 / scale.detach().exp()), "paired": float(paired)}


def check_arg(key: str, ok: bool, message: str) -> None:
    """Raise ``ConfigError(key, message)`` unless ``ok``."""
    if not ok:
        raise ConfigError(key, message)


def top1_fraction(logits: Tensor, hit: Tensor) -> float:
    """Fraction of rows of ``logits [N, M]`` whose argmax is a ``hit [N, M]``."""
    with torch.no_grad():
        return float(hit[torch.arange(logits.shape[0], device=logits.device), logits.argmax(dim=1)].float().mean())


@register("objective", "milnce")
class MILNCE(PairObjective):
    """MIL-NCE between two modalities (see ``milnce_loss``): one anchor per ``A`` content, bags of ``B`` rows.

    Reads ``outputs.embeddings`` of the rows where both are present. Rows sharing an ``A``
    content id (``batch.ids_of``: five captions of one photo) give one anchor whose bag holds all
    their ``B`` rows, plus ``B`` rows of the same ``B`` content (``content_bags``).

    Args:
        modalities: ``[A, B]``: anchors and candidates (default: the model's two, sorted).
        temperature: Initial temperature.
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        symmetric: Average with the B -> A direction.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        symmetric: bool = True,
    ) -> None:
        super().__init__(modalities, "milnce")
        self.scale = LogitScale(temperature, learn_temperature, max_logit_scale)
        self.symmetric = symmetric

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss; metrics: ``temperature``, ``paired``, ``bags``, ``acc_a2b`` (top-1 in the bag)."""
        scale = self.scale()
        pair = self.pair(outputs, batch)
        metrics = pair_metrics(scale, pair.size if pair is not None else 0)
        if pair is None or self.too_few(pair, False):
            return LossOutput(loss=outputs.zero(scale), metrics=metrics)
        anchors, positive = content_bags(pair.ids_a, pair.ids_b)
        loss = milnce_loss(pair.a[anchors], pair.b, positive, scale, self.symmetric)
        metrics["bags"] = float(anchors.shape[0])
        metrics["acc_a2b"] = top1_fraction(pair.a[anchors] @ pair.b.T, positive)
        return LossOutput(loss=loss, metrics=metrics)


class PooledPairLoss(PairObjective):
    """A loss on the paired rows of ``outputs.embeddings`` with its own temperature (subclasses give ``pair_loss``).

    Same-content rows (``batch.ids_of``) are never negatives; fewer than two paired rows give a
    zero loss connected to the graph. Metrics: ``temperature``, ``paired``, ``acc_a2b``, ``acc_b2a``.
    """

    def __init__(
        self,
        modalities: list[str] | None,
        name: str,
        temperature: float,
        learn_temperature: bool,
        max_logit_scale: float,
    ) -> None:
        super().__init__(modalities, name)
        self.scale = LogitScale(temperature, learn_temperature, max_logit_scale)

    def pair_loss(self, a: Tensor, b: Tensor, scale: Tensor, ids_a: Tensor | None, ids_b: Tensor | None) -> Tensor:
        """The loss of the paired rows ``a, b [P, E]``."""
        raise NotImplementedError

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss; metrics: ``temperature``, ``paired``, ``acc_a2b``, ``acc_b2a``."""
        scale = self.scale()
        pair = self.pair(outputs, batch)
        metrics = pair_metrics(scale, pair.size if pair is not None else 0)
        if pair is None or self.too_few(pair, False):
            return LossOutput(loss=outputs.zero(scale), metrics=metrics)
        loss = self.pair_loss(pair.a, pair.b, scale, pair.ids_a, pair.ids_b)
        metrics["acc_a2b"], metrics["acc_b2a"] = batch_top1(pair)
        return LossOutput(loss=loss, metrics=metrics)


@register("objective", "soft_infonce")
class SoftInfoNCE(PooledPairLoss):
    """InfoNCE with bootstrapped soft targets for noisy pairs (see ``soft_infonce_loss``; Reed et al. 2015).

    Reads ``outputs.embeddings`` of the rows where both modalities are present; same-content
    rows (``batch.ids_of``) are never negatives.

    Args:
        modalities: Two modality names (default: the model's two).
        temperature: Initial temperature.
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        alpha: Weight of the model's own prediction in the target, in ``[0, 1]`` (0: InfoNCE).
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        alpha: float = 0.2,
    ) -> None:
        super().__init__(modalities, "soft_infonce", temperature, learn_temperature, max_logit_scale)
        check_arg("alpha", 0.0 <= alpha <= 1.0, f"must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def pair_loss(self, a: Tensor, b: Tensor, scale: Tensor, ids_a: Tensor | None, ids_b: Tensor | None) -> Tensor:
        """``soft_infonce_loss`` of the paired rows."""
        return soft_infonce_loss(a, b, scale, self.alpha, ids_a, ids_b)


@register("objective", "weighted_infonce")
class WeightedInfoNCE(PairObjective):
    """InfoNCE whose pairs are weighted by how likely they are clean (NCR-style; see ``agreement_weights``).

    Reads ``outputs.embeddings`` of the paired rows. After ``warmup_steps`` optimiser steps
    (plain InfoNCE until then, as NCR warms up), each pair's weight is the posterior of the
    low-loss component of a 2-component GMM fitted to the batch's per-pair losses, without
    gradient; ``weighted_infonce_loss`` then scales each pair's term. The step count is a buffer
    (it survives a resume).

    Args:
        modalities: Two modality names (default: the model's two).
        temperature: Initial temperature.
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        warmup_steps: Optimiser steps with all weights 1.
        iterations: EM iterations of the mixture (NCR: 10).
        reg: Variance regulariser of the mixture, on losses normalised to ``[0, 1]`` (NCR: 5e-4).
    """

    steps: Tensor

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        warmup_steps: int = 0,
        iterations: int = 10,
        reg: float = 5e-4,
    ) -> None:
        super().__init__(modalities, "weighted_infonce")
        check_arg("warmup_steps", warmup_steps >= 0, f"must be >= 0, got {warmup_steps}")
        check_arg("iterations", iterations >= 1, f"must be >= 1, got {iterations}")
        check_arg("reg", reg > 0, f"must be > 0, got {reg}")
        self.scale = LogitScale(temperature, learn_temperature, max_logit_scale)
        self.warmup_steps, self.iterations, self.reg = warmup_steps, iterations, reg
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss; metrics: ``temperature``, ``paired``, ``weight`` (mean), ``clean`` (> 0.5), accuracies."""
        return weighted_pair_output(self, outputs, batch, self.scale(), self.weights)

    def weights(self, pair: Pair, scale: Tensor) -> Tensor:
        """``Tensor[P]``: ones during the warm-up, then ``agreement_weights`` of the batch's pairs."""
        if int(self.steps) < self.warmup_steps:
            return torch.ones_like(pair.a[:, 0])
        return agreement_weights(pair.a, pair.b, scale, pair.ids_a, pair.ids_b, self.iterations, self.reg)

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        """Record the optimiser steps taken (for the warm-up)."""
        self.steps.fill_(ctx.step)
