"""Abstract component bases: encoders, fusion modules and objectives.

Every concrete component subclasses one of these, registers itself by name (see
``modalign.core.registry``) and is then usable from recipes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn

from modalign.core.types import (
    Batch,
    EncoderOutput,
    EpochContext,
    LossOutput,
    ModalitySpec,
    Outputs,
    StepContext,
)


class Encoder(nn.Module, ABC):
    """One tower: turns one modality's batch tensor into an ``EncoderOutput``.

    Subclasses set ``kind`` (the modality kind they read) and ``self.dim`` (output width ``D``).
    ``spec_kwargs`` maps a dataset's ``ModalitySpec`` to the constructor arguments that depend
    on the data (input channels, vocabulary size), so recipes only name hyper-parameters.

    Token stem (``token_stem = True``; needed by masked objectives such as MAE, He et al. 2022,
    MultiMAE, BERT-style masking, data2vec): ``forward(x, padding)`` is literally
    ``trunk(*stem(x, padding))``, split where the input has become a token sequence, so an
    objective can drop, reorder or replace tokens before the trunk sees them:

    * ``stem(x, padding) -> (tokens [B, T, stem_dim], padding [B, T] | None)``: patches, frames
      or token embeddings with their positional information already added.
    * ``trunk(tokens, padding) -> EncoderOutput``: the rest of the encoder; accepts any subset
      or reordering of stem tokens gathered along ``T`` (``tokens[:, keep]`` with the matching
      padding), because positions travel with the tokens.
    * ``targets(x, padding) -> Tensor``: what a reconstruction objective predicts per stem
      token, aligned with the stem order: ``FloatTensor[B, T, P]`` raw input values of each
      patch/frame, or ``LongTensor[B, T]`` token ids for text.

    ``stem_dim`` is the stem token width (set only by token-stem encoders). Encoders without a
    token stem (CNNs, MLPs) raise ``NotImplementedError`` from all three, naming the encoders
    that have one.
    """

    kind: ClassVar[str] = ""
    token_stem: ClassVar[bool] = False
    dim: int
    stem_dim: int

    @classmethod
    def spec_kwargs(cls, spec: ModalitySpec) -> dict[str, Any]:
        """Constructor arguments implied by the data (default: ``in_channels``)."""
        return {"in_channels": spec.channels}

    @abstractmethod
    def forward(self, x: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode ``x`` (``Tensor[B, ...]``) with optional ``padding`` (``BoolTensor[B, T]``)."""

    def stem(self, x: Tensor, padding: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Input ``Tensor[B, ...]`` to stem tokens ``[B, T, stem_dim]`` (positions added) and padding.

        Raises:
            NotImplementedError: If the encoder has no token stem (``token_stem`` is False).
        """
        raise NotImplementedError(self._no_token_stem())

    def trunk(self, tokens: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode stem tokens ``[B, T, stem_dim]`` (any subset/reordering along ``T``).

        Raises:
            NotImplementedError: If the encoder has no token stem (``token_stem`` is False).
        """
        raise NotImplementedError(self._no_token_stem())

    def targets(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        """Reconstruction targets per stem token: ``FloatTensor[B, T, P]`` or ``LongTensor[B, T]``.

        Raises:
            NotImplementedError: If the encoder has no token stem (``token_stem`` is False).
        """
        raise NotImplementedError(self._no_token_stem())

    def _no_token_stem(self) -> str:
        from modalign.core.registry import available, lookup  # error path only: loads the encoder package

        names = available("encoder")
        own = [n for n in names if lookup("encoder", n) is type(self)]
        stems = [n for n in names if getattr(lookup("encoder", n), "token_stem", False)]
        name = own[0] if own else type(self).__name__
        return f"{name} has no token stem (masked objectives need one of: {', '.join(stems)})"

    def freeze(self) -> Encoder:
        """Stop gradients to every parameter and keep the module in eval mode; returns self."""
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = True
        self.eval()
        return self

    @property
    def frozen(self) -> bool:
        """Whether ``freeze()`` was called."""
        return bool(getattr(self, "_frozen", False))

    def train(self, mode: bool = True) -> Encoder:
        """Like ``nn.Module.train`` but a frozen encoder stays in eval mode (no BN drift)."""
        return super().train(mode and not self.frozen)


class Fusion(nn.Module, ABC):
    """Joins several modalities' encoder tokens into one representation per sample.

    Contract (``docs/architecture.md``, "Fusion"):

    * Built knowing each modality's token width: ``__init__(widths={modality: D_m}, **hparams)``;
      ``widths`` is filled in by the framework from the encoders (a recipe names only the
      hyper-parameters). It sets ``self.dim``, the width ``D_f`` of what it returns; ``dim == 0``
      means no joint representation (``fusion: none``, two towers).
    * ``forward(inputs, present) -> EncoderOutput | None``: ``inputs`` holds the modalities
      observed in at least one row of the batch, each laid out over the whole batch (rows
      where it is absent have zero tokens, all padded); ``present[m]`` is ``BoolTensor[B]``.
      It returns fused tokens ``[B, T_f, D_f]``, a pooled ``[B, D_f]`` and their padding.
    * Missing modalities: a row's output depends only on the unpadded tokens of the modalities
      present in that row; the values of an absent modality (or of padded tokens) never
      influence anything, and a row with one modality present gets a valid output.
    * Rows are independent: a sample alone gives what it gives inside a batch (no batch
      statistics in fusion modules).

    Retrieval embeddings never pass through the fusion module: each modality's embedding is
    computed from its own encoder alone, so a sample's partner is never visible to it.
    """

    dim: int = 0

    def __init__(self, widths: dict[str, int] | None = None) -> None:
        super().__init__()
        self.widths = dict(sorted((widths or {}).items()))

    @abstractmethod
    def forward(self, inputs: dict[str, EncoderOutput], present: dict[str, Tensor]) -> EncoderOutput | None:
        """Fuse ``{modality: EncoderOutput}`` (rows where ``present[m]``) into one ``EncoderOutput``."""

    def check_inputs(self, inputs: dict[str, EncoderOutput], present: dict[str, Tensor]) -> None:
        """Raise ``ValueError`` naming the modality if ``inputs`` do not fit the built widths.

        Raises:
            ValueError: An unknown modality, a missing ``present`` mask, or a wrong token width.
        """
        for m, out in inputs.items():
            if m not in self.widths:
                raise ValueError(f"{type(self).__name__}: modality {m!r} was not built for (widths {self.widths})")
            if m not in present:
                raise ValueError(f"{type(self).__name__}: no present mask for modality {m!r}")
            if out.tokens.shape[-1] != self.widths[m]:
                raise ValueError(
                    f"{type(self).__name__}: modality {m!r} tokens have width {out.tokens.shape[-1]}, "
                    f"built for {self.widths[m]}"
                )


class Objective(nn.Module, ABC):
    """A loss and everything it owns (temperature, bias, prototypes, queues, teachers, heads).

    The lifecycle, driven by ``Method`` (see ``docs/architecture.md``):

    1. ``bind(model)`` once, when the method is built: check the modalities it names exist,
       create what depends on the model (a momentum teacher copies it). Everything that must
       survive a resume is a parameter or buffer, so it lands in the checkpoint.
    2. ``on_epoch_start(model, ctx)`` before each epoch (whole-dataset passes: k-means
       pseudo-labels, prototype initialisation). It must be a deterministic function of the
       weights and ``ctx``, so a resumed run recomputes exactly what the uninterrupted run had.
    3. ``features(model, batch, outputs)`` inside ``Method.forward``: extra forward work with
       the model's parameters (masked re-encoding, matching heads on hard negatives, decoders);
       its tensors land in ``outputs.extras`` under ``"<label>/<name>"`` (see ``key``).
    4. ``forward(outputs, batch)``: the loss maths, reading ``Outputs``/``Batch`` only.
    5. ``after_step(model, ctx)`` after each optimiser step (EMA teachers, queues).

    The mathematics lives in a plain function next to each subclass, so it can be tested
    against a reference formula; the module only selects inputs and masks.
    """

    #: Name under which the composition logs this objective (set by ``Method``).
    label: str = ""

    def key(self, name: str) -> str:
        """Key of this objective's tensor ``name`` in ``Outputs.extras``."""
        return f"{self.label or type(self).__name__}/{name}"

    def bind(self, model: nn.Module) -> None:
        """Attach to the method's model (default: nothing).

        Raises:
            ValueError: If the objective names a modality the model does not have.
        """

    def features(self, model: nn.Module, batch: Batch, outputs: Outputs) -> dict[str, Tensor]:
        """Extra forward computation with the model, as ``{name: tensor}`` (default: none)."""
        return {}

    @abstractmethod
    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss for one batch."""

    def on_epoch_start(self, model: nn.Module, ctx: EpochContext) -> None:
        """Hook before each epoch (default: nothing)."""

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        """Hook after each optimiser step (default: nothing)."""
