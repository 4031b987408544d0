"""The trace format: round trip, views, crash safety, validation, third-party readers."""

from __future__ import annotations

import json
import time

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from conftest import make_rows
from moescope.errors import TraceError
from moescope.trace import RoutingSpec, Trace, TraceWriter, missing_id, validate_trace
from moescope.trace.schema import default_columns, id_dtype

SPEC = RoutingSpec(num_experts=8, top_k=2, moe_layers=[1, 2, 4], family="test", num_hidden_layers=5)
LABELS = ["code", "prose", "code", "verse", "prose"]
LENGTHS = [5, 3, 7, 2, 6]


def write_docs(path, shard_rows=8, logits=False, n_docs=len(LENGTHS)):
    docs = []
    cols = default_columns(weights=True, logits=logits)
    with TraceWriter.create(path, SPEC, columns=cols, shard_rows=shard_rows) as w:
        for d in range(n_docs):
            rows = make_rows(d, LENGTHS[d])
            if logits:
                rows["logits"] = (
                    np.random.default_rng(d).standard_normal((LENGTHS[d], 3, 8)).astype(np.float16)
                )
            w.append(label=LABELS[d], **rows)
            w.commit(d)
            docs.append(rows)
    return docs


def test_round_trip_arrays_and_manifest(tmp_path):
    docs = write_docs(tmp_path / "t", logits=True)
    tr = Trace.open(tmp_path / "t")
    assert tr.num_tokens == sum(LENGTHS)
    assert (tr.num_experts, tr.top_k, tr.moe_layers, tr.num_layers) == (8, 2, [1, 2, 4], 3)
    assert tr.labels == ["code", "prose", "verse"]
    assert tr.complete
    b = tr.load()
    np.testing.assert_array_equal(b.experts, np.concatenate([d["experts"] for d in docs]))
    np.testing.assert_allclose(b.weights, np.concatenate([d["weights"] for d in docs]))
    assert b.logits.shape == (sum(LENGTHS), 3, 8) and b.logits.dtype == np.float16
    names = [LABELS[d] for d in range(len(LENGTHS)) for _ in range(LENGTHS[d])]
    assert [tr.labels[c] for c in b.label] == names
    assert b.experts.dtype == np.uint8
    # shards are cut at document boundaries only
    for s in tr.manifest["shards"]:
        assert s["rows"] == sum(LENGTHS[s["first_doc"] : s["last_doc"] + 1])
    assert validate_trace(tmp_path / "t") == []


def test_zero_copy_from_shard(tmp_path):
    write_docs(tmp_path / "t", shard_rows=1000)
    tr = Trace.open(tmp_path / "t")
    rb = next(tr.iter_arrow(["experts"]))
    arr = rb.column("experts").flatten().flatten().to_numpy(zero_copy_only=True)
    assert arr.size == tr.num_tokens * 3 * 2


def test_iter_batches_equals_load_and_respects_batch_size(tmp_path):
    write_docs(tmp_path / "t", shard_rows=4)
    tr = Trace.open(tmp_path / "t")
    parts = list(tr.iter_batches(["doc_id", "experts"], batch_size=3))
    assert all(len(p) <= 3 for p in parts)
    np.testing.assert_array_equal(np.concatenate([p.experts for p in parts]), tr.experts())


def test_filter_by_domain_and_document(tmp_path):
    docs = write_docs(tmp_path / "t")
    tr = Trace.open(tmp_path / "t")
    code = tr.filter(domain="code").load(["doc_id", "experts"])
    assert set(code.doc_id) == {0, 2}
    np.testing.assert_array_equal(code.experts, np.concatenate([docs[0]["experts"], docs[2]["experts"]]))
    both = tr.filter(domain=["code", "verse"]).filter(documents=[2, 3, 4])
    assert set(both.load(["doc_id"]).doc_id) == {2, 3}
    assert both.num_tokens == LENGTHS[2] + LENGTHS[3]
    with pytest.raises(TraceError, match="unknown domain"):
        tr.filter(domain="poetry")


def test_readable_by_duckdb_polars_pyarrow_without_moescope(tmp_path):
    docs = write_docs(tmp_path / "t")
    glob = str(tmp_path / "t" / "*.parquet")
    n, first = duckdb.sql(f"SELECT count(*), min(doc_id) FROM read_parquet('{glob}')").fetchall()[0]
    assert (n, first) == (sum(LENGTHS), 0)
    row = duckdb.sql(
        f"SELECT experts[2][1], label FROM read_parquet('{glob}') WHERE doc_id = 1 AND position = 0"
    ).fetchall()[0]
    assert row == (int(docs[1]["experts"][0, 1, 0]), "prose")
    df = pl.read_parquet(glob)
    assert df.height == sum(LENGTHS)
    assert df["experts"].to_numpy().shape == (sum(LENGTHS), 3, 2)
    table = pq.read_table(tmp_path / "t" / "part-00000.parquet")
    assert table.schema.field("experts").type.list_size == 3


def test_refuses_to_overwrite_without_flag(tmp_path):
    write_docs(tmp_path / "t")
    with pytest.raises(TraceError, match="`resume`"):
        TraceWriter.create(tmp_path / "t", SPEC)


def test_crash_between_shard_and_manifest_keeps_trace_intact(tmp_path, monkeypatch):
    """A kill after a shard is renamed but before the manifest names it leaves an orphan, not a wrong trace."""
    path = tmp_path / "t"
    w = TraceWriter.create(path, SPEC, shard_rows=4)
    for d in range(2):
        w.append(label=LABELS[d], **make_rows(d, LENGTHS[d]))
        w.commit(d)
    committed = Trace.open(path, allow_incomplete=True).num_tokens
    assert committed == LENGTHS[0]  # doc 0 (5 rows) made a shard; doc 1 (3 rows) waits

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(w, "_write_manifest", die)
    w.append(label=LABELS[2], **make_rows(2, LENGTHS[2]))
    with pytest.raises(KeyboardInterrupt):
        w.commit(2)
    assert (path / "part-00001.parquet").exists()  # the shard landed
    tr = Trace.open(path, allow_incomplete=True)
    assert tr.num_tokens == committed  # but readers trust the manifest
    assert any("orphan" in p for p in validate_trace(path))
    resumed = TraceWriter.resume(path)
    assert resumed.last_document == 0
    assert not (path / "part-00001.parquet").exists()  # orphan removed on resume
    for d in range(1, len(LENGTHS)):
        resumed.append(label=LABELS[d], **make_rows(d, LENGTHS[d]))
        resumed.commit(d)
    resumed.close()
    full = Trace.open(path).load(["doc_id", "position"])
    assert len(full.doc_id) == sum(LENGTHS)
    assert len(set(zip(full.doc_id.tolist(), full.position.tolist(), strict=True))) == sum(LENGTHS)
    assert validate_trace(path) == []


def test_resume_refuses_different_settings(tmp_path):
    TraceWriter.create(tmp_path / "t", SPEC, capture={"seq_len": 128, "model": "m"})
    with pytest.raises(TraceError, match="'seq_len' was 128, now 256"):
        TraceWriter.resume(tmp_path / "t", capture={"seq_len": 256, "model": "m"})


def test_validate_reports_corrupted_shard(tmp_path):
    write_docs(tmp_path / "t")
    shard = tmp_path / "t" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = validate_trace(tmp_path / "t")
    assert any("part-00000.parquet: SHA-256 differs" in p for p in problems)


def test_validate_reports_missing_shard_and_bad_manifest(tmp_path):
    write_docs(tmp_path / "t")
    (tmp_path / "t" / "part-00001.parquet").unlink()
    assert any(
        "part-00001.parquet: listed in manifest.json but missing" in p for p in validate_trace(tmp_path / "t")
    )
    with pytest.raises(TraceError, match="shard listed in the manifest is missing"):
        Trace.open(tmp_path / "t")
    m = tmp_path / "t" / "manifest.json"
    m.write_text("{not json")
    with pytest.raises(TraceError, match=r"manifest.json: invalid JSON at line 1"):
        Trace.open(tmp_path / "t")
    m.write_text(json.dumps({"format": "moescope-trace", "format_version": 1, "routing": {}, "shards": []}))
    with pytest.raises(TraceError, match="missing required field 'columns'"):
        Trace.open(tmp_path / "t")


def test_validate_reports_wrong_routing_facts(tmp_path):
    write_docs(tmp_path / "t")
    m = tmp_path / "t" / "manifest.json"
    manifest = json.loads(m.read_text())
    manifest["routing"]["top_k"] = 3
    m.write_text(json.dumps(manifest))
    problems = validate_trace(tmp_path / "t")
    assert any("column 'experts' has type" in p and "expected" in p for p in problems)
    manifest["routing"]["top_k"] = 9
    m.write_text(json.dumps(manifest))
    assert "routing.top_k must be in 1..num_experts=8" in validate_trace(tmp_path / "t")[0]


def test_validate_reports_out_of_range_and_repeated_ids(tmp_path):
    path = tmp_path / "t"
    rows = make_rows(0, 4)
    rows["experts"][2, 1, 0] = 9
    rows["experts"][3, 0] = [5, 5]
    with TraceWriter.create(path, SPEC) as w:
        w.append(label="x", **rows)
    problems = validate_trace(path)
    assert any("id 9 >= num_experts=8" in p and "row 2, MoE layer 1" in p for p in problems)
    assert any("repeats an expert" in p and "row 3, MoE layer 0" in p for p in problems)


def test_missing_sentinel_is_valid_and_dtype_smallest():
    assert id_dtype(8) == np.uint8 and missing_id(8) == 255
    assert id_dtype(255) == np.uint16  # 255 is the uint8 sentinel, so 255 experts need 16 bits
    assert id_dtype(256) == np.uint16 and missing_id(256) == 65535


def test_append_checks_shapes(tmp_path):
    w = TraceWriter.create(tmp_path / "t", SPEC)
    rows = make_rows(0, 4)
    rows["experts"] = rows["experts"][:, :2]
    with pytest.raises(TraceError, match=r"experts has shape \(4, 2, 2\), expected \(4, 3, 2\)"):
        w.append(label="x", **rows)
    rows = make_rows(0, 4)
    del rows["weights"]
    with pytest.raises(TraceError, match="pass weights="):
        w.append(label="x", **rows)


def test_read_ahead_matches_plain_reading_and_stops_early(tmp_path):
    write_docs(tmp_path / "t", shard_rows=4)
    tr = Trace.open(tmp_path / "t")
    plain = [rb.column("doc_id").to_pylist() for rb in tr.iter_arrow(["doc_id"], batch_size=2, read_ahead=0)]
    ahead = [rb.column("doc_id").to_pylist() for rb in tr.iter_arrow(["doc_id"], batch_size=2, read_ahead=2)]
    assert ahead == plain
    it = tr.iter_arrow(["doc_id"], batch_size=1, read_ahead=1)
    next(it)
    it.close()  # the producer thread stops instead of blocking on a full queue


def test_closing_a_filtered_read_ahead_stops_before_the_end_of_the_trace(tmp_path, monkeypatch):
    import moescope.trace.integrity as integrity

    with TraceWriter.create(tmp_path / "t", SPEC, columns=default_columns(), shard_rows=2) as w:
        for d in range(40):
            w.append(label="code" if d == 0 else "prose", **make_rows(d, 2))
            w.commit(d)
    tr = Trace.open(tmp_path / "t").filter(domain="code")
    n_shards = len(tr.manifest["shards"])
    assert n_shards >= 20
    opened = []
    real_open = integrity.open_shard
    monkeypatch.setattr(
        integrity, "open_shard", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k)
    )
    it = tr.iter_arrow(["doc_id"], batch_size=1, read_ahead=1)
    assert next(it).column("doc_id").to_pylist() == [0]
    time.sleep(0.5)  # the consumer works; the producer waits with its read-ahead full
    it.close()
    # batches the filter empties count against the read-ahead too: the producer did not decode on
    # through the rest of the trace (and close() did not wait for it to)
    assert len(opened) < n_shards // 2


def test_read_ahead_reraises_reader_errors(tmp_path):
    write_docs(tmp_path / "t", shard_rows=4)
    tr = Trace.open(tmp_path / "t")
    (tmp_path / "t" / "part-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(Exception, match=r"(?i)parquet"):
        for _ in tr.iter_arrow(["doc_id"], batch_size=2, read_ahead=1):
            pass


def test_split_writes_disjoint_document_halves_with_every_column(tmp_path):
    from typer.testing import CliRunner

    from moescope.cli import app
    from moescope.trace.split import split_documents

    src = tmp_path / "src"
    spec = RoutingSpec(num_experts=8, top_k=2, moe_layers=[0, 1, 2], family="mixtral")
    with TraceWriter.create(
        src, spec, columns=default_columns(weights=True, logits=True, token_text=True)
    ) as w:
        for doc in range(6):
            rows = make_rows(doc, 5 + doc)
            n = len(rows["doc_id"])
            logits = np.random.default_rng(doc).standard_normal((n, 3, 8)).astype(np.float16)
            w.append(**rows, label=f"d{doc % 2}", logits=logits, token=[f"t{doc}_{i}" for i in range(n)])
            w.commit(doc)
    tr = Trace.open(src)
    res = CliRunner().invoke(
        app, ["split", str(src), "-o", str(tmp_path / "out"), "--test-fraction", "0.34", "--json"]
    )
    assert res.exit_code == 0, res.output
    train, test = Trace.open(tmp_path / "out" / "train"), Trace.open(tmp_path / "out" / "test")
    want_train, want_test = split_documents(tr, 0.34, 0)
    np.testing.assert_array_equal(train.documents(), want_train)
    np.testing.assert_array_equal(test.documents(), want_test)
    assert (
        validate_trace(tmp_path / "out" / "train") == [] and validate_trace(tmp_path / "out" / "test") == []
    )
    whole = tr.to_polars()
    for part in (train, test):
        got = part.to_polars()
        expect = whole.filter(whole["doc_id"].is_in(part.documents().tolist()))
        assert got.equals(expect), part.path
    assert train.num_tokens + test.num_tokens == tr.num_tokens
    assert train.manifest["source"]["parent"] == str(src)
