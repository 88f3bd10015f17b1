"""What verified reads cost: the Loader on a format-1 store (no checksums) read by the format-1
code, against the same data as a format-2 store (zstd-checksummed chunks, checked metadata) read by this
code, in interleaved rounds (A B A B ...) so that machine load hits both alike.

    python benchmarks/bench_verify.py --old-tree /path/to/erstore-before [--limit 2000] [--rounds 4]

`--old-tree` is a checkout of erstore before format 2 (e.g. `git archive ba5c11f erstore | tar -x -C DIR`).
The format-1 store is built by that code from real MiniLM layer-3 states of the default corpus;
the format-2 store is `erstore copy` of it (bit-identical stored values). Each round runs one
child process per side, timing the same Loader epochs as bench_read.py (sequential and
block-shuffled, fp32 batches on CPU, best of 3 each after a warm-up). Appends to results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]


def child(store: str, batch_size: int) -> dict:
    """Loader epochs over `store` with whichever erstore is on sys.path."""
    import erstore

    def epoch(shuffle: bool) -> tuple[float, float]:
        """(wall, CPU) seconds of one epoch; CPU time of all threads is steadier on a loaded machine."""
        s = erstore.open(store)  # cold cache pool each time; file bytes stay in page cache
        with s.loader(batch_size=batch_size, shuffle=shuffle, seed=0) as loader:
            t, c = time.perf_counter(), time.process_time()
            for _ in loader:
                pass
            return time.perf_counter() - t, time.process_time() - c

    epoch(False)
    seq = [epoch(False) for _ in range(3)]
    shuf = [epoch(True) for _ in range(3)]
    s = erstore.open(store)
    tokens = int(s.index.total_tokens)
    return {"erstore": erstore.__file__, "format_version": s.meta.format_version,
            "sequential_s": min(w for w, _ in seq), "shuffled_s": min(w for w, _ in shuf),
            "sequential_cpu_s": min(c for _, c in seq), "shuffled_cpu_s": min(c for _, c in shuf),
            "tokens": tokens, "sequences": len(s)}


def run_child(tree: Path, store: Path, batch_size: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, __file__, "--child", str(store), "--batch-size", str(batch_size)],
                         env=env, check=True, capture_output=True, text=True, cwd=tempfile.gettempdir()).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-tree", type=Path, help="folder holding the format-1 `erstore` package")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "erstore-bench-verify")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch_size)))
        return
    old, new = args.work / "format1", args.work / "format2"
    if not (old / "erstore.json").exists():
        code = (f"import erstore; assert erstore.__file__.startswith({str(args.old_tree)!r}); "
                f"erstore.build(layers=(3,), store={str(old)!r}, limit={args.limit}, progress=False)")
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(args.old_tree)},
                       check=True, cwd=tempfile.gettempdir())
    if not (new / "erstore.json").exists():
        subprocess.run([sys.executable, "-m", "erstore.cli", "copy", str(old), str(new)],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, cwd=tempfile.gettempdir())
    from common import machine, record

    rows = []
    for r in range(args.rounds):
        a = run_child(args.old_tree, old, args.batch_size)
        b = run_child(REPO, new, args.batch_size)
        assert a["format_version"] == 1 and b["format_version"] == 2 and a["tokens"] == b["tokens"]
        rows.append({"round": r, **{f"{side}_{k}": round(res[k], 4) for side, res in (("unverified", a), ("verified", b))
                                    for k in ("sequential_s", "shuffled_s", "sequential_cpu_s", "shuffled_cpu_s")}})
        print(json.dumps(rows[-1]), flush=True)
    best = {k: min(row[k] for row in rows) for k in rows[0] if k != "round"}
    ratios = {f"verified_over_unverified_{k}": round(best[f"verified_{k}_s"] / best[f"unverified_{k}_s"], 3)
              for k in ("sequential", "shuffled", "sequential_cpu", "shuffled_cpu")}
    print(machine())
    print(f"{a['sequences']} sequences, {a['tokens']} tokens; best of {args.rounds} interleaved rounds: "
          f"time verified / unverified: sequential {ratios['verified_over_unverified_sequential']}, "
          f"shuffled {ratios['verified_over_unverified_shuffled']}; CPU time: sequential "
          f"{ratios['verified_over_unverified_sequential_cpu']}, shuffled {ratios['verified_over_unverified_shuffled_cpu']}")
    record("verify", {"limit": args.limit, "batch_size": args.batch_size, "rounds": rows, "best": best, **ratios,
                      "load_average": os.getloadavg(), "sequences": a["sequences"], "tokens": a["tokens"]})


if __name__ == "__main__":
    main()
