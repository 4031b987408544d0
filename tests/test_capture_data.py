"""Capture data: file loaders, presets, field errors, tokenisation and windowing."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moescope.core.sources import PRESETS, Document, iter_documents, resolve_source
from moescope.core.windows import (
    Window,
    ensure_pad_token,
    iter_tokenized,
    make_windows,
    pad_batch,
    plan_batches,
    tokenize,
)
from moescope.errors import ConfigError, DataError
from moescope.models import byte_tokenizer

RECORDS = [
    {"text": "First document.", "topic": "news", "n": 1},
    {"text": "  ", "topic": "news", "n": 2},  # blank: skipped, takes no id
    {"text": 'Second, with a comma and "quotes".', "topic": "code", "n": 3},
    {"text": "Third one\nover two lines.", "topic": "news", "n": 4},
]
EXPECTED = [(r["text"], r["topic"]) for r in RECORDS if r["text"].strip()]


def _write(path, fmt: str, records: list[dict]) -> None:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(records))
    elif fmt in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]), delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(records)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)


def _docs(*items, **kw):
    sources = [resolve_source(str(i), **kw) for i in items]
    return [(d.doc_id, d.text, d.label) for d in iter_documents(sources)]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_structured_files_give_texts_and_labels(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    _write(path, fmt, RECORDS)
    docs = _docs(path, label_field="topic")
    assert [(t, lab) for _, t, lab in docs] == EXPECTED
    assert [i for i, _, _ in docs] == list(range(len(EXPECTED)))
    # Without a label field the label is the file stem, and a constant label wins over everything.
    assert {lab for _, _, lab in _docs(path)} == {"data"}
    assert {lab for _, _, lab in _docs(path, label_field="topic", label="const")} == {"const"}


def test_text_file_units(tmp_path):
    text = "Para one\nstill one.\n\nPara two.\n  \t\nPara three.\n"
    path = tmp_path / "notes.txt"
    path.write_text(text)
    assert [t for _, t, _ in _docs(path)] == ["Para one\nstill one.", "Para two.", "Para three.\n"]
    assert [t for _, t, _ in _docs(path, txt_unit="file")] == [text]
    assert [t for _, t, _ in _docs(path, txt_unit="line")] == [
        "Para one",
        "still one.",
        "Para two.",
        "Para three.",
    ]
    assert {lab for _, _, lab in _docs(path)} == {"notes"}
    with pytest.raises(ConfigError, match="`txt_unit`"):
        resolve_source(str(path), txt_unit="sentence")
    with pytest.raises(ConfigError, match="plain text file has no fields"):
        resolve_source(str(path), text_field="body")


def test_ids_run_across_sources_and_max_documents_is_per_source(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(a, "jsonl", RECORDS)
    _write(b, "jsonl", [{"text": f"b{i}"} for i in range(5)])
    docs = _docs(a, b, max_documents=2)
    assert docs == [(0, "First document.", "a"), (1, RECORDS[2]["text"], "a"), (2, "b0", "b"), (3, "b1", "b")]
    sources = [resolve_source(str(p)) for p in (a, b)]
    assert [d.doc_id for d in iter_documents(sources, start=4)] == [4, 5, 6, 7]
    assert [d.text for d in iter_documents(sources, start=4)] == ["b1", "b2", "b3", "b4"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_unknown_fields_are_named_with_the_available_ones(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    _write(path, fmt, RECORDS)
    with pytest.raises(DataError, match=r"unknown text field 'body'; available fields: text, topic, n"):
        _docs(path, text_field="body")
    with pytest.raises(DataError, match=r"unknown label field 'domain'; available fields: text, topic, n"):
        _docs(path, label_field="domain")


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        _docs(bad)
    with pytest.raises(DataError, match=r"unknown file type '\.xml'"):
        (tmp_path / "x.xml").write_text("<a/>")
        resolve_source(str(tmp_path / "x.xml"))
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        resolve_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="not a datasets save_to_disk folder"):
        (tmp_path / "plain").mkdir()
        resolve_source(str(tmp_path / "plain"))
    with pytest.raises(ConfigError, match="`preset`: unknown preset 'c4'; known presets: wikitext"):
        resolve_source(str(bad), preset="c4")


def test_ag_news_preset_on_a_local_parquet(tmp_path):
    rows = [
        {"text": "Stocks rose.", "label": 2},
        {"text": "Team wins cup.", "label": 1},
        {"text": "New chip.", "label": 3},
    ]
    path = tmp_path / "agnews.parquet"
    _write(path, "parquet", rows)
    assert _docs(path, preset="ag_news") == [
        (0, "Stocks rose.", "Business"),
        (1, "Team wins cup.", "Sports"),
        (2, "New chip.", "Sci/Tech"),
    ]
    _write(path, "parquet", [{"text": "?", "label": 7}])
    with pytest.raises(DataError, match="label field 'label' has value 7, outside the 4 category names"):
        _docs(path, preset="ag_news")


def test_hellaswag_and_humaneval_presets_on_local_jsonl(tmp_path):
    hs = tmp_path / "hs.jsonl"
    _write(
        hs,
        "jsonl",
        [
            {
                "ctx": "A man sits down.",
                "endings": ["He eats.", "He sings.", "He sleeps.", "He runs."],
                "label": "1",
                "activity_label": "Eating",
            },
            {"ctx": "Hidden test item.", "endings": ["a", "b", "c", "d"], "label": "", "activity_label": "X"},
        ],
    )
    assert _docs(hs, preset="hellaswag") == [
        (0, "A man sits down. He sings.", "hs"),
        (1, "Hidden test item.", "hs"),
    ]
    assert [lab for *_, lab in _docs(hs, preset="hellaswag", label_field="activity_label")] == ["Eating", "X"]
    _write(hs, "jsonl", [{"context": "x"}])
    with pytest.raises(DataError, match="unknown text field 'ctx'"):
        _docs(hs, preset="hellaswag")
    he = tmp_path / "he.jsonl"
    _write(
        he, "jsonl", [{"task_id": "HumanEval/0", "prompt": "def f():\n    pass\n", "canonical_solution": "x"}]
    )
    assert _docs(he, preset="humaneval") == [(0, "def f():\n    pass\n", "he")]


def test_wikitext_preset_joins_lines_into_articles(tmp_path):
    lines = [
        "",
        " = Alpha = \n",
        "",
        " Alpha text .\n",
        " = = Section = = \n",
        " More alpha .\n",
        "",
        " = Beta = \n",
        " Beta text .\n",
    ]
    path = tmp_path / "wiki.parquet"
    _write(path, "parquet", [{"text": s} for s in lines])
    docs = _docs(path, preset="wikitext")
    assert [t for _, t, _ in docs] == [
        "= Alpha = \n\n Alpha text .\n = = Section = = \n More alpha .",
        "= Beta = \n Beta text .",
    ]
    # Without the preset, each non-blank row is a document.
    assert [t for _, t, _ in _docs(path)] == [s for s in lines if s.strip()]


def test_hub_presets_map_to_hub_ids(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(
            {"text": ["Stocks rose."], "label": [2]},
            features=datasets.Features(
                {
                    "text": datasets.Value("string"),
                    "label": datasets.ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"]),
                }
            ),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert _docs("ag_news") == [(0, "Stocks rose.", "Business")]
    _docs("wikitext-2")
    assert _docs("wikitext", split="validation")[0][1] == "Stocks rose."
    assert calls == [
        ("fancyzhx/ag_news", None, "test"),
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
        ("Salesforce/wikitext", "wikitext-103-raw-v1", "validation"),
    ]
    assert set(PRESETS) == {"wikitext", "wikitext-2", "lambada", "hellaswag", "ag_news", "humaneval"}


def test_hub_failure_is_a_data_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match=r"someone/corpus: not a file or directory, and loading it as a hub data set"
    ):
        _docs("someone/corpus")


def test_load_from_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features(
        {"body": datasets.Value("string"), "cat": datasets.ClassLabel(names=["x", "y"])}
    )
    ds = datasets.Dataset.from_dict({"body": ["one", "", "three"], "cat": [1, 0, 0]}, features=feats)
    ds.save_to_disk(str(tmp_path / "single"))
    assert _docs(tmp_path / "single", text_field="body", label_field="cat") == [
        (0, "one", "y"),
        (1, "three", "x"),
    ]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([2])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert _docs(tmp_path / "dict", text_field="body", split="test") == [(0, "three", "dict")]
    with pytest.raises(DataError, match=r"has several splits \(train, test\); choose one with `split`"):
        _docs(tmp_path / "dict", text_field="body")
    with pytest.raises(DataError, match="no split 'dev'; available splits: train, test"):
        _docs(tmp_path / "dict", text_field="body", split="dev")
    with pytest.raises(DataError, match="unknown text field 'text'; available fields: body, cat"):
        _docs(tmp_path / "single")
    # The fingerprint identifies the content, so resume can tell when the data changed.
    assert resolve_source(str(tmp_path / "single"), text_field="body").describe()["fingerprint"]


# --------------------------------------------------------------------------- tokens and windows
def test_byte_tokenizer_round_trip_and_small_vocab():
    tok = byte_tokenizer(260)
    text = "héllo wörld\n\tdone"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and len(tok) == 260
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) == 1 + len(text.encode("utf-8"))  # one id per byte, plus BOS
    small = byte_tokenizer(128)
    ids = small("aé")["input_ids"]
    assert len(small) == 128 and max(ids) < 128
    assert ids[1:] == [small.convert_tokens_to_ids("a"), small.unk_token_id, small.unk_token_id]


def test_pad_token_falls_back_to_eos_or_fails_naming_the_tokenizer():
    tok = byte_tokenizer(128, pad=False)
    assert tok.pad_token_id is None
    assert ensure_pad_token(tok) == tok.eos_token_id == 2
    tok = byte_tokenizer(128, pad=False, eos=False)
    with pytest.raises(
        ConfigError, match="tokenizer 'moescope-bytes-128' has neither a pad token nor an EOS"
    ):
        ensure_pad_token(tok)


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_windows_cover_every_token_once_in_order(seq_len):
    tok = byte_tokenizer(260)
    texts = ["short", "a somewhat longer document that needs several windows " * 2, "x" * 16]
    whole = [tok(t)["input_ids"] for t in texts]
    ids = tokenize(tok, texts)
    windows = [w for i, x in enumerate(ids) for w in make_windows(i, x, seq_len)]
    for i, ref in enumerate(whole):
        mine = [w for w in windows if w.doc_id == i]
        assert np.concatenate([w.ids for w in mine]).tolist() == ref
        positions = np.concatenate([np.arange(w.start, w.start + len(w)) for w in mine])
        assert positions.tolist() == list(range(len(ref)))
        assert all(len(w) == seq_len for w in mine[:-1]) and 1 <= len(mine[-1]) <= seq_len
    plan = plan_batches(windows, 3)
    assert sorted(i for b in plan for i in b) == list(range(len(windows)))
    lengths = [len(windows[i]) for b in plan for i in b]
    assert lengths == sorted(lengths, reverse=True) and all(len(b) <= 3 for b in plan)
    with pytest.raises(ConfigError, match="`seq_len` must be >= 1"):
        make_windows(0, ids[0], 0)


def test_pad_batch_right_pads_with_a_mask():
    wins = [Window(0, 0, np.array([5, 6, 7])), Window(1, 4, np.array([8]))]
    input_ids, mask = pad_batch(wins, pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_iter_tokenized_cuts_at_the_budget_and_reads_no_further():
    tok = byte_tokenizer()
    texts = ["abcd", "efghij", "kl", "mnopq"]  # 5, 7, 3, 6 ids with <s>

    def docs(stop_after: int):
        for i, t in enumerate(texts):
            if i > stop_after:
                raise AssertionError(f"document {i} was read after the budget was spent")
            yield Document(i, t, "x", 0)

    whole = [(d.doc_id, len(x)) for d, x in iter_tokenized(docs(3), tok, group=2)]
    assert whole == [(0, 5), (1, 7), (2, 3), (3, 6)]
    cut = [(d.doc_id, x.tolist()) for d, x in iter_tokenized(docs(1), tok, max_tokens=9, group=2)]
    assert [i for i, _ in cut] == [0, 1] and sum(len(x) for _, x in cut) == 9
    assert cut[1][1] == tokenize(tok, ["efghij"])[0][:4].tolist()
