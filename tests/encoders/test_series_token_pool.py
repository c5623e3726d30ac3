"""``series_conv``'s ``token_pool``: shorter token sequences (for soft-DTW), the same pooled vector."""

from __future__ import annotations

import pytest
import torch

from modalign.core.errors import ConfigError
from modalign.encoders.series import SeriesConv, pool_steps


def test_pool_steps_means_runs_and_keeps_right_padding() -> None:
    x = torch.arange(2 * 7 * 1, dtype=torch.float32).reshape(2, 7, 1)
    pooled, none = pool_steps(x, None, 3)
    assert none is None
    torch.testing.assert_close(pooled[0, :, 0], torch.tensor([1.0, 4.0, 6.0]))  # (0,1,2) (3,4,5) (6)
    padding = torch.arange(7)[None] >= torch.tensor([7, 4])[:, None]  # row 1: 4 valid steps
    pooled, pad = pool_steps(x, padding, 3)
    assert pad is not None and pad.tolist() == [[False, False, False], [False, False, True]]
    torch.testing.assert_close(pooled[1, :2, 0], torch.tensor([8.0, 10.0]))  # (7,8,9) and (10) alone
    same, same_pad = pool_steps(x, padding, 1)
    assert same is x and same_pad is padding


def test_series_conv_token_pool_shortens_tokens_only() -> None:
    torch.manual_seed(0)
    full = SeriesConv(3, widths=(8, 16), dim=16).eval()
    torch.manual_seed(0)
    short = SeriesConv(3, widths=(8, 16), dim=16, token_pool=4).eval()
    x = torch.randn(5, 3, 30)
    padding = torch.arange(30)[None] >= torch.tensor([30, 30, 17, 30, 9])[:, None]
    a, b = full(x, padding), short(x, padding)
    assert a.tokens.shape == (5, 30, 16) and b.tokens.shape == (5, 8, 16)
    torch.testing.assert_close(b.pooled, a.pooled)
    torch.testing.assert_close(b.tokens[:, 1], a.tokens[:, 4:8].mean(dim=1))
    assert b.padding is not None and b.padding.sum(dim=1).tolist() == [0, 0, 3, 0, 5]
    with pytest.raises(ConfigError, match="token_pool"):
        SeriesConv(3, token_pool=0)
