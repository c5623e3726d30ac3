"""Pairing of a training split: keep a seeded fraction of its pairs, split the rest, corrupt some.

Learning with unaligned data needs training splits in which only some samples are paired, and
some pairs are wrong. :class:`PairingView` makes one from any dataset of two or more modalities,
so every such experiment runs on the same real data, and :class:`MixedBatches` batches it with a
fixed number of pairs per batch:

* ``paired_fraction`` ``p``: the first ``round(p * N)`` samples of a seeded permutation keep
  their pairing (the *kept* samples); every other sample becomes one *unimodal* sample per
  modality it has (a ``Sample`` whose ``values`` hold that modality only, so collation gives
  ``present = False`` for the others). The kept set grows with ``p`` at a fixed seed (nested).
* ``pair_noise`` ``q``: the first ``round(q * K)`` of a seeded permutation of the ``K`` kept
  pairs (kept samples holding ``noise_modality`` and another modality) are *noisy*: each holds
  the ``noise_modality`` value of the next noisy pair in that permutation (a cyclic
  derangement), so every noisy pair is wrong and every value is still used exactly once. This
  is the noisy correspondence of web-crawled pairs (Huang et al. 2021, "Learning with Noisy
  Correspondence for Cross-modal Matching"). Noise is invisible to training: the sample keeps
  its id and labels; ``noisy_indices`` records it for measurement.

``round`` rounds halves up here (``fraction_count``). Layout of the derived samples: index
``d < K`` is the ``d``-th kept sample in dataset order (``paired_indices``), then one unimodal
sample per (split sample, modality it has), by sample and then modality name
(``unimodal_indices``). The selection depends on ``seed`` alone, never on the epoch.

Ids. ``Sample.id`` and ``Sample.modality_ids`` mean "same content" (``Batch.ids_of``:
equal content ids are never each other's negatives, and ``multi_positive`` objectives make them
positives; MCN keys its joint pseudo-labels by sample id). So:

* kept samples are the wrapped dataset's, untouched (clean) or with the donor's content id of
  ``noise_modality`` (noisy: the id names the value the row really holds, as for any value);
* a unimodal sample gets a fresh sample id, ``max(dataset ids) + 1 + k`` for the ``k``-th one,
  which no kept sample and no other unimodal sample has, and the content id of its one modality
  as the dataset gave it (``modality_ids[m]``, or the original sample id). A split image and its
  former partner therefore share no id: nothing marks them as the same content, in any
  modality, and no sample-id keyed table joins them. A unimodal value is the same content only
  as another row holding the very same value (av-digits: a recording also paired with another
  image), as in the wrapped dataset.

Labels (evaluation only) stay on every derived sample, a noisy pair's being its own.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from modalign.core.errors import ConfigError
from modalign.core.types import ModalitySpec, Sample
from modalign.data.base import DatasetView, MultimodalDataset
from modalign.data.preview import Preview

#: Recipe keys of the pairing (``data.<key>``), named by its errors.
PAIRED_FRACTION = "data.paired_fraction"
PAIR_NOISE = "data.pair_noise"
PAIRED_PER_BATCH = "data.paired_per_batch"
UNIMODAL_VIEWS = "data.unimodal_views"
_SALT = 0x9A12


def fraction_count(fraction: float, n: int) -> int:
    """``round(fraction * n)`` with halves rounded up (a fraction 0.5 of 5 items is 3)."""
    return min(n, math.floor(fraction * n + 0.5))


def check_fraction(key: str, value: float) -> float:
    """Return ``value`` as a float in ``[0, 1]``.

    Raises:
        ConfigError: At ``key`` for a non-number or a value outside ``[0, 1]`` (NaN included).
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigError(key, f"must be a number in [0, 1], got {value!r}")
    return float(value)


def check_paired_per_batch(value: int | None, batch_size: int | None = None) -> int | None:
    """Return ``paired_per_batch``: ``None`` or an integer in ``[0, batch_size]``.

    Raises:
        ConfigError: At ``data.paired_per_batch`` otherwise.
    """
    if value is None:
        return None
    too_big = batch_size is not None and isinstance(value, int) and value > batch_size
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or too_big:
        upper = "" if batch_size is None else f" and at most the batch size {batch_size}"
        raise ConfigError(PAIRED_PER_BATCH, f"must be null or an integer >= 0{upper}, got {value!r}")
    return value


def check_views(views: int, paired_per_batch: int | None, batch_size: int | None = None) -> int:
    """Return ``unimodal_views``: an integer ``>= 1``; above 1 only with mixed batches whose unimodal part it divides.

    Raises:
        ConfigError: At ``data.unimodal_views`` otherwise.
    """
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ConfigError(UNIMODAL_VIEWS, f"must be an integer >= 1, got {views!r}")
    if views > 1 and paired_per_batch is None:
        raise ConfigError(UNIMODAL_VIEWS, f"{views} views need mixed batches: set data.paired_per_batch too")
    if views > 1 and batch_size is not None and paired_per_batch is not None:
        rest = batch_size - paired_per_batch
        if rest % views:
            raise ConfigError(
                UNIMODAL_VIEWS,
                f"must divide the {rest} unimodal rows of a batch (batch size {batch_size} - {paired_per_batch} "
                f"pairs), got {views}",
            )
    return views


@contextmanager
def _rng_untouched() -> Iterator[None]:
    """Run a block without changing the Python, NumPy and torch (CPU) random states."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def scan_presence(dataset: MultimodalDataset, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Sample ids ``int64 [N]`` and presence ``bool [N, M]`` (columns: ``names``) of every sample.

    Reads ``dataset.item(i, skip=every modality)``, which computes no value where the dataset
    overrides ``item``; the global random states are left as they were.
    """
    skip = frozenset(names)
    with _rng_untouched():
        samples = [dataset.item(i, skip) for i in range(len(dataset))]
    ids = np.array([s.id for s in samples], dtype=np.int64)
    present = np.array([[m in s.values for m in names] for s in samples], dtype=bool).reshape(-1, len(names))
    return ids, present


def choose_kept(n: int, paired_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the ``round(p * n)`` kept samples: a prefix of a seeded permutation."""
    order = np.random.default_rng([seed, _SALT, 0]).permutation(n)
    return np.sort(order[: fraction_count(paired_fraction, n)])


def choose_noisy(candidates: np.ndarray, pair_noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The noisy pairs among ``candidates`` and their donors, both sorted by noisy pair.

    The first ``round(q * len(candidates))`` of a seeded permutation are noisy; each takes its
    value from the next one in that order (a cycle, so no pair is its own donor).

    Returns:
        ``(noisy int64 [Q], donors int64 [Q])``: ``noisy[k]`` holds ``donors[k]``'s value.

    Raises:
        ConfigError: At ``data.pair_noise`` if it makes exactly one noisy pair (which has no
            other noisy pair to take a value from).
    """
    n = fraction_count(pair_noise, len(candidates))
    if n == 1:
        raise ConfigError(
            PAIR_NOISE,
            f"{pair_noise} of {len(candidates)} kept pairs is a single noisy pair, which needs another noisy pair "
            f"to swap with: use 0 or at least {1.5 / len(candidates):.4g}",
        )
    cycle = np.random.default_rng([seed, _SALT, 1]).permutation(candidates)[:n]
    donors = np.roll(cycle, -1)
    order = np.argsort(cycle)
    return cycle[order], donors[order]


def derived_layout(present: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(source int64 [L], only int64 [L])`` of the derived samples.

    ``source`` is the wrapped dataset's index; ``only`` is ``-1`` for the kept samples (first, in
    dataset order), else the column of ``present`` (modality) of a unimodal sample, one per
    (split sample, present modality), by sample and then modality.
    """
    split = np.ones(len(present), dtype=bool)
    split[kept] = False
    rows, cols = np.nonzero(present & split[:, None])
    source = np.concatenate([kept, rows]).astype(np.int64)
    only = np.concatenate([np.full(len(kept), -1), cols]).astype(np.int64)
    return source, only


@dataclass(frozen=True)
class Origin:
    """Where a derived sample's values come from.

    Attributes:
        source: Index in the wrapped dataset.
        modality: The one modality of a unimodal sample; ``None`` for a kept sample.
        donor: Index (wrapped dataset) whose ``noise_modality`` value a noisy pair holds;
            ``None`` for clean and unimodal samples.
    """

    source: int
    modality: str | None = None
    donor: int | None = None


class PairingView(DatasetView):
    """A training split with a seeded fraction of its pairs kept, the rest split, some kept pairs wrong.

    See the module docstring for the selection, the layout of the derived samples and their ids.

    Args:
        dataset: The wrapped split (two or more modalities).
        paired_fraction: Fraction ``p`` of the samples that keep their pairing.
        pair_noise: Fraction ``q`` of the kept pairs whose ``noise_modality`` value is another
            noisy pair's.
        seed: Seeds both choices (``train.seed`` in a run).
        noise_modality: The modality replaced in noisy pairs; ``None``: the second in sorted order.
        paired_per_batch: Pairs per batch for :class:`MixedBatches`, kept for whoever builds
            the loader (``None``: plain shuffling); not used by the view itself.
        unimodal_views: Reads of each unimodal sample per batch for :class:`MixedBatches`
            (independently augmented views for within-modality objectives); kept like
            ``paired_per_batch``.

    Raises:
        ConfigError: At ``data.paired_fraction``/``data.pair_noise``/``data.paired_per_batch``
            for out-of-range values or a dataset of fewer than two modalities; at
            ``noise_modality`` for a modality the dataset lacks.
    """

    def __init__(
        self,
        dataset: MultimodalDataset,
        paired_fraction: float = 1.0,
        pair_noise: float = 0.0,
        seed: int = 0,
        noise_modality: str | None = None,
        paired_per_batch: int | None = None,
        unimodal_views: int = 1,
    ) -> None:
        self.paired_fraction = check_fraction(PAIRED_FRACTION, paired_fraction)
        self.pair_noise = check_fraction(PAIR_NOISE, pair_noise)
        self.paired_per_batch = check_paired_per_batch(paired_per_batch)
        self.unimodal_views = check_views(unimodal_views, self.paired_per_batch)
        self._names = tuple(sorted(dataset.modalities))
        self._check_modalities(dataset)
        self.noise_modality = self._names[1] if noise_modality is None else noise_modality
        if self.noise_modality not in self._names:
            raise ConfigError("noise_modality", "the dataset has no such modality", list(self._names))
        super().__init__(dataset)
        self.seed = seed
        ids, present = scan_presence(dataset, self._names)
        kept = choose_kept(len(dataset), self.paired_fraction, seed)
        column = self._names.index(self.noise_modality)
        pairs = present[kept, column] & (present[kept].sum(axis=1) >= 2)
        noisy, donors = choose_noisy(kept[pairs], self.pair_noise, seed)
        self._source, self._only = derived_layout(present, kept)
        self._n_kept = len(kept)
        self._donor = np.full(len(kept), -1, dtype=np.int64)
        self._donor[np.searchsorted(kept, noisy)] = donors
        self._first_id = int(ids.max()) + 1 if len(ids) else 0
        self._noisy_ids = np.sort(ids[noisy])

    def _check_modalities(self, dataset: MultimodalDataset) -> None:
        if len(self._names) >= 2:
            return
        chosen = [
            key
            for key, on in (
                (PAIRED_FRACTION, self.paired_fraction < 1.0),
                (PAIR_NOISE, self.pair_noise > 0.0),
                (PAIRED_PER_BATCH, self.paired_per_batch is not None),
            )
            if on
        ]
        raise ConfigError(
            chosen[0] if chosen else PAIRED_FRACTION,
            f"pairing needs a dataset of two or more modalities; {type(dataset).__name__} has {list(self._names)}",
        )

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        """The dataset's specs."""
        return self.dataset.modalities

    @property
    def paired_indices(self) -> Tensor:
        """``LongTensor[K]`` derived indices of the kept samples (``0 .. K-1``)."""
        return torch.arange(self._n_kept)

    @property
    def unimodal_indices(self) -> Tensor:
        """``LongTensor[L - K]`` derived indices of the unimodal samples (``K .. L-1``)."""
        return torch.arange(self._n_kept, len(self))

    @property
    def noisy_indices(self) -> Tensor:
        """``LongTensor[Q]`` derived indices of the noisy pairs, sorted."""
        return torch.from_numpy(np.flatnonzero(self._donor >= 0))

    @property
    def noisy_ids(self) -> Tensor:
        """``LongTensor[Q]`` sample ids of the noisy pairs (they keep their ids), sorted: the truth of a noise audit."""
        return torch.from_numpy(self._noisy_ids)

    def origin(self, index: int) -> Origin:
        """Where derived sample ``index`` comes from (source, its one modality, donor).

        Raises:
            IndexError: Unless ``0 <= index < len(self)``.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"PairingView: index {index} out of range for {len(self)} samples")
        source, only = int(self._source[index]), int(self._only[index])
        if only >= 0:
            return Origin(source, self._names[only])
        donor = int(self._donor[index])
        return Origin(source, None, donor if donor >= 0 else None)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Sample:
        return self.item(index)

    def item(self, index: int, skip: frozenset[str] = frozenset()) -> Sample:
        """Derived sample ``index``; the wrapped dataset computes only the values it keeps."""
        origin = self.origin(index)
        if origin.modality is not None:
            return self._unimodal(index, origin.source, origin.modality, skip)
        if origin.donor is not None:
            return self._noisy(origin.source, origin.donor, skip)
        return self.dataset.item(origin.source, skip)

    def _unimodal(self, index: int, source: int, modality: str, skip: frozenset[str]) -> Sample:
        others = frozenset(self._names) - {modality}
        s = self.dataset.item(source, skip | others)
        return Sample(
            id=self._first_id + index - self._n_kept,
            values={modality: s.values.get(modality)},
            labels=dict(s.labels),
            modality_ids={modality: s.modality_ids.get(modality, s.id)},
        )

    def _noisy(self, source: int, donor: int, skip: frozenset[str]) -> Sample:
        m = self.noise_modality
        s = self.dataset.item(source, skip | {m})
        d = self.dataset.item(donor, skip | (frozenset(self._names) - {m}))
        values = {**s.values, m: d.values.get(m)}
        return Sample(s.id, values, dict(s.labels), {**s.modality_ids, m: d.modality_ids.get(m, d.id)})

    def previews(self, index: int) -> dict[str, Preview]:
        """The source's previews, of the one modality of a unimodal sample, with a noisy pair's donor value."""
        origin = self.origin(index)
        out = self.dataset.previews(origin.source)
        if origin.modality is not None:
            return {k: v for k, v in out.items() if k == origin.modality}
        if origin.donor is not None:
            donor = self.dataset.previews(origin.donor)
            out = {**out, **{k: v for k, v in donor.items() if k == self.noise_modality}}
        return out

    def raw_index(self, index: int, modality: str) -> int:
        """The content of derived sample ``index``'s ``modality`` value (a noisy pair's donor's)."""
        origin = self.origin(index)
        source = origin.donor if origin.donor is not None and modality == self.noise_modality else origin.source
        return self.dataset.raw_index(source, modality)


class MixedBatches(Sampler[list[int]]):
    """Batches of a :class:`PairingView` with exactly ``paired_per_batch`` kept samples each.

    Each epoch the kept and the unimodal samples are shuffled separately (seeded by ``seed``
    and the epoch); batch ``b`` takes the next ``paired_per_batch`` kept samples and the next
    ``batch_size - paired_per_batch`` unimodal ones, in shuffled order within the batch. The
    unimodal pool sets the epoch: each unimodal sample is used at most once (what does not fill
    a whole batch is dropped), while the kept pairs, usually far fewer, are **cycled** through
    fresh shuffles as often as the epoch needs (each used ``q`` or ``q + 1`` times), as
    semi-supervised samplers cycle their small labelled set. Batches of pairs only
    (``paired_per_batch == batch_size``) pass over the pairs once. With ``views > 1`` the
    unimodal part of a batch holds ``(batch_size - paired_per_batch) / views`` unimodal samples,
    each index repeated ``views`` times, so the loader reads (and augments) each of them
    ``views`` times: rows with one content id for within-modality objectives
    (``unimodal_infonce``); an epoch still uses each unimodal sample once. With
    ``paired_per_batch=None`` it shuffles every derived sample together (``len(view) //
    batch_size`` batches). Pass it as a ``DataLoader``'s ``batch_sampler``; call ``set_epoch``
    before each epoch.

    Args:
        view: The pairing view to batch.
        batch_size: Samples per batch.
        paired_per_batch: Kept samples per batch, ``0 .. batch_size``; ``None``: plain shuffling.
        seed: Seed of the shuffles.
        epoch: First epoch.
        views: Reads of each unimodal sample in its batch.

    Raises:
        ConfigError: At ``data.paired_per_batch`` for a value outside ``[0, batch_size]`` or one
            that leaves no full batch; at ``train.batch_size`` for a batch size below 1 or one
            larger than the view; at ``data.unimodal_views`` as ``check_views``.
    """

    def __init__(
        self,
        view: PairingView,
        batch_size: int,
        paired_per_batch: int | None = None,
        seed: int = 0,
        epoch: int = 0,
        views: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError("train.batch_size", f"must be >= 1, got {batch_size}")
        self.paired_per_batch = check_paired_per_batch(paired_per_batch, batch_size)
        self.views = check_views(views, self.paired_per_batch, batch_size)
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self._paired = view.paired_indices.numpy()
        self._unimodal = view.unimodal_indices.numpy()
        if len(self) == 0:
            raise self._no_batch()

    def _no_batch(self) -> ConfigError:
        counts = f"{len(self._paired)} kept pairs and {len(self._unimodal)} unimodal samples"
        if self.paired_per_batch is None:
            return ConfigError("train.batch_size", f"{self.batch_size} is more than the {counts} together")
        rest = self.batch_size - self.paired_per_batch
        return ConfigError(
            PAIRED_PER_BATCH,
            f"{self.paired_per_batch} pairs + {rest} unimodal samples per batch leave no full batch of {counts}",
        )

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s shuffles from the next ``iter``."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Full batches per epoch."""
        if self.paired_per_batch is None:
            return (len(self._paired) + len(self._unimodal)) // self.batch_size
        rest = (self.batch_size - self.paired_per_batch) // self.views
        if rest == 0:
            return len(self._paired) // self.batch_size
        if self.paired_per_batch > 0 and len(self._paired) == 0:
            return 0
        return len(self._unimodal) // rest

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, _SALT, 2, self.epoch])
        n = len(self)
        if self.paired_per_batch is None:
            every = np.concatenate([self._paired, self._unimodal])
            return iter(rng.permutation(every)[: n * self.batch_size].reshape(n, self.batch_size).tolist())
        k = self.paired_per_batch
        cycles = -(-n * k // max(len(self._paired), 1))
        drawn = [rng.permutation(self._paired) for _ in range(cycles)]
        paired = (np.concatenate(drawn) if drawn else self._paired)[: n * k].reshape(n, k)
        rest = (self.batch_size - k) // self.views
        unimodal = rng.permutation(self._unimodal)[: n * rest].reshape(n, rest).repeat(self.views, axis=1)
        return iter(rng.permuted(np.concatenate([paired, unimodal], axis=1), axis=1).tolist())
