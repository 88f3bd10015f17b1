"""`erstore build`: run a model over a corpus once and store the hidden states of layer k.

Order of work, chosen so that bad input fails before any compute and nothing is computed twice:
read the corpus, load tokenizer and model, check layers and open every target store (recipe
checks), tokenize everything into windows, drop windows already stored (or left durable by an
interrupted build), then run the rest in length-sorted batches and commit one version per store.

Several `layers` are written from one forward pass, one store per layer (see README: a consumer
needs exactly one layer, and per-layer stores keep recipes, versions and space reclamation
independent).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from erstore.codecs import parse_codec
from erstore.corpus import DEFAULT_CORPUS, check_corpus, corpus_label, iter_corpus
from erstore.errors import InvalidInputError
from erstore.keys import window_key
from erstore.manifest import Recipe, VersionManifest
from erstore.model import LayerExtractor, to_numpy
from erstore.tokenize import DEFAULT_MODEL, Windower, load_tokenizer, model_identity, tokenizer_fingerprint
from erstore.writer import StoreWriter


@dataclass(frozen=True)
class BuildConfig:
    """Everything `erstore build` needs; defaults build the packaged MiniLM over the stdlib corpus.

    `model` and `tokenizer` are names, folders or loaded transformers objects (tokenizer default:
    the model's); `corpus` is anything `erstore.corpus.iter_corpus` reads (a path in any supported
    format, a datasets.Dataset, an iterable of strings or dicts); `layers` an int or several.
    """

    model: Any = DEFAULT_MODEL
    layers: tuple[int, ...] = ()  # empty: the middle layer
    corpus: Any = DEFAULT_CORPUS
    store: str | None = None  # default: ./stores/<model>-l<k>
    dtype: str = "float16"
    codec: str = "lossless"  # lossless | shuffle | int8[:scales=...] | int4[:group=N] | entropy[:step=S]; see docs/codecs.md
    max_length: int | None = None  # default: min(512, tokenizer limit)
    stride: int | None = None  # default: max_length // 4
    batch_size: int = 32
    device: str = "cpu"
    text_field: str = "text"
    pair_field: str | None = None
    id_field: str | None = None
    words_field: str | None = None  # JSONL list of words, tokenized with is_split_into_words
    limit: int | None = None
    progress: bool = True
    store_options: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    format: str | None = None  # corpus format; default: by file extension

    def __post_init__(self) -> None:
        layers = (self.layers,) if isinstance(self.layers, int) else self.layers
        try:
            layers = tuple(int(k) for k in layers)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"layers must be an int or a sequence of ints, got {self.layers!r}") from e
        object.__setattr__(self, "layers", layers)

    def corpus_options(self) -> dict[str, Any]:
        return {"format": self.format, "text_field": self.text_field, "pair_field": self.pair_field,
                "id_field": self.id_field, "words_field": self.words_field}


@dataclass(frozen=True)
class BuildResult:
    """What one build did to one store."""

    store: str
    layer: int
    version: VersionManifest | None  # None: nothing new, no version committed
    documents: int
    windows: int
    computed: int
    resumed: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        v = self.version
        head = f"store {self.store} (layer {self.layer}): "
        if v is None:
            return head + f"nothing new in {self.windows} windows; no version committed"
        return head + (
            f"version {v.version}: +{v.added.sequences} sequences, +{v.added.tokens} tokens, "
            f"+{v.added.bytes / 1e6:.1f} MB; now {v.totals.sequences} sequences, "
            f"{v.totals.tokens} tokens, {v.totals.bytes / 1e6:.1f} MB "
            f"({self.computed} computed, {self.resumed} resumed, {self.seconds:.1f} s)"
        )


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name.rstrip("/")).name).strip("-") or "model"


def store_paths(config: BuildConfig, layers: list[int]) -> dict[int, str]:
    name = slug(model_identity(config.model) or type(config.model).__name__)
    if len(layers) == 1:
        return {layers[0]: config.store or f"stores/{name}-l{layers[0]}"}
    root = config.store or f"stores/{name}"
    return {k: f"{root.rstrip('/')}/layer-{k}" for k in layers}


def build(config: BuildConfig, *, writer: Callable[..., StoreWriter] = StoreWriter) -> list[BuildResult]:
    """Build (or extend) one store per requested layer; return what each store got.

    `writer(path, recipe, **store_options)` makes each layer's writer; `erstore.distributed`
    passes one that writes a rank's shard and commits collectively.
    """
    clock = _Clock()
    check_corpus(config.corpus, **config.corpus_options())
    docs = list(iter_corpus(config.corpus, limit=config.limit, **config.corpus_options()))
    clock.lap("corpus")
    tokenizer_source = config.model if config.tokenizer is None else config.tokenizer
    tokenizer = load_tokenizer(tokenizer_source)
    max_length = config.max_length or min(512, int(tokenizer.model_max_length))
    windower = Windower(tokenizer, max_length, max_length // 4 if config.stride is None else config.stride)
    extractor = LayerExtractor(config.model, device=config.device)
    layers = sorted(set(config.layers or (extractor.num_layers // 2,)))
    for k in layers:
        extractor.check_layer(k)
    codec = parse_codec(config.codec, dtype=config.dtype)
    clock.lap("load")
    writers: dict[int, StoreWriter] = {}
    try:
        for k, path in store_paths(config, layers).items():
            recipe = Recipe(
                model_fingerprint=extractor.fingerprint, layer=k,
                tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), max_length=windower.max_length,
                stride=windower.stride, codec=codec.to_dict(), hidden_size=extractor.hidden_size,
                num_layers=extractor.num_layers, model_name=model_identity(config.model),
                model_type=extractor.config.model_type, tokenizer_name=model_identity(tokenizer_source),
                config=extractor.config.to_diff_dict(),
            )
            writers[k] = writer(path, recipe, **config.store_options)
        windows = _tokenize(docs, windower, writers)
        todo = _missing(windows, writers)
        clock.lap("tokenize")
        _compute(todo, extractor, writers, config)
        clock.lap("compute")
        tokens = sum(len(w[1]) for w in todo)
        info = {"corpus": corpus_label(config.corpus), "documents": len(docs), "windows": len(windows),
                "computed": len(todo), "computed_tokens": tokens, "device": config.device,
                "seconds": clock.laps,
                "tokens_per_second": round(tokens / max(clock.laps["compute"], 1e-9), 1)}
        committed = {k: (w.adopted_sequences, w.commit(build=info)) for k, w in writers.items()}
        clock.lap("commit")
        return [BuildResult(str(writers[k].location.url), k, manifest, len(docs), len(windows), len(todo),
                            resumed, clock.total, dict(clock.laps))
                for k, (resumed, manifest) in committed.items()]
    finally:
        for writer in writers.values():
            writer.close()


class _Clock:
    """Wall time of each build phase, recorded in the version manifest (throughput for costing)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.last = now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def _tokenize(docs: list, windower: Windower, writers: dict[int, StoreWriter]) -> list[tuple[str, list[int], int]]:
    """All windows of all documents as (key, ids, boundary); records each document's keys."""
    out: list[tuple[str, list[int], int]] = []
    step = 512
    for start in range(0, len(docs), step):
        part = docs[start : start + step]
        pairs = [d.pair for d in part] if part[0].pair is not None else None
        if pairs is not None and any(p is None for p in pairs):
            raise InvalidInputError("some documents have a text pair and some do not; give all or none")
        split = getattr(part[0], "words", None) is not None  # pre-tokenized (--words-field)
        texts = [d.words for d in part] if split else [d.text for d in part]
        for doc, windows in zip(part, windower.windows_batch(texts, pairs, split_words=split)):
            keys = [window_key(ids, b) for ids, b in windows]
            for writer in writers.values():
                writer.add_document(doc.id, keys)
            out.extend((key, ids, b) for key, (ids, b) in zip(keys, windows))
    return out


def _missing(windows: list[tuple[str, list[int], int]], writers: dict[int, StoreWriter]) -> list:
    """Unique windows that at least one target store lacks, with the layers that need them."""
    unique: dict[str, tuple[list[int], int]] = {}
    for key, ids, b in windows:
        unique.setdefault(key, (ids, b))
    keys = list(unique)
    need = {k: w.missing(keys) for k, w in writers.items()}
    todo = []
    for i, key in enumerate(keys):
        layers = [k for k in writers if need[k][i]]
        if layers:
            todo.append((key, *unique[key], layers))
    return todo


def length_batches(todo: list, batch_size: int) -> list[list]:
    """Batches of windows of exactly equal length, longest first.

    No padding means no wasted compute and no masked-attention path (whose rounding differs by
    ~1e-6 for MiniLM). Unpadded rows equal a lone run of the sequence for MiniLM on CPU; for other
    shapes the GEMM kernels may round differently with the batch size (~1e-7), so batch_size=1 is
    the way to make every sequence bit-identical to its lone run.
    """
    todo = sorted(todo, key=lambda t: len(t[1]), reverse=True)
    batches = []
    for _, group in itertools.groupby(todo, key=lambda t: len(t[1])):
        group = list(group)
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return batches


def _compute(todo: list, extractor: LayerExtractor, writers: dict[int, StoreWriter], config: BuildConfig) -> None:
    """Run the model over `todo` in equal-length batches and append each layer's states."""
    import torch
    from tqdm.auto import tqdm

    layers = sorted(writers)
    codec = next(iter(writers.values())).codec
    cast = codec.dtype if codec.lossless else "float32"  # lossless: cast on the torch side (fast)
    use_types = extractor.accepts_token_types()
    bar = tqdm(total=len(todo), unit="seq", disable=not config.progress or None, desc="build",
               dynamic_ncols=True)
    tokens_done, t0 = 0, time.perf_counter()
    device = extractor.device
    try:
        for batch in length_batches(todo, config.batch_size):
            ids = torch.tensor([t[1] for t in batch], dtype=torch.long)
            mask = torch.ones_like(ids)
            types = None
            if use_types:
                types = torch.zeros_like(ids)
                for row, (_, _, boundary, _) in enumerate(batch):
                    if boundary:
                        types[row, boundary:] = 1
            hidden = extractor(ids.to(device), mask.to(device),
                               None if types is None else types.to(device), layers)
            arrays = {k: to_numpy(h, cast) for k, h in hidden.items()}
            for row, (key, tok, boundary, need) in enumerate(batch):
                for k in need:
                    writers[k].append(key, arrays[k][row], np.asarray(tok), boundary=boundary)
            tokens_done += ids.numel()
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens_done / max(time.perf_counter() - t0, 1e-9):,.0f}")
    finally:
        bar.close()
