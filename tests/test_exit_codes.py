"""Exit statuses of the real ``moescope`` executable: 0 success, 1 failure, 2 usage, 130 Ctrl-C.

Run through a subprocess (CliRunner's standalone mode would hide what ``main()`` returns).
"""

from __future__ import annotations

import json
import signal

import pytest

from cli_helpers import run, start, wait_for
from moescope.trace import Trace, validate_trace
from moescope.trace.outputs import MARKER
from moescope.trace.synthetic import write_synthetic_trace


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "t"
    write_synthetic_trace(path, n_tokens=3000, num_layers=3, doc_len=100, seed=1)
    return path


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1] if err.strip() else ""


def test_success_is_zero(good):
    res = run("validate", good)
    assert res.returncode == 0, res.stderr
    res = run("validate", good, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["ok"] is True


@pytest.mark.parametrize("as_json", [False, True])
def test_failed_validate_is_one(tmp_path, good, as_json):
    missing = tmp_path / "nope"
    flags = ["--json"] if as_json else []
    res = run("validate", missing, *flags)
    assert res.returncode == 1
    if as_json:
        assert json.loads(res.stdout)["ok"] is False
    # a damaged shard: validate fails, and `validate X && analyze X` would stop here
    broken = tmp_path / "broken"
    write_synthetic_trace(broken, n_tokens=500, num_layers=2, doc_len=50, seed=2)
    shard = broken / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = run("validate", broken, *flags)
    assert res.returncode == 1 and "SHA-256" in (res.stdout + res.stderr)


def test_bad_input_is_one_with_a_sentence(tmp_path):
    res = run("info", tmp_path / "nope")
    assert res.returncode == 1
    assert _last_line(res.stderr).startswith("Error: ") and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "--bogus"],
        ["no-such-command"],
        ["split", "x"],  # missing required --output
        ["predict", "eval"],
        ["analyze", "x", "--permutations", "many"],
    ],
)
def test_usage_errors_are_two(args):
    res = run(*args)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr


def test_help_is_zero():
    assert run("--help").returncode == 0
    assert run("predict", "fit", "--help").returncode == 0


def _interrupt(proc, ready, sig) -> str:
    """Send ``sig`` once ``ready()`` holds; returns stderr after the process ended."""
    try:
        assert wait_for(ready, proc), "the command ended before it could be interrupted"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return err


@pytest.mark.slow
def test_sigterm_during_analyze_is_130_and_names_the_partial_folder(tmp_path):
    """SIGTERM (kill, timeout, a batch scheduler) ends a run like Ctrl-C: 130 and one line."""
    trace = tmp_path / "t"
    write_synthetic_trace(trace, n_tokens=400_000, num_layers=8, num_experts=32, top_k=4, logits=True, seed=3)
    out = tmp_path / "analysis"
    proc = start("analyze", trace, "-o", out, "--permutations", "2000")
    # interrupt once a first result file is in place (before that, the folder would be removed)
    wrote = lambda: out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir())  # noqa: E731
    err = _interrupt(proc, wrote, signal.SIGTERM)
    assert proc.returncode == 130, err
    last = _last_line(err)
    assert last.startswith("Interrupted; left a partial analysis folder") and str(out) in last
    assert "Traceback" not in err
    marker = json.loads((out / MARKER).read_text())
    assert marker["status"] == "incomplete"
    # the partial folder is recognised as moescope's: a rerun with --overwrite replaces it
    res = run("analyze", trace, "-o", out, "-a", "load")
    assert res.returncode == 1 and "--overwrite" in res.stderr
    res = run("analyze", trace, "-o", out, "-a", "load", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / MARKER).read_text())["status"] == "complete"


@pytest.mark.slow
def test_sigterm_then_ctrl_c_during_capture_leave_a_resumable_trace(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " + "word " * 40}) + "\n" for i in range(40)))
    out = tmp_path / "cap"
    common = ["--seq-len", "32", "--batch-size", "1", "--shard-rows", "64", "--device", "cpu"]
    shards = lambda: len(json.loads((out / "manifest.json").read_text())["shards"])  # noqa: E731
    for sig, flags in ((signal.SIGTERM, []), (signal.SIGINT, ["--resume"])):
        before = shards() if flags else 0
        proc = start("capture", "tiny:mixtral", data, "-o", out, *common, *flags)
        err = _interrupt(proc, lambda b=before: shards() > b, sig)
        assert proc.returncode == 130, (sig, err)
        last = _last_line(err)
        assert last.startswith("Interrupted; left a resumable trace in") and "--resume" in last, last
        assert "Traceback" not in err
        partial = Trace.open(out, allow_incomplete=True)
        assert not partial.complete and partial.num_tokens > 0
        assert any("incomplete" in p for p in validate_trace(out))
        with pytest.raises(Exception, match="incomplete"):
            Trace.open(out)
    res = run("capture", "tiny:mixtral", data, "-o", out, *common, "--resume")
    assert res.returncode == 0, res.stderr
    done = Trace.open(out)
    assert done.complete and len(done.documents()) == 40 and validate_trace(out) == []
