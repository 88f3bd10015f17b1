"""erstore.build with the inputs users have: any corpus format or object, loaded models and tokenizers."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import erstore
from erstore.cli import main
from tests.conftest import SENTENCES, write_jsonl


def run(tiny_bert, corpus, store, **kw):
    kw.setdefault("model", str(tiny_bert))
    return erstore.build(corpus=corpus, store=str(store), dtype="float32", max_length=64, progress=False, **kw)


def keys_of(store):
    with erstore.open(store) as s:
        return sorted(s), s.recipe


def test_lists_generators_and_datasets_build_what_the_jsonl_builds(tiny_bert, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": s} for s in SENTENCES]
    [ref] = run(tiny_bert, str(write_jsonl(tmp_path / "c.jsonl", rows)), tmp_path / "ref", layers=2)  # int: one layer
    assert ref.layer == 2 and ref.documents == len(SENTENCES)
    expected, _ = keys_of(tmp_path / "ref")
    for name, corpus in [("list", list(SENTENCES)), ("dicts", rows), ("generator", (s for s in SENTENCES)),
                         ("dataset", datasets.Dataset.from_list(rows))]:
        run(tiny_bert, corpus, tmp_path / name, layers=2)
        assert keys_of(tmp_path / name)[0] == expected, name
        with erstore.open(tmp_path / name) as s:
            assert s.windows("3") == [s.key_for(SENTENCES[3])]
            assert "[" not in s.manifest.build["corpus"]  # a label, never the corpus itself


def test_loaded_model_and_tokenizer_objects_fingerprint_like_their_folder(tiny_bert, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    run(tiny_bert, list(SENTENCES), tmp_path / "s", layers=(2,))
    model, tokenizer = AutoModel.from_pretrained(tiny_bert), AutoTokenizer.from_pretrained(tiny_bert)
    # Same weights and tokenizer definition: the same recipe, so the same store accepts the build.
    [again] = run(tiny_bert, list(SENTENCES), tmp_path / "s", layers=(2,), model=model, tokenizer=tokenizer)
    assert again.version is None and again.computed == 0
    # A loaded model alone: its tokenizer comes from its name_or_path.
    [alone] = run(tiny_bert, list(SENTENCES), tmp_path / "s", layers=(2,), model=model)
    assert alone.computed == 0
    _, recipe = keys_of(tmp_path / "s")
    assert recipe.model_name == str(tiny_bert) and recipe.tokenizer_name == str(tiny_bert)
    # Changed weights: another fingerprint, refused by the store.
    import torch

    with torch.no_grad():
        model.embeddings.word_embeddings.weight[0, 0] += 1
    with pytest.raises(erstore.IncompatibleStoreError, match="model_fingerprint"):
        run(tiny_bert, list(SENTENCES), tmp_path / "s", layers=(2,), model=model, tokenizer=tokenizer)


def test_objects_without_a_source_are_refused_clearly(tiny_bert, tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert)
    model.name_or_path = ""
    with pytest.raises(erstore.InvalidInputError, match="no name_or_path to load its tokenizer from; pass tokenizer="):
        run(tiny_bert, ["a text"], tmp_path / "s", model=model)
    with pytest.raises(erstore.InvalidInputError, match="model must be a name, a folder or a loaded transformers"):
        run(tiny_bert, ["a text"], tmp_path / "s", model=object(), tokenizer=str(tiny_bert))
    with pytest.raises(erstore.InvalidInputError, match="layers must be an int or a sequence of ints"):
        run(tiny_bert, ["a text"], tmp_path / "s", layers="two")
    assert not (tmp_path / "s").exists()


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_reads_parquet_and_forced_formats(tiny_bert, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": SENTENCES, "doc": [f"d{i}" for i in range(len(SENTENCES))]}),
                   tmp_path / "c.parquet", row_group_size=3)
    result = cli("build", "--model", tiny_bert, "--corpus", tmp_path / "c.parquet", "--text-field", "body",
                 "--id-field", "doc", "--store", tmp_path / "s", "--max-length", 64, "--quiet")
    assert result.exit_code == 0, result.output
    with erstore.open(tmp_path / "s") as s:
        assert len(s) == len(SENTENCES) and s.windows("d5") == [s.key_for(SENTENCES[5])]
    log = tmp_path / "corpus.log"
    log.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES[:2]))
    result = cli("build", "--model", tiny_bert, "--corpus", log, "--format", "jsonl", "--store", tmp_path / "s2",
                 "--max-length", 64, "--quiet")
    assert result.exit_code == 0, result.output
    with erstore.open(tmp_path / "s2") as s:
        assert s.windows("1") == [s.key_for(SENTENCES[1])]
    import gzip

    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(log.read_bytes()))
    result = cli("build", "--model", tiny_bert, "--corpus", tmp_path / "c.jsonl.gz", "--store", tmp_path / "s2",
                 "--max-length", 64, "--quiet")
    assert result.exit_code == 0 and "nothing new in 2 windows" in result.output, result.output


@pytest.mark.parametrize(("name", "content", "match"), [
    ("latin1.txt", "café\n".encode("latin1"), "latin1.txt:1: not valid UTF-8"),
    ("c.log", b"some text\n", "unknown corpus file type '.log'; supported: "),
    ("c.csv", b"body\nx\n", "c.csv: no column 'text' (columns: body)"),
])
def test_cli_bad_corpus_fails_in_one_line_before_the_model_loads(tiny_bert, tmp_path, name, content, match):
    # (Store checks come first, then the corpus, then the weights: tests/test_build_checks.py.)
    (tmp_path / name).write_bytes(content)
    result = CliRunner().invoke(main, ["build", "--model", str(tiny_bert), "--corpus",
                                       str(tmp_path / name), "--store", str(tmp_path / "s"), "--quiet"])
    assert result.exit_code != 0
    assert match in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
