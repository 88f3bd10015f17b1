"""Parameter-efficient training of a tail: Houlsby bottleneck adapters and LoRA (via PEFT).

`add_adapters` puts a bottleneck adapter (down-project, activation, up-project, residual) after
the attention output projection and after the feed-forward output projection of every tail
layer, as in Houlsby et al. 2019, and freezes everything else in the tail. The up-projection
starts at zero, so a freshly adapted tail computes exactly what the frozen tail does.
AdapterHub's `adapters` package does not work with transformers 5, hence this small module.

`add_lora` injects LoRA into the tail's attention projections with PEFT; `merge_lora` folds it
into the base weights and removes the LoRA modules (PEFT's merge). Either way only
adapter (and task head) parameters keep requires_grad, and `trainable_state_dict` is what gets
saved; a decoder's pretrained LM head (task causal-lm) is frozen like the tail.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from erstore.errors import InvalidInputError
from erstore.extras import require


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))), with `up` zero-initialised (identity at start)."""

    def __init__(self, hidden_size: int, bottleneck: int = 64, *, activation: str = "relu"):
        super().__init__()
        from transformers.activations import ACT2FN

        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = ACT2FN[activation]
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class AdaptedLinear(nn.Module):
    """A frozen Linear followed by an adapter; exposes `weight`/`bias` for code that reads them."""

    def __init__(self, base: nn.Linear, adapter: BottleneckAdapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _tail_of(model: Any) -> Any:
    return getattr(model, "tail", model)


def _freeze_pretrained_head(model: Any) -> None:
    """A causal-LM head is the checkpoint's own (vocab x d) LM head: frozen with the tail, as in
    LoRA fine-tuning of a causal LM. Task heads (classifiers) are new and keep training."""
    head = getattr(model, "head", None)
    if getattr(head, "task", None) == "causal-lm":
        freeze(head)


def add_adapters(model: Any, *, bottleneck: int = 64, activation: str = "relu") -> list[str]:
    """Freeze the tail of `model` (a Tail or ReducedModel) and add Houlsby adapters to each layer.

    Returns the names of the wrapped projections. Call once; adapters are recorded on the model
    (`adapter_config`) so `ReducedModel.save/load` can rebuild them.
    """
    tail = _tail_of(model)
    if getattr(tail, "adapter_config", None):
        raise InvalidInputError("this tail already has adapters; add them once")
    freeze(tail)
    _freeze_pretrained_head(model)
    wrapped = []
    for layer in tail.layers():
        for point in tail.adapter_points:
            parent_name, _, attr = point.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            base = getattr(parent, attr)
            width = getattr(base, "out_features", None) or base.nf  # nn.Linear, or GPT-2's Conv1D
            adapter = BottleneckAdapter(width, bottleneck, activation=activation)
            adapter.to(device=base.weight.device, dtype=base.weight.dtype)
            setattr(parent, attr, AdaptedLinear(base, adapter))
            wrapped.append(point)
    tail.adapter_config = {"bottleneck": bottleneck, "activation": activation}
    return wrapped


def add_lora(model: Any, *, r: int = 8, alpha: int = 16, dropout: float = 0.0,
             target_modules: list[str] | None = None) -> None:
    """Freeze the tail of `model` and inject PEFT LoRA into its attention projections."""
    peft = require("peft", extra="consumers", purpose="LoRA adapters")
    LoraConfig, inject_adapter_in_model = peft.LoraConfig, peft.inject_adapter_in_model

    tail = _tail_of(model)
    if getattr(tail, "lora_config", None):
        raise InvalidInputError("this tail already has LoRA; add it once")
    freeze(tail)
    _freeze_pretrained_head(model)
    targets = list(target_modules or tail.lora_targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        fan_in_fan_out=getattr(tail, "lora_fan_in_fan_out", False))  # GPT-2's Conv1D
    inject_adapter_in_model(config, tail)
    for name, p in tail.named_parameters():
        p.requires_grad_("lora_" in name)
    tail.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets}


def merge_lora(model: Any) -> int:
    """Merge every LoRA layer of the tail into its base weight (PEFT's own merge) and put the base
    layer back in its place, as PEFT's merge_and_unload does; returns how many were merged.
    The merged tail stays frozen; the head keeps training."""
    from peft.tuners.lora import LoraLayer

    tail = _tail_of(model)
    if not getattr(tail, "lora_config", None):
        raise InvalidInputError("this tail has no LoRA to merge (add_lora or a folder with adapter files)")
    merged = 0
    for name, module in list(tail.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)  # raises on non-finite merged weights
            parent_name, _, attr = name.rpartition(".")
            setattr(tail.get_submodule(parent_name) if parent_name else tail, attr, module.get_base_layer())
            merged += 1
    tail.lora_config = None
    if hasattr(tail, "peft_config"):
        del tail.peft_config  # set by PEFT's injection; nothing is left for it to describe
    return merged


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that train (adapters, LoRA, head; the whole tail if unfrozen)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
