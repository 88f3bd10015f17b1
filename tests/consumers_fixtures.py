"""Shared tiny models and stores for the consumers tests (session-scoped: built once)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SENTENCES, save_tiny_model, write_jsonl

FAMILIES = ["bert", "roberta", "distilbert", "deberta-v2", "deberta-v2-conv", "mpnet", "t5"]
LAYER = 2  # of 4


@pytest.fixture(scope="session")
def consumer_corpus(tmp_path_factory) -> Path:
    rows = [{"id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES)]
    return write_jsonl(tmp_path_factory.mktemp("ccorpus") / "corpus.jsonl", rows)


class Zoo:
    """Tiny models and their stores, made on first use."""

    def __init__(self, root: Path, corpus: Path):
        self.root, self.corpus = root, corpus
        self.models: dict[str, Path] = {}
        self.stores: dict[tuple, Path] = {}

    def model(self, family: str) -> Path:
        if family not in self.models:
            self.models[family] = save_tiny_model(self.root / family, family)
        return self.models[family]

    # Every layer a test asks for, built in one pass per family and dtype.
    LAYERS = {"bert": (2, 4), "deberta-v2-conv": (0, 1, 2), "t5": (0, 2, 4)}

    def store(self, family: str, layer: int = LAYER, dtype: str = "float32"):
        import erstore

        key = (family, dtype)
        if key not in self.stores:
            layers = self.LAYERS.get(family, (LAYER,)) if dtype == "float32" else (LAYER,)
            path = self.root / f"{family}-{dtype}"
            # batch_size=1: each stored row is the model run on that sequence alone, which is
            # what the bit-exact comparisons below run too (batched rows differ by float rounding).
            erstore.build(model=str(self.model(family)), layers=layers, corpus=str(self.corpus),
                          store=str(path), dtype=dtype, progress=False, max_length=64, batch_size=1)
            self.stores[key] = path
        path = self.stores[key]
        store = erstore.open(str(path if (path / "erstore.json").exists() else path / f"layer-{layer}"))
        if store.recipe.layer != layer:
            raise ValueError(f"add layer {layer} of {family} to Zoo.LAYERS")
        return store


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, consumer_corpus) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"), consumer_corpus)


def full_model(folder: Path, family: str):
    """The full transformers base model, loaded as the build loads it."""
    from erstore.model import LayerExtractor

    return LayerExtractor(str(folder)).model


def entries(store):
    return store.read([store.key_for(s) for s in SENTENCES])


def ids_of(entry) -> torch.Tensor:
    return torch.from_numpy(entry.token_ids.astype(np.int64))[None]
