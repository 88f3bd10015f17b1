"""Consumers of an erstore store: reduced models that run only layers k..N-1 on stored states.

    import erstore, consumers
    store = erstore.open("stores/minilm-l3")
    model = consumers.ReducedModel.for_store(store, task="sequence", num_labels=2)
    consumers.add_adapters(model, bottleneck=64)        # optional: Houlsby adapters, tail frozen
    examples = erstore.labels.sequence_examples(store, rows, by="doc")   # one example per row
    consumers.train(model, store, examples, epochs=3)
    model.predict(["new text"], store=store)
    full = consumers.FullModel.for_store(store, task="sequence", num_labels=2)   # the baseline
    consumers.train(full, store, examples, epochs=3)                             # same loop and loss

Modules: `base` (the Tail base class), `tail` (load_tail), `models/` (one module per model
family, encoders and decoders), `registry` (model_type -> family; `register_family` and the
`erstore.families` entry points add families from user code), `heads`, `lm` (decoders' LM
head and causal-LM loss), `adapters`, `data` (dataset/collate), `reduced` (ReducedModel:
predict, save_pretrained / from_pretrained), `pretrained` (the saved folder: config, weights,
PEFT adapter files), `full` (FullModel: the full fine-tuning baseline), `serving` (per-word
tags and answer text), `embed` (sentence embeddings), `decode`, `metrics` (seqeval entity F1,
SQuAD EM/F1), `train`, `recycle`
(save-and-recycle training: compute in epoch 1, read after),
`cross` (cross-model recycling: a larger model's stored states feed a smaller model),
`models.t5` (also the seq2seq reduced model). `erstore` never imports this package.
"""

from __future__ import annotations

from .adapters import BottleneckAdapter, add_adapters, add_lora, merge_lora, trainable_state_dict
from .heads import (
    MLPHead,
    PoolingHead,
    QuestionAnsweringHead,
    SequenceClassificationHead,
    TokenClassificationHead,
    load_transformers_head,
    make_head,
)
from .cross import CrossModel
from .recycle import RecycleReport, SaveAndRecycle, recipe_for, save_and_recycle
from .full import FullModel
from .lm import LMHead, load_lm_head
from .reduced import ReducedModel
from .registry import ENTRY_POINT_GROUP, FAMILIES, register_family, tail_class
from .tail import Tail, load_tail
from .train import train

__all__ = [
    "ENTRY_POINT_GROUP", "FAMILIES", "FullModel", "LMHead", "BottleneckAdapter", "CrossModel", "MLPHead",
    "PoolingHead", "QuestionAnsweringHead", "RecycleReport",
    "ReducedModel", "SaveAndRecycle", "SequenceClassificationHead", "Tail", "TokenClassificationHead",
    "add_adapters", "add_lora", "merge_lora", "load_lm_head", "load_tail", "load_transformers_head", "make_head", "recipe_for",
    "register_family", "save_and_recycle", "tail_class", "train", "trainable_state_dict",
]
