"""Shared fixtures: the real-data root (``$MODALIGN_DATA``, default ``../shared/data``), one-thread runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

REPO_ROOT = Path(__file__).resolve().parents[1]

# Property tests: CI and a plain `make test` draw the same examples every run (derandomized:
# seeded by each test's name), so a red run can be reproduced and CI does not flake on a new
# draw. `HYPOTHESIS_PROFILE=explore` searches afresh with more examples; a counterexample it
# finds is a bug in the code or in the claim, to fix before it lands.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real-data folder; skips the test when it is absent."""
    root = Path(os.environ.get("MODALIGN_DATA") or str(REPO_ROOT.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set MODALIGN_DATA=DIR)")
    return root


@pytest.fixture(autouse=True, scope="session")
def _no_network_downloads(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never download: a first-use fetch reads from an empty mirror unless a test sets one."""
    if "MODALIGN_MIRROR" not in os.environ:
        os.environ["MODALIGN_MIRROR"] = str(tmp_path_factory.mktemp("no-network-mirror"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train several times faster on one intra-op thread than on contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
