"""Readers trust nothing: manifests, shard lists and shard bytes are checked on every open and read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moescope.errors import TraceError
from moescope.trace import Trace, validate_trace
from moescope.trace.integrity import IntegrityWarning
from moescope.trace.synthetic import write_synthetic_trace

MAIN_TRACE = Path(__file__).parent / "data" / "trace-main-v1"  # written by main before checksum checks


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "t"
    write_synthetic_trace(
        path,
        n_tokens=3000,
        num_layers=3,
        doc_len=100,
        logits=True,
        seed=5,
        shard_rows=1000,
        chunk_tokens=1000,
    )
    return path


def _edit(path: Path, **routing):
    m = json.loads((path / "manifest.json").read_text())
    m["routing"].update(routing)
    (path / "manifest.json").write_text(json.dumps(m))


def _read_all(path: Path, **kw) -> int:
    return sum(len(b) for b in Trace.open(path, **kw).iter_batches())


def test_a_trace_written_by_main_still_opens():
    tr = Trace.open(MAIN_TRACE)
    assert tr.num_tokens == 600 and _read_all(MAIN_TRACE) == 600
    assert validate_trace(MAIN_TRACE) == []


def test_a_trace_without_checksums_opens_with_a_note(tmp_path):
    path = tmp_path / "old"
    shutil.copytree(MAIN_TRACE, path)
    m = json.loads((path / "manifest.json").read_text())
    for s in m["shards"]:
        del s["sha256"]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(IntegrityWarning, match="no SHA-256"):
        assert _read_all(path) == 600
    assert any("no SHA-256" in p for p in validate_trace(path))


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        ({"num_experts": 9}, "routing.num_experts is 9 but shard"),
        ({"num_experts": 300}, "routing.num_experts is 300 but shard"),
        ({"top_k": 3}, "routing.top_k is 3 but shard"),
        ({"num_experts": 8.5}, "routing.num_experts must be a non-negative integer"),
        ({"moe_layers": [-1, 0, 1]}, "routing.moe_layers must be a list of non-negative integers"),
        ({"top_k": "2"}, "routing.top_k must be a non-negative integer"),
        ({"moe_layers": [0, 1]}, "routing.moe_layers is [0, 1] but shard"),
    ],
)
def test_manifest_facts_are_checked_against_the_shards(trace, routing, message):
    _edit(trace, **routing)
    with pytest.raises(TraceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Trace.open(trace)
    problems = validate_trace(trace)
    assert problems and not any("Traceback" in p for p in problems)
    if "integer" in message:
        assert message in problems[0]


def test_shard_list_is_checked(trace):
    m = json.loads((trace / "manifest.json").read_text())
    dup = dict(m, shards=m["shards"] + [m["shards"][0]])
    (trace / "manifest.json").write_text(json.dumps(dup))
    with pytest.raises(TraceError, match="listed twice"):
        Trace.open(trace)
    outside = json.loads(json.dumps(m))
    outside["shards"][0]["file"] = "../elsewhere.parquet"
    (trace / "manifest.json").write_text(json.dumps(outside))
    with pytest.raises(TraceError, match="outside the trace directory"):
        Trace.open(trace)
    rows = json.loads(json.dumps(m))
    rows["shards"][0]["rows"] += 1
    rows["progress"]["rows"] += 1
    (trace / "manifest.json").write_text(json.dumps(rows))
    with pytest.raises(TraceError, match=r"holds 1000 rows, manifest\.json says 1001"):
        Trace.open(trace)


def test_incomplete_needs_allow_incomplete(trace):
    m = json.loads((trace / "manifest.json").read_text())
    m["complete"] = False
    (trace / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceError, match="`allow_incomplete`"):
        Trace.open(trace)
    assert _read_all(trace, allow_incomplete=True) == 3000


@pytest.mark.parametrize("column", ["experts", "weights", "logits", "position"])
def test_a_flipped_byte_in_any_column_is_caught_naming_the_shard(trace, column):
    """Flip one byte inside the data of ``column`` (found from the Parquet footer) in shard 1."""
    import pyarrow.parquet as pq

    shard = trace / "part-00001.parquet"
    meta = pq.ParquetFile(shard).metadata
    rg = meta.row_group(0)
    col = next(rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema.startswith(column))
    data = bytearray(shard.read_bytes())
    data[col.data_page_offset + col.total_compressed_size // 2] ^= 0x5A
    shard.write_bytes(bytes(data))
    with pytest.raises(TraceError, match=r"part-00001\.parquet: SHA-256 differs"):
        _read_all(trace)
    assert any("part-00001.parquet" in p for p in validate_trace(trace))
