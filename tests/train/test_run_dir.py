"""Recipe versions, writable run directories, and which keys a resumed run may change."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from torch import nn

from modalign import __version__
from modalign.core.errors import ConfigError, RunDirError
from modalign.train.checkpoint import save_checkpoint
from modalign.train.recipe import check_version, dump_recipe, load_recipe, running_version, validate_recipe
from modalign.train.run import load_run, prepare_run_dir

MAJOR, MINOR = (int(x) for x in __version__.split(".")[:2])


@pytest.mark.parametrize("version", [None, f"{MAJOR}.{MINOR}", f"{MAJOR}.{MINOR}.7", f" {MAJOR}.{MINOR} "])
def test_compatible_versions_pass(version: str | None) -> None:
    check_version(version)


@pytest.mark.parametrize(
    ("version", "pattern"),
    [
        (f"{MAJOR + 1}.0", rf"the recipe is written for modalign {MAJOR + 1}\.0, this is modalign {MAJOR}\.{MINOR};"),
        (f"{MAJOR}.{MINOR + 1}", rf"the recipe is written for modalign {MAJOR}\.{MINOR + 1}"),
        (0.1, r"write it as a quoted string, e.g. version: '0.1'"),
        ("latest", r"expected major\.minor such as '\d+\.\d+', got 'latest'"),
    ],
)
def test_other_versions_are_refused(version: object, pattern: str) -> None:
    with pytest.raises(ConfigError, match=r"^version: " + pattern):
        check_version(version)


def test_resolved_config_records_the_version_and_is_checked_on_load(tmp_path: Path) -> None:
    recipe = load_recipe("basicmotions-clip")
    assert recipe.version is None
    tree = yaml.safe_load(dump_recipe(recipe))
    assert tree["version"] == running_version()
    assert dump_recipe(validate_recipe(tree)) == dump_recipe(recipe)

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(tree | {"version": "99.0"}))
    with pytest.raises(ConfigError, match=rf"recipe {run / 'config.yaml'} is written for modalign 99\.0"):
        load_run(run)


def test_run_dir_must_be_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match=rf"run directory {blocker / 'run'} is not writable \(.*\); pick another"):
        prepare_run_dir(load_recipe("basicmotions-clip"), blocker / "run", resume=True)


def test_resume_may_change_run_control_keys_only(tmp_path: Path) -> None:
    prepare_run_dir(load_recipe("basicmotions-clip"), tmp_path, resume=True)
    save_checkpoint(tmp_path / "checkpoints", "epoch-0001", nn.Linear(1, 1), {"epoch": 1})
    changed = ["train.skip_nonfinite=3", "train.progress_every=5", "train.track=none"]
    prepare_run_dir(load_recipe("basicmotions-clip", changed), tmp_path, resume=True)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["skip_nonfinite"] == 3
    with pytest.raises(ConfigError, match="holds a run of a different recipe"):
        prepare_run_dir(load_recipe("basicmotions-clip", ["train.lr=0.1"]), tmp_path, resume=True)
