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
    """Encoders -> fusion -> projection heads -> normalised embeddings.

    Each encoder (and head) runs only on the rows where its modality was observed, so absent
    rows never reach BatchNorm statistics; a modality absent from the whole batch is skipped.

    Args:
        encoders: ``{modality: Encoder}``.
        heads: ``{modality: nn.Module}`` mapping pooled ``[B, D]`` to ``[B, E]``.
        fusion: A ``Fusion`` module (``NoFusion`` for two towers).

    Raises:
        ValueError: If encoders and heads name different modalities.
    """

    def __init__(self, encoders: dict[str, Encoder], heads: dict[str, nn.Module], fusion: Fusion) -> None:
        super().__init__()
        if sorted(encoders) != sorted(heads):
            raise ValueError(f"encoders {sorted(encoders)} and heads {sorted(heads)} differ")
        self.encoders = nn.ModuleDict({k: encoders[k] for k in sorted(encoders)})
        self.heads = nn.ModuleDict({k: heads[k] for k in sorted(heads)})
        self.fusion = fusion

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities the model has an encoder for (sorted)."""
        return tuple(self.encoders.keys())

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

    def forward(self, batch: Batch) -> Outputs:
        """Encode, fuse and project; embeddings are L2-normalised ``[B, E]`` (zeros where absent)."""
        encoded, rows = self.encode(batch)
        fused = self.fusion(encoded)
        projections: dict[str, Tensor] = {}
        for m, out in fused.per_modality.items():
            index = rows.get(m)
            pooled = out.pooled if index is None else out.pooled[index]
            projections[m] = scatter_rows(self.heads[m](pooled), index, batch.size)
        return Outputs(
            embeddings={m: F.normalize(p, dim=-1) for m, p in projections.items()},
            projections=projections,
            tokens={m: out.tokens for m, out in fused.per_modality.items()},
            padding={m: out.padding for m, out in fused.per_modality.items() if out.padding is not None},
            fused=fused.fused.pooled if fused.fused is not None else None,
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
    def embed(self, batch: Batch) -> dict[str, Tensor]:
        """``{modality: Tensor[B, E]}`` normalised embeddings of the modalities in ``batch``."""
        embeddings: dict[str, Tensor] = self.model(batch).embeddings
        return embeddings

    def no_weight_decay(self) -> set[str]:
        """Names of parameters excluded from weight decay (temperature, bias)."""
        return {n for n, _ in self.named_parameters() if n.endswith(("logit_scale", "logit_bias"))}

    def _objectives(self) -> list[Objective]:
        return [o for o in self.objectives.values() if isinstance(o, Objective)]
