"""consumers.choose: the layer-choice report on tiny models (rule, metrics, seeds, PNG, CLI)."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

import erstore
from consumers.choose import (
    Budget,
    choose_layer,
    main,
    recommend,
)
from consumers.metrics import accuracy, span_scores, token_f1
from tests.conftest import NER_ROWS, QA_ROWS, SENTENCES, write_jsonl

WORDS = "red green blue cyan magenta yellow black white".split()
TINY = Budget(epochs=1, seeds=(0, 1), max_train=24, max_dev=12, batch_size=8, eval_batch_size=8, lr=1e-3,
              threads=1, min_steps=0)


def rows() -> list[dict]:
    """Texts labelled by whether they talk about colours (1) or storage (0)."""
    out = [{"id": f"s{i}", "text": s, "label": "storage"} for i, s in enumerate(SENTENCES)]
    out += [{"id": f"c{i}", "text": f"The {w} paint on wall number {i} is bright {WORDS[i % 8 - 1]}.",
             "label": "colour"} for i, w in enumerate(WORDS * 2)]
    out += [{"id": f"t{i}", "text": f"Store version {i} keeps {w} rows of hidden states on disk.",
             "label": "storage"} for i, w in enumerate(WORDS)]
    return out


@pytest.fixture(scope="module")
def layers(tiny_bert, tmp_path_factory) -> Path:
    """Stores of layers 0..3 of the tiny 4-layer BERT over the labelled texts (root/layer-K)."""
    root = tmp_path_factory.mktemp("choose")
    corpus = write_jsonl(root / "corpus.jsonl", [{"id": r["id"], "text": r["text"]} for r in rows()])
    erstore.build(model=str(tiny_bert), layers=(0, 1, 2, 3), corpus=str(corpus), store=str(root / "stores"),
                  dtype="float32", progress=False, max_length=64, id_field="id")
    all_rows = rows()
    write_jsonl(root / "train.jsonl", all_rows[0::2])
    write_jsonl(root / "dev.jsonl", all_rows[1::2])
    return root


def png_chunks(path: Path) -> list[tuple[bytes, bytes]]:
    """Parse a PNG, checking signature and every chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos: pos + 4])
        kind, payload = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n: pos + 12 + n])
        assert crc == zlib.crc32(kind + payload), kind
        chunks.append((kind, payload))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    return chunks


def check_row(r, *, reference: bool = False) -> None:
    assert set(r.per_seed) == {"0", "1"} and all(0 <= v <= 100 for v in r.per_seed.values())
    assert r.metric == pytest.approx(np.mean(list(r.per_seed.values())))
    assert r.metric_std == pytest.approx(np.std(list(r.per_seed.values()), ddof=1))
    assert r.train_s_per_epoch > 0 and r.infer_s_per_batch > 0 and r.wall_s > 0
    if reference:
        assert r.speedup is None and r.infer_speedup is None
    else:
        assert r.speedup > 0 and r.infer_speedup > 0 and r.store_bytes > 0


def test_report_has_every_field_and_follows_the_rule(layers, tmp_path):
    report = choose_layer(layers / "stores", task="classification", train=layers / "train.jsonl",
                          dev=layers / "dev.jsonl", budget=TINY, adapters=8, tolerance=0.5)
    # A layer-0 store among the candidates is the reference (reference="auto").
    assert report.reference.name == "k=0" and report.reference.layer == 0
    check_row(report.reference, reference=True)
    names = [r.name for r in report.candidates]
    assert names == ["k=1", "k=1 +adapters8", "k=2", "k=2 +adapters8", "k=3", "k=3 +adapters8"]
    for r in report.candidates:
        check_row(r)
        assert r.adapters == (8 if "adapters" in r.name else None)
        assert r.speedup == pytest.approx(report.reference.train_s_per_epoch / r.train_s_per_epoch)
    assert [r.store_bytes for r in report.candidates][::2] == [
        erstore.open(str(layers / "stores" / f"layer-{k}")).info()["bytes"] for k in (1, 2, 3)]
    assert report.train_examples == 16 and report.dev_examples == 12
    want = recommend([(r.name, r.layer, r.metric) for r in report.candidates], report.reference.metric, 0.5,
                     reference_name="k=0", reference_spread=report.reference.spread,
                     spreads={r.name: r.spread for r in report.candidates}, trivial=report.trivial)
    assert report.recommendation == want
    if want.layer is not None:
        chosen = next(r for r in report.candidates if r.name == want.name)
        assert chosen.metric >= report.reference.metric - 0.5
        assert all(r.metric < report.reference.metric - 0.5 for r in report.candidates if r.layer > want.layer)

    data = json.loads(json.dumps(report.to_dict()))
    assert data["metric"] == "accuracy" and data["budget"]["seeds"] == [0, 1] and data["wall_s"] > 0
    assert {"metric", "metric_std", "train_s_per_epoch", "infer_s_per_batch", "speedup", "infer_speedup",
            "store_bytes", "wall_s"} <= set(data["candidates"][0])
    table = report.table()
    assert "k=3 +adapters8" in table and "rule: the deepest layer k" in table and "total wall time" in table

    png = report.plot(tmp_path / "plot.png")
    ihdr = png_chunks(png)[0][1]
    width, height = struct.unpack(">II", ihdr[:8])
    assert width > 100 and height > 100


def test_same_seeds_give_identical_metrics(layers):
    stores = [layers / "stores" / f"layer-{k}" for k in (2, 3)]
    budget = Budget(epochs=1, seeds=(5, 6), max_train=24, max_dev=12, batch_size=8, lr=1e-3, threads=1,
                    min_steps=0)
    a = choose_layer(stores, task="classification", train=layers / "train.jsonl", dev=layers / "dev.jsonl",
                     budget=budget)
    b = choose_layer(stores, task="classification", train=layers / "train.jsonl", dev=layers / "dev.jsonl",
                     budget=budget)
    assert a.reference.name == "full model" and a.reference.layer is None and a.reference.store_bytes == 0
    for x, y in zip([a.reference, *a.candidates], [b.reference, *b.candidates]):
        assert x.name == y.name and x.per_seed == y.per_seed and set(x.per_seed) == {"5", "6"}


def test_ner_and_qa_reports(read_store, qa_store):
    ner = choose_layer([read_store], task="ner", train=NER_ROWS, dev=NER_ROWS, budget=TINY)
    assert ner.metric_name == "word F1" and [r.name for r in ner.candidates] == ["k=2"]
    check_row(ner.reference, reference=True)
    check_row(ner.candidates[0])
    qa = choose_layer([qa_store], task="qa", train=QA_ROWS, dev=QA_ROWS, budget=TINY, reference="full")
    assert qa.metric_name == "F1" and qa.dev_examples == len(erstore.open(str(qa_store)))
    check_row(qa.candidates[0])
    assert 0 <= qa.candidates[0].extra["exact_match"] <= qa.candidates[0].metric


def test_recommend_picks_the_deepest_layer_within_tolerance():
    rows = [("k=1", 1, 90.0), ("k=2", 2, 89.6), ("k=3", 3, 89.4), ("k=4", 4, 80.0)]
    rec = recommend(rows, 90.0, 0.5)
    assert (rec.name, rec.layer) == ("k=2", 2)
    assert "k=3" in rec.reason and "-0.60" in rec.reason and "outside" in rec.reason
    assert recommend(rows, 90.0, 0.6).layer == 3
    assert recommend(rows, 90.0, 10.0).layer == 4
    none = recommend(rows, 95.0, 0.5)
    assert none.layer is None and "no candidate" in none.reason
    # Better than the reference counts; at one k the better row (e.g. with adapters) wins.
    assert recommend([("k=5", 5, 99.0), ("k=5 +adapters64", 5, 99.5)], 90.0, 0.0).name == "k=5 +adapters64"
    with pytest.raises(ValueError):
        recommend(rows, 90.0, -1)


def test_metrics_on_constructed_numbers():
    logits = [np.array([2.0, 0.0]), np.array([0.0, 1.0]), np.array([0.0, 3.0])]
    assert accuracy(logits, [([0], 0), ([1, 2], 1)]) == 100.0
    assert accuracy(logits, [([0, 2], 0)]) == 0.0  # mean of the windows' logits: [1, 1.5] -> 1
    tags = [np.eye(3)[[0, 1, 2, 0]]]  # predicts 0 1 2 0
    assert token_f1(tags, [np.array([0, 1, 2, -100])]) == 100.0
    assert token_f1(tags, [np.array([0, 1, 1, 1])]) == pytest.approx(200 * 1 / (2 + 3))
    ids = np.array([101, 7, 102, 5, 6, 8, 102])  # question [7], context [5, 6, 8]
    qa = np.full((7, 2), -5.0)
    qa[4, 0], qa[5, 1] = 5.0, 5.0  # predicts span 4..5 = [6, 8]
    f1, em = span_scores([qa], [([0], np.array([6, 8]))], ["k"], {"k": (ids, 3)})
    assert (f1, em) == (100.0, 100.0)
    f1, em = span_scores([qa], [([0], np.array([5, 6]))], ["k"], {"k": (ids, 3)})
    assert (f1, em) == (50.0, 0.0)


def test_cli_json_and_errors(layers, tmp_path):
    from click.testing import CliRunner

    args = [str(layers / "stores" / "layer-3"), "--task", "classification", "--train",
            str(layers / "train.jsonl"), "--dev", str(layers / "dev.jsonl"), "--epochs", "1", "--seeds", "0,1",
            "--max-train", "24", "--max-dev", "12", "--batch-size", "8", "--lr", "1e-3", "--reference", "none",
            "--min-steps", "0",
            "--plot", str(tmp_path / "p.png")]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["reference"]["name"] == "k=3" and data["candidates"] == []
    assert data["recommendation"]["layer"] is None
    png_chunks(tmp_path / "p.png")
    bad = CliRunner().invoke(main, [*args[:-2], "--seeds", "1,1"])
    assert bad.exit_code == 2 and "distinct seeds" in bad.output


def test_progress_lines_count_training_steps_and_time_each_seed(layers, monkeypatch, capsys):
    monkeypatch.setenv("ERSTORE_PROGRESS_SECONDS", "0")
    budget = Budget(epochs=2, seeds=(0, 1), max_train=24, max_dev=12, batch_size=8, lr=1e-3, threads=1, min_steps=0)
    choose_layer(layers / "stores" / "layer-3", task="classification", train=layers / "train.jsonl",
                 dev=layers / "dev.jsonl", budget=budget, reference="none", progress="lines")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    examples = int(re.match(r"\d+ train rows \((\d+) examples\)", lines[0])[1])
    steps = 2 * 2 * -(-examples // 8)  # seeds x epochs x batches of 8
    assert f"choose: train k=3 started: {steps} steps" in lines
    assert any(line.startswith(f"choose: train k=3 3/{steps} steps (") for line in lines), lines
    assert any(line.startswith(f"choose: train k=3 done: {steps} steps in ") for line in lines), lines
    assert [bool(re.fullmatch(r"  k=3 seed \d: [\d.]+ \([\d.]+ s\)", line)) for line in lines].count(True) == 2


def test_refuses_when_the_reference_is_untrained_or_unstable(layers):
    # lr=0: nothing trains, so the reference is no better than always answering the majority class.
    budget = Budget(epochs=1, seeds=(0, 1), max_train=24, max_dev=12, batch_size=8, lr=0.0, threads=1, min_steps=0)
    report = choose_layer(layers / "stores", task="classification", train=layers / "train.jsonl",
                          dev=layers / "dev.jsonl", budget=budget)
    assert report.trivial[0] == "majority class" and report.reference.metric <= report.trivial[1] + 0.5
    rec = report.recommendation
    assert rec.layer is None and rec.refused and "did not learn" in rec.reason
    assert "trivial baseline" in report.table() and report.to_dict()["recommendation"]["refused"]


def test_recommend_refuses_and_reports_the_seed_spread():
    rows = [("k=1", 1, 90.0), ("k=2", 2, 89.6), ("k=3", 3, 89.0)]
    untrained = recommend(rows, 50.0, 0.5, trivial=("majority class", 50.0))
    assert untrained.layer is None and "did not learn" in untrained.refused
    unstable = recommend(rows, 90.0, 0.5, reference_spread=2.0)
    assert unstable.layer is None and "disagree by 2.00" in unstable.refused
    rec = recommend(rows, 90.0, 0.5, reference_spread=0.4, spreads={"k=2": 0.3, "k=3": 0.8},
                    trivial=("majority class", 50.0))
    assert rec.layer == 2 and rec.refused is None
    assert "k=3" in rec.reason and "within the seed spread (0.80)" in rec.reason  # 89.6 vs 89.0
    assert re.search(r"k=2 +89.60 \(-0.40 \(within the seed spread\)\)", rec.reason)
    clear = recommend(rows, 90.0, 0.5, spreads={"k=3": 0.1})
    assert clear.layer == 2 and "note:" not in clear.reason


def test_timing_warnings():
    from consumers.choose import Result, timing_warnings

    def row(name, layer, seconds, load=0.5):
        return Result(name, layer, None, 50.0, 0.0, {"0": 50.0}, {}, seconds, 0.01, None, None, 0, 0.0, 1.0,
                      0.0, load)

    ref = row("full model", None, 4.0)
    assert timing_warnings(ref, [row("k=1", 1, 3.0), row("k=2", 2, 2.0)], cores=2) == []
    busy = timing_warnings(ref, [row("k=1", 1, 3.0, load=5.0)], cores=2)
    assert len(busy) == 1 and "busy" in busy[0] and "5.0 on 2 cores" in busy[0]
    order = timing_warnings(ref, [row("k=1", 1, 2.0), row("k=2", 2, 3.0), row("k=3", 3, 5.0)], cores=2)
    assert any("k=2" in w and "slower than k=1" in w for w in order)
    assert any("k=3 trained slower than full model" in w for w in order)


def test_standard_metrics():
    from consumers.metrics import entity_f1, normalize_answer, squad_scores

    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert entity_f1(gold, gold) == 100.0
    assert entity_f1(gold, [["B-PER", "O", "O", "B-LOC"]]) == 50.0  # span-level: PER is cut short
    assert entity_f1(gold, [["O"] * 4]) == 0.0
    # The SQuAD v1.1 script: normalised text, token F1, best over the gold answers.
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert squad_scores(["the Eiffel Tower!"], [["Eiffel tower"]]) == (100.0, 100.0)
    em, f1 = squad_scores(["in Paris France", "Rome"], [["Paris"], ["Milan", "rome"]])
    assert em == 50.0 and f1 == pytest.approx((50.0 + 100.0) / 2)


def test_cli_field_options_reach_the_labelling(read_store, qa_store, tmp_path):
    from click.testing import CliRunner

    ner = write_jsonl(tmp_path / "ner.jsonl", NER_ROWS)
    common = ["--epochs", "1", "--seeds", "0", "--min-steps", "0", "--batch-size", "8", "--lr", "1e-3"]
    bad = CliRunner().invoke(main, [str(read_store), "--task", "ner", "--train", str(ner), "--dev", str(ner),
                                    "--text-field", "sentence", *common])
    assert bad.exit_code == 2 and "no field 'sentence'" in bad.output
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"q": r["question"], **r} for r in QA_ROWS])
    bad = CliRunner().invoke(main, [str(qa_store), "--task", "qa", "--train", str(qa), "--dev", str(qa),
                                    "--question-field", "query", *common])
    assert bad.exit_code == 2 and "no field 'query'" in bad.output
    ok = CliRunner().invoke(main, [str(qa_store), "--task", "qa", "--train", str(qa), "--dev", str(qa),
                                   "--question-field", "q", "--reference", "none", "--json", *common])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["dev_rows"] == len(QA_ROWS)
