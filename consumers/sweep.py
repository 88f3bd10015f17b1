"""Training and scoring one candidate of the layer-choice report under a fixed budget.

`prepare` joins labelled train/dev rows to a store's windows (`erstore.labels`); a `Runner` makes
fresh models of one report row (the reduced model at layer k, optionally with adapters, or the
full transformers model on stored token ids) and feeds them batches; `run_row` trains and
evaluates a row for every seed and returns raw numbers. `consumers.choose` compares the rows.

Not here: the report, the recommendation, the plot and the command line (`consumers.choose`).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import erstore
from consumers.adapters import add_adapters
from consumers.data import PadCollate, loader
from consumers.heads import head_for_tail
from consumers.metrics import accuracy, span_scores, token_f1
from consumers.reduced import ReducedModel
from consumers.tail import load_tail
from erstore.errors import IncompatibleStoreError, InvalidInputError
from erstore.labels import qa_labels, read_rows, sequence_labels, token_labels

TASKS = ("classification", "ner", "qa")


@dataclass(frozen=True)
class Budget:
    """The training budget every candidate gets (the same for all, so they compare)."""

    epochs: int = 2
    seeds: tuple[int, ...] = (0, 1)
    max_train: int | None = 512  # labelled rows (documents / sentences / questions), first N
    max_dev: int | None = 256
    batch_size: int = 16
    eval_batch_size: int = 32
    lr: float = 1e-4  # reduced fine-tuning and the full reference
    adapter_lr: float = 1e-3  # head + adapters when adapters are compared
    threads: int | None = None  # torch CPU threads during the run [default: torch's own]

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise InvalidInputError("epochs and batch sizes must be at least 1")
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise InvalidInputError(f"give one or more distinct seeds, got {self.seeds}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seeds": list(self.seeds)}


@dataclass
class Data:
    """Training windows and dev groups, keyed by store key (the same in every candidate store)."""

    train_keys: list[str]
    train_labels: list[Any]
    dev_keys: list[str]  # every dev window, in evaluation order
    dev: list[Any]  # per task: (window indices, label) | window labels | (window indices, gold ids)
    num_labels: int
    tokens: dict[str, tuple[np.ndarray, int]]  # key -> (token ids, pair boundary)
    label_to_id: dict[Any, int]


def prepare(store: erstore.Store, task: str, train: Any, dev: Any, budget: Budget, *, by: str = "doc",
            id_field: str = "id", text_field: str = "text", pair_field: str | None = None,
            label_field: str = "label", tokens_field: str = "tokens", tags_field: str = "ner_tags",
            question_field: str = "question", context_field: str = "context",
            answers_field: str = "answers", label_to_id: dict[Any, int] | None = None) -> Data:
    """Join train/dev rows (dicts or JSONL paths) to the store's windows with erstore.labels."""
    if task not in TASKS:
        raise InvalidInputError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    rows = {"train": read_rows(train)[: budget.max_train], "dev": read_rows(dev)[: budget.max_dev]}
    if not rows["train"] or not rows["dev"]:
        raise InvalidInputError("both the train and the dev split need at least one labelled row")
    col = label_field if task == "classification" else tags_field
    if label_to_id is None and task != "qa":
        missing = next((r for r in rows["train"] + rows["dev"] if col not in r), None)
        if missing is not None:
            raise InvalidInputError(f"a row has no field {col!r} (fields: {', '.join(sorted(missing))}); "
                                    "name the label field with label_field / tags_field")
        values = {v for r in rows["train"] + rows["dev"] for v in ([r[col]] if task == "classification" else r[col])}
        if any(isinstance(v, str) for v in values):  # names: ids in sorted order
            label_to_id = {v: i for i, v in enumerate(sorted(values, key=str))}
        else:
            label_to_id = {v: int(v) for v in values}
    label_to_id = label_to_id or {}
    num_labels = max(label_to_id.values(), default=1) + 1 if task != "qa" else 2
    if task == "classification":
        join = {"by": by, "field": label_field, "id_field": id_field, "text_field": text_field,
                "pair_field": pair_field, "label_to_id": label_to_id}
        train_map = sequence_labels(store, rows["train"], **join)
        dev_keys, groups = [], []
        for r in rows["dev"]:
            single = sequence_labels(store, [r], **join)
            groups.append((list(range(len(dev_keys), len(dev_keys) + len(single))),
                           label_to_id[r[label_field]]))
            dev_keys += list(single)
    elif task == "ner":
        opts = {"words_field": tokens_field, "labels_field": tags_field, "label_to_id": label_to_id}
        train_map = token_labels(store, rows["train"], **opts)
        dev_map = token_labels(store, rows["dev"], **opts)
        dev_keys, groups = list(dev_map), [v["labels"] for v in dev_map.values()]
    else:
        opts = {"question_field": question_field, "context_field": context_field, "answers_field": answers_field}
        train_map = qa_labels(store, rows["train"], **opts)
        dev_keys, spans = [], []
        for r in rows["dev"]:
            single = qa_labels(store, [r], **opts)
            spans.append((list(range(len(dev_keys), len(dev_keys) + len(single))), list(single.values())))
            dev_keys += list(single)
    tokens = {e.key: (np.asarray(e.token_ids, dtype=np.int64), e.boundary)
              for e in store.read(sorted(set(train_map) | set(dev_keys)))}
    if task == "qa":
        groups = []
        for idx, labels in spans:
            gold = next((tokens[dev_keys[i]][0][lab["start_positions"]: lab["end_positions"] + 1]
                         for i, lab in zip(idx, labels) if lab["start_positions"] > 0), None)
            if gold is not None:  # a question whose answer fits in no window is not scored
                groups.append((idx, gold))
        train_labels = [(v["start_positions"], v["end_positions"]) for v in train_map.values()]
    else:
        train_labels = [v["labels"] for v in train_map.values()]
    return Data(list(train_map), train_labels, dev_keys, groups, num_labels, tokens, label_to_id)


def score(task: str, logits: list[np.ndarray], data: Data, o_label: int) -> tuple[float, dict[str, float]]:
    if task == "classification":
        return accuracy(logits, data.dev), {}
    if task == "ner":
        return token_f1(logits, data.dev, o_label=o_label), {}
    f1, em = span_scores(logits, data.dev, data.dev_keys, data.tokens)
    return f1, {"exact_match": em}


# -- models ---------------------------------------------------------------------------------------
HEAD_TASK = {"classification": "sequence", "ner": "token", "qa": "qa"}


class _Identity(nn.Module):
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return hidden_states


class FullModel(nn.Module):
    """The reference: the whole transformers base model + the same head, on token ids."""

    def __init__(self, base: nn.Module, head: nn.Module, token_types: bool):
        super().__init__()
        self.base, self.token_types = base, token_types
        self.reduced = ReducedModel(_Identity(), head)  # reuses the reduced model's losses

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, **labels: Any) -> Any:
        extra = {"token_type_ids": token_type_ids} if self.token_types else {}
        h = self.base(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.reduced(h, attention_mask, **labels)


class IdCollate:
    """Pads stored token ids (and labels) for the full model: input_ids, attention_mask, token types."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(it["ids"]) for it in items)
        ids = torch.zeros(len(items), length, dtype=torch.long)
        mask, types = torch.zeros_like(ids), torch.zeros_like(ids)
        for row, it in enumerate(items):
            ids[row, : len(it["ids"])] = torch.from_numpy(it["ids"])
            mask[row, : len(it["ids"])] = 1
            if it["boundary"]:
                types[row, it["boundary"]: len(it["ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if "label" in items[0]:
            batch.update(PadCollate().labels([it["label"] for it in items], length))
        return batch


class Runner:
    """Makes fresh models of one row (reduced at layer k, or the full model) and feeds them batches."""

    def __init__(self, name: str, task: str, store: erstore.Store, num_labels: int, *, full: bool = False,
                 adapters: int | None = None, template: Runner | None = None):
        self.name, self.task, self.store, self.num_labels = name, task, store, num_labels
        self.full, self.adapters = full, adapters
        start = time.perf_counter()
        if template is not None:  # share the loaded weights of another row of the same store
            self.template, self.load_s = template.template, 0.0
            return
        if full:
            from consumers.registry import tail_class
            from erstore.model import LayerExtractor

            extractor = LayerExtractor(store.recipe.model_name)
            if extractor.fingerprint != store.recipe.model_fingerprint:
                raise IncompatibleStoreError(
                    f"model {store.recipe.model_name!r} has fingerprint {extractor.fingerprint}, the "
                    f"stores were built with {store.recipe.model_fingerprint}; load the same weights")
            self.template: nn.Module = extractor.model
            self.token_types = extractor.accepts_token_types()
            # A zero-layer tail only to give the head its family style and pretrained pooler.
            self.head_tail = tail_class(store.recipe.model_type).from_model(extractor.model, extractor.num_layers)
        else:
            self.template = load_tail(store)
        self.load_s = time.perf_counter() - start

    def make(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        kind = HEAD_TASK[self.task]
        if self.full:
            head = head_for_tail(kind, self.head_tail, self.num_labels)
            return FullModel(copy.deepcopy(self.template), head, self.token_types)
        tail = copy.deepcopy(self.template)
        head = head_for_tail(kind, tail, self.num_labels)
        if getattr(tail, "pooler", None) is not None:
            tail.pooler = None  # as ReducedModel.for_store: the head has its own copy
        model = ReducedModel(tail, head)
        if self.adapters:
            add_adapters(model, bottleneck=self.adapters)
        return model

    def train_batches(self, data: Data, budget: Budget, seed: int) -> Iterable[dict[str, Any]]:
        if not self.full:
            return loader(self.store, data.train_keys, data.train_labels, batch_size=budget.batch_size,
                          shuffle=True, seed=seed)
        items = [{"ids": data.tokens[k][0], "boundary": data.tokens[k][1], "label": lab}
                 for k, lab in zip(data.train_keys, data.train_labels)]
        return torch.utils.data.DataLoader(items, batch_size=budget.batch_size, shuffle=True,
                                           collate_fn=IdCollate(),
                                           generator=torch.Generator().manual_seed(seed))

    def dev_batch(self, keys: list[str], data: Data) -> dict[str, torch.Tensor]:
        """One dev batch, read from the store (reduced) or from the stored token ids (full)."""
        if self.full:
            return IdCollate()([{"ids": data.tokens[k][0], "boundary": data.tokens[k][1]} for k in keys])
        return PadCollate()([{"states": e.states} for e in self.store.read(keys)])


def fit(model: nn.Module, batches: Iterable[dict[str, Any]], *, epochs: int, lr: float, seed: int) -> list[float]:
    """AdamW over trainable parameters (as consumers.train); returns seconds of each epoch."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    seconds = []
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
        for batch in batches:
            loss = model(**batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    model.eval()
    return seconds


@torch.no_grad()
def evaluate(model: nn.Module, runner: Runner, data: Data, batch_size: int) -> tuple[list[np.ndarray], float]:
    """Logits of every dev window (unpadded) and the mean seconds per batch (read + forward)."""
    model.eval()
    chunks = [data.dev_keys[i: i + batch_size] for i in range(0, len(data.dev_keys), batch_size)]
    model(**runner.dev_batch(chunks[0], data))  # warm-up, untimed
    out, seconds = [], 0.0
    for keys in chunks:
        start = time.perf_counter()
        o = model(**runner.dev_batch(keys, data))
        seconds += time.perf_counter() - start
        values = o.logits if runner.task != "qa" else torch.stack([o.start_logits, o.end_logits], -1)
        for row, key in enumerate(keys):
            n = len(data.tokens[key][0])
            out.append(values[row].numpy() if values.dim() == 2 else values[row, :n].numpy())
    return out, seconds / len(chunks)


def run_row(runner: Runner, data: Data, budget: Budget, *, o_label: int, layer: int | None,
            progress: Callable[[str], None]) -> dict[str, Any]:
    """Train and evaluate one row for every seed; raw numbers (speedups are added later)."""
    start = time.perf_counter()
    lr = budget.adapter_lr if runner.adapters else budget.lr
    metrics, extras, epoch_s, batch_s = {}, [], [], []
    for seed in budget.seeds:
        model = runner.make(seed)
        epoch_s += fit(model, runner.train_batches(data, budget, seed), epochs=budget.epochs, lr=lr, seed=seed)
        logits, per_batch = evaluate(model, runner, data, budget.eval_batch_size)
        batch_s.append(per_batch)
        metrics[str(seed)], extra = score(runner.task, logits, data, o_label)
        extras.append(extra)
        progress(f"  {runner.name} seed {seed}: {metrics[str(seed)]:.2f}")
    values = list(metrics.values())
    return {"name": runner.name, "layer": layer, "adapters": runner.adapters,
            "metric": float(np.mean(values)), "metric_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": metrics,
            "extra": {k: float(np.mean([e[k] for e in extras])) for k in (extras[0] if extras else {})},
            "train_s_per_epoch": float(np.mean(epoch_s)), "infer_s_per_batch": float(np.mean(batch_s)),
            "store_bytes": 0 if runner.full else int(runner.store.info()["bytes"]),
            "load_s": runner.load_s, "wall_s": runner.load_s + time.perf_counter() - start}
