"""Task heads for reduced models, named and shaped like transformers' own heads.

Each head's state-dict names are those of the matching transformers task model minus the base
model (e.g. BertForSequenceClassification's `bert.pooler.dense.*` and `classifier.*` become
`pooler.dense.*` and `classifier.*`), so `load_transformers_head` moves a head trained on the
full model onto a reduced one. Sequence-head styles follow each family's transformers class:

    bert        pooler (dense + tanh on [CLS]) -> dropout -> classifier
    roberta     classifier.dense + tanh on <s> -> classifier.out_proj   (RoBERTa, MPNet)
    distilbert  pre_classifier + ReLU on [CLS] -> dropout -> classifier
    deberta     pooler.dense (ContextPooler, config activation) -> classifier
    mean        masked mean -> classifier.dense + tanh -> classifier.out_proj  (T5 encoder)
    last        score (no bias) on the last real token          (decoders: GPT-2, Llama, ...)

`last` is transformers' *ForSequenceClassification for decoders: `score` on every position,
then the logits of each row's last real token. transformers finds that token as the rightmost
one that is not `pad_token_id`; here it is the rightmost one the attention mask marks real, the
same token for right padding (and right too when the pad id also occurs as content).

`MLPHead` is the paper's baseline: a 2-layer MLP on stored final-layer states (no tail).
`PoolingHead` makes sentence embeddings (sentence-transformers' Pooling and Normalize modules;
`consumers.embed` reads their settings from a sentence-transformers model folder).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .lm import LMHead
from erstore.errors import IncompatibleStoreError, InvalidInputError

STYLES = ("bert", "roberta", "distilbert", "deberta", "mean", "last")


def masked_mean(h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return h.mean(dim=1)
    m = attention_mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def last_token(values: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """values[b, last real position of row b] ([B, L, ...] -> [B, ...])."""
    if attention_mask is None:
        return values[:, -1]
    index = torch.arange(values.shape[1], device=values.device)
    last = (index * attention_mask.to(index.device)).argmax(-1)
    return values[torch.arange(values.shape[0], device=values.device), last]


class _Dense(nn.Module):
    """`dense` (+ optional `out_proj`) under transformers' names."""

    def __init__(self, d_in: int, d_out: int | None = None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_in)
        if d_out is not None:
            self.out_proj = nn.Linear(d_in, d_out)


class SequenceClassificationHead(nn.Module):
    """One label (or regression value) per sequence; see the module docstring for styles."""

    task = "sequence"

    def __init__(self, hidden_size: int, num_labels: int, *, style: str = "bert", dropout: float = 0.1,
                 activation: str = "tanh"):
        super().__init__()
        if style not in STYLES:
            raise InvalidInputError(f"unknown head style {style!r}; choose one of {', '.join(STYLES)}")
        self.config = {"hidden_size": hidden_size, "num_labels": num_labels, "style": style,
                       "dropout": dropout, "activation": activation}
        self.style, self.num_labels = style, num_labels
        self.dropout = nn.Dropout(dropout)
        from transformers.activations import ACT2FN

        self.act = ACT2FN[activation]
        if style in ("bert", "deberta"):
            self.pooler = _Dense(hidden_size)
            self.classifier = nn.Linear(hidden_size, num_labels)
        elif style in ("roberta", "mean"):
            self.classifier = _Dense(hidden_size, num_labels)
        elif style == "last":
            self.score = nn.Linear(hidden_size, num_labels, bias=False)
        else:
            self.pre_classifier = nn.Linear(hidden_size, hidden_size)
            self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        s = self.style
        if s == "last":
            return last_token(self.score(hidden_states), attention_mask)
        if s == "bert":
            return self.classifier(self.dropout(self.act(self.pooler.dense(hidden_states[:, 0]))))
        if s == "deberta":
            return self.classifier(self.dropout(self.act(self.pooler.dense(self.dropout(hidden_states[:, 0])))))
        if s == "distilbert":
            x = torch.relu(self.pre_classifier(hidden_states[:, 0]))
            return self.classifier(self.dropout(x))
        x = hidden_states[:, 0] if s == "roberta" else masked_mean(hidden_states, attention_mask)
        x = self.act(self.classifier.dense(self.dropout(x)))
        return self.classifier.out_proj(self.dropout(x))


class TokenClassificationHead(nn.Module):
    """One label per token (NER): dropout -> `classifier`, as in *ForTokenClassification."""

    task = "token"

    def __init__(self, hidden_size: int, num_labels: int, *, dropout: float = 0.1):
        super().__init__()
        self.config = {"hidden_size": hidden_size, "num_labels": num_labels, "dropout": dropout}
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(hidden_states))


class QuestionAnsweringHead(nn.Module):
    """Extractive QA: `qa_outputs` -> start and end logits [B, L, 2], as in *ForQuestionAnswering."""

    task = "qa"

    def __init__(self, hidden_size: int, num_labels: int = 2):
        super().__init__()
        self.config = {"hidden_size": hidden_size, "num_labels": num_labels}
        self.num_labels = num_labels
        self.qa_outputs = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.qa_outputs(hidden_states)


class MLPHead(nn.Module):
    """The paper's baseline head: Linear -> ReLU -> dropout -> Linear on (pooled) stored states.

    pooling: "mean", "cls", or "none" for per-token outputs.
    """

    def __init__(self, hidden_size: int, num_labels: int, *, hidden: int = 256, dropout: float = 0.1,
                 pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls", "none"):
            raise InvalidInputError(f"pooling must be mean, cls or none, got {pooling!r}")
        self.config = {"hidden_size": hidden_size, "num_labels": num_labels, "hidden": hidden,
                       "dropout": dropout, "pooling": pooling}
        self.task = "token" if pooling == "none" else "sequence"
        self.num_labels, self.pooling = num_labels, pooling
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, num_labels))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pooling == "mean":
            hidden_states = masked_mean(hidden_states, attention_mask)
        elif self.pooling == "cls":
            hidden_states = hidden_states[:, 0]
        return self.mlp(hidden_states)


# sentence-transformers' pooling modes, in the order it concatenates several (weightedmean: not here).
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken")


class PoolingHead(nn.Module):
    """A sentence embedding [B, len(modes) * hidden_size]: pooled final states, optionally L2-normalised.

    The modes compute what sentence-transformers' `Pooling` does (over the attention mask; several
    modes are concatenated in the order given), `normalize` what its `Normalize` module does.
    `max_length` is the model's own `max_seq_length` (texts are embedded from their first window
    of at most that many tokens, as sentence-transformers truncates); None: the store's windows.
    `num_labels` is ignored (the output width follows from the modes); no parameters.
    """

    task = "embedding"

    def __init__(self, hidden_size: int, num_labels: int | None = None, *, mode: str | list[str] = "mean",
                 normalize: bool = True, max_length: int | None = None):
        super().__init__()
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
        bad = [m for m in modes if m not in POOLING_MODES]
        if not modes or bad:
            raise InvalidInputError(
                f"unknown pooling mode {bad[0] if bad else mode!r}; choose from {', '.join(POOLING_MODES)} "
                "(or a list of them, concatenated)"
            )
        self.modes, self.normalize, self.max_length = modes, bool(normalize), max_length
        self.num_labels = len(modes) * hidden_size
        self.config = {"hidden_size": hidden_size, "num_labels": self.num_labels, "mode": list(modes),
                       "normalize": self.normalize, "max_length": max_length}

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = hidden_states
        mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device) if attention_mask is None else attention_mask
        out = []
        for mode in self.modes:
            if mode == "cls":  # the first real token
                out.append(h[torch.arange(h.shape[0], device=h.device), mask.to(torch.int).argmax(1)])
            elif mode == "max":
                out.append(h.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values)
            elif mode == "mean":
                out.append(masked_mean(h, mask))
            elif mode == "mean_sqrt_len_tokens":
                m = mask.to(h.dtype).unsqueeze(-1)
                out.append((h * m).sum(dim=1) / torch.sqrt(m.sum(dim=1).clamp(min=1e-9)))
            else:
                out.append(last_token(h, mask))
        x = torch.cat(out, dim=-1)
        return nn.functional.normalize(x, p=2, dim=-1) if self.normalize else x


HEADS = {"sequence": SequenceClassificationHead, "token": TokenClassificationHead,
         "qa": QuestionAnsweringHead, "mlp": MLPHead, "causal-lm": LMHead, "embedding": PoolingHead}


def make_head(kind: str, *, hidden_size: int, num_labels: int = 2, **options: Any) -> nn.Module:
    """A head by name: sequence, token, qa, mlp, causal-lm or embedding (randomly initialised)."""
    if kind not in HEADS:
        raise InvalidInputError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    return HEADS[kind](hidden_size, num_labels, **options)


def head_for_tail(kind: str, tail: Any, num_labels: int = 2, **options: Any) -> nn.Module:
    """A head in the tail's family style, starting from the pretrained pooler where there is one.

    causal-lm: the pretrained LM head of the store's model (consumers.lm.load_lm_head).
    embedding: pooling mode, normalisation and max_length default to those of the store's model
    when it is a sentence-transformers folder (consumers.embed.pooling_config), else mean pooling,
    normalised, over the store's windows; an explicit `mode` leaves the folder's pooling aside.
    """
    if kind == "causal-lm":
        if tail.recipe is None:
            raise InvalidInputError("a causal-lm head needs a tail loaded from a store (load_tail)")
        from .lm import load_lm_head

        return load_lm_head(tail.recipe, model=options.get("model"))
    if kind == "embedding" and tail.recipe is not None:
        from erstore.tokenize import sentence_transformers_length

        from .embed import pooling_config

        # An explicit mode skips the folder's pooling settings (and its check of the pipeline).
        found = ({"max_length": sentence_transformers_length(tail.recipe.model_name)} if "mode" in options
                 else pooling_config(tail.recipe.model_name) or {})
        for name, value in found.items():
            options.setdefault(name, value)
    if kind == "sequence":
        options.setdefault("style", tail.sequence_head)
        if options["style"] == "deberta":
            options.setdefault("activation", getattr(tail.config, "pooler_hidden_act", "gelu"))
    head = make_head(kind, hidden_size=tail.hidden_size, num_labels=num_labels, **options)
    pooler = getattr(tail, "pooler", None)
    if kind == "sequence" and head.style == "bert" and pooler is not None:
        head.pooler.dense.load_state_dict(pooler.dense.state_dict())
    return head


def load_transformers_head(head: nn.Module, source: Any, *, prefix: str) -> list[str]:
    """Copy a transformers task model's head weights into `head`; returns the names loaded.

    Args:
        source: a transformers task model (e.g. BertForSequenceClassification) or its state dict.
        prefix: its base-model attribute (`tail.hf_prefix`: "bert", "roberta", "deberta", ...).
            Base-model weights are skipped except `<prefix>.pooler.*`, which becomes `pooler.*`.

    Raises:
        IncompatibleStoreError: a head weight is missing from `source` or has another shape.
    """
    state = source.state_dict() if hasattr(source, "state_dict") else dict(source)
    found: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.startswith(f"{prefix}.pooler."):
            found[name[len(prefix) + 1:]] = tensor
        elif not name.startswith(f"{prefix}."):
            found[name] = tensor
    wanted = head.state_dict()
    for name, tensor in wanted.items():
        if name not in found:
            raise IncompatibleStoreError(
                f"the transformers model has no {name!r} (head weights found: {sorted(found) or 'none'}); "
                "pick the head style of the model's family, or check prefix"
            )
        if tuple(found[name].shape) != tuple(tensor.shape):
            raise IncompatibleStoreError(
                f"head weight {name!r} has shape {tuple(found[name].shape)} in the transformers model "
                f"but {tuple(tensor.shape)} here (num_labels or hidden size differ)"
            )
    head.load_state_dict({name: found[name] for name in wanted})
    return sorted(wanted)
