"""On-disk cache of frozen pretrained towers' outputs, and the dataset inputs of pretrained encoders.

A frozen tower gives the same output for the same input, so stitching computes it once: for
each distinct raw content of a split (``MultimodalDataset.raw_count``) the pooled vector and
the tokens are stored in one safetensors file,

* ``values``: ``float32 [R, D]``, content ``c`` in rows ``offsets[c] : offsets[c + 1]``: first
  the pooled vector, then its ``T_c`` tokens;
* ``offsets``: ``int64 [N + 1]``;

named by a key that hashes the encoder's name, the SHA-256 of its weight files, its
preprocessing config (``PretrainedEncoder.preprocess_config`` and ``tokens``) and the SHA-256
of every raw content, so a change of any of them builds a new file. Values reach the model as
``[D, 1 + T]`` per sample (column 0 pooled), which the collator pads like any sequence, and
``PretrainedEncoder`` with ``cache=True`` unpacks them into the ``EncoderOutput`` the live
encoder returns. The folder is ``$MODALIGN_FEATURE_CACHE``, else the per-user cache folder
(``platformdirs.user_cache_dir("modalign")/features``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

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


def data_hash(dataset: MultimodalDataset, modality: str) -> str:
    """SHA-256 over every raw content of ``modality`` in content order."""
    h = hashlib.sha256()
    for c in range(dataset.raw_count(modality)):
        h.update(hashlib.sha256(_raw_bytes(dataset.raw_value(c, modality))).digest())
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
    """Memory-mapped cache file: ``self(c)`` is content ``c``'s ``[D, 1 + T]`` features."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with safe_open(str(path), framework="pt") as f:
            self.offsets = f.get_tensor("offsets").tolist()
        self._file: Any = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __call__(self, content: int) -> Tensor:
        """``[D, 1 + T]`` features of ``content``."""
        if self._file is None:  # opened lazily, so the object pickles into DataLoader workers
            self._file = safe_open(str(self.path), framework="pt")
        rows: Tensor = self._file.get_slice("values")[self.offsets[content] : self.offsets[content + 1]]
        return rows.T.contiguous()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}


def cached_features(
    dataset: MultimodalDataset, modality: str, encoder: PretrainedEncoder, folder: Path | None = None
) -> CachedFeatures:
    """The cache file of ``modality``'s contents under ``encoder``, built (and timed) if missing."""
    folder = folder or cache_dir()
    path = folder / encoder.registered / f"{cache_key(encoder, data_hash(dataset, modality))}.safetensors"
    if not path.is_file():
        start = time.perf_counter()
        raws = [dataset.raw_value(c, modality) for c in range(dataset.raw_count(modality))]
        values, offsets = extract_features(encoder, raws)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"values": values.contiguous(), "offsets": offsets}, str(tmp), metadata=encoder.reference())
        os.replace(tmp, path)
        BUILD_SECONDS[path.name] = time.perf_counter() - start
        logger.info("feature cache %s: %d contents in %.1f s", path, len(raws), BUILD_SECONDS[path.name])
    return CachedFeatures(path)


def encoder_input(
    dataset: MultimodalDataset, modality: str, encoder: PretrainedEncoder, folder: Path | None = None
) -> ModalityInput:
    """What an ``InputView`` gives ``encoder``: cached features (``encoder.cache``) or its preprocessed input.

    With ``cache=True``, ``encoder`` may be a live instance used to build the cache.
    """
    if encoder.cache:
        raise ValueError("encoder_input: pass a live encoder (cache=False) to build the cache from")
    return ModalityInput(encoder.input_spec(), _Preprocessed(dataset, modality, encoder))


def cached_input(
    dataset: MultimodalDataset, modality: str, live: PretrainedEncoder, folder: Path | None = None
) -> ModalityInput:
    """A ``ModalityInput`` reading the cache of ``modality`` built with the live encoder ``live``."""
    return ModalityInput(live.cache_spec(), cached_features(dataset, modality, live, folder))


class _Preprocessed:
    """``content -> encoder.preprocess(raw value)`` (picklable)."""

    def __init__(self, dataset: MultimodalDataset, modality: str, encoder: PretrainedEncoder) -> None:
        self.dataset, self.modality, self.encoder = dataset, modality, encoder

    def __call__(self, content: int) -> Tensor:
        return self.encoder.preprocess(self.dataset.raw_value(content, self.modality))
