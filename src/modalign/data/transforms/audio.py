"""Audio decoding, the log-mel spectrogram and the audio transform.

``load_audio`` decodes and resamples once (a dataset may cache the result); ``AudioTransform``
crops, augments (time shift, gain) and turns a waveform into a log-mel spectrogram
``FloatTensor[n_mels, T]`` whose ``T`` varies with the clip length (collation pads).
"""

from __future__ import annotations

import math
import os

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly
from torch import Tensor, nn

from modalign.core.errors import DataError


def load_audio(path: str | os.PathLike[str], sample_rate: int) -> Tensor:
    """Decode an audio file, mix it down to mono and resample it.

    Args:
        path: Any file libsndfile reads (WAV, FLAC, OGG, ...).
        sample_rate: Target rate in Hz; resampling is polyphase (``scipy.signal.resample_poly``).

    Returns:
        ``FloatTensor[N]`` samples in ``[-1, 1]``.

    Raises:
        DataError: Naming ``path`` if the file is missing, unreadable or empty.
    """
    if sample_rate < 1:
        raise ValueError(f"load_audio: sample_rate must be positive, got {sample_rate}")
    try:
        data, rate = sf.read(os.fspath(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as e:
        raise DataError(f"cannot read audio file {os.fspath(path)!r}: {e}") from None
    if data.shape[0] == 0:
        raise DataError(f"audio file {os.fspath(path)!r} holds no samples")
    wave = data.mean(axis=1)
    if rate != sample_rate:
        g = math.gcd(int(rate), int(sample_rate))
        wave = resample_poly(wave, sample_rate // g, int(rate) // g).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))


def hz_to_mel(f: Tensor) -> Tensor:
    """HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: Tensor) -> Tensor:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None) -> Tensor:
    """Triangular filters on the HTK mel scale, peak 1 (no area normalisation).

    Filter ``m`` rises linearly from mel point ``m`` to ``m + 1`` and falls to ``m + 2``, the
    ``n_mels + 2`` points being equally spaced in mel between ``f_min`` and ``f_max``; it is
    evaluated at the STFT bin frequencies ``k * sample_rate / n_fft``.

    Returns:
        ``FloatTensor[n_fft // 2 + 1, n_mels]``.

    Raises:
        ValueError: If the band is empty or a filter falls between two STFT bins (all zero),
            which means ``n_mels`` is too large for ``n_fft``.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(
            f"mel_filterbank: need 0 <= f_min < f_max <= {sample_rate / 2}, got f_min={f_min}, f_max={f_max}"
        )
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(
        float(hz_to_mel(torch.tensor(f_min))),
        float(hz_to_mel(torch.tensor(f_max))),
        n_mels + 2,
        dtype=torch.float64,
    )
    pts = mel_to_hz(mels)
    lower, center, upper = pts[:-2, None], pts[1:-1, None], pts[2:, None]
    rising = (freqs[None] - lower) / (center - lower)
    falling = (upper - freqs[None]) / (upper - center)
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0).T
    empty = (fb.sum(0) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"mel_filterbank: filters {empty} cover no STFT bin; use fewer mels "
            f"(n_mels={n_mels}) or a larger n_fft (n_fft={n_fft})"
        )
    return fb.float()


class LogMel(nn.Module):
    """Waveform -> ``log(mel power + eps)``, computed in torch so it can run on a GPU.

    STFT with a periodic Hann window of ``n_fft`` samples, hop ``hop_length``, centred frames
    (zero padding of ``n_fft // 2`` on both sides, so any length works), power spectrum, HTK
    triangular mel filters (:func:`mel_filterbank`), natural log. The window and the filter bank
    are buffers, so ``.to(device)`` moves them.

    Args:
        sample_rate: Rate of the input waveform in Hz.
        n_fft: FFT size (and window length).
        hop_length: Samples between frames; ``T = 1 + N // hop_length``.
        n_mels: Number of mel bands.
        f_min: Lowest filter edge in Hz.
        f_max: Highest filter edge in Hz (default ``sample_rate / 2``).
        eps: Floor added to the mel power before the log.
    """

    window: Tensor
    fb: Tensor

    def __init__(
        self,
        sample_rate: int = 8000,
        n_fft: int = 256,
        hop_length: int = 80,
        n_mels: int = 40,
        f_min: float = 0.0,
        f_max: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if hop_length < 1 or n_fft < 2:
            raise ValueError(f"LogMel: need n_fft >= 2 and hop_length >= 1, got {n_fft}, {hop_length}")
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.eps = eps
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        self.register_buffer("fb", mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        """Frames ``T`` produced for ``num_samples`` input samples."""
        return 1 + num_samples // self.hop_length

    def forward(self, wave: Tensor) -> Tensor:
        """Compute the log-mel spectrogram.

        Args:
            wave: ``FloatTensor[N]`` or ``FloatTensor[B, N]``.

        Returns:
            ``FloatTensor[n_mels, T]`` or ``FloatTensor[B, n_mels, T]``, ``T = 1 + N // hop_length``.

        Raises:
            ValueError: If ``wave`` is not 1-D or 2-D or has no samples.
        """
        if wave.dim() not in (1, 2) or wave.shape[-1] == 0:
            raise ValueError(f"LogMel: expected a waveform [N] or [B, N] with N > 0, got {tuple(wave.shape)}")
        single = wave.dim() == 1
        x = wave[None] if single else wave
        spec = torch.stft(
            x.float(),
            self.n_fft,
            self.hop_length,
            window=self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()
        mel = torch.einsum("fm,bft->bmt", self.fb, power)
        out = torch.log(mel + self.eps)
        return out[0] if single else out


class AudioTransform:
    """Waveform ``FloatTensor[N]`` -> log-mel ``FloatTensor[n_mels, T]``, ``T <= max_frames``.

    Clips longer than ``max_seconds`` are cropped (at a random position when ``augment``,
    centred otherwise); shorter ones stay short (collation pads and builds the padding mask).
    Augmentation: a random time shift of up to ``max_shift_seconds`` (zeros enter on one side,
    samples leave on the other) and a random gain in ``[-gain_db, gain_db]`` dB. With
    ``normalize`` each spectrogram is standardised over the whole clip (mean 0, std 1), which
    cancels most of a gain change except near the ``eps`` floor.

    Random draws use the global torch RNG.
    """

    def __init__(
        self,
        sample_rate: int = 8000,
        max_seconds: float = 1.0,
        n_mels: int = 40,
        n_fft: int = 256,
        hop_length: int = 80,
        augment: bool = False,
        max_shift_seconds: float = 0.1,
        gain_db: float = 6.0,
        normalize: bool = True,
    ) -> None:
        if max_seconds <= 0:
            raise ValueError(f"AudioTransform: max_seconds must be positive, got {max_seconds}")
        self.logmel = LogMel(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)
        self.sample_rate = sample_rate
        self.max_samples = max(1, round(max_seconds * sample_rate))
        self.augment = augment
        self.max_shift = round(max_shift_seconds * sample_rate)
        self.gain_db = gain_db
        self.normalize = normalize

    @property
    def n_mels(self) -> int:
        """Number of mel bands (channels of the output)."""
        return self.logmel.n_mels

    @property
    def max_frames(self) -> int:
        """Largest number of frames ``T`` an output can have."""
        return self.logmel.num_frames(self.max_samples)

    def _crop(self, wave: Tensor) -> Tensor:
        n = wave.shape[0]
        if n <= self.max_samples:
            return wave
        excess = n - self.max_samples
        start = int(torch.randint(0, excess + 1, ()).item()) if self.augment else excess // 2
        return wave[start : start + self.max_samples]

    def _shift_and_gain(self, wave: Tensor) -> Tensor:
        if self.max_shift > 0:
            shift = int(torch.randint(-self.max_shift, self.max_shift + 1, ()).item())
            if shift > 0:
                wave = torch.cat([wave.new_zeros(shift), wave])
            elif shift < 0 and -shift < wave.shape[0]:
                wave = wave[-shift:]
        if self.gain_db > 0:
            db = (2 * float(torch.rand(())) - 1) * self.gain_db
            wave = wave * 10.0 ** (db / 20.0)
        return wave

    def features(self, wave: Tensor) -> Tensor:
        """Log-mel of an already cropped/augmented ``FloatTensor[N]`` (normalised if enabled)."""
        mel = self.logmel(wave)
        if self.normalize:
            mel = (mel - mel.mean()) / mel.std(unbiased=False).clamp_min(1e-5)
        return mel

    def __call__(self, wave: Tensor) -> Tensor:
        """Transform one waveform ``FloatTensor[N]`` into ``FloatTensor[n_mels, T]``.

        Raises:
            ValueError: If ``wave`` is not a non-empty 1-D tensor.
        """
        if wave.dim() != 1 or wave.shape[0] == 0:
            raise ValueError(f"AudioTransform: expected a mono waveform [N] with N > 0, got {tuple(wave.shape)}")
        wave = wave.float()
        if self.augment:
            wave = self._shift_and_gain(wave)
        return self.features(self._crop(wave))
