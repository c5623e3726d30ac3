"""Token-level alignment objectives: scores between two token sequences, as contrastive losses.

Each score of a pair of token sequences becomes a contrastive loss over the batch through
``score_infonce_loss``:

* FILIP's late interaction (Yao et al. 2022, "FILIP: Fine-grained Interactive Language-Image
  Pre-Training", ICLR): token-wise maximum cosine, averaged over the valid tokens;
* an entropic optimal-transport distance between the token sets (Cuturi 2013), whose plan
  ``ot_token_plan`` returns for inspection;
* the soft-DTW divergence between sequences of different rates (Cuturi & Blondel 2017;
  Blondel et al. 2021; ``modalign.alignment.dtw``).

The registered modules ``filip``, ``ot_tokens`` and ``soft_dtw`` read the encoders' tokens
(``Outputs.tokens`` and ``Outputs.padding``), projected by the objective's own linear maps, and
select the paired rows. None of them runs ``features``, so all work under gradient caching;
none gathers across ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.alignment.dtw import soft_dtw
from modalign.core.errors import ConfigError
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.objectives.contrastive import LogitScale, PairObjective, paired_rows
from modalign.objectives.matching import module_width
from modalign.objectives.unaligned import (
    check_arg,
    pair_metrics,
    same_content,
    scale_of,
    score_infonce_loss,
    top1_fraction,
)

Metric = Literal["cosine", "sqeuclidean"]

# ---------------------------------------------------------------- token-level scores


def _valid(tokens: Tensor, padding: Tensor | None, name: str) -> Tensor:
    """``BoolTensor[N, T]`` valid tokens of ``tokens [N, T, E]``.

    Raises:
        ValueError: If the shapes do not fit or a row has no valid token.
    """
    if tokens.dim() != 3 or tokens.shape[0] == 0 or (padding is not None and padding.shape != tokens.shape[:2]):
        pad = None if padding is None else tuple(padding.shape)
        raise ValueError(f"{name}: tokens [N, T, E] (N > 0) and padding [N, T], got {tuple(tokens.shape)}, {pad}")
    valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if padding is None else ~padding
    if not bool(valid.any(dim=1).all()):
        raise ValueError(f"{name}: every row needs a token that is not padded")
    return valid


def filip_similarity(a: Tensor, a_padding: Tensor | None, b: Tensor, b_padding: Tensor | None) -> Tensor:
    """FILIP token-wise similarity ``[N, M]``: mean over ``a_i``'s tokens of the best cosine in ``b_j``.

    ``s(i, j) = mean_{t valid in a_i} max_{u valid in b_j} cos(a_it, b_ju)`` (Yao et al. 2022,
    eq. 4); padded tokens of either side are ignored. The other direction is
    ``filip_similarity(b, b_padding, a, a_padding).T``.

    Args:
        a: ``Tensor[N, T, E]`` tokens (normalised here).
        a_padding: ``BoolTensor[N, T]`` (True = padded) or ``None``.
        b: ``Tensor[M, S, E]`` tokens.
        b_padding: ``BoolTensor[M, S]`` or ``None``.

    Raises:
        ValueError: On shapes that do not fit or a row without valid tokens.
    """
    valid_a, valid_b = _valid(a, a_padding, "filip a"), _valid(b, b_padding, "filip b")
    return _mean_best(_token_cosines(a, b), valid_a, valid_b)


def _token_cosines(a: Tensor, b: Tensor) -> Tensor:
    """Cosine between the tokens of every pair: ``a [N, T, E]``, ``b [M, S, E]`` -> ``[N, M, T, S]``."""
    return torch.einsum("nte,mse->nmts", F.normalize(a, dim=-1), F.normalize(b, dim=-1))


def _mean_best(cos: Tensor, valid_a: Tensor, valid_b: Tensor) -> Tensor:
    """``[N, M]``: mean over the valid ``t`` of the max over the valid ``u`` of ``cos [N, M, T, S]``."""
    best = cos.masked_fill(~valid_b[None, :, None, :], float("-inf")).amax(dim=-1)  # [N, M, T]
    return best.masked_fill(~valid_a[:, None, :], 0.0).sum(dim=-1) / valid_a.sum(dim=1, keepdim=True)


def filip_logits(
    a: Tensor, a_padding: Tensor | None, b: Tensor, b_padding: Tensor | None, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """FILIP's a -> b and b -> a logits (rows ``a``, resp. ``b``) times ``scale``, from one cosine tensor."""
    valid_a, valid_b = _valid(a, a_padding, "filip a"), _valid(b, b_padding, "filip b")
    cos = _token_cosines(a, b)
    return scale * _mean_best(cos, valid_a, valid_b), scale * _mean_best(cos.permute(1, 0, 3, 2), valid_b, valid_a)


def filip_loss(
    a: Tensor,
    a_padding: Tensor | None,
    b: Tensor,
    b_padding: Tensor | None,
    logit_scale: Tensor,
    ids: Tensor | None = None,
    ids_b: Tensor | None = None,
) -> Tensor:
    """FILIP loss (Yao et al. 2022): ``score_infonce_loss`` of the token-wise similarities of both directions.

    Args:
        a: ``Tensor[N, T, E]`` tokens of the first modality.
        a_padding: ``BoolTensor[N, T]`` (True = padded) or ``None``.
        b: ``Tensor[N, S, E]`` tokens of the second modality.
        b_padding: ``BoolTensor[N, S]`` or ``None``.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        ids: ``LongTensor[N]`` content ids of the ``a`` rows, or ``None``.
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows, or ``None``.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: On shapes that do not fit or a row without valid tokens.
    """
    ab, ba = filip_logits(a, a_padding, b, b_padding, scale_of(logit_scale))
    return score_infonce_loss(ab, ids, ids_b, ba)


def _log_uniform(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """``Tensor[P, T]``: ``log(1 / count)`` at each row's valid positions, ``-inf`` elsewhere."""
    count = valid.sum(dim=1, keepdim=True).to(dtype)
    return (-count.log()).expand(valid.shape).masked_fill(~valid, float("-inf"))


def batched_sinkhorn(cost: Tensor, valid_a: Tensor, valid_b: Tensor, epsilon: float, iterations: int) -> Tensor:
    """``alignment.sinkhorn`` for a batch of plans ``[P, T, S]`` with uniform marginals over valid tokens.

    The same log-domain updates (column first) on each cost restricted to its valid rows and
    columns; padded positions get no mass. No gradient; ``float64`` stays, else ``float32``.

    Raises:
        ValueError: If ``epsilon <= 0`` or ``iterations < 1``.
    """
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"need epsilon > 0 and iterations >= 1, got epsilon={epsilon}, iterations={iterations}")
    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    c = cost.detach().to(dtype) / epsilon
    log_a, log_b = (_log_uniform(valid, dtype) for valid in (valid_a, valid_b))
    f = torch.zeros_like(log_a).masked_fill(~valid_a, float("-inf"))
    g = torch.zeros_like(log_b)
    for _ in range(iterations):
        g = log_b - torch.logsumexp(f[:, :, None] - c, dim=1)
        f = log_a - torch.logsumexp(g[:, None, :] - c, dim=2)
    return torch.exp(f[:, :, None] + g[:, None, :] - c)


def ot_token_plan(
    a: Tensor,
    a_padding: Tensor | None,
    b: Tensor,
    b_padding: Tensor | None,
    epsilon: float = 0.05,
    iterations: int = 100,
) -> Tensor:
    """Entropic transport plans ``[N, T, S]`` between the tokens of each pair ``(a_i, b_i)`` (for plots).

    Cost ``1 - cos(a_it, b_iu)``, uniform marginals over each side's valid tokens (Cuturi 2013);
    each plan sums to 1 and is zero at padded tokens. No gradient.

    Raises:
        ValueError: On shapes that do not fit, a row without valid tokens or bad solver settings.
    """
    valid_a, valid_b = _valid(a, a_padding, "ot a"), _valid(b, b_padding, "ot b")
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"ot_token_plan pairs rows: a has {a.shape[0]}, b has {b.shape[0]}")
    cost = torch.einsum("nte,nse->nts", F.normalize(a, dim=-1), F.normalize(b, dim=-1)).neg().add(1.0)
    return batched_sinkhorn(cost, valid_a, valid_b, epsilon, iterations)


def ot_token_distance(
    a: Tensor,
    a_padding: Tensor | None,
    b: Tensor,
    b_padding: Tensor | None,
    epsilon: float = 0.05,
    iterations: int = 100,
) -> Tensor:
    """``W [N, M]``: ``sum(P_ij * C_ij)`` for the entropic plan ``P_ij`` between ``a_i`` and ``b_j``'s tokens.

    ``C_ij = 1 - cos`` of the tokens (``[T, S]``); ``P_ij`` as in ``ot_token_plan``, held
    constant, so the gradient is ``P_ij`` on the cost (that of the entropic OT value at the
    solver's fixed point). Lower is better aligned; ``W`` is in ``[0, 2]``.

    Raises:
        ValueError: On shapes that do not fit, a row without valid tokens or bad solver settings.
    """
    valid_a, valid_b = _valid(a, a_padding, "ot a"), _valid(b, b_padding, "ot b")
    n, m = a.shape[0], b.shape[0]
    cost = 1.0 - _token_cosines(a, b)  # [N, M, T, S]
    pairs_a = valid_a[:, None].expand(n, m, -1).reshape(n * m, -1)
    pairs_b = valid_b[None].expand(n, m, -1).reshape(n * m, -1)
    plan = batched_sinkhorn(cost.reshape(n * m, *cost.shape[2:]), pairs_a, pairs_b, epsilon, iterations)
    return (plan.to(cost.dtype).reshape(cost.shape) * cost).sum(dim=(2, 3))


def ot_token_loss(
    a: Tensor,
    a_padding: Tensor | None,
    b: Tensor,
    b_padding: Tensor | None,
    logit_scale: Tensor,
    ids: Tensor | None = None,
    ids_b: Tensor | None = None,
    epsilon: float = 0.05,
    iterations: int = 100,
) -> Tensor:
    """InfoNCE on the score ``s(i, j) = -W(i, j)`` of ``ot_token_distance`` (token alignment by OT).

    Args:
        a: ``Tensor[N, T, E]`` tokens of the first modality.
        a_padding: ``BoolTensor[N, T]`` (True = padded) or ``None``.
        b: ``Tensor[N, S, E]`` tokens of the second modality.
        b_padding: ``BoolTensor[N, S]`` or ``None``.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        ids: ``LongTensor[N]`` content ids of the ``a`` rows, or ``None``.
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows, or ``None``.
        epsilon: Entropic regularisation, in units of the cost ``1 - cos``.
        iterations: Sinkhorn iterations.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: On shapes that do not fit, a row without valid tokens or bad solver settings.
    """
    distance = ot_token_distance(a, a_padding, b, b_padding, epsilon, iterations)
    return score_infonce_loss(-scale_of(logit_scale) * distance, ids, ids_b)


def _lengths(valid: Tensor, name: str) -> Tensor:
    """``LongTensor[N]`` lengths of right-padded rows.

    Raises:
        ValueError: If a row's valid tokens are not a prefix.
    """
    lengths = valid.sum(dim=1)
    if not bool((valid == (torch.arange(valid.shape[1], device=valid.device)[None] < lengths[:, None])).all()):
        raise ValueError(f"{name}: soft-DTW needs right padding (valid tokens first)")
    return lengths


def ragged_soft_dtw(x: Tensor, x_lengths: Tensor, y: Tensor, y_lengths: Tensor, gamma: float, metric: Metric) -> Tensor:
    """``alignment.soft_dtw`` of each pair ``(x_p[:len], y_p[:len])``: ``[P]``, one call per distinct length pair."""
    out = x.new_zeros(x.shape[0])
    for n, m in torch.unique(torch.stack([x_lengths, y_lengths], dim=1), dim=0).tolist():
        index = ((x_lengths == n) & (y_lengths == m)).nonzero().squeeze(1)
        out = out.index_copy(0, index, soft_dtw(x[index, :n], y[index, :m], gamma, metric))
    return out


def soft_dtw_scores(
    a: Tensor,
    a_padding: Tensor | None,
    b: Tensor,
    b_padding: Tensor | None,
    gamma: float = 0.1,
    metric: Metric = "cosine",
) -> Tensor:
    """``D [N, M]``: soft-DTW divergence between ``a_i`` and ``b_j`` (Blondel et al. 2021), differentiable.

    ``D(i, j) = sdtw(a_i, b_j) - (sdtw(a_i, a_i) + sdtw(b_j, b_j)) / 2`` over the valid tokens
    (right padding); the ``N * M`` cross terms are one batched ``soft_dtw`` per distinct pair of
    lengths (Cuturi & Blondel 2017).

    Raises:
        ValueError: On shapes that do not fit, a row without valid tokens or left padding.
    """
    la = _lengths(_valid(a, a_padding, "soft_dtw a"), "soft_dtw a")
    lb = _lengths(_valid(b, b_padding, "soft_dtw b"), "soft_dtw b")
    n, m = a.shape[0], b.shape[0]
    x = a[:, None].expand(n, m, *a.shape[1:]).reshape(n * m, *a.shape[1:])
    y = b[None].expand(n, m, *b.shape[1:]).reshape(n * m, *b.shape[1:])
    cross = ragged_soft_dtw(x, la.repeat_interleave(m), y, lb.repeat(n), gamma, metric).reshape(n, m)
    self_a = ragged_soft_dtw(a, la, a, la, gamma, metric)
    self_b = ragged_soft_dtw(b, lb, b, lb, gamma, metric)
    return cross - 0.5 * (self_a[:, None] + self_b[None, :])


def soft_dtw_loss(
    a: Tensor,
    a_padding: Tensor | None,
    b: Tensor,
    b_padding: Tensor | None,
    logit_scale: Tensor,
    ids: Tensor | None = None,
    ids_b: Tensor | None = None,
    gamma: float = 0.1,
    metric: Metric = "cosine",
) -> Tensor:
    """InfoNCE on the score ``s(i, j) = -D(i, j)`` of ``soft_dtw_scores`` (sequence matching).

    Args:
        a: ``Tensor[N, T, E]`` token/frame sequences of the first modality (right-padded).
        a_padding: ``BoolTensor[N, T]`` (True = padded) or ``None``.
        b: ``Tensor[N, S, E]`` sequences of the second modality (right-padded).
        b_padding: ``BoolTensor[N, S]`` or ``None``.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        ids: ``LongTensor[N]`` content ids of the ``a`` rows, or ``None``.
        ids_b: ``LongTensor[N]`` content ids of the ``b`` rows, or ``None``.
        gamma: Soft-DTW smoothing.
        metric: Step cost, ``cosine`` (``1 - cos``) or ``sqeuclidean``.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: On shapes that do not fit, a row without valid tokens, left padding, or a
            bad ``gamma``/``metric``.
    """
    scores = soft_dtw_scores(a, a_padding, b, b_padding, gamma, metric)
    return score_infonce_loss(-scale_of(logit_scale) * scores, ids, ids_b)


# ---------------------------------------------------------------- token modules


@dataclass
class TokenPair:
    """Projected tokens of the rows where two modalities were both observed.

    Attributes:
        a: ``Tensor[P, T, E]`` first modality's tokens.
        a_padding: ``BoolTensor[P, T]`` (True = padded).
        b: ``Tensor[P, S, E]`` second modality's tokens.
        b_padding: ``BoolTensor[P, S]``.
        ids_a: ``LongTensor[P]`` content ids of the ``a`` rows.
        ids_b: ``LongTensor[P]`` content ids of the ``b`` rows.
    """

    a: Tensor
    a_padding: Tensor
    b: Tensor
    b_padding: Tensor
    ids_a: Tensor
    ids_b: Tensor


class TokenProjection(nn.Module):
    """The token objectives' own ``Linear(D_m, dim)`` per modality, mapping encoder tokens to one space.

    Encoders of two modalities have their own token widths and the model's heads project only
    the pooled vector, so a token objective owns these maps (built by ``build`` from the model).

    Args:
        dim: Width of the token space, or ``None``: the model's embedding width (``heads[m].out_dim``).

    Raises:
        ConfigError: If ``dim < 1``.
    """

    def __init__(self, dim: int | None) -> None:
        super().__init__()
        check_arg("dim", dim is None or dim >= 1, f"must be >= 1, got {dim}")
        self.dim = dim
        self.maps = nn.ModuleDict()

    def build(self, model: nn.Module, modalities: tuple[str, str]) -> None:
        """Create the maps from the encoders' token widths (once).

        Raises:
            ConfigError: If the model lacks an encoder width (or, without ``dim``, a head width).
        """
        if len(self.maps) == 0:
            dim = self.dim or module_width(model, "heads", modalities[0], "out_dim")
            for m in modalities:
                self.maps[m] = nn.Linear(module_width(model, "encoders", m, "dim"), dim)

    def forward(self, outputs: Outputs, batch: Batch, modalities: tuple[str, str]) -> TokenPair | None:
        """Projected tokens and padding of the paired rows (``None`` if a modality is absent).

        Raises:
            ValueError: If ``build`` has not run.
        """
        if len(self.maps) == 0:
            raise ValueError("token objectives: bind(model) must run before forward (Method does it)")
        tokens = paired_rows(outputs.tokens, batch, modalities)
        if tokens is None:
            return None
        pads = {
            m: outputs.padding.get(m, torch.zeros_like(t[..., 0], dtype=torch.bool)) for m, t in outputs.tokens.items()
        }
        padding = paired_rows(pads, batch, modalities)
        assert padding is not None  # pads has every modality that has tokens
        a, b = self.maps[modalities[0]](tokens.a), self.maps[modalities[1]](tokens.b)
        return TokenPair(a, padding.a, b, padding.b, tokens.ids_a, tokens.ids_b)


#: ``(pair, exp(logit_scale)) -> (a -> b logits [P, P], b -> a logits [P, P])``.
TokenLogits = Callable[[TokenPair, Tensor], tuple[Tensor, Tensor]]


def token_contrastive(
    modalities: tuple[str, str],
    project: TokenProjection,
    scale: Tensor,
    outputs: Outputs,
    batch: Batch,
    logits: TokenLogits,
) -> LossOutput:
    """The token objectives' forward: projected paired tokens -> ``logits`` -> ``score_infonce_loss``.

    Fewer than two paired rows give a zero loss connected to the graph and the projections.
    Metrics: ``temperature``, ``paired``, ``acc_a2b``, ``acc_b2a``.
    """
    pair = project(outputs, batch, modalities)
    metrics = pair_metrics(scale, pair.a.shape[0] if pair is not None else 0)
    if pair is None or pair.a.shape[0] < 2:
        return LossOutput(loss=outputs.zero(scale, *project.parameters()), metrics=metrics)
    ab, ba = logits(pair, scale.exp())
    n, device = ab.shape[0], ab.device
    hit = same_content(pair.ids_a, pair.ids_b, n, device) | torch.eye(n, dtype=torch.bool, device=device)
    metrics["acc_a2b"], metrics["acc_b2a"] = top1_fraction(ab, hit), top1_fraction(ba, hit)
    return LossOutput(loss=score_infonce_loss(ab, pair.ids_a, pair.ids_b, ba), metrics=metrics)


class TokenObjective(PairObjective):
    """A contrastive loss over the batch from a score between the token sequences of two modalities.

    Reads ``outputs.tokens[m]`` and ``outputs.padding[m]`` of the rows where both modalities are
    present (not the pooled embeddings), mapped by its own ``TokenProjection``; same-content
    rows (``batch.ids_of``) are never negatives (``token_contrastive``). Subclasses give
    ``logits``.

    Args:
        modalities: Two modality names (default: the model's two).
        name: The registered name (for messages).
        temperature: Initial temperature.
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        dim: Width of the projected tokens (default: the model's embedding width).
    """

    def __init__(
        self,
        modalities: list[str] | None,
        name: str,
        temperature: float,
        learn_temperature: bool,
        max_logit_scale: float,
        dim: int | None,
    ) -> None:
        super().__init__(modalities, name)
        self.scale = LogitScale(temperature, learn_temperature, max_logit_scale)
        self.project = TokenProjection(dim)

    def bind(self, model: nn.Module) -> None:
        """Resolve the modalities and build the token projections.

        Raises:
            ConfigError: If a modality is unknown or the model lacks the widths.
        """
        super().bind(model)
        self.project.build(model, self.modalities)

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss (see ``token_contrastive``)."""
        return token_contrastive(self.modalities, self.project, self.scale(), outputs, batch, self.logits)

    def logits(self, pair: TokenPair, scale: Tensor) -> tuple[Tensor, Tensor]:
        """The a -> b and b -> a logits ``[P, P]`` of the paired rows, times ``scale``."""
        raise NotImplementedError


@register("objective", "filip")
class FILIP(TokenObjective):
    """FILIP token-wise late interaction (Yao et al. 2022; see ``filip_loss``) on projected encoder tokens.

    Args:
        modalities: Two modality names (default: the model's two).
        temperature: Initial temperature.
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        dim: Width of the projected tokens (default: the model's embedding width).
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        dim: int | None = None,
    ) -> None:
        super().__init__(modalities, "filip", temperature, learn_temperature, max_logit_scale, dim)

    def logits(self, pair: TokenPair, scale: Tensor) -> tuple[Tensor, Tensor]:
        """``filip_logits`` of the paired rows."""
        return filip_logits(pair.a, pair.a_padding, pair.b, pair.b_padding, scale)


@register("objective", "ot_tokens")
class OTTokens(TokenObjective):
    """Contrastive token alignment by optimal transport: score ``-W`` of ``ot_token_distance`` (Cuturi 2013).

    Args:
        modalities: Two modality names (default: the model's two).
        temperature: Initial temperature.
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        dim: Width of the projected tokens (default: the model's embedding width).
        epsilon: Entropic regularisation of the plans, in units of ``1 - cos``.
        iterations: Sinkhorn iterations.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        dim: int | None = None,
        epsilon: float = 0.05,
        iterations: int = 50,
    ) -> None:
        super().__init__(modalities, "ot_tokens", temperature, learn_temperature, max_logit_scale, dim)
        check_arg("epsilon", epsilon > 0, f"must be > 0, got {epsilon}")
        check_arg("iterations", iterations >= 1, f"must be >= 1, got {iterations}")
        self.epsilon, self.iterations = epsilon, iterations

    def logits(self, pair: TokenPair, scale: Tensor) -> tuple[Tensor, Tensor]:
        """``-scale * W`` and its transpose."""
        w = ot_token_distance(pair.a, pair.a_padding, pair.b, pair.b_padding, self.epsilon, self.iterations)
        return -scale * w, -scale * w.T


@register("objective", "soft_dtw")
class SoftDTW(TokenObjective):
    """Contrastive sequence matching: score ``-D`` of ``soft_dtw_scores`` (soft-DTW divergence, Blondel et al. 2021).

    The divergence sums step costs along the alignment path, so its scale grows with the
    sequence lengths; the default temperature (1) suits ``cosine`` steps on a few dozen tokens.

    Args:
        modalities: Two modality names (default: the model's two).
        temperature: Initial temperature.
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        dim: Width of the projected tokens (default: the model's embedding width).
        gamma: Soft-DTW smoothing (> 0).
        metric: Step cost: ``cosine`` (``1 - cos``) or ``sqeuclidean``.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 1.0,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        dim: int | None = None,
        gamma: float = 0.1,
        metric: Metric = "cosine",
    ) -> None:
        super().__init__(modalities, "soft_dtw", temperature, learn_temperature, max_logit_scale, dim)
        check_arg("gamma", gamma > 0, f"must be > 0, got {gamma}")
        if metric not in ("cosine", "sqeuclidean"):
            raise ConfigError("metric", f"unknown step cost {metric!r}", ["cosine", "sqeuclidean"])
        self.gamma, self.metric = gamma, metric

    def logits(self, pair: TokenPair, scale: Tensor) -> tuple[Tensor, Tensor]:
        """``-scale * D`` and its transpose."""
        d = soft_dtw_scores(pair.a, pair.a_padding, pair.b, pair.b_padding, self.gamma, self.metric)
        return -scale * d, -scale * d.T
