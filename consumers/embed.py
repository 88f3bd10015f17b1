"""Sentence embeddings from a store, computed as sentence-transformers computes them.

    model = consumers.ReducedModel.for_store(store, task="embedding")   # a PoolingHead
    vectors = model.encode(["a sentence", ...], store=store)           # [n, d] float32
    vectors = model.encode(keys=store.keys_for(text)[:1], store=store)  # stored windows by key

The path: layer-k states of each text's first window (read from the store, computed by the
recipe's model on a miss) -> the tail (layers k..N-1) -> `PoolingHead` (mean / CLS / max ...
over the attention mask) -> L2 normalisation. `pooling_config` reads the pooling mode, the
normalisation and `max_seq_length` from a sentence-transformers model folder (modules.json,
1_Pooling/config.json, sentence_bert_config.json), so the defaults are the model authors'.

One text = its first window of at most `max_seq_length` tokens, as sentence-transformers
truncates; builds of such a model default to windows of that length (erstore.preflight.
window_length), so those windows are the stored ones. `windows="mean"` instead averages the
embeddings of all windows of a long text (then normalises again).

Not here: training embedding models (contrastive losses), sentence-transformers modules other
than Transformer, Pooling and Normalize (Dense, LayerNorm, ...: refused), prompts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from erstore.errors import IncompatibleStoreError, InvalidInputError

# sentence-transformers' legacy boolean keys of 1_Pooling/config.json, in its concatenation order.
_LEGACY_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
_KNOWN = ("Transformer", "Pooling", "Normalize")


def pooling_config(model: Any) -> dict[str, Any] | None:
    """{"mode", "normalize", "max_length"} of a sentence-transformers folder; None for other models.

    `model`: a name or folder (the packaged MiniLM name resolves to its folder).

    Raises:
        IncompatibleStoreError: the folder's pipeline has modules a PoolingHead cannot reproduce.
        InvalidInputError: a config file cannot be read.
    """
    from erstore.tokenize import resolve_model, sentence_transformers_length

    folder = resolve_model(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else ""
    modules_file = os.path.join(folder, "modules.json")
    if not folder or not os.path.isfile(modules_file):
        return None
    modules = _read_json(modules_file)
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    other = [k for k in kinds if k not in _KNOWN]
    if other:
        raise IncompatibleStoreError(
            f"the sentence-transformers model {folder} has modules {other} that a PoolingHead does not "
            "reproduce (only Transformer, Pooling and Normalize pipelines are); pass mode=... (and "
            "normalize=...) to pool the model's final states without them"
        )
    mode: Any = ["mean"]
    if "Pooling" in kinds:
        path = modules[kinds.index("Pooling")].get("path", "")
        config = _read_json(os.path.join(folder, path, "config.json"))
        if "pooling_mode" in config:  # sentence-transformers >= 5
            mode = config["pooling_mode"]
            mode = [mode] if isinstance(mode, str) else list(mode)
        else:
            mode = [name for key, name in _LEGACY_MODES.items() if config.get(key)] or ["mean"]
        if "weightedmean" in mode:
            raise IncompatibleStoreError(
                f"the sentence-transformers model {folder} pools with weightedmean, which PoolingHead "
                "does not implement; pass another mode explicitly (task='embedding', mode=...)"
            )
    return {"mode": mode, "normalize": "Normalize" in kinds, "max_length": sentence_transformers_length(folder)}


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"cannot read {path}: {e}; it must be sentence-transformers' JSON") from e


def encode(model: Any, texts: Sequence[str] | None = None, *, store: Any, keys: Sequence[str] | None = None,
           windows: str = "first", batch_size: int = 32, write_back: bool = False) -> np.ndarray:
    """Embeddings [n, width] float32 of `texts` (or of the stored windows `keys`), in order.

    Args:
        model: a model with an embedding head (`ReducedModel.for_store(store, task="embedding")`;
            `FullModel.for_store(..., task="embedding")` runs the whole model on token ids instead).
        windows: "first" (a text is its first window, as sentence-transformers truncates) or
            "mean" (the mean of all its windows' embeddings, normalised again if the head is).
        write_back: store the windows that had to be computed (only when the head's max_length
            is the store's, so that the written windows are the ones its build makes).

    Raises:
        InvalidInputError: not exactly one of texts/keys, an unknown `windows`, a model without
            an embedding head, or write_back with windows the store's build would not make.
        KeyNotFoundError: a key is not in the store.
    """
    if getattr(model, "task", None) != "embedding":
        raise InvalidInputError(
            f"encode needs an embedding head, this model's task is {getattr(model, 'task', None)!r}; "
            "use ReducedModel.for_store(store, task='embedding')"
        )
    if (texts is None) == (keys is None):
        raise InvalidInputError("encode takes texts or keys=..., exactly one of them")
    if windows not in ("first", "mean"):
        raise InvalidInputError(f"windows must be 'first' or 'mean', got {windows!r}")
    if isinstance(texts, str):
        raise InvalidInputError("encode takes a list of texts; wrap a single text in a list")
    if keys is not None:
        per_text = [[(e.token_ids.tolist(), int(e.boundary))] for e in store.read(list(keys))]
    else:
        windower = _windower(model, store, write_back)
        per_text = windower.windows_batch(list(texts)) if texts else []
        if windows == "first":
            per_text = [ws[:1] for ws in per_text]
    head = _head(model)
    width = head.num_labels
    if not per_text:
        return np.zeros((0, width), dtype=np.float32)
    # Longest first, as sentence-transformers orders a batch: batches of similar lengths pad little.
    order = sorted(range(len(per_text)), key=lambda i: -sum(len(ids) for ids, _ in per_text[i]))
    values = model.window_logits([per_text[i] for i in order], store=store, write_back=write_back,
                                 batch_size=batch_size)
    out = np.empty((len(per_text), width), dtype=np.float32)
    for i, v in zip(order, values):
        out[i] = v[0] if len(v) == 1 else np.mean(v, axis=0)
    if windows == "mean" and head.normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def _head(model: Any) -> Any:
    """The embedding head: a ReducedModel's own, or the one a FullModel keeps in its `reduced`."""
    return model.head if hasattr(model, "head") else model.reduced.head


def _windower(model: Any, store: Any, write_back: bool) -> Any:
    """The store's windower, or one that truncates at the head's max_length if that differs."""
    from erstore.labels import windower_for
    from erstore.tokenize import Windower

    own = windower_for(store)
    limit = getattr(_head(model), "max_length", None)
    if limit is None or limit == own.max_length:
        return own
    if write_back:
        raise InvalidInputError(
            f"write_back would add windows of {limit} tokens to a store built with max_length "
            f"{own.max_length}; build the embedding store with --max-length {limit} (the default for "
            "this model), or encode without write_back"
        )
    return Windower(own.tokenizer, limit, min(own.stride, limit // 2 - 1))
