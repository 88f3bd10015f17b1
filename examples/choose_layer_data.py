"""Labelled text for examples/choose_layer.md: which stdlib package a docstring paragraph is from.

Real, offline text: `erstore.corpus.default_corpus` (prose paragraphs of the Python standard
library's docstrings, ids like "email/message.py:123"). The label is the top-level package of
the id; the 8 largest packages are kept, at most PER_CLASS paragraphs of at most MAX_CHARS
characters each (short texts keep the CPU run short), and a seeded shuffle splits them 60/40
into train and dev. Writes corpus.jsonl, train.jsonl and dev.jsonl into OUT.

    python examples/choose_layer_data.py OUT
"""

from __future__ import annotations

import collections
import json
import random
import sys
from pathlib import Path

from erstore.corpus import default_corpus

PACKAGES = ("tkinter", "idlelib", "distutils", "email", "asyncio", "logging", "xml", "unittest")
PER_CLASS = 80
MAX_CHARS = 320


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    by_package: dict[str, list[dict]] = collections.defaultdict(list)
    for doc in default_corpus(100_000):
        package = doc.id.split("/")[0]
        if package in PACKAGES and len(doc.text) <= MAX_CHARS and len(by_package[package]) < PER_CLASS:
            by_package[package].append({"id": doc.id, "text": doc.text, "label": package})
    rows = [r for p in PACKAGES for r in by_package[p]]
    random.Random(0).shuffle(rows)
    cut = int(0.6 * len(rows))
    for name, part in (("corpus", rows), ("train", rows[:cut]), ("dev", rows[cut:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    print(f"{len(rows)} paragraphs of {len(PACKAGES)} packages: {cut} train, {len(rows) - cut} dev -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "choose-data"))
