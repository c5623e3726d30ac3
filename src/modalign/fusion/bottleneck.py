"""Attention bottlenecks: modalities exchange information only through a few shared tokens.

MBT (Nagrani et al. 2021, "Attention Bottlenecks for Multimodal Fusion"): each modality ``m``
has its own input projection, its own learned CLS token and its own transformer block per
layer. ``n_bottleneck`` learned bottleneck tokens ``z`` are appended to every modality's
sequence; in each layer every modality updates ``[CLS_m; tokens_m; z]`` with its own block,
and the next ``z`` is the mean of the modalities' updated bottleneck tokens:

    [CLS_m; tokens_m; z_m] = Block_m^l([CLS_m; tokens_m; z]),  z = mean_m z_m.

Here the mean runs over the modalities present in the row only (with one present it is just
its update; with none, ``z`` is kept), so an absent modality never changes ``z``. The fused
vector is the mean over the present modalities of their CLS outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalign.core.modules import Fusion
from modalign.core.registry import register
from modalign.core.types import EncoderOutput
from modalign.fusion.tokens import batch_size, learned_token, present_mean, unpadded, valid_padding
from modalign.nn.layers import TransformerBlock


class BottleneckLayer(nn.Module):
    """One MBT layer: a transformer block per modality over ``[CLS_m; tokens_m; z]``, then ``z = mean_m z_m``.

    Args:
        modalities: The modalities (sorted).
        dim: Width ``D``.
        heads: Attention heads (must divide ``dim``).
        mlp_ratio: Hidden width of the MLPs relative to ``dim``.
        dropout: Dropout in attention and MLPs.
    """

    def __init__(self, modalities: list[str], dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({m: TransformerBlock(dim, heads, mlp_ratio, dropout) for m in modalities})

    def forward(
        self, x: dict[str, Tensor], padding: dict[str, Tensor], rows: dict[str, Tensor], z: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Apply the layer.

        Args:
            x: ``{m: Tensor[B, 1 + T_m, D]}`` each modality's ``[CLS_m; tokens_m]``.
            padding: ``{m: BoolTensor[B, 1 + T_m + N]}`` key padding of ``[CLS_m; tokens_m; z]``.
            rows: ``{m: BoolTensor[B]}`` where each modality is present.
            z: Bottleneck tokens ``Tensor[B, N, D]``.

        Returns:
            ``(x, z)`` updated, with the same shapes.
        """
        n = z.shape[1]
        out, zs = {}, []
        for m, xm in x.items():
            h = self.blocks[m](torch.cat([xm, z], dim=1), padding[m])
            out[m] = h[:, :-n]
            zs.append(h[:, -n:])
        masks = [rows[m] for m in x]
        anyone = torch.stack(masks, dim=0).any(dim=0)[:, None, None]
        return out, torch.where(anyone, present_mean(zs, masks), z)


@register("fusion", "bottleneck")
class BottleneckFusion(Fusion):
    """Attention bottleneck fusion, MBT (Nagrani et al. 2021).

    Fused tokens are the final bottleneck tokens ``[B, n_bottleneck, D_f]`` (never padded:
    ``padding`` is ``None``); they are the only place where the modalities meet. Pooled
    ``[B, D_f]`` is the mean over the present modalities of their CLS outputs (zeros for a row
    with none present). The final LayerNorm (``final_norm``) is shared by CLS and bottleneck
    outputs. Encoder tokens carry their own positions, so none are added.

    Args:
        widths: ``{modality: D_m}`` (filled in by the framework).
        dim: Output width ``D_f`` (every modality's transformer width).
        depth: Layers (each has one transformer block per modality).
        heads: Attention heads (must divide ``dim``).
        n_bottleneck: Bottleneck tokens ``N``.
        mlp_ratio: Hidden width of the MLPs relative to ``dim``.
        dropout: Dropout in attention and MLPs.
        final_norm: Apply a LayerNorm to the CLS and bottleneck outputs.

    Raises:
        ValueError: If ``depth < 1`` or ``n_bottleneck < 1``.
    """

    def __init__(
        self,
        widths: dict[str, int],
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        n_bottleneck: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        final_norm: bool = True,
    ) -> None:
        super().__init__(widths)
        if depth < 1 or n_bottleneck < 1:
            raise ValueError(f"bottleneck fusion needs depth >= 1 and n_bottleneck >= 1, got {depth}, {n_bottleneck}")
        self.dim = dim
        self.proj = nn.ModuleDict({m: nn.Linear(w, dim) for m, w in self.widths.items()})
        self.cls = nn.ParameterDict({m: learned_token(1, 1, dim) for m in self.widths})
        self.bottleneck = learned_token(1, n_bottleneck, dim)
        self.layers = nn.ModuleList(
            BottleneckLayer(list(self.widths), dim, heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm: nn.Module = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def stream(self, m: str, out: EncoderOutput, present: Tensor) -> tuple[Tensor, Tensor]:
        """``([CLS_m; Linear_m(tokens_m)] Tensor[B, 1 + T, D], key padding BoolTensor[B, 1 + T + N])``."""
        b = out.tokens.shape[0]
        device = self.bottleneck.device
        x = torch.cat([self.cls[m].expand(b, -1, -1), self.proj[m](out.tokens)], dim=1)
        n = self.bottleneck.shape[1]
        pad = torch.cat([unpadded(b, 1, device), valid_padding(out, present), unpadded(b, n, device)], dim=1)
        return x, pad

    def forward(self, inputs: dict[str, EncoderOutput], present: dict[str, Tensor]) -> EncoderOutput:
        """Run the per-modality blocks with shared bottleneck tokens; pool the present CLS outputs.

        Raises:
            ValueError: From ``check_inputs`` or for an empty batch.
        """
        self.check_inputs(inputs, present)
        b = batch_size(inputs)
        x, padding, rows = {}, {}, {}
        for m in self.widths:
            if m in inputs:
                rows[m] = present[m].to(torch.bool)
                x[m], padding[m] = self.stream(m, inputs[m], rows[m])
        z = self.bottleneck.expand(b, -1, -1)
        for layer in self.layers:
            x, z = layer(x, padding, rows, z)
        pooled = present_mean([self.norm(x[m][:, 0]) for m in x], [rows[m] for m in x])
        return EncoderOutput(tokens=self.norm(z), pooled=pooled, padding=None)
