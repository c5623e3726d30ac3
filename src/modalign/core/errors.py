"""Exceptions with messages that name the problem (key path, file, row, modality)."""

from __future__ import annotations


class ModalignError(Exception):
    """Base class of every error modalign raises on purpose."""


class ConfigError(ModalignError, ValueError):
    """An invalid configuration value, key or component name.

    Attributes:
        path: Dotted key path, e.g. ``model.encoders.image.name``.
        allowed: Allowed values or keys, when there is a finite set.
    """

    def __init__(
        self, path: str, message: str, allowed: list[str] | None = None, suggestions: list[str] | None = None
    ) -> None:
        self.path = path
        self.message = message
        self.allowed = allowed or []
        self.suggestions = suggestions or []
        text = f"{path}: {message}" if path else message
        if self.suggestions:
            text += f" (did you mean {' or '.join(repr(s) for s in self.suggestions)}?)"
        if self.allowed:
            text += f"; allowed: {', '.join(self.allowed)}"
        super().__init__(text)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key path placed under ``prefix`` (e.g. ``method.objectives.0``)."""
        path = f"{prefix}.{self.path}" if self.path else prefix
        return ConfigError(path, self.message, self.allowed, self.suggestions)


class UnknownComponentError(ModalignError, KeyError):
    """A component name that no registry entry matches."""

    def __init__(self, kind: str, name: str, allowed: list[str], close: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.allowed = allowed
        self.close = close
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        super().__init__(f"unknown {kind} {name!r}{hint}; allowed: {', '.join(allowed)}")

    def __str__(self) -> str:
        return str(self.args[0])


class DataError(ModalignError):
    """Missing or unreadable data: the message names the file, row, key or modality."""


class MissingDataRootError(DataError, FileNotFoundError):
    """A dataset's root folder or one of its expected files does not exist."""


class TrainingError(ModalignError):
    """A training step failed in a way the user can act on (non-finite loss, out of memory).

    The message names the step, the epoch, the batch and what to change.
    """


class CheckpointError(ModalignError, RuntimeError):
    """A checkpoint that cannot be read or does not match the model; the message names the file."""


class RunDirError(ModalignError, OSError):
    """A run directory that cannot be created or written to."""
