"""Training data as a stream of tar shards in the WebDataset layout, with exact mid-epoch resume.

``write_shards`` turns any dataset split (a built-in dataset or a manifest, through the recipe)
into tar files that the ``webdataset`` library and its tools read: one sample per key, one
member per modality plus one for the sample's identity::

    train-000000.tar
        000000000.image.npy     the transformed value of modality ``image`` (numpy .npy)
        000000000.audio.npy
        000000000.meta.json     {"id": .., "labels": {..}, "modality_ids": {..}}
        000000001.image.npy
        ...
    index.json                  shards (name, samples, SHA-256), modality specs, label names,
                                the train split's fitted artifacts (tokenizers), provenance

Values are written as the dataset gives them without augmentation (``augment=False``), so the
stream needs no dataset code to decode: an ``.npy`` file per value.

``ShardStream`` reads the shards as a stream (local paths or URLs: ``webdataset.gopen`` opens
``http(s)://`` through ``curl``, ``pipe:CMD`` through a shell), split over ranks and DataLoader
workers, with a shuffle buffer. Everything about an epoch's order is a function of the epoch's
seed, the rank and the worker, never of time or of a global RNG:

1. the shard list is permuted by the epoch seed; rank ``r`` of ``W`` takes shards
   ``r, r + W, ...``; its worker ``w`` of ``K`` takes every ``K``-th of those;
2. each worker streams its shards through a shuffle buffer (``shuffle_buffer`` samples, a
   ``random.Random`` seeded by ``(epoch seed, rank, worker)``), undecoded;
3. each worker hands over chunks of ``CHUNK`` samples; the DataLoader passes them to the main
   process round-robin over the workers that still have samples (``interleave_skips`` models
   this; a test pins it to the real DataLoader), where they are batched.

So the position of a rank's stream is one number, the samples it has consumed in the epoch. A
resumed stream recomputes the order and lets each worker drop, before decoding, the samples of
its own that the round-robin had already delivered (``interleave_skips``): nothing is repeated
and nothing skipped. Resuming reads (but does not decode) the consumed part of the epoch again.

Every rank takes the same number of steps per epoch (DDP needs it): ``rank_samples`` is the
fewest samples any rank can get under any permutation; samples a rank has beyond that are not
seen in that epoch (with equal shards and a shard count divisible by the world size, none).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from modalign.core.errors import ConfigError, DataError
from modalign.core.types import Batch, ModalitySpec, Sample
from modalign.data.base import MultimodalDataset
from modalign.data.collate import Collator

INDEX = "index.json"
FORMAT = "modalign-shards/1"
META = "meta.json"


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its file name (relative to the index), sample count and SHA-256."""

    name: str
    count: int
    sha256: str


@dataclass
class ShardIndex:
    """What ``index.json`` records about a set of shards.

    Attributes:
        base: Folder or URL prefix the shard names resolve against.
        split: The dataset split written.
        shards: The shards, in writing order.
        modalities: ``{modality: ModalitySpec}`` of the values.
        label_names: Evaluation labels each sample may carry.
        artifacts: The train split's fitted state (``MultimodalDataset.artifacts``).
        source: Provenance (dataset entry of the recipe).
    """

    base: str
    split: str
    shards: list[ShardInfo]
    modalities: dict[str, ModalitySpec]
    label_names: tuple[str, ...] = ()
    artifacts: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Samples over all shards."""
        return sum(s.count for s in self.shards)

    def url(self, shard: ShardInfo) -> str:
        """Where ``shard`` is read from."""
        return f"{self.base.rstrip('/')}/{shard.name}"

    def to_json(self) -> str:
        """The ``index.json`` text (``base`` is not stored: it is where the file is found)."""
        tree = {
            "format": FORMAT,
            "split": self.split,
            "count": self.count,
            "shards": [asdict(s) for s in self.shards],
            "modalities": {m: asdict(spec) for m, spec in self.modalities.items()},
            "label_names": list(self.label_names),
            "artifacts": self.artifacts,
            "source": self.source,
        }
        return json.dumps(tree, indent=1, sort_keys=True) + "\n"


def _key(index: int) -> str:
    return f"{index:09d}"


def _npy(value: Any) -> bytes:
    buffer = io.BytesIO()
    array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shards(
    dataset: MultimodalDataset,
    out: Path,
    shard_size: int = 1000,
    split: str = "train",
    artifacts: dict[str, str] | None = None,
    source: dict[str, Any] | None = None,
) -> ShardIndex:
    """Write every sample of ``dataset`` into tar shards of ``shard_size`` samples under ``out``.

    Each shard is written under a temporary name and renamed when complete; ``index.json`` is
    written last, so a folder with an index holds complete shards.

    Args:
        dataset: The split to write (build it with ``augment=False``).
        out: Output folder (created; existing shards of ``split`` are replaced).
        shard_size: Samples per shard (the last one may hold fewer).
        split: Split name, the shards' file prefix.
        artifacts: Fitted state to record (default ``dataset.artifacts()``).
        source: Provenance recorded in the index.

    Returns:
        The written index (``base`` = ``out``).

    Raises:
        ConfigError: ``shard_size`` is not positive.
        DataError: The dataset is empty.
    """
    if shard_size <= 0:
        raise ConfigError("--shard-size", f"must be positive, got {shard_size}")
    if len(dataset) == 0:
        raise DataError(f"split {split!r} has no samples to write")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{split}-*.tar"):
        stale.unlink()
    shards = []
    for number, start in enumerate(range(0, len(dataset), shard_size)):
        name = f"{split}-{number:06d}.tar"
        tmp = out / f".{name}.tmp"
        indices = range(start, min(start + shard_size, len(dataset)))
        with wds.TarWriter(str(tmp), encoder=False) as writer:
            for i in indices:
                writer.write(_entry(dataset[i], i))
        tmp.replace(out / name)
        shards.append(ShardInfo(name, len(indices), _sha256(out / name)))
    index = ShardIndex(
        base=str(out),
        split=split,
        shards=shards,
        modalities=dict(dataset.modalities),
        label_names=tuple(dataset.label_names),
        artifacts=dict(dataset.artifacts() if artifacts is None else artifacts),
        source=dict(source or {}),
    )
    tmp_index = out / f".{INDEX}.tmp"
    tmp_index.write_text(index.to_json())
    tmp_index.replace(out / INDEX)
    return index


def _entry(sample: Sample, index: int) -> dict[str, Any]:
    meta = {"id": int(sample.id), "labels": sample.labels, "modality_ids": sample.modality_ids}
    entry: dict[str, Any] = {"__key__": _key(index), META: json.dumps(meta).encode()}
    for modality, value in sorted(sample.values.items()):
        if value is None:
            raise DataError(f"sample {index}: modality {modality!r} has no value to write")
        entry[f"{modality}.npy"] = _npy(value)
    return entry


def _is_url(source: str) -> bool:
    return "://" in source or source.startswith("pipe:")


def read_index(source: str | Path) -> ShardIndex:
    """Read ``index.json`` from a shard folder, a path to the file, or a URL to either.

    Raises:
        DataError: The index is missing, unreadable or not a modalign shard index (naming it).
    """
    text = str(source)
    location = text if text.endswith(".json") else f"{text.rstrip('/')}/{INDEX}"
    base = location.rsplit("/", 1)[0] if "/" in location else "."
    try:
        if _is_url(location):
            with wds.gopen(location, "rb") as stream:
                raw = stream.read().decode()
        else:
            raw = Path(location).read_text()
        tree = json.loads(raw)
    except (OSError, ValueError) as e:
        raise DataError(f"shard index {location}: cannot be read ({e}); write one with `modalign shards build`") from e
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        raise DataError(f"shard index {location}: not a {FORMAT} index (format {tree.get('format')!r})")
    try:
        return ShardIndex(
            base=base,
            split=str(tree["split"]),
            shards=[ShardInfo(**s) for s in tree["shards"]],
            modalities={m: ModalitySpec(**spec) for m, spec in tree["modalities"].items()},
            label_names=tuple(tree.get("label_names", ())),
            artifacts=dict(tree.get("artifacts", {})),
            source=dict(tree.get("source", {})),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"shard index {location}: malformed ({e!r})") from e


def verify_shards(index: ShardIndex) -> list[str]:
    """Names of the local shards whose SHA-256 differs from the index's (or that are missing)."""
    bad = []
    for shard in index.shards:
        path = Path(index.url(shard))
        if not path.is_file() or _sha256(path) != shard.sha256:
            bad.append(shard.name)
    return bad


def stream_seed(epoch_seed: int, rank: int, worker: int) -> int:
    """Seed of the shuffle buffer of ``worker`` of ``rank`` in the epoch seeded ``epoch_seed``."""
    return (epoch_seed * 1_000_003 + rank * 7_919 + worker * 104_729) % (2**63)


def epoch_shards(count: int, epoch_seed: int | None, rank: int, world: int) -> list[int]:
    """Shard numbers of ``rank`` in an epoch: the permuted list (unpermuted for ``None``), every ``world``-th."""
    order = list(range(count))
    if epoch_seed is not None:
        random.Random(epoch_seed).shuffle(order)
    return order[rank::world]


def rank_samples(counts: list[int], world: int) -> int:
    """The fewest samples any rank gets in any epoch: the smallest ``len // world`` shard counts.

    Raises:
        ConfigError: There are fewer shards than ranks.
    """
    if len(counts) < world:
        raise ConfigError("train.shards", f"{len(counts)} shards cannot be split over {world} ranks; write more")
    return sum(sorted(counts)[: len(counts) // world])


def interleave_skips(counts: list[int], consumed: int, chunk: int = 1) -> list[int]:
    """How many samples of each worker the first ``consumed`` samples of the round-robin hold.

    Each worker hands over its samples in chunks of ``chunk`` (its last chunk may be shorter);
    the DataLoader takes one chunk from each worker in turn (worker 0 first), passing over
    workers that have run out: with counts ``[1, 3]`` and ``chunk=1`` the order is
    ``w0, w1, w1, w1``; with ``chunk=2`` it is ``w0 | w1 w1 | w1``.

    Raises:
        ValueError: ``consumed`` exceeds the samples of all workers, or ``chunk < 1``.
    """
    if consumed > sum(counts) or chunk < 1:
        raise ValueError(f"{consumed} samples consumed but the workers hold {sum(counts)} (chunk {chunk})")
    skips = [0] * len(counts)
    left = consumed
    whole = min(left // (chunk * len(counts)), min(counts) // chunk) if counts else 0
    skips = [whole * chunk] * len(counts)  # rounds where every worker gives a full chunk
    left -= whole * chunk * len(counts)
    while left > 0:
        for w, c in enumerate(counts):
            take = min(chunk, c - skips[w], left)
            skips[w] += max(take, 0)
            left -= max(take, 0)
            if left == 0:
                break
    return skips


def shuffled(samples: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """A shuffle buffer of ``size`` samples: emit a random buffered sample per sample read, then the rest.

    ``size <= 1`` passes the samples through in order.
    """
    if size <= 1:
        yield from samples
        return
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        k = rng.randrange(size)
        buffer[k], sample = sample, buffer[k]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


@dataclass(frozen=True)
class StreamEpoch:
    """The order of one epoch of a rank's stream and how much of it was already consumed.

    ``seed=None``: unshuffled (shards in order, no buffer), for a pass such as evaluation.
    """

    seed: int | None = None
    rank: int = 0
    world: int = 1
    consumed: int = 0


class ShardStream(IterableDataset[Sample | None]):
    """The samples of a shard set as a stream (see the module docstring).

    Args:
        index: The shards (``read_index``).
        shuffle_buffer: Samples held by each worker's shuffle buffer.
        epoch: The order to iterate and the position to start from (default: one unshuffled pass).
        chunk: Samples per hand-over from a DataLoader worker (``stream_samples`` groups them);
            the resume position depends on it.
    """

    def __init__(
        self, index: ShardIndex, shuffle_buffer: int = 1000, epoch: StreamEpoch | None = None, chunk: int = 1
    ) -> None:
        self.index = index
        self.shuffle_buffer = shuffle_buffer
        self.epoch = epoch or StreamEpoch()
        self.chunk = chunk

    def with_epoch(self, epoch: StreamEpoch) -> ShardStream:
        """A copy of this stream iterating ``epoch`` (``StreamEpoch()``: one unshuffled pass)."""
        return ShardStream(self.index, self.shuffle_buffer, epoch, self.chunk)

    def with_chunk(self, chunk: int) -> ShardStream:
        """A copy of this stream whose workers hand over ``chunk`` samples at a time."""
        return ShardStream(self.index, self.shuffle_buffer, self.epoch, chunk)

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        """``{modality: ModalitySpec}`` recorded in the index."""
        return dict(self.index.modalities)

    @property
    def label_names(self) -> tuple[str, ...]:
        """Evaluation labels recorded in the index."""
        return self.index.label_names

    def artifacts(self) -> dict[str, str]:
        """The train split's fitted state recorded in the index."""
        return dict(self.index.artifacts)

    def __len__(self) -> int:
        return self.index.count

    def samples(self) -> Iterator[Sample]:
        """The samples of the current epoch in one process (``stream_samples`` without workers)."""
        return stream_samples(self, 0)

    def rank_samples(self, world: int) -> int:
        """Samples every rank gets in every epoch (``rank_samples`` of the shard counts)."""
        return rank_samples([s.count for s in self.index.shards], world)

    def worker_shards(self, worker: int, workers: int) -> list[ShardInfo]:
        """The shards ``worker`` of ``workers`` streams in the current epoch."""
        e = self.epoch
        mine = epoch_shards(len(self.index.shards), e.seed, e.rank, e.world)
        return [self.index.shards[i] for i in mine[worker::workers]]

    def __iter__(self) -> Iterator[Sample | None]:
        for entry in self.entries():
            yield None if entry is None else self.decode(entry)

    def entries(self) -> Iterator[dict[str, Any] | None]:
        """This worker's undecoded entries of the epoch; the ones already consumed are ``None``.

        Consumed samples stay in the stream as placeholders, so the chunks and the round-robin
        are those of the uninterrupted epoch (see ``stream_samples``).
        """
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        counts = [sum(s.count for s in self.worker_shards(w, workers)) for w in range(workers)]
        skip = interleave_skips(counts, self.epoch.consumed, self.chunk)[worker]
        raw = self._raw(self.worker_shards(worker, workers))
        if self.epoch.seed is not None:
            rng = random.Random(stream_seed(self.epoch.seed, self.epoch.rank, worker))
            raw = shuffled(raw, self.shuffle_buffer, rng)
        for n, entry in enumerate(raw):
            yield None if n < skip else entry

    def _raw(self, shards: list[ShardInfo]) -> Iterator[dict[str, Any]]:
        """The undecoded samples of ``shards`` in order; a shard that cannot be read raises ``DataError``."""
        for shard in shards:
            url = self.index.url(shard)
            seen = 0
            try:
                for entry in tarfile_samples([{"url": url}]):
                    seen += 1
                    yield entry
            except Exception as e:  # webdataset re-raises tar, I/O and subprocess errors as they come
                raise DataError(f"shard {url}: unreadable after {seen} samples ({e!r})") from e
            if seen != shard.count:
                raise DataError(f"shard {url}: {seen} samples, the index says {shard.count}; rebuild the shards")

    def decode(self, entry: dict[str, Any]) -> Sample:
        """The ``Sample`` of one undecoded shard entry.

        Raises:
            DataError: A member is missing or unreadable (naming the shard, key and member).
        """
        where = f"shard {entry.get('__url__')} sample {entry.get('__key__')}"
        try:
            meta = json.loads(entry[META])
            values = {
                name.removesuffix(".npy"): torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
                for name, data in entry.items()
                if name.endswith(".npy")
            }
        except (KeyError, ValueError, OSError) as e:
            raise DataError(f"{where}: unreadable ({e!r})") from e
        unknown = sorted(set(values) - set(self.index.modalities))
        if unknown:
            raise DataError(f"{where}: modalities {unknown} are not in the index {sorted(self.index.modalities)}")
        return Sample(
            id=int(meta["id"]),
            values=values,
            labels={k: int(v) for k, v in meta.get("labels", {}).items()},
            modality_ids={k: int(v) for k, v in meta.get("modality_ids", {}).items()},
        )


#: Samples a DataLoader worker hands over at once (one inter-process transfer each).
CHUNK = 32
#: Chunks each DataLoader worker keeps ready.
PREFETCH = 4


def _identity(sample: Any) -> Any:
    return sample


class _Chunks(IterableDataset[list[dict[str, Any] | None]]):
    """``stream``'s undecoded entries in lists of ``stream.chunk``, formed inside each worker.

    Workers send the entries' bytes, which pickle cheaply; the main process decodes them (an
    ``.npy`` read each), which is cheaper than passing tensors between processes.
    """

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[list[dict[str, Any] | None]]:
        source = self.stream.entries()
        while chunk := list(islice(source, self.stream.chunk)):
            yield chunk


def stream_samples(stream: ShardStream, num_workers: int, chunk: int = CHUNK) -> Iterator[Sample]:
    """``stream``'s samples from ``num_workers`` DataLoader workers, from its epoch's ``consumed`` position.

    Workers hand over ``chunk`` undecoded samples at a time (one inter-process transfer per
    chunk, of bytes, not tensors); the main process decodes them, and batches them
    (``stream_batches``), so no worker drops a partial batch of its own. Each worker replaces
    the samples of its own that the first ``consumed`` of the round-robin held by a
    placeholder, undecoded; the workers thus deliver
    exactly the chunks of an uninterrupted epoch, the DataLoader interleaves them as it did then,
    and the first ``consumed`` items here are exactly the placeholders (checked). The loader has
    its own generator: creating it draws nothing from the global torch RNG, which a resumed run
    restores exactly.

    Raises:
        DataError: A placeholder where a sample was due (the DataLoader's order is not the one
            ``interleave_skips`` models).
    """
    chunked = stream.with_chunk(chunk if num_workers else 1)
    loader: DataLoader[list[dict[str, Any] | None]] = DataLoader(
        _Chunks(chunked),
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        prefetch_factor=PREFETCH if num_workers else None,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    )
    consumed = stream.epoch.consumed
    n = 0
    for items in loader:
        for entry in items:
            if (entry is None) != (n < consumed):
                raise DataError(
                    f"stream position {consumed}: item {n} of the resumed stream is "
                    f"{'a skipped placeholder' if entry is None else 'a sample'}; the DataLoader did not "
                    "interleave its workers round-robin"
                )
            n += 1
            if entry is not None:
                yield stream.decode(entry)


def stream_batches(
    samples: Iterable[Sample], batch_size: int, steps: int, specs: dict[str, ModalitySpec]
) -> Iterator[Batch]:
    """``steps`` collated batches of ``batch_size`` consecutive samples.

    Raises:
        DataError: The stream ends before ``steps`` batches.
    """
    collator = Collator(specs)
    source = iter(samples)
    for step in range(steps):
        chunk = list(islice(source, batch_size))
        if len(chunk) < batch_size:
            raise DataError(
                f"the shard stream ended after {step} of {steps} batches ({len(chunk)} samples left over); "
                "the shards hold fewer samples than their index says"
            )
        yield collator(chunk)
