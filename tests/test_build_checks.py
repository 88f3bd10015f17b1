"""Bad build inputs fail early, with one line, leaving no store folder; store checks come first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import erstore
from erstore.builder import BuildConfig, build
from erstore.cli import main
from tests.conftest import SENTENCES, write_jsonl


def bad(args, match) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert match in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


@pytest.fixture
def no_weights(monkeypatch):
    """Fail loudly if the build gets as far as loading model weights."""
    import erstore.model

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the bad input was found")

    monkeypatch.setattr(erstore.model, "LayerExtractor", refuse)


def test_max_length_zero_is_refused_not_default(tiny_bert, corpus, tmp_path):
    store = tmp_path / "nested" / "s"
    bad(["build", "--model", tiny_bert, "--corpus", corpus, "--store", store, "--max-length", 0],
        "--max-length must be at least 8 tokens, got 0")
    assert not (tmp_path / "nested").exists()


def test_max_length_above_the_position_limit_is_refused_before_compute(tiny_bert, corpus, tmp_path, no_weights):
    store = tmp_path / "s"
    with pytest.raises(erstore.InvalidInputError, match=r"above the position limit .*\(512 tokens"):
        build(BuildConfig(model=str(tiny_bert), corpus=str(corpus), store=str(store), max_length=1024,
                          progress=False))
    assert not store.exists()
    bad(["build", "--model", tiny_bert, "--corpus", corpus, "--store", store, "--max-length", 513],
        "use --max-length 512 or less")
    assert not store.exists()


def test_roberta_position_limit_counts_the_padding_offset():
    import transformers

    from erstore.preflight import position_limit

    assert position_limit(transformers.RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert position_limit(transformers.BertConfig(max_position_embeddings=512)) == 512
    assert position_limit(transformers.T5Config()) is None


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_only_torch_is_a_clear_error(tiny_bert, corpus, tmp_path):
    store = tmp_path / "s"
    bad(["build", "--model", tiny_bert, "--corpus", corpus, "--store", store, "--max-length", 64,
         "--device", "cuda"], "--device 'cuda' is not available")
    bad(["build", "--model", tiny_bert, "--corpus", corpus, "--store", store, "--device", "gpu0"],
        "is not a torch device")
    assert not store.exists()


def test_store_checks_run_before_the_corpus_and_the_model(tiny_bert, corpus, tmp_path, no_weights):
    store = tmp_path / "s"
    # A store of another recipe (written here without a model: only its erstore.json matters).
    from erstore.codecs import LosslessCodec
    from erstore.manifest import Recipe
    from erstore.writer import StoreWriter

    with StoreWriter(store, Recipe(model_fingerprint="x", layer=1, tokenizer_fingerprint="y", max_length=64,
                                   stride=16, codec=LosslessCodec("float16").to_dict(), hidden_size=32,
                                   num_layers=4)):
        pass
    missing = tmp_path / "no-such-corpus.jsonl"
    with pytest.raises(erstore.IncompatibleStoreError, match="layer: store has 1, this build has 2"):
        build(BuildConfig(model=str(tiny_bert), corpus=str(missing), store=str(store), layers=(2,), max_length=64,
                          progress=False))
    # Unwritable location: refused before the corpus is looked at, and nothing created.
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(erstore.StorePermissionError, match="cannot write to store path"):
        build(BuildConfig(model=str(tiny_bert), corpus=str(missing), store=str(afile / "s"), layers=(2,),
                          max_length=64, progress=False))
    # A good store and a missing corpus: the corpus error, still before any weights.
    with pytest.raises(erstore.InvalidInputError, match="does not exist"):
        build(BuildConfig(model=str(tiny_bert), corpus=str(missing), store=str(tmp_path / "new"), layers=(2,),
                          max_length=64, progress=False))
    assert not (tmp_path / "new").exists()


def test_a_bad_line_deep_in_the_corpus_leaves_no_new_store(tiny_bert, tmp_path):
    rows = [{"text": f"{SENTENCES[i % len(SENTENCES)]} Number {i}."} for i in range(1200)]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    with corpus.open("a") as f:
        f.write('{"text": broken\n')
    store = tmp_path / "deep" / "s"
    with pytest.raises(erstore.InvalidInputError, match="c.jsonl:1201: malformed JSON"):
        # Small buffers: compute starts long before the bad line is read.
        build(BuildConfig(model=str(tiny_bert), corpus=str(corpus), store=str(store), layers=(2,), max_length=64,
                          progress=False, buffer_tokens=512, store_options={"journal_seconds": 3600}))
    assert not (tmp_path / "deep").exists()


def test_ctrl_c_during_start_up_exits_with_one_line(tiny_bert, corpus, tmp_path):
    """SIGINT at several moments of start-up (imports, tokenizer, model load): one line, non-zero."""
    exe = Path(sys.executable).with_name("erstore")
    if not exe.exists():
        pytest.skip("the erstore console script is not installed in this environment")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # From 1 s: the ~0.1 s (more on a loaded machine) before erstore.cli installs its handler is
    # interpreter start-up, which a console script cannot cover.
    for delay in (1.0, 2.0, 3.5):
        store = tmp_path / f"s{delay}"
        proc = subprocess.Popen([str(exe), "build", "--model", str(tiny_bert), "--corpus", str(corpus),
                                 "--store", str(store), "--max-length", "64", "--quiet"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0 or (proc.returncode == -signal.SIGINT and list(store.glob("versions/*.json"))):
            # Finished before the signal on a fast machine, or was already exiting (the interpreter
            # restores the default SIGINT action at shutdown): nothing to check.
            continue
        assert proc.returncode == 130, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "interrupted" in err


def test_extending_a_store_keeps_its_windows_when_left_to_the_defaults(tiny_bert, tmp_path):
    """A store built with explicit windows is extended by a build that leaves them to the defaults
    (which may have changed since: e.g. a sentence-transformers model's max_seq_length); an
    explicit different value is still a recipe conflict."""
    store = tmp_path / "s"
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": s} for s in SENTENCES[:3]])
    more = write_jsonl(tmp_path / "b.jsonl", [{"text": s} for s in SENTENCES[:5]])
    build(BuildConfig(model=str(tiny_bert), corpus=str(first), store=str(store), layers=(1,), max_length=24,
                      stride=4, progress=False))
    (result,) = build(BuildConfig(model=str(tiny_bert), corpus=str(more), store=str(store), layers=(1,),
                                  progress=False))
    opened = erstore.open(store)
    assert (opened.recipe.max_length, opened.recipe.stride) == (24, 4)
    assert len(opened) == len(erstore.open(store, version=1)) + result.computed > len(erstore.open(store, version=1))
    with pytest.raises(erstore.IncompatibleStoreError, match="max_length: store has 24, this build has 32"):
        build(BuildConfig(model=str(tiny_bert), corpus=str(more), store=str(store), layers=(1,), max_length=32,
                          progress=False))
    with pytest.raises(erstore.IncompatibleStoreError, match="stride: store has 4, this build has 6"):
        build(BuildConfig(model=str(tiny_bert), corpus=str(more), store=str(store), layers=(1,), stride=6,
                          progress=False))
