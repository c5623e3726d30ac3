"""Encoder-specific checks of the token stem: target layout against loops, old checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modalign.core.errors import ConfigError
from modalign.encoders import AudioTransformer, ImageViT, SeriesTransformer, TextTransformer
from modalign.train.checkpoint import WEIGHTS, load_weights


def test_vit_targets_are_patch_pixels_in_stem_order() -> None:
    torch.manual_seed(0)
    enc = ImageViT(3, image_size=12, patch=4, dim=8, depth=1, heads=2)
    x = torch.randn(2, 3, 12, 12)
    targets = enc.targets(x)
    assert targets.shape == (2, 9, 3 * 4 * 4)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                patch = x[b, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
                assert torch.equal(targets[b, 3 * i + j], patch.reshape(-1))
    # the stem is the patch embedding (a linear map of exactly these pixels) plus positions
    w, bias = enc.patch_embed.proj.weight.reshape(8, -1), enc.patch_embed.proj.bias
    tokens, padding = enc.stem(x)
    assert padding is None
    torch.testing.assert_close(tokens - enc.pos[:, 1:], targets @ w.T + bias, atol=1e-5, rtol=1e-5)


def test_audio_targets_are_the_frames_of_each_token() -> None:
    torch.manual_seed(0)
    enc = AudioTransformer(5, patch=3, dim=8, depth=1, heads=2)
    x = torch.randn(2, 5, 10)
    padding = torch.arange(10)[None] >= torch.tensor([10, 4])[:, None]
    targets = enc.targets(x, padding)
    assert targets.shape == (2, 4, 5 * 3)
    for b, n in enumerate([10, 4]):
        for t in range(4):
            want = torch.zeros(5, 3)
            for s in range(3):
                if 3 * t + s < n:
                    want[:, s] = x[b, :, 3 * t + s]
            assert torch.equal(targets[b, t], want.reshape(-1))
    w, bias = enc.embed.proj.weight.reshape(8, -1), enc.embed.proj.bias
    frames, _ = enc.embed(x, padding)
    torch.testing.assert_close(frames, targets @ w.T + bias, atol=1e-5, rtol=1e-5)
    tokens, stem_padding = enc.stem(x, padding)
    torch.testing.assert_close(tokens, enc.positions(frames))
    assert stem_padding is not None and stem_padding.tolist() == [[False] * 4, [False, False, True, True]]


def test_series_targets_are_the_input_steps() -> None:
    enc = SeriesTransformer(3, dim=8, depth=1, heads=2)
    x = torch.randn(2, 3, 7)
    padding = torch.arange(7)[None] >= torch.tensor([7, 5])[:, None]
    targets = enc.targets(x, padding)
    assert torch.equal(targets[0], x[0].T)
    assert torch.equal(targets[1, :5], x[1, :, :5].T) and not targets[1, 5:].any()


def test_text_targets_validate_ids() -> None:
    enc = TextTransformer(20, dim=8, depth=1, heads=2)
    ids = torch.tensor([[2, 5, 7, 0]])
    assert torch.equal(enc.targets(ids), ids)
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        enc.targets(ids + 20)


def test_vit_trunk_ignores_padded_stem_tokens() -> None:
    torch.manual_seed(0)
    enc = ImageViT(1, image_size=8, patch=4, dim=8, depth=1, heads=2).eval()
    tokens, _ = enc.stem(torch.randn(2, 1, 8, 8))
    padding = torch.tensor([[False, False, True, True], [False, False, False, False]])
    out = enc.trunk(tokens, padding)
    noisy = tokens.clone()
    noisy[0, 2:] = 100.0
    again = enc.trunk(noisy, padding)
    torch.testing.assert_close(out.pooled, again.pooled)
    torch.testing.assert_close(out.tokens[0, :2], again.tokens[0, :2])
    assert out.padding is padding
    with pytest.raises(ValueError, match=r"\[B, T, 8\]"):
        enc.trunk(tokens[..., :4])


def test_series_transformer_loads_checkpoints_saved_before_the_stem_rename(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = SeriesTransformer(3, dim=8, depth=1, heads=2)
    old = {k.replace("stem_conv.", "stem."): v.contiguous() for k, v in saved.state_dict().items()}
    assert any(k.startswith("stem.0.") for k in old)
    fresh = SeriesTransformer(3, dim=8, depth=1, heads=2)
    fresh.load_state_dict(old)  # strict
    for k, v in saved.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    save_file(old, str(tmp_path / WEIGHTS))
    loaded = SeriesTransformer(3, dim=8, depth=1, heads=2)
    load_weights(tmp_path, loaded)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(loaded(x).pooled, saved(x).pooled)


def test_vit_mean_pool_is_the_mean_of_the_valid_patch_tokens() -> None:
    torch.manual_seed(0)
    cls_enc = ImageViT(1, image_size=8, patch=4, dim=8, depth=1, heads=2).eval()
    mean_enc = ImageViT(1, image_size=8, patch=4, dim=8, depth=1, heads=2, pool="mean").eval()
    mean_enc.load_state_dict(cls_enc.state_dict())  # same weights: only what `pooled` reads differs
    x = torch.randn(3, 1, 8, 8)
    a, b = cls_enc(x), mean_enc(x)
    torch.testing.assert_close(a.tokens, b.tokens)
    torch.testing.assert_close(b.pooled, a.tokens.mean(dim=1))
    assert not torch.allclose(a.pooled, b.pooled)
    # a gathered subset with padding (MAE-style): padded positions are left out of the mean
    tokens, _ = mean_enc.stem(x)
    padding = torch.tensor([[False, False, True, True]] * 3)
    out = mean_enc.trunk(tokens, padding)
    torch.testing.assert_close(out.pooled, out.tokens[:, :2].mean(dim=1))
    with pytest.raises(ConfigError, match="pool"):
        ImageViT(1, image_size=8, patch=4, pool="max")  # type: ignore[arg-type]
