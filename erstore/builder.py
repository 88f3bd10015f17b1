"""`erstore build`: run a model over a corpus once and store the hidden states of layer k.

Order of work, chosen so that bad input fails before any compute and nothing is computed twice:
check the options, tokenizer and model config (layers, position limit, device), then every
target store (reachable, writable, recipe), then the corpus's first record; only then load the
weights and stream. The corpus is never held whole: documents are tokenized in slices into a
bounded buffer (`buffer_tokens`), windows seen before in this corpus (a `KeySet`, 16 bytes per
window) or already in the store are dropped, the rest run in equal-length batches formed within
the buffer, and a background thread encodes and writes each batch while the next one computes.
One version per store is committed at the end.

Several `layers` are written from one forward pass, one store per layer (see README: a consumer
needs exactly one layer, and per-layer stores keep recipes, versions and space reclamation
independent).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from erstore import preflight, progress
from erstore.codecs import parse_codec
from erstore.corpus import DEFAULT_CORPUS, check_corpus, corpus_label, document_count, iter_corpus
from erstore.docmap import entry_line, line_keys
from erstore.errors import InvalidInputError
from erstore.keys import fast_window_key
from erstore.keyset import KeySet, halves
from erstore.manifest import Recipe, VersionManifest
from erstore.tokenize import DEFAULT_MODEL, Windower, load_tokenizer, model_identity, tokenizer_fingerprint
from erstore.writebehind import WriteBehind
from erstore.writer import StoreWriter

BUFFER_TOKENS = 1 << 20  # tokens of new windows held for length batching (~4 MB of ids)
FIRST_BUFFER_TOKENS = 1 << 14  # the first buffers are small so that compute starts at once
# Buffers a length's partial batch may wait through for more rows of its length. Partial batches
# cost forward time (one per rare length and flush: with 1 wait, the default 2,000-document build
# ran 252 batches against 176 formed in one pass, ~10% more compute); each buffer of waiting holds
# the resume frontier back by one buffer (re-read on resume, not recomputed).
WAIT_BUFFERS = 8
TOKENIZE_DOCS = 512  # documents per tokenizer call


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
    max_length: int | None = None  # default: min(512, tokenizer limit, sentence-transformers max_seq_length)
    stride: int | None = None  # default: max_length // 4
    batch_size: int = 32
    device: str = "cpu"
    text_field: str = "text"
    pair_field: str | None = None
    id_field: str | None = None
    words_field: str | None = None  # JSONL list of words, tokenized with is_split_into_words
    limit: int | None = None
    progress: bool | str = True  # True/"auto", "bar", "lines", False/"off": see erstore.progress
    store_options: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    format: str | None = None  # corpus format; default: by file extension
    buffer_tokens: int = BUFFER_TOKENS  # bounds build memory: see the module docstring
    # Fix glibc's mmap threshold for this process (see `_fixed_mmap_threshold`): a process-wide
    # setting, so off unless asked; the `erstore build` CLI turns it on.
    tune_malloc: bool = False

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

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable form (`erstore build --json`): counts, timings, and the new version."""
        v = self.version
        return {"store": self.store, "layer": self.layer, "documents": self.documents, "windows": self.windows,
                "computed": self.computed, "resumed": self.resumed, "seconds": round(self.seconds, 3),
                "phases": dict(self.phases),
                "version": None if v is None else {"version": v.version, "added": asdict(v.added),
                                                   "totals": asdict(v.totals)}}

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


def build(config: BuildConfig, *, writer: Callable[..., StoreWriter] = StoreWriter,
          shard: tuple[int, int] = (0, 1)) -> list[BuildResult]:
    """Build (or extend) one store per requested layer; return what each store got.

    `writer(path, recipe, **store_options)` makes each layer's writer; `erstore.distributed`
    passes one that writes a rank's shard and commits collectively, and `shard=(rank, world)`
    so that this process reads only its share of the corpus.
    """
    clock = _Clock()
    if config.tune_malloc:
        _fixed_mmap_threshold()
    tokenizer, model_config, layers, windower, codec = _check(config)
    paths = store_paths(config, layers)
    partial = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "max_length": windower.max_length,
               "stride": windower.stride, "codec": codec.to_dict(), "hidden_size": _hidden_size(model_config)}
    options = preflight.location_options(config.store_options)
    # Windowing left to its defaults is taken from an existing store, so that extending a store
    # keeps its windows even when the defaults have changed since it was built.
    adopt = frozenset(name for name in ("max_length", "stride") if getattr(config, name) is None)
    created: dict[str, Path] = {}  # local store folder -> its first ancestor that did not exist yet
    stored = {}
    for k, path in paths.items():
        stored[path] = preflight.check_store(path, {**partial, "layer": k}, adopt=adopt, **options)
        if "://" not in path and not Path(path).exists():
            created[path] = _first_missing(Path(path).expanduser().resolve())
    existing = [r for r in stored.values() if r is not None]
    if adopt and existing:
        windower = _adopted_windower(windower, existing[0], config, model_config)
        partial.update(max_length=windower.max_length, stride=windower.stride)
        for path, recipe in stored.items():
            if recipe is not None:
                preflight.check_recipe(path, recipe, partial)
    corpus_options = config.corpus_options()
    check_corpus(config.corpus, **corpus_options)  # a peek at the first record, before any weights
    clock.lap("check")
    report = progress.reporter("build" if shard[1] == 1 else f"build rank {shard[0]}/{shard[1]}", config.progress)

    from erstore.model import LayerExtractor

    with report.phase("load model", unit=None):
        extractor = LayerExtractor(config.model, device=config.device)
    clock.lap("load")
    writers: dict[int, StoreWriter] = {}
    try:
        for k, path in paths.items():
            recipe = Recipe(
                model_fingerprint=extractor.fingerprint, layer=k, tokenizer_fingerprint=partial["tokenizer_fingerprint"],
                max_length=windower.max_length, stride=windower.stride, codec=codec.to_dict(),
                hidden_size=extractor.hidden_size, num_layers=extractor.num_layers,
                model_name=model_identity(config.model), model_type=extractor.config.model_type,
                tokenizer_name=model_identity(config.model if config.tokenizer is None else config.tokenizer),
                config=extractor.config.to_diff_dict(),
            )
            writers[k] = writer(path, recipe, track_new_keys=False, **config.store_options)
        stats = _Stats()
        docs = _resume(lambda: iter_corpus(config.corpus, limit=config.limit, shard=shard, **corpus_options),
                       writers, stats)
        # Reading (+ tokenizing, dedup) streams into compute: both phases run at once; compute's
        # total becomes known when the corpus has been read.
        total = document_count(config.corpus, format=config.format, limit=config.limit) if shard[1] == 1 else None
        with report.phase("read", total=total, unit="documents",
                          detail=lambda: f"tokenized {stats.windows:,} windows; {stats.windows - stats.queued:,} "
                          f"seen before or stored, {stats.queued:,} to compute") as reading, \
                report.phase("compute", unit="sequences", detail=lambda: f"{stats.tokens:,} tokens, "
                             f"{stats.tokens / max(computing.elapsed, 1e-9):,.0f} tokens/s") as computing:
            if stats.skipped:
                reading.update(stats.skipped)  # durable before an interruption: read, not tokenized
            buffers = _buffers(docs, windower, writers, stats, config.buffer_tokens, (reading, computing))
            _compute(buffers, extractor, writers, config, stats, computing)
        clock.laps["tokenize"] = round(stats.tokenize_s, 3)
        clock.lap("compute")
        clock.laps["compute"] = round(clock.laps["compute"] - stats.tokenize_s, 3)
        info = {"corpus": corpus_label(config.corpus), "documents": stats.documents, "windows": stats.windows,
                "computed": stats.computed, "computed_tokens": stats.tokens, "device": config.device,
                "seconds": clock.laps, "first_batch_s": stats.first_batch_s,
                "write_wait_s": round(stats.write_wait_s, 3),
                "tokenized_documents": stats.documents - stats.skipped, "skipped_documents": stats.skipped,
                "tokens_per_second": round(stats.tokens / max(clock.laps["compute"], 1e-9), 1)}
        committed = {}
        with report.phase("commit", total=len(writers), unit="stores") as committing:
            for k, w in writers.items():
                committed[k] = (w.adopted_sequences, w.commit(build=info))
                committing.update()
        clock.lap("commit")
        return [BuildResult(str(writers[k].location.url), k, manifest, stats.documents, stats.windows,
                            stats.computed, resumed, clock.total, dict(clock.laps))
                for k, (resumed, manifest) in committed.items()]
    except BaseException:
        # A failure before anything became durable leaves no store behind (see StoreWriter.discard);
        # journaled rows stay for the next build to adopt.
        for w in writers.values():
            with contextlib.suppress(Exception):
                w.discard()
        for path, top in created.items():
            _remove_empty_parents(path, top)
        raise
    finally:
        for w in writers.values():
            w.close()


def _fixed_mmap_threshold(nbytes: int = 256 * 1024, arenas: int = 2) -> None:
    """Keep glibc from raising its mmap threshold as large buffers come and go, and from giving
    every thread its own heap.

    A build allocates and frees flush-sized arrays (up to `flush_bytes`) over and over; glibc's
    dynamic threshold then serves them from the heap, which fragments and never shrinks: RSS
    grew with the corpus (a writer alone: 58 -> 249 MiB over 200k sequences; 58 -> 103 MiB with
    a fixed threshold). The tokenizer, torch, the write-behind thread and TensorStore's threads
    each also get a malloc arena of their own, each fragmenting apart: at most `arenas` of them
    cut a 2M-document build's peak by ~20 MiB (benchmarks/README.md). Both settings hold for the
    rest of the process (glibc cannot undo them), which is why a library call does this only
    when asked (`BuildConfig.tune_malloc`). Other allocators and platforms: nothing to do.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, arenas)  # M_ARENA_MAX


def _first_missing(path: Path) -> Path:
    while not path.parent.exists():
        path = path.parent
    return path


def _remove_empty_parents(path: str, top: Path) -> None:
    """Remove the empty folders between a discarded store and the first one it created."""
    folder = Path(path).expanduser().resolve()
    while True:
        if folder.exists():
            try:
                folder.rmdir()
            except OSError:
                return  # not empty: something else lives there
        if folder == top or folder == folder.parent:
            return
        folder = folder.parent


def _check(config: BuildConfig) -> tuple[Any, Any, list[int], Windower, Any]:
    """Options, tokenizer, model config, layers, positions and device: no weights, no corpus."""
    if config.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.buffer_tokens < 1:
        raise InvalidInputError(f"buffer_tokens must be at least 1, got {config.buffer_tokens}")
    preflight.check_max_length(config.max_length)
    tokenizer = load_tokenizer(config.model if config.tokenizer is None else config.tokenizer)
    model_config = _model_config(config.model)
    num_layers = int(getattr(model_config, "num_hidden_layers", 0) or model_config.num_layers)
    layers = sorted(set(config.layers or (num_layers // 2,)))
    for k in layers:
        if not 0 <= k <= num_layers:
            raise InvalidInputError(
                f"--layer {k} is out of range for {config.model!r}, which has {num_layers} layers: choose "
                f"0..{num_layers} (hidden_states index; the middle is {num_layers // 2})"
            )
    max_length = preflight.window_length(config.max_length, tokenizer, config.model)
    preflight.check_positions(max_length, model_config, config.model)
    preflight.check_device(config.device)
    codec = parse_codec(config.codec, dtype=config.dtype)
    windower = Windower(tokenizer, max_length, max_length // 4 if config.stride is None else config.stride)
    return tokenizer, model_config, layers, windower, codec


def _adopted_windower(windower: Windower, stored: Any, config: BuildConfig, model_config: Any) -> Windower:
    """`windower` with the stored recipe's max_length (and stride, unless given)."""
    max_length = stored.max_length if config.max_length is None else config.max_length
    stride = stored.stride if config.stride is None else config.stride
    if (max_length, stride) == (windower.max_length, windower.stride):
        return windower
    preflight.check_positions(max_length, model_config, config.model)
    return Windower(windower.tokenizer, max_length, stride)


def _model_config(name: Any) -> Any:
    if not isinstance(name, (str, os.PathLike)):  # a loaded model: its own config
        if not hasattr(getattr(name, "config", None), "to_diff_dict"):
            raise InvalidInputError(
                f"model must be a name, a folder or a loaded transformers model, got {type(name).__name__}"
            )
        return name.config
    import transformers
    from transformers import AutoConfig

    from erstore.tokenize import resolve_model

    transformers.logging.set_verbosity_error()
    try:
        return AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as e:
        raise InvalidInputError(
            f"cannot load model {name!r}: {e}. Pass --model a folder with config.json and "
            "weights, or a model name available offline"
        ) from e


def _hidden_size(model_config: Any) -> int:
    return int(getattr(model_config, "hidden_size", 0) or model_config.d_model)


@dataclass
class _Stats:
    documents: int = 0
    windows: int = 0
    computed: int = 0
    tokens: int = 0
    queued: int = 0  # new windows handed to compute
    tokenize_s: float = 0.0
    write_wait_s: float = 0.0
    first_batch_s: float | None = None
    started: float = field(default_factory=time.perf_counter)
    skipped: int = 0  # documents of an interrupted build's durable input, not tokenized again
    seen: KeySet = field(default_factory=KeySet)  # every window key of this corpus so far
    hasher: Any = field(default_factory=xxhash.xxh3_128)  # of the documents read so far
    # documents read -> (digest of them, {layer: document-map bytes}) at each slice boundary
    # not yet behind the durable frontier: what a resume point records (see `buffered_batches`)
    boundaries: dict[int, tuple[str, dict[int, int]]] = field(default_factory=dict)

    def boundary(self, writers: dict[int, StoreWriter]) -> None:
        self.boundaries[self.documents] = (self.hasher.hexdigest(), {k: w.docs_bytes for k, w in writers.items()})


def _hash_document(hasher: Any, doc: Any) -> None:
    """What decides a document's windows and map entry: id, text, pair and words."""
    words = None if doc.words is None else list(doc.words)
    hasher.update(json.dumps([doc.id, doc.text, doc.pair, words], ensure_ascii=False).encode())


def _resume(open_corpus: Callable[[], Iterator[Any]], writers: dict[int, StoreWriter], stats: _Stats) -> Iterator[Any]:
    """The corpus, past the documents an interrupted build made durable (read, not tokenized).

    Among the resume points that every layer's store offers (see erstore.journal), the furthest
    one whose documents this corpus starts with (same digest) is taken: one pass reads and
    digests up to the furthest offer (ranks of a distributed build find their own share's point
    among all ranks'). Its map entries come from the journal and its window keys refill
    `stats.seen`. With no match the corpus is read from the start; reading and digesting a
    document costs ~1/10 of tokenizing it (benchmarks/README.md, `--only resume`).
    """
    offers = [{(p.documents, p.digest): p for p in w.journals.points} for w in writers.values()]
    common = set.intersection(*(set(o) for o in offers)) if offers else set()
    docs = open_corpus()
    wanted = {documents: {d for n, d in common if n == documents} for documents, _ in common}
    best, n, hasher = None, 0, xxhash.xxh3_128()
    if wanted:
        for doc in itertools.islice(docs, max(wanted)):
            _hash_document(hasher, doc)
            n += 1
            if n in wanted and hasher.hexdigest() in wanted[n]:
                best = (n, hasher.hexdigest())
    if best is None:
        if n:  # nothing matched: read again from the start
            docs = open_corpus()
    else:
        documents, digest = best
        if n > documents:  # read past the point taken: back to it
            docs, hasher = open_corpus(), xxhash.xxh3_128()
            for doc in itertools.islice(docs, documents):
                _hash_document(hasher, doc)
        for w, offer in zip(writers.values(), offers):
            lines = w.resume(offer[best])
        windows = 0
        entries = lines.splitlines()
        del lines
        for start in range(0, len(entries), 1 << 16):  # in slices: no list of every key at once
            keys = [key for line in entries[start : start + (1 << 16)] for key in line_keys(line)]
            if keys:
                stats.seen.add_many(*halves(keys))
            windows += len(keys)
        stats.hasher = hasher
        stats.documents, stats.windows, stats.skipped = documents, windows, documents
    stats.boundary(writers)
    return docs


def _buffers(docs: Iterable[Any], windower: Windower, writers: dict[int, StoreWriter], stats: _Stats,
             buffer_tokens: int, phases: tuple[progress.Phase, progress.Phase],
             ) -> Iterator[tuple[list[tuple[str, np.ndarray, int, list[int], int]], int]]:
    """Buffers of new windows (key, ids, boundary, layers needing it, documents read before its
    slice), each ~`buffer_tokens` tokens, and the documents read by the end of each buffer.

    Records every document's keys with the writers. A window is new unless an earlier document
    of this corpus had it (`stats.seen`, 16 bytes per window) or every target store already holds
    it. The first buffers are small and double, so that the first batch does not wait for a full one.
    `phases` (read, compute): read counts documents; when the corpus is read, compute gets its total.
    """
    seen = stats.seen
    buffer: list[tuple[str, np.ndarray, int, list[int], int]] = []
    tokens, limit = 0, min(buffer_tokens, FIRST_BUFFER_TOKENS)
    it = iter(docs)
    while True:
        t0 = time.perf_counter()
        part = list(itertools.islice(it, TOKENIZE_DOCS))
        if not part:
            stats.tokenize_s += time.perf_counter() - t0
            break
        pairs = [d.pair for d in part] if part[0].pair is not None else None
        if pairs is not None and any(p is None for p in pairs):
            raise InvalidInputError("some documents have a text pair and some do not; give all or none")
        keys: list[str] = []
        windows: list[tuple[np.ndarray, int]] = []
        lines: list[bytes] = []
        split = part[0].words is not None  # pre-tokenized (--words-field)
        texts = [d.words for d in part] if split else [d.text for d in part]
        for doc, doc_windows in zip(part, windower.windows_batch(texts, pairs, split_words=split)):
            arrays = [(np.array(ids, dtype="<u4"), b) for ids, b in doc_windows]
            doc_keys = [fast_window_key(ids, b) for ids, b in arrays]
            lines.append(entry_line(str(doc.id), doc_keys))
            _hash_document(stats.hasher, doc)
            keys += doc_keys
            windows += arrays
        block = b"".join(lines)
        for w in writers.values():
            w.add_document_lines(block, len(part))
        first = stats.documents
        stats.documents += len(part)
        stats.boundary(writers)
        stats.windows += len(keys)
        phases[0].update(len(part))
        hi, lo = halves(keys)
        new = np.flatnonzero(seen.add_many(hi, lo))
        need = {k: ~w.stored(hi[new], lo[new]) for k, w in writers.items()}
        for j, i in enumerate(new):
            layers = [k for k in writers if need[k][j]]
            if layers:
                ids, b = windows[i]
                buffer.append((keys[i], ids, b, layers, first))
                tokens += len(ids)
                stats.queued += 1
        stats.tokenize_s += time.perf_counter() - t0
        if tokens >= limit:
            yield buffer, stats.documents
            buffer, tokens, limit = [], 0, min(buffer_tokens, 2 * limit)
    phases[0].close()
    phases[1].set_total(stats.queued)
    if buffer:
        yield buffer, stats.documents


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


@dataclass(frozen=True)
class Frontier:
    """Every window of the first `documents` input documents has been yielded in a batch."""

    documents: int


def buffered_batches(buffers: Iterable[list], batch_size: int, *, frontiers: bool = False) -> Iterator[list]:
    """Equal-length batches formed within each buffer; a length's last partial batch waits for
    the next buffer (so batches stay full), unless the waiting rows exceed one buffer.

    `frontiers`: buffers come as (rows, documents read) with each row's 5th field the documents
    read before its own; a partial batch waits for WAIT_BUFFERS buffers at most (so a rare length
    cannot hold the input's durable frontier back for long), and after each buffer a `Frontier`
    says how far the input is fully batched (the oldest row still waiting holds it back).
    """
    carry: list = []
    before = 0  # documents read before the current buffer (frontiers)
    starts: collections.deque[int] = collections.deque(maxlen=WAIT_BUFFERS)  # `before` of the last buffers
    for buffer in buffers:
        if frontiers:
            buffer, read = buffer
            starts.append(before)
        todo = carry + buffer
        carry = []
        for batch in length_batches(todo, batch_size):
            if len(batch) < batch_size:
                carry += batch
            else:
                yield batch
        if sum(len(t[1]) for t in carry) > sum(len(t[1]) for t in buffer):
            yield from length_batches(carry, batch_size)
            carry = []
        if frontiers:
            waited = [t for t in carry if t[4] < starts[0]]  # from a buffer older than the last WAIT_BUFFERS
            if waited:
                yield from length_batches(waited, batch_size)
                carry = [t for t in carry if t[4] >= starts[0]]
            yield Frontier(min((t[4] for t in carry), default=read))  # type: ignore[list-item]
            before = read
    yield from length_batches(carry, batch_size)


def _compute(buffers: Iterable[list], extractor: Any, writers: dict[int, StoreWriter], config: BuildConfig,
             stats: _Stats, phase: progress.Phase) -> None:
    """Run the model over the buffered windows in equal-length batches; a background thread
    appends each layer's states while the next batch computes."""
    import torch

    from erstore.model import to_numpy

    layers = sorted(writers)
    codec = next(iter(writers.values())).codec
    cast = codec.dtype if codec.lossless else "float32"  # lossless: cast on the torch side (fast)
    use_types = extractor.accepts_token_types()
    device = extractor.device
    behind = WriteBehind(writers)
    marked = stats.skipped  # documents of the last resume point queued (or resumed from)
    try:
        for batch in buffered_batches(buffers, config.batch_size, frontiers=True):
            if isinstance(batch, Frontier):
                # A resume point (erstore.journal), journaled once its rows are durable; one that
                # does not pass the last (a rare length still waiting) would save nothing.
                if batch.documents > marked:
                    digest, docs_bytes = stats.boundaries[batch.documents]
                    for n in [n for n in stats.boundaries if n < batch.documents]:
                        del stats.boundaries[n]
                    behind.mark(batch.documents, digest, docs_bytes)
                    marked = batch.documents
                continue
            if stats.first_batch_s is None:
                stats.first_batch_s = round(time.perf_counter() - stats.started, 3)
            ids = torch.from_numpy(np.stack([t[1] for t in batch]).astype(np.int64))
            mask = torch.ones_like(ids)
            types = None
            if use_types:
                types = torch.zeros_like(ids)
                for row, (_, _, boundary, *_) in enumerate(batch):
                    if boundary:
                        types[row, boundary:] = 1
            hidden = extractor(ids.to(device), mask.to(device),
                               None if types is None else types.to(device), layers)
            behind.put(batch, {k: to_numpy(h, cast) for k, h in hidden.items()})
            stats.computed += len(batch)
            stats.tokens += ids.numel()
            phase.update(len(batch))
        behind.close()
    finally:
        behind.close(raise_error=False)
        stats.write_wait_s = behind.wait_s
