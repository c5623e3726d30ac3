"""Dataset base class and data-root resolution.

A dataset yields ``Sample``s whose values are already transformed tensors:

* image  ``FloatTensor[C, H, W]``
* audio  ``FloatTensor[n_mels, T]`` (log-mel; ``T`` may vary per sample; collation pads)
* text   ``LongTensor[T]`` token ids (``T`` may vary; pad id 0)
* series ``FloatTensor[C, T]`` (``T`` may vary)
* vector ``FloatTensor[D]``
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from modalign.core.errors import ConfigError, MissingDataRootError
from modalign.core.types import ModalitySpec, Sample
from modalign.data.preview import Preview, sample_previews

if TYPE_CHECKING:
    from modalign.data.raw import RawValue

DATA_ENV = "MODALIGN_DATA"


class MultimodalDataset(Dataset[Sample], ABC):
    """A map-style dataset of multimodal ``Sample``s.

    Subclasses set ``self.split`` and implement ``__len__``, ``__getitem__`` and ``modalities``.
    """

    split: str = "train"

    @property
    @abstractmethod
    def modalities(self) -> dict[str, ModalitySpec]:
        """``{modality name: ModalitySpec}`` of the transformed tensors, sorted by name."""

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of the evaluation-only labels each sample carries."""
        return ()

    @abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abstractmethod
    def __getitem__(self, index: int) -> Sample:
        """Return the transformed sample at ``index``."""

    def item(self, index: int, skip: frozenset[str] = frozenset()) -> Sample:
        """The sample at ``index`` without computing the values of the modalities in ``skip``.

        ``InputView`` calls it for the modalities whose values it replaces (cached features of a
        frozen tower), so their transforms are not run for nothing. A skipped modality that the
        sample has is kept as ``values[m] = None`` (presence is preserved); the caller must
        replace it. Default: ``self[index]`` (computes everything); datasets whose transforms
        cost something override it.
        """
        return self[index]

    def set_epoch(self, epoch: int) -> None:
        """Re-seed per-epoch randomness (re-pairing, augmentation). Default: nothing."""

    def previews(self, index: int) -> dict[str, Preview]:
        """Viewable forms of sample ``index``'s values (pixels, waveform, text), for reports.

        Default: built from the transformed sample (``data.preview.sample_previews``); datasets
        that keep the source (waveforms, raw text) override it to return that.
        """
        return sample_previews(self, index)

    def artifacts(self) -> dict[str, str]:
        """Fitted state a run must keep to rebuild this dataset's transforms.

        Returns ``{file name: text content}`` (e.g. ``{"tokenizer.json": ...}``) written into
        the run directory; the dataset's constructor accepts them back. Default: none.
        """
        return {}

    def raw_count(self, modality: str) -> int:
        """Number of distinct raw contents of ``modality`` (see ``modalign.data.raw``).

        Raises:
            NotImplementedError: If the dataset gives no raw inputs (pretrained encoders need them).
        """
        raise NotImplementedError(self._no_raw(modality))

    def raw_value(self, content: int, modality: str) -> RawValue:
        """The raw value of content ``content`` of ``modality``: text, ``uint8 [H, W, 3]`` pixels or a ``Waveform``.

        Raises:
            NotImplementedError: If the dataset gives no raw inputs.
        """
        raise NotImplementedError(self._no_raw(modality))

    def raw_view_count(self, modality: str) -> int:
        """Views of each raw content of ``modality`` (default ``1``: the raw value only).

        A dataset that augments its raw inputs offers a fixed number ``V`` of deterministic
        views per content (view ``0`` is ``raw_value`` itself), so a feature cache can hold
        them all; ``InputView`` draws one per sample and epoch. Views are an augmentation:
        datasets give ``V > 1`` only while augmenting (the training split).
        """
        return 1

    def raw_view(self, content: int, modality: str, view: int) -> RawValue:
        """View ``view`` of content ``content`` (``0``: ``raw_value``; see ``raw_view_count``).

        Raises:
            IndexError: If ``view`` is not below ``raw_view_count(modality)``.
        """
        if view != 0:
            raise IndexError(f"{type(self).__name__}: {modality!r} has 1 raw view, asked for view {view}")
        return self.raw_value(content, modality)

    def raw_index(self, index: int, modality: str) -> int:
        """The content of sample ``index``'s ``modality`` value (default: ``index``)."""
        return index

    def _no_raw(self, modality: str) -> str:
        return (
            f"dataset {type(self).__name__} gives no raw {modality!r} inputs, which pretrained encoders read; "
            "datasets with raw inputs: emoji, av-digits, manifest (text, image and audio columns)"
        )


class DatasetView(MultimodalDataset):
    """A dataset over another one (``self.dataset``) with the same contents.

    Forwards labels, epoch re-seeding, previews, fitted artifacts and the raw-value interface to
    the wrapped dataset, index for index; subclasses give ``modalities``, ``__len__`` and
    ``__getitem__`` and override what their own indexing changes (``InputView``,
    ``PairingView``).
    """

    def __init__(self, dataset: MultimodalDataset) -> None:
        self.dataset = dataset
        self.split = dataset.split

    @property
    def label_names(self) -> tuple[str, ...]:
        """The dataset's label names."""
        return self.dataset.label_names

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the dataset (re-pairing changes which content a sample holds)."""
        self.dataset.set_epoch(epoch)

    def previews(self, index: int) -> dict[str, Preview]:
        """The dataset's previews (made from its own source)."""
        return self.dataset.previews(index)

    def artifacts(self) -> dict[str, str]:
        """The dataset's fitted state."""
        return self.dataset.artifacts()

    def raw_count(self, modality: str) -> int:
        """Forwarded to the dataset (contents are the dataset's)."""
        return self.dataset.raw_count(modality)

    def raw_value(self, content: int, modality: str) -> RawValue:
        """Forwarded to the dataset."""
        return self.dataset.raw_value(content, modality)

    def raw_index(self, index: int, modality: str) -> int:
        """Forwarded to the dataset."""
        return self.dataset.raw_index(index, modality)

    def raw_view_count(self, modality: str) -> int:
        """Forwarded to the dataset."""
        return self.dataset.raw_view_count(modality)

    def raw_view(self, content: int, modality: str, view: int) -> RawValue:
        """Forwarded to the dataset."""
        return self.dataset.raw_view(content, modality, view)


SPLITS = ("train", "test")


def check_split(dataset: str, split: str) -> None:
    """Raise ``ConfigError`` naming the allowed splits unless ``split`` is train or test."""
    if split not in SPLITS:
        raise ConfigError("split", f"unknown split {split!r} of dataset {dataset!r}", list(SPLITS))


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Return the data root: ``root`` if given, else ``$MODALIGN_DATA``.

    Raises:
        MissingDataRootError: If neither is set or the folder does not exist.
    """
    chosen = root if root is not None else os.environ.get(DATA_ENV)
    if not chosen:
        raise MissingDataRootError(
            f"no data root: pass --data-root DIR (or data.root=DIR) or set {DATA_ENV}=DIR; "
            "`modalign datasets` lists the built-in datasets and the files each expects"
        )
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise MissingDataRootError(f"data root {str(path)!r} does not exist or is not a folder")
    return path


def require_files(dataset: str, root: Path, expected: list[str], hint: str) -> None:
    """Fail with the full list of expected files if any is missing under ``root``.

    Args:
        dataset: Dataset name for the message.
        root: Data root.
        expected: Paths relative to ``root`` (files or folders).
        hint: How to obtain them (e.g. the ``modalign datasets fetch`` command).

    Raises:
        MissingDataRootError: Naming every missing path and the hint.
    """
    missing = [p for p in expected if not (root / p).exists()]
    if missing:
        lines = "\n".join(f"  {root / p}{'  (missing)' if p in missing else ''}" for p in expected)
        raise MissingDataRootError(
            f"dataset {dataset!r}: {len(missing)} expected path(s) missing under {root}:\n{lines}\n{hint}"
        )
