import pytest
import torch

from modalign.core.errors import ConfigError
from modalign.encoders.text import TextBoW


def test_word_dropout_only_in_training_and_never_empties_a_sample():
    torch.manual_seed(0)
    enc = TextBoW(vocab_size=50, dim=8, word_dropout=0.9)
    x = torch.tensor([[1, 5, 7, 9, 11, 13], [2, 0, 0, 0, 0, 0]])  # second sample: one token
    enc.eval()
    ref = enc(x).pooled
    enc.train()
    outs = [enc(x).pooled for _ in range(20)]
    assert all(torch.isfinite(o).all() for o in outs)
    # the one-token sample can never lose its only token
    assert all(torch.allclose(o[1], ref[1], atol=1e-6) for o in outs)
    # the long sample is perturbed in training mode
    assert any(not torch.allclose(o[0], ref[0], atol=1e-4) for o in outs)
    dropped = enc._drop(torch.zeros(1000, 6, dtype=torch.bool))
    assert not dropped.all(dim=1).any()
    # each token is dropped w.p. 0.9 unless all 6 are (0.9**6), then none are: E = 0.9 - 0.9**6
    assert abs(dropped.float().mean().item() - (0.9 - 0.9**6)) < 0.03


def test_word_dropout_range_is_checked():
    with pytest.raises(ConfigError, match="word_dropout"):
        TextBoW(vocab_size=10, word_dropout=1.0)
