"""Distributed `erstore build`: `torchrun --nproc-per-node N -m erstore.distributed BUILD-OPTIONS`.

Every rank reads only its share of the corpus (`iter_corpus(shard=(rank, world))`: whole
files of a directory or glob when there are enough of them, else every world-th document), so
no rank reads or tokenizes the whole corpus. A window that documents of two ranks share is
computed by both (the index keeps one); windows already in the store are computed by none.
Each rank writes its own fresh arrays and journals (a `StoreWriter` per rank and layer). At
the end rank 0 gathers every rank's index records and document map through
`torch.distributed` (gloo works on CPU), writes one index file that points into all ranks'
arrays, and commits exactly one version with the usual write-if-absent. If any rank fails, torchrun stops the others and rank 0 never commits: no
partial version appears; the durable rows stay journaled and the next run adopts them.

The options are those of `erstore build` (`--model`, `--layer`, `--corpus`, `--store`, ...).
The single-process build is unchanged; this module passes it a `RankWriter` factory.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any

import numpy as np

from erstore.builder import build as _single_process_build
from erstore.commitparts import renumbered
from erstore.docmap import render
from erstore.manifest import RECORD_DTYPE, VersionManifest
from erstore.writer import StoreWriter


class RankWriter(StoreWriter):
    """A `StoreWriter` for one rank: writes only its shard; `commit` is collective."""

    def __init__(self, *args: Any, rank: int, world_size: int, group: Any = None, **kwargs: Any):
        import torch.distributed as dist

        # All ranks look for journals to adopt before any rank writes one: a rank must adopt
        # only leftovers of earlier runs, never a sibling's in-flight journals.
        dist.barrier(group=group)
        super().__init__(*args, **kwargs)
        self.rank, self.world_size, self.group = rank, world_size, group

    def discard(self) -> bool:
        """Never remove the store: sibling ranks may still be writing into it (and journaling
        rows a rerun adopts) after this rank failed."""
        self.close()
        return False

    def commit(self, *, build: dict[str, Any] | None = None) -> VersionManifest | None:
        """Every rank calls this; rank 0 commits all ranks' rows as one version."""
        import torch.distributed as dist

        self._flush(final=True)
        own = self.own_records()
        # The document map goes as its entry lines (they concatenate across ranks).
        part = {"parts": [(own.tobytes(), [self.build_id]),
                          *((r.tobytes(), a) for r, a in self._adopted)],
                "build": build or {}, "arrays": [self.build_id], "docs": b"".join(self._docs.lines())}
        gathered: list[Any] = [None] * self.world_size if self.rank == 0 else None  # type: ignore[assignment]
        dist.gather_object(part, gathered, dst=0, group=self.group)
        result: list[Any] = [None]
        if self.rank == 0:
            result = [self._commit_all(gathered)]
        dist.broadcast_object_list(result, src=0, group=self.group)
        self._cleanup_journals()
        self._finish()
        return VersionManifest.from_json(result[0].encode(), "rank 0") if result[0] else None

    def _commit_all(self, gathered: list[dict[str, Any]]) -> str | None:
        arrays: list[str] = []
        blocks = renumbered(((np.frombuffer(raw, dtype=RECORD_DTYPE), a) for g in gathered for raw, a in g["parts"]),
                            arrays)
        lines = b"".join(g["docs"] for g in gathered).splitlines(keepends=True)
        docs = (render(lines[i : i + self.part_documents]) for i in range(0, max(len(lines), 1), self.part_documents))
        parts = self.write_parts(blocks, arrays, docs)
        if parts is None:
            return None
        builds = [g["build"] for g in gathered]
        info = {**builds[0], "ranks": len(builds)}
        for name in ("computed", "computed_tokens"):
            if all(name in b for b in builds):
                info[name] = sum(b[name] for b in builds)
        # Per-device throughput (what a cost estimate needs): tokens over the slowest compute phase.
        phases = [(b.get("seconds") or {}).get("compute", 0.0) for b in builds]
        if info.get("computed_tokens") and max(phases) > 0:
            info["seconds"] = {**(builds[0].get("seconds") or {}), "compute": max(phases) * len(builds)}
            info["tokens_per_second"] = round(info["computed_tokens"] / max(phases) / len(builds), 1)
        info["rank_builds"] = builds
        return self._publish(parts, info).to_json().decode()


def build(config: Any) -> list[Any]:
    """Run `erstore.builder.build(config)` as one rank of a torch.distributed job (gloo)."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        local = os.environ.get("LOCAL_RANK")
        if getattr(config, "device", None) == "cuda" and local is not None:
            config = dataclasses.replace(config, device=f"cuda:{local}")  # one GPU per rank on a node
        writer = functools.partial(RankWriter, rank=rank, world_size=world)
        return _single_process_build(config, writer=writer, shard=(rank, world))
    finally:
        if owned:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse the `erstore build` options and build as one rank (every rank prints)."""
    from erstore.cli import build as build_command

    build_command.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="erstore.distributed",
                       standalone_mode=True, obj={"build": build})


if __name__ == "__main__":
    main()
