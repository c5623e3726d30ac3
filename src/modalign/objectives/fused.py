"""Training a fusion module without labels: the joint representation against each modality alone.

``gmc``: Geometric Multimodal Contrastive learning (Poklukar et al. 2022, "GMC: Geometric
Multimodal Contrastive Representation Learning", ICML). The fusion module embeds each row
twice: from every observed modality (``Outputs.fused_embedding``, the joint view ``z``) and
from one modality ``m`` alone (``z_m``: the same fusion module and fusion head, fed only
``m``'s tokens). For every modality an NT-Xent loss (SimCLR, Chen et al. 2020) makes ``z_m``
of a sample closest to its own ``z`` among the ``2N - 1`` other views of the batch. The fused
representation thus agrees with what each modality alone gives, which is what keeps it
usable when a modality is missing at test time.

The mathematics is ``nt_xent_loss``; the module fuses the single-modality views in
``features`` and selects the rows where every modality it names is present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Objective
from modalign.core.registry import register
from modalign.core.types import Batch, EncoderOutput, LossOutput, Outputs


def nt_xent_loss(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """NT-Xent of SimCLR over the ``2N`` views ``[a; b]``: row ``i`` of ``a`` and of ``b`` are positives.

    ``x = [a; b]`` (``[2N, E]``, L2-normalised), ``s = x x^T / t`` with the diagonal removed;
    ``loss = mean_k -log softmax(s_k)[partner(k)]`` with ``partner(i) = i + N`` and back.

    Args:
        a: ``Tensor[N, E]`` L2-normalised views (one modality alone).
        b: ``Tensor[N, E]`` L2-normalised views (the joint representation).
        temperature: ``t > 0``.

    Raises:
        ValueError: If shapes differ, ``N < 2`` or ``t <= 0``.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"nt_xent_loss: a {tuple(a.shape)} and b {tuple(b.shape)} must be equal [N, E]")
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"nt_xent_loss needs at least 2 rows, got {n}")
    if temperature <= 0:
        raise ValueError(f"nt_xent_loss temperature must be > 0, got {temperature}")
    x = torch.cat([a, b], dim=0)
    sim = (x @ x.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=x.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(x.device)
    return F.cross_entropy(sim, partner)


@register("objective", "gmc")
class GMC(Objective):
    """GMC (Poklukar et al. 2022): each modality alone, through the fusion module, against the joint view.

    Needs a model with a fusion module (``model.fusion`` other than ``none``). Rows where any of
    ``modalities`` is absent are skipped (their joint view is not the full one); fewer than two
    complete rows give a zero loss connected to the graph.

    Args:
        modalities: Modalities to fuse (default: every modality of the model).
        temperature: NT-Xent temperature (GMC: 0.1).
    """

    def __init__(self, modalities: list[str] | None = None, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {temperature}")
        self.names = list(modalities) if modalities is not None else None
        self.temperature = temperature
        self.resolved: tuple[str, ...] = ()

    def bind(self, model: nn.Module) -> None:
        """Resolve the modalities and check the model fuses.

        Raises:
            ConfigError: The model has no fusion module, or a named modality is unknown.
        """
        if not getattr(model, "fuses", False):
            raise ConfigError("name", "gmc trains a fusion module: set model.fusion (e.g. {name: early})")
        known: tuple[str, ...] = tuple(getattr(model, "modalities", ()))
        names = tuple(self.names) if self.names is not None else known
        unknown = [m for m in names if m not in known]
        if unknown or len(names) < 2:
            raise ConfigError(
                "modalities", f"need two or more of the model's modalities, got {list(names)}", list(known)
            )
        self.resolved = tuple(sorted(names))

    def features(self, model: nn.Module, batch: Batch, outputs: Outputs) -> dict[str, Tensor]:
        """``{m: Tensor[B, E]}``: each modality fused alone (normalised; zeros where ``m`` is absent)."""
        views: dict[str, Tensor] = {}
        for m in self.resolved:
            if m not in outputs.tokens:
                continue
            alone = EncoderOutput(outputs.tokens[m], outputs.pooled[m], outputs.padding.get(m))
            _, embedding = model.fuse({m: alone}, {m: batch.rows(m)})  # type: ignore[operator]
            if embedding is not None:
                views[m] = embedding * batch.rows(m)[:, None].to(embedding.dtype)
        return views

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Mean over modalities of ``nt_xent_loss(z_m, z)``; metrics: ``complete`` rows, ``acc`` per modality."""
        joint = outputs.fused_embedding
        views = {m: outputs.extras.get(self.key(m)) for m in self.resolved}
        if joint is None or any(v is None for v in views.values()):
            return LossOutput(loss=outputs.zero(), metrics={"complete": 0.0})
        rows = torch.stack([batch.rows(m) for m in self.resolved]).all(dim=0)
        n = int(rows.sum())
        metrics = {"complete": float(n)}
        if n < 2:
            return LossOutput(loss=outputs.zero(joint, *[v for v in views.values() if v is not None]), metrics=metrics)
        z = joint[rows]
        parts: dict[str, Tensor] = {}
        for m, view in views.items():
            assert view is not None
            parts[m] = nt_xent_loss(view[rows], z, self.temperature)
            with torch.no_grad():
                metrics[f"acc_{m}"] = float(
                    (view[rows] @ z.T).argmax(dim=1).eq(torch.arange(n, device=z.device)).float().mean()
                )
        loss = torch.stack(list(parts.values())).mean()
        return LossOutput(loss=loss, parts=parts, metrics=metrics)
