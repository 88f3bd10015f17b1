"""T5 encoder tail (`encoder.block[k:]` + final_layer_norm + dropout), and a seq2seq reduced model.

In T5 only block 0 owns the relative position bias table; it computes the bias and passes it to
every later block. A tail that starts at k > 0 keeps just that table (`position_bias`) and
computes the bias with T5Attention's own code. The tail ends with `final_layer_norm` and
dropout like T5Stack; a store at layer N already holds the normalised output, so that tail is
the identity. Runs with eager attention, as the build does (T5 configs are built as
T5EncoderModel).

`load_seq2seq(store)` keeps the decoder and LM head of T5ForConditionalGeneration and feeds it
the tail's output as `encoder_outputs`: the encoder starts from the store.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base import Tail, keep_layers
from ..tail import load_tail
from erstore.errors import IncompatibleStoreError


class T5RelativeBias(nn.Module):
    """Block 0's relative position bias table, computing the bias exactly as T5Attention does."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        from transformers.models.t5.modeling_t5 import T5Attention

        self.relative_attention_bias = attention.relative_attention_bias
        self.is_decoder = attention.is_decoder
        self.relative_attention_num_buckets = attention.relative_attention_num_buckets
        self.relative_attention_max_distance = attention.relative_attention_max_distance
        self._code = T5Attention

    def _relative_position_bucket(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._code._relative_position_bucket(*args, **kwargs)

    def compute_bias(self, query_length: int, key_length: int, device: Any = None) -> torch.Tensor:
        return self._code.compute_bias(self, query_length, key_length, device=device)


class T5Tail(Tail):
    family = "t5"
    hf_prefix = "transformer"  # T5ForTokenClassification.transformer is a T5EncoderModel
    sequence_head = "mean"  # T5's own sequence head needs the decoder; mean-pool the encoder
    adapter_points = ("layer.0.SelfAttention.o", "layer.1.DenseReluDense.wo")
    lora_targets = ("q", "v")

    def __init__(self, config: Any, first_layer: int, encoder: nn.Module):
        super().__init__(config, first_layer)
        block0 = encoder.block[0].layer[0].SelfAttention
        encoder.embed_tokens = None
        encoder.block = keep_layers(encoder.block, first_layer)
        self.encoder = encoder
        # k == 0: block 0 is kept and owns the table; sharing it would duplicate parameters.
        self.position_bias = T5RelativeBias(block0) if first_layer > 0 else None

    @classmethod
    def from_model(cls, model: Any, first_layer: int) -> T5Tail:
        return cls(model.config, first_layer, model.encoder)

    def layers(self) -> list[nn.Module]:
        return list(self.encoder.block.values())

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        h, am = self.prepare(hidden_states, attention_mask)
        if self.first_layer == self.num_layers:
            return h
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=h, attention_mask=am)
        length = h.shape[1]
        table = self.position_bias or self.encoder.block["0"].layer[0].SelfAttention
        position_bias = table.compute_bias(length, length, device=h.device)
        for block in self.encoder.block.values():
            h = block(h, mask, position_bias)[0]
        return self.encoder.dropout(self.encoder.final_layer_norm(h))


class T5Seq2Seq(nn.Module):
    """T5ForConditionalGeneration whose encoder is a tail on stored states.

    `forward(hidden_states, attention_mask, labels=... | decoder_input_ids=...)` returns the
    transformers Seq2SeqLMOutput; `generate(hidden_states, attention_mask, **kw)` decodes.
    """

    def __init__(self, tail: T5Tail, model: nn.Module):
        super().__init__()
        self.tail = tail
        self.model = model

    def encode(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=self.tail(hidden_states, attention_mask))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.model(encoder_outputs=self.encode(hidden_states, attention_mask),
                          attention_mask=attention_mask, **kwargs)

    def generate(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.model.generate(encoder_outputs=self.encode(hidden_states, attention_mask),
                                   attention_mask=attention_mask, **kwargs)


def load_seq2seq(source: Any, *, model: str | None = None) -> T5Seq2Seq:
    """Reduced T5ForConditionalGeneration for a T5 store: tail encoder + full decoder and LM head.

    The encoder weights of the seq2seq checkpoint must be the ones the store was built with
    (checked tensor by tensor against the verified tail); IncompatibleStoreError otherwise.
    """
    from transformers import T5ForConditionalGeneration

    from erstore.tokenize import resolve_model

    recipe = getattr(source, "recipe", source)
    tail = load_tail(recipe, model=model)
    if not isinstance(tail, T5Tail):
        raise IncompatibleStoreError(f"load_seq2seq needs a T5 store; this one is {recipe.model_type!r}")
    full = T5ForConditionalGeneration.from_pretrained(resolve_model(model or recipe.model_name),
                                                      attn_implementation="eager").eval()
    mine = full.state_dict()
    for name, tensor in tail.state_dict().items():
        theirs = mine.get(name.replace("position_bias.", "encoder.block.0.layer.0.SelfAttention."))
        if theirs is None or not torch.equal(theirs, tensor):
            raise IncompatibleStoreError(
                f"the seq2seq checkpoint's {name} differs from the encoder the store was built with"
            )
    full.encoder = NoEncoder()  # the tail replaces it; nothing below layer k is kept
    return T5Seq2Seq(tail, full)


class NoEncoder(nn.Module):
    """Stands in for the dropped encoder; generate() reads its main_input_name only."""

    main_input_name = "input_ids"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this reduced T5 has no encoder: pass encoder_outputs (use T5Seq2Seq)")
