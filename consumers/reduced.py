"""ReducedModel: a tail plus a task head, trained on a store and served on new text.

`forward(hidden_states, attention_mask, labels=...)` returns transformers' output classes
(loss, logits), so the model works with a plain loop and with `transformers.Trainer`.
`save(folder)` writes `reduced.json` (format tag, the store's recipe, head and adapter settings)
and `trainable.safetensors` holding only the parameters that train; `load(folder)` reloads the
recipe's model, checks its fingerprint, rebuilds adapters and head and loads those weights.
`predict(texts, store=...)` reads stored states where the text's windows are in the store and
computes layers 0..k with the recipe's model where they are not (optionally writing them back);
`predict_words` (one tag per word) and `predict_answers` (answer text and offsets) come from
`consumers.serving.Serving` on top of `window_logits`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters import add_adapters, add_lora, trainable_state_dict
from .heads import HEADS, head_for_tail
from .lm import causal_labels
from .serving import Serving
from .tail import Tail, load_tail
from erstore.errors import IncompatibleStoreError
from erstore.manifest import Recipe

FORMAT = "erstore-reduced-model"
FORMAT_VERSION = 1
KIND = {cls: name for name, cls in HEADS.items()}


def build_params(store: Any) -> dict[str, Any] | None:
    """Codec parameters (e.g. int8 channel scales) of the store's newest build; None if empty."""
    if store is None or not store.index.arrays:
        return None
    return store._array(len(store.index.arrays) - 1).params


def round_trip(codec: Any, states: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
    """States as the store would return them, so a hit and a miss give the same answer.

    Exact for lossless codecs. A quantizing codec uses `params` (the store's build parameters,
    see `build_params`); only a store without any build fits them on this sequence.
    """
    if params is None:
        params = codec.fit(states)
    return np.asarray(codec.decode(codec.encode(states, params), params))


class ReducedModel(nn.Module, Serving):
    """Layers k..N-1 of the store's model and a head; see the module docstring."""

    def __init__(self, tail: Tail, head: nn.Module):
        super().__init__()
        self.tail = tail
        self.head = head
        self._extractor: Any = None

    @classmethod
    def for_store(cls, store: Any, *, task: str = "sequence", num_labels: int = 2,
                  model: str | None = None, **head_options: Any) -> ReducedModel:
        """Load the store's tail and add a head: task is sequence, token, qa, mlp or causal-lm
        (the model's own LM head; num_labels is then the vocabulary's size)."""
        tail = load_tail(store, model=model)
        if task == "causal-lm":
            head_options.setdefault("model", model)
        head = head_for_tail(task, tail, num_labels, **head_options)
        if getattr(tail, "pooler", None) is not None:
            tail.pooler = None  # a BERT-style head copied it; the tail itself never uses it
        return cls(tail, head)

    @property
    def task(self) -> str:
        return self.head.task

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, **batch_extras: Any) -> Any:
        """Loss (when labels are given) and logits. Extra batch fields (input_ids, keys ... from
        erstore.torchdata's Collate) are accepted and ignored, except that a causal-lm head
        takes its labels from input_ids (shifted inside the loss, as transformers does)."""
        from transformers import modeling_outputs as mo

        h = self.tail(hidden_states, attention_mask)
        logits = self.head(h, attention_mask)
        ce = nn.functional.cross_entropy
        if self.task == "causal-lm":  # next-token loss on the stored token ids unless labels given
            ids = batch_extras.get("input_ids")
            if labels is None and ids is not None:
                labels = causal_labels(ids, attention_mask)
            loss = None if labels is None else self.head.loss(logits, labels.to(logits.device))
            return mo.CausalLMOutput(loss=loss, logits=logits)
        if self.task == "qa":
            start, end = logits[..., 0], logits[..., 1]
            loss = None
            if start_positions is not None and end_positions is not None:
                n = start.shape[1]
                loss = (ce(start, start_positions.clamp(0, n), ignore_index=n)
                        + ce(end, end_positions.clamp(0, n), ignore_index=n)) / 2
            return mo.QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end)
        loss = None
        if labels is not None:
            if self.head.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = ce(logits.reshape(-1, self.head.num_labels), labels.reshape(-1), ignore_index=-100)
        out = mo.TokenClassifierOutput if self.task == "token" else mo.SequenceClassifierOutput
        return out(loss=loss, logits=logits)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write reduced.json and trainable.safetensors (adapters/LoRA/head only when frozen)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {n: t.contiguous().cpu() for n, t in trainable_state_dict(self).items()}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "recipe": self.tail.recipe.to_dict() if self.tail.recipe else None,
                "head": {"kind": KIND[type(self.head)], **self.head.config},
                "adapters": getattr(self.tail, "adapter_config", None),
                "lora": getattr(self.tail, "lora_config", None),
                "trainable": sorted(weights)}
        save_file(weights, str(folder / "trainable.safetensors"))
        (folder / "reduced.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, model: str | None = None) -> ReducedModel:
        """Rebuild a saved reduced model (loads and verifies the recipe's model weights)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "reduced.json").read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise IncompatibleStoreError(
                f"{folder}/reduced.json is not a {FORMAT} version {FORMAT_VERSION} file "
                f"(found {meta.get('format')!r} version {meta.get('format_version')!r})"
            )
        tail = load_tail(Recipe.from_dict(meta["recipe"]), model=model)
        head_cfg = dict(meta["head"])
        kind = head_cfg.pop("kind")
        if kind == "causal-lm":  # starts from the checkpoint's LM head; trained weights load below
            head = head_for_tail(kind, tail, model=model)
        else:
            head = HEADS[kind](head_cfg.pop("hidden_size"), head_cfg.pop("num_labels"), **head_cfg)
        reduced = cls(tail, head)
        if meta["adapters"]:
            add_adapters(reduced, **meta["adapters"])
        if meta["lora"]:
            add_lora(reduced, **meta["lora"])
        weights = load_file(str(folder / "trainable.safetensors"))
        result = reduced.load_state_dict(weights, strict=False)
        if result.unexpected_keys or set(weights) != set(meta["trainable"]):
            raise IncompatibleStoreError(
                f"{folder}/trainable.safetensors does not fit the rebuilt model: unexpected "
                f"{result.unexpected_keys[:3]}"
            )
        trainable = set(meta["trainable"])
        for name, p in reduced.named_parameters():
            p.requires_grad_(name in trainable)
        return reduced.eval()

    # -- serving -------------------------------------------------------------------------------
    def check_store(self, store: Any) -> None:
        """Raise IncompatibleStoreError unless `store` holds this model's layer-k states
        (same model weights, the layer this tail starts at); training and serving both check."""
        recipe = store.recipe
        if self.tail.recipe is not None and recipe.model_fingerprint != self.tail.recipe.model_fingerprint:
            raise IncompatibleStoreError(
                f"the store {store.location.url} holds states of model {recipe.model_fingerprint}, "
                f"this reduced model was built for {self.tail.recipe.model_fingerprint}; use a store "
                "built from the same model, or build one"
            )
        if recipe.layer != self.tail.first_layer:
            raise IncompatibleStoreError(
                f"the store {store.location.url} holds layer {recipe.layer}, this reduced model starts at "
                f"layer {self.tail.first_layer}; use a store of layer {self.tail.first_layer} or "
                f"ReducedModel.from_pretrained(..., layer={recipe.layer})"
            )

    def states_for(self, texts: list[str], *, store: Any, pairs: list[str] | None = None,
                   write_back: bool = False) -> list[list[np.ndarray]]:
        """Layer-k states of every window of every text: read on a hit, computed on a miss."""
        windows = [store.tokenize(t, None if pairs is None else pairs[i]) for i, t in enumerate(texts)]
        return self.states_for_windows(windows, store=store, write_back=write_back)

    def states_for_windows(self, windows: list[list[tuple[list[int], int]]], *, store: Any,
                           write_back: bool = False) -> list[list[np.ndarray]]:
        """Layer-k states of token windows (ids, pair boundary), as `states_for` returns them."""
        from erstore.builder import length_batches
        from erstore.keys import window_key

        recipe = store.recipe
        self.check_store(store)
        keys = [[window_key(ids, b) for ids, b in ws] for ws in windows]
        states: dict[str, np.ndarray] = {}
        hits = sorted({k for ks in keys for k in ks if k in store})
        states.update((e.key, e.states) for e in store.read(hits))
        todo = {}
        for ws, ks in zip(windows, keys):
            for (ids, b), key in zip(ws, ks):
                if key not in states:
                    todo[key] = (key, ids, b, [recipe.layer])
        computed: dict[str, np.ndarray] = {}
        if todo:
            params = build_params(store)
            extractor = self._extractor_for(recipe)
            for batch in length_batches(list(todo.values()), 32):
                ids = torch.tensor([t[1] for t in batch])
                types = None
                if extractor.accepts_token_types():
                    types = torch.zeros_like(ids)
                    for row, t in enumerate(batch):
                        if t[2]:
                            types[row, t[2]:] = 1
                out = extractor(ids, torch.ones_like(ids), types, [recipe.layer])[recipe.layer]
                for row, t in enumerate(batch):
                    computed[t[0]] = out[row].float().numpy()
                    if params is None:  # an empty store: fit once, on the first computed sequence
                        params = store.codec.fit(computed[t[0]])
                    states[t[0]] = round_trip(store.codec, computed[t[0]], params)
            if write_back:
                from erstore.writer import StoreWriter

                with StoreWriter(store.location.url, recipe) as writer:
                    writer._params = params  # encode as returned above, so a later hit equals this miss
                    for key, ids, b, _ in todo.values():
                        writer.append(key, computed[key], np.asarray(ids), boundary=b)
                    writer.commit(build={"source": "consumers.predict", "computed": len(todo)})
        return [[states[k] for k in ks] for ks in keys]

    def _extractor_for(self, recipe: Recipe) -> Any:
        if self._extractor is None:
            from erstore.model import LayerExtractor

            extractor = LayerExtractor(recipe.model_name)
            if extractor.fingerprint != recipe.model_fingerprint:
                raise IncompatibleStoreError(
                    f"model {recipe.model_name!r} now has fingerprint {extractor.fingerprint}, but the "
                    f"store was built with {recipe.model_fingerprint}; cannot compute missing states"
                )
            self._extractor = extractor
        return self._extractor

    @torch.no_grad()
    def window_logits(self, windows: list[list[tuple[list[int], int]]], *, store: Any,
                      write_back: bool = False, batch_size: int = 32) -> list[list[np.ndarray]]:
        """Per text, per window: logits ([num_labels], [n_tokens, num_labels] or [n_tokens, 2])."""
        from .data import PadCollate

        per_text = self.states_for_windows(windows, store=store, write_back=write_back)
        flat = [s for ws in per_text for s in ws]
        collate, logits = PadCollate(), []
        self.eval()
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            batch = collate([{"states": s} for s in chunk])
            out = self(batch["hidden_states"], batch["attention_mask"])
            values = out.logits if self.task != "qa" else torch.stack([out.start_logits, out.end_logits], -1)
            for row, s in enumerate(chunk):
                logits.append(values[row].numpy() if values.dim() == 2 else values[row, : len(s)].numpy())
        results, i = [], 0
        for ws in per_text:
            results.append(logits[i : i + len(ws)])
            i += len(ws)
        return results

    def predict(self, texts: list[str], *, store: Any, pairs: list[str] | None = None,
                write_back: bool = False, batch_size: int = 32) -> list[Any]:
        """Logits per text: sequence tasks average their windows' logits ([num_labels]);
        token and QA tasks give one array per window ([n_tokens, num_labels] / [n_tokens, 2]).
        For one tag per word use `predict_words`; for answer text, `predict_answers`."""
        windows = [store.tokenize(t, None if pairs is None else pairs[i]) for i, t in enumerate(texts)]
        per_text = self.window_logits(windows, store=store, write_back=write_back, batch_size=batch_size)
        return [np.mean(mine, axis=0) if self.task == "sequence" else mine for mine in per_text]
