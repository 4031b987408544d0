"""The output guard: never delete what is not ours, never write into an input, one writer at a time.

Commands run in this process (``run_here``); the exit statuses of the executable are in test_exit_codes.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from cli_helpers import run_here as run
from conftest import make_rows
from moescope.errors import ConfigError, MoescopeError
from moescope.interop import import_log
from moescope.trace import RoutingSpec, Trace, TraceWriter
from moescope.trace.outputs import MARKER, claim, is_predictor_file, lock_path, locked
from moescope.trace.synthetic import write_synthetic_trace

SPEC = RoutingSpec(num_experts=8, top_k=2, moe_layers=[0, 1, 2])


def _replay(path, n=20, seed=0):
    rng = np.random.default_rng(seed)
    a = np.argsort(rng.random((n, 3, 8)), axis=-1)[..., :2].astype(np.int32)
    np.save(path, a)
    return path


def _notes(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "paper.pdf").write_bytes(b"%PDF-1.4 not ours")
    return folder


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("tr") / "t"
    write_synthetic_trace(path, n_tokens=2000, num_layers=3, doc_len=100, seed=4)
    return path


# --------------------------------------------------------------------------- import
def test_import_overwrite_refuses_a_folder_it_did_not_write(tmp_path):
    data = _replay(tmp_path / "r.npy")
    out = _notes(tmp_path / "papers")
    res = run("import", "vllm-replay", data, "-o", out, "--num-experts", 8, "--overwrite")
    assert res.returncode == 1 and str(out) in res.stderr and "not a moescope trace" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "paper.pdf"]


def test_import_overwrite_replaces_its_own_trace_but_not_notes_inside(tmp_path):
    data = _replay(tmp_path / "r.npy")
    out = tmp_path / "t"
    import_log("vllm-replay", data, out, num_experts=8)
    import_log("vllm-replay", _replay(tmp_path / "r2.npy", n=30, seed=1), out, num_experts=8, overwrite=True)
    assert Trace.open(out).num_tokens == 30
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"notes\.txt"):
        import_log("vllm-replay", data, out, num_experts=8, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and Trace.open(out).num_tokens == 30


def test_killed_import_leftovers_are_removed_by_the_next_import(tmp_path):
    out = tmp_path / "t"
    left = tmp_path / ".t.0123abcd.incomplete"
    TraceWriter.create(left, SPEC)  # what a SIGKILL between create and rename leaves
    foreign = tmp_path / ".t.89abcdef.incomplete"
    _notes(foreign)  # same pattern, but not trace files: never touched
    import_log("vllm-replay", _replay(tmp_path / "r.npy"), out, num_experts=8)
    assert not left.exists() and (foreign / "notes.txt").exists()


# --------------------------------------------------------------------------- capture
def test_capture_overwrite_never_deletes_its_input(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    data = out / "data.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    (out / "data.parquet").write_bytes(b"PAR1 a data set")
    res = run("capture", "tiny:mixtral", data, "-o", out, "--overwrite", "--device", "cpu")
    assert res.returncode == 1 and "holds the input" in res.stderr
    assert data.exists() and (out / "data.parquet").exists()
    other = tmp_path / "d.jsonl"
    other.write_text(data.read_text())
    res = run("capture", "tiny:mixtral", other, "-o", out, "--overwrite", "--device", "cpu")
    assert res.returncode == 1 and "not a moescope trace" in res.stderr and (out / "data.parquet").exists()


def test_resume_deletes_only_moescope_orphans(tmp_path):
    path = tmp_path / "t"
    w = TraceWriter.create(path, SPEC, shard_rows=4)
    w.append(label="a", **make_rows(0, 5))
    w.commit(0)
    (path / "part-00007.parquet").write_bytes(b"orphan shard")  # moescope's name, not listed
    (path / ".part-00001.parquet.0123abcd.tmp").write_bytes(b"half a shard")
    (path / "my-data.parquet").write_bytes(b"user data")
    (path / "scratch.tmp").write_bytes(b"user temp")
    TraceWriter.resume(path)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["manifest.json", "my-data.parquet", "part-00000.parquet", "scratch.tmp"]


def test_writer_overwrite_refuses_a_folder_without_manifest(tmp_path):
    out = _notes(tmp_path / "x")
    (out / "results.parquet").write_bytes(b"not ours")
    with pytest.raises(MoescopeError, match="not a moescope trace"):
        TraceWriter.create(out, SPEC, overwrite=True)
    assert (out / "results.parquet").exists()


def test_failed_capture_does_not_block_a_plain_rerun(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "fine text here"}) + "\n" + "{broken json\n")
    out = tmp_path / "cap"
    res = run("capture", "tiny:mixtral", data, "-o", out, "--device", "cpu", "--batch-size", "1")
    assert res.returncode == 1 and "Error:" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()
    data.write_text(json.dumps({"text": "fine text here"}) + "\n")
    res = run("capture", "tiny:mixtral", data, "-o", out, "--device", "cpu")
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- split
def test_split_never_writes_into_its_input(trace, tmp_path):
    before = sorted(p.name for p in trace.iterdir())
    for target in (trace, trace / "sub", trace.parent):
        res = run("split", trace, "-o", target, "--overwrite")
        assert res.returncode == 1 and "input" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert sorted(p.name for p in trace.iterdir()) == before
    Trace.open(trace)


def test_split_overwrite_replaces_only_its_own_split(trace, tmp_path):
    out = tmp_path / "s"
    assert run("split", trace, "-o", out).returncode == 0
    assert json.loads((out / MARKER).read_text())["kind"] == "split"
    res = run("split", trace, "-o", out)
    assert res.returncode == 1 and "--overwrite" in res.stderr
    assert run("split", trace, "-o", out, "--overwrite", "--seed", "3").returncode == 0
    notes = _notes(tmp_path / "n")
    res = run("split", trace, "-o", notes, "--overwrite")
    assert res.returncode == 1 and "moescope" in res.stderr and (notes / "notes.txt").exists()


# --------------------------------------------------------------------------- predict fit
def test_predict_fit_output_rules(trace, tmp_path):
    res = run("predict", "fit", trace, "-p", "frequency", "-o", trace / "manifest.json", "--overwrite")
    assert res.returncode == 1 and "input" in res.stderr
    Trace.open(trace)
    other = tmp_path / "model.npz"
    other.write_bytes(b"someone's file")
    res = run("predict", "fit", trace, "-p", "frequency", "-o", other)
    assert res.returncode == 1 and "--overwrite" in res.stderr
    res = run("predict", "fit", trace, "-p", "frequency", "-o", other, "--overwrite")
    assert res.returncode == 1 and "predictor" in res.stderr and other.read_bytes() == b"someone's file"
    good = tmp_path / "good.npz"
    assert run("predict", "fit", trace, "-p", "frequency", "-o", good).returncode == 0
    assert is_predictor_file(good)
    assert run("predict", "fit", trace, "-p", "frequency", "-o", good, "--overwrite").returncode == 0
    res = run("predict", "fit", trace, "-p", "frequency", "-o", tmp_path)
    assert res.returncode == 1 and "is a directory" in res.stderr


# --------------------------------------------------------------------------- analyze
def test_analyze_overwrite_rules(trace, tmp_path):
    out = tmp_path / "a"
    assert run("analyze", trace, "-o", out, "-a", "load").returncode == 0
    res = run("analyze", trace, "-o", out, "-a", "load")
    assert res.returncode == 1 and "--overwrite" in res.stderr
    assert run("analyze", trace, "-o", out, "-a", "entropy", "--overwrite").returncode == 0
    files = json.loads((out / MARKER).read_text())["files"]
    assert "summary.json" in files and not any(f.startswith("load") for f in files)
    notes = _notes(tmp_path / "n")
    res = run("analyze", trace, "-o", notes, "-a", "load", "--overwrite")
    assert res.returncode == 1 and "leaves this alone" in res.stderr
    assert sorted(p.name for p in notes.iterdir()) == ["notes.txt", "paper.pdf"]
    f = tmp_path / "file"
    f.write_text("x")
    res = run("analyze", trace, "-o", f, "-a", "load")
    assert res.returncode == 1 and "not a directory" in res.stderr


# --------------------------------------------------------------------------- locking
def test_a_second_writer_gets_a_clear_error(tmp_path):
    out = tmp_path / "t"
    with locked(out):
        res = run("import", "vllm-replay", _replay(tmp_path / "r.npy"), "-o", out, "--num-experts", 8)
    assert res.returncode == 1 and "another moescope run is writing here" in res.stderr
    assert f"pid {os.getpid()}" in res.stderr
    assert not lock_path(out).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "t"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    lock_path(out).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    import_log("vllm-replay", _replay(tmp_path / "r.npy"), out, num_experts=8)
    assert Trace.open(out).num_tokens == 20 and not lock_path(out).exists()
    # another host's lock cannot be checked, so it is respected
    lock_path(out).write_text(json.dumps({"pid": pid, "host": "elsewhere", "started": "then"}))
    with pytest.raises(ConfigError, match="elsewhere"):
        import_log("vllm-replay", _replay(tmp_path / "r.npy"), out, num_experts=8, overwrite=True)


def test_two_concurrent_overwrites_one_wins_one_is_refused(tmp_path):
    out = tmp_path / "t"
    data = _replay(tmp_path / "r.npy", n=20)
    with claim(out, "trace", overwrite=True):
        with pytest.raises(ConfigError, match="another moescope run"):
            import_log("vllm-replay", data, out, num_experts=8, overwrite=True)
    import_log("vllm-replay", data, out, num_experts=8, overwrite=True)


# --------------------------------------------------------------------------- simulate, ablate, export, seed 004
def _cli(*args: object) -> tuple[int, str]:
    """``moescope ARGS`` in this process (exit statuses are tested through the executable elsewhere)."""
    from moescope.cli import run as cli_run

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli_run([str(a) for a in args])
    return rc, err.getvalue()


def _guarded(args: list, out, foreign, inputs_inside: list) -> None:
    """The rules every writing command shares, for ``args + ["-o", out]``."""
    rc, err = _cli(*args, "-o", foreign)  # not ours, no --overwrite
    assert rc == 1 and "--overwrite" in err and str(foreign) in err, err
    before = {p.name: p.read_bytes() for p in ([foreign] if foreign.is_file() else foreign.iterdir())}
    rc, err = _cli(*args, "-o", foreign, "--overwrite")  # not ours: refused even so, nothing deleted
    assert rc == 1 and "leaves this alone" in err, err
    after = {p.name: p.read_bytes() for p in ([foreign] if foreign.is_file() else foreign.iterdir())}
    assert after == before
    for target in inputs_inside:  # never into an input
        rc, err = _cli(*args, "-o", target, "--overwrite")
        assert rc == 1 and "input" in err and "Traceback" not in err, err
    with locked(out):  # one writer at a time
        rc, err = _cli(*args, "-o", out, "--overwrite")
    assert rc == 1 and "another moescope run is writing here" in err, err


def test_simulate_output_rules(trace, tmp_path):
    args = ["simulate", trace, "--expert-params", 1000, "--cache-fraction", 0.5]
    out = tmp_path / "sim"
    _guarded(args, out, _notes(tmp_path / "n"), [trace, trace / "sub"])
    rc, err = _cli(*args, "-o", out)
    assert rc == 0, err
    assert json.loads((out / MARKER).read_text())["kind"] == "simulation"
    rc, err = _cli(*args, "-o", out)
    assert rc == 1 and "--overwrite" in err
    rc, err = _cli(*args, "-o", out, "--overwrite", "--policy", "lfu")
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["policy"].lower().startswith("lfu")
    Trace.open(trace)


def test_ablate_output_rules(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    args = ["ablate", "tiny:mixtral", data, "--device", "cpu"]
    # every refusal comes before the model is loaded: cheap, and nothing is computed in vain
    _guarded(args, tmp_path / "ab", _notes(tmp_path / "n"), [data, tmp_path])
    assert data.read_text() == json.dumps({"text": "hello world"}) + "\n"


def test_export_file_output_rules(trace, tmp_path):
    args = ["export", "router-logger-json", trace]
    foreign = tmp_path / "theirs.json"
    foreign.write_text('{"mine": true}')
    out = tmp_path / "r.json"
    _guarded(args, out, foreign, [trace / "manifest.json", trace / "x.json"])
    rc, err = _cli(*args, "-o", out)
    assert rc == 0, err
    first = out.read_bytes()
    rc, err = _cli(*args, "-o", out)
    assert rc == 1 and "--overwrite" in err
    rc, err = _cli(*args, "-o", out, "--overwrite", "--documents", "0")
    assert rc == 0, err
    assert out.read_bytes() != first  # replaced: it was provably ours
    out.write_text(out.read_text() + " ")  # the user edits it: no longer provably ours
    rc, err = _cli(*args, "-o", out, "--overwrite")
    assert rc == 1 and "leaves this alone" in err and out.read_text().endswith(" ")
    rc, err = _cli(*args, "-o", tmp_path)
    assert rc == 1 and "is a directory" in err


def test_export_folder_output_rules(trace, tmp_path):
    args = ["export", "token-journeys-jsonl", trace, "--documents", "0", "--tokens", 0, 3]
    out = tmp_path / "j"
    _guarded(args, out, _notes(tmp_path / "n"), [trace, trace / "j"])
    rc, err = _cli(*args, "-o", out)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == [
        f"p0_token_{i}.jsonl" for i in range(3)
    ]
    rc, err = _cli(*args, "-o", out)
    assert rc == 1 and "--overwrite" in err
    rc, err = _cli(*args[:-2], 1, 2, "-o", out, "--overwrite")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == ["p0_token_1.jsonl"]


def _seed004_raw(path, problems=(0,), tokens=4, layers=2):
    recs = [
        {"problem_id": p, "layer": layer, "token_idx": t, "experts": [layer, (t + 1) % 8]}
        for p in problems
        for t in range(tokens)
        for layer in range(layers)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_seed004_extract_adds_files_and_replaces_only_its_own(tmp_path, monkeypatch):
    # like the seed, the default output is the current folder, which holds the user's own files
    work = _notes(tmp_path / "work")
    raw = _seed004_raw(work / "raw.jsonl")
    monkeypatch.chdir(work)
    args = ["predict", "seed004", "extract", raw.name, "-p", 0, "-t", 0, 3]
    rc, err = _cli(*args)
    assert rc == 0, err
    assert (work / "p0_token_2.jsonl").is_file() and (work / "notes.txt").read_text() == "my notes"
    rc, err = _cli(*args)
    assert rc == 1 and "--overwrite" in err and "p0_token_0.jsonl" in err
    (work / "p0_token_3.jsonl").write_text("the user's own file\n")
    rc, err = _cli(*args[:-2], 0, 4, "--overwrite")  # p0_token_3.jsonl is not listed as ours
    assert rc == 1 and "leaves this alone" in err and "p0_token_3.jsonl" in err
    assert (work / "p0_token_3.jsonl").read_text() == "the user's own file\n"
    rc, err = _cli(*args, "--overwrite")  # its own files: replaced
    assert rc == 0, err
    assert (work / "raw.jsonl").read_bytes() == raw.read_bytes() and (work / "paper.pdf").is_file()
    # never into its input: an output name that is the input file itself
    named = _seed004_raw(tmp_path / "p0_token_1.jsonl")
    rc, err = _cli("predict", "seed004", "extract", named, "-p", 0, "-t", 0, 3, "-o", tmp_path, "--overwrite")
    assert rc == 1 and "input" in err
    with locked(work):
        rc, err = _cli(*args, "--overwrite")
    assert rc == 1 and "another moescope run is writing here" in err


def test_seed004_rules_files_are_guarded(tmp_path):
    raw = _seed004_raw(tmp_path / "raw.jsonl", tokens=6)
    j = tmp_path / "j"
    assert _cli("predict", "seed004", "extract", raw, "-p", 0, "-t", 0, 6, "-o", j)[0] == 0
    journeys = sorted(str(p) for p in j.glob("p0_token_*.jsonl"))
    rules = tmp_path / "rules.json"
    foreign = tmp_path / "theirs.json"
    foreign.write_text("{}")
    create = ["predict", "seed004", "create-rules", *journeys]
    _guarded(create, rules, foreign, [journeys[0]])
    assert _cli(*create, "-o", rules)[0] == 0
    assert _cli(*create, "-o", rules)[0] == 1
    assert _cli(*create, "-o", rules, "--overwrite")[0] == 0
    res = tmp_path / "res.json"
    evaluate = ["predict", "seed004", "evaluate-rules", "-r", rules, "-t", *journeys]
    _guarded(evaluate, res, foreign, [rules])
    assert _cli(*evaluate, "-o", res)[0] == 0 and _cli(*evaluate, "-o", res, "--overwrite")[0] == 0


def test_predict_eval_figures_are_guarded(trace, tmp_path):
    model = tmp_path / "m.npz"
    assert _cli("predict", "fit", trace, "-p", "frequency", "-o", model)[0] == 0
    args = ["predict", "eval", model, trace, "--n-boot", 5, "--figures"]
    notes = _notes(tmp_path / "n")
    rc, err = _cli(*args, notes)
    assert rc == 1 and "--overwrite" in err
    rc, err = _cli(*args, notes, "--overwrite")
    assert (
        rc == 1
        and "leaves this alone" in err
        and sorted(p.name for p in notes.iterdir())
        == [
            "notes.txt",
            "paper.pdf",
        ]
    )
    rc, err = _cli(*args, trace / "figs")
    assert rc == 1 and "input" in err
    figs = tmp_path / "figs"
    assert _cli(*args, figs)[0] == 0 and any(figs.glob("*.png"))
    assert _cli(*args, figs)[0] == 1
    rc, err = _cli(*args, figs, "--overwrite")
    assert rc == 0, err


def test_diff_output_rules(trace, tmp_path):
    args = ["diff", trace, trace, "--permutations", 10]
    out = tmp_path / "diff"
    _guarded(args, out, _notes(tmp_path / "n"), [trace, trace / "sub"])
    rc, err = _cli(*args, "-o", out)
    assert rc == 0, err
    assert json.loads((out / MARKER).read_text())["kind"] == "folder"
    rc, err = _cli(*args, "-o", out)
    assert rc == 1 and "--overwrite" in err
    rc, err = _cli(*args, "-o", out, "--overwrite")
    assert rc == 0, err
    assert (out / "experts.csv").is_file()
    Trace.open(trace)


def test_evaluate_output_rules(tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"query": "a b", "choices": [" c", " d"], "gold": 0}) + "\n")
    args = ["evaluate", "tiny:mixtral", f"mc={mc}", "--device", "cpu", "--bootstrap", 10, "--no-figures"]
    # every refusal but the lock's comes before the model is loaded
    _guarded(args, tmp_path / "ev", _notes(tmp_path / "n"), [mc, tmp_path])
    rc, err = _cli(*args, "-o", tmp_path / "ev")
    assert rc == 0, err
    rc, err = _cli(*args, "-o", tmp_path / "ev")
    assert rc == 1 and "--overwrite" in err
    assert mc.read_text().startswith('{"query"')
