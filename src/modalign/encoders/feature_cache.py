"""On-disk cache of frozen pretrained towers' outputs, and the dataset inputs of pretrained encoders.

A frozen tower gives the same output for the same input, so stitching computes it once: for
each distinct raw content of a split (``MultimodalDataset.raw_count``) and each of its views
(``raw_view_count``, ``1`` unless the dataset augments its raw inputs) the pooled vector and the
tokens are stored in one safetensors file,

* ``values``: ``float32 [R, D]``; entry ``e = c * V + v`` (content ``c``, view ``v``) in rows
  ``offsets[e] : offsets[e + 1]``: first the pooled vector, then its ``T_e`` tokens;
* ``offsets``: ``int64 [N * V + 1]``;

named by a key that hashes the encoder's name, the SHA-256 of its weight files, its
preprocessing config (``PretrainedEncoder.preprocess_config`` and ``tokens``) and the SHA-256
of every raw view, so a change of any of them builds a new file. Values reach the model as
``[D, 1 + T]`` per sample (column 0 pooled), which the collator pads like any sequence, and
``PretrainedEncoder`` with ``cache=True`` unpacks them into the ``EncoderOutput`` the live
encoder returns. The file is read through a read-only memory map (a slice per sample, no
decoding; DataLoader workers share the pages). The folder is ``$MODALIGN_FEATURE_CACHE``, else
the per-user cache folder (``platformdirs.user_cache_dir("modalign")/features``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from modalign.core.errors import DataError
from modalign.core.types import Sample
from modalign.data.base import MultimodalDataset
from modalign.data.collate import collate
from modalign.data.raw import ModalityInput, RawValue, Waveform
from modalign.encoders.pretrained import PretrainedEncoder

logger = logging.getLogger(__name__)

CACHE_ENV = "MODALIGN_FEATURE_CACHE"
FORMAT = 1
#: Seconds spent building cache files in this process, by file name (reported by benchmarks).
BUILD_SECONDS: dict[str, float] = {}


def cache_dir() -> Path:
    """``$MODALIGN_FEATURE_CACHE`` if set, else the per-user cache folder's ``features``."""
    chosen = os.environ.get(CACHE_ENV)
    return Path(chosen) if chosen else Path(platformdirs.user_cache_dir("modalign")) / "features"


def _raw_bytes(raw: RawValue) -> bytes:
    if isinstance(raw, str):
        return b"t" + raw.encode("utf-8")
    if isinstance(raw, Waveform):
        return b"a%d:" % raw.sample_rate + np.ascontiguousarray(raw.samples, dtype=np.float32).tobytes()
    return b"i%s:" % str(raw.shape).encode() + np.ascontiguousarray(raw).tobytes()


def raw_views(dataset: MultimodalDataset, modality: str) -> list[RawValue]:
    """Every raw view of ``modality``, entry ``c * V + v`` = view ``v`` of content ``c``."""
    views = dataset.raw_view_count(modality)
    if views == 1:
        return [dataset.raw_value(c, modality) for c in range(dataset.raw_count(modality))]
    return [dataset.raw_view(c, modality, v) for c in range(dataset.raw_count(modality)) for v in range(views)]


def data_hash(dataset: MultimodalDataset, modality: str) -> str:
    """SHA-256 over every raw view of ``modality`` in entry order (and the view count)."""
    h = hashlib.sha256()
    views = dataset.raw_view_count(modality)
    if views > 1:
        h.update(b"views:%d" % views)
    for raw in raw_views(dataset, modality):
        h.update(hashlib.sha256(_raw_bytes(raw)).digest())
    return h.hexdigest()


def cache_key(encoder: PretrainedEncoder, data: str) -> str:
    """Hash of encoder name, weights, preprocessing config, ``tokens`` and the data hash."""
    record = {
        "format": FORMAT,
        **encoder.reference(),
        "preprocess": encoder.preprocess_config(),
        "tokens": encoder.keep_tokens,
        "data": data,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


@torch.no_grad()
def extract_features(encoder: PretrainedEncoder, raws: list[RawValue], batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Run the live backbone over ``raws``; returns ``(values [R, D], offsets [N + 1])`` (see module doc)."""
    encoder.eval()
    spec = encoder.input_spec()
    rows: list[Tensor] = []
    lengths: list[int] = []
    for start in range(0, len(raws), batch_size):
        chunk = [encoder.preprocess(r) for r in raws[start : start + batch_size]]
        batch = collate([Sample(i, {"x": v}) for i, v in enumerate(chunk)], {"x": spec})
        out = encoder.backbone_output(batch.data["x"], batch.padding.get("x"))
        for i in range(len(chunk)):
            tokens = out.tokens[i] if out.padding is None else out.tokens[i][~out.padding[i]]
            rows.append(torch.cat([out.pooled[i : i + 1], tokens]).float())
            lengths.append(1 + tokens.shape[0])
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.long)
    return torch.cat(rows), offsets


class CachedFeatures:
    """Memory-mapped cache file: ``self(c, v)`` is view ``v`` of content ``c`` as ``[D, 1 + T]`` features.

    Args:
        path: The safetensors file (see the module doc).
        views: Views per content ``V`` the file was built with.

    Raises:
        DataError: If the file is not a cache of ``float32`` values with ``N * V + 1`` offsets.
    """

    def __init__(self, path: Path, views: int = 1) -> None:
        self.path = path
        self.views = views
        with safe_open(str(path), framework="pt") as f:
            self.offsets: list[int] = f.get_tensor("offsets").tolist()
        self._layout = _values_layout(path)
        if (len(self.offsets) - 1) % views:
            raise DataError(f"{path}: {len(self.offsets) - 1} entries is not a multiple of {views} views")
        self._values: np.ndarray | None = None

    def __len__(self) -> int:
        """Number of contents ``N``."""
        return (len(self.offsets) - 1) // self.views

    def __call__(self, content: int, view: int = 0) -> Tensor:
        """``[D, 1 + T]`` features of view ``view`` of ``content``."""
        if self._values is None:  # mapped lazily, so the object pickles into DataLoader workers
            offset, shape = self._layout
            self._values = np.memmap(self.path, dtype=np.float32, mode="r", offset=offset, shape=shape)
        if not 0 <= view < self.views:
            raise IndexError(f"{self.path.name}: view {view} of {self.views}")
        entry = content * self.views + view
        rows = np.array(self._values[self.offsets[entry] : self.offsets[entry + 1]])
        return torch.from_numpy(rows).T.contiguous()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_values": None}


def _values_layout(path: Path) -> tuple[int, tuple[int, int]]:
    """Byte offset and shape of the ``values`` tensor in safetensors file ``path``."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    entry = header.get("values", {})
    if entry.get("dtype") != "F32" or len(entry.get("shape", ())) != 2:
        raise DataError(f"{path}: 'values' must be a float32 matrix, got {entry.get('dtype')} {entry.get('shape')}")
    start, _ = entry["data_offsets"]
    return 8 + length + start, (int(entry["shape"][0]), int(entry["shape"][1]))


def cached_features(
    dataset: MultimodalDataset, modality: str, encoder: PretrainedEncoder, folder: Path | None = None
) -> CachedFeatures:
    """The cache file of ``modality``'s contents under ``encoder``, built (and timed) if missing."""
    folder = folder or cache_dir()
    path = folder / encoder.registered / f"{cache_key(encoder, data_hash(dataset, modality))}.safetensors"
    views = dataset.raw_view_count(modality)
    if not path.is_file():
        start = time.perf_counter()
        raws = raw_views(dataset, modality)
        values, offsets = extract_features(encoder, raws)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"values": values.contiguous(), "offsets": offsets}, str(tmp), metadata=encoder.reference())
        os.replace(tmp, path)
        BUILD_SECONDS[path.name] = time.perf_counter() - start
        logger.info("feature cache %s: %d entries in %.1f s", path, len(raws), BUILD_SECONDS[path.name])
    return CachedFeatures(path, views)


def encoder_input(
    dataset: MultimodalDataset, modality: str, encoder: PretrainedEncoder, folder: Path | None = None
) -> ModalityInput:
    """What an ``InputView`` gives ``encoder``: cached features (``encoder.cache``) or its preprocessed input.

    With ``cache=True``, ``encoder`` may be a live instance used to build the cache.
    """
    if encoder.cache:
        raise ValueError("encoder_input: pass a live encoder (cache=False) to build the cache from")
    return ModalityInput(
        encoder.input_spec(), _Preprocessed(dataset, modality, encoder), dataset.raw_view_count(modality)
    )


def cached_input(
    dataset: MultimodalDataset, modality: str, live: PretrainedEncoder, folder: Path | None = None
) -> ModalityInput:
    """A ``ModalityInput`` reading the cache of ``modality`` built with the live encoder ``live``."""
    features = cached_features(dataset, modality, live, folder)
    return ModalityInput(live.cache_spec(), features, features.views)


class _Preprocessed:
    """``(content, view) -> encoder.preprocess(raw view)`` (picklable)."""

    def __init__(self, dataset: MultimodalDataset, modality: str, encoder: PretrainedEncoder) -> None:
        self.dataset, self.modality, self.encoder = dataset, modality, encoder

    def __call__(self, content: int, view: int = 0) -> Tensor:
        return self.encoder.preprocess(self.dataset.raw_view(content, self.modality, view))
