"""Checks a build runs before it reads the corpus or loads model weights.

Everything that can be known from the options, the model's config and the store's own metadata
is checked here, in seconds, so that a mistake costs no corpus pass, no model load and no
compute, and leaves nothing behind: no store folder, no probe object, no version. The order is
the build's: options, device, positions, then each target store (reachable, credentials,
conditional writes, writable, recipe conflict with an existing store).

Not here: the checks that need the weights (the model fingerprint half of the recipe; the
writer checks the full recipe when it opens the store).
"""

from __future__ import annotations

from typing import Any

from erstore.errors import (
    IncompatibleStoreError,
    InvalidInputError,
)
from erstore.location import Location
from erstore.manifest import STORE_FILE, Recipe, StoreMeta

WRITER_OPTIONS = ("flush_bytes", "journal_seconds")  # StoreWriter options, not Location ones

# Families whose position ids start after the padding index (RoBERTa-style): usable positions
# are max_position_embeddings - (pad_token_id + 1).
_PADDING_OFFSET = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "longformer",
                   "data2vec-text", "ernie_m", "luke", "markuplm"}


def check_max_length(max_length: int | None) -> None:
    """`--max-length 0` (or any value below 8) is refused instead of meaning "default"."""
    if max_length is not None and max_length < 8:
        raise InvalidInputError(
            f"--max-length must be at least 8 tokens, got {max_length}; omit it for the default "
            "(min(512, the model's limit), or a sentence-transformers model's max_seq_length)"
        )


def window_length(max_length: int | None, tokenizer: Any, model: Any) -> int:
    """Tokens per window: `max_length`, or by default min(512, the tokenizer's limit), and no more
    than a sentence-transformers model's `max_seq_length` (256 for all-MiniLM-L6-v2).

    sentence-transformers truncates at max_seq_length, so with this default a document's first
    window is exactly what the model's authors embed (consumers.embed reads it from the store).
    An explicit longer `max_length` is allowed (the position limit is checked separately) with a
    warning: embeddings of longer texts then need their truncated window computed, not read.
    """
    from erstore.tokenize import model_identity, sentence_transformers_length

    limit = sentence_transformers_length(model)
    if max_length is None:
        default = min(512, int(tokenizer.model_max_length))
        return default if limit is None else min(default, limit)
    if limit is not None and max_length > limit:
        import warnings

        warnings.warn(
            f"--max-length {max_length} is above the max_seq_length {limit} of the sentence-transformers "
            f"model {model_identity(model) or type(model).__name__!r}: windows are longer than the model "
            f"embeds; for an embedding store omit --max-length (or use {limit})",
            UserWarning, stacklevel=3,
        )
    return max_length


def position_limit(config: Any) -> int | None:
    """The most tokens a window may hold for this model config (None: no absolute positions)."""
    if getattr(config, "is_encoder_decoder", False) or config.model_type == "t5":
        return None  # relative position buckets
    if config.model_type == "deberta-v2" and not getattr(config, "position_biased_input", True):
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    if config.model_type in _PADDING_OFFSET and isinstance(getattr(config, "pad_token_id", None), int):
        limit -= config.pad_token_id + 1
    return limit


def check_positions(max_length: int, config: Any, model: str) -> None:
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        raise InvalidInputError(
            f"--max-length {max_length} is above the position limit of {model!r} ({limit} tokens, "
            f"from max_position_embeddings); use --max-length {limit} or less"
        )


def check_device(device: str) -> None:
    """A clear error for a device this torch cannot use (e.g. cuda on a CPU-only build)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise InvalidInputError(f"--device {device!r} is not a torch device ({e}); use cpu, cuda or cuda:N") from e
    if dev.type == "cpu":
        return
    try:
        torch.empty(1, device=dev)
    except (AssertionError, RuntimeError, ValueError) as e:  # torch raises AssertionError for cuda on CPU builds
        build = f"torch {torch.__version__}"
        hint = "--device cpu, or install a torch build with CUDA" if dev.type == "cuda" else "--device cpu"
        raise InvalidInputError(f"--device {device!r} is not available with {build} ({_first(e)}); use {hint}") from e


def _first(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def location_options(store_options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in store_options.items() if k not in WRITER_OPTIONS}


def check_store(url: str, partial: dict[str, Any], *, adopt: frozenset[str] = frozenset(),
                **options: Any) -> Recipe | None:
    """Reachable, writable, conditional writes, and no recipe conflict; creates nothing. Returns
    the existing store's recipe (None for a new store).

    `partial` holds the recipe fields known before the weights are loaded; an existing store
    whose recipe differs in any of them but those in `adopt` (defaults the caller will take from
    the store) is refused now, not after a corpus pass.
    """
    location = Location.open(url, **options)
    location.preflight(write=True)
    raw = location.read(STORE_FILE)
    if raw is None:
        return None
    stored = StoreMeta.from_json(raw, f"{location.url}/{STORE_FILE}").recipe
    check_recipe(location.url, stored, {k: v for k, v in partial.items() if k not in adopt})
    return stored


def check_recipe(url: str, stored: Recipe, partial: dict[str, Any]) -> None:
    """Refuse a build whose recipe fields in `partial` differ from the store's."""
    diffs = [f"{name}: store has {getattr(stored, name)!r}, this build has {value!r}"
             for name, value in partial.items() if name in Recipe.IDENTITY and getattr(stored, name) != value]
    if diffs:
        raise IncompatibleStoreError(
            f"{url} holds a store built with another recipe ({'; '.join(diffs)}). "
            "Build into a different --store, or use the store's settings"
        )

