"""Hugging Face-style folders for reduced models: config.json + model.safetensors (+ PEFT LoRA files).

`ReducedModel` is a `transformers.PreTrainedModel`, so `save_pretrained`, `push_to_hub` and
`transformers.Trainer` (`save_model`, every `checkpoint-N/`) all write the same folder:

    config.json                 model_type "erstore-reduced": the store's recipe (model identity:
                                absolute path or hub name, plus the weight fingerprint), the base
                                model's transformers config, first layer, head and adapter settings
    model.safetensors           the model's own state dict: every tail and head weight, bottleneck
                                adapters and LoRA included, under the ReducedModel's parameter names
                                (so Trainer's resume_from_checkpoint, which loads this file into the
                                live model by name, restores everything)
    adapter_config.json         only with LoRA: PEFT's own files, as PeftModel.save_pretrained writes
    adapter_model.safetensors   them (keys `base_model.model.<module>.lora_A.weight`), for PEFT and
                                other tools; the same LoRA tensors as in model.safetensors

A folder is self-contained: loading builds the tail from the saved transformers config (no
random init, no download of the recipe's model) and loads the weights, so outputs are
bit-identical. The recipe's model is needed again only to compute layer-k states for text that
is not in the store. A folder whose model.safetensors is a plain reduced model plus PEFT adapter
files (say, an adapter trained with PEFT itself) loads too: LoRA then comes from the adapter files.
Why PreTrainedModel and not huggingface_hub's lighter PyTorchModelHubMixin: Trainer calls
`save_pretrained` only on PreTrainedModel (and PeftModel) instances; any other module gets a bare
model.safetensors without a config, which nothing can rebuild. `from_pretrained` is our own
(ReducedModel's constructor takes modules, not a config; the tail is built from the saved config).
Not here: the legacy `reduced.json` format (consumers.reduced keeps its loader), sharded weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig

from .adapters import add_adapters, add_lora
from .heads import HEADS, make_head
from .registry import tail_class
from erstore.errors import IncompatibleStoreError, InvalidInputError
from erstore.manifest import Recipe

MODEL_TYPE = "erstore-reduced"
FORMAT_VERSION = 2  # 1 was reduced.json + trainable.safetensors
WEIGHTS = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's names
KIND = {cls: name for name, cls in HEADS.items()}  # head class -> the `kind` saved in config.json


class ReducedConfig(PreTrainedConfig):
    """What a reduced model needs besides its weights; every field is plain JSON."""

    model_type = MODEL_TYPE

    def __init__(self, *, reduced_format_version: int = FORMAT_VERSION, recipe: dict | None = None,
                 base_config: dict | None = None, attn_implementation_base: str | None = None,
                 first_layer: int | None = None, full_parameters: int = 0, tail_dtype: str = "float32",
                 head: dict | None = None, adapters: dict | None = None, **kwargs: Any):
        self.reduced_format_version = reduced_format_version
        self.recipe, self.base_config = recipe, base_config
        self.attn_implementation_base = attn_implementation_base
        self.first_layer, self.full_parameters, self.tail_dtype = first_layer, full_parameters, tail_dtype
        self.head, self.adapters = head, adapters
        super().__init__(**kwargs)


def describe(model: Any) -> dict[str, Any]:
    """The config fields of a ReducedModel as it is now (adapters added after creation included)."""
    tail, head = model.tail, model.head
    base = getattr(tail, "config", None)
    dtype = next(tail.parameters(), torch.empty(0)).dtype
    return {"reduced_format_version": FORMAT_VERSION,
            "recipe": tail.recipe.to_dict() if getattr(tail, "recipe", None) else None,
            "base_config": base.to_dict() if base is not None else None,
            "attn_implementation_base": getattr(base, "_attn_implementation", None),
            "first_layer": getattr(tail, "first_layer", None),
            "full_parameters": int(getattr(tail, "full_parameters", 0)),
            "tail_dtype": str(dtype).removeprefix("torch."),
            "head": {"kind": KIND[type(head)], **head.config} if type(head) in KIND else None,
            "adapters": getattr(tail, "adapter_config", None)}


# -- writing ---------------------------------------------------------------------------------------
def is_lora(name: str) -> bool:
    return ".lora_" in name


def plain_name(name: str) -> str:
    """A LoRA-wrapped layer's frozen weight `<module>.base_layer.weight` under the name the model
    has without LoRA (and after a merge): `<module>.weight`."""
    return name.replace(".base_layer.", ".")


def peft_name(name: str) -> str:
    """`tail.<module>.lora_A.default.weight` as PeftModel.save_pretrained writes it: the adapter
    name dropped, PeftModel's prefix added."""
    return PEFT_PREFIX + name.replace(".default.", ".")


def write_adapter(folder: Path, tail: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """adapter_config.json (PEFT's LoraConfig writer) and adapter_model.safetensors."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = tail.lora_config
    LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"],
               target_modules=list(cfg["target_modules"]),
               fan_in_fan_out=getattr(tail, "lora_fan_in_fan_out", False)).save_pretrained(str(folder))
    weights = {peft_name(k): v.detach().contiguous().cpu() for k, v in state_dict.items() if is_lora(k)}
    save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


# -- reading ---------------------------------------------------------------------------------------
def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a reduced-model folder, checked; IncompatibleStoreError naming what is wrong."""
    path = folder / "config.json"
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
        hint = (" It holds model.safetensors without a config: a Trainer folder written before "
                "ReducedModel became a PreTrainedModel; train again, or load the old model with "
                "ReducedModel.load from the folder its save() wrote") if WEIGHTS in found else ""
        raise IncompatibleStoreError(
            f"{folder} is not a saved reduced model: no config.json (found {found or 'nothing'}).{hint} "
            "Pass a folder written by ReducedModel.save_pretrained or transformers.Trainer"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IncompatibleStoreError(f"{path} is not readable JSON: {e}") from e
    if meta.get("model_type") != MODEL_TYPE:
        raise IncompatibleStoreError(
            f"{path} describes a {meta.get('model_type')!r} model, not an {MODEL_TYPE!r} reduced model; "
            "load it with transformers (AutoModel.from_pretrained), or pass a ReducedModel folder"
        )
    if meta.get("reduced_format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise IncompatibleStoreError(
            f"{path} has reduced_format_version {meta.get('reduced_format_version')!r}; this version of "
            f"erstore reads {FORMAT_VERSION}: upgrade erstore"
        )
    for field in ("base_config", "first_layer", "head"):
        if meta.get(field) is None:
            raise IncompatibleStoreError(f"{path} lacks {field!r}; it was not written by a ReducedModel with a tail")
    return meta


def build_tail(meta: dict[str, Any]) -> Any:
    """The tail's modules from the saved transformers config (weights uninitialised: loaded next)."""
    from transformers import CONFIG_MAPPING, AutoModel, T5EncoderModel

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    base = dict(meta["base_config"])
    model_type = base.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise IncompatibleStoreError(f"transformers does not know model_type {model_type!r} of the saved tail")
    config = CONFIG_MAPPING[model_type].from_dict(base)
    kwargs = {"attn_implementation": meta["attn_implementation_base"]} if meta.get("attn_implementation_base") else {}
    with no_init_weights():  # every kept weight is overwritten by model.safetensors
        if config.is_encoder_decoder:  # as erstore.model loads it: the encoder only
            model = T5EncoderModel._from_config(config, **kwargs)
        else:
            model = AutoModel.from_config(config, **kwargs)
    tail = tail_class(model_type).from_model(model, int(meta["first_layer"]))
    del model
    tail.recipe = Recipe.from_dict(meta["recipe"]) if meta.get("recipe") else None
    tail.full_parameters = int(meta.get("full_parameters", 0))
    return tail.to(dtype=getattr(torch, meta.get("tail_dtype", "float32")))


def build_head(meta: dict[str, Any]) -> torch.nn.Module:
    options = dict(meta["head"])
    kind = options.pop("kind")
    if kind not in HEADS:
        raise IncompatibleStoreError(f"unknown head kind {kind!r} in the saved config; choose one of {', '.join(HEADS)}")
    return make_head(kind, hidden_size=options.pop("hidden_size"), num_labels=options.pop("num_labels"), **options)


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Every weight of `model` from `weights`, nothing left over (IncompatibleStoreError otherwise)."""
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a shape mismatch (another num_labels, hidden size, bottleneck, r)
        raise IncompatibleStoreError(f"{source} does not fit the model its config describes: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise IncompatibleStoreError(
            f"{source} does not fit the model its config describes: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / WEIGHTS
    if not path.is_file():
        raise IncompatibleStoreError(f"{folder} has config.json but no {WEIGHTS} (a sharded or partial save?)")
    return load_file(str(path))


def add_saved_lora(model: Any, folder: Path, lora_weights: dict[str, torch.Tensor]) -> None:
    """LoRA as adapter_config.json describes it, injected into the tail as add_lora does; its
    weights from model.safetensors (`lora_weights`) or else from adapter_model.safetensors."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(folder))
    if config.peft_type != "LORA":
        raise IncompatibleStoreError(f"{folder}/{ADAPTER_CONFIG} holds a {config.peft_type} adapter; only LoRA loads here")
    if isinstance(config.target_modules, str):
        raise IncompatibleStoreError(f"{folder}/{ADAPTER_CONFIG}: regex target_modules are not supported; list the names")
    add_lora(model, r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout,
             target_modules=sorted(config.target_modules))
    source = f"{folder}/{WEIGHTS}"
    if not lora_weights:
        source = f"{folder}/{ADAPTER_WEIGHTS}"
        live = {peft_name(n): n for n, _ in model.named_parameters() if is_lora(n)}
        lora_weights = {live.get(k, k): v for k, v in load_file(source).items()}
    base = {n: t for n, t in model.state_dict().items() if not is_lora(n)}
    load_into(model, {**base, **lora_weights}, source)


def resolve_folder(name: str | Path, **hub_options: Any) -> Path:
    """A local folder as is; otherwise a Hub repo id fetched with huggingface_hub (untested offline)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder.resolve()
    text = str(name)
    if folder.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise InvalidInputError(
            f"{text!r} is not a folder (and not a Hub repo id 'owner/name'); pass the folder that "
            "ReducedModel.save_pretrained or transformers.Trainer wrote"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.md"], **hub_options))
    except Exception as e:  # offline, unknown repo, auth: all mean "not loadable from the Hub"
        raise InvalidInputError(f"{text!r} is not a local folder and could not be fetched from the Hub: {e}") from e


def load_folder(cls: type, folder: Path, *, lora: bool = True) -> Any:
    """A ReducedModel rebuilt from a folder (see the module docstring), in eval mode; with
    lora=False the plain model under the LoRA (what PeftModel.from_pretrained takes as its base)."""
    meta = read_config(folder)
    # Which weights train follows from the structure, as after for_store + add_adapters/add_lora:
    # all of them on a bare model; adapters/LoRA and a task head once either was added.
    model = cls(build_tail(meta), build_head(meta))
    if meta.get("adapters"):
        add_adapters(model, **meta["adapters"])
    weights = read_weights(folder)
    if getattr(model.tail, "pooler", None) is not None and not any(k.startswith("tail.pooler.") for k in weights):
        model.tail.pooler = None  # for_store hands the pooler to a BERT-style head; the tail never uses it
    lora_weights = {k: v for k, v in weights.items() if is_lora(k)}
    has_adapter = (folder / ADAPTER_CONFIG).is_file()
    if lora_weights and not has_adapter:
        raise IncompatibleStoreError(f"{folder}/{WEIGHTS} holds LoRA weights but the folder has no {ADAPTER_CONFIG}")
    load_into(model, {plain_name(k): v for k, v in weights.items() if not is_lora(k)}, f"{folder}/{WEIGHTS}")
    if has_adapter and lora:
        add_saved_lora(model, folder, lora_weights)
    return model.eval()
