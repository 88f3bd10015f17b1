"""Training and scoring one candidate of the layer-choice report under a fixed budget.

`prepare` turns labelled train/dev rows into `erstore.labels.Examples` (every row is its own
example, duplicates included) plus what scoring needs per dev row; a `Runner` makes fresh models
of one report row (the reduced model at layer k, optionally with adapters, or the full
fine-tuning baseline `consumers.full.FullModel`); `run_row` trains each seed through
`consumers.train.run_epochs` (the loop and loss every model uses) and scores it over the user's
dev rows with the standard metrics (`consumers.metrics`). `consumers.choose` compares the rows.

Not here: the report, the recommendation, the plot and the command line (`consumers.choose`).
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

import erstore
from .adapters import add_adapters
from .data import PadCollate
from .decode import best_answer, word_logits, word_tags
from .full import HEAD_TASK, FullModel, IdCollate, load_base
from .heads import head_for_tail
from .metrics import entity_f1, squad_scores, word_f1
from .reduced import ReducedModel
from .tail import load_tail
from .train import label_values, make_optimizer, run_epochs, store_batches
from erstore import progress as _progress
from erstore.errors import InvalidInputError, KeyNotFoundError
from erstore.labels import (
    Examples,
    qa_examples,
    read_rows,
    sequence_examples,
    token_examples,
    windower_for,
)

TASKS = ("classification", "ner", "qa")


@dataclass(frozen=True)
class Budget:
    """The training budget every candidate gets (the same for all, so they compare).

    Sized to the data by default: every labelled row, and at least `min_steps` optimizer steps
    (epochs are added until the training examples give that many), so the full reference has
    the steps it needs to learn.
    """

    epochs: int = 3
    seeds: tuple[int, ...] = (0, 1)
    max_train: int | None = None  # labelled rows (documents / sentences / questions), first N
    max_dev: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 32
    lr: float = 1e-4  # reduced fine-tuning and the full reference
    adapter_lr: float = 1e-3  # head + adapters when adapters are compared
    min_steps: int = 300  # at least this many optimizer steps per seed (more epochs if needed)
    threads: int | None = None  # torch CPU threads during the run [default: torch's own]

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1 or self.min_steps < 0:
            raise InvalidInputError("epochs and batch sizes must be at least 1, min_steps at least 0")
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise InvalidInputError(f"give one or more distinct seeds, got {self.seeds}")

    def epochs_for(self, examples: int) -> int:
        """Epochs to run over `examples` training examples: `epochs`, or more to reach `min_steps`."""
        steps = max(1, math.ceil(examples / self.batch_size))
        return max(self.epochs, math.ceil(self.min_steps / steps))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seeds": list(self.seeds)}


@dataclass
class Data:
    """Training examples and per-dev-row scoring material (keys are the same in every candidate store)."""

    task: str
    train: Examples
    train_labels: list[Any]  # one per training example, as consumers.data collates it
    dev: Examples  # examples of the dev rows (several per row for long documents)
    gold: list[Any]  # per dev row: class id | word tags (names, or ids) | answer texts
    num_labels: int
    label_to_id: dict[Any, int]
    id_to_label: list[str] | None  # tag names (NER entity F1 needs them)
    o_label: int
    dev_windows: list[Any] = field(default_factory=list)  # qa: per dev row its Windows (offsets)
    contexts: list[str] = field(default_factory=list)  # qa: per dev row its context

    @property
    def metric_name(self) -> str:
        if self.task == "ner":
            return "entity F1" if self.id_to_label is not None else "word F1"
        return {"classification": "accuracy", "qa": "F1"}[self.task]

    @property
    def dev_keys(self) -> list[str]:
        """Each stored dev window once (duplicate rows share windows), in first-seen order."""
        return list(dict.fromkeys(self.dev.keys))


def prepare(store: erstore.Store, task: str, train: Any, dev: Any, budget: Budget, *, by: str = "doc",
            id_field: str = "id", text_field: str | None = None, pair_field: str | None = None,
            label_field: str = "label", tokens_field: str = "tokens", tags_field: str = "ner_tags",
            question_field: str = "question", context_field: str = "context",
            answers_field: str = "answers", label_to_id: dict[Any, int] | None = None,
            o_label: int | None = None) -> Data:
    """Join train/dev rows (dicts or JSONL paths) to the store's windows with erstore.labels.

    `text_field`: classification joins by it with by="text" [default "text"]; for NER, given, the
    rows' text is tokenized and the words aligned to it, else the words are tokenized pre-split.
    """
    if task not in TASKS:
        raise InvalidInputError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    rows = {"train": read_rows(train)[: budget.max_train], "dev": read_rows(dev)[: budget.max_dev]}
    if not rows["train"] or not rows["dev"]:
        raise InvalidInputError("both the train and the dev split need at least one labelled row")
    col = label_field if task == "classification" else tags_field
    if label_to_id is None and task != "qa":
        for split in ("train", "dev"):
            for n, r in enumerate(rows[split]):
                if col not in r:
                    raise InvalidInputError(f"{split} row {n} has no field {col!r} (fields: "
                                            f"{', '.join(sorted(r))}); name it with label_field / tags_field")
        values = {v for r in rows["train"] + rows["dev"] for v in ([r[col]] if task == "classification" else r[col])}
        if any(isinstance(v, str) for v in values):  # names: ids in sorted order
            label_to_id = {v: i for i, v in enumerate(sorted(values, key=str))}
        else:
            label_to_id = {v: int(v) for v in values}
    label_to_id = dict(label_to_id or {})
    num_labels = max(label_to_id.values(), default=1) + 1 if task != "qa" else 2
    names = None
    if task == "ner" and label_to_id and all(isinstance(k, str) for k in label_to_id):
        names = [""] * num_labels
        for name, i in label_to_id.items():
            names[i] = name
    if o_label is None:
        o_label = label_to_id.get("O", 0)
    if task == "classification":
        join = {"by": by, "field": label_field, "id_field": id_field, "text_field": text_field or "text",
                "pair_field": pair_field, "label_to_id": label_to_id}
        train_ex = sequence_examples(store, rows["train"], **join)
        dev_ex = sequence_examples(store, rows["dev"], **join)
        gold: list[Any] = [label_to_id[r[label_field]] for r in rows["dev"]]
        return Data(task, train_ex, label_values(train_ex), dev_ex, gold, num_labels, label_to_id, None, o_label)
    if task == "ner":
        opts = {"words_field": tokens_field, "labels_field": tags_field, "label_to_id": label_to_id,
                "text_field": text_field}
        train_ex = token_examples(store, rows["train"], **opts)
        dev_ex = token_examples(store, rows["dev"], **opts)
        gold = [list(r[tags_field]) if names else [label_to_id[t] for t in r[tags_field]] for r in rows["dev"]]
        return Data(task, train_ex, label_values(train_ex), dev_ex, gold, num_labels, label_to_id, names, o_label)
    opts = {"question_field": question_field, "context_field": context_field, "answers_field": answers_field}
    train_ex = qa_examples(store, rows["train"], **opts)
    questions = [str(r[question_field]) for r in rows["dev"]]
    contexts = [str(r[context_field]) for r in rows["dev"]]
    windows = windower_for(store).detailed_windows(questions, contexts)
    from erstore.keys import window_key
    from erstore.labels import Example, check_stored

    dev_ex = Examples([Example(window_key(w.ids, w.boundary), {}, n, i)
                       for n, ws in enumerate(windows) for i, w in enumerate(ws)],
                      [f"{q} | {c}" for q, c in zip(questions, contexts)])
    check_stored(store, dev_ex)
    gold = [[str(a) for a in r[answers_field]["text"]] or [""] for r in rows["dev"]]
    return Data(task, train_ex, label_values(train_ex), dev_ex, gold, 2, {}, None, 0, windows, contexts)


def score(data: Data, logits: Mapping[str, np.ndarray]) -> tuple[float, dict[str, float]]:
    """The primary metric over the dev rows (and extras, e.g. QA exact match) from window logits."""
    per_row = data.dev.by_row()
    if data.task == "classification":
        hits = [int(np.mean([logits[data.dev[i].key] for i in idx], axis=0).argmax() == g)
                for idx, g in zip(per_row, data.gold)]
        return 100.0 * float(np.mean(hits)), {}
    if data.task == "ner":
        pred = []
        for idx, g in zip(per_row, data.gold):
            ex = [data.dev[i] for i in idx]
            values = word_logits([logits[e.key] for e in ex], [e.word_positions for e in ex], len(g))
            pred.append(word_tags(values, o_label=data.o_label).tolist())
        return ner_score(data, pred), {}
    answers = [best_answer([logits[data.dev[i].key] for i in idx], data.dev_windows[n], data.contexts[n])["text"]
               for n, idx in enumerate(per_row)]
    em, f1 = squad_scores(answers, data.gold)
    return f1, {"exact_match": em}


def ner_score(data: Data, pred: list[list[int]]) -> float:
    if data.id_to_label is not None:
        return entity_f1(data.gold, [[data.id_to_label[t] for t in p] for p in pred])
    return word_f1(data.gold, pred, o_label=data.o_label)


def trivial_score(data: Data) -> tuple[str, float]:
    """(name, dev score) of the trivial baseline the reference must beat."""
    if data.task == "classification":
        counts: dict[int, int] = {}
        for lab in data.train_labels:
            counts[int(lab)] = counts.get(int(lab), 0) + 1
        majority = max(counts, key=lambda c: (counts[c], -c))
        return "majority class", 100.0 * float(np.mean([g == majority for g in data.gold]))
    if data.task == "ner":
        return "all-O", ner_score(data, [[data.o_label] * len(g) for g in data.gold])
    return "empty answer", squad_scores([""] * len(data.gold), data.gold)[1]


# -- models ---------------------------------------------------------------------------------------
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
            self.template, self.token_types, self.head_tail = load_base(store)
        else:
            self.template = load_tail(store)
        self.load_s = time.perf_counter() - start

    def make(self, seed: int) -> torch.nn.Module:
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

    def dev_batch(self, keys: list[str], entries: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """One dev batch from read entries: stored token ids (full) or stored states (reduced)."""
        if self.full:
            return IdCollate()([{"ids": np.asarray(entries[k].token_ids, dtype=np.int64),
                                 "boundary": entries[k].boundary} for k in keys])
        return PadCollate()([{"states": entries[k].states} for k in keys])


def fit(model: torch.nn.Module, runner: Runner, data: Data, budget: Budget, *, lr: float, seed: int,
        phase: _progress.Phase | None = None) -> list[float]:
    """Train one seed with `consumers.train.run_epochs`; returns seconds of each epoch.
    `phase` counts the optimizer steps (for periodic progress lines during long runs)."""
    torch.manual_seed(seed)
    batches = store_batches(model, runner.store, data.train.keys, data.train_labels,
                            batch_size=budget.batch_size, shuffle=True, seed=seed)
    if phase is not None:
        batches = Counted(batches, phase)
    return run_epochs(model, make_optimizer(model, lr=lr), batches, budget.epochs_for(len(data.train)))[1]


class Counted:
    """Batches re-iterable like the wrapped ones (one pass per epoch), counting each into a Phase."""

    def __init__(self, batches: Iterable[Any], phase: _progress.Phase) -> None:
        self.batches, self.phase = batches, phase

    def __iter__(self) -> Any:
        for batch in self.batches:
            yield batch
            self.phase.update()


def train_steps(data: Data, budget: Budget) -> int:
    """Optimizer steps one seed takes (every epoch runs over all training examples)."""
    return budget.epochs_for(len(data.train)) * max(1, math.ceil(len(data.train) / budget.batch_size))


@torch.no_grad()
def evaluate(model: torch.nn.Module, runner: Runner, data: Data, batch_size: int) -> tuple[dict[str, np.ndarray], float]:
    """Logits of every distinct dev window (unpadded) and the mean seconds per batch (read + forward)."""
    model.eval()
    keys = data.dev_keys
    chunks = [keys[i: i + batch_size] for i in range(0, len(keys), batch_size)]
    first = {e.key: e for e in runner.store.read(chunks[0])}
    model(**runner.dev_batch(chunks[0], first))  # warm-up, untimed
    out: dict[str, np.ndarray] = {}
    seconds = 0.0
    for chunk in chunks:
        start = time.perf_counter()
        entries = {e.key: e for e in runner.store.read(chunk)}
        o = model(**runner.dev_batch(chunk, entries))
        seconds += time.perf_counter() - start
        values = o.logits if runner.task != "qa" else torch.stack([o.start_logits, o.end_logits], -1)
        for row, key in enumerate(chunk):
            n = len(entries[key].token_ids)
            out[key] = values[row].numpy() if values.dim() == 2 else values[row, :n].numpy()
    return out, seconds / len(chunks)


def run_row(runner: Runner, data: Data, budget: Budget, *, layer: int | None,
            progress: Callable[[str], None], reporter: _progress.Reporter | None = None) -> dict[str, Any]:
    """Train and evaluate one row for every seed; raw numbers (speedups are added later).

    `progress` gets one line per seed (metric, seconds); `reporter` also counts training steps,
    so that a long run prints periodic lines (see erstore.progress).
    """
    start = time.perf_counter()
    load = [os.getloadavg()[0]]
    lr = budget.adapter_lr if runner.adapters else budget.lr
    metrics, extras, epoch_s, batch_s = {}, [], [], []
    reporter = reporter or _progress.Reporter("choose", "off")
    with reporter.phase(f"train {runner.name}", total=len(budget.seeds) * train_steps(data, budget),
                        unit="steps") as phase:
        for seed in budget.seeds:
            began = time.perf_counter()
            model = runner.make(seed)
            epoch_s += fit(model, runner, data, budget, lr=lr, seed=seed, phase=phase)
            logits, per_batch = evaluate(model, runner, data, budget.eval_batch_size)
            batch_s.append(per_batch)
            metrics[str(seed)], extra = score(data, logits)
            extras.append(extra)
            load.append(os.getloadavg()[0])
            progress(f"  {runner.name} seed {seed}: {metrics[str(seed)]:.2f} "
                     f"({_progress.duration(time.perf_counter() - began)})")
    values = list(metrics.values())
    return {"name": runner.name, "layer": layer, "adapters": runner.adapters,
            "metric": float(np.mean(values)), "metric_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": metrics,
            "extra": {k: float(np.mean([e[k] for e in extras])) for k in (extras[0] if extras else {})},
            "train_s_per_epoch": float(np.mean(epoch_s)),
            "train_s_std": statistics.stdev(epoch_s) if len(epoch_s) > 1 else 0.0,
            "infer_s_per_batch": float(np.mean(batch_s)),
            "store_bytes": 0 if runner.full else int(runner.store.info()["bytes"]),
            "load_s": runner.load_s, "wall_s": runner.load_s + time.perf_counter() - start,
            "load_avg": max(load)}


def check_candidates(stores: Iterable[erstore.Store], data: Data) -> None:
    """Every labelled window must be in every candidate store (one corpus built at every layer)."""
    keys = sorted(set(data.train.keys) | set(data.dev.keys))
    for s in stores:
        missing = [k for k, p in zip(keys, s.index.find(keys)) if p < 0]
        if missing:
            raise KeyNotFoundError(f"{len(missing)} labelled windows are not in {s.location.url}, e.g. "
                                   f"{missing[0]}; build every candidate layer over the same corpus")
