"""erstore: a versioned, content-addressed store of transformer hidden states.

    import erstore
    store = erstore.open("./stores/minilm-l3")              # newest version
    h = store.get(store.key_for("Some text in the corpus."))  # [n_tokens, d]

`import erstore` loads neither torch nor transformers; building (`erstore.build`) and
`Store.key_for` load them on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from erstore.errors import (
    CommitConflictError,
    CorruptStoreError,
    ErstoreError,
    IncompatibleStoreError,
    InvalidInputError,
    KeyNotFoundError,
    StoreNotFoundError,
    StorePermissionError,
    StoreUnreachableError,
)

if TYPE_CHECKING:
    from erstore.builder import BuildConfig, BuildResult
    from erstore.keys import key_for_ids
    from erstore.store import Entry, Store


def __getattr__(name: str) -> Any:
    # Loaded on first use (PEP 562), so that `import erstore` - and with it the CLI's start-up,
    # where a Ctrl-C must give one line, not a traceback - does not wait for numpy or TensorStore.
    if name in ("Entry", "Store"):
        from erstore import store

        return getattr(store, name)
    if name == "key_for_ids":
        from erstore.keys import key_for_ids

        return key_for_ids
    raise AttributeError(f"module 'erstore' has no attribute {name!r}")

__version__ = "0.1.0"


def open(path: str | os.PathLike[str], *, version: int | str | None = None, **options: Any) -> Store:
    """Open a store read-only at `version`: a number, a tag name (`erstore tag`) or None (newest).

    `path` is a folder, `s3://bucket/prefix` (options `endpoint=`, `region=`, else AWS_* variables)
    or a read-only `http(s)://` URL.

    Raises StoreNotFoundError if `path` is not a store or has no such version, and
    IncompatibleStoreError if it was written by a newer erstore format.
    """
    from erstore.store import Store

    return Store(path, version=version, **options)


def build(config: BuildConfig | None = None, **options: Any) -> list[BuildResult]:
    """Run `erstore build` from Python: `erstore.build(model=..., layers=3, corpus=..., store=...)`.

    `model` / `tokenizer` may be loaded transformers objects; `corpus` a path in any supported
    format, a `datasets.Dataset`, or any iterable of strings or dicts (see docs/corpus.md).
    """
    from erstore.builder import BuildConfig
    from erstore.builder import build as run

    return run(config or BuildConfig(**options))


__all__ = [
    "CommitConflictError", "CorruptStoreError", "Entry", "ErstoreError", "IncompatibleStoreError",
    "InvalidInputError", "KeyNotFoundError", "Store", "StoreNotFoundError", "StorePermissionError",
    "StoreUnreachableError", "build", "key_for_ids", "open",
]
