"""Masked prediction: the losses, the masking helpers and MultiMAE.

* ``multimae``: Bachmann, Mizrahi, Atanov and Zamir 2022, "MultiMAE: Multi-modal Multi-task
  Masked Autoencoders" (after He et al. 2022, "Masked Autoencoders Are Scalable Vision
  Learners"). A fraction of every modality's stem tokens is dropped; each encoder's trunk sees
  only its visible tokens; a small transformer decoder shared by all modalities reads the
  visible tokens of all of them plus one mask token per dropped position and predicts every
  modality's targets at its masked positions.
* The other masked objectives build on this module: ``masked_conditional``
  (``objectives.masked_conditional``: MLM / masked frames with another modality as context)
  and ``data2vec`` (``objectives.data2vec``: masked latent prediction against an EMA teacher).

The maths are ``masked_regression_loss`` and ``masked_token_loss`` over the masked positions
only (``[M, P]`` predictions with the batch row of each), both a mean over rows of each row's
mean over its masked positions: a per-sample loss, so a batch split into parts gives the
masked-row-count-weighted mean of the parts' losses (no statistic crosses rows, so nothing is
gathered under data parallelism). The masking helpers are ``random_mask``, ``visible_index``,
``bert_corrupt`` and ``replace_masked``.

Masks are drawn from torch's global generator (the trainer seeds it per epoch). Only the rows
where a modality was observed are encoded, as ``MultimodalModel`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Encoder, Objective
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.nn.layers import SinusoidalPositions, Transformer
from modalign.objectives.contrastive import check_known, model_modalities

# --------------------------------------------------------------------------------------------
# Maths: losses over the masked positions


def per_row_mean(values: Tensor, rows: Tensor) -> Tensor:
    """Mean over the distinct rows of each row's mean value.

    Args:
        values: ``Tensor[M]`` one value per masked position.
        rows: ``LongTensor[M]`` the batch row of each position.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: If the shapes differ or ``M == 0``.
    """
    if values.dim() != 1 or rows.shape != values.shape:
        raise ValueError(f"expected values [M] and rows [M], got {tuple(values.shape)} and {tuple(rows.shape)}")
    if values.numel() == 0:
        raise ValueError("no masked position to average (M == 0)")
    _, inverse, counts = torch.unique(rows, return_inverse=True, return_counts=True)
    sums = values.new_zeros(counts.shape[0]).index_add(0, inverse, values)
    return (sums / counts.to(values.dtype)).mean()


def normalize_patches(target: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's per-patch target normalisation: ``(t - mean) / sqrt(var + eps)`` over the last axis.

    ``var`` is the unbiased variance, as in MAE's ``norm_pix_loss`` (He et al. 2022); a
    one-value patch is only centred.
    """
    if target.shape[-1] < 2:
        return target - target.mean(dim=-1, keepdim=True)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


def masked_regression_loss(
    pred: Tensor,
    target: Tensor,
    rows: Tensor,
    normalize_target: bool = True,
    kind: str = "mse",
    beta: float = 1.0,
) -> Tensor:
    """Regression of the masked positions' targets, averaged per row then over rows.

    Each position's loss is the mean over ``P`` of ``(pred - t)^2`` (``kind="mse"``, MAE) or of
    the smooth L1 loss with threshold ``beta`` (``kind="smooth_l1"``, data2vec), where ``t`` is
    the target, per-patch normalised if ``normalize_target`` (``normalize_patches``); the
    target gets no gradient.

    Args:
        pred: ``Tensor[M, P]`` predictions at the masked positions.
        target: ``Tensor[M, P]`` targets at the same positions.
        rows: ``LongTensor[M]`` batch row of each position.
        normalize_target: Normalise each target row (MAE's ``norm_pix_loss``).
        kind: ``"mse"`` or ``"smooth_l1"``.
        beta: Threshold of the smooth L1 loss.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: On shapes that differ, ``M == 0``, an unknown ``kind`` or ``beta <= 0``.
    """
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"expected pred and target [M, P], got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.shape[0] == 0:
        raise ValueError("no masked position to average (M == 0)")
    if kind not in ("mse", "smooth_l1") or beta <= 0:
        raise ValueError(f"kind must be 'mse' or 'smooth_l1' and beta > 0, got {kind!r}, {beta}")
    t = target.detach()
    t = normalize_patches(t) if normalize_target else t
    if kind == "mse":
        per_position = (pred - t).pow(2).mean(dim=-1)
    else:
        per_position = F.smooth_l1_loss(pred, t, reduction="none", beta=beta).mean(dim=-1)
    return per_row_mean(per_position, rows)


def masked_token_loss(logits: Tensor, target: Tensor, rows: Tensor) -> Tensor:
    """Cross-entropy of the masked tokens' ids (BERT's MLM), averaged per row then over rows.

    Args:
        logits: ``Tensor[M, V]`` vocabulary logits at the masked positions.
        target: ``LongTensor[M]`` the original token ids there.
        rows: ``LongTensor[M]`` batch row of each position.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: On shapes that do not fit or ``M == 0``.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [M, V] and target [M], got {tuple(logits.shape)} and {tuple(target.shape)}")
    return per_row_mean(F.cross_entropy(logits, target, reduction="none"), rows)


# --------------------------------------------------------------------------------------------
# Masking


def random_mask(valid: Tensor, ratio: float | Tensor, span: int = 1) -> Tensor:
    """Choose ``k`` of each row's ``n`` valid positions at random, singly or in spans.

    ``k = floor(ratio * n + 0.5)`` clamped to ``[1, max(n - 1, 1)]`` (at least one masked
    position and, from two valid positions on, at least one visible), ``0`` when ``n == 0``.
    With ``span > 1`` the sequence is cut into blocks of ``span`` positions (the cut shifted by
    a random offset per row) and whole blocks are masked in random order, the last one only
    partly when ``k`` is not a multiple: contiguous spans, as data2vec masks speech frames
    (Baevski et al. 2022) and wav2vec 2.0 before it, so a masked token cannot be read off its
    immediate neighbours. ``span=1`` is uniform sampling. Uses torch's global generator.

    Args:
        valid: ``BoolTensor[B, T]``, ``True`` where a position may be masked.
        ratio: Fraction to mask, a float in ``(0, 1)`` or one per row, ``Tensor[B]`` in ``[0, 1]``.
        span: Length of the masked spans along ``T`` (``>= 1``).

    Returns:
        ``BoolTensor[B, T]``, ``True`` = masked; never ``True`` where ``valid`` is ``False``.

    Raises:
        ValueError: If ``ratio`` is out of range or of the wrong shape, or ``valid`` is not 2-D.
    """
    if valid.dim() != 2:
        raise ValueError(f"valid must be [B, T], got shape {tuple(valid.shape)}")
    if isinstance(ratio, Tensor):
        if ratio.shape != valid.shape[:1] or bool(((ratio < 0) | (ratio > 1)).any()):
            raise ValueError(f"per-row mask ratios must be [B] in [0, 1], got shape {tuple(ratio.shape)}")
        ratio = ratio.double()
    elif not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    n = valid.sum(dim=1)
    k = torch.floor(ratio * n.double() + 0.5).long().clamp(min=1)
    k = torch.minimum(k, (n - 1).clamp(min=1)).masked_fill(n == 0, 0)
    noise = torch.rand(valid.shape, device=valid.device)
    if span > 1:  # one score per block: a block's positions take consecutive ranks
        rows, steps = valid.shape
        offset = torch.randint(0, span, (rows, 1), device=valid.device)
        block = (torch.arange(steps, device=valid.device)[None] + offset) // span
        scores = torch.rand(rows, steps // span + 2, device=valid.device)
        noise = scores.gather(1, block) + noise * 1e-3 / scores.shape[1]  # random order inside a block
    noise = noise.masked_fill(~valid, 2.0)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return rank < k[:, None]


def dirichlet_ratios(ratios: Tensor, rows: int, alpha: float) -> Tensor:
    """Per-row mask ratios that share a visible budget between modalities (MultiMAE).

    The modalities' visible fractions ``v = 1 - ratios`` are pooled into one budget
    ``V = sum_m v_m``; each row draws proportions ``lambda ~ Dirichlet(alpha M v / V)`` (the
    symmetric ``Dirichlet(alpha)`` of MultiMAE when the ratios are equal) and modality ``m``
    keeps ``min(1, lambda_m V)`` of its tokens: on average its own share ``v_m``, while some
    rows see (almost) only one modality.

    Args:
        ratios: ``Tensor[M]`` the modalities' mask ratios.
        rows: Batch size ``B``.
        alpha: Dirichlet concentration (MultiMAE: 1; large values approach the fixed ratios).

    Returns:
        ``Tensor[B, M]`` mask ratios in ``[0, 1]``.
    """
    visible = 1.0 - ratios
    budget = visible.sum()
    concentration = (alpha * ratios.shape[0] * visible / budget).expand(rows, -1)
    lam = torch.distributions.Dirichlet(concentration).sample()
    return 1.0 - (lam * budget).clamp(max=1.0)


def visible_index(hidden: Tensor) -> tuple[Tensor, Tensor]:
    """Where each row's visible tokens are, in their original order, for ``Tensor.gather``.

    Args:
        hidden: ``BoolTensor[B, T]``, ``True`` for masked or padded positions.

    Returns:
        ``(index LongTensor[B, K], padding BoolTensor[B, K])`` with ``K`` the largest visible
        count (at least 1); a row with fewer visible tokens is completed with hidden positions,
        marked padded.
    """
    count = (~hidden).sum(dim=1)
    k = max(1, int(count.max())) if hidden.shape[0] else 1
    order = torch.argsort(hidden.to(torch.int8), dim=1, stable=True)[:, :k]
    return order, torch.arange(k, device=hidden.device)[None, :] >= count[:, None]


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """``tokens[b, index[b, j]]``: ``Tensor[B, T, D]`` and ``LongTensor[B, K]`` to ``Tensor[B, K, D]``."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def replace_masked(tokens: Tensor, position_tokens: Tensor, mask: Tensor, mask_embedding: Tensor) -> Tensor:
    """Replace masked stem tokens by a learned mask embedding plus their position.

    ``position_tokens`` is the stem's output for an all-zero input (its positions plus a
    constant), so a masked token keeps where it is but nothing of its content (data2vec, BEiT).

    Args:
        tokens: ``Tensor[B, T, D]`` stem tokens.
        position_tokens: ``Tensor[B, T, D]`` stem tokens of a zero input.
        mask: ``BoolTensor[B, T]``.
        mask_embedding: ``Tensor[D]``.
    """
    return torch.where(mask[..., None], position_tokens + mask_embedding, tokens)


def bert_corrupt(
    ids: Tensor, mask: Tensor, mask_id: int, low: int, high: int, mask_prob: float = 0.8, random_prob: float = 0.1
) -> Tensor:
    """BERT's corruption of the masked ids: ``[MASK]``, a random id, or unchanged (80/10/10).

    Args:
        ids: ``LongTensor[B, T]`` token ids.
        mask: ``BoolTensor[B, T]`` positions to corrupt.
        mask_id: Id of ``[MASK]``.
        low: Smallest random replacement id.
        high: One past the largest random replacement id.
        mask_prob: Probability of ``[MASK]`` at a masked position.
        random_prob: Probability of a uniform id in ``[low, high)``; the rest stay unchanged.

    Raises:
        ValueError: If the probabilities are negative or sum above 1, or ``low >= high``.
    """
    if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1 or low >= high:
        raise ValueError(f"invalid corruption: mask_prob={mask_prob}, random_prob={random_prob}, ids [{low}, {high})")
    u = torch.rand(ids.shape, device=ids.device)
    random_ids = torch.randint(low, high, ids.shape, device=ids.device)
    out = torch.where(mask & (u >= mask_prob) & (u < mask_prob + random_prob), random_ids, ids)
    return torch.where(mask & (u < mask_prob), torch.full_like(ids, mask_id), out)


# --------------------------------------------------------------------------------------------
# Shared objective helpers


def model_encoder(model: nn.Module, modality: str) -> Encoder:
    """``model.encoders[modality]`` (the ``MultimodalModel`` layout), typed as an ``Encoder``."""
    encoder = getattr(model, "encoders")[modality]  # noqa: B009 (objectives see the model as nn.Module)
    assert isinstance(encoder, Encoder)
    return encoder


def token_encoder(model: nn.Module, modality: str, name: str) -> Encoder:
    """The model's encoder of ``modality``, which must have a token stem.

    Raises:
        ConfigError: If the model has no such encoder or it has no token stem (naming it and
            the encoders that have one).
    """
    check_known((modality,), model, name)
    encoder = model_encoder(model, modality)
    if not encoder.token_stem:
        try:
            encoder.stem(torch.zeros(0))
        except NotImplementedError as e:
            raise ConfigError("modalities", f"{name}: the {modality!r} encoder: {e}") from None
    return encoder


def prediction_width(encoder: Encoder, modality: str, name: str) -> int:
    """Output width of a head predicting ``encoder.targets``: the vocabulary for ids, else ``P``.

    The float width is read from ``targets`` of a zero probe input built from the encoder's
    ``in_channels`` (and ``image_size`` for images).

    Raises:
        ConfigError: If no probe input can be built for the encoder.
    """
    if encoder.kind == "text":
        return int(getattr(encoder, "vocab_size"))  # noqa: B009 (text encoders set it)
    channels, size = getattr(encoder, "in_channels", None), getattr(encoder, "image_size", None)
    if channels is None or (encoder.kind == "image") != (size is not None):
        raise ConfigError("modalities", f"{name}: cannot infer the target width of the {modality!r} encoder")
    shape = [1, int(channels), *([int(size)] * 2 if size is not None else [16])]
    with torch.no_grad():
        probe = torch.zeros(shape, device=next(encoder.parameters()).device)
        return int(encoder.targets(probe).shape[-1])


def observed_rows(batch: Batch, *modalities: str) -> Tensor:
    """``LongTensor[P]`` rows where every one of ``modalities`` was observed."""
    keep = torch.ones(batch.size, dtype=torch.bool, device=batch.ids.device)
    for m in modalities:
        keep = keep & batch.rows(m).to(keep.device)
    return keep.nonzero().squeeze(1)


def row_inputs(batch: Batch, modality: str, index: Tensor) -> tuple[Tensor, Tensor | None]:
    """The modality's data and padding at rows ``index``."""
    x = batch.data[modality]
    padding = batch.padding.get(modality)
    index = index.to(x.device)
    return x[index], padding[index] if padding is not None else None


def valid_tokens(tokens: Tensor, padding: Tensor | None) -> Tensor:
    """``BoolTensor[B, T]``: stem tokens that are not padded."""
    if padding is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return ~padding


def masked_loss(
    extras: dict[str, Tensor], key: str, normalize: bool, kind: str = "mse", beta: float = 1.0
) -> tuple[Tensor, dict[str, float]]:
    """The loss of one modality's ``pred/target/row`` extras (``key`` prefixes them) and metrics.

    Token ids (a ``LongTensor`` target) give ``masked_token_loss`` and an ``acc`` metric; float
    targets ``masked_regression_loss`` (``kind``, ``beta``, ``normalize``).
    """
    pred, target, rows = extras[f"{key}/pred"], extras[f"{key}/target"], extras[f"{key}/row"]
    metrics = {"masked": float(target.shape[0])}
    if target.is_floating_point():
        return masked_regression_loss(pred, target, rows, normalize, kind, beta), metrics
    metrics["acc"] = float((pred.detach().argmax(dim=-1) == target).float().mean())
    return masked_token_loss(pred, target, rows), metrics


def masked_parts(
    outputs: Outputs,
    objective: Objective,
    modalities: tuple[str, ...],
    normalize: bool,
    kind: str = "mse",
    beta: float = 1.0,
) -> LossOutput:
    """Sum of the per-modality masked losses found in ``outputs.extras`` (parts and metrics per modality).

    A modality without extras, or without a masked position in this batch, adds nothing; with
    none left the loss is a zero connected to the embeddings and the objective's parameters.
    """
    parts: dict[str, Tensor] = {}
    metrics: dict[str, float] = {}
    for m in modalities:
        key = objective.key(m)
        if f"{key}/pred" not in outputs.extras or outputs.extras[f"{key}/row"].numel() == 0:
            continue
        parts[m], found = masked_loss(outputs.extras, key, normalize, kind, beta)
        metrics.update({f"{name}_{m}": v for name, v in found.items()})
    if not parts:
        return LossOutput(loss=outputs.zero(*objective.parameters()), metrics=metrics)
    return LossOutput(loss=torch.stack(list(parts.values())).sum(), parts=parts, metrics=metrics)


@dataclass
class MaskedTokens:
    """One modality's masked encoding for a batch.

    Attributes:
        index: ``LongTensor[P]`` batch rows that were encoded.
        mask: ``BoolTensor[P, T]`` masked stem positions.
        targets: ``encoder.targets`` of those rows: ``Tensor[P, T, ...]``.
    """

    index: Tensor
    mask: Tensor
    targets: Tensor

    def extras(self, modality: str, pred: Tensor) -> dict[str, Tensor]:
        """``{m/pred, m/target, m/row}`` at the masked positions (``pred: [M, P]``)."""
        where = self.mask.nonzero()
        rows = self.index.to(where.device)[where[:, 0]]
        return {f"{modality}/pred": pred, f"{modality}/target": self.targets[self.mask], f"{modality}/row": rows}


# --------------------------------------------------------------------------------------------
# MultiMAE


@register("objective", "multimae")
class MultiMAE(Objective):
    """MultiMAE: every modality's tokens are masked and reconstructed from all visible tokens.

    Per modality ``m``: stem tokens, a random subset of ``mask_ratio`` of them dropped
    (``random_mask``; with ``alpha``, per row by a Dirichlet split of the visible budget), the
    trunk run on the visible ones only; the trunk's outputs are projected to ``decoder_dim``
    and placed back at their positions, every dropped position gets the modality's mask token,
    and all positions get a sinusoidal position (by token index) and a learned modality
    embedding. With ``global_tokens`` the trunk's pooled output ([CLS] or mean; projected, plus
    the modality embedding) is one more token, MultiMAE's global token, so the summary that
    evaluation reads is trained too. The sequences of all modalities are concatenated and go
    through one shared transformer decoder; a linear head per modality predicts its targets at
    its masked positions: the per-patch normalised patch/frame values (MSE, ``norm_targets``)
    or the token ids (cross-entropy). The loss is the sum over modalities (parts named by
    modality).

    Writes ``<label>/<m>/pred`` (``[M, P]``), ``/target``, ``/row`` (batch rows) and ``/mask``
    (``BoolTensor[B, T]``) to ``Outputs.extras``.

    Args:
        modalities: Modalities to mask and reconstruct (default: every modality of the model).
        mask_ratio: Fraction of each modality's tokens dropped.
        mask_ratios: Per-modality overrides of ``mask_ratio``.
        decoder_dim: Width of the shared decoder.
        decoder_depth: Blocks of the shared decoder.
        decoder_heads: Attention heads of the decoder.
        norm_targets: Normalise each float target patch (MAE's ``norm_pix_loss``).
        global_tokens: Add each modality's pooled output to the decoder input.
        alpha: If set, each row splits the modalities' visible budget by a Dirichlet(``alpha``)
            draw (``dirichlet_ratios``; MultiMAE: 1), so that some rows must be reconstructed
            mostly from the other modalities; ``None``: the fixed ratios.

    Raises:
        ConfigError: In ``bind``, if an encoder has no token stem or a modality is unknown.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        mask_ratio: float = 0.75,
        mask_ratios: dict[str, float] | None = None,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_targets: bool = True,
        global_tokens: bool = True,
        alpha: float | None = None,
    ) -> None:
        super().__init__()
        if alpha is not None and alpha <= 0:
            raise ConfigError("alpha", f"must be > 0 or null, got {alpha}")
        for key, r in {"mask_ratio": mask_ratio, **(mask_ratios or {})}.items():
            if not 0.0 < r < 1.0:
                path = "mask_ratio" if key == "mask_ratio" else f"mask_ratios.{key}"
                raise ConfigError(path, f"must be in (0, 1), got {r}")
        self._modalities = tuple(modalities) if modalities is not None else None
        self.ratios = dict(mask_ratios or {})
        self.mask_ratio = mask_ratio
        self.norm_targets = norm_targets
        self.global_tokens = global_tokens
        self.alpha = alpha
        self.decoder_dim = decoder_dim
        self.decoder = Transformer(decoder_dim, decoder_depth, decoder_heads)
        self.positions = SinusoidalPositions(decoder_dim)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities masked (resolved by ``bind``)."""
        return self._modalities or ()

    def bind(self, model: nn.Module) -> None:
        """Check token stems; create per-modality projections, mask tokens, embeddings and heads.

        Raises:
            ConfigError: If a modality is unknown or its encoder has no token stem.
        """
        self._modalities = self._modalities or tuple(model_modalities(model))
        unknown = sorted(set(self.ratios) - set(self.modalities))
        if unknown:
            raise ConfigError("mask_ratios", f"multimae: no masked modality {unknown}", list(self.modalities))
        d = self.decoder_dim
        self.embed, self.heads = nn.ModuleDict(), nn.ModuleDict()
        self.mask_tokens, self.modality_embeddings = nn.ParameterDict(), nn.ParameterDict()
        for m in self.modalities:
            encoder = token_encoder(model, m, "multimae")
            self.embed[m] = nn.Linear(encoder.dim, d)
            self.heads[m] = nn.Linear(d, prediction_width(encoder, m, "multimae"))
            self.mask_tokens[m] = nn.Parameter(torch.randn(d) * 0.02)
            self.modality_embeddings[m] = nn.Parameter(torch.randn(d) * 0.02)

    def features(self, model: nn.Module, batch: Batch, outputs: Outputs) -> dict[str, Tensor]:
        """Mask, encode the visible tokens, decode jointly and predict at the masked positions."""
        sequences: dict[str, tuple[Tensor, Tensor, MaskedTokens]] = {}
        ratios = self._ratios(batch)
        for m in self.modalities:
            if m in batch.data and bool(batch.rows(m).any()):
                sequences[m] = self._encode(model_encoder(model, m), batch, m, ratios[m])
        if not sequences:
            return {}
        names = list(sequences)
        h = self.decoder(torch.cat([sequences[m][0] for m in names], 1), torch.cat([sequences[m][1] for m in names], 1))
        extras: dict[str, Tensor] = {}
        for m, part in zip(names, h.split([sequences[m][0].shape[1] for m in names], dim=1), strict=True):
            masked = sequences[m][2]
            part = part[:, 1:] if self.global_tokens else part
            full_mask = torch.zeros(part.shape[:2], dtype=torch.bool, device=part.device)
            full_mask = full_mask.index_copy(0, masked.index, masked.mask)
            extras.update(masked.extras(m, self.heads[m](part[full_mask])))
            extras[f"{m}/mask"] = full_mask
        return extras

    def _ratios(self, batch: Batch) -> dict[str, float | Tensor]:
        """Each modality's mask ratio: fixed, or per row ``Tensor[B]`` drawn by ``dirichlet_ratios``."""
        fixed = {m: self.ratios.get(m, self.mask_ratio) for m in self.modalities}
        if self.alpha is None:
            return dict(fixed)
        drawn = dirichlet_ratios(torch.tensor([fixed[m] for m in self.modalities]), batch.size, self.alpha)
        return {m: drawn[:, i] for i, m in enumerate(self.modalities)}

    def _encode(
        self, encoder: Encoder, batch: Batch, m: str, ratio: float | Tensor
    ) -> tuple[Tensor, Tensor, MaskedTokens]:
        """Decoder input ``[B, T (+1), d]`` and padding of one modality, and its masking."""
        index = observed_rows(batch, m)
        x, padding = row_inputs(batch, m, index)
        tokens, stem_padding = encoder.stem(x, padding)
        valid = valid_tokens(tokens, stem_padding)
        mask = random_mask(valid, ratio[index].to(valid.device) if isinstance(ratio, Tensor) else ratio)
        keep, keep_padding = visible_index(mask | ~valid)
        out = encoder.trunk(gather_tokens(tokens, keep), keep_padding)
        visible = self.embed[m](out.tokens)
        placed = torch.zeros(*tokens.shape[:2], self.decoder_dim, dtype=visible.dtype, device=visible.device)
        placed = placed.scatter(1, keep[..., None].expand_as(visible), visible)
        seq = torch.where((mask | ~valid)[..., None], self.mask_tokens[m].to(visible.dtype), placed)
        seq = self.positions(seq) + self.modality_embeddings[m]
        if self.global_tokens:  # the pooled summary, without position (MultiMAE's global token)
            seq = torch.cat([(self.embed[m](out.pooled) + self.modality_embeddings[m])[:, None], seq], dim=1)
            valid = torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)
        seq_all = seq.new_zeros(batch.size, *seq.shape[1:]).index_copy(0, index, seq)
        padding_all = valid.new_ones(batch.size, seq.shape[1]).index_copy(0, index, ~valid)
        return seq_all, padding_all, MaskedTokens(index, mask, encoder.targets(x, padding))

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Sum over modalities of the masked reconstruction losses; metrics ``masked_<m>`` (, ``acc_<m>``)."""
        return masked_parts(outputs, self, self.modalities, self.norm_targets)
