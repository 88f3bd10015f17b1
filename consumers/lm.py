"""The language-model head of a decoder store: `lm_head` (+ Gemma 2's final logit soft-capping).

A decoder tail ends with the final norm; `LMHead` turns its output into next-token logits as
the family's *ForCausalLM does, with the checkpoint's own `lm_head` weights (tied to the input
embeddings or not). `load_lm_head(recipe)` takes them from the recipe's model after checking
that its base model is the one the store was built with, so logits on stored states equal the
full model's. The causal-LM loss is transformers' own `ForCausalLMLoss` (labels shifted inside:
position t predicts token t+1; -100 ignored), on the stored token ids by default.

Not here: sequence/token heads (consumers.heads), the tail (consumers.tail).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from erstore.errors import IncompatibleStoreError


class LMHead(nn.Module):
    """`lm_head` [vocab, d] (no bias) and optional tanh soft-capping of the logits."""

    task = "causal-lm"

    def __init__(self, hidden_size: int, num_labels: int, *, softcap: float | None = None):
        super().__init__()
        self.config = {"hidden_size": hidden_size, "num_labels": num_labels, "softcap": softcap}
        self.num_labels = num_labels  # the vocabulary size
        self.softcap = softcap
        self.lm_head = nn.Linear(hidden_size, num_labels, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.lm_head(hidden_states)
        if self.softcap is not None:  # Gemma 2: logits = cap * tanh(logits / cap)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(logits, labels, vocab_size=self.num_labels)


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Labels for next-token loss on stored ids: the ids themselves, padding set to -100."""
    labels = input_ids.long().clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
    return labels


def load_lm_head(recipe: Any, *, model: str | None = None) -> LMHead:
    """The pretrained LM head of the recipe's model (its *ForCausalLM checkpoint).

    Raises:
        IncompatibleStoreError: the checkpoint has no LM head, or its base model's weights are
            not the ones the store was built with.
    """
    from transformers import AutoModelForCausalLM

    from erstore.model import weights_fingerprint
    from erstore.tokenize import resolve_model

    name = model or recipe.model_name
    try:
        full = AutoModelForCausalLM.from_pretrained(resolve_model(name))
    except (OSError, ValueError, KeyError) as e:
        raise IncompatibleStoreError(
            f"cannot load {name!r} as a causal LM for its LM head: {e}. A causal-lm head needs a "
            "decoder checkpoint with its LM head (e.g. saved from LlamaForCausalLM)"
        ) from e
    found = weights_fingerprint(full.base_model)
    if found != recipe.model_fingerprint:
        raise IncompatibleStoreError(
            f"the causal LM at {name!r} has base-model fingerprint {found}, but the store was built "
            f"with {recipe.model_fingerprint}; its LM head does not belong to the stored states"
        )
    out = full.get_output_embeddings()
    head = LMHead(out.in_features, out.out_features,
                  softcap=getattr(full.config, "final_logit_softcapping", None))
    with torch.no_grad():
        head.lm_head.weight.copy_(out.weight)
    if getattr(out, "bias", None) is not None:
        raise IncompatibleStoreError(f"{name!r} has an LM head with a bias, which LMHead does not model")
    del full
    return head
