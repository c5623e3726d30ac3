"""Image decoding and the image transform: ``uint8`` array -> normalised ``FloatTensor[C, S, S]``.

The deterministic part (RGBA compositing on white, channel conversion, resizing) is
:meth:`ImageTransform.prepare`, so a dataset can run it once at construction and keep ``uint8``
arrays; the random part (an affine jitter of shift, rotation and scale) runs in torch with the
global torch RNG, so ``torch.manual_seed`` makes it reproducible (DataLoader workers get
distinct, seeded torch RNGs).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from modalign.core.errors import DataError

#: ITU-R BT.601 luma weights used to turn RGB into one channel.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file into a ``uint8`` array ``[H, W]`` (grey) or ``[H, W, C]``.

    Palette images are converted to RGBA (they may carry transparency); other modes keep their
    channels (L, LA, RGB, RGBA). 16-bit and float images are converted to 8-bit grey.

    Raises:
        DataError: Naming ``path`` if the file is missing or cannot be decoded.
    """
    try:
        with Image.open(path) as opened:
            im: Image.Image = opened
            if im.mode == "P":
                im = im.convert("RGBA")
            elif im.mode not in ("L", "LA", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.getbands() else "L")
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read image file {os.fspath(path)!r}: {e}") from None


def _as_uint8_hwc(img: Any) -> np.ndarray:
    """Return ``img`` as a ``uint8`` array ``[H, W, C]`` with ``C`` in ``{1, 2, 3, 4}``."""
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGBA") if img.mode == "P" else img)
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise DataError(f"image: expected a uint8 array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"image: expected shape [H, W] or [H, W, C] with C in 1..4, got {arr.shape}")
    return arr


def _composite_on_white(arr: np.ndarray) -> np.ndarray:
    """Drop an alpha channel (LA/RGBA) by compositing over white; returns ``[H, W, 1|3]``."""
    if arr.shape[2] not in (2, 4):
        return arr
    alpha = arr[:, :, -1:].astype(np.float32) / 255.0
    color = arr[:, :, :-1].astype(np.float32)
    out = color * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``[H, W, 1|3]`` to ``channels`` (grey -> repeated RGB, RGB -> BT.601 luma)."""
    if arr.shape[2] == channels:
        return arr
    if channels == 3:
        return np.repeat(arr, 3, axis=2)
    grey = arr.astype(np.float32) @ LUMA
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[:, :, None]


def rgb_pixels(img: Any) -> np.ndarray:
    """``img`` as ``uint8 [H, W, 3]`` RGB: alpha composited on white, grey repeated (raw input of pretrained encoders).

    Raises:
        DataError: If ``img`` is not a ``uint8`` ``[H, W]`` / ``[H, W, C]`` array or PIL image.
    """
    return _to_channels(_composite_on_white(_as_uint8_hwc(img)), 3)


def _per_channel(value: float | tuple[float, ...], channels: int, name: str) -> Tensor:
    values = (float(value),) * channels if isinstance(value, (int, float)) else tuple(value)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"ImageTransform: {name} has {len(values)} values for {channels} channels")
    if name == "std" and min(values) <= 0:
        raise ValueError(f"ImageTransform: std must be positive, got {values}")
    return torch.tensor(values, dtype=torch.float32).view(channels, 1, 1)


class ImageTransform:
    """Image -> ``FloatTensor[C, size, size]`` normalised as ``(x / 255 - mean) / std``.

    Args:
        size: Output side length (images are resized to ``size x size``, bilinear).
        channels: 1 (grey, BT.601 luma) or 3 (RGB).
        mean: Per-channel (or one shared) mean subtracted after scaling to ``[0, 1]``.
        std: Per-channel (or one shared) standard deviation.
        augment: Apply a random affine transform on every call.
        max_shift: Largest translation, as a fraction of the image side.
        max_rotate: Largest rotation in degrees (uniform in ``[-max_rotate, max_rotate]``).
        scale: Range of the zoom factor (``> 1`` enlarges the content).

    Out-of-image pixels created by the affine jitter repeat the border, which is the
    background for MNIST (black) and emoji composited on white.
    """

    def __init__(
        self,
        size: int,
        channels: int,
        mean: float | tuple[float, ...] = 0.5,
        std: float | tuple[float, ...] = 0.5,
        augment: bool = False,
        max_shift: float = 0.1,
        max_rotate: float = 10.0,
        scale: tuple[float, float] = (0.9, 1.1),
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"ImageTransform: channels must be 1 or 3, got {channels}")
        if size < 1:
            raise ValueError(f"ImageTransform: size must be >= 1, got {size}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"ImageTransform: scale must be 0 < low <= high, got {scale}")
        self.size = size
        self.channels = channels
        self.mean = _per_channel(mean, channels, "mean")
        self.std = _per_channel(std, channels, "std")
        self.augment = augment
        self.max_shift = max_shift
        self.max_rotate = max_rotate
        self.scale = (float(scale[0]), float(scale[1]))

    def prepare(self, img: Any) -> np.ndarray:
        """Deterministic part: ``uint8 [H, W(, C)]`` or PIL image -> ``uint8 [size, size, C]``.

        Raises:
            DataError: If ``img`` is not a ``uint8`` image array of a supported shape.
        """
        arr = _to_channels(_composite_on_white(_as_uint8_hwc(img)), self.channels)
        if arr.shape[:2] != (self.size, self.size):
            mode = "L" if self.channels == 1 else "RGB"
            im = Image.fromarray(arr[:, :, 0] if self.channels == 1 else arr, mode=mode)
            im = im.resize((self.size, self.size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8).reshape(self.size, self.size, self.channels)
        return arr

    def _random_affine(self, x: Tensor) -> Tensor:
        """Apply one random shift/rotation/zoom to ``x`` (``FloatTensor[C, S, S]``)."""
        r = torch.rand(4)
        angle = math.radians((2 * float(r[0]) - 1) * self.max_rotate)
        zoom = self.scale[0] + float(r[1]) * (self.scale[1] - self.scale[0])
        # Normalised coordinates span [-1, 1], so a shift of a fraction f of the side is 2 f.
        tx = (2 * float(r[2]) - 1) * 2 * self.max_shift
        ty = (2 * float(r[3]) - 1) * 2 * self.max_shift
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        theta = torch.tensor([[[cos, -sin, tx], [sin, cos, ty]]], dtype=x.dtype)
        grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
        return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]

    def __call__(self, img: Any) -> Tensor:
        """Transform one image (``uint8 [H, W]``, ``[H, W, C]`` or PIL) to ``FloatTensor[C, S, S]``."""
        arr = self.prepare(img)
        x = torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32)).div_(255.0)
        if self.augment:
            x = self._random_affine(x)
        return (x - self.mean) / self.std
