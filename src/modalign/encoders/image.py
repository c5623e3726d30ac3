"""Image encoders: a small VGG-style CNN and a Vision Transformer.

Both read ``FloatTensor[B, C, H, W]`` and ignore ``padding`` (images are never padded).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Encoder
from modalign.core.registry import register
from modalign.core.types import EncoderOutput, ModalitySpec
from modalign.nn.layers import PatchEmbed2d, Transformer, check_tokens, conv_bn_relu, masked_mean


def _check_image(x: Tensor, channels: int, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} expects images [B, {channels}, H, W], got shape {tuple(x.shape)}")


@register("encoder", "image_cnn")
class ImageCNN(Encoder):
    """VGG-style CNN (Simonyan & Zisserman 2015).

    Stages of two conv-BN-ReLU layers with 2x2 max-pooling between stages.
    Input ``FloatTensor[B, C, H, W]`` (28x28 MNIST up to ~64 px). ``tokens`` are the cells of
    the last feature map after a 1x1 conv to ``dim``: ``[B, H'W', dim]`` with
    ``H' = ceil(H / 2^(len(widths)-1))``; ``pooled`` is the mean over tokens followed by a
    linear layer: ``[B, dim]``; ``padding`` is ``None``.

    Args:
        in_channels: Image channels (from the modality spec).
        widths: Channels of each stage.
        dim: Output width ``D``.
        stem_stride: If > 1, a strided 3x3 conv-BN-ReLU stem first reduces the resolution by this
            factor (cheap larger inputs: 64 px with stride 2 costs about what 32 px does).
    """

    kind = "image"

    def __init__(
        self, in_channels: int, widths: tuple[int, ...] = (32, 64, 128), dim: int = 128, stem_stride: int = 1
    ) -> None:
        super().__init__()
        if not widths:
            raise ConfigError("widths", "image_cnn needs at least one stage")
        if stem_stride < 1:
            raise ConfigError("stem_stride", f"must be >= 1, got {stem_stride}")
        self.in_channels = in_channels
        self.dim = dim
        stages: list[nn.Module] = []
        c = in_channels
        if stem_stride > 1:
            stem = nn.Conv2d(c, widths[0], 3, stride=stem_stride, padding=1, bias=False)
            stages += [stem, nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
            c = widths[0]
        for i, w in enumerate(widths):
            if i > 0:
                stages.append(nn.MaxPool2d(2, ceil_mode=True))
            stages += [conv_bn_relu(c, w), conv_bn_relu(w, w)]
            c = w
        self.features = nn.Sequential(*stages)
        self.to_tokens = nn.Conv2d(c, dim, kernel_size=1)
        self.pool_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode ``FloatTensor[B, C, H, W]`` (``padding`` is ignored)."""
        _check_image(x, self.in_channels, "image_cnn")
        tokens = self.to_tokens(self.features(x)).flatten(2).transpose(1, 2)
        return EncoderOutput(tokens=tokens, pooled=self.pool_proj(tokens.mean(dim=1)), padding=None)


@register("encoder", "image_vit")
class ImageViT(Encoder):
    """Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

    Input ``FloatTensor[B, C, S, S]`` with ``S = image_size``. Non-overlapping ``patch x patch``
    patches are embedded, a learned [CLS] token and learned positions are added, and pre-norm
    transformer blocks follow. ``tokens`` are the patch tokens ``[B, (S/patch)^2, dim]``;
    ``pooled`` is the final [CLS] token ``[B, dim]`` (``pool="cls"``) or the mean of the final
    patch tokens over the valid ones (``pool="mean"``, global average pooling, which MAE and
    data2vec read for linear probing when the [CLS] token is not trained by the objective);
    ``padding`` is ``None``.

    Token stem (see ``Encoder``): ``stem`` embeds patches and adds their positions, ``trunk``
    prepends [CLS] to whichever patches it is given (MAE's encoder, He et al. 2022), and
    ``targets`` are the patch pixels.

    Args:
        in_channels: Image channels (from the modality spec).
        image_size: Side length ``S`` in pixels (from the modality spec's ``size``).
        patch: Patch side in pixels; must divide ``image_size``.
        dim: Width ``D``.
        depth: Number of transformer blocks.
        heads: Attention heads (must divide ``dim``).
        mlp_ratio: Hidden width of the block MLP relative to ``dim``.
        dropout: Dropout in attention and MLP.
        checkpoint: Activation checkpointing: ``true`` recomputes every transformer block but
            the last in the backward pass instead of keeping its activations, an integer ``k``
            the first ``k`` blocks only (``Transformer``).
        pool: ``"cls"`` or ``"mean"``, what ``pooled`` is.
        pre_norm: A LayerNorm on the token sequence ([CLS] and patches, with positions) before
            the first block, as in CLIP's ViT (Radford et al. 2021, ``ln_pre``).
    """

    kind = "image"
    token_stem = True

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        patch: int = 4,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pool: Literal["cls", "mean"] = "cls",
        checkpoint: bool | int = False,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch != 0:
            raise ConfigError("patch", f"patch={patch} must divide image_size={image_size}")
        if pool not in ("cls", "mean"):
            raise ConfigError("pool", f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        self.in_channels = in_channels
        self.image_size = image_size
        self.dim = self.stem_dim = dim
        self.patch_embed = PatchEmbed2d(in_channels, dim, patch)
        n = (image_size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, n + 1, dim))
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.norm_pre: nn.Module = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, dropout, checkpoint=checkpoint)

    @classmethod
    def spec_kwargs(cls, spec: ModalitySpec) -> dict[str, Any]:
        """``in_channels`` and ``image_size`` from the spec.

        Raises:
            ConfigError: If the spec has no image ``size``.
        """
        if spec.size is None:
            raise ConfigError("size", "image_vit needs a fixed image size in the modality spec")
        return {"in_channels": spec.channels, "image_size": spec.size}

    def forward(self, x: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Encode ``FloatTensor[B, C, S, S]`` (``padding`` is ignored): ``trunk(*stem(x))``.

        Raises:
            ValueError: If the image is not ``[B, in_channels, image_size, image_size]``.
        """
        return self.trunk(*self.stem(x, padding))

    def stem(self, x: Tensor, padding: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Patch tokens ``[B, N, dim]`` (``N = (S/patch)^2``, row-major) plus their positions; padding ``None``.

        Raises:
            ValueError: If the image is not ``[B, in_channels, image_size, image_size]``.
        """
        self._check(x)
        return self.patch_embed(x) + self.pos[:, 1:], None

    def trunk(self, tokens: Tensor, padding: Tensor | None = None) -> EncoderOutput:
        """Prepend [CLS] (with its position) to any subset of patch tokens ``[B, T, dim]`` and encode.

        Args:
            tokens: Stem tokens ``[B, T, dim]`` (all ``N`` patches or a gathered subset).
            padding: ``BoolTensor[B, T]`` (rows keeping fewer patches) or ``None``.

        Returns:
            ``tokens [B, T, dim]`` (patches), ``pooled [B, dim]`` ([CLS] or the mean of the
            valid patches, after ``pool``), ``padding`` as given.

        Raises:
            ValueError: If ``tokens`` is not ``[B, T, dim]`` or ``padding`` not ``[B, T]``.
        """
        check_tokens(tokens, padding, self.dim, "image_vit")
        cls = (self.cls + self.pos[:, :1]).expand(tokens.shape[0], -1, -1)
        full = None if padding is None else torch.cat([padding.new_zeros(padding.shape[0], 1), padding], dim=1)
        h = self.transformer(self.norm_pre(torch.cat([cls, tokens], dim=1)), full)
        pooled = h[:, 0] if self.pool == "cls" else masked_mean(h[:, 1:], padding)
        return EncoderOutput(tokens=h[:, 1:], pooled=pooled, padding=padding)

    def targets(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        """Pixels of each patch, ``FloatTensor[B, N, C * patch * patch]`` in stem order.

        Each row is flattened channel-major (``C, row, column``), the layout of the patch
        embedding's weights, so ``stem(x) - pos == targets(x) @ W.T + b``.

        Raises:
            ValueError: If the image is not ``[B, in_channels, image_size, image_size]``.
        """
        self._check(x)
        b, c, p, g = x.shape[0], self.in_channels, self.patch_embed.patch, self.image_size // self.patch_embed.patch
        return x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)

    def _check(self, x: Tensor) -> None:
        _check_image(x, self.in_channels, "image_vit")
        if x.shape[-2:] != (self.image_size, self.image_size):
            size = self.image_size
            raise ValueError(f"image_vit was built for {size}x{size} images, got shape {tuple(x.shape)}")
