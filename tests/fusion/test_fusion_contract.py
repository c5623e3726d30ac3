"""Contract tests over every registered fusion module (``docs/architecture.md``, "Fusion").

For each module: output shapes; absent modalities and padded tokens never influence any row;
a sample alone equals the same sample in a batch; a modality missing from the whole batch
equals it being absent in every row; gradients reach every trainable parameter and only the
present, unpadded inputs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from modalign.core.modules import Fusion
from modalign.core.registry import available, create
from modalign.core.types import EncoderOutput

#: Token widths and lengths of the test modalities (``a`` is padded, ``c`` is a vector).
WIDTHS = {"a": 8, "b": 12, "c": 6}
LENGTHS = {"a": 5, "b": 3, "c": 1}

#: Every registered fusion module with dim > 0: (small hyper-parameters, modalities it fuses).
FUSIONS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "concat": ({"dim": 16}, ("a", "b", "c")),
    "gated": ({"dim": 16}, ("a", "b", "c")),
    "tensor": ({"dim": 16, "rank": 3}, ("a", "b", "c")),
    "early": ({"dim": 16, "depth": 2, "heads": 2, "max_tokens": 8}, ("a", "b", "c")),
    "shared": ({"dim": 16, "depth": 2, "heads": 2, "max_tokens": 8}, ("a", "b", "c")),
    "coattention": ({"dim": 16, "depth": 2, "heads": 2}, ("a", "b")),
    "cross_attention": ({"dim": 16, "depth": 2, "heads": 2}, ("a", "b", "c")),
    "bottleneck": ({"dim": 16, "depth": 2, "heads": 2, "n_bottleneck": 3}, ("a", "b", "c")),
}


def build(name: str) -> tuple[Fusion, tuple[str, ...]]:
    kwargs, mods = FUSIONS[name]
    torch.manual_seed(0)
    fusion: Fusion = create("fusion", name, widths={m: WIDTHS[m] for m in mods}, **kwargs)
    return fusion.eval(), mods


def make_inputs(mods: tuple[str, ...], b: int = 6, seed: int = 1) -> tuple[dict[str, EncoderOutput], dict[str, Tensor]]:
    """Random inputs laid out as ``MultimodalModel.encode`` does: absent rows zero and all padded."""
    g = torch.Generator().manual_seed(seed)
    present = {m: torch.rand(b, generator=g) < 0.7 for m in mods}
    present[mods[0]][0] = True  # row 0: every modality present, row 1: only the first
    for m in mods[1:]:
        present[m][0], present[m][1] = True, False
    present[mods[0]][1] = True
    inputs = {}
    for m in mods:
        t = LENGTHS[m]
        tokens = torch.randn(b, t, WIDTHS[m], generator=g, dtype=torch.float64).float()
        padding = None
        if m == "a":
            lengths = torch.randint(1, t + 1, (b,), generator=g)
            padding = torch.arange(t)[None, :] >= lengths[:, None]
        pad = padding if padding is not None else torch.zeros(b, t, dtype=torch.bool)
        pad = pad | ~present[m][:, None]
        tokens = tokens.masked_fill(pad[..., None], 0.0)
        pooled = (tokens * (~pad)[..., None]).sum(1) / (~pad).sum(1).clamp(min=1)[:, None]
        inputs[m] = EncoderOutput(tokens, pooled, pad if (padding is not None or not bool(present[m].all())) else None)
    return inputs, present


def test_every_registered_fusion_is_covered() -> None:
    fusing = [n for n in available("fusion") if n != "none"]
    assert sorted(fusing) == sorted(FUSIONS), "add the module to FUSIONS"


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_shapes_and_dim(name: str) -> None:
    fusion, mods = build(name)
    inputs, present = make_inputs(mods)
    out = fusion(inputs, present)
    assert out is not None and fusion.dim > 0
    b = 6
    assert out.pooled.shape == (b, fusion.dim)
    assert out.tokens.ndim == 3 and out.tokens.shape[0] == b and out.tokens.shape[2] == fusion.dim
    if out.padding is not None:
        assert out.padding.shape == out.tokens.shape[:2] and out.padding.dtype == torch.bool
        assert not bool(out.padding.all(dim=1).any()), "every row keeps at least one fused token"
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.tokens).all()


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_absent_values_and_padded_tokens_do_not_matter(name: str) -> None:
    fusion, mods = build(name)
    inputs, present = make_inputs(mods)
    want = fusion(inputs, present)
    g = torch.Generator().manual_seed(7)
    noisy = {}
    for m, out in inputs.items():
        pad = out.padding if out.padding is not None else torch.zeros(out.tokens.shape[:2], dtype=torch.bool)
        junk = 100 * torch.randn(out.tokens.shape, generator=g)
        tokens = torch.where(pad[..., None], junk, out.tokens)
        pooled = torch.where(present[m][:, None], out.pooled, 100 * torch.randn(out.pooled.shape, generator=g))
        noisy[m] = EncoderOutput(tokens, pooled, out.padding)
    got = fusion(noisy, present)
    torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_a_sample_alone_equals_it_in_a_batch(name: str) -> None:
    fusion, mods = build(name)
    inputs, present = make_inputs(mods)
    batch = fusion(inputs, present).pooled
    for i in range(batch.shape[0]):
        one = {
            m: EncoderOutput(
                out.tokens[i : i + 1], out.pooled[i : i + 1], None if out.padding is None else out.padding[i : i + 1]
            )
            for m, out in inputs.items()
        }
        alone = fusion(one, {m: p[i : i + 1] for m, p in present.items()}).pooled
        torch.testing.assert_close(alone[0], batch[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_a_modality_missing_from_the_batch_equals_it_absent_in_every_row(name: str) -> None:
    fusion, mods = build(name)
    inputs, present = make_inputs(mods)
    last = mods[-1]
    absent_rows = dict(present)
    absent_rows[last] = torch.zeros_like(present[last])
    out = inputs[last]
    t = out.tokens.shape[1]
    blank = EncoderOutput(
        torch.zeros_like(out.tokens), torch.zeros_like(out.pooled), torch.ones(6, t, dtype=torch.bool)
    )
    want = fusion({**inputs, last: blank}, absent_rows).pooled
    without = {m: o for m, o in inputs.items() if m != last}
    got = fusion(without, {m: p for m, p in present.items() if m != last}).pooled
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_a_float64_module_keeps_float64_with_a_modality_missing_from_the_batch(name: str) -> None:
    """The stand-in for a missing modality takes the inputs' dtype (gated and tensor made float32 zeros)."""
    fusion, mods = build(name)
    fusion.double()
    inputs, present = make_inputs(mods)
    without = {
        m: EncoderOutput(o.tokens.double(), o.pooled.double(), o.padding) for m, o in inputs.items() if m != mods[-1]
    }
    out = fusion(without, {m: p for m, p in present.items() if m != mods[-1]})
    assert out.pooled.dtype == torch.float64 and bool(torch.isfinite(out.pooled).all())


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_gradients_reach_every_parameter_and_only_present_inputs(name: str) -> None:
    fusion, mods = build(name)
    inputs, present = make_inputs(mods)
    leaves = {}
    for m, out in inputs.items():
        tokens = out.tokens.clone().requires_grad_(True)
        pooled = out.pooled.clone().requires_grad_(True)
        leaves[m] = (tokens, pooled)
        inputs[m] = EncoderOutput(tokens, pooled, out.padding)
    out = fusion(inputs, present)
    (out.pooled.square().sum() + out.tokens.square().sum()).backward()
    for pname, p in fusion.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
    for m, (tokens, pooled) in leaves.items():
        pad = inputs[m].padding if inputs[m].padding is not None else torch.zeros(tokens.shape[:2], dtype=torch.bool)
        if tokens.grad is not None:
            assert bool((tokens.grad[pad] == 0).all()), f"{name}: gradient reached padded/absent tokens of {m}"
        if pooled.grad is not None:
            assert bool((pooled.grad[~present[m]] == 0).all()), f"{name}: gradient reached absent rows of {m}"
        reached = [g for g in (tokens.grad, pooled.grad) if g is not None]
        assert reached and any(bool(g.abs().sum() > 0) for g in reached), f"{name}: no gradient reached {m}"


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_wrong_width_names_the_modality(name: str) -> None:
    fusion, mods = build(name)
    inputs, present = make_inputs(mods)
    m = mods[0]
    bad = EncoderOutput(torch.zeros(6, LENGTHS[m], WIDTHS[m] + 1), torch.zeros(6, WIDTHS[m] + 1), None)
    with pytest.raises(ValueError, match=repr(m)):
        fusion({**inputs, m: bad}, present)


def test_none_has_no_joint_representation() -> None:
    fusion = create("fusion", "none", widths=WIDTHS)
    inputs, present = make_inputs(("a", "b"))
    assert fusion.dim == 0 and fusion(inputs, present) is None
