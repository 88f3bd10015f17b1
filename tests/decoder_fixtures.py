"""Tiny random decoder-only models (GPT-2, Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3) saved
offline like hub checkpoints, each with a tokenizer that handles BOS the way its family does.

No hub access. GPT-2 and Qwen get a byte-level BPE tokenizer trained here on a few stdlib
docstrings (their hub tokenizers are byte-level BPE; transformers rebuilds Qwen2's from vocab and
merges, so it must be one); the others reuse the packaged MiniLM's WordPiece vocabulary with a
decoder-style post-processor instead of BERT's `[CLS] $A [SEP]`:

    family            BOS added?   like the hub tokenizer of
    gpt2              no           gpt2 (no BOS; <|endoftext|> only separates documents)
    qwen2, qwen3      no           Qwen2/Qwen3 (no BOS token at all)
    phi3              no           Phi-3-mini (add_bos_token false)
    llama, mistral    yes (<s>)    Llama-2/3, Mistral
    gemma2, gemma3    yes (<bos>)  Gemma 2/3

For the WordPiece ones the BOS token is MiniLM's `[CLS]` (id 101) named bos_token; what matters
for erstore is only what the tokenizer emits, and the stored token ids show it.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import minilm_path

BOS_FAMILIES = {"llama", "mistral", "gemma2", "gemma3"}
BPE_FAMILIES = {"gpt2", "qwen2", "qwen3"}
BPE_VOCAB = 1024
DECODERS = ["gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"]
#: Sliding windows shorter than the test windows (max_length 64), so the masks matter.
WINDOW = 8


def decoder_config(family: str, *, hidden: int = 32, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                   intermediate: int = 64, vocab: int = 30522, **overrides):
    import transformers as tf

    rope = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,  # noqa: C408
                num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                max_position_embeddings=512, bos_token_id=101, eos_token_id=102, pad_token_id=0)
    make = {
        "gpt2": lambda: tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate,
                                      vocab_size=BPE_VOCAB, n_positions=512, bos_token_id=0,
                                      eos_token_id=0),
        "llama": lambda: tf.LlamaConfig(**rope),
        "qwen2": lambda: tf.Qwen2Config(**rope, use_sliding_window=True, sliding_window=WINDOW,
                                        max_window_layers=layers // 2),
        "qwen3": lambda: tf.Qwen3Config(**rope, head_dim=hidden // heads),
        "mistral": lambda: tf.MistralConfig(**rope, sliding_window=WINDOW),
        "gemma2": lambda: tf.Gemma2Config(**rope, head_dim=hidden // heads, sliding_window=WINDOW,
                                          query_pre_attn_scalar=hidden // heads),
        "gemma3": lambda: tf.Gemma3TextConfig(**rope, head_dim=hidden // heads, sliding_window=WINDOW,
                                              sliding_window_pattern=2, query_pre_attn_scalar=hidden // heads),
        "phi3": lambda: tf.Phi3Config(**rope),
    }
    if family in BPE_FAMILIES:
        rope.update(vocab_size=BPE_VOCAB, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    config = make[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def bpe_tokenizer():
    """A byte-level BPE (GPT-2 style: no BOS, <|endoftext|> as eos) trained on stdlib docstrings."""
    import collections
    import json
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.conftest import SENTENCES

    texts = list(SENTENCES) + [m.__doc__ or "" for m in (collections, json, os, os.path, Path)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(folder: Path, family: str) -> None:
    """The family's tokenizer with its BOS behaviour (see the module docstring)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    if family in BPE_FAMILIES:
        tok = bpe_tokenizer()
        specials = {"eos_token": "<|endoftext|>", "unk_token": None}
        if family == "gpt2":
            specials["bos_token"] = "<|endoftext|>"
        else:
            specials["pad_token"] = "<|endoftext|>"
        PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **specials).save_pretrained(folder)
        return
    tok = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    if family in BOS_FAMILIES:
        tok.post_processor = TemplateProcessing(single="[CLS] $A", pair="[CLS] $A $B",
                                                special_tokens=[("[CLS]", 101)])
    else:
        tok.post_processor = TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    tok.no_padding()
    tok.no_truncation()
    specials = {"bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]"}
    if family not in ("gpt2",):
        specials["pad_token"] = "[PAD]"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **specials)
    fast.save_pretrained(folder)


def save_tiny_decoder(folder: Path, family: str, *, seed: int = 0, **overrides) -> Path:
    """A randomly initialised *ForCausalLM of `family` (base model + LM head) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(decoder_config(family, **overrides))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    save_tokenizer(folder, family)
    return folder


# -- stores of every decoder family (session-scoped: built once) --------------------------------
import pytest  # noqa: E402

LAYERS = (0, 2, 4)  # of 4: embeddings, the middle, the final (normalised) output


@pytest.fixture(scope="session")
def decoder_corpus(tmp_path_factory) -> Path:
    from tests.conftest import SENTENCES, write_jsonl

    rows = [{"id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES)]
    rows.append({"id": "long", "text": " ".join(SENTENCES * 3)})  # several windows at max_length 64
    return write_jsonl(tmp_path_factory.mktemp("dcorpus") / "corpus.jsonl", rows)


class DecoderZoo:
    """Tiny decoder models and their float32 stores at LAYERS, made on first use."""

    def __init__(self, root: Path, corpus: Path):
        self.root, self.corpus = root, corpus
        self.models: dict[str, Path] = {}
        self.built: set[str] = set()

    def model(self, family: str) -> Path:
        if family not in self.models:
            self.models[family] = save_tiny_decoder(self.root / family, family)
        return self.models[family]

    def store(self, family: str, layer: int = 2):
        import erstore

        path = self.root / f"{family}-stores"
        if family not in self.built:
            # batch_size=1: each stored row is the model run on that window alone, which is what
            # the bit-exact comparisons run too (batched rows may round differently, ~1e-7).
            erstore.build(model=str(self.model(family)), layers=LAYERS, corpus=str(self.corpus),
                          store=str(path), dtype="float32", progress=False, max_length=64, stride=8,
                          batch_size=1, id_field="id")
            self.built.add(family)
        return erstore.open(str(path / f"layer-{layer}"))


@pytest.fixture(scope="session")
def dzoo(tmp_path_factory, decoder_corpus) -> DecoderZoo:
    return DecoderZoo(tmp_path_factory.mktemp("dzoo"), decoder_corpus)
