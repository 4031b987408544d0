"""The capture runner and ``moescope capture``: end to end on tiny models, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moescope.capture import runner as runner_mod
from moescope.capture.engine import RoutingRecorder
from moescope.capture.runner import CaptureOptions, LoadedModel, capture, config_fingerprint
from moescope.capture.tiny import tiny_model
from moescope.cli import app
from moescope.cli import main as cli_main
from moescope.errors import ConfigError, DataError, TraceError, as_flags
from moescope.models import byte_tokenizer
from moescope.trace import Trace
from moescope.trace.validate import validate_trace

WORDS = "the cat sat on a mat while dogs ran over green hills and rivers flowed into seas".split()


def _texts(n: int, seed: int = 0, lo: int = 2, hi: int = 30) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(lo, hi))) for _ in range(n)]


def _jsonl(path, texts, labels=None):
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(
                json.dumps({"text": t, "topic": (labels or ["a", "b"])[i % len(labels or ["a", "b"])]}) + "\n"
            )
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("qwen2_moe")  # a dense layer and a shared expert: MoE layers are [0, 2, 3]
    return LoadedModel(model, byte_tokenizer(model.config.vocab_size), "tiny:qwen2_moe", "object")


def test_capture_matches_unbatched_engine_runs(tmp_path, tiny):
    texts = _texts(9, lo=1, hi=16)
    data = _jsonl(tmp_path / "d.jsonl", texts)
    out = tmp_path / "trace"
    opts = CaptureOptions(label_field="topic", seq_len=24, batch_size=3, logits=True, token_text=True)
    res = capture(tiny, [str(data)], out, opts)
    assert validate_trace(out) == []
    tr = Trace.open(out)
    assert tr.moe_layers == [0, 2, 3] and tr.manifest["model"]["config_sha256"] == config_fingerprint(
        tiny.model.config
    )
    b = tr.load()
    assert res.tokens == len(b) == tr.num_tokens and res.documents == 9 and res.windows > 9  # some split
    rec = RoutingRecorder(tiny.model, logits=True)
    for doc, text in enumerate(texts):
        rows = b.doc_id == doc
        ref_ids = tiny.tokenizer(text)["input_ids"]
        assert b.token_id[rows].tolist() == ref_ids
        assert b.position[rows].tolist() == list(range(len(ref_ids)))
        assert {tr.labels[c] for c in b.label[rows]} == {["a", "b"][doc % 2]}
        assert [t for t, r in zip(b.token, rows, strict=True) if r] == tiny.tokenizer.convert_ids_to_tokens(
            ref_ids
        )
        # The same windows run alone, without padding or neighbours, give the same routing.
        for s in range(0, len(ref_ids), 24):
            ids = torch.tensor([ref_ids[s : s + 24]])
            alone = rec.run(ids, torch.ones_like(ids))
            sel = np.flatnonzero(rows)[s : s + 24]
            np.testing.assert_array_equal(b.experts[sel], alone["experts"])
            np.testing.assert_allclose(b.weights[sel], alone["weights"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                b.logits[sel].astype(np.float32), alone["logits"].astype(np.float32), atol=2e-3
            )
    ds = tr.manifest["datasets"][0]
    assert (ds["documents"], ds["tokens"], ds["labels"], ds["first_doc"], ds["last_doc"]) == (
        9,
        len(b),
        ["a", "b"],
        0,
        8,
    )


def test_document_loss_equals_the_models_own_loss(tmp_path, tiny):
    """doc_loss is the mean next-token cross-entropy: the model's own ``labels=`` loss per window."""
    texts = _texts(5, seed=7, lo=3, hi=20)
    data = _jsonl(tmp_path / "d.jsonl", texts)
    out = tmp_path / "trace"
    capture(tiny, [str(data)], out, CaptureOptions(seq_len=12, batch_size=3, logits=True))
    assert validate_trace(out) == []
    tr = Trace.open(out)
    assert tr.has_doc_loss and tr.manifest["capture"]["loss"] is True
    losses = tr.document_losses()
    b = tr.load(["doc_id", "doc_loss"])
    for doc, text in enumerate(texts):
        ids = tiny.tokenizer(text)["input_ids"]
        total, count = 0.0, 0
        for s in range(0, len(ids), 12):  # windows of seq_len, each predicting its own next tokens
            w = torch.tensor([ids[s : s + 12]])
            if w.shape[1] < 2:
                continue
            with torch.no_grad():
                ref = tiny.model(input_ids=w, labels=w).loss.item()
            total += ref * (w.shape[1] - 1)
            count += w.shape[1] - 1
        assert losses[doc] == pytest.approx(total / count, rel=1e-4)
        assert np.all(b.doc_loss[b.doc_id == doc] == np.float32(losses[doc]))
    # without --logits or --loss no column is written and the LM head keeps its last-position shortcut
    capture(tiny, [str(data)], tmp_path / "plain", CaptureOptions(batch_size=3))
    assert not Trace.open(tmp_path / "plain").has_doc_loss
    capture(tiny, [str(data)], tmp_path / "only", CaptureOptions(batch_size=3, loss=True))
    only = Trace.open(tmp_path / "only").document_losses()  # one window per document here
    for doc, text in enumerate(texts):
        w = torch.tensor([tiny.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            assert only[doc] == pytest.approx(tiny.model(input_ids=w, labels=w).loss.item(), rel=1e-4)


def test_max_tokens_cuts_the_last_document(tmp_path, tiny):
    texts = _texts(6, seed=1, lo=10, hi=20)
    data = _jsonl(tmp_path / "d.jsonl", texts)
    lengths = [len(tiny.tokenizer(t)["input_ids"]) for t in texts]
    budget = lengths[0] + lengths[1] + 3
    capture(tiny, [str(data)], tmp_path / "t", CaptureOptions(max_tokens=budget, batch_size=2))
    b = Trace.open(tmp_path / "t").load(["doc_id", "position"])
    assert len(b) == budget
    assert np.bincount(b.doc_id).tolist() == [lengths[0], lengths[1], 3]


def test_tokenizer_without_pad_uses_eos(tmp_path, tiny):
    data = _jsonl(tmp_path / "d.jsonl", _texts(4, seed=2))
    nopad = LoadedModel(tiny.model, byte_tokenizer(128, pad=False), "x", "object")
    capture(nopad, [str(data)], tmp_path / "t", CaptureOptions(batch_size=4))
    assert validate_trace(tmp_path / "t") == []
    bare = LoadedModel(tiny.model, byte_tokenizer(128, pad=False, eos=False), "x", "object")
    with pytest.raises(ConfigError, match="has neither a pad token nor an EOS token"):
        capture(bare, [str(data)], tmp_path / "t2")


def test_existing_output_needs_resume_or_overwrite(tmp_path, tiny):
    data = _jsonl(tmp_path / "d.jsonl", _texts(3, seed=3))
    out = tmp_path / "t"
    capture(tiny, [str(data)], out)
    with pytest.raises(TraceError, match="already exists and is not empty; pass `resume`"):
        capture(tiny, [str(data)], out)
    capture(tiny, [str(data)], out, CaptureOptions(overwrite=True))
    # Resuming a complete trace with the same settings adds nothing.
    res = capture(tiny, [str(data)], out, CaptureOptions(resume=True))
    assert res.tokens == 0 and res.resumed_after_document == 2 and validate_trace(out) == []
    with pytest.raises(ConfigError, match=r"capture setting 'seq_len' was 256, now 16 \(set by `seq_len`\)"):
        capture(tiny, [str(data)], out, CaptureOptions(resume=True, seq_len=16))
    with pytest.raises(
        ConfigError, match=r"capture setting 'data\[0\]\.label_field' was null, now \"topic\""
    ):
        capture(tiny, [str(data)], out, CaptureOptions(resume=True, label_field="topic"))
    _jsonl(data, _texts(3, seed=4))
    with pytest.raises(ConfigError, match=r"'data\[0\]\.(bytes|sha256)'.*set by DATA \(the data changed\)"):
        capture(tiny, [str(data)], out, CaptureOptions(resume=True))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(TraceError, match=r"`resume`: the directory is not empty but has no manifest\.json"):
        capture(tiny, [str(data)], tmp_path / "other", CaptureOptions(resume=True))
    with pytest.raises(ConfigError, match="`resume` and `overwrite` cannot be used together"):
        capture(tiny, [str(data)], out, CaptureOptions(resume=True, overwrite=True))


# --------------------------------------------------------------------------- CLI
def _cli(*args):
    return CliRunner().invoke(app, ["capture", *map(str, args)])


def test_cli_capture_json(tmp_path, monkeypatch):
    from moescope.capture import commands

    monkeypatch.setattr(commands, "progress_enabled", lambda: True)  # as if stderr were a terminal
    data = _jsonl(tmp_path / "d.jsonl", _texts(5, seed=5))
    out = tmp_path / "new" / "t"  # --resume on a missing directory starts a new capture
    res = _cli(
        "tiny:mixtral",
        data,
        "-o",
        out,
        "--label-field",
        "topic",
        "--lookahead",
        "1",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--resume",
        "--json",
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)  # stdout holds exactly one JSON document; the bar went to stderr
    assert "tok/s" in res.stderr and f"{doc['tokens']:,} tokens" in res.stderr
    assert doc["documents"] == 5 and doc["routing"]["family"] == "mixtral"
    tr = Trace.open(out)
    assert tr.lookahead_columns == ["lookahead_gate_input_d1", "lookahead_residual_d1"]
    assert tr.labels == ["a", "b"] and tr.num_tokens == doc["tokens"] and validate_trace(out) == []


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (["--device", "tpu"], ConfigError, "--device must be one of auto, cpu, cuda or cuda:N, got 'tpu'"),
        (
            ["--dtype", "int8"],
            ConfigError,
            "--dtype must be one of auto, float32, bfloat16, float16, got 'int8'",
        ),
        (["--text-field", "body"], DataError, "unknown text field 'body'; available fields: text, topic"),
        (
            ["--label-field", "domain"],
            DataError,
            "unknown label field 'domain'; available fields: text, topic",
        ),
        (["--batch-size", "0"], ConfigError, "--batch-size must be >= 1, got 0"),
        (["--lookahead-m", "3"], ConfigError, "--lookahead-m needs --lookahead D"),
    ],
)
def test_cli_errors_name_the_option(tmp_path, args, error, message):
    data = _jsonl(tmp_path / "d.jsonl", _texts(2))
    res = _cli("tiny:mixtral", data, "-o", tmp_path / "t", *args)
    assert res.exit_code == 1
    assert isinstance(res.exception, error) and message in as_flags(str(res.exception))


def test_cli_empty_data_and_dense_model(tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    res = _cli("tiny:mixtral", empty, "-o", tmp_path / "t")
    assert res.exit_code == 1 and isinstance(res.exception, DataError)
    assert "no documents in" in str(res.exception) and not (tmp_path / "t").exists()

    def dense(device, dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(
            "llama",
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
        return AutoModelForCausalLM.from_config(cfg), byte_tokenizer(128)

    monkeypatch.setitem(runner_mod.MODEL_ALIASES, "test-dense", dense)
    data = _jsonl(tmp_path / "d.jsonl", _texts(2))
    res = _cli("test-dense", data, "-o", tmp_path / "t")
    assert res.exit_code == 1 and isinstance(res.exception, ConfigError)
    assert "llama" in str(res.exception)


# --------------------------------------------------------------------------- kill and resume
def _run_cli(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "moescope.cli", "capture", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_kill_and_resume_equals_an_uninterrupted_capture(tmp_path, monkeypatch, capsys):
    texts = _texts(120, seed=7, lo=5, hi=60)
    data = _jsonl(tmp_path / "d.jsonl", texts, labels=["x", "y", "z"])
    common = [
        "--label-field",
        "topic",
        "--seq-len",
        "32",
        "--batch-size",
        "1",
        "--shard-rows",
        "200",
        "--device",
        "cpu",
        "--max-tokens",
        "5000",
    ]
    out = tmp_path / "killed"
    proc = _run_cli("tiny:mixtral", data, "-o", out, *common)
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(manifest.read_text())["shards"]:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.01)
        assert proc.poll() is None, "the capture finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    print(f"killed after {time.monotonic() - deadline + 300:.1f}s")
    partial = Trace.open(out, allow_incomplete=True)
    assert not partial.complete and partial.manifest["shards"]
    killed_after = partial.manifest["progress"]["last_document"]

    res = _cli("tiny:mixtral", data, "-o", out, *common, "--resume", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["resumed_after_document"] == killed_after
    ref = tmp_path / "ref"
    assert _cli("tiny:mixtral", data, "-o", ref, *common).exit_code == 0
    assert validate_trace(out) == [] and validate_trace(ref) == []
    a, b = Trace.open(out).to_arrow(), Trace.open(ref).to_arrow()
    assert a.num_rows == b.num_rows == 5000
    for name in a.column_names:
        col_a, col_b = a[name], b[name]
        if name == "label":
            col_a, col_b = col_a.cast("string"), col_b.cast("string")
        assert col_a.equals(col_b), name
    assert Trace.open(out).manifest["datasets"][0]["tokens"] == 5000

    # A resume with other settings is refused, with one "Error:" line naming the setting.
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "moescope",
            "capture",
            "tiny:mixtral",
            str(data),
            "-o",
            str(out),
            *common[:-2],
            "--max-tokens",
            "6000",
            "--resume",
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        cli_main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.strip().splitlines()[-1].startswith("Error: ") and "'max_tokens' was 5000, now 6000" in err


def test_cli_loads_a_saved_model_directory(tmp_path):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "model")
    byte_tokenizer(model.config.vocab_size).save_pretrained(tmp_path / "model")
    data = _jsonl(tmp_path / "d.jsonl", _texts(3, seed=8))
    res = _cli(tmp_path / "model", data, "-o", tmp_path / "t", "--device", "cpu", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    tr = Trace.open(tmp_path / "t")
    assert tr.manifest["model"]["source"] == "local" and tr.manifest["model"]["model_type"] == "mixtral"
    assert tr.manifest["tokenizer"]["vocab_size"] == 128
    b = tr.load(["doc_id", "token_id", "experts"])
    rec = RoutingRecorder(model)
    for doc in range(3):
        ids = torch.from_numpy(b.token_id[b.doc_id == doc].astype(np.int64))[None]
        np.testing.assert_array_equal(
            b.experts[b.doc_id == doc], rec.run(ids, torch.ones_like(ids))["experts"]
        )
    res = _cli(tmp_path / "nothing-here", data, "-o", tmp_path / "t2", "--device", "cpu")
    assert res.exit_code == 1 and isinstance(res.exception, ConfigError)
    assert "nothing-here: cannot load its tokenizer" in str(res.exception)


@pytest.mark.parametrize(
    ("name", "family", "experts", "top_k", "moe_layers"),
    [
        ("mini-deepseek-v2-lite", "deepseek_v2", 64, 6, list(range(1, 27))),
        ("mini-mixtral-8x7b", "mixtral", 8, 2, list(range(32))),
    ],
)
def test_seed_miniatures_capture_end_to_end_by_name(tmp_path, name, family, experts, top_k, moe_layers):
    """Seed miniatures are addressable by name and capture with the seed model's routing shape."""
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"text": "def f(x):\n    return x + 1\n"})
        + "\n"
        + json.dumps({"text": "In the beginning"})
        + "\n"
    )
    result = CliRunner().invoke(app, ["capture", name, str(data), "-o", str(tmp_path / "t"), "--json"])
    assert result.exit_code == 0, result.output
    tr = Trace.open(tmp_path / "t")
    assert (tr.routing.family, tr.num_experts, tr.top_k, tr.moe_layers) == (
        family,
        experts,
        top_k,
        moe_layers,
    )
    assert validate_trace(tmp_path / "t") == []
    assert tr.num_tokens == sum(
        len(byte_tokenizer(512)(t)["input_ids"])
        for t in ["def f(x):\n    return x + 1\n", "In the beginning"]
    )


def test_bundled_names_are_registered():
    assert {"tiny-mixtral", "tiny-finegrained", "mini-qwen3-30b-a3b", "mini-tinymistral-6x248m"} <= set(
        runner_mod.MODEL_ALIASES
    )
