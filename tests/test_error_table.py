"""A table of bad inputs walked through every command: ``Error:`` and a sentence, never a traceback.

Each case runs ``moescope.cli.run`` in this process (the exit statuses of the executable itself are
tested in test_exit_codes.py) and asserts exit status 1, a last stderr line starting with ``Error:``
that names the file, field or option at fault, and no ``Traceback``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import run_here as run
from moescope.trace.synthetic import write_synthetic_trace


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("table")
    write_synthetic_trace(root / "good", n_tokens=2000, num_layers=3, doc_len=100, logits=True, seed=9)
    assert run("predict", "fit", root / "good", "-p", "frequency", "-o", root / "good.npz").returncode == 0
    return root


def _copy_trace(base: Path, name: str) -> Path:
    import shutil

    dst = base / name
    if not dst.exists():
        shutil.copytree(base / "good", dst)
    return dst


def damaged_parquet(base: Path) -> tuple[Path, str]:
    t = _copy_trace(base, "damaged")
    shard = t / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return t, "part-00000.parquet"


def wrong_types(base: Path) -> tuple[Path, str]:
    t = _copy_trace(base, "types")
    m = json.loads((t / "manifest.json").read_text())
    m["routing"]["num_experts"] = 8.5
    (t / "manifest.json").write_text(json.dumps(m))
    return t, "routing.num_experts"


def routing_not_object(base: Path) -> tuple[Path, str]:
    t = _copy_trace(base, "routing-list")
    m = json.loads((t / "manifest.json").read_text())
    m["routing"] = [8, 2]
    (t / "manifest.json").write_text(json.dumps(m))
    return t, "'routing'"


def manifest_not_utf8(base: Path) -> tuple[Path, str]:
    t = _copy_trace(base, "latin1")
    (t / "manifest.json").write_bytes(b'{"format": "moescope-trace", "x": "\xe9\xff"}')
    return t, "manifest.json"


TRACE_DAMAGE = [damaged_parquet, wrong_types, routing_not_object, manifest_not_utf8]


def _trace_commands(t: Path, base: Path) -> list[list[object]]:
    return [
        ["info", t],
        ["analyze", t, "-o", base / f"a-{t.name}", "-a", "load"],
        ["split", t, "-o", base / f"s-{t.name}"],
        ["predict", "fit", t, "-p", "frequency", "-o", base / f"m-{t.name}.npz"],
        ["predict", "eval", base / "good.npz", t],
        ["export", "seed002-json", t, "-o", base / f"e-{t.name}.json"],
    ]


def _assert_sentence(res, names: str) -> None:
    err = res.stderr.strip()
    assert res.returncode == 1, (res.returncode, err)
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("Error: ") and names in last, last


@pytest.mark.slow
@pytest.mark.parametrize("damage", TRACE_DAMAGE, ids=lambda f: f.__name__)
def test_damaged_traces_through_every_reading_command(base, damage):
    t, names = damage(base)
    for args in _trace_commands(t, base):
        _assert_sentence(run(*args), names)
    res = run("validate", t)  # validate lists problems (not an Error: line) and exits 1
    assert res.returncode == 1 and names in res.stdout and "Traceback" not in res.stderr


def _predictor_file(base: Path, name: str, edit) -> Path:
    with np.load(base / "good.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays["__header__"].tobytes().decode())
    header, arrays = edit(header, arrays)
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    path = base / name
    np.savez(path, **arrays)
    return path


def _bad_shape(header, arrays):
    key = next(k for k in arrays if k != "__header__")
    arrays[key] = np.zeros((3, 3, 3, 3), np.float32)
    return header, arrays


PREDICTOR_CASES = {
    "list-header": lambda h, a: ([h], a),
    "string-state": lambda h, a: ({**h, "state": "fitted"}, a),
    "wrong-array-shape": _bad_shape,
    "no-predictor-name": lambda h, a: ({k: v for k, v in h.items() if k != "predictor"}, a),
}


@pytest.mark.parametrize("case", list(PREDICTOR_CASES))
def test_malformed_predictor_files(base, case):
    path = _predictor_file(base, f"{case}.npz", PREDICTOR_CASES[case])
    _assert_sentence(run("predict", "eval", path, base / "good"), path.name)


def test_other_bad_inputs(base, tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    _assert_sentence(run("predict", "eval", empty, base / "good"), "empty.npz")
    _assert_sentence(
        run(
            "predict",
            "fit",
            base / "good",
            "-p",
            "frequency",
            "--param",
            "nosuch=1",
            "-o",
            tmp_path / "x.npz",
        ),
        "nosuch",
    )
    _assert_sentence(run("predict", "eval", base / "good.npz", base / "good", "--n-boot", "0"), "--n-boot")
    # -o of the wrong kind
    f = tmp_path / "plain-file"
    f.write_text("x")
    _assert_sentence(run("analyze", base / "good", "-o", f, "-a", "load"), "plain-file")
    _assert_sentence(run("split", base / "good", "-o", f), "plain-file")
    _assert_sentence(
        run("predict", "fit", base / "good", "-p", "frequency", "-o", tmp_path), "is a directory"
    )
    # an output location that cannot be written (below a file; /proc refuses new entries even to root)
    _assert_sentence(run("analyze", base / "good", "-o", f / "sub", "-a", "load"), "plain-file")
    _assert_sentence(run("split", base / "good", "-o", "/proc/moescope-out"), "/proc/moescope-out")
    # non-UTF-8 logs and texts
    bad = tmp_path / "log.jsonl"
    bad.write_bytes(b'{"problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 2], "x": "\xff\xfe"}\n')
    _assert_sentence(run("import", "seed004-routing", bad, "-o", tmp_path / "imp"), "log.jsonl")
    texts = tmp_path / "texts.jsonl"
    texts.write_bytes(b'{"text": "caf\xe9"}\n')
    _assert_sentence(
        run("capture", "tiny:mixtral", texts, "-o", tmp_path / "cap", "--device", "cpu"), "texts.jsonl"
    )
    # empty inputs to importers
    np.savez(tmp_path / "none.npz")
    _assert_sentence(run("import", "vllm-replay", tmp_path / "none.npz", "-o", tmp_path / "i1"), "none.npz")
    np.save(tmp_path / "zero.npy", np.zeros((0, 3, 2), np.int32))
    _assert_sentence(
        run("import", "vllm-replay", tmp_path / "zero.npy", "-o", tmp_path / "i2", "--num-experts", 8),
        "zero.npy",
    )
    assert not (tmp_path / "i2").exists()
