"""Late fusion: join each modality's pooled vector after its encoder.

* ``concat``: concatenation of the pooled vectors, then a linear map (the late-fusion baseline
  of MultiBench, Liang et al. 2021); an absent modality contributes a learned "missing" vector
  instead of its (zero) features, so its values never matter.
* ``gated``: the gated multimodal unit (Arevalo et al. 2017, "Gated Multimodal Units for
  Information Fusion"): ``h_m = tanh(W_m x_m)``, gates ``z = softmax_m(v_m . [x_1..x_M])`` over
  the modalities present in the row, ``fused = sum_m z_m h_m``. The gate reads every present
  modality's pooled vector; absent modalities are excluded from the softmax and their
  features are zeroed first.
* ``tensor``: low-rank multimodal fusion (Liu et al. 2018, "Efficient Low-rank Multimodal
  Fusion with Modality-Specific Factors", LMF), the rank-``R`` form of tensor fusion (Zadeh et
  al. 2017, TFN): ``fused = sum_r prod_m (W_m^r [x_m; 1])``. An absent modality enters as
  ``[0; 1]`` (only TFN's constant 1), so the product keeps the other modalities' terms.

All three return one fused token (``T_f = 1``) equal to the pooled vector.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalign.core.modules import Fusion
from modalign.core.registry import register
from modalign.core.types import EncoderOutput


def present_pooled(inputs: dict[str, EncoderOutput], present: dict[str, Tensor], m: str) -> Tensor:
    """``Tensor[B, D_m]``: ``m``'s pooled vectors with absent rows set to exactly zero."""
    return inputs[m].pooled * present[m].to(inputs[m].pooled.dtype)[:, None]


def _one_token(pooled: Tensor) -> EncoderOutput:
    return EncoderOutput(tokens=pooled[:, None, :], pooled=pooled, padding=None)


def _batch_size(inputs: dict[str, EncoderOutput]) -> int:
    if not inputs:
        raise ValueError("fusion needs at least one modality in the batch")
    return int(next(iter(inputs.values())).pooled.shape[0])


@register("fusion", "concat")
class ConcatFusion(Fusion):
    """Concatenate the modalities' pooled vectors (a learned vector for an absent one), then project.

    Args:
        widths: ``{modality: D_m}`` (filled in by the framework).
        dim: Output width ``D_f``.
    """

    def __init__(self, widths: dict[str, int], dim: int = 256) -> None:
        super().__init__(widths)
        self.dim = dim
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(w)) for m, w in self.widths.items()})
        self.proj = nn.Linear(sum(self.widths.values()), dim)

    def forward(self, inputs: dict[str, EncoderOutput], present: dict[str, Tensor]) -> EncoderOutput:
        """``Linear([x_1 or missing_1; ...; x_M or missing_M])`` as one token ``[B, 1, D_f]``."""
        self.check_inputs(inputs, present)
        b = _batch_size(inputs)
        parts = []
        for m in self.widths:
            fill = self.missing[m].expand(b, -1)
            if m not in inputs:
                parts.append(fill)
                continue
            parts.append(torch.where(present[m][:, None], inputs[m].pooled, fill))
        return _one_token(self.proj(torch.cat(parts, dim=-1)))


@register("fusion", "gated")
class GatedFusion(Fusion):
    """Gated multimodal unit (Arevalo et al. 2017) over any number of modalities.

    Args:
        widths: ``{modality: D_m}`` (filled in by the framework).
        dim: Output width ``D_f``.
    """

    def __init__(self, widths: dict[str, int], dim: int = 256) -> None:
        super().__init__(widths)
        self.dim = dim
        self.values = nn.ModuleDict({m: nn.Linear(w, dim) for m, w in self.widths.items()})
        self.gate = nn.Linear(sum(self.widths.values()), len(self.widths))

    def forward(self, inputs: dict[str, EncoderOutput], present: dict[str, Tensor]) -> EncoderOutput:
        """``sum_m softmax(gate)_m * tanh(W_m x_m)`` over the present modalities, as one token."""
        self.check_inputs(inputs, present)
        b = _batch_size(inputs)
        ref = next(iter(inputs.values())).pooled
        device = ref.device
        xs, masks = [], []
        for m, w in self.widths.items():
            if m in inputs:
                xs.append(present_pooled(inputs, present, m))
                masks.append(present[m])
            else:
                xs.append(ref.new_zeros(b, w))
                masks.append(torch.zeros(b, dtype=torch.bool, device=device))
        mask = torch.stack(masks, dim=1)  # [B, M]
        logits = self.gate(torch.cat(xs, dim=-1)).masked_fill(~mask, float("-inf"))
        z = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with nothing present gets zeros
        h = torch.stack([torch.tanh(self.values[m](x)) for m, x in zip(self.widths, xs, strict=True)], dim=1)
        return _one_token((z[..., None] * h).sum(dim=1))


@register("fusion", "tensor")
class LowRankTensorFusion(Fusion):
    """Low-rank multimodal (tensor) fusion, LMF (Liu et al. 2018).

    Args:
        widths: ``{modality: D_m}`` (filled in by the framework).
        dim: Output width ``D_f``.
        rank: Rank ``R`` of the decomposition.
    """

    def __init__(self, widths: dict[str, int], dim: int = 256, rank: int = 4) -> None:
        super().__init__(widths)
        if rank < 1:
            raise ValueError(f"tensor fusion needs rank >= 1, got {rank}")
        self.dim, self.rank = dim, rank
        self.factors = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(rank, w + 1, dim) * (w + 1) ** -0.5) for m, w in self.widths.items()}
        )
        self.rank_weights = nn.Parameter(torch.full((rank,), 1.0 / rank))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, inputs: dict[str, EncoderOutput], present: dict[str, Tensor]) -> EncoderOutput:
        """``sum_r w_r prod_m ([x_m; 1] W_m^r) + b`` with absent ``x_m = 0``, as one token."""
        self.check_inputs(inputs, present)
        b = _batch_size(inputs)
        ref = next(iter(inputs.values())).pooled
        product: Tensor | None = None
        for m, w in self.widths.items():
            x = present_pooled(inputs, present, m) if m in inputs else ref.new_zeros(b, w)
            x1 = torch.cat([x, x.new_ones(b, 1)], dim=-1)  # [B, D_m + 1]
            term = torch.einsum("bd,rde->bre", x1, self.factors[m])  # [B, R, D_f]
            product = term if product is None else product * term
        assert product is not None  # widths is never empty for a built model
        return _one_token(torch.einsum("bre,r->be", product, self.rank_weights) + self.bias)
