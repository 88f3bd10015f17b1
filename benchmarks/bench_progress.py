"""What progress reporting costs: `Phase.update` per call in each mode against a bare counter, and
a build with progress off against the same build printing a plain line after every batch (the
worst case; the default is one line per 10 s), in pairs of alternating order.

    python benchmarks/bench_progress.py [--calls 2000000] [--docs 1500] [--rounds 6]

The build uses a tiny random 4-layer BERT (hidden 32, the MiniLM tokenizer), so the forward pass
is cheap and any per-batch overhead of the reporter shows as much as it can. Appends to results.jsonl.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine, record


def per_call(calls: int) -> dict[str, float]:
    """ns per update(1) call, best of 3, for off / lines (interval 10 s) / bar (tqdm) and a bare `n += 1`."""
    from erstore.progress import Reporter

    def bare() -> float:
        n, t = 0, time.perf_counter()
        for _ in range(calls):
            n += 1
        return time.perf_counter() - t

    def mode(name: str) -> float:
        phase = Reporter("bench", name, stream=io.StringIO(), interval=10).phase("x", total=calls)
        update, t = phase.update, time.perf_counter()
        for _ in range(calls):
            update(1)
        seconds = time.perf_counter() - t
        phase.close()
        return seconds

    out = {"bare_ns": min(bare() for _ in range(3)) / calls * 1e9}
    for name in ("off", "lines", "bar"):
        out[f"{name}_ns"] = min(mode(name) for _ in range(3)) / calls * 1e9
    return {k: round(v, 1) for k, v in out.items()}


def builds(docs: int, rounds: int) -> dict[str, Any]:
    """The same build (fresh store each time) with progress off and printing a line after every
    batch (the worst case), in pairs whose order alternates; plus what the reporter did in one build.

    Reported: per-pair ratios (wall and CPU seconds of the process) and their median, because on a
    shared machine identical builds varied 5x in wall time from one minute to the next; and the
    number of `update` calls and lines of one build, which with the per-call cost above bound the
    reporter's share of a build whatever the noise.
    """
    import erstore
    import erstore.progress as progress
    from erstore.corpus import DEFAULT_CORPUS, read_corpus
    from tests.conftest import save_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-progress-"))
    model = save_tiny_model(root / "tiny")
    corpus = [d.text for d in read_corpus(DEFAULT_CORPUS, limit=docs)]
    err, sink = sys.stderr, open(os.devnull, "w")  # noqa: SIM115 (closed below)

    def one(name: str, tag: str) -> tuple[float, float]:
        os.environ["ERSTORE_PROGRESS_SECONDS"] = "0"
        sys.stderr = sink
        try:
            t, c = time.perf_counter(), time.process_time()
            erstore.build(model=str(model), layers=(2,), corpus=corpus, store=str(root / tag), max_length=128,
                          batch_size=32, progress=name)
            return time.perf_counter() - t, time.process_time() - c
        finally:
            sys.stderr = err

    wall, cpu = [], []
    calls = {"update": 0, "lines": 0}
    update, line = progress.Phase.update, progress.Reporter._line
    try:
        one("off", "warm-up")
        for r in range(rounds):
            order = ("off", "lines") if r % 2 == 0 else ("lines", "off")
            got = {name: one(name, f"{name}-{r}") for name in order}
            wall.append(got["lines"][0] / got["off"][0])
            cpu.append(got["lines"][1] / got["off"][1])

        def counted_update(self: Any, n: int = 1) -> None:
            calls["update"] += 1
            update(self, n)

        def counted_line(self: Any, text: str) -> None:
            calls["lines"] += 1
            line(self, text)

        progress.Phase.update, progress.Reporter._line = counted_update, counted_line
        one("lines", "counted")
    finally:
        progress.Phase.update, progress.Reporter._line = update, line
        sink.close()
        os.environ.pop("ERSTORE_PROGRESS_SECONDS", None)
        shutil.rmtree(root, ignore_errors=True)
    return {"every_batch_over_off_wall": [round(x, 3) for x in wall],
            "every_batch_over_off_cpu": [round(x, 3) for x in cpu],
            "every_batch_over_off_wall_median": round(statistics.median(wall), 3),
            "every_batch_over_off_cpu_median": round(statistics.median(cpu), 3),
            "updates_per_build": calls["update"], "lines_per_build_every_batch": calls["lines"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2_000_000)
    p.add_argument("--docs", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load = os.getloadavg()[0]
    results = {"calls": args.calls, "docs": args.docs, "rounds": args.rounds, **per_call(args.calls),
               **builds(args.docs, args.rounds)}
    results["load_avg_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    print(machine())
    for k, v in results.items():
        print(f"{k:28} {v}")
    record("progress", results)


if __name__ == "__main__":
    main()
