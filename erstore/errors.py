"""Exceptions raised by erstore.

Every error derives from `ErstoreError` and also from the built-in exception a caller would
naturally catch (`KeyError` for a missing key, `ValueError` for bad input, ...). Messages name
the path or key involved, what was expected, what was found and what to do about it.
"""

from __future__ import annotations


class ErstoreError(Exception):
    """Base class of every error raised by erstore."""


class StoreNotFoundError(ErstoreError, FileNotFoundError):
    """The path does not hold an erstore store (or the requested version does not exist)."""


class KeyNotFoundError(ErstoreError, KeyError):
    """A sequence key is not in the store version being read."""

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return str(self.args[0]) if self.args else ""


class IncompatibleStoreError(ErstoreError, ValueError):
    """The store's format version or recipe does not match what the caller needs."""


class CorruptStoreError(ErstoreError, RuntimeError):
    """Stored bytes do not match what was recorded at write time."""


class InvalidInputError(ErstoreError, ValueError):
    """A corpus, option or argument is malformed."""


class StorePermissionError(ErstoreError, PermissionError):
    """The store location cannot be written."""


class CommitConflictError(ErstoreError, RuntimeError):
    """Another writer kept winning the race to commit the next version."""


class StoreUnreachableError(ErstoreError, ConnectionError):
    """The store's endpoint (object storage or HTTP server) cannot be reached."""


class MissingDependencyError(ErstoreError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""
