"""CLIP's tower details: the causal text transformer (last-token pooling, unmasked fast path) and ViT ``pre_norm``."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from modalign.core import ConfigError
from modalign.encoders.image import ImageViT
from modalign.encoders.text import TextTransformer, is_suffix, last_valid
from modalign.nn.layers import causal_attention_mask

VOCAB, T = 50, 9


def causal_text(**kwargs: object) -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(VOCAB, dim=16, depth=2, heads=2, max_len=T, causal=True, pool="last", **kwargs).double()


def right_padded(lengths: list[int]) -> tuple[Tensor, Tensor]:
    """Ids ``[B, T]`` (pad 0 after each row's length) and the padding mask."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (len(lengths), T), generator=g)
    padding = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]
    return ids.masked_fill(padding, 0), padding


def reference(enc: TextTransformer, ids: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
    """Tokens and last-token pooling with every block's explicit causal-and-padding mask (the slow path)."""
    h = enc.positions(enc.embed(ids))
    for block in enc.transformer.blocks:
        x = block.norm1(h)
        mask = causal_attention_mask(T, padding, block.attn.num_heads, h.device)
        h = h + block.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        h = h + block.mlp(block.norm2(h))
    h = enc.transformer.norm(h)
    last = (~padding).sum(dim=1) - 1
    return h, h[torch.arange(h.shape[0]), last]


def test_unmasked_fast_path_equals_the_masked_reference_value_and_gradient() -> None:
    enc = causal_text()
    ids, padding = right_padded([9, 5, 1, 7])
    out = enc(ids, padding)
    tokens, pooled = reference(enc, ids, padding)
    valid = ~padding
    torch.testing.assert_close(out.tokens[valid], tokens[valid], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.pooled, pooled, rtol=1e-10, atol=1e-10)
    weights = torch.randn(pooled.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fast = torch.autograd.grad((out.pooled * weights).sum(), list(enc.parameters()))
    slow = torch.autograd.grad((pooled * weights).sum(), list(enc.parameters()))
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_right_padding_runs_the_plain_causal_kernel_and_holes_keep_the_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bool, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args: object) -> Tensor:
        calls.append((args[3] is None, bool(args[5])))  # (no mask, is_causal)
        return sdpa(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    enc = causal_text()
    ids, padding = right_padded([9, 4])
    enc(ids, padding)
    assert calls == [(True, True)] * 2
    calls.clear()
    padding[1, 1] = True
    enc(ids, padding)
    assert calls == [(False, False)] * 2


def test_a_token_never_sees_later_tokens() -> None:
    enc = causal_text()
    ids, _ = right_padded([9, 9])
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] % (VOCAB - 1)) + 1  # new ids after position 5
    a, b = enc(ids).tokens, enc(changed).tokens
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_last_pooling_reads_the_last_valid_token_whatever_the_padding_after_it() -> None:
    enc = causal_text()
    ids, padding = right_padded([4, 9])
    # Row 0 has 4 tokens: the same text with no padding at all gives the same pooled vector.
    torch.testing.assert_close(enc(ids, padding).pooled[0], enc(ids[:1, :4]).pooled[0], rtol=1e-10, atol=1e-12)
    assert last_valid(ids[..., None], padding).tolist() == [3, 8]
    assert last_valid(ids[..., None], None).tolist() == [8, 8]


def test_padding_that_is_not_a_suffix_keeps_the_mask() -> None:
    enc = causal_text()
    ids, _ = right_padded([9, 9, 9])
    padding = torch.zeros(3, T, dtype=torch.bool)
    padding[0, 2] = padding[1, 0] = True  # a gathered subset: holes before valid tokens
    assert not is_suffix(padding) and is_suffix(padding[2:])
    out = enc.trunk(*enc.stem(ids, padding))
    tokens, _ = reference(enc, ids, padding)
    torch.testing.assert_close(out.tokens[~padding], tokens[~padding], rtol=1e-10, atol=1e-10)
    # The hole changes what later tokens see: without the mask the outputs would differ.
    unmasked = enc.transformer(enc.stem(ids, padding)[0], None)
    assert not torch.allclose(unmasked[0, 3:], out.tokens[0, 3:])


def test_causal_tower_refuses_cls_pooling_and_unknown_pools() -> None:
    with pytest.raises(ConfigError) as err:
        TextTransformer(VOCAB, dim=16, depth=1, heads=2, causal=True, pool="cls")
    assert err.value.path == "pool" and "causal" in str(err.value)
    with pytest.raises(ConfigError):
        TextTransformer(VOCAB, dim=16, depth=1, heads=2, pool="eot")  # type: ignore[arg-type]


def test_bidirectional_tower_lets_earlier_tokens_see_later_ones() -> None:
    torch.manual_seed(0)
    bidirectional = TextTransformer(VOCAB, dim=16, depth=1, heads=2, max_len=T, pool="last").double()
    ids, padding = right_padded([9, 3])
    changed = ids.clone()
    changed[:, 2] = changed[:, 2] % (VOCAB - 1) + 1
    a, b = bidirectional(ids, padding).tokens, bidirectional(changed, padding).tokens
    assert not torch.allclose(a[:, :2], b[:, :2])  # earlier tokens see later ones


def test_vit_pre_norm_normalises_the_sequence_before_the_first_block() -> None:
    torch.manual_seed(0)
    vit = ImageViT(1, 8, patch=4, dim=16, depth=1, heads=2, pre_norm=True).double()
    plain = ImageViT(1, 8, patch=4, dim=16, depth=1, heads=2).double()
    plain.load_state_dict({k: v for k, v in vit.state_dict().items() if not k.startswith("norm_pre.")})
    with torch.no_grad():
        vit.norm_pre.weight.uniform_(0.5, 1.5)
        vit.norm_pre.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    tokens, _ = vit.stem(x)
    sequence = torch.cat([(vit.cls + vit.pos[:, :1]).expand(2, -1, -1), tokens], dim=1)
    expected = vit.transformer(vit.norm_pre(sequence))
    torch.testing.assert_close(vit(x).pooled, expected[:, 0])
    assert isinstance(plain.norm_pre, nn.Identity) and not torch.allclose(plain(x).pooled, vit(x).pooled)
    assert sum(p.numel() for p in vit.parameters()) == sum(p.numel() for p in plain.parameters()) + 32
