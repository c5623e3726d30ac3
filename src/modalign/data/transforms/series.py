"""Multichannel time series: per-channel standardisation, cropping and jitter/scale augmentation.

Augmentations follow Um et al. 2017, "Data Augmentation of Wearable Sensor Data for Parkinson's
Disease Monitoring using Convolutional Neural Networks": additive Gaussian jitter and a random
per-channel scaling. Random draws use the global torch RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from modalign.core.errors import DataError


def paired_crop_window(length: int, crop: int, augment: bool) -> tuple[int, int]:
    """Return ``(start, stop)`` of a crop window of ``crop`` steps in a series of ``length``.

    A random window when ``augment`` (global torch RNG), the centred one otherwise; the whole
    series when ``crop >= length``. A dataset applies the same window to synchronised series.

    Raises:
        ValueError: If ``length`` or ``crop`` is not positive.
    """
    if length < 1 or crop < 1:
        raise ValueError(f"paired_crop_window: length and crop must be positive, got {length}, {crop}")
    if crop >= length:
        return 0, length
    excess = length - crop
    start = int(torch.randint(0, excess + 1, ()).item()) if augment else excess // 2
    return start, start + crop


def offset_crop_windows(length: int, crop: int, offset: int, augment: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two crop windows of ``crop`` steps, the second ``offset`` steps after the first, both inside the series.

    For a pair of series whose windows are not synchronised (a temporal offset between two
    sensors): the reference window is ``(start, start + crop)`` and the shifted one
    ``(start + offset, start + offset + crop)``. ``start`` is drawn uniformly (global torch RNG)
    among the positions where both fit when ``augment``; otherwise the span of the two windows
    (``crop + |offset|`` steps) is centred, so ``offset == 0`` gives ``paired_crop_window``'s
    centred window.

    Args:
        length: Series length ``T``.
        crop: Window length, ``1 <= crop <= length``.
        offset: Shift of the second window in steps, ``|offset| <= length - crop``.
        augment: Draw ``start`` at random instead of centring.

    Returns:
        ``((start, stop), (start + offset, stop + offset))``.

    Raises:
        ValueError: If ``crop`` is not in ``[1, length]`` or ``|offset| > length - crop``.
    """
    if not 1 <= crop <= length:
        raise ValueError(f"offset_crop_windows: need 1 <= crop <= length, got crop={crop}, length={length}")
    excess = length - crop
    if abs(offset) > excess:
        raise ValueError(f"offset_crop_windows: |offset| must be <= length - crop = {excess}, got {offset}")
    low, high = max(0, -offset), min(excess, excess - offset)
    centred = (excess - abs(offset)) // 2 + low
    start = int(torch.randint(low, high + 1, ()).item()) if augment else centred
    return (start, start + crop), (start + offset, start + offset + crop)


def draw_offsets(max_offset: int, size: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """``LongTensor[size]`` of integer offsets uniform in ``[-max_offset, max_offset]``.

    Draws from ``generator``, or the global torch RNG when ``None``.

    Raises:
        ValueError: If ``max_offset < 0`` or ``size < 0``.
    """
    if max_offset < 0 or size < 0:
        raise ValueError(f"draw_offsets: need max_offset >= 0 and size >= 0, got {max_offset}, {size}")
    return torch.randint(-max_offset, max_offset + 1, (size,), generator=generator)


class SeriesTransform:
    """``[C, T]`` series -> ``FloatTensor[C, T']``: standardise, crop, augment.

    Args:
        mean: Per-channel means (from :meth:`fit` on training data), or ``None`` to skip
            standardisation.
        std: Per-channel standard deviations, or ``None`` (both or neither).
        crop: Window length ``T'``; ``None`` keeps the full series. Shorter series stay whole.
        augment: Random crop position and the jitter/scale below; otherwise a centred crop only.
        jitter: Standard deviation of additive Gaussian noise (in standardised units).
        scale: Standard deviation of a per-channel multiplicative factor around 1.
    """

    def __init__(
        self,
        mean: list[float] | None,
        std: list[float] | None,
        crop: int | None = None,
        augment: bool = False,
        jitter: float = 0.0,
        scale: float = 0.0,
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError("SeriesTransform: give both mean and std, or neither")
        if mean is not None and std is not None and len(mean) != len(std):
            raise ValueError(f"SeriesTransform: {len(mean)} means but {len(std)} stds")
        if std is not None and min(std) <= 0:
            raise ValueError(f"SeriesTransform: std must be positive, got {std}")
        if crop is not None and crop < 1:
            raise ValueError(f"SeriesTransform: crop must be positive or None, got {crop}")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)[:, None]
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)[:, None]
        self.crop = crop
        self.augment = augment
        self.jitter = jitter
        self.scale = scale

    @staticmethod
    def fit(series: Sequence[np.ndarray | Tensor], min_std: float = 1e-6) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation over every time step of every series.

        Args:
            series: Arrays ``[C, T_i]`` with the same ``C``.
            min_std: Lower bound of a returned std (constant channels).

        Returns:
            ``(mean, std)``, two lists of ``C`` floats.

        Raises:
            DataError: If ``series`` is empty or the channel counts differ.
        """
        if not series:
            raise DataError("SeriesTransform.fit: no series given")
        arrays = [np.asarray(s, dtype=np.float64) for s in series]
        channels = {a.shape[0] if a.ndim == 2 else -1 for a in arrays}
        if len(channels) != 1 or -1 in channels:
            raise DataError(
                f"SeriesTransform.fit: expected [C, T] series with one C, got shapes "
                f"{sorted({a.shape for a in arrays})[:5]}"
            )
        joined = np.concatenate(arrays, axis=1)
        mean = joined.mean(axis=1)
        std = np.maximum(joined.std(axis=1), min_std)
        return [float(m) for m in mean], [float(s) for s in std]

    def __call__(self, x: np.ndarray | Tensor, window: tuple[int, int] | None = None) -> Tensor:
        """Transform one series ``[C, T]``.

        Args:
            x: The series.
            window: ``(start, stop)`` to crop instead of drawing one (see
                :func:`paired_crop_window`); ignored when ``crop`` is ``None``.

        Returns:
            ``FloatTensor[C, T']`` with ``T' = stop - start`` (or ``min(crop, T)``).

        Raises:
            DataError: If ``x`` is not 2-D or its channel count differs from the statistics.
        """
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).float()
        if t.dim() != 2 or (self.mean is not None and t.shape[0] != self.mean.shape[0]):
            expected = "[C, T]" if self.mean is None else f"[{self.mean.shape[0]}, T]"
            raise DataError(f"SeriesTransform: expected a series {expected}, got {tuple(t.shape)}")
        if self.mean is not None and self.std is not None:
            t = (t - self.mean) / self.std
        if self.crop is not None:
            start, stop = window or paired_crop_window(t.shape[1], self.crop, self.augment)
            if not 0 <= start < stop <= t.shape[1]:
                raise DataError(f"SeriesTransform: window {(start, stop)} outside a series of {t.shape[1]}")
            t = t[:, start:stop]
        if self.augment and self.scale > 0:
            t = t * (1.0 + self.scale * torch.randn(t.shape[0], 1))
        if self.augment and self.jitter > 0:
            t = t + self.jitter * torch.randn_like(t)
        return t.contiguous()
