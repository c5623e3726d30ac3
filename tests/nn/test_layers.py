import math

import pytest
import torch

from modalign.nn.layers import (
    LearnedPositions,
    PatchEmbed1d,
    PatchEmbed2d,
    SinusoidalPositions,
    Transformer,
    TransformerBlock,
    conv_bn_relu,
    downsample_padding,
    masked_max,
    masked_mean,
    zero_padded,
)


def _lengths_to_padding(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]


def test_masked_mean_matches_loop_and_handles_empty_rows() -> None:
    x = torch.randn(3, 5, 4)
    padding = _lengths_to_padding([5, 2, 0], 5)
    out = masked_mean(x, padding)
    torch.testing.assert_close(out[0], x[0].mean(0))
    torch.testing.assert_close(out[1], x[1, :2].mean(0))
    assert torch.equal(out[2], torch.zeros(4))
    torch.testing.assert_close(masked_mean(x), x.mean(1))


def test_masked_max_matches_loop_and_handles_empty_rows() -> None:
    x = torch.randn(3, 5, 4)
    padding = _lengths_to_padding([5, 2, 0], 5)
    out = masked_max(x, padding)
    torch.testing.assert_close(out[1], x[1, :2].amax(0))
    assert torch.equal(out[2], torch.zeros(4))


def test_masked_mean_rejects_mismatched_padding() -> None:
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        masked_mean(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.bool))


def test_zero_padded_zeroes_last_axis() -> None:
    x = torch.ones(2, 3, 4, 5)
    out = zero_padded(x, _lengths_to_padding([5, 3], 5))
    assert out[0].sum() == 3 * 4 * 5
    assert out[1, ..., 3:].abs().sum() == 0 and out[1, ..., :3].sum() == 3 * 4 * 3


@pytest.mark.parametrize(("t", "kernel", "stride"), [(9, 2, 2), (8, 4, 4), (7, 3, 2), (1, 2, 2)])
def test_downsample_padding_strided_matches_brute_force(t: int, kernel: int, stride: int) -> None:
    padding = torch.rand(6, t) > 0.5
    padding[0] = False
    new_len = math.ceil((t - kernel) / stride) + 1 if t >= kernel else 1
    out = downsample_padding(padding, new_len, kernel=kernel, stride=stride)
    for b in range(padding.shape[0]):
        for j in range(new_len):
            covered = padding[b, j * stride : min(j * stride + kernel, t)]
            assert bool(out[b, j]) == bool(covered.all())
    assert not out[0].any()


def test_downsample_padding_adaptive_matches_brute_force() -> None:
    t, new_len = 10, 4
    padding = _lengths_to_padding([10, 7, 3, 0], t)
    out = downsample_padding(padding, new_len)
    for b in range(4):
        for j in range(new_len):
            lo, hi = (j * t) // new_len, -((-(j + 1) * t) // new_len)
            assert bool(out[b, j]) == bool(padding[b, lo:hi].all())


def test_transformer_block_ignores_padded_keys_and_survives_empty_rows() -> None:
    torch.manual_seed(0)
    block = TransformerBlock(16, heads=4).eval()
    x = torch.randn(3, 6, 16)
    padding = _lengths_to_padding([6, 3, 0], 6)
    out = block(x, padding)
    x2 = x.clone()
    x2[1, 3:] = 100.0 * torch.randn(3, 16)
    out2 = block(x2, padding)
    torch.testing.assert_close(out[1, :3], out2[1, :3])
    assert out.shape == x.shape and torch.isfinite(out).all()
    # without the mask the same change does reach the valid tokens
    assert not torch.allclose(block(x, None)[1, :3], block(x2, None)[1, :3])


def test_transformer_block_rejects_indivisible_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        TransformerBlock(10, heads=4)


def test_transformer_stack_shape() -> None:
    out = Transformer(8, depth=2, heads=2)(torch.randn(2, 5, 8), _lengths_to_padding([5, 2], 5))
    assert out.shape == (2, 5, 8) and torch.isfinite(out).all()


def test_sinusoidal_positions_values_and_growth() -> None:
    pos = SinusoidalPositions(6, max_len=4)
    x = torch.zeros(1, 10, 6)
    out = pos(x)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(out[0, 7, 0], torch.tensor(math.sin(7.0)))
    assert out.shape == (1, 10, 6)


def test_learned_positions_rejects_long_sequences() -> None:
    pos = LearnedPositions(4, max_len=3)
    assert pos(torch.zeros(2, 3, 4)).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="max_len=3"):
        pos(torch.zeros(2, 4, 4))


def test_patch_embed2d_shape_and_error() -> None:
    embed = PatchEmbed2d(3, 8, patch=4)
    assert embed(torch.randn(2, 3, 32, 16)).shape == (2, 8 * 4, 8)
    with pytest.raises(ValueError, match=r"\(2, 3, 30, 32\)"):
        embed(torch.randn(2, 3, 30, 32))


def test_patch_embed1d_pads_to_multiple_and_downsamples_padding() -> None:
    embed = PatchEmbed1d(5, 8, patch=4)
    padding = _lengths_to_padding([10, 5, 4], 10)
    tokens, out_pad = embed(torch.randn(3, 5, 10), padding)
    assert tokens.shape == (3, 3, 8)
    assert out_pad is not None
    assert out_pad.tolist() == [[False, False, False], [False, False, True], [False, True, True]]
    x = torch.randn(3, 5, 10)
    x2 = x.clone()
    x2[2, :, 4:] = 50.0
    torch.testing.assert_close(embed(x, padding)[0][2, 0], embed(x2, padding)[0][2, 0])


def test_conv_bn_relu_requires_odd_kernel() -> None:
    assert conv_bn_relu(2, 4, dims=1, kernel=5)(torch.randn(2, 2, 9)).shape == (2, 4, 9)
    with pytest.raises(ValueError, match="odd kernel"):
        conv_bn_relu(2, 4, kernel=4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_checkpointing_recomputes_blocks_with_equal_gradients(precision: str) -> None:
    """``checkpoint=True``: same outputs and gradients (dropout masks replayed), blocks run twice."""
    torch.manual_seed(0)
    plain = Transformer(16, depth=3, heads=2, dropout=0.2)
    ckpt = Transformer(16, depth=3, heads=2, dropout=0.2, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 6, 16)
    padding = torch.arange(6)[None] >= torch.tensor([6, 3, 5, 1])[:, None]
    calls: list[int] = []
    for block in ckpt.blocks:  # count runs of each block's MLP (hooks do not fire in recomputation)
        mlp_forward = block.mlp.forward
        block.mlp.forward = lambda h, _f=mlp_forward: calls.append(1) or _f(h)  # type: ignore[method-assign]
    results = []
    for model in (plain, ckpt):
        model.train()
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = model(xi, padding)
        y[~padding].float().square().sum().backward()
        results.append((y.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    (y0, g0, p0), (y1, g1, p1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-7)
    for name in p0:
        torch.testing.assert_close(p1[name], p0[name], rtol=1e-6, atol=1e-7, msg=name)
    assert len(calls) == 2 * 2 + 1  # blocks ran forward, then again in backward (all but the last)
    calls.clear()
    ckpt.eval()
    with torch.no_grad():
        ckpt(x, padding)
    assert len(calls) == 3  # no recomputation outside training


def test_recomputed_blocks_keep_no_autocast_weight_casts() -> None:
    """Under bf16 autocast the recomputed blocks run with the cast cache off (forward and recompute)."""
    model = Transformer(16, depth=3, heads=2, checkpoint=True).train()
    seen: list[tuple[int, bool]] = []
    for i, block in enumerate(model.blocks):
        mlp_forward = block.mlp.forward
        block.mlp.forward = lambda h, _f=mlp_forward, _i=i: (  # type: ignore[method-assign]
            seen.append((_i, torch.is_autocast_cache_enabled())) or _f(h)
        )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(2, 5, 16, requires_grad=True))
    y.float().sum().backward()
    assert seen == [(0, False), (1, False), (2, True), (1, False), (0, False)]  # the last block is not recomputed


def test_transformer_encoders_take_checkpoint() -> None:
    from modalign.core import create

    args = {"in_channels": 1, "image_size": 8, "patch": 4, "dim": 16, "depth": 2, "heads": 2}
    vit = create("encoder", "image_vit", checkpoint=True, **args)
    assert vit.transformer.checkpoint
    out = vit(torch.randn(2, 1, 8, 8))
    out.pooled.sum().backward()
    assert all(p.grad is not None for p in vit.parameters())


@pytest.mark.parametrize(("checkpoint", "recomputed"), [(False, 0), (True, 3), (0, 0), (2, 2), (3, 3), (9, 3)])
def test_checkpoint_block_count_recomputes_the_first_blocks_with_equal_gradients(
    checkpoint: bool | int, recomputed: int
) -> None:
    """``checkpoint=k``: the first ``k`` blocks (at most ``depth - 1``) run twice; gradients equal the plain stack's."""
    torch.manual_seed(0)
    plain = Transformer(16, depth=4, heads=2, dropout=0.2)
    part = Transformer(16, depth=4, heads=2, dropout=0.2, checkpoint=checkpoint)
    part.load_state_dict(plain.state_dict())
    assert part.recomputed == recomputed and part.checkpoint == (recomputed > 0)
    runs = [0] * 4
    for i, block in enumerate(part.blocks):
        mlp_forward = block.mlp.forward
        block.mlp.forward = lambda h, _f=mlp_forward, _i=i: runs.__setitem__(_i, runs[_i] + 1) or _f(h)  # type: ignore[method-assign]
    x = torch.randn(3, 5, 16)
    grads = []
    for model in (plain, part):
        model.train()
        torch.manual_seed(1)
        model(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert runs == [2 if i < recomputed else 1 for i in range(4)]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpoint_refuses_a_negative_block_count() -> None:
    from modalign.core import ConfigError

    with pytest.raises(ConfigError) as err:
        Transformer(16, depth=2, heads=2, checkpoint=-1)
    assert err.value.path == "checkpoint"


def test_recipe_checkpoint_accepts_true_and_a_count() -> None:
    from modalign.core.config import check_component

    for value, expected in ((True, True), (2, 2), ("3", 3)):
        spec, provided = {"name": "image_vit", "checkpoint": value}, frozenset({"in_channels", "image_size"})
        _, kwargs = check_component("encoder", spec, "model.encoders.image", provided)
        assert kwargs["checkpoint"] == expected and type(kwargs["checkpoint"]) is type(expected)
