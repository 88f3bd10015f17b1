"""Cross-model recycling (the paper's appendix A.3): a larger model's stored states help a smaller one.

A store holds a large model's final-layer states (a store built at layer N). A `CrossModel` is a
smaller transformers model, fine-tuned as usual, whose input word embeddings get a learned
projection of those states added token by token:

    inputs_embeds = small.word_embeddings(input_ids) + MLP(stored large-model states)

with MLP = Linear(d_large, hidden) -> GELU -> Linear(hidden, d_small). The last layer starts at
zero, so an untrained CrossModel computes exactly what the small model computes, and training
moves the MLP (and the small model). Adding token by token needs both models to split text into
the same tokens: `CrossModel.for_store` compares the store's tokenizer fingerprint with the small
model's (or its store's) and refuses a mismatch. The small model reads the store's token ids,
so it sees exactly the windows the large model saw.

    source = erstore.open("stores/large-l12")                       # final-layer states
    model = CrossModel.for_store(source, "small-model-folder", task="sequence", num_labels=4)
    with source.loader(labels=labels, batch_size=32, shuffle=True) as batches:
        consumers.train(model, batches, epochs=3, lr=5e-5)          # batches carry input_ids
    model.predict(["new text"], store=source)

Not here: saving/loading a CrossModel as one artefact (save `model.small` with transformers and
`model.projector.state_dict()` yourself), QA heads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from erstore.errors import IncompatibleStoreError, InvalidInputError

TASKS = {"sequence": "AutoModelForSequenceClassification", "token": "AutoModelForTokenClassification"}
EAGER_ONLY = ("mpnet", "deberta-v2", "t5")


class CrossModel(nn.Module):
    """A small transformers task model whose input embeddings get MLP(large model's states)."""

    def __init__(self, small: Any, source_hidden: int, *, hidden: int = 256, recipe: Any = None):
        super().__init__()
        self.small = small
        self.recipe = recipe  # the source store's recipe (for predict and checks)
        d_small = small.get_input_embeddings().embedding_dim
        self.projector = nn.Sequential(nn.Linear(source_hidden, hidden), nn.GELU(), nn.Linear(hidden, d_small))
        nn.init.zeros_(self.projector[2].weight)
        nn.init.zeros_(self.projector[2].bias)
        self._extractor: Any = None

    @classmethod
    def for_store(cls, source: Any, small_model: str, *, task: str = "sequence", num_labels: int = 2,
                  hidden: int = 256, small_store: Any = None) -> CrossModel:
        """Load `small_model` (a folder or name) with a task head, fed by `source`'s states.

        Raises:
            IncompatibleStoreError: the two tokenizers differ (fingerprints compared: the small
                model's store's recipe if `small_store` is given, else the small model's own
                tokenizer), or the store's windows are longer than the small model's positions.
        """
        import transformers

        from erstore.tokenize import load_tokenizer, resolve_model, tokenizer_fingerprint

        if task not in TASKS:
            raise InvalidInputError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        recipe = source.recipe
        if small_store is not None:
            theirs, where = small_store.recipe.tokenizer_fingerprint, f"store {small_store.location.url}"
        else:
            theirs, where = tokenizer_fingerprint(load_tokenizer(small_model)), f"model {small_model!r}"
        if theirs != recipe.tokenizer_fingerprint:
            raise IncompatibleStoreError(
                f"the tokenizer of {where} (fingerprint {theirs}) differs from the one {source.location.url} "
                f"was built with ({recipe.tokenizer_name or recipe.model_name!r}, fingerprint "
                f"{recipe.tokenizer_fingerprint}); cross-model recycling adds states token by token, so "
                "both models must share the tokenizer. Pick a small model of the same tokenizer family"
            )
        path = resolve_model(small_model)
        config = transformers.AutoConfig.from_pretrained(path, num_labels=num_labels)
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and positions < recipe.max_length:
            raise IncompatibleStoreError(
                f"{small_model!r} takes at most {positions} positions but {source.location.url} holds "
                f"windows of up to {recipe.max_length} tokens; build the source store with a smaller max_length"
            )
        kwargs = {"attn_implementation": "eager"} if config.model_type in EAGER_ONLY else {}
        auto = getattr(transformers, TASKS[task])
        small = auto.from_pretrained(path, config=config, **kwargs)
        return cls(small, recipe.hidden_size, hidden=hidden, recipe=recipe)

    @property
    def task(self) -> str:
        return "token" if "TokenClassification" in type(self.small).__name__ else "sequence"

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                boundaries: torch.Tensor | None = None, **batch_extras: Any) -> Any:
        """The small model's output (loss with labels, logits) on the store's tokens and states.

        Takes `erstore.torchdata` batches as they come (hidden_states are the large model's
        states, input_ids the store's token ids); other batch fields are ignored.
        """
        if input_ids is None:
            raise InvalidInputError("CrossModel needs the batch's input_ids (the store's token ids)")
        embeddings = self.small.get_input_embeddings()(input_ids)
        extra = self.projector(hidden_states.to(embeddings.dtype))
        kwargs: dict[str, Any] = {}
        if boundaries is not None and getattr(self.small.config, "type_vocab_size", 0) > 1:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            kwargs["token_type_ids"] = (positions[None] >= boundaries[:, None]).long() * (boundaries[:, None] > 0)
        return self.small(inputs_embeds=embeddings + extra, attention_mask=attention_mask, labels=labels, **kwargs)

    # -- serving ---------------------------------------------------------------------------------
    def states_for(self, texts: list[str], *, store: Any) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """(large-model states, token ids) of every window of every text: read, or computed on a miss."""
        from erstore.keys import window_key
        from erstore.model import LayerExtractor

        from .reduced import build_params, round_trip

        recipe = store.recipe
        if self.recipe is not None and recipe.model_fingerprint != self.recipe.model_fingerprint:
            raise IncompatibleStoreError(
                f"{store.location.url} holds states of model {recipe.model_fingerprint}; this CrossModel "
                f"was made for {self.recipe.model_fingerprint}"
            )
        windows = [store.tokenize(t) for t in texts]
        out = []
        for ws in windows:
            keys = [window_key(ids, b) for ids, b in ws]
            hits = {e.key: e.states for e in store.read([k for k in keys if k in store])}
            row = []
            for (ids, _b), key in zip(ws, keys):
                if key not in hits:
                    if self._extractor is None:
                        self._extractor = LayerExtractor(recipe.model_name)
                        if self._extractor.fingerprint != recipe.model_fingerprint:
                            raise IncompatibleStoreError(
                                f"model {recipe.model_name!r} no longer has the fingerprint the store was "
                                "built with; cannot compute missing states"
                            )
                    t = torch.tensor([ids])
                    types = torch.zeros_like(t) if self._extractor.accepts_token_types() else None
                    h = self._extractor(t, torch.ones_like(t), types, [recipe.layer])[recipe.layer]
                    hits[key] = round_trip(store.codec, h[0].float().numpy(), build_params(store))
                row.append((np.asarray(hits[key], dtype=np.float32), np.asarray(ids)))
            out.append(row)
        return out

    @torch.no_grad()
    def predict(self, texts: list[str], *, store: Any) -> list[Any]:
        """Logits per text: sequence tasks average their windows' logits; token tasks give one
        array [n_tokens, num_labels] per window."""
        self.eval()
        results = []
        for row in self.states_for(texts, store=store):
            logits = []
            for states, ids in row:
                out = self.forward(torch.from_numpy(states)[None], torch.ones(1, len(ids), dtype=torch.long),
                                   torch.from_numpy(ids.astype(np.int64))[None])
                logits.append(out.logits[0].numpy())
            results.append(np.mean(logits, axis=0) if self.task == "sequence" else logits)
        return results


__all__ = ["CrossModel"]
