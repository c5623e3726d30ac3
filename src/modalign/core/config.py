"""Validation of component arguments and ``key=value`` overrides.

A recipe names components as mappings: ``{name: image_cnn, width: 64}``. ``check_component``
resolves the name in the registry and validates every other key against the constructor's
signature and type hints, so a typo or a wrong type fails with the key path, the allowed
keys/values and a close-match suggestion.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import typing
from typing import Any

import pydantic
import yaml

from modalign.core.errors import ConfigError, UnknownComponentError
from modalign.core.registry import lookup


def _init_chain(factory: Any) -> list[Any]:
    """The callables whose parameters a component takes.

    A function: itself. A class: its ``__init__``, and while that forwards ``**kwargs`` (to
    ``super().__init__``), the ``__init__`` of the next class up the MRO that defines one, so a
    subclass that adds arguments accepts its parent's too without repeating them.
    """
    if not inspect.isclass(factory):
        return [factory]
    chain = []
    for cls in factory.__mro__:
        if "__init__" not in vars(cls) or cls is object:
            continue
        chain.append(vars(cls)["__init__"])
        kinds = {p.kind for p in inspect.signature(chain[-1]).parameters.values()}
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            break
    return chain


def _signature_params(factory: Any) -> dict[str, inspect.Parameter]:
    params: dict[str, inspect.Parameter] = {}
    for target in _init_chain(factory):
        for k, p in inspect.signature(target).parameters.items():
            if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(k, p)
    return params


def _type_hints(factory: Any) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for target in reversed(_init_chain(factory)):
        try:
            hints.update(typing.get_type_hints(target))
        except Exception:  # unresolvable forward refs: skip type checks rather than crash
            continue
    return hints


def check_component(
    kind: str, spec: Any, path: str, provided: frozenset[str] = frozenset()
) -> tuple[str, dict[str, Any]]:
    """Validate a component mapping and return ``(name, kwargs)`` with values coerced.

    Args:
        kind: Registry kind, e.g. ``"encoder"``.
        spec: ``{"name": str, **kwargs}`` from a recipe.
        path: Key path of ``spec`` for error messages, e.g. ``model.encoders.image``.
        provided: Constructor arguments the framework fills in itself (e.g. ``in_channels``);
            a recipe may not set them.

    Raises:
        ConfigError: Unknown name, unknown key, missing required key or wrong value type.
    """
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(path, f"expected a mapping with a 'name' key, got {spec!r}")
    name = spec["name"]
    try:
        factory = lookup(kind, str(name))
    except UnknownComponentError as e:
        raise ConfigError(f"{path}.name", f"unknown {kind} {name!r}", e.allowed, e.close) from None
    params = _signature_params(factory)
    hints = _type_hints(factory)
    settable = sorted(k for k in params if k not in provided)
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "name":
            continue
        if key not in settable:
            close = difflib.get_close_matches(key, settable, n=2)
            raise ConfigError(f"{path}.{key}", f"unknown argument of {kind} {name!r}", settable, close)
        kwargs[key] = _coerce(f"{path}.{key}", hints.get(key), value)
    missing = [k for k in settable if params[k].default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ConfigError(f"{path}.{missing[0]}", f"required argument of {kind} {name!r} is missing")
    return str(name), kwargs


def _coerce(path: str, hint: Any, value: Any) -> Any:
    if hint is None or value is None:
        return value
    try:
        return pydantic.TypeAdapter(hint).validate_python(value, strict=False)
    except pydantic.ValidationError as e:
        msg = e.errors()[0]["msg"]
        raise ConfigError(path, f"invalid value {value!r}: {msg} (expected {_hint_name(hint)})") from None
    except pydantic.PydanticSchemaGenerationError:
        return value


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into ``(["a", "b", "c"], value)``; the value is read as YAML.

    Raises:
        ConfigError: If there is no ``=`` or the key is empty.
    """
    if "=" not in text:
        raise ConfigError(text, "an override must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(text, "an override needs a key before '='")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``tree`` with ``key.path=value`` overrides applied.

    New keys are allowed here; schema validation afterwards rejects unknown ones with their path.
    """
    import copy

    out = copy.deepcopy(tree)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(keys[: i + 1]), f"is a value ({child!r}), not a section")
            node = child
        node[keys[-1]] = value
    return out
