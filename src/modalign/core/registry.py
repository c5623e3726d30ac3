"""One registry per component kind, filled by a decorator.

    @register("encoder", "image_cnn")
    class ImageCNN(Encoder): ...

    create("encoder", "image_cnn", in_channels=1, dim=128)
    available("encoder", "image_*")

Component packages register on import. ``create``/``available``/``lookup`` import the package
that owns a kind on first use (by module name, so ``modalign.core`` keeps no static import of
the layers below it).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from modalign.core.errors import UnknownComponentError

T = TypeVar("T")

#: Package that registers each kind's components when imported.
KIND_MODULES: dict[str, str] = {
    "dataset": "modalign.data.datasets",
    "encoder": "modalign.encoders",
    "head": "modalign.nn.heads",
    "fusion": "modalign.fusion",
    "objective": "modalign.objectives",
    "method": "modalign.methods",
}

_REGISTRIES: dict[str, dict[str, Any]] = {kind: {} for kind in KIND_MODULES}


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class/function decorator that registers ``obj`` as component ``name`` of ``kind``.

    Raises:
        KeyError: If ``kind`` is unknown or ``name`` is already taken.
    """
    if kind not in _REGISTRIES:
        raise KeyError(f"unknown component kind {kind!r}; allowed: {sorted(_REGISTRIES)}")

    def deco(obj: T) -> T:
        if name in _REGISTRIES[kind]:
            raise KeyError(f"{kind} {name!r} is already registered")
        _REGISTRIES[kind][name] = obj
        return obj

    return deco


def _ensure_loaded(kind: str) -> None:
    if kind not in _REGISTRIES:
        raise KeyError(f"unknown component kind {kind!r}; allowed: {sorted(_REGISTRIES)}")
    importlib.import_module(KIND_MODULES[kind])


def available(kind: str, pattern: str = "*") -> list[str]:
    """Sorted names of registered ``kind`` components matching the glob ``pattern``."""
    _ensure_loaded(kind)
    return sorted(n for n in _REGISTRIES[kind] if fnmatch.fnmatch(n, pattern))


def lookup(kind: str, name: str) -> Any:
    """Return the registered class/function ``name`` of ``kind``.

    Raises:
        UnknownComponentError: With the allowed names and the closest matches.
    """
    _ensure_loaded(kind)
    try:
        return _REGISTRIES[kind][name]
    except KeyError:
        names = sorted(_REGISTRIES[kind])
        close = difflib.get_close_matches(name, names, n=3)
        raise UnknownComponentError(kind, name, names, close) from None


def create(kind: str, name: str, **kwargs: Any) -> Any:
    """Instantiate component ``name`` of ``kind``; ``None`` kwargs are dropped so defaults hold."""
    factory = lookup(kind, name)
    return factory(**{k: v for k, v in kwargs.items() if v is not None})
