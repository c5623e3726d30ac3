"""Fetching built-in datasets offline from a ``file://`` mirror built out of the shared data."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from modalign.core.errors import DataError
from modalign.core.registry import available, create
from modalign.data import catalog
from modalign.data.catalog import CATALOG, DatasetInfo, Member, Source, tree_digest
from modalign.data.datasets import av_digits, basicmotions, emoji
from modalign.data.fetch import fetch, file_sha256, source_url

MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
FSDD_ZIP = "free-spoken-digit-dataset-26eb9aaf76e81b692f806f9140c2d2777410d7a1.zip"


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _mirror_file(mirror: Path, data_root: Path, rel: str) -> None:
    mirror.mkdir(exist_ok=True)
    shutil.copyfile(data_root / rel, mirror / Path(rel).name)


def _zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _tgz(path: Path, members: dict[str, bytes]) -> str:
    """Write a tar.gz; returns its npm-style integrity string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def _need(data_root: Path, *rels: str) -> None:
    missing = [r for r in rels if not (data_root / r).exists()]
    if missing:
        pytest.skip(f"shared data lacks {missing}")


@pytest.mark.parametrize("name", ["av-digits", "basicmotions", "emoji"])
def test_catalog_checksums_match_the_shared_copies(data_root: Path, name: str) -> None:
    info = CATALOG[name]
    _need(data_root, *info.files)
    members = [m for s in info.sources for m in s.members]
    assert {f for f in info.files} <= {m.dest for m in members}  # every expected file is installed
    for m in members:
        dest = data_root / m.dest
        if m.is_tree:
            files = sorted(dest.glob("*"))
            assert len(files) == m.count
            assert tree_digest((p.name, file_sha256(p)) for p in files) == m.tree_sha256, m.dest
        else:
            assert file_sha256(dest) == m.sha256, m.dest


def test_fetch_basicmotions_from_a_mirror(data_root: Path, tmp_path: Path) -> None:
    _need(data_root, *CATALOG["basicmotions"].files)
    ts = {
        f"BasicMotions/BasicMotions_{s}.ts": (data_root / f"basicmotions/BasicMotions_{s}.ts").read_bytes()
        for s in ("TRAIN", "TEST")
    }
    junk = {"__MACOSX/BasicMotions/._BasicMotions_TRAIN.ts": b"resource fork", "BasicMotions/README": b"x"}
    _zip(tmp_path / "mirror" / "BasicMotions.zip", {**ts, **junk})
    root, calls = tmp_path / "root", []
    out = fetch(
        "basicmotions",
        root,
        mirror=(tmp_path / "mirror").as_uri(),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert out == [root / f for f in CATALOG["basicmotions"].files]
    for f in CATALOG["basicmotions"].files:
        assert (root / f).read_bytes() == (data_root / f).read_bytes()
    assert _listing(root) == ["basicmotions", *sorted(CATALOG["basicmotions"].files)]
    size = (tmp_path / "mirror" / "BasicMotions.zip").stat().st_size
    assert calls and calls[-1] == (size, size)
    ds = create("dataset", "basicmotions", root=root, split="test")  # the loader accepts the root
    assert len(ds) == CATALOG["basicmotions"].splits["test"]


def test_fetch_av_digits_with_fsdd_archive(data_root: Path, tmp_path: Path) -> None:
    info = CATALOG["av-digits"]
    _need(data_root, *info.files)
    mirror = tmp_path / "mirror"
    for rel in (*(f"mnist_t10k/{f}" for f in MNIST_FILES), "mnist_mlxtend5k/mnist_5k.csv.gz"):
        _mirror_file(mirror, data_root, rel)
    top = FSDD_ZIP.removesuffix(".zip")
    wavs = sorted((data_root / "fsdd" / "recordings").glob("*.wav"))
    _zip(
        mirror / FSDD_ZIP,
        {f"{top}/README.md": b"readme", **{f"{top}/recordings/{p.name}": p.read_bytes() for p in wavs}},
    )
    root = tmp_path / "root"
    fetch("av-digits", root, mirror=str(mirror))  # a plain folder works as a mirror too
    for rel in info.files[:3]:
        assert (root / rel).read_bytes() == (data_root / rel).read_bytes()
    assert sorted(p.name for p in (root / "fsdd" / "recordings").iterdir()) == [p.name for p in wavs]
    assert (root / "fsdd/recordings" / wavs[7].name).read_bytes() == wavs[7].read_bytes()
    # The loader's own readers accept the installed files (building the dataset is slow: log-mels).
    assert len(av_digits.list_recordings(root / av_digits.RECORDINGS)) == 3000
    assert av_digits.read_idx(root / av_digits.TEST_LABELS, 1).shape == (10000,)
    assert len(av_digits.read_mnist_csv(root / av_digits.TRAIN_IMAGES)[1]) == info.splits["train"]


def test_catalog_files_are_what_the_loaders_check() -> None:
    assert set(CATALOG["av-digits"].files) == {
        av_digits.TRAIN_IMAGES,
        av_digits.TEST_IMAGES,
        av_digits.TEST_LABELS,
        av_digits.RECORDINGS,
    }
    assert set(CATALOG["basicmotions"].files) == set(basicmotions.FILES.values())
    assert set(CATALOG["emoji"].files) == {emoji.EMOJI_JSON, emoji.LABELS_JSON, emoji.IMAGES}
    for name, info in CATALOG.items():
        assert info.name == name and name in available("dataset")


def test_corrupt_mirror_file_raises_and_leaves_nothing(data_root: Path, tmp_path: Path) -> None:
    _need(data_root, "mnist_t10k/" + MNIST_FILES[0], "mnist_t10k/" + MNIST_FILES[1])
    mirror = tmp_path / "mirror"
    _mirror_file(mirror, data_root, "mnist_t10k/" + MNIST_FILES[0])  # good, fetched first
    bad = bytearray((data_root / "mnist_t10k" / MNIST_FILES[1]).read_bytes())
    bad[100] ^= 0xFF
    (mirror / MNIST_FILES[1]).write_bytes(bytes(bad))
    root = tmp_path / "root"
    with pytest.raises(DataError) as e:
        fetch("av-digits", root, mirror=mirror.as_uri())
    expected = CATALOG["av-digits"].sources[1].members[0].sha256
    assert expected is not None
    msg = str(e.value)
    assert (mirror / MNIST_FILES[1]).as_uri() in msg and f"expected sha256 {expected}" in msg
    assert f"got sha256 {hashlib.sha256(bytes(bad)).hexdigest()}" in msg
    assert _listing(root) == []


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, bytes]:
    """Register a small dataset ``tiny`` (a zip with a folder of 5 files and an npm-style tgz)."""
    files = {f"{i}_x_{i}.wav": bytes([i]) * (100 + i) for i in range(5)}
    _zip(tmp_path / "mirror" / "rec.zip", {f"top/recordings/{n}": b for n, b in files.items()})
    meta = b'{"hello": 1}'
    integrity = _tgz(tmp_path / "mirror" / "pkg.tgz", {"package/meta.json": meta, "package/other.txt": b"z"})
    sources = (
        Source(
            "https://example.invalid/rec.zip",
            "rec.zip",
            "zip",
            (
                Member(
                    "recordings/*.wav",
                    "tiny/recordings",
                    count=5,
                    tree_sha256=tree_digest((n, hashlib.sha256(b).hexdigest()) for n, b in files.items()),
                ),
            ),
        ),
        Source(
            "https://example.invalid/pkg.tgz",
            "pkg.tgz",
            "tgz",
            (Member("package/meta.json", "tiny/meta.json", sha256=hashlib.sha256(meta).hexdigest()),),
            integrity=integrity,
        ),
    )
    info = DatasetInfo("tiny", "test", {}, {}, (), ("tiny/recordings", "tiny/meta.json"), "-", sources)
    monkeypatch.setitem(catalog.CATALOG, "tiny", info)
    return files


def test_tiny_fetch_installs_and_skips_when_installed(tiny: dict[str, bytes], tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = fetch("tiny", root, mirror=str(tmp_path / "mirror"))
    assert out == [root / "tiny/recordings", root / "tiny/meta.json"]
    assert {p.name: p.read_bytes() for p in (root / "tiny/recordings").iterdir()} == tiny
    assert _listing(root) == [
        "tiny",
        "tiny/meta.json",
        "tiny/recordings",
        *sorted(f"tiny/recordings/{n}" for n in tiny),
    ]
    fetch("tiny", root, mirror=str(tmp_path / "nowhere"))  # verified install: nothing downloaded
    (root / "tiny/recordings/stale.wav").write_bytes(b"old")
    fetch("tiny", root, mirror=str(tmp_path / "mirror"))  # a folder is replaced as a whole
    assert sorted(p.name for p in (root / "tiny/recordings").iterdir()) == sorted(tiny)
    (root / "tiny/meta.json").write_text("changed")
    with pytest.raises(DataError, match=r"cannot download .*nowhere/pkg\.tgz"):
        fetch("tiny", root, mirror=str(tmp_path / "nowhere"))


def test_tree_digest_mismatch_names_expected_and_actual(tiny: dict[str, bytes], tmp_path: Path) -> None:
    altered = {f"top/recordings/{n}": (b if i else b"evil") for i, (n, b) in enumerate(tiny.items())}
    _zip(tmp_path / "bad" / "rec.zip", altered)
    shutil.copyfile(tmp_path / "mirror" / "pkg.tgz", tmp_path / "bad" / "pkg.tgz")
    expected = CATALOG["tiny"].sources[0].members[0].tree_sha256
    actual = tree_digest((n.rsplit("/", 1)[-1], hashlib.sha256(b).hexdigest()) for n, b in altered.items())
    with pytest.raises(DataError, match=f"tree digest.*expected sha256 {expected}, got sha256 {actual}"):
        fetch("tiny", tmp_path / "root", mirror=str(tmp_path / "bad"))
    assert _listing(tmp_path / "root") == []
    _zip(tmp_path / "bad" / "rec.zip", {k: v for k, v in list(altered.items())[1:]})
    with pytest.raises(DataError, match="expected 5 files, found 4"):
        fetch("tiny", tmp_path / "root", mirror=str(tmp_path / "bad"))


def test_tarball_integrity_and_missing_member(tiny: dict[str, bytes], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "mirror", bad)
    actual = _tgz(bad / "pkg.tgz", {"package/meta.json": b'{"hello": 2}'})
    expected = CATALOG["tiny"].sources[1].integrity
    with pytest.raises(DataError, match=re.escape(f"expected integrity {expected}, got {actual}")):
        fetch("tiny", tmp_path / "root", mirror=str(bad))
    assert _listing(tmp_path / "root") == []
    _zip(bad / "rec.zip", {"top/other/a.wav": b"a"})
    with pytest.raises(DataError, match=r"no archive member matches 'recordings/\*\.wav'"):
        fetch("tiny", tmp_path / "root", mirror=str(bad))
    (bad / "rec.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a valid zip archive"):
        fetch("tiny", tmp_path / "root", mirror=str(bad))


def test_unknown_and_sourceless_names(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        fetch("mnist", tmp_path)
    for name in ("av-digits", "basicmotions", "emoji", "manifest"):
        assert name in str(e.value)
    with pytest.raises(DataError, match="nothing to download"):
        fetch("manifest", tmp_path)


def test_source_url_with_and_without_mirror(tmp_path: Path) -> None:
    src = CATALOG["basicmotions"].sources[0]
    assert source_url(src, None) == "https://timeseriesclassification.com/aeon-toolkit/BasicMotions.zip"
    assert source_url(src, "https://mirror.example/data/") == "https://mirror.example/data/BasicMotions.zip"
    assert source_url(src, str(tmp_path)) == f"{tmp_path.as_uri()}/BasicMotions.zip"
