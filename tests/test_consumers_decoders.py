"""Decoder-only families (GPT-2, Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3) end to end:
stored states vs transformers' hidden_states[k], tails vs the full model's last hidden state
and logits, last-token sequence classification, causal-LM and LoRA training on stored states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consumers import (
    ReducedModel,
    add_adapters,
    add_lora,
    load_tail,
    load_transformers_head,
    train,
)
from consumers.data import PadCollate, loader
from tests.decoder_fixtures import BOS_FAMILIES, DECODERS, decoder_corpus, dzoo  # noqa: F401


def base_model(dzoo, family):
    """The transformers base model, loaded as the build loads it (same attention implementation)."""
    from erstore.model import LayerExtractor

    return LayerExtractor(str(dzoo.model(family))).model


def causal_lm(dzoo, family):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(dzoo.model(family)).eval()


def all_entries(store):
    return store.read(sorted(store))


def ids_of(entry) -> torch.Tensor:
    return torch.from_numpy(entry.token_ids.astype(np.int64))[None]


def padded(entries, pad_id=0):
    batch = PadCollate()([{"states": e.states, "input_ids": e.token_ids} for e in entries])
    batch["input_ids"][batch["attention_mask"] == 0] = pad_id
    return batch


@pytest.mark.parametrize("family", DECODERS)
def test_stored_states_equal_hidden_states_bit_exactly(dzoo, family):
    from transformers import AutoTokenizer

    full = base_model(dzoo, family)
    tokenizer = AutoTokenizer.from_pretrained(dzoo.model(family))
    for layer in (0, 2, 4):
        store = dzoo.store(family, layer)
        entries = all_entries(store)
        assert len(store.windows("long")) >= 3  # the long document became overlapping windows
        with torch.no_grad():
            for e in entries:
                want = full(input_ids=ids_of(e), output_hidden_states=True).hidden_states[layer][0]
                assert torch.equal(torch.from_numpy(e.states), want), (family, layer)
    # BOS as the family's tokenizer adds it: at the start of every window (later windows of a
    # long document too), or nowhere.
    firsts = {int(e.token_ids[0]) for e in entries}
    if family in BOS_FAMILIES:
        assert firsts == {tokenizer.bos_token_id}
    else:
        assert tokenizer.bos_token_id not in firsts or tokenizer.bos_token_id == tokenizer.eos_token_id
        assert not any(tokenizer.bos_token_id in e.token_ids.tolist() for e in entries)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_batched_build_is_within_1e6(dzoo, family, tmp_path):
    import erstore

    erstore.build(model=str(dzoo.model(family)), layers=(2,), corpus=str(dzoo.corpus), store=str(tmp_path / "s"),
                  dtype="float32", progress=False, max_length=64, stride=8, batch_size=32)
    store = erstore.open(str(tmp_path / "s"))
    full = base_model(dzoo, family)
    worst = 0.0
    with torch.no_grad():
        for e in all_entries(store):
            want = full(input_ids=ids_of(e), output_hidden_states=True).hidden_states[2][0]
            # Relative to the row's scale: Gemma's states are large (sqrt(d)-scaled embeddings).
            diff = (torch.from_numpy(e.states) - want).abs().amax(-1) / want.abs().amax(-1)
            worst = max(worst, diff.max().item())
    assert worst <= 1e-6


@pytest.mark.parametrize("family", DECODERS)
def test_tail_and_lm_head_match_the_full_model(dzoo, family):
    store = dzoo.store(family)
    model = ReducedModel.for_store(store, task="causal-lm")
    tail, full, lm = model.tail, base_model(dzoo, family), causal_lm(dzoo, family)
    entries = all_entries(store)
    with torch.no_grad():
        for e in entries:
            ids = ids_of(e)
            got = tail(torch.from_numpy(e.states)[None], torch.ones_like(ids))
            assert torch.equal(got, full(input_ids=ids).last_hidden_state), (family, got.shape)
            out = model(torch.from_numpy(e.states)[None], torch.ones_like(ids), input_ids=ids)
            want = lm(input_ids=ids, labels=ids)
            assert torch.equal(out.logits, want.logits)
            assert torch.allclose(out.loss, want.loss, rtol=0, atol=1e-6)
        # Right-padded batch: the full model ran its lower layers padded too, so rounding may differ.
        batch = padded(entries)
        mask = batch["attention_mask"]
        got = tail(batch["hidden_states"], mask)
        want = full(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        assert (got - want)[mask.bool()].abs().max().item() < 1e-5
        out = model(**batch)
        labels = batch["input_ids"].masked_fill(mask == 0, -100)
        ref = lm(input_ids=batch["input_ids"], attention_mask=mask, labels=labels)
        assert abs(out.loss.item() - ref.loss.item()) < 1e-5


@pytest.mark.parametrize("family", DECODERS)
def test_tail_keeps_only_upper_layers_under_transformers_names(dzoo, family):
    tail = load_tail(dzoo.store(family))
    names = list(tail.state_dict())
    assert not any(n.startswith(("embed_tokens.", "wte.", "wpe.")) for n in names), names
    kept = {int(n.split(".")[1]) for n in names if n.split(".")[0] in ("layers", "h")}
    assert kept == {2, 3}
    assert set(names) <= set(base_model(dzoo, family).state_dict())
    assert len(tail.layers()) == 2


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tails_at_layers_0_and_N(dzoo, family):
    full = base_model(dzoo, family)
    for layer in (0, 4):
        store = dzoo.store(family, layer)
        tail = load_tail(store)
        with torch.no_grad():
            for e in all_entries(store)[:4]:
                assert torch.equal(tail(torch.from_numpy(e.states)[None]), full(input_ids=ids_of(e)).last_hidden_state)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma2"])
def test_last_token_sequence_head_equals_for_sequence_classification(dzoo, family):
    from transformers import AutoModelForSequenceClassification

    store = dzoo.store(family)
    torch.manual_seed(3)
    ref = AutoModelForSequenceClassification.from_pretrained(dzoo.model(family), num_labels=3,
                                                             pad_token_id=0).eval()
    model = ReducedModel.for_store(store, task="sequence", num_labels=3)
    assert model.head.style == "last"
    loaded = load_transformers_head(model.head, ref, prefix=model.tail.hf_prefix)
    assert loaded == ["score.weight"]
    entries = all_entries(store)
    with torch.no_grad():
        for e in entries[:5]:
            ids = ids_of(e)
            got = model(torch.from_numpy(e.states)[None]).logits
            assert torch.allclose(got, ref(input_ids=ids).logits, rtol=0, atol=1e-6)
        batch = padded(entries)  # pad id 0 occurs in no stored window
        assert not (batch["input_ids"][batch["attention_mask"].bool()] == 0).any()
        got = model(batch["hidden_states"], batch["attention_mask"]).logits
        want = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_lm_fine_tuning_on_stored_states_lowers_the_loss(dzoo, family):
    store = dzoo.store(family)
    model = ReducedModel.for_store(store, task="causal-lm")
    keys = sorted(store)
    if family == "llama":  # erstore's prefetching Loader (its batches carry input_ids)
        with store.loader(keys, batch_size=4, shuffle=True, seed=0) as batches:
            losses = train(model, batches, epochs=4, lr=3e-3)
    else:  # consumers.data's DataLoader
        losses = train(model, loader(store, keys, batch_size=4, shuffle=True), epochs=4, lr=3e-3)
    assert len(losses) == 4 * -(-len(keys) // 4)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "qwen3"])
def test_lora_on_a_decoder_tail_trains_only_lora_and_round_trips(dzoo, family, tmp_path):
    store = dzoo.store(family)
    model = ReducedModel.for_store(store, task="causal-lm")
    batch = padded(all_entries(store)[:6])
    with torch.no_grad():
        plain = model.eval()(**batch).logits
    add_lora(model, r=4, alpha=8)
    for name, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, plain)  # LoRA's B starts at zero
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, [batch] * 5, lr=1e-2)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all("lora_" in n for n in moved)
    with torch.no_grad():
        tuned = model.eval()(**batch).logits
    assert not torch.equal(tuned, plain)
    again = ReducedModel.load(model.save(tmp_path / "lora"))
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, tuned)


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_bottleneck_adapters_on_a_decoder_tail(dzoo, family):
    store = dzoo.store(family)
    model = ReducedModel.for_store(store, task="sequence", num_labels=2)
    batch = padded(all_entries(store)[:4])
    with torch.no_grad():
        plain = model.eval()(batch["hidden_states"], batch["attention_mask"]).logits
    wrapped = add_adapters(model, bottleneck=4)
    assert len(wrapped) == 2 * 2
    with torch.no_grad():
        assert torch.equal(model.eval()(batch["hidden_states"], batch["attention_mask"]).logits, plain)


def test_transformers_trainer_fine_tunes_a_decoder_tail_as_a_causal_lm(dzoo, tmp_path):
    from transformers import Trainer, TrainingArguments

    from consumers.data import StoreDataset

    store = dzoo.store("qwen2")
    model = ReducedModel.for_store(store, task="causal-lm")
    add_lora(model, r=4)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), num_train_epochs=1,
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             use_cpu=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=StoreDataset(store, sorted(store)),
                      data_collator=PadCollate())
    assert np.isfinite(trainer.train().training_loss)


def test_predict_on_new_text_computes_the_miss_like_a_hit(dzoo):
    from tests.conftest import SENTENCES

    store = dzoo.store("mistral")
    model = ReducedModel.for_store(store, task="sequence", num_labels=2)
    hit = model.predict([SENTENCES[0]], store=store)[0]
    entry = store.read([store.key_for(SENTENCES[0])])[0]
    with torch.no_grad():
        np.testing.assert_array_equal(hit, model(torch.from_numpy(entry.states)[None]).logits[0].numpy())
    new = "A decoder sentence that was never stored."
    assert store.key_for(new) not in store
    miss = model.predict([new], store=store)[0]
    ids = torch.tensor([store.tokenize(new)[0][0]])
    from transformers import AutoModelForSequenceClassification

    ref = AutoModelForSequenceClassification.from_pretrained(dzoo.model("mistral"), num_labels=2).eval()
    ref.score.load_state_dict(model.head.score.state_dict())
    with torch.no_grad():
        np.testing.assert_allclose(miss, ref(input_ids=ids).logits[0].numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2", "gemma3"])
def test_sliding_window_masks_matter_and_are_used(dzoo, family):
    from tests.decoder_fixtures import WINDOW

    store = dzoo.store(family)
    tail = load_tail(store)
    kept = [tail.types[i] for i in range(2, 4)]
    assert "sliding_attention" in kept, kept
    e = max(all_entries(store), key=lambda e: len(e.token_ids))
    assert len(e.token_ids) > 2 * WINDOW
    h = torch.from_numpy(e.states)[None]
    with torch.no_grad():
        right = tail(h)
        tail.types = ["full_attention"] * 4  # what a tail without sliding windows would compute
        wrong = tail(h)
    assert not torch.allclose(right, wrong, atol=1e-4)


def test_recipe_checks_refuse_other_decoder_weights(dzoo, tmp_path):
    from consumers.lm import load_lm_head
    from erstore.errors import IncompatibleStoreError
    from tests.decoder_fixtures import save_tiny_decoder

    store = dzoo.store("llama")
    other = save_tiny_decoder(tmp_path / "other", "llama", seed=1)
    with pytest.raises(IncompatibleStoreError, match="model_fingerprint"):
        load_tail(store, model=str(other))
    with pytest.raises(IncompatibleStoreError, match="LM head does not belong"):
        load_lm_head(store.recipe, model=str(other))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_positions_come_from_the_mask_so_left_padding_gives_the_same_states(dzoo, family):
    store = dzoo.store(family)
    tail = load_tail(store)
    entries = all_entries(store)[:5]
    n, d = max(len(e.states) for e in entries), entries[0].states.shape[1]
    left = torch.zeros(len(entries), n, d)
    mask = torch.zeros(len(entries), n, dtype=torch.long)
    for row, e in enumerate(entries):
        left[row, n - len(e.states):] = torch.from_numpy(e.states)
        mask[row, n - len(e.states):] = 1
    with torch.no_grad():
        got = tail(left, mask)
        for row, e in enumerate(entries):
            alone = tail(torch.from_numpy(e.states)[None])[0]
            assert (got[row, n - len(e.states):] - alone).abs().max().item() < 1e-5


@pytest.mark.parametrize("family,dtype,bound", [("llama", "float16", 5e-3), ("gemma2", "bfloat16", 1e-1)])
def test_half_precision_decoder_store_error_is_bounded(dzoo, family, dtype, bound, tmp_path):
    import erstore

    erstore.build(model=str(dzoo.model(family)), layers=(2,), corpus=str(dzoo.corpus), store=str(tmp_path / "s"),
                  dtype=dtype, progress=False, max_length=64, stride=8)
    store = erstore.open(str(tmp_path / "s"))
    tail, full = load_tail(store), base_model(dzoo, family)
    worst = 0.0
    with torch.no_grad():
        for e in all_entries(store)[:6]:
            want = full(input_ids=ids_of(e)).last_hidden_state
            got = tail(torch.from_numpy(e.states.astype(np.float32))[None])
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    assert 0 < worst < bound


def test_states_beyond_float16_range_fail_the_build_and_name_bfloat16(dzoo, tmp_path):
    import erstore
    from erstore.errors import InvalidInputError
    from tests.decoder_fixtures import save_tiny_decoder

    folder = save_tiny_decoder(tmp_path / "loud", "gemma2")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e6)  # ~2e4 x sqrt(32) at the input: above 65504
    model.save_pretrained(folder)
    with pytest.raises(InvalidInputError, match="bfloat16"):
        erstore.build(model=str(folder), layers=(0,), corpus=str(dzoo.corpus), store=str(tmp_path / "s"),
                      dtype="float16", progress=False, max_length=64)
    versions = tmp_path / "s" / "versions"
    assert not versions.exists() or not any(versions.iterdir())  # nothing committed
    erstore.build(model=str(folder), layers=(0,), corpus=str(dzoo.corpus), store=str(tmp_path / "b"),
                  dtype="bfloat16", progress=False, max_length=64)
    store = erstore.open(str(tmp_path / "b"))
    assert all(np.isfinite(e.states.astype(np.float32)).all() for e in store.read(sorted(store)))
