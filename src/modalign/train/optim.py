"""The trainer's optimizer and learning-rate schedule: AdamW with decay groups, warm-up then cosine."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import AdamW

from modalign.methods import Method
from modalign.train.recipe import TrainConfig


def fused_adamw_supported(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused AdamW kernel takes ``params``: plain floating tensors on CPU or CUDA.

    Sharded parameters (FSDP's ``DTensor``) and other devices keep the per-parameter loop.
    """
    from torch.distributed.tensor import DTensor

    return all(
        not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params
    )


def make_optimizer(method: Method, cfg: TrainConfig) -> AdamW:
    """AdamW with weight decay only on weight matrices/kernels (ndim >= 2).

    With ``train.fused_adamw`` the fused kernel (``fused=True``) where the parameters allow it
    (``fused_adamw_supported``): the same update as the per-parameter loop to rounding, without
    the loop's temporaries the size of each parameter (``exp_avg_sq.sqrt() / ...``), which set
    the peak memory of a step once activations are checkpointed (docs/scaling.md), and faster.
    Off by default: its rounding differs from the loop's, so runs are not bit-equal to runs
    without it, and six seeds of ``basicmotions-clip`` (40 test series) came out 0.04 R@1 lower
    on average with it, within that recipe's seed-to-seed spread but consistent in sign.
    """
    skip = method.no_weight_decay()
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in method.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = (cfg.fused_adamw and fused_adamw_supported(decay + no_decay)) or None
    return AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Any:
    """LR multiplier: linear warm-up over ``warmup`` steps, cosine to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
