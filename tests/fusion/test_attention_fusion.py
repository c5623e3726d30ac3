"""Token-level attention fusion (``early``, ``shared``, ``coattention``, ``cross_attention``,
``bottleneck``): fused tokens obey the contract too, and each module against a direct
reference computation of its paper's formula in the cases where it reduces to one."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from modalign.core.modules import Fusion
from modalign.core.registry import create
from modalign.core.types import EncoderOutput
from modalign.fusion import BottleneckFusion, CoAttentionFusion, CrossAttentionFusion, EarlyFusion, SharedFusion

WIDTHS = {"a": 8, "b": 12, "c": 6}
LENGTHS = {"a": 5, "b": 3, "c": 1}
SMALL: dict[str, Any] = {"dim": 16, "depth": 2, "heads": 2}
TOKEN_FUSIONS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "early": ({**SMALL, "max_tokens": 8}, ("a", "b", "c")),
    "shared": ({**SMALL, "max_tokens": 8}, ("a", "b", "c")),
    "coattention": (SMALL, ("a", "b")),
    "cross_attention": (SMALL, ("a", "b", "c")),
    "bottleneck": ({**SMALL, "n_bottleneck": 3}, ("a", "b", "c")),
}


def build(name: str, **overrides: Any) -> tuple[Fusion, tuple[str, ...]]:
    kwargs, mods = TOKEN_FUSIONS[name]
    torch.manual_seed(0)
    fusion: Fusion = create("fusion", name, widths={m: WIDTHS[m] for m in mods}, **{**kwargs, **overrides})
    return fusion.eval(), mods


def layout(
    mods: tuple[str, ...], present: dict[str, Tensor], seed: int = 1, padded: bool = True
) -> dict[str, EncoderOutput]:
    """Inputs as ``MultimodalModel.encode`` lays them out: absent rows zero and all padded."""
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for m in mods:
        b, t = present[m].shape[0], LENGTHS[m]
        pad = torch.zeros(b, t, dtype=torch.bool)
        if m == "a" and padded:
            pad = torch.arange(t)[None, :] >= torch.randint(1, t + 1, (b,), generator=g)[:, None]
        pad = pad | ~present[m][:, None]
        tokens = torch.randn(b, t, WIDTHS[m], generator=g).masked_fill(pad[..., None], 0.0)
        pooled = (tokens * (~pad)[..., None]).sum(1) / (~pad).sum(1).clamp(min=1)[:, None]
        inputs[m] = EncoderOutput(tokens, pooled, pad if bool(pad.any()) else None)
    return inputs


def rows(mods: tuple[str, ...], *pattern: str) -> dict[str, Tensor]:
    """``present`` from one string per row naming the modalities present there ("" = none)."""
    return {m: torch.tensor([m in r for r in pattern]) for m in mods}


PATTERN = ("abc", "a", "b", "c", "bc", "", "ab")


def cases(mods: tuple[str, ...]) -> tuple[dict[str, EncoderOutput], dict[str, Tensor]]:
    present = rows(mods, *PATTERN)
    return layout(mods, present), present


@pytest.mark.parametrize("name", sorted(TOKEN_FUSIONS))
def test_fused_tokens_ignore_absent_and_padded_values(name: str) -> None:
    fusion, mods = build(name)
    inputs, present = cases(mods)
    want = fusion(inputs, present)
    g = torch.Generator().manual_seed(3)
    noisy = {}
    for m, out in inputs.items():
        pad = out.padding if out.padding is not None else torch.zeros(out.tokens.shape[:2], dtype=torch.bool)
        junk = 100 * torch.randn(out.tokens.shape, generator=g)
        noisy[m] = EncoderOutput(torch.where(pad[..., None], junk, out.tokens), out.pooled, out.padding)
    got = fusion(noisy, present)
    torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TOKEN_FUSIONS))
def test_padded_fused_tokens_are_zero_and_no_row_is_empty(name: str) -> None:
    fusion, mods = build(name)
    inputs, present = cases(mods)
    out = fusion(inputs, present)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    if out.padding is not None:
        assert not bool(out.padding[:, 0].any()), "the first fused token is never padded"
        assert bool((out.tokens[out.padding] == 0).all())


@pytest.mark.parametrize("name", sorted(TOKEN_FUSIONS))
def test_missing_modality_gives_the_same_tokens_as_absent_everywhere(name: str) -> None:
    fusion, mods = build(name)
    inputs, present = cases(mods)
    last = mods[-1]
    without = {m: o for m, o in inputs.items() if m != last}
    got = fusion(without, {m: p for m, p in present.items() if m != last})
    blank = layout(mods, {**present, last: torch.zeros_like(present[last])})[last]
    want = fusion({**inputs, last: blank}, {**present, last: torch.zeros_like(present[last])})
    t = got.tokens.shape[1]
    torch.testing.assert_close(got.tokens, want.tokens[:, :t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-5, atol=1e-5)
    if want.padding is not None:
        assert got.padding is not None and torch.equal(got.padding, want.padding[:, :t])
        assert bool(want.padding[:, t:].all()), "the extra tokens of the blank modality are padded"


@pytest.mark.parametrize("name", sorted(TOKEN_FUSIONS))
def test_a_row_with_one_modality_equals_that_modality_alone(name: str) -> None:
    fusion, mods = build(name)
    inputs, present = cases(mods)
    full = fusion(inputs, present).pooled
    for i, r in enumerate(PATTERN):
        if len(r) != 1 or r not in mods:
            continue
        alone = fusion({r: _row(inputs[r], i)}, {r: present[r][i : i + 1]}).pooled
        torch.testing.assert_close(alone[0], full[i], rtol=1e-5, atol=1e-5)


def _row(out: EncoderOutput, i: int) -> EncoderOutput:
    pad = None if out.padding is None else out.padding[i : i + 1]
    return EncoderOutput(out.tokens[i : i + 1], out.pooled[i : i + 1], pad)


def test_early_is_one_transformer_over_cls_and_every_modality() -> None:
    fusion, mods = build("early")
    assert isinstance(fusion, EarlyFusion)
    present = rows(mods, "abc", "abc")
    inputs = layout(mods, present, padded=False)
    parts = [fusion.cls.expand(2, -1, -1)] + [fusion.embed[m](inputs[m].tokens) for m in mods]
    want = fusion.transformer(torch.cat(parts, dim=1))
    out = fusion(inputs, present)
    torch.testing.assert_close(out.pooled, want[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.tokens, want, rtol=1e-5, atol=1e-5)


def test_early_rejects_more_tokens_than_max_tokens() -> None:
    fusion, mods = build("early", max_tokens=4)
    inputs, present = cases(mods)  # ``a`` has 5 tokens
    with pytest.raises(ValueError, match="max_len=4"):
        fusion(inputs, present)


def test_shared_pools_the_mean_of_each_modality_encoded_alone_by_one_transformer() -> None:
    fusion, mods = build("shared")
    assert isinstance(fusion, SharedFusion)
    present = rows(mods, "abc", "ab")
    inputs = layout(mods, present, padded=False)
    alone = {}
    for m in mods:
        x = torch.cat([fusion.cls[m].expand(2, -1, -1), fusion.embed[m](inputs[m].tokens)], dim=1)
        alone[m] = fusion.transformer(x)[:, 0]
    out = fusion(inputs, present)
    torch.testing.assert_close(out.pooled[0], (alone["a"][0] + alone["b"][0] + alone["c"][0]) / 3)
    torch.testing.assert_close(out.pooled[1], (alone["a"][1] + alone["b"][1]) / 2)
    torch.testing.assert_close(out.tokens[:, 0], out.pooled)


def test_coattention_needs_exactly_two_modalities() -> None:
    with pytest.raises(ValueError, match="'c': 6"):
        create("fusion", "coattention", widths=WIDTHS, **SMALL)
    with pytest.raises(ValueError, match="exactly two"):
        create("fusion", "coattention", widths={"a": 8}, **SMALL)


def test_coattention_with_one_stream_absent_uses_its_missing_vector() -> None:
    """Where ``b`` is absent, stream ``a`` gets no cross-attention and ``b``'s CLS is ``missing_b``."""
    fusion, mods = build("coattention")
    assert isinstance(fusion, CoAttentionFusion)
    present = rows(mods, "a")
    inputs = layout(mods, present, padded=False)
    x = torch.cat([fusion.cls["a"], fusion.proj["a"](inputs["a"].tokens)], dim=1)
    for layer in fusion.layers:
        block = layer.blocks["a"]
        h = x + block.attn(*(3 * [block.norm1(x)]), need_weights=False)[0]
        x = h + block.mlp(block.norm2(h))
    cls_a = fusion.norm["a"](x)[:, 0]
    want = fusion.out(torch.cat([cls_a, fusion.missing["b"][None]], dim=-1))
    torch.testing.assert_close(fusion(inputs, present).pooled, want, rtol=1e-5, atol=1e-5)


def test_cross_attention_query_defaults_to_the_first_modality_and_is_checked() -> None:
    fusion, _ = build("cross_attention")
    assert isinstance(fusion, CrossAttentionFusion) and fusion.query == "a"
    assert create("fusion", "cross_attention", widths=WIDTHS, query="c", **SMALL).query == "c"
    with pytest.raises(ValueError, match="'z'"):
        create("fusion", "cross_attention", widths=WIDTHS, query="z", **SMALL)
    with pytest.raises(ValueError, match="at least two"):
        create("fusion", "cross_attention", widths={"a": 8}, **SMALL)


def test_cross_attention_with_absent_context_equals_the_context_missing_from_inputs() -> None:
    fusion, mods = build("cross_attention")
    present = rows(mods, "a", "a", "abc")
    inputs = layout(mods, present)
    full = fusion(inputs, present)
    query_only = fusion({"a": _row(inputs["a"], 0)}, {"a": present["a"][:1]})
    torch.testing.assert_close(full.pooled[0], query_only.pooled[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.tokens[0], query_only.tokens[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full.pooled[2], full.pooled[0]), "a present context changes the output"


def test_cross_attention_with_absent_query_keeps_only_the_cls_query() -> None:
    fusion, mods = build("cross_attention")
    present = rows(mods, "bc")
    inputs = layout(mods, present)
    out = fusion(inputs, present)
    assert out.padding is not None and out.padding[0].tolist() == [False] + [True] * LENGTHS["a"]
    context = {m: inputs[m] for m in ("b", "c")}
    alone = fusion(context, {m: present[m] for m in context})
    torch.testing.assert_close(out.pooled, alone.pooled, rtol=1e-5, atol=1e-5)


def mbt_reference(fusion: BottleneckFusion, m: str, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """MBT for one modality: the plain stack of its blocks over ``[CLS_m; Linear_m(tokens); z]``."""
    b, n = tokens.shape[0], fusion.bottleneck.shape[1]
    x = torch.cat([fusion.cls[m].expand(b, -1, -1), fusion.proj[m](tokens), fusion.bottleneck.expand(b, -1, -1)], 1)
    for layer in fusion.layers:
        x = layer.blocks[m](x)
    return fusion.norm(x[:, 0]), fusion.norm(x[:, -n:])


def test_bottleneck_with_one_modality_present_is_a_plain_transformer_pass() -> None:
    fusion, mods = build("bottleneck")
    assert isinstance(fusion, BottleneckFusion)
    present = rows(mods, "b", "c", "b")
    inputs = layout(mods, present)
    out = fusion(inputs, present)
    assert out.padding is None and out.tokens.shape == (3, 3, 16)
    for i, m in enumerate(["b", "c", "b"]):
        pooled, z = mbt_reference(fusion, m, inputs[m].tokens[i : i + 1])
        torch.testing.assert_close(out.pooled[i], pooled[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.tokens[i], z[0], rtol=1e-5, atol=1e-5)


def test_bottleneck_averages_the_present_modalities_bottleneck_updates() -> None:
    fusion, mods = build("bottleneck", depth=1)
    assert isinstance(fusion, BottleneckFusion)
    present = rows(mods, "bc")
    inputs = layout(mods, present)
    (_, z_b), (_, z_c) = (mbt_reference(fusion, m, inputs[m].tokens) for m in ("b", "c"))
    out = fusion(inputs, present)
    n = fusion.bottleneck.shape[1]
    updates = []
    for m in ("b", "c"):
        x = torch.cat([fusion.cls[m], fusion.proj[m](inputs[m].tokens), fusion.bottleneck], dim=1)
        updates.append(fusion.layers[0].blocks[m](x)[:, -n:])
    torch.testing.assert_close(out.tokens, fusion.norm((updates[0] + updates[1]) / 2), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.tokens, z_b) and not torch.allclose(out.tokens, z_c)
