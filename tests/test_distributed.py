"""Data-parallel capture (torchrun + gloo on CPU), unit-structured resume, and ``moescope merge``.

The slow tests launch ``python -m torch.distributed.run --nproc-per-node 2 -m moescope capture`` on the
bundled tiny-mixtral model and corpus, exactly as a cluster job would, and compare the trace with a
single-process capture of the same data column by column; one kills a rank mid-capture and resumes
with another rank count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cli_helpers import env
from moescope.capture.distributed import (
    FAULT_ENV,
    DistContext,
    _ranges,
    commit_units,
    unit_record_name,
)
from moescope.capture.runner import CaptureOptions, LoadedModel, capture
from moescope.capture.tiny import tiny_model
from moescope.data import corpus_path
from moescope.errors import ConfigError, DataError, TraceError
from moescope.models import byte_tokenizer
from moescope.trace import Trace
from moescope.trace.merge import merge_traces
from moescope.trace.synthetic import write_synthetic_trace
from moescope.trace.validate import validate_trace

WORDS = "the cat sat on a mat while dogs ran over green hills and rivers flowed into seas".split()


def _jsonl(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 40))))
            f.write(json.dumps({"text": text, "topic": "ab"[i % 2]}) + "\n")
    return path


def _rows(trace: Path) -> pa.Table:
    """Every row of a trace, all columns, in document and position order (labels as plain strings)."""
    tr = Trace.open(trace)
    table = pa.concat_tables([pq.read_table(p) for p in tr.shard_paths])
    table = table.set_column(table.schema.get_field_index("label"), "label", table["label"].cast(pa.string()))
    return table.sort_by([("doc_id", "ascending"), ("position", "ascending")]).combine_chunks()


def _shards(trace: Path) -> dict[str, str]:
    return {s["file"]: s["sha256"] for s in json.loads((trace / "manifest.json").read_text())["shards"]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("mixtral")
    return LoadedModel(model, byte_tokenizer(model.config.vocab_size), "tiny:mixtral", "object")


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    """In-process tests run as a plain single process, whatever launched pytest."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", FAULT_ENV):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- units in one process
def test_unit_capture_records_what_the_plain_capture_records(tmp_path, tiny):
    """The unit layout batches per unit: ids equal the plain capture's, weights to float rounding."""
    data = [str(_jsonl(tmp_path / "d.jsonl", 13))]
    opts = dict(seq_len=16, batch_size=4, label_field="topic")
    plain = capture(tiny, data, tmp_path / "plain", CaptureOptions(**opts))
    units = capture(tiny, data, tmp_path / "units", CaptureOptions(**opts, unit_documents=4))
    assert units.unit_documents == 4 and units.shards == 4  # 13 documents: units of 4, 4, 4, 1
    assert plain.total_tokens == units.total_tokens
    a, b = _rows(tmp_path / "plain"), _rows(tmp_path / "units")
    for name in ("doc_id", "position", "token_id", "label", "experts"):
        assert a[name].equals(b[name]), name
    wa, wb = Trace.open(tmp_path / "plain").load().weights, Trace.open(tmp_path / "units").load().weights
    np.testing.assert_allclose(wa, wb, rtol=0, atol=1e-5)
    assert validate_trace(tmp_path / "units") == []
    m = json.loads((tmp_path / "units" / "manifest.json").read_text())
    assert [s["unit"] for s in m["shards"]] == [0, 1, 2, 3]
    assert m["capture"]["unit_documents"] == 4
    ds = m["datasets"][0]
    assert (ds["documents"], ds["first_doc"], ds["last_doc"], ds["labels"]) == (13, 0, 12, ["a", "b"])
    assert ds["tokens"] == units.total_tokens


def test_resume_redoes_only_the_missing_units(tmp_path, tiny):
    data = [str(_jsonl(tmp_path / "d.jsonl", 14, seed=1))]
    opts = dict(seq_len=16, batch_size=4, unit_documents=3, max_tokens=800)
    full = capture(tiny, data, tmp_path / "t", CaptureOptions(**opts))
    # the budget is global, cut in the last unit it reaches
    assert full.total_tokens == 800 and full.shards >= 3
    before = _shards(tmp_path / "t")
    # What a rank that died during unit 1 leaves: unit 0 done, unit 1's shard without its record,
    # a temporary, and a manifest that lists nothing yet.
    (tmp_path / "t" / unit_record_name(1)).unlink()
    for u in range(2, full.shards):
        (tmp_path / "t" / unit_record_name(u)).unlink()
        (tmp_path / "t" / f"part-{u:05d}.parquet").unlink()
    (tmp_path / "t" / ".part-00002.parquet.0123abcd.tmp").write_bytes(b"half")
    m = json.loads((tmp_path / "t" / "manifest.json").read_text())
    m.update(shards=[], complete=False, progress={"last_document": None, "rows": 0})
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceError, match="incomplete"):
        Trace.open(tmp_path / "t")
    again = capture(tiny, data, tmp_path / "t", CaptureOptions(**opts, resume=True))
    assert again.documents < full.documents  # unit 0 was not redone
    assert _shards(tmp_path / "t") == before
    assert not list((tmp_path / "t").glob(".*.tmp"))
    assert validate_trace(tmp_path / "t") == []


def test_resume_refuses_other_unit_size_and_commit_names_missing_units(tmp_path, tiny):
    data = [str(_jsonl(tmp_path / "d.jsonl", 7))]
    capture(tiny, data, tmp_path / "t", CaptureOptions(seq_len=16, unit_documents=2))
    with pytest.raises(ConfigError, match=r"unit_documents.*`unit_documents`"):
        capture(tiny, data, tmp_path / "t", CaptureOptions(seq_len=16, unit_documents=3, resume=True))
    (tmp_path / "t" / unit_record_name(1)).unlink()
    (tmp_path / "t" / unit_record_name(2)).unlink()
    with pytest.raises(TraceError, match=r"unit\(s\) 1-2 have no shard.*`resume`"):
        commit_units(tmp_path / "t", 4)


def test_launcher_variables():
    assert DistContext.from_env({}).launched is False
    ctx = DistContext.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world, ctx.local_rank, ctx.is_main, ctx.launched) == (3, 4, 1, False, True)
    with pytest.raises(ConfigError, match=r"RANK=4 must lie in 0\.\.WORLD_SIZE-1=3"):
        DistContext.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="must be integers"):
        DistContext.from_env({"RANK": "x", "WORLD_SIZE": "4"})
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


# --------------------------------------------------------------------------- torchrun, 2 ranks
CORPUS = corpus_path() / "heldout-verse.jsonl"
ARGS = ["tiny-mixtral", str(CORPUS), "--max-documents", "8", "--device", "cpu", "--dtype", "float32"]
ARGS += ["--seq-len", "64", "--batch-size", "4", "--unit-documents", "2"]


def _torchrun(n: int, out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    e = env()
    if fault:
        e[FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    cmd += ["-m", "moescope", "capture", *ARGS, "-o", str(out), *extra]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=900)


def _single(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moescope", "capture", *ARGS, "-o", str(out), *extra]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "single"
    proc = _single(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, reference):
    proc = _torchrun(2, tmp_path / "t2", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])  # rank 0 reports, once
    assert summary["world_size"] == 2 and summary["rank"] == 0
    assert "rank 1/2: captured" in proc.stderr
    a, b = _rows(reference), _rows(tmp_path / "t2")
    assert a.num_rows == b.num_rows > 0
    assert a.column_names == b.column_names
    for name in a.column_names:
        assert a[name].equals(b[name]), name
    # Same shard names and bytes: the layout does not depend on the number of ranks.
    assert _shards(tmp_path / "t2") == _shards(reference)
    assert validate_trace(tmp_path / "t2") == []
    assert not list(tmp_path.glob(".*moescope-lock"))


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_killed_rank_then_resume_loses_and_doubles_nothing(tmp_path, reference, ranks):
    out = tmp_path / "t"
    proc = _torchrun(2, out, fault="1:1")  # rank 1 dies right after its first unit
    assert proc.returncode != 0
    with pytest.raises(TraceError, match="incomplete"):
        Trace.open(out)
    resumed = _torchrun(2, out, "--resume") if ranks == 2 else _single(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "unit(s) already captured" in resumed.stderr
    a, b = _rows(reference), _rows(out)
    for name in a.column_names:
        assert a[name].equals(b[name]), name
    assert _shards(out) == _shards(reference)
    assert validate_trace(out) == []


# --------------------------------------------------------------------------- merge
def test_merge_renumbers_documents_and_keeps_every_column(tmp_path):
    a = write_synthetic_trace(tmp_path / "a", n_tokens=600, doc_len=100, logits=True, seed=1)
    b = write_synthetic_trace(tmp_path / "b", n_tokens=400, doc_len=50, logits=True, seed=2, labels=("c",))
    result = merge_traces([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert (result.documents, result.tokens) == (6 + 8, 1000)
    m = Trace.open(tmp_path / "m")
    assert validate_trace(tmp_path / "m") == []
    assert sorted(m.labels) == ["a", "b", "c"]
    got = m.load()
    parts = [a.load(), b.load()]
    np.testing.assert_array_equal(got.doc_id, np.r_[parts[0].doc_id, parts[1].doc_id + 6])
    for name in ("position", "token_id", "experts", "weights", "logits"):
        np.testing.assert_array_equal(getattr(got, name), np.concatenate([getattr(p, name) for p in parts]))
    labels = [m.labels[i] for i in got.label]
    assert labels == [a.labels[i] for i in parts[0].label] + [b.labels[i] for i in parts[1].label]
    source = m.manifest["source"]
    assert [i["first_doc"] for i in source["inputs"]] == [0, 6]


def test_merge_cli_and_bad_input(tmp_path):
    from typer.testing import CliRunner

    from moescope.cli import app

    write_synthetic_trace(tmp_path / "a", n_tokens=300, doc_len=100)
    write_synthetic_trace(tmp_path / "b", n_tokens=300, doc_len=100, seed=3)
    write_synthetic_trace(tmp_path / "k4", n_tokens=300, doc_len=100, top_k=4)
    write_synthetic_trace(tmp_path / "lg", n_tokens=300, doc_len=100, logits=True)
    runner = CliRunner()
    ok = runner.invoke(
        app, ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "m"), "--json"]
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["documents"] == 6

    def error(*args: str) -> str:
        res = runner.invoke(app, ["merge", *args])
        assert res.exit_code != 0
        return (
            str(res.exception) if res.exception and not isinstance(res.exception, SystemExit) else res.output
        )

    msg = error(str(tmp_path / "a"), str(tmp_path / "k4"), "-o", str(tmp_path / "x"))
    assert "routing.top_k is 2 in one and 4 in the other" in msg and "k4" in msg and "/a/" in msg
    msg = error(str(tmp_path / "a"), str(tmp_path / "lg"), "-o", str(tmp_path / "x"))
    assert "columns.logits" in msg and "lg" in msg
    assert "given twice" in error(str(tmp_path / "a"), str(tmp_path / "a"), "-o", str(tmp_path / "x"))
    assert "already exists" in error(str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "m"))
    assert not (tmp_path / "x").exists()
    assert not list(tmp_path.glob(".x.*"))  # nothing half-written is left
    # --overwrite replaces a trace moescope wrote, never a foreign folder
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    assert "not a moescope trace" in error(
        str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "notes"), "--overwrite"
    )
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep"
    again = runner.invoke(
        app, ["merge", str(tmp_path / "b"), str(tmp_path / "a"), "-o", str(tmp_path / "m"), "--overwrite"]
    )
    assert again.exit_code == 0, again.output
    assert Trace.open(tmp_path / "m").num_tokens == 600
    # an incomplete input is refused unless asked for
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    assert "incomplete" in error(str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "y"))


def test_merge_refuses_other_models(tmp_path):
    for name, model in (("a", "org/model-a"), ("b", "org/model-b")):
        write_synthetic_trace(tmp_path / name, n_tokens=200, doc_len=100)
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        m["model"] = {"id": model, "config_sha256": model[-1] * 64}
        (tmp_path / name / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceError, match=r"different models.*org/model-a.*org/model-b"):
        merge_traces([tmp_path / "a", tmp_path / "b"], tmp_path / "m")


def test_unit_capture_of_empty_data_leaves_nothing(tmp_path, tiny):
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(DataError, match="no documents"):
        capture(tiny, [str(tmp_path / "e.jsonl")], tmp_path / "t", CaptureOptions(unit_documents=2))
    assert not (tmp_path / "t").exists()
