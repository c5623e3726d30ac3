"""Non-contrastive cross-modal losses built on batch statistics: VICReg and Barlow Twins.

* ``vicreg_loss``: Bardes, Ponce and LeCun 2022, "VICReg: Variance-Invariance-Covariance
  Regularization for Self-Supervised Learning" (ICLR 2022).
* ``barlow_twins_loss``: Zbontar, Jing, Misra, LeCun and Deny 2021, "Barlow Twins:
  Self-Supervised Learning via Redundancy Reduction" (ICML 2021).

Both are applied across modalities: ``a`` and ``b`` are the two modalities' raw projections of
the same samples (not L2-normalised). Neither uses negatives, but both read statistics of the
batch (means, standard deviations, covariances), so under ``gather=True`` every rank gathers
all rows with gradient (``all_gather_with_grad``) and computes the loss of the global batch.
Every rank then returns that same value: the mean over ranks is the global loss, and because
the gather's backward sums the ``world_size`` identical contributions, each rank's input
gradient divided by the world size is the single-process gradient on the global batch (the
distributed convention of ``infonce_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.distributed import is_initialized
from modalign.objectives.contrastive import PairObjective, check_pair_inputs, gather_gallery


@dataclass(frozen=True)
class VICRegTerms:
    """The VICReg loss and its unweighted terms (all scalar tensors with graph).

    Attributes:
        loss: ``sim_weight * invariance + var_weight * variance + cov_weight * covariance``.
        invariance: Mean squared error between ``a`` and ``b``.
        variance: Mean over the two modalities of the per-dimension std hinge.
        covariance: Sum over the two modalities of the squared off-diagonal covariances / E.
    """

    loss: Tensor
    invariance: Tensor
    variance: Tensor
    covariance: Tensor


def check_stat_inputs(a: Tensor, b: Tensor, eps: float) -> None:
    """Validate ``a, b: [N, E]`` with ``E >= 1`` and ``eps >= 0``.

    Raises:
        ValueError: Naming the shapes or the value that do not fit.
    """
    check_pair_inputs(a, b, None)
    if a.shape[1] == 0:
        raise ValueError(f"expected at least one feature dimension, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def global_rows(a: Tensor, b: Tensor, gather: bool, name: str) -> tuple[Tensor, Tensor] | None:
    """The rows the batch statistics are computed over: local, or every rank's (with gradient).

    Returns:
        ``(a_all [M, E], b_all [M, E])``, or ``None`` when gathering and the global batch has
        fewer than two rows (every rank sees the same ``M``, so all take the same branch).

    Raises:
        ValueError: If (without gathering) the batch has fewer than two rows.
    """
    g = gather_gallery(a, b, None, gather)
    if g.total >= 2:
        return g.a, g.b
    if gather and is_initialized():
        return None
    raise ValueError(f"{name} needs at least 2 rows for batch statistics, got a {tuple(a.shape)}")


def _variance_hinge(xc: Tensor, gamma: float, eps: float) -> Tensor:
    """``mean_k relu(gamma - sqrt(var_k + eps))`` of centred ``xc: [M, E]`` (unbiased var)."""
    var = xc.pow(2).sum(dim=0) / (xc.shape[0] - 1)
    return F.relu(gamma - torch.sqrt(var + eps)).mean()


def _off_diagonal_sq(m: Tensor) -> Tensor:
    """Sum of the squared off-diagonal entries of a square ``m: [E, E]``."""
    eye = torch.eye(m.shape[0], dtype=torch.bool, device=m.device)
    return m.pow(2).masked_fill(eye, 0.0).sum()


def _covariance_penalty(xc: Tensor) -> Tensor:
    """``sum_{k != l} cov_kl^2 / E`` of centred ``xc: [M, E]`` (unbiased covariance)."""
    cov = xc.T @ xc / (xc.shape[0] - 1)
    return _off_diagonal_sq(cov) / xc.shape[1]


def vicreg_loss(
    a: Tensor,
    b: Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
    gather: bool = False,
) -> VICRegTerms:
    """VICReg between two modalities (Bardes et al. 2022), as in the authors' implementation.

    * invariance ``s = mean_{n,k} (a_nk - b_nk)^2``;
    * variance ``v = (v(a) + v(b)) / 2`` with ``v(x) = mean_k relu(gamma - sqrt(Var[x_k] + eps))``;
    * covariance ``c = c(a) + c(b)`` with ``c(x) = sum_{k != l} Cov[x]_kl^2 / E``;

    (variances and covariances unbiased, over the batch), and
    ``loss = sim_weight * s + var_weight * v + cov_weight * c``. The defaults are the paper's.

    With ``gather=True`` and an initialised process group every term is computed on the global
    batch (all ranks' rows gathered with gradient) and each rank returns the same global
    values (see the module docstring). Ranks may hold different numbers of rows, including
    none; a global batch of fewer than two rows gives zeros connected to the inputs.

    Args:
        a: ``Tensor[N, E]`` raw projections of the first modality (not normalised).
        b: ``Tensor[N, E]`` raw projections of the second modality, row ``n`` paired with ``a[n]``.
        sim_weight: Weight of the invariance term (lambda).
        var_weight: Weight of the variance term (mu).
        cov_weight: Weight of the covariance term (nu).
        gamma: Target standard deviation of every dimension.
        eps: Added to the variance under the square root (keeps the gradient finite).
        gather: Compute the statistics over all ranks' rows.

    Returns:
        ``VICRegTerms`` of scalar tensors.

    Raises:
        ValueError: If ``a``/``b`` are not 2-D of the same shape ``[N, E]`` with ``E >= 1``,
            ``eps < 0``, or (without gathering) ``N < 2``.
    """
    check_stat_inputs(a, b, eps)
    rows = global_rows(a, b, gather, "vicreg_loss")
    if rows is None:
        zero = 0.0 * (a.sum() + b.sum())
        return VICRegTerms(zero, zero, zero, zero)
    a_all, b_all = rows
    invariance = F.mse_loss(a_all, b_all)
    ac, bc = a_all - a_all.mean(dim=0), b_all - b_all.mean(dim=0)
    variance = 0.5 * (_variance_hinge(ac, gamma, eps) + _variance_hinge(bc, gamma, eps))
    covariance = _covariance_penalty(ac) + _covariance_penalty(bc)
    loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return VICRegTerms(loss, invariance, variance, covariance)


def _standardise(x: Tensor, eps: float) -> Tensor:
    """Per-dimension ``(x - mean) / sqrt(var + eps)`` over the rows (biased var, as BatchNorm)."""
    xc = x - x.mean(dim=0)
    return xc / torch.sqrt(xc.pow(2).mean(dim=0) + eps)


def barlow_twins_loss(a: Tensor, b: Tensor, lambd: float = 5e-3, eps: float = 1e-5, gather: bool = False) -> Tensor:
    """Barlow Twins between two modalities (Zbontar et al. 2021).

    Each dimension of ``a`` and ``b`` is standardised over the batch like the authors'
    affine-free ``BatchNorm1d`` (biased variance, ``eps`` under the square root); with
    ``C = a_std.T @ b_std / N`` (``[E, E]`` cross-correlation),
    ``loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2``. It is 0 exactly when
    (with ``eps = 0``) the standardised features of the two modalities are equal and
    decorrelated.

    With ``gather=True`` and an initialised process group the standardisation and ``C`` use the
    global batch (all ranks' rows gathered with gradient, the equivalent of the authors'
    ``SyncBatchNorm`` and all-reduced ``C``) and each rank returns the same global loss (see the
    module docstring). Ranks may hold different numbers of rows, including none; a global batch
    of fewer than two rows gives a zero connected to the inputs.

    Args:
        a: ``Tensor[N, E]`` raw projections of the first modality (not normalised).
        b: ``Tensor[N, E]`` raw projections of the second modality, row ``n`` paired with ``a[n]``.
        lambd: Weight of the redundancy-reduction (off-diagonal) term.
        eps: Added to the variance under the square root.
        gather: Compute the statistics over all ranks' rows.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If ``a``/``b`` are not 2-D of the same shape ``[N, E]`` with ``E >= 1``,
            ``eps < 0``, or (without gathering) ``N < 2``.
    """
    check_stat_inputs(a, b, eps)
    rows = global_rows(a, b, gather, "barlow_twins_loss")
    if rows is None:
        return 0.0 * (a.sum() + b.sum())
    a_all, b_all = rows
    c = _standardise(a_all, eps).T @ _standardise(b_all, eps) / a_all.shape[0]
    on_diagonal = (1.0 - c.diagonal()).pow(2).sum()
    return on_diagonal + lambd * _off_diagonal_sq(c)


@register("objective", "vicreg")
class VICReg(PairObjective):
    """VICReg across two modalities (see ``vicreg_loss``), on the heads' raw projections.

    Parts: ``invariance``, ``variance``, ``covariance`` (unweighted terms). Rows where both
    modalities were observed are used; fewer than two (without gathering) give a connected zero.

    Args:
        modalities: Two modality names (default: the model's two).
        sim_weight: Weight of the invariance (MSE) term (VICReg: 25).
        var_weight: Weight of the variance hinge (VICReg: 25).
        cov_weight: Weight of the covariance penalty (VICReg: 1).
        gamma: Target standard deviation of every dimension.
        gather: Batch statistics over all ranks.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        gamma: float = 1.0,
        gather: bool = False,
    ) -> None:
        super().__init__(modalities, "vicreg")
        self.weights = (sim_weight, var_weight, cov_weight)
        self.gamma = gamma
        self.gather = gather

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss; metrics: ``paired``."""
        pair = self.pair(outputs, batch, raw=True)
        metrics = {"paired": float(pair.size if pair is not None else 0)}
        if pair is None or self.too_few(pair, self.gather):
            return LossOutput(loss=outputs.zero(), metrics=metrics)
        sim, var, cov = self.weights
        terms = vicreg_loss(pair.a, pair.b, sim, var, cov, self.gamma, gather=self.gather)
        parts = {"invariance": terms.invariance, "variance": terms.variance, "covariance": terms.covariance}
        return LossOutput(loss=terms.loss, parts=parts, metrics=metrics)


@register("objective", "barlow")
class BarlowTwins(PairObjective):
    """Barlow Twins across two modalities (see ``barlow_twins_loss``), on the raw projections.

    Args:
        modalities: Two modality names (default: the model's two).
        lambd: Weight of the off-diagonal redundancy term (Barlow Twins: 5e-3).
        gather: Batch statistics over all ranks.
    """

    def __init__(self, modalities: list[str] | None = None, lambd: float = 5e-3, gather: bool = False) -> None:
        super().__init__(modalities, "barlow")
        self.lambd = lambd
        self.gather = gather

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss; metrics: ``paired``."""
        pair = self.pair(outputs, batch, raw=True)
        metrics = {"paired": float(pair.size if pair is not None else 0)}
        if pair is None or self.too_few(pair, self.gather):
            return LossOutput(loss=outputs.zero(), metrics=metrics)
        return LossOutput(loss=barlow_twins_loss(pair.a, pair.b, self.lambd, gather=self.gather), metrics=metrics)
