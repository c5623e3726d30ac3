"""Causal self-attention, cross-attention blocks and the decoder against hand-written references."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from modalign.nn import (
    CrossAttentionBlock,
    Transformer,
    TransformerBlock,
    TransformerDecoder,
    causal_attention_mask,
)

# ------------------------------------------------------------------ reference (float64, by hand)


def ref_layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_mlp(x: Tensor, mlp: nn.Sequential) -> Tensor:
    first, second = mlp[0], mlp[3]
    h = x @ first.weight.T + first.bias
    h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU
    return h @ second.weight.T + second.bias


def ref_attention(q_in: Tensor, kv_in: Tensor, attn: nn.MultiheadAttention, allowed: Tensor) -> Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, looped; ``allowed[b, t, s]`` says which keys a query sees.

    A query that sees no key returns zeros (the documented empty-context behaviour).
    """
    d, heads = attn.embed_dim, attn.num_heads
    if attn._qkv_same_embed_dim:
        wq, wk, wv = attn.in_proj_weight.split(d)
    else:
        wq, wk, wv = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
    bq, bk, bv = attn.in_proj_bias.split(d)
    q, k, v = q_in @ wq.T + bq, kv_in @ wk.T + bk, kv_in @ wv.T + bv
    hd = d // heads
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(heads):
            cols = slice(h * hd, (h + 1) * hd)
            for t in range(q.shape[1]):
                keys = allowed[b, t].nonzero().flatten()
                if len(keys) == 0:
                    continue
                scores = (k[b, keys, cols] @ q[b, t, cols]) / math.sqrt(hd)
                out[b, t, cols] = torch.softmax(scores, dim=0) @ v[b, keys, cols]
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def allowed_self(padding: Tensor | None, b: int, t: int, causal: bool) -> Tensor:
    allowed = torch.ones(b, t, t, dtype=torch.bool)
    if padding is not None:
        allowed &= ~padding[:, None, :]
    if causal:
        allowed &= torch.ones(t, t, dtype=torch.bool).tril()
    return allowed


def ref_cross_block(
    blk: CrossAttentionBlock, x: Tensor, ctx: Tensor, padding: Tensor | None, ctx_padding: Tensor | None
) -> Tensor:
    b, t, s = x.shape[0], x.shape[1], ctx.shape[1]
    if blk.attn is not None and blk.norm1 is not None:
        h = ref_layer_norm(x, blk.norm1)
        x = x + ref_attention(h, h, blk.attn, allowed_self(padding, b, t, blk.causal))
    cross_allowed = torch.ones(b, t, s, dtype=torch.bool)
    if ctx_padding is not None:
        cross_allowed &= ~ctx_padding[:, None, :]
    h, c = ref_layer_norm(x, blk.norm_cross), ref_layer_norm(ctx, blk.norm_context)
    x = x + ref_attention(h, c, blk.cross_attn, cross_allowed)
    return x + ref_mlp(ref_layer_norm(x, blk.norm2), blk.mlp)


def lengths_to_padding(lengths: list[int], t: int) -> Tensor:
    return torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]


# ----------------------------------------------------------------------------- value references


@pytest.mark.parametrize("causal", [False, True])
def test_transformer_block_matches_reference(causal: bool) -> None:
    torch.manual_seed(0)
    blk = TransformerBlock(8, heads=2, causal=causal).double().eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    padding = lengths_to_padding([5, 3, 1], 5)
    h = ref_layer_norm(x, blk.norm1)
    want = x + ref_attention(h, h, blk.attn, allowed_self(padding, 3, 5, causal))
    want = want + ref_mlp(ref_layer_norm(want, blk.norm2), blk.mlp)
    valid = ~padding  # outputs at padded positions are meaningless
    torch.testing.assert_close(blk(x, padding)[valid], want[valid], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(blk(x), blk(x, torch.zeros(3, 5, dtype=torch.bool)), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    ("causal", "self_attention", "context_dim"), [(True, True, 6), (False, True, None), (False, False, 6)]
)
def test_cross_attention_block_matches_reference(causal: bool, self_attention: bool, context_dim: int | None) -> None:
    torch.manual_seed(0)
    blk = CrossAttentionBlock(8, 2, context_dim, causal=causal, self_attention=self_attention).double().eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(3, 4, context_dim or 8, dtype=torch.float64, requires_grad=True)
    padding, ctx_padding = lengths_to_padding([5, 3, 2], 5), lengths_to_padding([4, 1, 0], 4)
    out = blk(x, ctx, padding, ctx_padding)
    want = ref_cross_block(blk, x, ctx, padding, ctx_padding)
    valid = ~padding
    torch.testing.assert_close(out[valid], want[valid], atol=1e-10, rtol=1e-10)
    # gradients of the valid outputs with respect to queries and context agree too
    w = torch.randn(out.shape, dtype=torch.float64) * valid[..., None]
    g_out = torch.autograd.grad((out * w).sum(), (x, ctx))
    g_ref = torch.autograd.grad((want * w).sum(), (x, ctx))
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_causal_mask_matches_loop() -> None:
    padding = lengths_to_padding([4, 2, 0], 4)
    mask = causal_attention_mask(4, padding, heads=2, device=torch.device("cpu"))
    assert mask.shape == (6, 4, 4)
    for b in range(3):
        for t in range(4):
            for s in range(4):
                blocked = s > t or (bool(padding[b, s]) and s != t)
                assert bool(mask[2 * b, t, s]) == bool(mask[2 * b + 1, t, s]) == blocked
    assert torch.equal(causal_attention_mask(3, None, 2, torch.device("cpu")), torch.ones(3, 3).triu(1).bool())


# ------------------------------------------------------------------------- causality properties


@functools.cache
def causal_modules() -> list[tuple[str, nn.Module]]:
    torch.manual_seed(0)
    return [
        ("block", TransformerBlock(8, 2, causal=True)),
        ("stack", Transformer(8, 2, 2, causal=True)),
        ("cross", CrossAttentionBlock(8, 2, context_dim=6, causal=True)),
        ("decoder", TransformerDecoder(8, 2, 2, context_dim=6)),
    ]


def apply(name: str, mod: nn.Module, x: Tensor, ctx: Tensor, padding: Tensor | None) -> Tensor:
    out: Tensor = mod(x, padding) if name in ("block", "stack") else mod(x, ctx, padding)
    return out


@settings(max_examples=6, deadline=None)
@given(t=st.integers(2, 7), cut=st.integers(0, 6), lengths=st.lists(st.integers(0, 7), min_size=2, max_size=2))
def test_outputs_up_to_t_ignore_later_inputs(t: int, cut: int, lengths: list[int]) -> None:
    cut = min(cut, t - 2)
    g = torch.Generator().manual_seed(t * 100 + cut)
    x, ctx = torch.randn(2, t, 8, generator=g), torch.randn(2, 3, 6, generator=g)
    padding = lengths_to_padding([min(n, t) for n in lengths], t)
    later = x.clone()
    later[:, cut + 1 :] = 10.0 * torch.randn(2, t - cut - 1, 8, generator=g)
    for name, mod in causal_modules():
        mod.eval()
        with torch.no_grad():
            for pad in (None, padding):
                out, out_later = apply(name, mod, x, ctx, pad), apply(name, mod, later, ctx, pad)
                assert torch.isfinite(out).all(), name
                torch.testing.assert_close(out[:, : cut + 1], out_later[:, : cut + 1], atol=1e-5, rtol=1e-5)
                if pad is None:  # sanity: the later positions do change
                    assert not torch.allclose(out[:, cut + 1 :], out_later[:, cut + 1 :], atol=1e-3), name


def test_causal_prefix_equals_the_prefix_alone() -> None:
    for name, mod in causal_modules():
        mod.eval()
        x, ctx = torch.randn(2, 6, 8), torch.randn(2, 3, 6)
        with torch.no_grad():
            full = apply(name, mod, x, ctx, None)
            for t in range(1, 6):
                torch.testing.assert_close(full[:, :t], apply(name, mod, x[:, :t], ctx, None), atol=1e-5, rtol=1e-5)


def test_bidirectional_default_sees_later_positions() -> None:
    torch.manual_seed(0)
    blk, dec = TransformerBlock(8, 2).eval(), TransformerDecoder(8, 1, 2, causal=False).eval()
    x, ctx = torch.randn(1, 4, 8), torch.randn(1, 3, 8)
    later = x.clone()
    later[:, 3] = torch.randn(8)
    assert not torch.allclose(blk(x)[:, 0], blk(later)[:, 0])
    assert not torch.allclose(dec(x, ctx)[:, 0], dec(later, ctx)[:, 0])


def test_causal_rows_without_visible_keys_stay_finite() -> None:
    torch.manual_seed(0)
    blk = TransformerBlock(8, 2, causal=True)
    left_padded = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = blk(torch.randn(2, 4, 8), left_padded)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in blk.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------- context padding


def test_padded_context_rows_do_not_change_outputs() -> None:
    torch.manual_seed(0)
    dec = TransformerDecoder(8, 2, 2, context_dim=6).eval()
    x, ctx = torch.randn(3, 4, 8), torch.randn(3, 5, 6)
    ctx_padding = lengths_to_padding([5, 2, 3], 5)
    noisy = torch.where(ctx_padding[..., None], 100.0 * torch.randn(3, 5, 6), ctx)
    with torch.no_grad():
        out = dec(x, ctx, context_padding=ctx_padding)
        torch.testing.assert_close(out, dec(x, noisy, context_padding=ctx_padding), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, dec(x, noisy), atol=1e-3)  # sanity: unmasked, it matters


def test_fully_padded_context_gives_no_cross_attention_update() -> None:
    torch.manual_seed(0)
    blk = CrossAttentionBlock(8, 2, context_dim=6)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 4, 6, requires_grad=True)
    ctx_padding = torch.tensor([[False, False, True, True], [True, True, True, True]])
    out = blk(x, ctx, context_padding=ctx_padding)
    assert torch.isfinite(out).all()
    h = x + blk.attn(blk.norm1(x), blk.norm1(x), blk.norm1(x), need_weights=False)[0]  # type: ignore[misc]
    torch.testing.assert_close(out[1], (h + blk.mlp(blk.norm2(h)))[1])
    out.sum().backward()
    assert ctx.grad is not None and torch.isfinite(ctx.grad).all()
    assert ctx.grad[1].abs().sum() == 0 and ctx.grad[0, :2].abs().sum() > 0


# ------------------------------------------------------------------------ gradients and errors


@pytest.mark.parametrize(
    "module",
    [
        CrossAttentionBlock(8, 2, context_dim=6, causal=True, dropout=0.1),
        CrossAttentionBlock(8, 2, self_attention=False),
        TransformerDecoder(8, 2, 2, context_dim=6, dropout=0.1),
        TransformerDecoder(8, 1, 2, causal=False),
    ],
    ids=["causal-block", "cross-only-block", "decoder", "fusion-encoder"],
)
def test_every_parameter_gets_a_gradient(module: nn.Module) -> None:
    module.train()
    ctx_dim = module.blocks[0].context_dim if isinstance(module, TransformerDecoder) else module.context_dim
    x, ctx = torch.randn(3, 5, 8), torch.randn(3, 4, int(ctx_dim))
    out = module(x, ctx, lengths_to_padding([5, 3, 1], 5), lengths_to_padding([4, 2, 1], 4))
    (out * torch.randn(out.shape)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="divisible"):
        CrossAttentionBlock(10, 4)
    with pytest.raises(ValueError, match="self_attention"):
        CrossAttentionBlock(8, 2, causal=True, self_attention=False)
    with pytest.raises(ValueError, match="depth"):
        TransformerDecoder(8, 0, 2)
    blk = CrossAttentionBlock(8, 2, context_dim=6)
    with pytest.raises(ValueError, match=r"\[B, T, 6\], got shape \(2, 3, 8\)"):
        blk(torch.randn(2, 4, 8), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="batch 3 != query batch 2"):
        blk(torch.randn(2, 4, 8), torch.randn(3, 3, 6))
    with pytest.raises(ValueError, match=r"padding of shape \(2, 2\)"):
        blk(torch.randn(2, 4, 8), torch.randn(2, 3, 6), context_padding=torch.zeros(2, 2, dtype=torch.bool))
