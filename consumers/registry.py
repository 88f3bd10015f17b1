"""Which `Tail` class runs the tail of which model family, keyed by transformers' `model_type`.

The built-in families live in `consumers/models/`, one module each (as transformers keeps
`models/<family>/`). A family from user code joins without editing this package, either way:

    import consumers
    consumers.register_family("my_llama", MyLlamaTail)          # a Tail subclass, or "pkg.mod:Class"

    # or, in the user's package metadata (pyproject.toml), found on first look-up:
    [project.entry-points."erstore.families"]
    my_llama = "my_package.tails:MyLlamaTail"

Look-ups import a family's module only when a store of that family is opened. This module
imports only `consumers.base` (no import circle with `consumers.tail`, which imports this one).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from .base import Tail
from erstore.errors import IncompatibleStoreError, InvalidInputError

#: The package's import name: `consumers` inside the repository, `erstore_consumers` installed.
_PKG = __package__ or "consumers"

#: Entry-point group scanned for families that other installed packages provide.
ENTRY_POINT_GROUP = "erstore.families"

FAMILIES: dict[str, str | type[Tail]] = {
    "bert": f"{_PKG}.models.bert:BertTail",
    "roberta": f"{_PKG}.models.roberta:RobertaTail",
    "distilbert": f"{_PKG}.models.distilbert:DistilBertTail",
    "deberta-v2": f"{_PKG}.models.deberta_v2:DebertaV2Tail",
    "mpnet": f"{_PKG}.models.mpnet:MPNetTail",
    "t5": f"{_PKG}.models.t5:T5Tail",
    "gpt2": f"{_PKG}.models.gpt2:GPT2Tail",
    "llama": f"{_PKG}.models.llama:LlamaTail",
    "mistral": f"{_PKG}.models.mistral:MistralTail",
    "qwen2": f"{_PKG}.models.qwen2:Qwen2Tail",
    "qwen3": f"{_PKG}.models.qwen3:Qwen3Tail",
    "gemma2": f"{_PKG}.models.gemma2:Gemma2Tail",
    "gemma3_text": f"{_PKG}.models.gemma3:Gemma3Tail",
    "phi3": f"{_PKG}.models.phi3:Phi3Tail",
}

HOW_TO_ADD = (
    "To add a family from your own code, subclass consumers.Tail (consumers/models/llama.py is a "
    "short example) and call consumers.register_family({model_type!r}, YourTail), or declare it "
    f"as an entry point in group {ENTRY_POINT_GROUP!r} ({{model_type}} = \"your_pkg.module:YourTail\"); "
    "see docs/decoders.md"
)


def register_family(model_type: str, tail: type[Tail] | str, *, replace: bool = False) -> None:
    """Make `tail` the Tail class for stores whose recipe has this `model_type`.

    Args:
        model_type: transformers' `config.model_type` (as `erstore info` shows it).
        tail: a `consumers.Tail` subclass, or "package.module:ClassName" (imported on first use).
        replace: allow replacing a family that is already registered (a built-in one too).

    Raises:
        InvalidInputError: `tail` is not a Tail subclass or "module:Class" string, or the
            model_type is registered already and replace is False.
    """
    if isinstance(tail, str):
        if tail.count(":") != 1 or not all(tail.split(":")):
            raise InvalidInputError(f"register_family({model_type!r}, {tail!r}): give 'package.module:ClassName'")
    elif not (isinstance(tail, type) and issubclass(tail, Tail)):
        raise InvalidInputError(
            f"register_family({model_type!r}, {tail!r}): expected a subclass of consumers.Tail"
        )
    current = FAMILIES.get(model_type)
    if current is not None and current != tail and not replace:
        raise InvalidInputError(
            f"model_type {model_type!r} is already served by {current!r}; pass replace=True to replace it"
        )
    FAMILIES[model_type] = tail


def _from_entry_points(model_type: str) -> str | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == model_type:
            return ep.value
    return None


def tail_class(model_type: str) -> type[Tail]:
    """The Tail subclass for a recipe's model_type; IncompatibleStoreError if there is none."""
    target = FAMILIES.get(model_type)
    if target is None:
        target = _from_entry_points(model_type)
        if target is None:
            raise IncompatibleStoreError(
                f"no reduced-model tail for model_type {model_type!r}; supported: "
                f"{', '.join(sorted(FAMILIES))}. " + HOW_TO_ADD.format(model_type=model_type)
            )
        register_family(model_type, target)
    if isinstance(target, type):
        return target
    module, name = target.split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise IncompatibleStoreError(
            f"the tail for model_type {model_type!r} is registered as {target!r}, which cannot be "
            f"imported: {e}. Fix the registration or install the package that provides it"
        ) from e
    if not (isinstance(cls, type) and issubclass(cls, Tail)):
        raise IncompatibleStoreError(f"{target!r} (tail for {model_type!r}) is not a consumers.Tail subclass")
    return cls
