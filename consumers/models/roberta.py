"""RoBERTa tail: the same layers and masks as BERT; only the task-head conventions differ
(RobertaForSequenceClassification's `classifier.dense` / `classifier.out_proj` on <s>)."""

from __future__ import annotations

from .bert import BertTail


class RobertaTail(BertTail):
    family = "roberta"
    hf_prefix = "roberta"
    sequence_head = "roberta"
