"""The CLI through click's runner and as a real subprocess; bad input fails cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import erstore
from erstore.cli import main
from tests.conftest import SENTENCES, write_jsonl


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def built(tiny_bert, corpus, tmp_path):
    store = tmp_path / "store"
    result = cli("build", "--model", tiny_bert, "--corpus", corpus, "--store", store, "--layer", 2,
                 "--max-length", 64, "--quiet")
    assert result.exit_code == 0, result.output
    return store


def versions_of(store):
    return sorted(p.name for p in (store / "versions").iterdir())


def test_build_info_versions_verify(built):
    info = json.loads(cli("info", built, "--json").output)
    assert info["version"] == 1 and info["recipe"]["layer"] == 2 and info["sequences"] > 0
    assert info["bytes"] > 0 and info["recipe"]["codec"]["dtype"] == "float16"
    assert "torch" in info["last_build"]["libraries"]
    text = cli("info", built).output
    assert "layer      2" in text
    versions = json.loads(cli("versions", built, "--json").output)
    assert [v["version"] for v in versions] == [1]
    report = json.loads(cli("verify", built, "--json").output)
    assert report["ok"] and report["checked"] == info["sequences"]


def bad(args, match):
    result = cli(*args)
    assert result.exit_code != 0, result.output
    assert match in result.output, result.output
    return result


def test_malformed_jsonl_names_the_line(tiny_bert, built, tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": broken\n')
    bad(["build", "--model", tiny_bert, "--corpus", corpus, "--store", built, "--layer", 2,
         "--max-length", 64], "bad.jsonl:2: malformed JSON")
    assert versions_of(built) == ["00000001.json"]


@pytest.mark.parametrize(("rows", "flags", "match"), [
    ([], [], "holds no documents"),
    ([{"body": "x"}], [], "no field 'text' (fields: body); name the right one with --text-field"),
    ([{"text": "x"}], ["--id-field", "doc"], "no field 'doc'"),
])
def test_corpus_errors(tiny_bert, built, tmp_path, rows, flags, match):
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    bad(["build", "--model", tiny_bert, "--corpus", corpus, "--store", built, "--layer", 2,
         "--max-length", 64, *flags], match)
    assert versions_of(built) == ["00000001.json"]


def test_model_and_option_errors(tiny_bert, corpus, built, tmp_path):
    common = ["--corpus", corpus, "--max-length", 64]
    bad(["build", "--model", tmp_path / "no-such-model", *common, "--store", tmp_path / "x"],
        "cannot load a tokenizer")
    bad(["build", "--model", tiny_bert, *common, "--layer", 9, "--store", tmp_path / "x"],
        "--layer 9 is out of range")
    bad(["build", "--model", tiny_bert, *common, "--dtype", "int3", "--store", tmp_path / "x"],
        "Invalid value for '--dtype'")
    bad(["build", "--model", tiny_bert, *common, "--layer", 1, "--store", built],
        "layer: store has 2, this build has 1")
    assert versions_of(built) == ["00000001.json"]
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_store_path_errors(tiny_bert, corpus, tmp_path):
    common = ["--model", tiny_bert, "--corpus", corpus, "--max-length", 64]
    afile = tmp_path / "file"
    afile.write_text("x")
    bad(["build", *common, "--store", afile / "store"], "cannot write to store path")
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_text("x")
    bad(["build", *common, "--store", other], "is not an erstore store")
    bad(["info", other], "not an erstore store")
    assert (other / "data.bin").read_text() == "x" and len(list(other.iterdir())) == 1


def test_subprocess_build_and_info(tiny_bert, corpus, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    store = tmp_path / "s"
    cmd = [sys.executable, "-m", "erstore.cli", "build", "--model", str(tiny_bert), "--corpus", str(corpus),
           "--store", str(store), "--max-length", "64", "--quiet"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"store {store}" in out.stdout and "version 1" in out.stdout
    info = subprocess.run([sys.executable, "-m", "erstore.cli", "info", str(store), "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert json.loads(info.stdout)["recipe"]["layer"] == 2  # default: middle of 4 layers
    missing = subprocess.run([sys.executable, "-m", "erstore.cli", "info", str(tmp_path / "nope")],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "not an erstore store" in missing.stderr


def test_text_corpus_one_document_per_line(tiny_bert, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SENTENCES[:3]) + "\n\n")
    result = cli("build", "--model", tiny_bert, "--corpus", corpus, "--store", tmp_path / "s",
                 "--max-length", 64, "--quiet")
    assert result.exit_code == 0, result.output
    with erstore.open(tmp_path / "s") as store:
        assert len(store) == 3 and store.windows("1") == [store.key_for(SENTENCES[1])]


def test_build_tag_and_copy_print_json(tiny_bert, corpus, built, tmp_path):
    more = write_jsonl(tmp_path / "more.jsonl", [{"text": "A sentence that the first build did not see."}])
    out = cli("build", "--model", tiny_bert, "--corpus", more, "--store", built, "--layer", 2,
              "--max-length", 64, "--quiet", "--json")
    assert out.exit_code == 0, out.output
    [result] = json.loads(out.output)
    assert result["layer"] == 2 and result["computed"] == 1 and result["version"]["version"] == 2
    assert result["version"]["added"]["sequences"] == 1 and result["documents"] == 1
    again = json.loads(cli("build", "--model", tiny_bert, "--corpus", more, "--store", built, "--layer", 2,
                           "--max-length", 64, "--quiet", "--json").output)
    assert again[0]["version"] is None and again[0]["computed"] == 0  # nothing new
    tagged = json.loads(cli("tag", built, 1, "first", "--json").output)
    assert tagged == {"store": str(built), "tag": "first", "version": 1}
    copied = json.loads(cli("copy", built, tmp_path / "copy", "--version", "first", "--json").output)
    assert copied["version"] == 1 and copied["added_sequences"] == json.loads(
        cli("info", built, "--version", 1, "--json").output)["sequences"]


def test_help_lists_every_command_and_the_distributed_build():
    text = cli("--help").output
    for name in ("build", "info", "versions", "verify", "tag", "diff", "copy", "export", "gc", "ls", "cost",
                 "choose"):
        assert f"  {name} " in text, name
    assert "-m erstore.distributed" in text
    assert cli("choose", "--help").exit_code == 0  # the entry point resolves (erstore_consumers)
