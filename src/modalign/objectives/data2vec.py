"""data2vec: masked prediction of an EMA teacher's contextualised representations.

After Baevski, Hsu, Xu, Babu, Gu and Auli 2022, "data2vec: A General Framework for
Self-supervised Learning in Speech, Vision and Language" (ICML 2022). Per modality, a teacher
(an exponential moving average of the student encoder) reads the whole input; its targets are
the average of the normalised outputs of its top ``K`` transformer blocks' feed-forward
networks (taken before the block's last residual connection, as in the paper; each layer
layer-normalised as for vision and text, or instance-normalised over the sequence as for
speech). An encoder without ``transformer.blocks`` gives its final trunk tokens. The student
reads the input with ``mask_ratio`` of its stem tokens replaced by a learned mask embedding
(at their positions, so positions align with the teacher's) and a linear regression head
predicts the teacher's targets at the masked positions. Modalities are trained separately, as
data2vec does; the loss is the sum over modalities.

The teacher is a frozen deep copy of each student encoder, made in ``bind`` and registered as a
submodule (so it is in the checkpoint); ``after_step`` moves it towards the student with
momentum ``tau`` going linearly from ``tau0`` to ``tau1`` over training (``StepContext.progress``).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Encoder, Objective
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs, StepContext
from modalign.nn.layers import masked_mean
from modalign.objectives.contrastive import model_modalities
from modalign.objectives.masked import (
    MaskedTokens,
    masked_parts,
    model_encoder,
    observed_rows,
    random_mask,
    replace_masked,
    row_inputs,
    token_encoder,
    valid_tokens,
)


def data2vec_targets(
    layers: list[Tensor], norm: str = "layer", padding: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """Average of the normalised layer outputs, data2vec's regression target.

    ``norm="layer"``: each token's features are normalised (LayerNorm without affine, data2vec
    for vision and text); ``norm="instance"``: each feature is normalised over the valid tokens
    of its sequence (instance norm, data2vec for speech), which removes what is constant along
    the sequence. Statistics are biased (divide by the count), as in the norms of torch.

    Args:
        layers: ``K`` tensors ``[B, T, D]``.
        norm: ``"layer"`` or ``"instance"``.
        padding: ``BoolTensor[B, T]`` tokens left out of instance statistics, or ``None``.
        eps: Epsilon of the normalisation.

    Returns:
        ``Tensor[B, T, D]``.

    Raises:
        ValueError: If ``layers`` is empty or shapes differ, or ``norm`` is unknown.
    """
    if not layers or any(y.shape != layers[0].shape for y in layers):
        raise ValueError(f"expected K >= 1 layer outputs of one shape, got {[tuple(y.shape) for y in layers]}")
    if norm not in ("layer", "instance"):
        raise ValueError(f"norm must be 'layer' or 'instance', got {norm!r}")
    if norm == "layer":
        return torch.stack([F.layer_norm(y, y.shape[-1:], eps=eps) for y in layers]).mean(dim=0)
    y0 = layers[0]
    valid = torch.ones(y0.shape[:2], dtype=y0.dtype, device=y0.device) if padding is None else (~padding).to(y0.dtype)
    w = (valid / valid.sum(dim=1, keepdim=True).clamp(min=1.0)).unsqueeze(-1)
    normed = []
    for y in layers:
        mean = (y * w).sum(dim=1, keepdim=True)
        var = ((y - mean).pow(2) * w).sum(dim=1, keepdim=True)
        normed.append((y - mean) / (var + eps).sqrt())
    return torch.stack(normed).mean(dim=0)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, tau: float) -> None:
    """``teacher <- tau * teacher + (1 - tau) * student`` for every parameter; buffers are copied.

    Raises:
        ValueError: If ``tau`` is outside ``[0, 1]`` or the two modules' parameters differ in names.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {tau}")
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("teacher and student have different parameters")
    for name, p in t_params.items():
        p.mul_(tau).add_(s_params[name].detach(), alpha=1.0 - tau)
    s_buffers = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        b.copy_(s_buffers[name])


def transformer_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's transformer blocks (``encoder.transformer.blocks``, each with an ``mlp``), or ``[]``."""
    blocks = getattr(getattr(encoder, "transformer", None), "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not all(hasattr(b, "mlp") for b in blocks):
        return []
    return list(blocks)


def block_outputs(encoder: Encoder, tokens: Tensor, padding: Tensor | None, top_k: int) -> list[Tensor]:
    """Feed-forward outputs of the top ``top_k`` blocks over the stem tokens, each ``[B, T, D]``.

    Read with forward hooks on each block's ``mlp`` while ``encoder.trunk`` runs; tokens the
    trunk prepends (the ViT's [CLS]) are cut off by keeping the last ``T`` positions. An encoder
    without ``transformer.blocks`` gives its final trunk tokens, ``[tokens]``.
    """
    blocks = transformer_blocks(encoder)
    if not blocks:
        return [encoder.trunk(tokens, padding).tokens]
    found: list[Tensor] = []
    mlps = [b.get_submodule("mlp") for b in blocks[-top_k:]]
    hooks = [mlp.register_forward_hook(lambda _m, _i, out: found.append(out)) for mlp in mlps]
    try:
        encoder.trunk(tokens, padding)
    finally:
        for hook in hooks:
            hook.remove()
    t = tokens.shape[1]
    return [y[:, y.shape[1] - t :] for y in found]


@register("objective", "data2vec")
class Data2Vec(Objective):
    """data2vec per modality: a masked student regresses its EMA teacher's top-K block average.

    With ``pooled_weight > 0`` the student's pooled output ([CLS] or mean, the vector evaluation
    reads) also regresses, through its own linear head, the mean over valid tokens of the
    teacher's targets: data2vec 2.0's [CLS] loss (Baevski et al. 2023, "Efficient
    Self-supervised Learning with Contextualized Target Representations for Vision, Speech and
    Language"), part ``<m>_pooled`` weighted by ``pooled_weight``.

    Writes ``<label>/<m>/pred`` (``[M, D]``), ``/target``, ``/row`` and ``/mask``
    (``BoolTensor[B, T]``) to ``Outputs.extras`` (and ``<m>_pooled/pred|target|row``).

    Args:
        modalities: Modalities trained (default: every modality of the model).
        mask_ratio: Fraction of stem tokens masked (data2vec vision: 0.6).
        top_k: Teacher blocks averaged (data2vec: 6 for vision of 12 blocks, 8 for speech).
        tau0: EMA momentum at the start of training.
        tau1: EMA momentum at the end of training.
        loss: ``"smooth_l1"`` (data2vec) or ``"mse"``.
        beta: Threshold of the smooth L1 loss.
        target_norm: ``"layer"`` (data2vec vision/text) or ``"instance"`` (speech) per layer.
        pooled_weight: Weight of the pooled-output regression (0: off).
        mask_span: Mask contiguous spans of this many tokens (``random_mask``; data2vec speech: 10
            frames), 1: single tokens.

    Raises:
        ConfigError: On an invalid ``mask_ratio``/``tau``, or (in ``bind``) an unknown modality,
            an encoder without token stem, or ``top_k`` above its number of blocks.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        mask_ratio: float = 0.6,
        top_k: int = 3,
        tau0: float = 0.999,
        tau1: float = 0.9999,
        loss: Literal["mse", "smooth_l1"] = "smooth_l1",
        beta: float = 1.0,
        target_norm: Literal["layer", "instance"] = "layer",
        pooled_weight: float = 0.0,
        mask_span: int = 1,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError("mask_ratio", f"must be in (0, 1), got {mask_ratio}")
        for key, tau in (("tau0", tau0), ("tau1", tau1)):
            if not 0.0 <= tau <= 1.0:
                raise ConfigError(key, f"must be in [0, 1], got {tau}")
        if top_k < 1 or beta <= 0 or loss not in ("mse", "smooth_l1") or pooled_weight < 0:
            got = f"top_k={top_k}, beta={beta}, loss={loss}, pooled_weight={pooled_weight}"
            raise ConfigError("top_k", f"need top_k >= 1, beta > 0, loss mse|smooth_l1, pooled_weight >= 0; got {got}")
        if target_norm not in ("layer", "instance"):
            raise ConfigError("target_norm", f"invalid value {target_norm!r}", ["layer", "instance"])
        self._modalities = tuple(modalities) if modalities is not None else None
        self.mask_ratio, self.top_k, self.tau0, self.tau1 = mask_ratio, top_k, tau0, tau1
        self.kind, self.beta = loss, beta
        self.target_norm, self.pooled_weight = target_norm, pooled_weight
        if mask_span < 1:
            raise ConfigError("mask_span", f"must be >= 1, got {mask_span}")
        self.mask_span = mask_span

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities trained (resolved by ``bind``)."""
        return self._modalities or ()

    def bind(self, model: nn.Module) -> None:
        """Copy each student encoder into a frozen teacher; create heads and mask embeddings.

        Raises:
            ConfigError: If a modality is unknown, its encoder has no token stem, or ``top_k``
                exceeds its transformer blocks.
        """
        self._modalities = self._modalities or tuple(model_modalities(model))
        self.teachers, self.heads, self.mask_embeddings = nn.ModuleDict(), nn.ModuleDict(), nn.ParameterDict()
        self.pooled_heads = nn.ModuleDict()
        for m in self.modalities:
            encoder = token_encoder(model, m, "data2vec")
            blocks = transformer_blocks(encoder)
            if len(blocks) < self.top_k and (blocks or self.top_k > 1):
                raise ConfigError("top_k", f"data2vec: the {m!r} encoder has {len(blocks)} blocks, top_k={self.top_k}")
            self.teachers[m] = copy.deepcopy(encoder).freeze()
            self.heads[m] = nn.Linear(encoder.dim, encoder.dim)
            self.mask_embeddings[m] = nn.Parameter(torch.randn(encoder.stem_dim) * 0.02)
            if self.pooled_weight > 0:
                self.pooled_heads[m] = nn.Linear(encoder.dim, encoder.dim)

    def momentum(self, progress: float) -> float:
        """EMA momentum at ``progress`` in ``[0, 1]``: ``tau0 + (tau1 - tau0) * progress``."""
        return self.tau0 + (self.tau1 - self.tau0) * progress

    def features(self, model: nn.Module, batch: Batch, outputs: Outputs) -> dict[str, Tensor]:
        """Teacher targets on the full input; student predictions at the masked positions."""
        extras: dict[str, Tensor] = {}
        for m in self.modalities:
            if m in batch.data and bool(batch.rows(m).any()):
                extras.update(self._modality(model_encoder(model, m), batch, m))
        return extras

    def _modality(self, encoder: Encoder, batch: Batch, m: str) -> dict[str, Tensor]:
        index = observed_rows(batch, m)
        x, padding = row_inputs(batch, m, index)
        teacher = self.teachers[m]
        assert isinstance(teacher, Encoder)
        with torch.no_grad():
            t_tokens, t_padding = teacher.stem(x, padding)
            layers = block_outputs(teacher, t_tokens, t_padding, self.top_k)
            target = data2vec_targets(layers, self.target_norm, t_padding)
        tokens, stem_padding = encoder.stem(x, padding)
        mask = random_mask(valid_tokens(tokens, stem_padding), self.mask_ratio, self.mask_span)
        position_tokens, _ = encoder.stem(torch.zeros_like(x), padding)
        out = encoder.trunk(replace_masked(tokens, position_tokens, mask, self.mask_embeddings[m]), stem_padding)
        extras = MaskedTokens(index, mask, target).extras(m, self.heads[m](out.tokens[mask]))
        if self.pooled_weight > 0:
            mean_target = masked_mean(target, stem_padding)
            pooled = {"pred": self.pooled_heads[m](out.pooled), "target": mean_target, "row": index}
            extras.update({f"{m}_pooled/{k}": v for k, v in pooled.items()})
        full_mask = torch.zeros(batch.size, mask.shape[1], dtype=torch.bool, device=mask.device)
        return {**extras, f"{m}/mask": full_mask.index_copy(0, index.to(mask.device), mask)}

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Sum over modalities of the masked regression losses (+ ``pooled_weight`` x pooled ones).

        Metrics ``masked_<m>`` per modality; parts ``<m>`` (and ``<m>_pooled``).
        """
        out = masked_parts(outputs, self, self.modalities, False, self.kind, self.beta)
        if self.pooled_weight == 0 or not out.parts:
            return out
        pooled = masked_parts(outputs, self, tuple(f"{m}_pooled" for m in self.modalities), False, self.kind, self.beta)
        parts = {**out.parts, **pooled.parts}
        return LossOutput(loss=out.loss + self.pooled_weight * pooled.loss, parts=parts, metrics=out.metrics)

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        """Move every teacher towards its student with momentum ``momentum(ctx.progress)``."""
        tau = self.momentum(ctx.progress)
        for m in self.modalities:
            ema_update(self.teachers[m], model_encoder(model, m), tau)
