"""Running a transformer up to layer k, for any Hugging Face encoder or decoder-only family.

`LayerExtractor` loads a model with transformers and returns `hidden_states[k]` (the input of
layer k; index 0 is the embedding output) for one or several k in one forward pass. It stops the
forward pass right after the deepest requested layer instead of running the whole model, which
is what makes a build cost about as much as computing layers 0..k. It does this with forward
hooks on the model's own layer list, so it needs no per-family code: the layers run exactly as
transformers runs them (same masks, same position biases; for decoders the causal and
sliding-window masks and rotary embeddings of the base model's own forward), and the result is
bit-identical to `output_hidden_states=True` (tests/test_consumers_decoders.py checks GPT-2,
Llama, Mistral, Qwen2/3, Gemma 2/3 and Phi-3). Decoders load as their base model (`AutoModel`,
no LM head): the build never needs logits.

Also here: the weight fingerprint that identifies a model in a store's recipe.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import xxhash

from erstore.codecs import storage_dtype
from erstore.errors import InvalidInputError
from erstore.tokenize import model_identity, resolve_model


class _Stop(Exception):
    """Raised by the hook after the deepest requested layer, to end the forward pass early."""


def weights_fingerprint(model: Any) -> str:
    """xxh3-128 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    h = xxhash.xxh3_128()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(memoryview(t.view(-1).view(__import__("torch").uint8).numpy()))
    return h.hexdigest()


def _load(name: str | os.PathLike[str]) -> Any:
    import transformers
    from transformers import AutoConfig, AutoModel

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = resolve_model(os.fspath(name))
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InvalidInputError(
            f"cannot load model {os.fspath(name)!r}: {e}. Pass --model a folder with config.json and "
            "weights, or a model name available offline"
        ) from e
    kwargs: dict[str, Any] = {}
    if config.model_type in ("mpnet", "deberta-v2", "t5"):
        kwargs["attn_implementation"] = "eager"  # the only implementation these run with
    if config.is_encoder_decoder:
        from transformers import T5EncoderModel

        return T5EncoderModel.from_pretrained(path, **kwargs)
    return AutoModel.from_pretrained(path, **kwargs)


def loaded_model(model: Any) -> Any:
    """The encoder to run of a loaded transformers model: a head model's base model, a seq2seq
    model's encoder. Its fingerprint is then that of the weights that actually run."""
    import torch

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise InvalidInputError(
            f"model must be a name, a folder or a loaded transformers model, got {type(model).__name__}"
        )
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()
    base = getattr(model, "base_model", model)
    return base if isinstance(base, torch.nn.Module) and hasattr(base, "config") else model


def find_layers(model: Any, num_layers: int) -> Any:
    """The model's list of transformer layers: the ModuleList with num_hidden_layers entries."""
    import torch

    candidates = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers
    ]
    if not candidates:
        raise InvalidInputError(
            f"cannot find the {num_layers} transformer layers of {type(model).__name__}; "
            "erstore supports encoder and decoder-only models whose layers form one nn.ModuleList "
            "(multimodal models: build from their text model)"
        )
    return min(candidates, key=lambda c: c[0].count("."))[1]


class LayerExtractor:
    """Computes hidden_states[k] for the requested layers with one truncated forward pass."""

    def __init__(self, name: Any, *, device: str = "cpu", dtype: str = "float32"):
        """`name`: a model folder or name, or a loaded transformers model (which is moved to
        `device` and `dtype` and put in eval mode, in place)."""
        import torch

        model = _load(name) if isinstance(name, (str, os.PathLike)) else loaded_model(name)
        self.device = torch.device(device)
        self.model = model.to(self.device, dtype=getattr(torch, dtype)).eval()
        self.config = model.config
        self.name = model_identity(name) or type(model).__name__
        self.num_layers = int(getattr(self.config, "num_hidden_layers", 0) or self.config.num_layers)
        self.hidden_size = int(getattr(self.config, "hidden_size", 0) or self.config.d_model)
        self.layers = find_layers(self.model, self.num_layers)
        self.fingerprint = weights_fingerprint(self.model)

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer <= self.num_layers:
            raise InvalidInputError(
                f"--layer {layer} is out of range for {self.name!r}, which has {self.num_layers} "
                f"layers: choose 0..{self.num_layers} (hidden_states index; the middle is "
                f"{self.num_layers // 2})"
            )

    def __call__(self, input_ids: Any, attention_mask: Any, token_type_ids: Any | None,
                 layers: list[int]) -> dict[int, Any]:
        """Return {k: hidden_states[k]} as float tensors [B, L, d] on the model's device."""
        import torch

        out: dict[int, Any] = {}
        deepest = max(layers)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if 0 in layers or deepest == self.num_layers:
            # Embedding output and final output are hidden_states entries of a full pass.
            with torch.inference_mode():
                hs = self.model(**inputs, output_hidden_states=True).hidden_states
            return {k: hs[k] for k in layers}

        def capture(index: int):
            def hook(module: Any, args: Any, output: Any) -> None:
                out[index + 1] = output[0] if isinstance(output, tuple) else output
                if index + 1 == deepest:
                    raise _Stop

            return hook

        handles = [self._output_module(k).register_forward_hook(capture(k - 1)) for k in layers]
        try:
            with torch.inference_mode():
                self.model(**inputs)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {k: out[k] for k in layers}

    def _output_module(self, k: int) -> Any:
        """The module whose output is hidden_states[k] (k >= 1): normally layer k-1.

        DeBERTa-v2 with conv_kernel_size > 0 adds a convolution of the embedding output to
        layer 0's output, and hidden_states[1] is taken after it.
        """
        conv = getattr(getattr(self.model, "encoder", None), "conv", None)
        if k == 1 and self.config.model_type == "deberta-v2" and conv is not None:
            return conv
        return self.layers[k - 1]

    def accepts_token_types(self) -> bool:
        return getattr(self.config, "type_vocab_size", 0) > 1


def to_numpy(tensor: Any, dtype: str = "float32") -> np.ndarray:
    """Cast on the torch side (fast, vectorised) and hand over as numpy without another copy.

    Raises InvalidInputError if a value is not finite after the cast: decoder models' residual
    streams (Gemma's above all) can exceed float16's range (65504), and a store of inf is silent
    garbage for every consumer. One isfinite pass costs far less than the layers that made it.
    """
    import torch

    t = tensor.detach().to(getattr(torch, dtype)).cpu()
    if not bool(torch.isfinite(t).all()):
        source = tensor.detach()
        if bool(torch.isfinite(source).all()):
            raise InvalidInputError(
                f"hidden states reach {source.abs().max().item():.4g}, beyond the range of {dtype} "
                f"(max {torch.finfo(getattr(torch, dtype)).max:.4g}), so the store would hold inf: "
                "build with --dtype bfloat16 (float32's range) or --dtype float32"
            )
        raise InvalidInputError(
            "the model produced NaN or inf hidden states; check its weights and dtype (a model "
            "run in float16 can overflow: load it in float32 or bfloat16)"
        )
    if dtype == "bfloat16":  # numpy has no bfloat16; reinterpret the bits as ml_dtypes.bfloat16
        return t.view(torch.int16).numpy().view(storage_dtype("bfloat16"))
    return t.numpy()
