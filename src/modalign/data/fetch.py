"""Download a built-in dataset from its public upstream, verify it and install it under a data root.

Everything is staged in a temporary folder inside ``root`` and checked (file sha256, npm
``dist.integrity``, tree digests and counts; see :mod:`modalign.data.catalog`) before the first
file is moved into place with ``os.replace``; a failure leaves nothing behind. Files that are
already installed and verify are not downloaded again.

Offline use: download the files named by ``Source.filename`` (``modalign datasets`` lists the
URLs) into one folder and pass ``mirror="file:///that/folder"`` (or the plain folder path).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import logging
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from modalign.core.errors import DataError
from modalign.data.catalog import CATALOG, Member, Source, tree_digest

log = logging.getLogger(__name__)

#: ``progress(bytes done, bytes total)``; ``total`` is 0 when the server does not say.
Progress = Callable[[int, int], None]

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


def fetch(name: str, root: Path, mirror: str | None = None, progress: Progress | None = None) -> list[Path]:
    """Download, verify and install the built-in dataset ``name`` under ``root``.

    Args:
        name: A ``CATALOG`` name with sources (``"av-digits"``, ``"emoji"``, ``"basicmotions"``).
        root: Data root; created if missing. Files land where the loader expects them.
        mirror: Base URL (or local folder) replacing each source's upstream: the file is read
            from ``<mirror>/<Source.filename>``. ``None`` uses the upstream URLs.
        progress: Called with ``(bytes done, bytes total)`` while downloading.

    Returns:
        The installed paths (files and folders) under ``root``, one per catalog member.

    Raises:
        DataError: Unknown name (listing the catalog), a download error, a missing archive
            member, or a checksum mismatch (naming the URL and the expected and actual digests).
    """
    if name not in CATALOG:
        raise DataError(f"unknown dataset {name!r}; the catalog has: {', '.join(sorted(CATALOG))}")
    info = CATALOG[name]
    if not info.sources:
        raise DataError(f"dataset {name!r} has nothing to download (it reads your own files)")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    todo = [s for s in info.sources if not _installed(s, root)]
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        staged: list[tuple[Path, Path]] = []
        for i, source in enumerate(todo):
            url = source_url(source, mirror)
            log.info("fetch %s: downloading %s", name, url)
            archive = Path(tmp) / f"download-{i}"
            digests = _download(url, archive, progress)
            _check_integrity(source, url, digests)
            staged += _stage(source, url, archive, Path(tmp) / f"staged-{i}")
            archive.unlink(missing_ok=True)
        for k, (src, rel) in enumerate(staged):
            _install(src, root / rel, Path(tmp) / f"old-{k}")
    return [root / m.dest for s in info.sources for m in s.members]


def _install(src: Path, dest: Path, trash: Path) -> None:
    """Move a staged file or folder to ``dest``; a folder replaces the old one as a whole."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and dest.exists():
        os.replace(dest, trash)  # removed with the temporary folder
    os.replace(src, dest)


def source_url(source: Source, mirror: str | None) -> str:
    """The URL ``source`` is read from: its upstream, or ``<mirror>/<filename>``."""
    if mirror is None:
        return source.url
    base = mirror if "://" in mirror else Path(mirror).expanduser().resolve().as_uri()
    return f"{base.rstrip('/')}/{source.filename}"


def _download(url: str, dest: Path, progress: Progress | None) -> dict[str, str]:
    """Stream ``url`` into ``dest``; returns ``{"sha256": hex, "sha512": base64}`` of the bytes."""
    sha256, sha512 = hashlib.sha256(), hashlib.sha512()
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp, open(dest, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                sha256.update(chunk)
                sha512.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(
            f"cannot download {url}: {reason}; to install offline, put the file in a "
            "folder and pass mirror=file:///that/folder"
        ) from None
    return {"sha256": sha256.hexdigest(), "sha512": base64.b64encode(sha512.digest()).decode("ascii")}


def _check_integrity(source: Source, url: str, digests: dict[str, str]) -> None:
    """Compare the download with the npm ``dist.integrity`` (archives) or the file's sha256."""
    if source.integrity is not None:
        actual = f"sha512-{digests['sha512']}"
        if actual != source.integrity:
            raise DataError(f"checksum mismatch for {url}: expected integrity {source.integrity}, got {actual}")
    if source.kind == "file":
        _check_sha256(url, source.members[0].sha256, digests["sha256"])


def _check_sha256(what: str, expected: str | None, actual: str) -> None:
    if expected is not None and actual != expected:
        raise DataError(f"checksum mismatch for {what}: expected sha256 {expected}, got sha256 {actual}")


def _stage(source: Source, url: str, download: Path, staging: Path) -> list[tuple[Path, Path]]:
    """Place the members of ``download`` under ``staging`` and verify them.

    Returns:
        ``(staged file or folder, destination relative to the root)``, one pair per member.
    """
    staging.mkdir(parents=True)
    if source.kind == "file":
        target = staging / "0"
        os.replace(download, target)
        return [(target, Path(source.members[0].dest))]
    found: list[dict[str, str]] = [{} for _ in source.members]
    try:
        for name, handle in _iter_archive(download, source.kind):
            j = next((j for j, m in enumerate(source.members) if _matches(name, m.pattern)), None)
            if j is None:
                continue
            member, base = source.members[j], name.rsplit("/", 1)[-1]
            if base in found[j]:
                raise DataError(f"{url}: two archive members named {base!r} match {member.pattern!r}")
            target = staging / str(j) / base
            target.parent.mkdir(exist_ok=True)
            found[j][base] = _copy_hashed(handle, target)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError) as e:
        raise DataError(f"{url}: not a valid {source.kind} archive: {e}") from None
    out: list[tuple[Path, Path]] = []
    for j, (member, files) in enumerate(zip(source.members, found, strict=True)):
        _verify_member(member, url, files)
        folder = staging / str(j)
        out.append((folder if member.is_tree else folder / next(iter(files)), Path(member.dest)))
    return out


def _verify_member(member: Member, url: str, files: dict[str, str]) -> None:
    """Check the files extracted for ``member`` (``{base name: sha256}``) against the catalog."""
    what = f"{member.pattern!r} in {url}"
    if not files:
        raise DataError(f"{url}: no archive member matches {member.pattern!r}")
    if not member.is_tree:
        _check_sha256(what, member.sha256, next(iter(files.values())))
        return
    if member.count is not None and len(files) != member.count:
        raise DataError(f"{what}: expected {member.count} files, found {len(files)}")
    _check_sha256(f"{what} (tree digest of {len(files)} files)", member.tree_sha256, tree_digest(files.items()))


def _iter_archive(path: Path, kind: str) -> Iterator[tuple[str, IO[bytes]]]:
    """Yield ``(member name, open handle)`` for every regular file of a zip or tar.gz, in order.

    Tarballs are read as a stream (``r|gz``), so each member is decompressed once.
    """
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    with zf.open(info) as handle:
                        yield info.filename, handle
        return
    with tarfile.open(path, "r|gz") as tf:
        for ti in tf:
            extracted = tf.extractfile(ti) if ti.isfile() else None
            if extracted is not None:
                yield ti.name, extracted


def _matches(name: str, pattern: str) -> bool:
    """Glob match at any depth, ignoring macOS resource forks (``__MACOSX/``, ``._*``)."""
    if "__MACOSX/" in name or name.rsplit("/", 1)[-1].startswith("._"):
        return False
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*/" + pattern)


def _copy_hashed(src: IO[bytes], target: Path) -> str:
    """Copy an open archive member to ``target``; returns its sha256 hex."""
    h = hashlib.sha256()
    with open(target, "wb") as out:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _installed(source: Source, root: Path) -> bool:
    """Whether every member of ``source`` is present under ``root`` and matches its checksum."""
    for m in source.members:
        dest = root / m.dest
        if m.is_tree:
            files = sorted(p for p in dest.glob("*") if p.is_file()) if dest.is_dir() else []
            if m.tree_sha256 is None or not files or (m.count is not None and len(files) != m.count):
                return False
            if tree_digest((p.name, file_sha256(p)) for p in files) != m.tree_sha256:
                return False
        elif m.sha256 is None or not dest.is_file() or file_sha256(dest) != m.sha256:
            return False
    return True
