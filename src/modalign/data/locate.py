"""Where a built-in dataset's files are, and fetching them on first use.

A loader calls :func:`dataset_root` with the root it was given (``None`` unless the user
named one with ``--data-root`` or ``data.root``) and the files it needs:

* an **explicit** root is only read: missing files fail with the list of expected paths and
  the ``modalign datasets fetch`` command (nothing is ever written there implicitly);
* with **no** explicit root the files live in the per-user data cache: ``$MODALIGN_DATA`` if
  set, else the platform's user cache folder (``platformdirs.user_cache_dir("modalign")/data``,
  e.g. ``~/.cache/modalign/data`` on Linux). Missing files of a catalog dataset are downloaded
  there and verified (:func:`modalign.data.fetch.fetch`, with ``$MODALIGN_MIRROR`` replacing
  the upstream URLs when set: a ``file://`` folder or a base URL), then loading goes on.
  When the download fails (offline), the error is one line naming the missing files, the
  upstream sources and the command to run on an online machine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from modalign.core.errors import DataError, MissingDataRootError
from modalign.data.base import DATA_ENV, require_files, resolve_data_root
from modalign.data.catalog import CATALOG
from modalign.data.fetch import Progress, fetch, source_url

log = logging.getLogger(__name__)

#: Environment variable naming a mirror (folder, ``file://`` or ``https://`` base URL) that
#: replaces every upstream source of a first-use download.
MIRROR_ENV = "MODALIGN_MIRROR"


def default_data_root() -> Path:
    """The per-user data cache: ``$MODALIGN_DATA`` if set and not empty, else the platform's cache folder."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("modalign")) / "data"


def dataset_root(name: str, root: str | os.PathLike[str] | None, files: list[str], hint: str) -> Path:
    """The data root holding ``files`` of dataset ``name``, fetched into the cache on first use.

    Args:
        name: Catalog name of the dataset (``"av-digits"``, ...).
        root: An explicit data root (never written to), or ``None`` for the per-user cache.
        files: Paths relative to the root that the loader needs.
        hint: How to obtain the files, for the error on an explicit root.

    Returns:
        The data root, with every path of ``files`` present.

    Raises:
        MissingDataRootError: Files missing under an explicit root (listing them), or a
            first-use download that failed (one line: files, sources, the fetch command).
    """
    if root is not None:
        base = resolve_data_root(root)
        require_files(name, base, files, hint)
        return base
    base = default_data_root()
    missing = [p for p in files if not (base / p).exists()]
    info = CATALOG.get(name)
    if not missing or info is None or not info.sources:
        require_files(name, resolve_data_root(base) if missing else base, files, hint)
        return base
    mirror = os.environ.get(MIRROR_ENV) or None
    log.info("dataset %r is not in %s yet: downloading it (first use)", name, base)
    try:
        with _progress_factory[0](name) as progress:
            fetch(name, base, mirror=mirror, progress=progress)
    except (DataError, OSError) as e:
        raise MissingDataRootError(_offline_message(name, base, missing, mirror, e)) from e
    require_files(name, base, files, hint)
    return base


def _offline_message(name: str, base: Path, missing: list[str], mirror: str | None, err: Exception) -> str:
    """One line: what is missing where, why the download failed, where from, and what to run."""
    sources = ", ".join(source_url(s, None) for s in CATALOG[name].sources)
    reason = str(err).splitlines()[0].split("; to install offline")[0]
    where = f" from the mirror {mirror}" if mirror else ""
    return (
        f"dataset {name!r} is not in the data cache {base} (missing: {', '.join(missing)}) and downloading it"
        f"{where} failed: {reason}; upstream sources: {sources}; on a machine that is online run "
        f"`modalign datasets fetch {name} --root DIR` and copy DIR to {base} (or set {DATA_ENV}=DIR), "
        f"or set {MIRROR_ENV} to a folder or URL holding the source files"
    )


@contextmanager
def log_progress(name: str) -> Iterator[Progress]:
    """The default download progress: a log line at every further 10% (or 10 MiB when the size is unknown)."""
    step = {"next": 0}

    def progress(done: int, total: int) -> None:
        if done >= step["next"]:
            size = f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB" if total else f"{done / 2**20:.1f} MiB"
            log.info("fetch %s: %s", name, size)
            step["next"] = done + (total // 10 if total else 10 * 2**20)

    yield progress


#: Makes the progress callback of one first-use download (``name`` -> context manager).
ProgressFactory = Callable[[str], AbstractContextManager[Progress]]
_progress_factory: list[ProgressFactory] = [log_progress]


def set_download_progress(factory: ProgressFactory | None) -> None:
    """Choose how first-use downloads show progress (the CLI sets a progress bar); ``None``: log lines."""
    _progress_factory[0] = factory or log_progress
