"""``basicmotions``: smart-watch accelerometer and gyroscope series (UEA BasicMotions).

Four students performed four activities (standing, running, walking, badminton) five times
each wearing a smart watch; each series is 10 s at 10 Hz (100 steps) of a 3-axis accelerometer
(dimensions 0-2) and a 3-axis gyroscope (dimensions 3-5). 40 training and 40 test series
(Bagnall et al. 2018, "The UEA multivariate time series classification archive").

The two sensors are synchronised, so a training crop takes the same window from both. Each
sensor is standardised per channel with statistics of the TRAIN file (for both splits).

``max_offset`` breaks the synchronisation, to study unaligned pairs (docs/unaligned.md): the
gyroscope window is shifted against the accelerometer window by an integer offset drawn
uniformly in ``[-max_offset, max_offset]`` steps, afresh for every sample read when augmenting
(global torch RNG, like the crop), fixed per sample otherwise (``offset_seed``), so evaluation
is on the same unaligned pairs in every run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from modalign.core.errors import ConfigError, DataError
from modalign.core.registry import register
from modalign.core.types import ModalitySpec, Sample
from modalign.data.base import MultimodalDataset, check_split
from modalign.data.locate import dataset_root
from modalign.data.transforms.series import SeriesTransform, draw_offsets, offset_crop_windows, paired_crop_window

NAME = "basicmotions"
HINT = f"obtain them with: modalign datasets fetch {NAME} --root DIR"
FILES = {"train": "basicmotions/BasicMotions_TRAIN.ts", "test": "basicmotions/BasicMotions_TEST.ts"}
#: Modality name -> dimensions of the .ts file.
SENSORS = {"accel": slice(0, 3), "gyro": slice(3, 6)}
N_DIMS = 6


def _parse_case(line: str, n_dims: int, classes: list[str], where: str) -> tuple[np.ndarray, int]:
    """One data line: ``n_dims`` comma-separated dimensions, ``:``-separated, then the label."""
    fields = line.split(":")
    if len(fields) != n_dims + 1:
        raise DataError(f"{where}: expected {n_dims} dimensions and a label separated by ':', got {len(fields)} fields")
    label = fields[-1].strip()
    if label not in classes:
        raise DataError(f"{where}: class {label!r} is not one of @classLabel {classes}")
    try:
        dims = [np.array([float(v) for v in f.split(",")], dtype=np.float32) for f in fields[:-1]]
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if len({len(d) for d in dims}) != 1:
        raise DataError(f"{where}: dimensions have different lengths {[len(d) for d in dims]}")
    return np.stack(dims), classes.index(label)


def read_ts(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Parse an equal-length multivariate ``.ts`` file (sktime/aeon format).

    Header lines start with ``@`` (``@classLabel true A B ...`` gives the class order) or ``#``
    (comments); after ``@data`` each line is a case.

    Returns:
        ``(series float32 [N, C, T], labels int64 [N], class names)``.

    Raises:
        DataError: Naming the file and line if the format is broken.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read {str(path)!r}: {e}") from None
    classes: list[str] = []
    n_dims = 1
    cases: list[tuple[np.ndarray, int]] = []
    in_data = False
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data and line.startswith("@"):
            key, args = line.split()[0].lower(), line.split()[1:]
            if key == "@classlabel" and args and args[0].lower() == "true":
                classes = args[1:]
            elif key == "@dimensions":
                if not args or not args[0].isdigit():
                    raise DataError(f"{path}:{number}: '@dimensions' needs a positive integer")
                n_dims = int(args[0])
            in_data = key == "@data"
            continue
        if not in_data or not classes:
            raise DataError(f"{path}:{number}: data before '@data' or without '@classLabel true ...'")
        cases.append(_parse_case(line, n_dims, classes, f"{path}:{number}"))
    if not cases or len({c[0].shape for c in cases}) != 1:
        raise DataError(
            f"{path}: expected equal-length cases after @data, got shapes {sorted({c[0].shape for c in cases})}"
        )
    return np.stack([c[0] for c in cases]), np.array([c[1] for c in cases], dtype=np.int64), classes


@register("dataset", NAME)
class BasicMotions(MultimodalDataset):
    """Accelerometer (``accel``) and gyroscope (``gyro``) series, 3 channels each.

    Args:
        root: Data root, only read (``None``: the per-user data cache, downloaded into on first use;
            see ``modalign.data.locate``).
        split: ``"train"`` (40 series) or ``"test"`` (40 series).
        seed: Unused (no seeded state); augmentation draws from the torch RNG.
        augment: Random crop window (shared by both sensors unless ``max_offset``) plus
            jitter/scale (``None``: on for ``train``); otherwise the centred window.
        artifacts: Unused (the statistics always come from the train file).
        crop: Window length in steps; a value >= the series length (100) keeps whole series.
        jitter: Standard deviation of additive Gaussian noise when augmenting.
        scale: Standard deviation of a per-channel gain around 1 when augmenting.
        max_offset: Largest temporal offset, in steps, of the gyroscope window against the
            accelerometer window (0: synchronised, the default); at most ``100 - crop``.
        offset_seed: Seed of the fixed per-sample offsets used without augmentation (the
            ``offsets`` attribute); independent of ``seed`` so every run sees the same pairs.

    Labels (evaluation only): ``activity`` (index in the header's ``@classLabel`` order).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        seed: int = 0,
        augment: bool | None = None,
        artifacts: dict[str, str] | None = None,
        crop: int = 80,
        jitter: float = 0.0,
        scale: float = 0.0,
        max_offset: int = 0,
        offset_seed: int = 0,
    ) -> None:
        check_split(NAME, split)
        if crop < 1:
            raise ConfigError("crop", f"must be a positive number of steps, got {crop}")
        base = dataset_root(NAME, root, list(FILES.values()), hint=HINT)
        self.split = split
        self.seed = seed
        self.augment = split == "train" if augment is None else augment
        train, train_labels, self.class_names = read_ts(base / FILES["train"])
        data, self._labels = train, train_labels
        if split == "test":
            data, self._labels, classes = read_ts(base / FILES["test"])
            if classes != self.class_names:
                raise DataError(
                    f"{base / FILES['test']}: classes {classes} differ from the train file's {self.class_names}"
                )
        if train.shape[1] != N_DIMS or data.shape[1:] != train.shape[1:]:
            raise DataError(
                f"{NAME}: expected series of {N_DIMS} dimensions and equal length in both files, "
                f"got {train.shape[1:]} (train) and {data.shape[1:]} ({split})"
            )
        self._data = data
        self.length = int(data.shape[2])
        self.crop = min(crop, self.length)
        self.max_offset = _check_max_offset(max_offset, self.length - self.crop)
        #: ``LongTensor[N]`` gyroscope offset of each sample when not augmenting.
        self.offsets = draw_offsets(max_offset, len(data), torch.Generator().manual_seed(offset_seed))
        self.transforms = {
            name: SeriesTransform(
                *SeriesTransform.fit(list(train[:, dims])),
                crop=self.crop,
                augment=self.augment,
                jitter=jitter,
                scale=scale,
            )
            for name, dims in SENSORS.items()
        }

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        """``accel`` and ``gyro``: ``series`` with 3 channels and ``min(crop, 100)`` steps."""
        return {name: ModalitySpec("series", channels=3, length=self.crop) for name in sorted(SENSORS)}

    @property
    def label_names(self) -> tuple[str, ...]:
        """``("activity",)``."""
        return ("activity",)

    def __len__(self) -> int:
        return int(self._data.shape[0])

    def windows(self, index: int) -> dict[str, tuple[int, int]]:
        """``{sensor: (start, stop)}`` crop window of each sensor for one read of sample ``index``.

        Synchronised (``paired_crop_window``) when ``max_offset == 0``; otherwise ``gyro`` is
        ``accel`` shifted by a fresh random offset when augmenting, by ``offsets[index]`` if not
        (``offset_crop_windows``).
        """
        if self.max_offset == 0:
            window = paired_crop_window(self.length, self.crop, self.augment)
            return {name: window for name in SENSORS}
        offset = int(draw_offsets(self.max_offset).item()) if self.augment else int(self.offsets[index].item())
        accel, gyro = offset_crop_windows(self.length, self.crop, offset, self.augment)
        return {"accel": accel, "gyro": gyro}

    def __getitem__(self, index: int) -> Sample:
        windows = self.windows(index)
        values = {name: tf(self._data[index, SENSORS[name]], windows[name]) for name, tf in self.transforms.items()}
        return Sample(id=int(index), values=values, labels={"activity": int(self._labels[index])})


def _check_max_offset(max_offset: int, excess: int) -> int:
    """``max_offset`` if both windows fit in the series (``0 <= max_offset <= length - crop``).

    Raises:
        ConfigError: Naming ``max_offset`` otherwise.
    """
    if max_offset < 0:
        raise ConfigError("max_offset", f"must be >= 0 steps, got {max_offset}")
    if max_offset > excess:
        raise ConfigError(
            "max_offset",
            f"must be <= length - crop = {excess} steps so both windows fit in the series, got {max_offset} "
            "(lower it or the crop)",
        )
    return max_offset
