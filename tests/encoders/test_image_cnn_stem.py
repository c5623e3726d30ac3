import pytest
import torch

from modalign.core.errors import ConfigError
from modalign.encoders.image import ImageCNN


def test_stem_stride_halves_the_token_grid_and_trains():
    torch.manual_seed(0)
    plain, strided = ImageCNN(3, widths=(8, 16)), ImageCNN(3, widths=(8, 16), stem_stride=2)
    x = torch.randn(2, 3, 32, 32)
    assert plain(x).tokens.shape == (2, 16 * 16, 128)
    out = strided(x)
    assert out.tokens.shape == (2, 8 * 8, 128)
    out.pooled.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in strided.parameters())


def test_stem_stride_must_be_positive():
    with pytest.raises(ConfigError, match="stem_stride"):
        ImageCNN(3, stem_stride=0)
