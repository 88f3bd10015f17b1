"""Choosing what to recycle: train a reduced model per candidate layer k and report the trade-off.

    report = choose_layer("stores/minilm", task="classification", train="train.jsonl",
                          dev="dev.jsonl", budget=Budget(epochs=2, seeds=(0, 1)))
    print(report.table()); report.plot("layers.png"); report.to_dict()

    python -m consumers.choose stores/minilm --task classification --train train.jsonl \
        --dev dev.jsonl --epochs 2 --seeds 0,1 --adapters 64 --plot layers.png [--json]

Given stores of several layers of one model over one corpus (a folder of `layer-K` stores as
`erstore build --layer ...` writes it, or a list of stores), every candidate k gets a fresh
reduced model (layers k..N-1 + head) trained under the same small budget for each seed, and the
report gives the dev metric (mean and sample standard deviation over seeds), training seconds
per epoch (mean and sd), inference seconds per batch, speedups over the reference and store
bytes. The budget defaults to every labelled row and at least `Budget.min_steps` optimizer steps.

The reference is the full transformers model fine-tuned end to end on the stored token ids
(reference="auto" uses a layer-0 store instead when one is among the candidates; "none" makes
the shallowest candidate the reference). `recommend` picks the deepest k whose mean metric is
within `tolerance` points of the reference's, and refuses to recommend (saying why) when the
reference does not beat a trivial baseline (majority class, all-O, empty answer) by more than
the tolerance, or when the reference's seeds disagree by more than the tolerance. Differences
within the seed spread (the larger max-min range over seeds of the two rows compared) are
reported as such. Timings come with their spread; the report warns when the machine was busy
(1-minute load average above the core count) or when the timings rank layers inconsistently.

Metrics, in points (0-100), over the user's dev rows (duplicates included, each row once):
classification = accuracy per row (logits of its windows averaged, as `ReducedModel.predict`
does); ner = entity F1 as seqeval computes it, over one tag per word (first sub-token, read from
the window with the most context; "word F1" over non-O words when tags are integers without
names); qa = F1 as the SQuAD v1.1 script computes it on the answer text of the best span over
the question's windows (exact match is reported too).

Not here: hyper-parameter search (one lr for all candidates), early stopping, GPU timing
discipline (timings are wall-clock on the given device, noisy on shared machines).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import erstore
from .sweep import (
    TASKS,
    Budget,
    Runner,
    check_candidates,
    prepare,
    run_row,
    trivial_score,
)
from erstore import progress as _progress
from erstore.errors import IncompatibleStoreError, InvalidInputError
from erstore.extras import require

__all__ = ["Budget", "Recommendation", "Report", "Result", "choose_layer", "main", "recommend", "TASKS"]

METRICS = {"classification": "accuracy", "ner": "entity F1", "qa": "F1"}
SAME = ("model_fingerprint", "tokenizer_fingerprint", "max_length", "stride", "num_layers")


@dataclass(frozen=True)
class Result:
    """One row of the report: a candidate (or the reference) over all seeds."""

    name: str
    layer: int | None  # None: the full transformers model
    adapters: int | None
    metric: float  # mean over seeds, points
    metric_std: float  # sample standard deviation over seeds (0 for one seed)
    per_seed: dict[str, float]
    extra: dict[str, float]  # e.g. QA exact match, mean over seeds
    train_s_per_epoch: float
    infer_s_per_batch: float
    speedup: float | None  # training: reference s/epoch / this row's
    infer_speedup: float | None
    store_bytes: int
    load_s: float  # loading and checking the model (0 for an adapter row: it shares its k's load)
    wall_s: float  # load + every seed's training and evaluation
    train_s_std: float = 0.0  # sd of the epoch times over all seeds and epochs
    load_avg: float = 0.0  # highest 1-minute load average seen while the row ran

    @property
    def spread(self) -> float:
        """max - min of the metric over seeds (0 for one seed)."""
        return max(self.per_seed.values()) - min(self.per_seed.values()) if self.per_seed else 0.0


@dataclass(frozen=True)
class Recommendation:
    name: str | None  # None: no candidate is within tolerance, or the report refuses to recommend
    layer: int | None
    reason: str
    refused: str | None = None  # why no recommendation can be trusted (untrained / unstable reference)


@dataclass
class Report:
    task: str
    metric_name: str
    tolerance: float
    budget: Budget
    reference: Result
    candidates: list[Result]
    recommendation: Recommendation
    train_examples: int
    dev_examples: int
    wall_s: float
    stores: list[str] = field(default_factory=list)
    train_rows: int = 0
    dev_rows: int = 0
    epochs: int = 0  # epochs actually run (Budget.epochs_for the training examples)
    trivial: tuple[str, float] = ("", 0.0)  # the trivial baseline and its dev score
    warnings: list[str] = field(default_factory=list)  # about timings (busy machine, inconsistent order)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric_name, "tolerance": self.tolerance,
                "budget": self.budget.to_dict(), "reference": asdict(self.reference),
                "candidates": [asdict(r) for r in self.candidates],
                "recommendation": asdict(self.recommendation), "train_examples": self.train_examples,
                "dev_examples": self.dev_examples, "train_rows": self.train_rows, "dev_rows": self.dev_rows,
                "epochs": self.epochs, "trivial": {"name": self.trivial[0], "metric": self.trivial[1]},
                "warnings": self.warnings, "wall_s": round(self.wall_s, 2), "stores": self.stores}

    def table(self) -> str:
        """The terminal table, the recommendation and its reasoning."""
        head = (f"{'candidate':<16} {self.metric_name + ' (mean±sd)':>22} {'train s/ep (sd)':>15} "
                f"{'infer ms/b':>10} {'speedup':>8} {'infer x':>8} {'store MB':>9} {'wall s':>7}")
        lines = [head, "-" * len(head)]
        for r in [self.reference, *self.candidates]:
            sp = "-" if r.speedup is None else f"{r.speedup:.2f}x"
            isp = "-" if r.infer_speedup is None else f"{r.infer_speedup:.2f}x"
            lines.append(f"{r.name:<16} {f'{r.metric:.2f} ± {r.metric_std:.2f}':>22} "
                         f"{f'{r.train_s_per_epoch:.2f} ({r.train_s_std:.2f})':>15} "
                         f"{r.infer_s_per_batch * 1e3:>10.1f} {sp:>8} "
                         f"{isp:>8} {r.store_bytes / 1e6:>9.1f} {r.wall_s:>7.1f}")
        b = self.budget
        lines += [f"{self.trivial[0] + ' (trivial baseline)':<16} {f'{self.trivial[1]:.2f}':>22}"]
        lines += ["", f"budget: {self.epochs or b.epochs} epoch(s), seeds {list(b.seeds)}, {self.train_rows} "
                  f"train rows ({self.train_examples} examples) / {self.dev_rows} dev rows "
                  f"({self.dev_examples} examples), batch {b.batch_size}, lr {b.lr:g}"
                  + (f", adapter lr {b.adapter_lr:g}" if any(r.adapters for r in self.candidates) else "")
                  + f"; total wall time {self.wall_s:.1f} s", "", self.recommendation.reason]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG of metric vs training speedup (error bars: sd over seeds); needs matplotlib."""
        return plot(self, path)


# -- the rule -----------------------------------------------------------------------------------
def recommend(candidates: Sequence[tuple[str, int, float]], reference: float, tolerance: float = 0.5, *,
              reference_name: str = "reference", reference_spread: float = 0.0,
              spreads: Mapping[str, float] | None = None, trivial: tuple[str, float] | None = None) -> Recommendation:
    """The deepest k whose metric is >= reference - tolerance (ties at one k: the best metric).

    candidates: (name, layer k, mean metric in points). `reference_spread` / `spreads` (name ->
    max-min over seeds) mark differences within the seed spread; with them and `trivial` (name,
    score of a trivial baseline) the rule refuses to recommend when the reference's seeds
    disagree by more than `tolerance` or when it does not beat the trivial baseline by more than
    `tolerance`. The reason names every candidate's difference to the reference.
    """
    if tolerance < 0:
        raise InvalidInputError(f"tolerance must be >= 0 points, got {tolerance}")
    spreads = dict(spreads or {})
    floor = reference - tolerance
    lines = [f"rule: the deepest layer k whose metric is within {tolerance:g} points of "
             f"{reference_name} ({reference:.2f}), i.e. >= {floor:.2f}"]
    ok = []
    for name, layer, metric in sorted(candidates, key=lambda c: (c[1], c[0])):
        good = metric >= floor - 1e-9
        noise = max(reference_spread, spreads.get(name, 0.0))
        within = " (within the seed spread)" if noise > 0 and abs(metric - reference) <= noise + 1e-9 else ""
        lines.append(f"  {name:<16} {metric:7.2f} ({metric - reference:+.2f}{within}) "
                     f"{'within' if good else 'outside'} tolerance")
        if good:
            ok.append((layer, metric, name))
    refused = None
    if trivial is not None and reference <= trivial[1] + tolerance:
        refused = (f"{reference_name} scores {reference:.2f}, not more than {tolerance:g} points above the "
                   f"trivial baseline ({trivial[0]}: {trivial[1]:.2f}): it did not learn, so there is "
                   "nothing to compare against. Train longer (--epochs / --min-steps), raise --lr or "
                   "give more training rows")
    elif reference_spread > tolerance:
        refused = (f"the seeds of {reference_name} disagree by {reference_spread:.2f} points, more than "
                   f"the tolerance ({tolerance:g}), so whether a candidate is within tolerance "
                   "cannot be told from seed noise. Add seeds, rows or steps, or raise --tolerance")
    if refused:
        lines.append(f"-> no recommendation: {refused}")
        return Recommendation(None, None, "\n".join(lines), refused)
    if not ok:
        lines.append(f"-> no candidate is within tolerance: keep {reference_name}, or raise the "
                     "budget / tolerance")
        return Recommendation(None, None, "\n".join(lines))
    layer, metric, name = max(ok, key=lambda c: (c[0], c[1]))
    lines.append(f"-> recycle layer {layer}: {name} is the deepest candidate within tolerance "
                 f"({metric:.2f} vs {reference:.2f})")
    deeper = [c for c in candidates if c[1] > layer]
    if deeper:
        nxt = min(deeper, key=lambda c: (c[1], -c[2]))
        noise = max(spreads.get(name, 0.0), spreads.get(nxt[0], 0.0))
        if noise > 0 and abs(metric - nxt[2]) <= noise + 1e-9:
            lines.append(f"   note: the next deeper candidate {nxt[0]} ({nxt[2]:.2f}) differs from {name} by "
                         f"{metric - nxt[2]:.2f} points, within the seed spread ({noise:.2f}): which of the "
                         "two is recommended is not resolved by these seeds")
    noise = max(reference_spread, spreads.get(name, 0.0))
    if noise > 0 and abs(metric - reference) <= noise + 1e-9:
        lines.append(f"   note: {name} differs from {reference_name} by {metric - reference:+.2f} points, "
                     f"within the seed spread ({noise:.2f})")
    return Recommendation(name, layer, "\n".join(lines))


def timing_warnings(reference: Result, rows: Sequence[Result], *, cores: int | None = None) -> list[str]:
    """Warnings that the timings may mislead: a busy machine, or layers timed in an impossible order."""
    import os

    cores = cores or os.cpu_count() or 1
    out = []
    busiest = max([reference.load_avg, *(r.load_avg for r in rows)])
    if busiest > cores:
        out.append(f"the machine was busy (1-minute load average up to {busiest:.1f} on {cores} cores): "
                   "timings and speedups are unreliable; rerun on a quiet machine")
    plain = sorted((r for r in rows if not r.adapters and r.layer is not None), key=lambda r: r.layer)
    for a, b in itertools.pairwise(plain):
        if b.train_s_per_epoch > a.train_s_per_epoch:  # a deeper k runs fewer layers: it must be faster
            out.append(f"timings are inconsistent: {b.name} ({b.train_s_per_epoch:.2f} s/epoch) trained slower "
                       f"than {a.name} ({a.train_s_per_epoch:.2f}), though it runs fewer layers; the "
                       "ordering of speedups is noise")
    if reference.layer is None:
        for r in plain:
            if r.train_s_per_epoch > reference.train_s_per_epoch:
                out.append(f"timings are inconsistent: {r.name} trained slower than {reference.name}")
    return out


# -- stores and labelled data ---------------------------------------------------------------------
def resolve_stores(sources: str | Path | erstore.Store | Iterable[Any]) -> list[erstore.Store]:
    """Open stores, expanding a folder of `layer-K` stores; sorted by layer, one recipe family."""
    items = [sources] if isinstance(sources, (str, Path, erstore.Store)) else list(sources)
    stores: list[erstore.Store] = []
    for item in items:
        if isinstance(item, erstore.Store):
            stores.append(item)
        elif Path(item).is_dir() and not (Path(item) / "erstore.json").exists():
            found = sorted(p for p in Path(item).glob("layer-*") if (p / "erstore.json").exists())
            if not found:
                raise InvalidInputError(f"{item} is neither a store nor a folder of layer-K stores")
            stores += [erstore.open(str(p)) for p in found]
        else:
            stores.append(erstore.open(str(item)))
    stores.sort(key=lambda s: s.recipe.layer)
    first = stores[0].recipe
    for s in stores[1:]:
        for name in SAME:
            if getattr(s.recipe, name) != getattr(first, name):
                raise IncompatibleStoreError(
                    f"{s.location.url} has {name}={getattr(s.recipe, name)!r} but "
                    f"{stores[0].location.url} has {getattr(first, name)!r}; compare stores of one "
                    "model and tokenizer built over one corpus (one `erstore build --layer ...`)")
        if s.recipe.layer in [t.recipe.layer for t in stores if t is not s]:
            raise InvalidInputError(f"two stores hold layer {s.recipe.layer}; give each layer once")
    return stores


def choose_layer(stores: Any, *, task: str, train: Any, dev: Any, budget: Budget = Budget(),  # noqa: B008 (frozen)
                 tolerance: float = 0.5, reference: str = "auto", adapters: int | None = None,
                 o_label: int | None = None, progress: Callable[[str], None] | bool | str | None = None,
                 **join: Any) -> Report:
    """Train a reduced model per candidate store (and the reference) and report the trade-off.

    Args:
        stores: a folder of `layer-K` stores, a store path, or a list of paths / open stores, all
            of one model and tokenizer over one corpus.
        task: classification (rows with an id/text and `label`), ner (`tokens` + `ner_tags`, string
            or integer tags) or qa (SQuAD rows: question, context, answers; stores built from pairs).
        train, dev: rows (dicts) or JSONL paths; `budget.max_train` / `max_dev` keep the first rows.
            Every row is its own example (identical texts with different labels included) and
            scores are over the dev rows.
        reference: "auto" (a layer-0 store if given, else "full"), "full" (the transformers model,
            fine-tuned end to end on the stored token ids) or "none" (the shallowest candidate).
        adapters: also train every candidate with Houlsby adapters of this bottleneck (frozen tail).
        o_label: the NER tag id that counts as "outside" [default: id of "O" if tags are strings, else 0].
        progress: None (silent), a callable getting one status line per step and seed, or True / a
            mode of `erstore.progress`: status lines plus training-step progress on stderr (a bar on
            a terminal, else a line every ERSTORE_PROGRESS_SECONDS).
        join: field names and join mode for `prepare` (by, id_field, text_field, pair_field,
            label_field, tokens_field, tags_field, question_field, context_field, answers_field).

    Raises:
        InvalidInputError / IncompatibleStoreError / KeyNotFoundError on bad stores or labels.
    """
    if reference not in ("auto", "full", "none"):
        raise InvalidInputError(f"reference must be auto, full or none, got {reference!r}")
    threads = torch.get_num_threads()
    if budget.threads:
        torch.set_num_threads(budget.threads)
    if callable(progress):
        reporter, say = _progress.Reporter("choose", "off"), progress
    else:
        reporter = _progress.reporter("choose", False if progress is None else progress)
        say = reporter.say
    try:
        return _choose(stores, task, train, dev, budget, tolerance, reference, adapters, o_label,
                       say, join, reporter)
    finally:
        torch.set_num_threads(threads)


def _choose(stores: Any, task: str, train: Any, dev: Any, budget: Budget, tolerance: float, reference: str,
            adapters: int | None, o_label: int | None, say: Callable[[str], None], join: dict[str, Any],
            reporter: _progress.Reporter) -> Report:
    start = time.perf_counter()
    opened = resolve_stores(stores)
    data = prepare(opened[0], task, train, dev, budget, o_label=o_label, **join)
    check_candidates(opened[1:], data)
    if reference == "auto":
        reference = "store" if opened[0].recipe.layer == 0 else "full"
    ref_store = None if reference == "full" else opened[0]
    candidates = [s for s in opened if s is not ref_store]
    epochs = budget.epochs_for(len(data.train))
    say(f"{data.train.rows} train rows ({len(data.train)} examples) / {data.dev.rows} dev rows; "
        f"{epochs} epoch(s); {len(candidates)} candidate layer(s); reference: {reference}")
    ref_name = "full model" if reference == "full" else f"k={opened[0].recipe.layer}"
    runner = Runner(ref_name, task, opened[0], data.num_labels, full=reference == "full")
    ref = run_row(runner, data, budget, layer=None if reference == "full" else opened[0].recipe.layer, progress=say,
                  reporter=reporter)
    rows = []
    for s in candidates:
        k, loaded = s.recipe.layer, None
        for bottleneck in (None, adapters) if adapters else (None,):
            name = f"k={k}" + (f" +adapters{bottleneck}" if bottleneck else "")
            loaded = Runner(name, task, s, data.num_labels, adapters=bottleneck, template=loaded)
            rows.append(run_row(loaded, data, budget, layer=k, progress=say, reporter=reporter))

    def finish(r: dict[str, Any], is_ref: bool) -> Result:
        r["speedup"] = None if is_ref else ref["train_s_per_epoch"] / r["train_s_per_epoch"]
        r["infer_speedup"] = None if is_ref else ref["infer_s_per_batch"] / r["infer_s_per_batch"]
        return Result(**r)

    reference_row = finish(dict(ref), True)
    results = [finish(r, False) for r in rows]
    trivial = trivial_score(data)
    rec = recommend([(r.name, r.layer, r.metric) for r in results], reference_row.metric, tolerance,
                    reference_name=ref_name, reference_spread=reference_row.spread,
                    spreads={r.name: r.spread for r in results}, trivial=trivial)
    return Report(task, data.metric_name, tolerance, budget, reference_row, results, rec, len(data.train),
                  len(data.dev), time.perf_counter() - start, [s.location.url for s in opened],
                  train_rows=data.train.rows, dev_rows=data.dev.rows, epochs=epochs, trivial=trivial,
                  warnings=timing_warnings(reference_row, results))


# -- the plot -------------------------------------------------------------------------------------
def plot(report: Report, path: str | Path) -> Path:
    """Metric vs training speedup as a PNG (matplotlib, from the `consumers` extra)."""
    path = Path(path)
    rows = [report.reference, *report.candidates]
    xs = [1.0 if r.speedup is None else r.speedup for r in rows]
    floor = report.reference.metric - report.tolerance
    # No pyplot: leaves the caller's backend alone.
    Figure = require("matplotlib.figure", extra="consumers", purpose="plotting (--plot)").Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.subplots()
    for r, x in zip(rows, xs):
        color = "black" if r is report.reference else ("tab:orange" if r.adapters else "tab:blue")
        ax.errorbar([x], [r.metric], yerr=[r.metric_std], fmt="o", color=color, capsize=3)
        ax.annotate(r.name, (x, r.metric), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(floor, ls="--", color="grey", lw=1, label=f"reference - {report.tolerance:g} points")
    ax.set_xlabel("training speedup vs reference (s/epoch ratio)")
    ax.set_ylabel(f"dev {report.metric_name} (points, mean ± sd over seeds)")
    ax.set_title(f"{report.task}: metric vs speedup per recycled layer", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# -- command line ---------------------------------------------------------------------------------
def _cli() -> Any:
    import click

    @click.command(name="python -m consumers.choose")
    @click.argument("stores", nargs=-1, required=True)
    @click.option("--task", type=click.Choice(TASKS), required=True)
    @click.option("--train", "train_path", required=True, help="Labelled training rows (JSONL).")
    @click.option("--dev", "dev_path", required=True, help="Labelled dev rows (JSONL).")
    @click.option("--by", type=click.Choice(["doc", "text", "key"]), default="doc", show_default=True,
                  help="classification: join rows to windows by document id, text or key.")
    @click.option("--id-field", default="id", show_default=True)
    @click.option("--text-field", default=None, help="classification --by text: the text column [default: "
                  "text]; ner: align the words to this text column instead of tokenizing them pre-split.")
    @click.option("--pair-field", default=None, help="classification --by text: a second text column.")
    @click.option("--label-field", default="label", show_default=True)
    @click.option("--tokens-field", default="tokens", show_default=True, help="ner: the list of words.")
    @click.option("--tags-field", default="ner_tags", show_default=True, help="ner: one tag per word.")
    @click.option("--question-field", default="question", show_default=True)
    @click.option("--context-field", default="context", show_default=True)
    @click.option("--answers-field", default="answers", show_default=True)
    @click.option("--epochs", type=int, default=Budget.epochs, show_default=True, help="At least this many.")
    @click.option("--min-steps", type=int, default=Budget.min_steps, show_default=True,
                  help="At least this many optimizer steps per seed (epochs are added to reach them).")
    @click.option("--seeds", default="0,1", show_default=True, help="Comma-separated seeds.")
    @click.option("--max-train", type=int, default=None, help="Use the first N training rows [default: all].")
    @click.option("--max-dev", type=int, default=None, help="Use the first N dev rows [default: all].")
    @click.option("--batch-size", type=int, default=Budget.batch_size, show_default=True)
    @click.option("--lr", type=float, default=Budget.lr, show_default=True)
    @click.option("--adapter-lr", type=float, default=Budget.adapter_lr, show_default=True)
    @click.option("--threads", type=int, default=None, help="torch CPU threads [default: torch's choice].")
    @click.option("--tolerance", type=float, default=0.5, show_default=True, help="Points below the reference.")
    @click.option("--reference", type=click.Choice(["auto", "full", "none"]), default="auto", show_default=True)
    @click.option("--adapters", type=int, default=None, help="Also compare Houlsby adapters of this bottleneck.")
    @click.option("--plot", "plot_path", default=None, help="Write metric vs speedup to this PNG.")
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    @click.option("--quiet", is_flag=True, help="No progress output on stderr.")
    def main(stores: tuple[str, ...], task: str, train_path: str, dev_path: str, seeds: str, epochs: int,
             min_steps: int, max_train: int | None, max_dev: int | None, batch_size: int, lr: float, adapter_lr: float, threads: int | None,
             tolerance: float,
             reference: str, adapters: int | None, plot_path: str | None, as_json: bool, quiet: bool,
             **join: Any) -> None:
        """Train a reduced model per stored layer under one budget and recommend a layer to recycle."""
        try:
            if plot_path:  # fail now, not after training every candidate
                require("matplotlib", extra="consumers", purpose="--plot")
            budget = Budget(epochs=epochs, min_steps=min_steps, seeds=tuple(int(s) for s in seeds.split(",") if s.strip()),
                            max_train=max_train, max_dev=max_dev, batch_size=batch_size, lr=lr,
                            adapter_lr=adapter_lr, threads=threads)
            report = choose_layer(list(stores), task=task, train=train_path, dev=dev_path, budget=budget,
                                  tolerance=tolerance, reference=reference, adapters=adapters,
                                  progress=_progress.cli_mode(quiet=quiet, as_json=as_json), **join)
        except (erstore.ErstoreError, ValueError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table())  # table first
        if plot_path:
            report.plot(plot_path)
            if not as_json:
                click.echo(f"plot: {plot_path}")

    return main


main = _cli()

if __name__ == "__main__":
    main()
