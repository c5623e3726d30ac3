"""Noise-robust contrastive losses: bounded losses that mismatched pairs cannot drive.

InfoNCE's ``-log p_ii`` is unbounded: a pair whose partner was replaced by a random sample
has a large loss and a large gradient towards the wrong partner. The losses here are bounded
(or grow slowly), so such a pair pulls little, with no mixture fit, warm-up or filter:

* ``complementary_infonce_loss`` (RCL; Hu et al. 2023, "Cross-Modal Retrieval with Partially
  Mismatched Pairs", TPAMI): complementary contrastive learning, which uses only the negative
  information of a batch (``b_j`` is *not* ``a_i``'s partner, for ``j != i``), far less often
  wrong than the positive one: ``sum_{j != i} phi(p_ij)`` with ``p_ij = softmax_j(l_ij)``
  and ``phi(p) = -log(1 - p)`` (``variant: log``), ``(1 - (1 - p)^q) / q`` (``gce``) or ``p``
  (``abs``: ``1 - p_ii``, the bounded mean absolute error).
* ``rince_loss`` (RINCE; Chuang et al. 2022, "Robust Contrastive Learning against Noisy
  Views", CVPR): ``-e^{q l_ii} / q + (lam * sum_j e^{l_ij})^q / q``, InfoNCE plus the constant
  ``log lam`` as ``q -> 0``, a bounded symmetric loss at ``q = 1``; in between each pair's
  InfoNCE gradient is weighted by ``e^{q l_ii}``: pairs the model already agrees on weigh more.

Both are symmetric (the mean of the ``a -> b`` rows and the ``b -> a`` columns of
``l = exp(logit_scale) a @ b.T``), leave same-content pairs out of every softmax (as
``infonce_loss``), and read pooled embeddings only (gradient caching works; no gather).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from modalign.core.registry import register
from modalign.objectives.contrastive import check_pair_inputs
from modalign.objectives.unaligned import PooledPairLoss, check_arg, same_content, scale_of

Variant = Literal["log", "gce", "abs"]
VARIANTS = ("log", "gce", "abs")


def _masked_logits(
    a: Tensor, b: Tensor, logit_scale: Tensor, ids: Tensor | None, ids_b: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(logits [N, N], same [N, N])``: scaled similarities with same-content pairs at ``-inf``."""
    check_pair_inputs(a, b, ids, logit_scale=logit_scale)
    check_pair_inputs(a, b, ids_b)
    if a.shape[0] == 0:
        raise ValueError("got an empty batch (a and b have 0 rows)")
    same = same_content(ids, ids_b, a.shape[0], a.device)
    return (scale_of(logit_scale) * a @ b.T).masked_fill(same, float("-inf")), same


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - e^x)`` for ``x <= 0``, accurate at both ends (Maechler 2012); ``-inf`` at ``x = 0``."""
    near = x > -math.log(2.0)
    safe = torch.full_like(x, -1.0)  # each branch sees only its own inputs: no inf * 0 in the gradient
    return torch.where(
        near, torch.log(-torch.expm1(torch.where(near, x, safe))), torch.log1p(-torch.exp(torch.where(near, safe, x)))
    )


def _complementary_rows(logits: Tensor, negatives: Tensor, variant: Variant, q: float) -> Tensor:
    """Mean over rows of ``sum_j phi(p_ij)`` over the ``negatives [N, N]`` of each row."""
    log_p = torch.log_softmax(logits, dim=1)
    if variant == "log":
        terms = -log1mexp(log_p.clamp(max=-1e-12))
    elif variant == "gce":
        terms = (1.0 - torch.exp(q * log1mexp(log_p.clamp(max=-1e-12)))) / q
    else:
        terms = log_p.exp()
    return terms.masked_fill(~negatives, 0.0).sum(dim=1).mean()


def complementary_infonce_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    variant: Variant = "log",
    q: float = 0.5,
    ids: Tensor | None = None,
    ids_b: Tensor | None = None,
) -> Tensor:
    """Complementary contrastive loss (RCL; Hu et al. 2023): push the negatives, never pull the pair.

    ``p = softmax(l)`` over each row of ``l = exp(logit_scale) a @ b.T`` (same-content columns
    left out); the loss is ``mean_i sum_{j != i, j allowed} phi(p_ij)``, averaged with the same on
    ``l.T``. ``phi``: ``-log(1 - p)`` (``log``), ``(1 - (1 - p)^q) / q`` (``gce``, ``log`` as
    ``q -> 0``), ``p`` (``abs``). Every term is bounded by ``phi(1)`` except ``log``'s, which grows
    only as a negative takes all the mass; the pair's own ``p_ii`` rises because the negatives'
    mass falls.

    Args:
        a: ``Tensor[N, E]``, assumed L2-normalised.
        b: ``Tensor[N, E]``, assumed L2-normalised.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        variant: ``log``, ``gce`` or ``abs``.
        q: Exponent of ``gce``, in ``(0, 1]``.
        ids: ``LongTensor[N]`` content ids of the ``a`` rows, or ``None``.
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows, or ``None``.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: On shapes that do not fit, an empty batch, an unknown variant or ``q``
            outside ``(0, 1]``.
    """
    if variant not in VARIANTS or not 0.0 < q <= 1.0:
        raise ValueError(f"need variant in {VARIANTS} and q in (0, 1], got {variant!r}, {q}")
    logits, same = _masked_logits(a, b, logit_scale, ids, ids_b)
    eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    negatives = ~(same | eye)
    return 0.5 * (
        _complementary_rows(logits, negatives, variant, q) + _complementary_rows(logits.T, negatives, variant, q)
    )


def _rince_rows(logits: Tensor, q: float, lam: float) -> Tensor:
    """Mean over rows of ``-e^{q l_ii} / q + e^{q (log lam + LSE_j l_ij)} / q``."""
    positive = torch.exp(q * logits.diagonal()) / q
    total = torch.exp(q * (math.log(lam) + torch.logsumexp(logits, dim=1))) / q
    return (total - positive).mean()


def rince_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    q: float = 0.5,
    lam: float = 0.01,
    ids: Tensor | None = None,
    ids_b: Tensor | None = None,
) -> Tensor:
    """Robust InfoNCE (RINCE; Chuang et al. 2022), symmetric.

    Per row ``i`` of ``l = exp(logit_scale) a @ b.T`` (same-content columns left out):
    ``-e^{q l_ii} / q + (lam sum_j e^{l_ij})^q / q``; the mean over rows, averaged with the same on
    ``l.T``. As ``q -> 0`` it tends to ``infonce_loss + log(lam)``; at ``q = 1`` it is bounded and
    symmetric (``(lam - 1) e^{l_ii} + lam sum_{j != i} e^{l_ij}``). The gradient on ``l_ii`` is
    InfoNCE's times ``e^{q l_ii}``-like weights, so pairs the model disagrees on (likely
    mismatched) pull less.

    Args:
        a: ``Tensor[N, E]``, assumed L2-normalised.
        b: ``Tensor[N, E]``, assumed L2-normalised.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        q: In ``(0, 1]``: 0 is InfoNCE, 1 the most robust.
        lam: Weight of the partition term, > 0 (Chuang et al.: 0.01-0.1).
        ids: ``LongTensor[N]`` content ids of the ``a`` rows, or ``None``.
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows, or ``None``.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: On shapes that do not fit, an empty batch, ``q`` outside ``(0, 1]`` or
            ``lam <= 0``.
    """
    if not 0.0 < q <= 1.0 or lam <= 0.0:
        raise ValueError(f"need q in (0, 1] and lam > 0, got q={q}, lam={lam}")
    logits, _ = _masked_logits(a, b, logit_scale, ids, ids_b)
    return 0.5 * (_rince_rows(logits, q, lam) + _rince_rows(logits.T, q, lam))


@register("objective", "complementary_infonce")
class ComplementaryInfoNCE(PooledPairLoss):
    """Complementary contrastive learning for mismatched pairs (RCL; see ``complementary_infonce_loss``).

    Args:
        modalities: Two modality names (default: the model's two).
        temperature: Initial temperature (RCL: 0.05-0.1).
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        variant: ``log`` (RCL's default), ``gce`` or ``abs``.
        q: Exponent of ``gce``, in ``(0, 1]``.

    Raises:
        ConfigError: At ``variant`` or ``q``.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        variant: str = "log",
        q: float = 0.5,
    ) -> None:
        super().__init__(modalities, "complementary_infonce", temperature, learn_temperature, max_logit_scale)
        check_arg("variant", variant in VARIANTS, f"must be one of {VARIANTS}, got {variant!r}")
        check_arg("q", 0.0 < q <= 1.0, f"must be in (0, 1], got {q}")
        self.variant: Variant = variant  # type: ignore[assignment]
        self.q = q

    def pair_loss(self, a: Tensor, b: Tensor, scale: Tensor, ids_a: Tensor | None, ids_b: Tensor | None) -> Tensor:
        """``complementary_infonce_loss`` of the paired rows."""
        return complementary_infonce_loss(a, b, scale, self.variant, self.q, ids_a, ids_b)


@register("objective", "rince")
class RINCE(PooledPairLoss):
    """Robust InfoNCE (RINCE; see ``rince_loss``).

    Args:
        modalities: Two modality names (default: the model's two).
        temperature: Initial temperature.
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        q: In ``(0, 1]`` (Chuang et al.: 0.1-0.5; 1 the most robust).
        lam: Weight of the partition term, > 0.

    Raises:
        ConfigError: At ``q`` or ``lam``.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        q: float = 0.5,
        lam: float = 0.01,
    ) -> None:
        super().__init__(modalities, "rince", temperature, learn_temperature, max_logit_scale)
        check_arg("q", 0.0 < q <= 1.0, f"must be in (0, 1], got {q}")
        check_arg("lam", lam > 0.0, f"must be > 0, got {lam}")
        self.q, self.lam = q, lam

    def pair_loss(self, a: Tensor, b: Tensor, scale: Tensor, ids_a: Tensor | None, ids_b: Tensor | None) -> Tensor:
        """``rince_loss`` of the paired rows."""
        return rince_loss(a, b, scale, self.q, self.lam, ids_a, ids_b)
