"""Reduced models as Hugging Face folders: save_pretrained / from_pretrained, Trainer checkpoints,
LoRA in PEFT's own adapter format and its merge, loading from another working directory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import erstore
from consumers import ReducedModel, add_adapters, add_lora
from consumers.data import PadCollate, StoreDataset
from erstore.errors import IncompatibleStoreError, InvalidInputError
from tests.conftest import SENTENCES, write_jsonl
from tests.consumers_fixtures import consumer_corpus, entries, zoo  # noqa: F401
from tests.decoder_fixtures import decoder_corpus, dzoo  # noqa: F401


def batch_of(store):
    return PadCollate()([{"states": e.states, "input_ids": e.token_ids} for e in entries(store)])


def outputs(model, batch):
    with torch.no_grad():
        out = model.eval()(batch["hidden_states"], batch["attention_mask"])
    return out.logits if out.get("logits") is not None else torch.stack([out.start_logits, out.end_logits], -1)


def perturb(model, pattern: str, seed: int = 1) -> None:
    """Give parameters matching `pattern` random values, so an untrained (identity) adapter or a
    zero LoRA B cannot hide a weight that failed to load."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pattern in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("family,task,extra", [("bert", "sequence", "adapters"), ("t5", "token", None),
                                               ("mpnet", "qa", None)])
def test_save_pretrained_round_trip_is_bit_exact(zoo, tmp_path, family, task, extra):
    store = zoo.store(family)
    model = ReducedModel.for_store(store, task=task, num_labels=3)
    if extra == "adapters":
        add_adapters(model, bottleneck=4)
        perturb(model, ".adapter.")
    batch = batch_of(store)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "erstore-reduced" and config["first_layer"] == 2
    assert config["recipe"]["model_fingerprint"] == store.recipe.model_fingerprint
    assert not (tmp_path / "m" / "adapter_config.json").exists()
    again = ReducedModel.from_pretrained(tmp_path / "m")
    assert torch.equal(outputs(again, batch), outputs(model, batch))
    assert trainable(again) == trainable(model)
    assert again.tail.recipe == store.recipe
    again.check_store(store)  # the store-compatibility check still has the recipe to compare


def test_the_loaded_model_predicts_new_text_like_the_saved_one(zoo, tmp_path):
    store = zoo.store("bert")
    model = ReducedModel.for_store(store, task="sequence", num_labels=2)
    again = ReducedModel.from_pretrained(model.save(tmp_path / "m"))
    new = ["A sentence that is not in the store at all."]
    assert torch.equal(torch.from_numpy(again.predict(new, store=store)[0]),
                       torch.from_numpy(model.predict(new, store=store)[0]))
    with pytest.raises(IncompatibleStoreError, match="holds layer 4"):
        again.check_store(zoo.store("bert", layer=4))


def test_trainer_checkpoints_and_save_model_load_bit_exact(zoo, tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    store = zoo.store("bert")
    model = ReducedModel.for_store(store, task="sequence", num_labels=2)
    add_lora(model, r=4)
    batch = batch_of(store)
    seen = {}

    class Record(TrainerCallback):  # outputs of the model exactly when each checkpoint is written
        def on_save(self, args, state, control, **kwargs):
            seen[state.global_step] = outputs(model, batch)
            model.train()

    keys = [e.key for e in entries(store)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=5e-2, report_to=[], save_strategy="steps", save_steps=1,
                             logging_strategy="no", disable_tqdm=True, use_cpu=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=StoreDataset(store, keys, [i % 2 for i in range(len(keys))]),
                      data_collator=PadCollate(), callbacks=[Record()])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert sorted(seen) == [1, 2] and not torch.equal(seen[1], seen[2])  # the checkpoints differ
    for step in (1, 2):
        folder = tmp_path / "out" / f"checkpoint-{step}"
        assert (folder / "adapter_model.safetensors").is_file()
        assert torch.equal(outputs(ReducedModel.from_pretrained(folder), batch), seen[step])
    final = ReducedModel.load(tmp_path / "final")
    assert torch.equal(outputs(final, batch), outputs(model, batch))
    assert trainable(final) == trainable(model)

    # Trainer's own resume loads model.safetensors into a live model by name: LoRA included.
    fresh = ReducedModel.for_store(store, task="sequence", num_labels=2)
    add_lora(fresh, r=4)
    args.output_dir = str(tmp_path / "resumed")
    Trainer(model=fresh, args=args, train_dataset=trainer.train_dataset, data_collator=PadCollate()).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))  # step 2 again, from step 1
    assert torch.equal(outputs(fresh, batch), seen[2])


# PEFT 0.21 reads transformers 5's deprecated PreTrainedModel.is_gradient_checkpointing (their
# mismatch, raised for any transformers model wrapped by PeftModel).
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing. is deprecated:FutureWarning")
def test_lora_is_written_in_peft_format_that_peft_loads(zoo, tmp_path):
    from peft import LoraConfig, PeftConfig, PeftModel

    store = zoo.store("bert")
    model = ReducedModel.for_store(store, task="sequence", num_labels=2)
    add_lora(model, r=4, alpha=8)
    perturb(model, "lora_B")
    batch = batch_of(store)
    model.save_pretrained(tmp_path / "m")
    folder = tmp_path / "m"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    config = PeftConfig.from_pretrained(str(folder))
    assert isinstance(config, LoraConfig) and config.r == 4 and config.lora_alpha == 8
    # PEFT itself puts the adapter on the plain reduced model: the same outputs as ours.
    plain = ReducedModel.from_pretrained(folder, lora=False)
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    assert not torch.equal(outputs(plain, batch), outputs(model, batch))
    by_peft = PeftModel.from_pretrained(plain, str(folder))
    assert torch.equal(outputs(by_peft, batch), outputs(model, batch))
    assert torch.equal(outputs(ReducedModel.from_pretrained(folder), batch), outputs(model, batch))
    # A plain reduced model plus PEFT's files (an adapter trained elsewhere) loads as one model.
    ReducedModel.from_pretrained(folder, lora=False).save_pretrained(tmp_path / "plain")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(folder / name, tmp_path / "plain" / name)
    assert torch.equal(outputs(ReducedModel.from_pretrained(tmp_path / "plain"), batch), outputs(model, batch))


def test_merge_and_unload_folds_lora_into_the_tail(zoo, tmp_path):
    from peft.tuners.lora import LoraLayer

    store = zoo.store("distilbert")
    model = ReducedModel.for_store(store, task="sequence", num_labels=2)
    add_lora(model, r=4)
    perturb(model, "lora_B")
    batch = batch_of(store)
    before = outputs(model, batch)
    model.save_pretrained(tmp_path / "m")
    merged = ReducedModel.from_pretrained(tmp_path / "m").merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    after = outputs(merged, batch)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "m")  # same folder: the stale adapter files go
    assert not (tmp_path / "m" / "adapter_config.json").exists()
    assert torch.equal(outputs(ReducedModel.from_pretrained(tmp_path / "m"), batch), after)
    with pytest.raises(InvalidInputError, match="no LoRA"):
        merged.merge_and_unload()


# qwen2: rotary embeddings and sliding-window masks rebuilt from the config; gpt2: LoRA on Conv1D
# (fan_in_fan_out), merged the transposed way.
@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_a_decoder_causal_lm_with_lora_round_trips_and_merges(dzoo, tmp_path, family):
    store = dzoo.store(family)
    model = ReducedModel.for_store(store, task="causal-lm")
    add_lora(model, r=4)
    perturb(model, "lora_B")
    batch = batch_of(store)
    again = ReducedModel.from_pretrained(model.save(tmp_path / "m"))
    assert torch.equal(outputs(again, batch), outputs(model, batch))
    assert trainable(again) == trainable(model) and all("lora_" in n for n in trainable(again))
    with torch.no_grad():
        assert torch.equal(again(**batch).loss, model(**batch).loss)
    torch.testing.assert_close(outputs(again.merge_and_unload(), batch), outputs(model, batch), rtol=0, atol=1e-5)


def test_a_store_built_from_a_relative_model_path_loads_from_anywhere(zoo, tmp_path, monkeypatch):
    here = tmp_path / "project"
    shutil.copytree(zoo.model("bert"), here / "bert-tiny")
    corpus = write_jsonl(here / "c.jsonl", [{"text": s} for s in SENTENCES[:4]])
    monkeypatch.chdir(here)
    erstore.build(model="./bert-tiny", layers=2, corpus=str(corpus), store="store", progress=False, max_length=32)
    model = ReducedModel.for_store(erstore.open("store"), task="sequence", num_labels=2)
    model.save_pretrained("saved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = erstore.open(str(here / "store"))
    assert store.recipe.model_name == str(here / "bert-tiny")  # absolute, plus the fingerprint
    again = ReducedModel.for_store(store, task="sequence", num_labels=2)
    assert again.tail.recipe == store.recipe
    loaded = ReducedModel.from_pretrained("../project/saved")
    assert loaded.predict([SENTENCES[0]], store=store)[0].shape == (2,)
    assert loaded.predict(["text the store lacks"], store=store)[0].shape == (2,)  # recomputes layers 0..1


def test_bad_folders_fail_clearly(zoo, tmp_path):
    store = zoo.store("bert")
    with pytest.raises(InvalidInputError, match="not a folder"):
        ReducedModel.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IncompatibleStoreError, match="no config.json"):
        ReducedModel.from_pretrained(tmp_path / "empty")
    with pytest.raises(IncompatibleStoreError, match="describes a 'bert' model"):
        ReducedModel.from_pretrained(zoo.model("bert"))  # a plain transformers folder
    model = ReducedModel.for_store(store, task="sequence", num_labels=2)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "weights-only").mkdir()
    shutil.copy(tmp_path / "m" / "model.safetensors", tmp_path / "weights-only")
    with pytest.raises(IncompatibleStoreError, match="without a config"):
        ReducedModel.from_pretrained(tmp_path / "weights-only")
    with pytest.raises(InvalidInputError, match="cannot save"):
        ReducedModel(torch.nn.Identity(), model.head).save_pretrained(tmp_path / "no-tail")
    other = ReducedModel.for_store(store, task="sequence", num_labels=5)
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", tmp_path / "m")
    with pytest.raises(IncompatibleStoreError, match="does not fit"):
        ReducedModel.from_pretrained(tmp_path / "m")


def test_folders_of_the_reduced_json_format_still_load(zoo, tmp_path):
    """The format `save` wrote before save_pretrained: reduced.json + trainable.safetensors."""
    from safetensors.torch import save_file

    from consumers.adapters import trainable_state_dict

    store = zoo.store("bert")
    model = ReducedModel.for_store(store, task="sequence", num_labels=2)
    add_adapters(model, bottleneck=4)
    perturb(model, ".adapter.")
    weights = {n: t.contiguous() for n, t in trainable_state_dict(model).items()}
    meta = {"format": "erstore-reduced-model", "format_version": 1, "recipe": store.recipe.to_dict(),
            "head": {"kind": "sequence", **model.head.config}, "adapters": {"bottleneck": 4, "activation": "relu"},
            "lora": None, "trainable": sorted(weights)}
    (tmp_path / "old").mkdir()
    save_file(weights, str(tmp_path / "old" / "trainable.safetensors"))
    (tmp_path / "old" / "reduced.json").write_text(json.dumps(meta))
    batch = batch_of(store)
    assert torch.equal(outputs(ReducedModel.load(tmp_path / "old"), batch), outputs(model, batch))
