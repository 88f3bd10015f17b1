"""ReducedModel: a tail plus a task head, trained on a store and served on new text.

`forward(hidden_states, attention_mask, labels=...)` returns transformers' output classes
(loss, logits). ReducedModel is a `transformers.PreTrainedModel`, so `transformers.Trainer`
trains it and writes loadable folders (`save_model`, `checkpoint-N/`), and
`save_pretrained(folder)` / `from_pretrained(folder)` / `push_to_hub` work as for any
transformers model; the folder layout (config.json, model.safetensors, PEFT's LoRA files) is
`consumers.pretrained`'s. `merge_and_unload()` folds LoRA into the tail's weights. `load` also
reads the older `reduced.json` + `trainable.safetensors` folders (`save` now writes the new one).
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
from transformers import PreTrainedModel

from . import pretrained
from .adapters import add_adapters, add_lora, merge_lora
from .heads import HEADS, head_for_tail
from .lm import causal_labels
from .serving import Serving
from .tail import Tail, load_tail
from erstore.errors import IncompatibleStoreError, InvalidInputError
from erstore.manifest import Recipe

FORMAT = "erstore-reduced-model"  # the legacy reduced.json format, still read by `load`
FORMAT_VERSION = 1
KIND = pretrained.KIND


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


class ReducedModel(PreTrainedModel, Serving):
    """Layers k..N-1 of the store's model and a head; see the module docstring."""

    config_class = pretrained.ReducedConfig
    main_input_name = "hidden_states"

    def __init__(self, tail: Tail, head: nn.Module):
        # The config describes the modules; save_pretrained refreshes it (adapters may be added
        # after construction). Weights are the tail's and head's own, never re-initialised.
        super().__init__(pretrained.ReducedConfig())
        self.tail = tail
        self.head = head
        self._extractor: Any = None
        self.config.update(pretrained.describe(self))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """No-op: the tail holds pretrained weights and heads initialise themselves."""

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
    def save_pretrained(self, save_directory: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None,
                        **kwargs: Any) -> None:
        """Write config.json + model.safetensors, and PEFT's adapter files when the tail has LoRA.

        transformers.Trainer calls this for `save_model` and for every checkpoint; `push_to_hub`
        uploads what it writes. Keyword arguments go to `PreTrainedModel.save_pretrained`.
        """
        folder = Path(save_directory)
        # transformers would upload before the PEFT files below exist; push the finished folder.
        push, repo_id = kwargs.pop("push_to_hub", False), kwargs.pop("repo_id", None)
        self.config.update(pretrained.describe(self))
        if self.config.head is None or self.config.base_config is None:
            raise InvalidInputError(
                f"cannot save this ReducedModel: save_pretrained needs a tail loaded from a store and a "
                f"head from consumers.heads (found {type(self.tail).__name__}, {type(self.head).__name__})"
            )
        state_dict = self.state_dict() if state_dict is None else state_dict
        # A shallow copy: transformers pops each tensor from the dict it is given while writing.
        super().save_pretrained(folder, state_dict=dict(state_dict), **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        if any(pretrained.is_lora(k) for k in state_dict):
            pretrained.write_adapter(folder, self.tail, state_dict)
        else:  # a re-save after merge_and_unload must not leave the old LoRA files behind
            for name in (pretrained.ADAPTER_CONFIG, pretrained.ADAPTER_WEIGHTS):
                (folder / name).unlink(missing_ok=True)
        if push:  # PushToHubMixin.push_to_hub saves (this method) into a temporary folder and uploads it
            self.push_to_hub(repo_id or folder.resolve().name, token=kwargs.get("token"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, lora: bool = True,  # type: ignore[override]
                        **hub_options: Any) -> ReducedModel:
        """Rebuild a reduced model from a save_pretrained / Trainer folder (or a Hub repo id).

        Needs no download of the recipe's model: the folder holds the tail's config and weights.
        Outputs are bit-identical to the saved model's. lora=False gives the model without its
        LoRA (the base that `peft.PeftModel.from_pretrained(base, folder)` expects). `hub_options`
        (revision, token, ...) go to `huggingface_hub.snapshot_download` for a repo id.

        Raises:
            InvalidInputError: the path is neither a folder nor a Hub repo id.
            IncompatibleStoreError: the folder is not a reduced model (no or another config.json,
                weights that do not fit it).
        """
        folder = pretrained.resolve_folder(pretrained_model_name_or_path, **hub_options)
        return pretrained.load_folder(cls, folder, lora=lora)

    def save(self, folder: str | Path) -> Path:
        """save_pretrained(folder); returns the folder."""
        self.save_pretrained(folder)
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path, *, model: str | None = None) -> ReducedModel:
        """from_pretrained(folder), or a folder of the older reduced.json format (which reloads the
        recipe's model, or `model`, and checks its fingerprint)."""
        if (Path(folder) / "reduced.json").is_file():
            return cls._load_reduced_json(Path(folder), model=model)
        return cls.from_pretrained(folder)

    def merge_and_unload(self) -> ReducedModel:
        """Fold LoRA into the tail's weights and remove the LoRA modules (PEFT's merge); in place."""
        merge_lora(self)
        return self

    @classmethod
    def _load_reduced_json(cls, folder: Path, *, model: str | None = None) -> ReducedModel:
        from safetensors.torch import load_file

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
