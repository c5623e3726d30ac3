"""``check_component``: a subclass forwarding ``**kwargs`` to its parent takes the parent's arguments."""

from __future__ import annotations

from typing import Any

import pytest

from modalign.core import ConfigError, config
from modalign.core.config import check_component


class _Parent:
    def __init__(self, width: int = 3, name: str = "p") -> None:
        self.width, self.name = width, name


class _Child(_Parent):
    def __init__(self, depth: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.depth = depth


class _Closed(_Parent):
    def __init__(self, depth: float = 1.0) -> None:
        super().__init__()
        self.depth = depth


@pytest.fixture(autouse=True)
def components(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test classes stand in for the registry (the real one stays as it is)."""
    table = {"_test_parent": _Parent, "_test_child": _Child, "_test_closed": _Closed}
    monkeypatch.setattr(config, "lookup", lambda kind, name: table[name])


def test_kwargs_follow_to_the_parent_signature_with_its_types() -> None:
    name, kwargs = check_component("objective", {"name": "_test_child", "depth": 2, "width": "5"}, "m")
    assert name == "_test_child" and kwargs == {"depth": 2.0, "width": 5}
    with pytest.raises(ConfigError) as err:
        check_component("objective", {"name": "_test_child", "widht": 5}, "m")
    assert err.value.path == "m.widht" and "width" in str(err.value) and "depth" in str(err.value)
    with pytest.raises(ConfigError, match=r"m\.width"):
        check_component("objective", {"name": "_test_child", "width": "wide"}, "m")


def test_without_kwargs_only_the_own_signature() -> None:
    with pytest.raises(ConfigError) as err:
        check_component("objective", {"name": "_test_closed", "width": 5}, "m")
    assert err.value.path == "m.width"
    assert check_component("objective", {"name": "_test_closed", "depth": 0.5}, "m") == ("_test_closed", {"depth": 0.5})
