"""Importing optional dependencies with an error that names the extra to install.

erstore's core needs only what `pip install erstore` brings. Everything else (LoRA through
peft, plots through matplotlib, columnar corpora through pyarrow / datasets, ...) is an extra
in pyproject.toml, and `require` turns a missing one into a `MissingDependencyError` that says
which `pip install 'erstore[EXTRA]'` provides it, instead of a bare `ModuleNotFoundError`.
Not here: version checks (pip's resolver owns those).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from erstore.errors import MissingDependencyError


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise MissingDependencyError naming `extra`.

    Example: ``peft = require("peft", extra="consumers", purpose="LoRA adapters")``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingDependencyError(
            f"{purpose} needs the optional package {top!r}, which is not installed; "
            f"install it with: pip install 'erstore[{extra}]'"
        ) from e
