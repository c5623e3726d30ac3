"""The feature-cache file format: memory-mapped reads by (content, view), pickling, bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modalign.core.errors import DataError
from modalign.encoders.feature_cache import CachedFeatures


def _write(path: Path, lengths: list[int], dim: int = 3) -> torch.Tensor:
    values = torch.randn(sum(lengths), dim)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.long)
    save_file({"values": values, "offsets": offsets}, str(path))
    return values


def test_reads_each_entry_by_content_and_view(tmp_path: Path) -> None:
    lengths = [1, 3, 2, 1, 4, 2]  # 3 contents x 2 views
    values = _write(tmp_path / "c.safetensors", lengths)
    cache = CachedFeatures(tmp_path / "c.safetensors", views=2)
    assert len(cache) == 3
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for c in range(3):
        for v in range(2):
            e = c * 2 + v
            assert torch.equal(cache(c, v), values[starts[e] : starts[e + 1]].T)
    clone = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker gets
    assert clone._values is None and torch.equal(clone(2, 1), cache(2, 1))
    with pytest.raises(IndexError, match="view 2 of 2"):
        cache(0, 2)


def test_rejects_a_file_that_is_not_a_cache(tmp_path: Path) -> None:
    _write(tmp_path / "odd.safetensors", [1, 1, 1])
    with pytest.raises(DataError, match=r"odd\.safetensors: 3 entries is not a multiple of 2 views"):
        CachedFeatures(tmp_path / "odd.safetensors", views=2)
    half = {"values": torch.zeros(2, 2, dtype=torch.float16), "offsets": torch.tensor([0, 1, 2])}
    save_file(half, str(tmp_path / "h.safetensors"))
    with pytest.raises(DataError, match=r"h\.safetensors: 'values' must be a float32 matrix, got F16"):
        CachedFeatures(tmp_path / "h.safetensors")
