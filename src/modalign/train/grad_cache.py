"""Gradient caching: a contrastive batch larger than activation memory allows, with exact gradients.

GradCache (Gao, Zhang, Han & Callan 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup") splits one optimiser step over a batch of ``B`` rows into three phases:

1. **embed**: the model runs on chunks of ``chunk`` rows without a graph; each chunk's row-level
   outputs (embeddings, projections, pooled vectors, tokens, fused outputs) are kept, and the
   RNG state before each chunk is recorded;
2. **loss**: the outputs of the whole batch become leaves that require grad, the method's loss
   runs on them (the objectives see the whole batch: every negative, every gathered row) and
   back-propagates into the leaves and the objectives' own parameters (temperature, bias);
3. **replay**: each chunk runs again with a graph, under the RNG state it had in phase 1 (same
   dropout masks), and back-propagates the leaves' gradients of its rows into the model.

The model's parameter gradients are then those of one full-batch step: the loss is a function
of the outputs only, and each output depends on its own row only. Peak activation memory is one
chunk's, plus ``O(B)`` outputs. Exact for models without batch-dependent layers; batch norm in
training mode normalises each chunk by that chunk's statistics (as a smaller batch would).

Requirements: every objective computes its loss from ``Outputs`` and ``Batch`` alone (no
``Objective.features``: extra forward work with the model cannot be cached row by row).

Under data parallelism the chunks run on the unwrapped method and the gradients are averaged
over ranks once, after the replay (what DDP's reducer does at the end of a backward pass);
objectives that gather rows across ranks (``gather: true``) still see the global batch in
phase 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Objective
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.distributed import world_size
from modalign.methods.base import Method
from modalign.train.distributed import mean_over_ranks

#: ``Outputs`` fields holding one ``[B, ...]`` tensor (or ``None``).
_ROW_TENSORS = ("fused", "fused_tokens", "fused_padding", "fused_embedding")
#: ``Outputs`` fields holding ``{modality: [B, ...]}``.
_ROW_DICTS = ("embeddings", "projections", "tokens", "padding", "pooled")


def check_cacheable(method: Method) -> None:
    """Refuse a method whose objectives compute features with the model.

    Raises:
        ConfigError: At ``train.grad_cache``, naming the objective.
    """
    for label, objective in method.objectives.items():
        if isinstance(objective, Objective) and type(objective).features is not Objective.features:
            raise ConfigError(
                "train.grad_cache",
                f"objective {label!r} ({type(objective).__name__}) runs extra forward work with the model "
                "(Objective.features), which gradient caching cannot replay row by row; set grad_cache: null",
            )


def batch_rows(batch: Batch, rows: slice) -> Batch:
    """Rows ``rows`` of every tensor of ``batch``.

    Sequences keep the batch's padded length, so each chunk's encoders see exactly the inputs
    they would see in the whole batch.
    """
    return Batch(
        data={m: x[rows] for m, x in batch.data.items()},
        present={m: p[rows] for m, p in batch.present.items()},
        ids=batch.ids[rows],
        padding={m: p[rows] for m, p in batch.padding.items()},
        labels={k: v[rows] for k, v in batch.labels.items()},
        modality_ids={k: v[rows] for k, v in batch.modality_ids.items()},
    )


def _concat(parts: list[Tensor | None], sizes: list[int], pad_value: bool | float) -> Tensor | None:
    """Concatenate row chunks; missing chunks become ``pad_value`` rows, ragged dim 1 is padded."""
    known = [p for p in parts if p is not None]
    if not known:
        return None
    ref = known[0]
    length = max(p.shape[1] for p in known) if ref.dim() > 1 else None
    out: list[Tensor] = []
    for p, n in zip(parts, sizes, strict=True):
        if p is None:
            shape = (n, *ref.shape[1:]) if length is None else (n, length, *ref.shape[2:])
            p = torch.full(shape, pad_value, dtype=ref.dtype, device=ref.device)
        elif length is not None and p.shape[1] < length:
            extra = torch.full((n, length - p.shape[1], *p.shape[2:]), pad_value, dtype=p.dtype, device=p.device)
            p = torch.cat([p, extra], dim=1)
        out.append(p)
    return torch.cat(out)


def _missing_padding(chunks: list[Outputs], m: str, sizes: list[int]) -> list[Tensor | None]:
    """Padding masks of ``m`` per chunk; chunks without one get all-``False`` (all valid) masks."""
    parts: list[Tensor | None] = []
    for out, n in zip(chunks, sizes, strict=True):
        if m in out.padding:
            parts.append(out.padding[m])
        elif m in out.tokens:
            parts.append(torch.zeros(n, out.tokens[m].shape[1], dtype=torch.bool, device=out.tokens[m].device))
        else:
            parts.append(None)  # modality absent from the chunk: padded everywhere
    return parts


def merge_outputs(chunks: list[Outputs], sizes: list[int]) -> Outputs:
    """One ``Outputs`` over the whole batch from per-chunk outputs (absent rows zero, fully padded).

    Token sequences of different lengths are right-padded (values 0, padding ``True``); a padding
    mask exists for a modality whenever its token lengths differ between chunks.

    Raises:
        ValueError: If a chunk has objective extras (``Outputs.extras``).
    """
    if any(c.extras for c in chunks):
        raise ValueError("gradient caching cannot merge objective extras (Outputs.extras)")
    merged: dict[str, Any] = {}
    for name in ("embeddings", "projections", "pooled", "tokens"):
        keys = sorted({k for c in chunks for k in getattr(c, name)})
        merged[name] = {k: _concat([getattr(c, name).get(k) for c in chunks], sizes, 0.0) for k in keys}
    padding: dict[str, Tensor] = {}
    for m, tokens in merged["tokens"].items():
        lengths = {c.tokens[m].shape[1] for c in chunks if m in c.tokens}
        absent = any(m not in c.tokens for c in chunks)
        if any(m in c.padding for c in chunks) or len(lengths) > 1 or absent:
            mask = _concat(_missing_padding(chunks, m, sizes), sizes, True)
            assert mask is not None and mask.shape == tokens.shape[:2]
            padding[m] = mask
    merged["padding"] = padding
    for name in ("fused", "fused_embedding", "fused_tokens"):
        merged[name] = _concat([getattr(c, name) for c in chunks], sizes, 0.0)
    if merged["fused_tokens"] is not None:
        parts = [
            c.fused_padding
            if c.fused_padding is not None
            else None
            if c.fused_tokens is None
            else torch.zeros(c.fused_tokens.shape[:2], dtype=torch.bool, device=c.fused_tokens.device)
            for c in chunks
        ]
        merged["fused_padding"] = _concat(parts, sizes, True)
    return Outputs(**merged)


def _leaves(outputs: Outputs) -> tuple[Outputs, list[tuple[str, str | None, Tensor]]]:
    """``outputs`` with every floating tensor detached into a leaf that requires grad."""
    leaves: list[tuple[str, str | None, Tensor]] = []
    changes: dict[str, Any] = {}
    for f in fields(outputs):
        value = getattr(outputs, f.name)
        if f.name in _ROW_DICTS:
            new = {}
            for k, t in value.items():
                if t.is_floating_point():
                    t = t.detach().requires_grad_()
                    leaves.append((f.name, k, t))
                new[k] = t
            changes[f.name] = new
        elif f.name in _ROW_TENSORS and isinstance(value, Tensor) and value.is_floating_point():
            t = value.detach().requires_grad_()
            leaves.append((f.name, None, t))
            changes[f.name] = t
    return replace(outputs, **changes), leaves


def _output(outputs: Outputs, name: str, key: str | None) -> Tensor | None:
    value = getattr(outputs, name)
    return value.get(key) if key is not None else value


class _RNG:
    """The CPU (and current CUDA device's) RNG state, to replay a chunk's dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _chunks(size: int, chunk: int) -> Iterator[slice]:
    for start in range(0, size, chunk):
        yield slice(start, min(start + chunk, size))


def grad_cache_backward(
    method: Method,
    batch: Batch,
    chunk: int,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> LossOutput:
    """One step's loss over ``batch`` with gradients accumulated into ``method``'s ``.grad``.

    Args:
        method: The (unwrapped) method; its objectives must pass :func:`check_cacheable`.
        batch: The whole step's batch (``B`` rows).
        chunk: Rows per forward pass (``>= 1``); ``chunk >= B`` is one pass (plus the replay).
        autocast: Context for every forward (the trainer's bf16 autocast).

    Returns:
        The method's ``LossOutput`` for the whole batch (its graph already consumed).
    """
    if chunk < 1:
        raise ValueError(f"grad_cache chunk must be >= 1, got {chunk}")
    device = batch.ids.device
    slices = list(_chunks(batch.size, chunk))
    parts = [batch_rows(batch, s) for s in slices]
    states: list[_RNG] = []
    cached: list[Outputs] = []
    with torch.no_grad():
        for part in parts:
            states.append(_RNG(device))
            with autocast():
                cached.append(method.model(part))
    after = _RNG(device)
    outputs, leaves = _leaves(merge_outputs(cached, [s.stop - s.start for s in slices]))
    del cached
    with autocast():
        out = method.loss(outputs, batch)
    out.loss.backward()
    for part, rows, state in zip(parts, slices, states, strict=True):
        state.restore()
        with autocast():
            fresh = method.model(part)
        tensors: list[Tensor] = []
        grads: list[Tensor] = []
        for name, key, leaf in leaves:
            t = _output(fresh, name, key)
            if leaf.grad is None or t is None or not t.requires_grad:
                continue
            g = leaf.grad[rows]
            if t.shape != g.shape:  # ragged tokens: the chunk's own length
                g = g[:, : t.shape[1]]
            tensors.append(t)
            grads.append(g.to(t.dtype))
        if tensors:
            torch.autograd.backward(tensors, grads)
    after.restore()
    return out


def all_reduce_gradients(module: nn.Module) -> None:
    """Average every parameter's gradient over ranks (missing gradients count as zeros).

    One flat ``mean_over_ranks`` per dtype, as DDP's reducer would after a backward pass.
    """
    if world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in module.parameters():
        if p.requires_grad:
            by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        flat = mean_over_ranks(
            torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        )
        for p, part in zip(group, flat.split([p.numel() for p in group]), strict=True):
            p.grad = part.view_as(p).clone()
