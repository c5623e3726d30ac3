"""The model every method composes, and ``Method``: a model plus weighted objectives.

``MultimodalModel(encoders, heads, fusion)`` is built by injection (STYLE rule 6): one encoder
and one projection head per modality and a fusion module; it owns no loss parameters. A
``Method`` joins the model with a list of labelled, weighted ``Objective``s:

* ``forward(batch) -> Outputs`` is the features (what gradient caching replays; DDP wraps
  it together with ``loss``, see ``train.distributed.TrainingStep``): the model's outputs plus
  each objective's ``features`` in ``Outputs.extras``;
* ``loss(outputs, batch) -> LossOutput`` is the maths: ``sum_i w_i * L_i`` with every part
  logged under its label;
* ``on_epoch_start`` / ``after_step`` pass the trainer's lifecycle to the objectives.

The training loop knows nothing else of methods (STYLE rule 7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Encoder, Fusion, Objective
from modalign.core.types import Batch, EncoderOutput, EpochContext, LossOutput, Outputs, StepContext


def observed_index(batch: Batch, modality: str) -> Tensor | None:
    """``LongTensor[P]`` rows where ``modality`` was observed, or ``None`` when it is every row."""
    mask = batch.present.get(modality)
    if mask is None or bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1).to(batch.data[modality].device)


def scatter_rows(x: Tensor, index: Tensor | None, size: int) -> Tensor:
    """Place the rows ``x: [P, ...]`` at ``index`` of a zero ``[size, ...]`` tensor (keeps the graph)."""
    if index is None:
        return x
    return x.new_zeros((size, *x.shape[1:])).index_copy(0, index, x)


def expand_output(out: EncoderOutput, index: Tensor | None, size: int) -> EncoderOutput:
    """An encoder's output for the observed rows, laid out over the whole batch.

    Unobserved rows get zero tokens and pooled vectors, and their tokens are all padded.
    """
    if index is None:
        return out
    valid = out.padding if out.padding is not None else out.tokens.new_zeros(out.tokens.shape[:2], dtype=torch.bool)
    padding = valid.new_ones((size, valid.shape[1])).index_copy(0, index, valid)
    return EncoderOutput(scatter_rows(out.tokens, index, size), scatter_rows(out.pooled, index, size), padding)


class MultimodalModel(nn.Module):
    """Encoders -> projection heads -> normalised embeddings, and encoders -> fusion -> fusion head.

    Each encoder (and head) runs only on the rows where its modality was observed, so absent
    rows never reach BatchNorm statistics; a modality absent from the whole batch is skipped.
    Each modality's embedding is computed from its own encoder alone (a sample's partner is
    never visible to it); a fusion module with ``dim > 0`` additionally joins the observed
    modalities of each row into ``Outputs.fused`` (and ``fused_embedding`` through
    ``fusion_head``).

    Args:
        encoders: ``{modality: Encoder}``.
        heads: ``{modality: nn.Module}`` mapping pooled ``[B, D_m]`` to ``[B, E]``.
        fusion: A ``Fusion`` module (``NoFusion`` for two towers).
        fusion_head: Maps the fused ``[B, D_f]`` to ``[B, E]``; required when ``fusion.dim > 0``.

    Raises:
        ValueError: If encoders and heads name different modalities, or a fusion module with
            a joint representation comes without a fusion head.
    """

    def __init__(
        self,
        encoders: dict[str, Encoder],
        heads: dict[str, nn.Module],
        fusion: Fusion,
        fusion_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if sorted(encoders) != sorted(heads):
            raise ValueError(f"encoders {sorted(encoders)} and heads {sorted(heads)} differ")
        if "fused" in encoders:
            raise ValueError("'fused' names the joint representation; rename that modality")
        if fusion.dim > 0 and fusion_head is None:
            raise ValueError(f"fusion {type(fusion).__name__} (dim {fusion.dim}) needs a fusion_head")
        self.encoders = nn.ModuleDict({k: encoders[k] for k in sorted(encoders)})
        self.heads = nn.ModuleDict({k: heads[k] for k in sorted(heads)})
        self.fusion = fusion
        self.fusion_head = fusion_head if fusion.dim > 0 else None

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities the model has an encoder for (sorted)."""
        return tuple(self.encoders.keys())

    @property
    def fuses(self) -> bool:
        """Whether the model has a joint (fused) representation."""
        return self.fusion.dim > 0

    def encode(self, batch: Batch) -> tuple[dict[str, EncoderOutput], dict[str, Tensor | None]]:
        """Run each encoder on its observed rows.

        Returns:
            ``({m: EncoderOutput over the whole batch}, {m: observed row index or None})`` for
            every modality of the model observed in at least one row.
        """
        outputs: dict[str, EncoderOutput] = {}
        rows: dict[str, Tensor | None] = {}
        for m in self.modalities:
            if m not in batch.data or not bool(batch.rows(m).any()):
                continue
            index = observed_index(batch, m)
            x, padding = batch.data[m], batch.padding.get(m)
            if index is not None:
                x, padding = x[index], padding[index] if padding is not None else None
            outputs[m] = expand_output(self.encoders[m](x, padding), index, batch.size)
            rows[m] = index
        return outputs, rows

    def fuse(
        self, encoded: dict[str, EncoderOutput], present: dict[str, Tensor]
    ) -> tuple[EncoderOutput | None, Tensor | None]:
        """The fusion module over ``encoded`` and its embedding: ``(fused, Tensor[B, E] normalised)``.

        Objectives call it on a subset of modalities (or with rows' ``present`` switched off) to
        fuse what a row would give without them. ``(None, None)`` for a model without fusion.
        """
        if not self.fuses or not encoded:
            return None, None
        fused = self.fusion({m: encoded[m] for m in sorted(encoded)}, {m: present[m] for m in sorted(encoded)})
        if fused is None:
            return None, None
        assert self.fusion_head is not None  # __init__ guarantees it when fusion.dim > 0
        return fused, F.normalize(self.fusion_head(fused.pooled), dim=-1)

    def forward(self, batch: Batch) -> Outputs:
        """Encode and project each modality alone (embeddings L2-normalised, zeros where absent); fuse."""
        encoded, rows = self.encode(batch)
        projections: dict[str, Tensor] = {}
        for m, out in encoded.items():
            index = rows.get(m)
            pooled = out.pooled if index is None else out.pooled[index]
            projections[m] = scatter_rows(self.heads[m](pooled), index, batch.size)
        fused, fused_embedding = self.fuse(encoded, {m: batch.rows(m) for m in encoded})
        return Outputs(
            embeddings={m: F.normalize(p, dim=-1) for m, p in projections.items()},
            projections=projections,
            tokens={m: out.tokens for m, out in encoded.items()},
            padding={m: out.padding for m, out in encoded.items() if out.padding is not None},
            pooled={m: out.pooled for m, out in encoded.items()},
            fused=None if fused is None else fused.pooled,
            fused_tokens=None if fused is None else fused.tokens,
            fused_padding=None if fused is None else fused.padding,
            fused_embedding=fused_embedding,
        )


class Method(nn.Module):
    """A model plus labelled, weighted objectives; the unit the trainer optimises.

    Implements the ``Embedder`` protocol used by evaluation (``embed`` runs the model only).

    Args:
        model: The ``MultimodalModel``.
        objectives: ``(label, objective, weight)`` triples; labels are unique and name the
            objective's parts and metrics in logs. Each objective is bound to the model here.

    Raises:
        ValueError: On an empty list, a repeated label or a label containing ``.``.
        ConfigError: If an objective does not fit the model (path ``objectives.N...``).
    """

    def __init__(self, model: MultimodalModel, objectives: list[tuple[str, Objective, float]]) -> None:
        super().__init__()
        if not objectives:
            raise ValueError("a method needs at least one objective")
        self.model = model
        self.objectives = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for index, (label, objective, weight) in enumerate(objectives):
            if label in self.objectives or "." in label:
                raise ValueError(f"objective label {label!r} is repeated or contains '.'")
            objective.label = label
            try:
                objective.bind(model)
            except ConfigError as e:
                raise e.under(f"objectives.{index}") from None
            self.objectives[label] = objective
            self.weights[label] = float(weight)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities this method embeds."""
        return self.model.modalities

    def forward(self, batch: Batch) -> Outputs:
        """The model's outputs plus every objective's extra features (in ``extras``)."""
        outputs: Outputs = self.model(batch)
        for objective in self._objectives():
            extra = objective.features(self.model, batch, outputs)
            outputs.extras.update({objective.key(k): v for k, v in extra.items()})
        return outputs

    def loss(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """``sum_i w_i * L_i``; ``parts[label]`` is each ``L_i`` (and ``label/part`` its sub-parts)."""
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        metrics: dict[str, float] = {}
        for objective in self._objectives():
            out = objective(outputs, batch)
            term = self.weights[objective.label] * out.loss
            total = term if total is None else total + term
            parts[objective.label] = out.loss
            prefixed = out.with_prefix(objective.label)
            parts.update(prefixed.parts)
            metrics.update(prefixed.metrics)
        assert total is not None  # __init__ guarantees one objective
        return LossOutput(loss=total, parts=parts, metrics=metrics)

    def training_step(self, batch: Batch) -> LossOutput:
        """``loss(forward(batch), batch)``."""
        return self.loss(self(batch), batch)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        """Call every objective's ``on_epoch_start``."""
        for objective in self._objectives():
            objective.on_epoch_start(self.model, ctx)

    def after_step(self, ctx: StepContext) -> None:
        """Call every objective's ``after_step``."""
        for objective in self._objectives():
            objective.after_step(self.model, ctx)

    @torch.no_grad()
    def embed(self, batch: Batch, fused: bool = False) -> dict[str, Tensor]:
        """``{modality: Tensor[B, E]}`` normalised embeddings of the modalities in ``batch``.

        With ``fused`` and a fusing model, also ``fused``: the joint representation
        ``Tensor[B, D_f]`` (L2-normalised) of each row's observed modalities, which evaluation
        probes separately (``modalign.eval.robustness``).
        """
        out = self.model(batch)
        embeddings: dict[str, Tensor] = dict(out.embeddings)
        if fused and out.fused is not None:
            embeddings["fused"] = F.normalize(out.fused, dim=-1)
        return embeddings

    def no_weight_decay(self) -> set[str]:
        """Names of parameters excluded from weight decay (temperature, bias)."""
        return {n for n, _ in self.named_parameters() if n.endswith(("logit_scale", "logit_bias"))}

    def _objectives(self) -> list[Objective]:
        return [o for o in self.objectives.values() if isinstance(o, Objective)]
