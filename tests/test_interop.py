"""Import and export of routing logs, on small files written here in each format.

Every check compares the trace with the numbers the test itself wrote into the log (plain
Python, no moescope code), and every malformed file must fail with the file (and line) named.
"""

from __future__ import annotations

import csv
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moescope.cli import app
from moescope.errors import ConfigError, DataError, MoescopeError
from moescope.interop import EXPORT_FORMATS, IMPORT_FORMATS, export_trace, import_log
from moescope.trace import Trace
from moescope.trace.validate import validate_trace

E, K = 8, 2


def routing(rng: np.random.Generator, n: int, L: int, E: int = E, k: int = K) -> np.ndarray:
    """(n, L, k) distinct expert ids per (token, layer)."""
    return np.argsort(rng.random((n, L, E)), axis=-1)[..., :k]


def rank_weights(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    w = np.sort(rng.random(shape), axis=-1)[..., ::-1].astype(np.float32)
    return w / w.sum(-1, keepdims=True)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cells(tr: Trace) -> dict:
    """{(doc, position, MoE column): (experts tuple or None, weights tuple or None)} read plainly."""
    b = tr.load()
    out = {}
    for i in range(len(b.doc_id)):
        for col in range(tr.num_layers):
            ex = b.experts[i, col]
            missing = bool((ex == tr.missing_id).any())
            w = None if b.weights is None or missing else tuple(float(x) for x in b.weights[i, col])
            out[(int(b.doc_id[i]), int(b.position[i]), col)] = (
                None if missing else tuple(int(x) for x in ex),
                w,
            )
    return out


# --------------------------------------------------------------------------- seed 004 raw routing
def seed004_records(rng: np.random.Generator, lengths: dict[int, int], L: int) -> tuple[list, dict]:
    """Records in the recorder's order (problem, layer, token) and the truth {(p, layer, t): (ex, w)}."""
    recs, truth = [], {}
    for p, n in lengths.items():
        ex, w = routing(rng, n, L), rank_weights(rng, (n, L, K))
        for layer in range(L):
            for t in range(n):
                e, g = [int(x) for x in ex[t, layer]], [float(x) for x in w[t, layer]]
                truth[(p, layer, t)] = (tuple(e), tuple(g))  # float32 values, exact as Python floats
                recs.append(
                    {
                        "dataset": "humaneval",
                        "problem_id": p,
                        "layer": layer,
                        "experts": e,
                        "gating_probs": g,
                        "token_idx": t,
                    }
                )
    return recs, truth


def test_seed004_routing_places_records_and_masks_dropped_series(tmp_path) -> None:
    rng = np.random.default_rng(0)
    recs, truth = seed004_records(rng, {0: 6, 3: 4}, L=4)
    # Like the published recorder: drop the record of (problem 0, layer 2, token 1) and renumber the rest.
    kept = [r for r in recs if not (r["problem_id"] == 0 and r["layer"] == 2 and r["token_idx"] == 1)]
    for r in kept:
        if r["problem_id"] == 0 and r["layer"] == 2 and r["token_idx"] > 1:
            r["token_idx"] -= 1
    log = write_jsonl(tmp_path / "routing.jsonl", kept)
    opts = {"model": "none", "num_experts": E, "moe_layers": "0-3"}
    tr = import_log("seed004-routing", log, tmp_path / "t", **opts)
    assert validate_trace(tr.path) == []
    assert (tr.num_experts, tr.top_k, tr.moe_layers) == (E, K, [0, 1, 2, 3])
    assert tr.labels == ["humaneval"] and tr.num_tokens == 10
    got = cells(tr)
    for (p, layer, t), (ex, w) in truth.items():
        if (p, layer) == (0, 2):
            assert got[(p, t, layer)] == (None, None)  # whole series masked: no position can be trusted
        else:
            assert got[(p, t, layer)] == (ex, w)
    src = tr.manifest["source"]
    assert tr.slot_order == "rank" and tr.manifest["routing"]["slot_order"] == "rank"
    assert "slot_order" not in src  # one place: the routing facts
    rep = src["report"]
    assert rep["issues"] == {"short_series": 1}
    assert rep["masked_series"] == [
        {
            "doc_id": 0,
            "layer": 2,
            "expected": 6,
            "found": 5,
            "masked": 6,
            "reason": rep["masked_series"][0]["reason"],
        }
    ]

    # keep-prefix: the 5 records stay at the indices the log gives them, only the tail is missing.
    tr = import_log("seed004-routing", log, tmp_path / "t2", short_series="keep-prefix", **opts)
    got = cells(tr)
    shifted = [r for r in kept if r["problem_id"] == 0 and r["layer"] == 2]
    for r in shifted:
        assert got[(0, r["token_idx"], 2)][0] == tuple(r["experts"])
    assert got[(0, 5, 2)] == (None, None)


def test_seed004_routing_duplicates_conflicts_order_and_gaps(tmp_path) -> None:
    rng = np.random.default_rng(1)
    recs, truth = seed004_records(rng, {0: 5}, L=3)
    by = {(r["layer"], r["token_idx"]): r for r in recs}
    recs.append(dict(by[(0, 3)]))  # identical duplicate: dropped
    clash = dict(by[(1, 2)])
    clash["experts"] = [e for e in range(E) if e not in clash["experts"]][:K]
    recs.append(clash)  # conflicting duplicate: that cell is masked
    recs.remove(by[(2, 2)])  # explicit hole (indices not renumbered): only that cell is missing
    i, j = recs.index(by[(0, 0)]), recs.index(by[(0, 1)])
    recs[i], recs[j] = recs[j], recs[i]  # out of order: counted, placed by its index
    tr = import_log(
        "seed004-routing",
        write_jsonl(tmp_path / "r.jsonl", recs),
        tmp_path / "t",
        model="none",
        num_experts=E,
    )
    got = cells(tr)
    for (_, layer, t), (ex, w) in truth.items():
        expect = (None, None) if (layer, t) in {(1, 2), (2, 2)} else (ex, w)
        assert got[(0, t, layer)] == expect
    issues = tr.manifest["source"]["report"]["issues"]
    # out of order: the swapped pair, and both extra records appended after later tokens
    assert issues == {"duplicate": 1, "conflict": 1, "gap": 1, "out_of_order": 3}
    ex = tr.manifest["source"]["report"]["examples"]
    assert ex["conflict"][0].startswith(f"{tmp_path / 'r.jsonl'}:{len(recs)}: contradicts the record at")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"problem_id": 0, "layer": 0, "experts": [1, 2], "token_idx": 0', "invalid JSON at column"),
        (
            '{"problem_id": 0, "layer": 0, "experts": [1, 2, 3], "gating_probs": [0.5, 0.3, 0.2], "token_idx": 1}',
            "field 'experts' must be a list of 2 integer expert ids",
        ),
        (
            '{"problem_id": 0, "layer": 0, "experts": [1, 9], "gating_probs": [0.5, 0.5], "token_idx": 1}',
            "expert id 9 is out of range 0..7",
        ),
        (
            '{"problem_id": 0, "layer": 0, "experts": [1, 2], "gating_probs": [0.5, 0.5]}',
            "missing field 'token_idx'",
        ),
        (
            '{"problem_id": 0, "layer": 40, "experts": [1, 2], "gating_probs": [0.5, 0.5], "token_idx": 1}',
            "layer 40 is not a MoE layer",
        ),
        (
            '{"problem_id": 0, "layer": 0, "experts": [1, 1], "gating_probs": [0.5, 0.5], "token_idx": 1}',
            "repeats an id inside one token's top-k",
        ),
        ('{"problem_id": 0, "layer": 0, "experts": [1, 2], "token_idx": 1}', "lacks field 'gating_probs'"),
    ],
)
def test_seed004_routing_malformed_lines_name_file_and_line(tmp_path, line, message) -> None:
    good = '{"dataset": "he", "problem_id": 0, "layer": 0, "experts": [3, 4], "gating_probs": [0.6, 0.4], "token_idx": 0}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataError) as exc:
        import_log("seed004-routing", path, tmp_path / "t")
    assert str(exc.value).startswith(f"{path}:3: ") and message in str(exc.value)
    assert not (tmp_path / "t").exists()  # a failed import leaves nothing behind


def test_seed004_routing_token_ids_from_text(tmp_path) -> None:
    """--text + --tokenizer: decode step i gets generated token i (ids from a tiny WordLevel vocabulary)."""
    vocab_path = tiny_vocab(tmp_path, ["a", "b", "c", "d"])
    rng = np.random.default_rng(2)
    recs, _ = seed004_records(rng, {0: 3}, L=2)
    log = write_jsonl(tmp_path / "r.jsonl", recs)
    text = write_jsonl(tmp_path / "out.jsonl", [{"problem_id": 0, "prompt": "x", "generated": "c a d b"}])
    tr = import_log(
        "seed004-routing",
        log,
        tmp_path / "t",
        model="none",
        num_experts=E,
        text=text,
        tokenizer=str(vocab_path),
    )
    b = tr.load()
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 3, "d": 4}
    assert b.token_id.tolist() == [vocab[w] for w in ["c", "a", "d"]]
    assert b.token == ["c", "a", "d"]
    # the text has 4 tokens for 3 decode steps: the last sampled token is never routed, no mismatch
    assert "text_length_mismatch" not in tr.manifest["source"]["report"]["issues"]
    with pytest.raises(ConfigError, match="`text`"):
        import_log(
            "seed004-routing", log, tmp_path / "t2", model="none", num_experts=E, tokenizer=str(vocab_path)
        )


def tiny_vocab(tmp_path: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(
        models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


# --------------------------------------------------------------------------- seed 004 journeys
def test_seed004_journeys_round_trip_and_missing_cells(tmp_path) -> None:
    rng = np.random.default_rng(3)
    recs, truth = seed004_records(rng, {0: 4, 2: 3}, L=3)
    recs = [
        r for r in recs if (r["problem_id"], r["layer"], r["token_idx"]) != (2, 1, 0)
    ]  # one cell unlogged
    tr = import_log(
        "seed004-routing",
        write_jsonl(tmp_path / "r.jsonl", recs),
        tmp_path / "t",
        model="none",
        num_experts=E,
    )
    # indices 1, 2 remain (not renumbered): a gap, so only the cell of token 0 is missing
    assert tr.manifest["source"]["report"]["masked_series"][0]["masked"] == 1
    res = export_trace("seed004-journeys", tr, tmp_path / "j")
    assert res["files"] == 7 and res["records"] == 7 * 3 - 1
    lines = (tmp_path / "j" / "p0_token_1.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert list(first) == ["layer", "experts", "gating_probs", "token_idx"]  # seed 004's field order
    assert (first["layer"], first["token_idx"], tuple(first["experts"])) == (0, 1, truth[(0, 0, 1)][0])
    assert len((tmp_path / "j" / "p2_token_0.jsonl").read_text().splitlines()) == 2  # layer 1 is missing
    back = import_log("seed004-journeys", tmp_path / "j", tmp_path / "t3", model="none", num_experts=E)
    assert cells(back) == cells(tr)
    assert tr.slot_order == back.slot_order == "rank"  # weights non-increasing along k
    a, b = tr.load(), back.load()
    assert np.array_equal(a.weights, b.weights, equal_nan=True)  # float32 survives JSON exactly
    # extract_tokens.py's selection: one problem, a token range
    res = export_trace("seed004-journeys", tr, tmp_path / "j2", documents=[0], tokens=(1, 3))
    assert sorted(p.name for p in (tmp_path / "j2").iterdir()) == ["p0_token_1.jsonl", "p0_token_2.jsonl"]
    with pytest.raises(ConfigError, match="already holds token journey files"):
        export_trace("seed004-journeys", tr, tmp_path / "j2")
    with pytest.raises(ConfigError, match=r"no document\(s\) \[5\]"):
        export_trace("seed004-journeys", tr, tmp_path / "j3", documents=[5])


def test_seed004_journeys_file_name_must_agree(tmp_path) -> None:
    path = write_jsonl(tmp_path / "p1_token_4.jsonl", [{"layer": 0, "experts": [1, 2], "token_idx": 5}])
    with pytest.raises(DataError, match=rf"{path}:1: token_idx 5 but the file name says token 4"):
        import_log("seed004-journeys", path, tmp_path / "t")
    path = write_jsonl(tmp_path / "journey.jsonl", [{"layer": 0, "experts": [1, 2], "token_idx": 5}])
    with pytest.raises(DataError, match="cannot tell the problem"):
        import_log("seed004-journeys", path, tmp_path / "t")


# --------------------------------------------------------------------------- seed 002 JSON
def seed002_log(rng: np.random.Generator, lengths: list[int], layers: list[int], E: int = E) -> dict:
    samples = []
    for i, n in enumerate(lengths):
        entries = []
        for layer in layers:
            ex, w = routing(rng, n, 1, E)[:, 0], rank_weights(rng, (n, K))
            lg = rng.normal(size=(n, E)).astype(np.float32)
            entries.append(
                {
                    "layer": layer,
                    "router_logits_shape": [n, E],
                    "router_logits_sample": lg.tolist(),
                    "selected_experts": ex.tolist(),
                    "expert_weights": w.tolist(),
                }
            )
        samples.append({"sample_id": i, "num_tokens": n, "loss": 2.0, "layers": entries})
    return {
        "config": "acme/tiny-moe",
        "strategy": "topk_baseline",
        "num_experts": E,
        "num_layers": max(layers) + 1,
        "dataset": "lambada",
        "samples": samples,
    }


def test_seed002_import_matches_the_json_and_round_trips(tmp_path) -> None:
    rng = np.random.default_rng(4)
    log = seed002_log(rng, [5, 3], layers=[1, 2, 3])
    log["samples"][1]["layers"][0]["router_logits_sample"] = log["samples"][1]["layers"][0][
        "router_logits_sample"
    ][:2]
    del log["samples"][1]["layers"][2]  # layer 3 absent from sample 1
    path = tmp_path / "tiny_lambada_internal_routing.json"
    path.write_text(json.dumps(log, indent=1))
    tr = import_log("seed002-json", path, tmp_path / "t")
    assert validate_trace(tr.path) == []
    assert (tr.num_experts, tr.top_k, tr.moe_layers, tr.routing.num_hidden_layers) == (E, K, [1, 2, 3], 4)
    assert tr.labels == ["lambada"] and tr.has_logits and tr.has_weights and tr.slot_order == "rank"
    b = tr.load()
    for s in log["samples"]:
        rows = b.doc_id == s["sample_id"]
        assert b.position[rows].tolist() == list(range(s["num_tokens"]))
        for entry in s["layers"]:
            col = [1, 2, 3].index(entry["layer"])
            assert b.experts[rows, col].tolist() == entry["selected_experts"]
            assert np.array_equal(b.weights[rows, col], np.float32(entry["expert_weights"]))
            lg = np.float16(entry["router_logits_sample"])  # the trace stores logits as float16
            assert np.array_equal(b.logits[rows, col][: len(lg)], lg)
            assert np.isnan(b.logits[rows, col][len(lg) :]).all()
    assert (b.experts[b.doc_id == 1, 2] == tr.missing_id).all()
    rep = tr.manifest["source"]["report"]
    assert rep["issues"] == {"logits_truncated": 1, "missing_layer": 1}
    assert [(s["doc_id"], s["layer"]) for s in rep["masked_series"]] == [(1, 3)]

    out = tmp_path / "export.json"
    export_trace("seed002-json", tr, out)
    exported = json.loads(out.read_text())
    assert {k: exported[k] for k in ("num_experts", "top_k", "num_layers", "dataset")} == {
        "num_experts": E,
        "top_k": K,
        "num_layers": 4,
        "dataset": "lambada",
    }
    assert [e["layer"] for e in exported["samples"][1]["layers"]] == [1, 2]
    back = import_log("seed002-json", out, tmp_path / "t2")
    a, c = tr.to_arrow(), back.to_arrow()
    for name in ("doc_id", "position", "experts"):
        assert a[name].equals(c[name]), name
    assert np.array_equal(tr.weights(), back.weights(), equal_nan=True)
    assert np.array_equal(tr.logits(), back.logits(), equal_nan=True)
    assert back.labels == tr.labels


def test_seed002_streams_across_buffer_boundaries(tmp_path, monkeypatch) -> None:
    """A tiny read size forces every sample to be re-read across chunks: the result must not change."""
    from moescope.interop import seed002

    rng = np.random.default_rng(5)
    path = tmp_path / "log.json"
    path.write_text(json.dumps(seed002_log(rng, [4, 7, 2], layers=[0, 1])))
    ref = import_log("seed002-json", path, tmp_path / "a")
    monkeypatch.setattr(seed002.JsonStream, "CHUNK", 7)
    small = import_log("seed002-json", path, tmp_path / "b")
    assert ref.to_arrow()["experts"].equals(small.to_arrow()["experts"])
    assert np.array_equal(ref.logits(), small.logits())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace('"selected_experts": [', '"selected_experts": [[', 1), "invalid JSON"),
        (lambda s: s[:-30], "invalid JSON"),
        (lambda s: s.replace('"num_experts": 8', '"num_experts": 8,,'), "invalid JSON"),
    ],
)
def test_seed002_bad_json_names_the_line(tmp_path, edit, message) -> None:
    rng = np.random.default_rng(6)
    path = tmp_path / "log.json"
    text = json.dumps(seed002_log(rng, [3], layers=[0]), indent=2)
    bad = edit(text)
    path.write_text(bad)
    with pytest.raises(DataError) as exc:
        import_log("seed002-json", path, tmp_path / "t")
    assert message in str(exc.value) and str(exc.value).startswith(f"{path}:")
    line = int(str(exc.value)[len(str(path)) + 1 :].split(":")[0])
    assert 1 < line <= bad.count("\n") + 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda s: s["layers"][0]["selected_experts"].__setitem__(1, [1, 2, 3]),
            "samples[1].layers[0]: selected_experts[1] must be a list of 2 integer expert ids",
        ),
        (
            lambda s: s["layers"][0]["selected_experts"].__setitem__(2, [1, 8]),
            "expert id 8 is out of range 0..7",
        ),
        (
            lambda s: s["layers"][0].pop("selected_experts"),
            "samples[1].layers[0]: missing field 'selected_experts'",
        ),
        (lambda s: s["layers"][0].__setitem__("layer", 9), "layer 9 is not a MoE layer"),
        (
            lambda s: s["layers"][0].__setitem__("router_logits_sample", [[0.0] * 5] * 3),
            "router_logits_sample[0] must be a list of 8 numbers",
        ),
    ],
)
def test_seed002_malformed_sample_names_file_line_and_path(tmp_path, mutate, message) -> None:
    rng = np.random.default_rng(7)
    log = seed002_log(rng, [3, 3], layers=[0, 1])
    mutate(log["samples"][1])
    path = tmp_path / "log.json"
    text = json.dumps(log)
    path.write_text(text.replace('{"sample_id": 1', '\n{"sample_id": 1'))  # sample 1 starts on line 2
    with pytest.raises(DataError) as exc:
        import_log("seed002-json", path, tmp_path / "t")
    assert str(exc.value).startswith(f"{path}:2: samples[1]") and message in str(exc.value)


def test_seed002_facts_from_a_known_config_are_checked(tmp_path) -> None:
    rng = np.random.default_rng(8)
    log = seed002_log(rng, [2], layers=[1, 2])
    log["config"] = "deepseek-ai/DeepSeek-V2-Lite"  # 64 experts, so num_experts=8 is a contradiction
    path = tmp_path / "log.json"
    path.write_text(json.dumps(log))
    with pytest.raises(ConfigError, match="num_experts=8, but model 'deepseek-v2-lite' has 64"):
        import_log("seed002-json", path, tmp_path / "t")
    tr = import_log("seed002-json", path, tmp_path / "t", model="none", moe_layers="1-2")
    assert tr.num_experts == E and tr.routing.n_shared_experts == 0


# --------------------------------------------------------------------------- MoE-Beyond CSV
def moe_beyond_csv(path: Path, tokens: list[str], ids: np.ndarray, layers: list[int], header=None) -> Path:
    """A prompt file as MoE-Beyond writes it: rows grouped by layer, ids as a JSON list."""
    header = header or ["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for col, layer in enumerate(layers):
            for t, tok in enumerate(tokens):
                row = {
                    "Layer ID": layer,
                    "Batch Number": 0,
                    "Token": tok,
                    "Activated Expert IDs": json.dumps([int(x) for x in ids[t, col]]),
                }
                w.writerow([row[h] for h in header])
    return path


def test_moe_beyond_folder_and_archive_give_the_same_trace(tmp_path) -> None:
    rng = np.random.default_rng(9)
    layers = [1, 2, 3]
    folder = tmp_path / "training_data"
    folder.mkdir()
    truth = {}
    for num, toks in ((10, ["<s>", "Hello", "Ġworld", ",", '"']), (2, ["<s>", "a,b"]), (33, ["x"])):
        ids = routing(rng, len(toks), len(layers), E=64, k=6)
        truth[num] = (toks, ids)
        moe_beyond_csv(folder / f"prompt_{num}_data.csv", toks, ids, layers)
    opts = {"model": "none", "num_experts": 64, "top_k": 6, "moe_layers": "1-3"}
    tr = import_log("moe-beyond", folder, tmp_path / "t", **opts)
    assert validate_trace(tr.path) == []
    b = tr.load()
    assert tr.documents().tolist() == [2, 10, 33]  # prompt numbers, in order
    for num, (toks, ids) in truth.items():
        rows = b.doc_id == num
        assert [t for t, r in zip(b.token, rows, strict=True) if r] == toks
        assert np.array_equal(b.experts[rows], ids)  # kept as given: slot order is not rank order
    assert tr.slot_order == "set" and not tr.ranked
    assert (b.token_id == -1).all()

    archive = tmp_path / "prompts.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(folder, arcname="training_data")
    tr2 = import_log("moe-beyond", archive, tmp_path / "t2", **opts)
    a, c = tr.to_arrow(), tr2.to_arrow()
    for name in ("doc_id", "position", "token", "experts"):
        assert a[name].equals(c[name]), name

    # Another column order goes through the csv-module path and reads the same.
    other = tmp_path / "reordered"
    other.mkdir()
    for num, (toks, ids) in truth.items():
        moe_beyond_csv(
            other / f"prompt_{num}_data.csv",
            toks,
            ids,
            layers,
            header=["Token", "Activated Expert IDs", "Batch Number", "Layer ID"],
        )
    tr3 = import_log("moe-beyond", other, tmp_path / "t3", **opts)
    assert tr3.to_arrow()["experts"].equals(a["experts"]) and tr3.to_arrow()["token"].equals(a["token"])


def test_moe_beyond_incomplete_layer_block_is_masked_and_reported(tmp_path) -> None:
    rng = np.random.default_rng(10)
    toks = ["<s>", "a", "b", "c"]
    ids = routing(rng, 4, 2, E=64, k=6)
    path = moe_beyond_csv(tmp_path / "prompt_7_data.csv", toks, ids, [1, 2])
    lines = path.read_text().splitlines()
    del lines[1 + 4 + 2]  # layer 2 loses the row of token "b"
    path.write_text("\n".join(lines) + "\n")
    tr = import_log("moe-beyond", path, tmp_path / "t")  # default model: DeepSeek-V2-Lite, layers 1..26
    b = tr.load()
    assert b.token == toks and np.array_equal(b.experts[:, 0], ids[:, 0])
    assert (b.experts[:, 1:] == tr.missing_id).all()  # layer 2: short; layers 3..26: absent
    rep = tr.manifest["source"]["report"]
    assert rep["issues"] == {"short_series": 1, "missing_layer": 24}
    assert rep["masked_series"][0] == {
        "doc_id": 7,
        "layer": 2,
        "expected": 4,
        "found": 3,
        "masked": 4,
        "reason": rep["masked_series"][0]["reason"],
    }
    assert (tr.num_experts, tr.top_k, tr.routing.n_shared_experts) == (64, 6, 2)


def test_moe_beyond_split_blocks_and_other_tokens_are_masked(tmp_path) -> None:
    rng = np.random.default_rng(15)
    toks = ["<s>", "a", "b"]
    ids = routing(rng, 3, 4, E=64, k=6)
    path = moe_beyond_csv(tmp_path / "prompt_4_data.csv", toks, ids, [1, 2, 3, 4])
    lines = path.read_text().splitlines()
    # first rows of layers 2 and 3 trade places: layer 3 is split in two blocks, layer 2 stays one
    # block whose tokens are rotated (a, b, <s>)
    lines[4], lines[7] = lines[7], lines[4]
    lines[12] = lines[12].replace(",b,", ",B,")  # layer 4 names another token than layer 1
    path.write_text("\n".join(lines) + "\n")
    tr = import_log(
        "moe-beyond", path, tmp_path / "t", moe_layers="1-4", model="none", num_experts=64, top_k=6
    )
    ex = tr.experts()
    assert np.array_equal(ex[:, 0], ids[:, 0]) and (ex[:, 1:] == tr.missing_id).all()
    assert tr.manifest["source"]["report"]["issues"] == {"out_of_order": 1, "token_mismatch": 2}
    assert tr.load(["token"]).token == toks  # the first complete block gives the tokens


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('1,0,x,"[1, 2, 3, 4, 5]"', "line 3"),
        ('1,0,x,"[1, 2, 3, 4, 5, 64]"', "expert id 64 is out of range 0..63"),
        ('1,0,x,"[1, 2, 3, 4, 5, a]"', "must be a list of 6 integer expert ids"),
        ('0,0,x,"[1, 2, 3, 4, 5, 6]"', "layer 0 is not a MoE layer"),
        ('one,0,x,"[1, 2, 3, 4, 5, 6]"', "column 'Layer ID' must be an integer"),
        ("1,0,x", "3 fields, the header has 4"),
    ],
)
def test_moe_beyond_malformed_rows_name_file_and_line(tmp_path, row, message) -> None:
    path = tmp_path / "prompt_1_data.csv"
    path.write_text(
        'Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,<s>,"[9, 8, 7, 6, 5, 4]"\n' + row + "\n"
    )
    with pytest.raises(DataError) as exc:
        import_log("moe-beyond", path, tmp_path / "t")
    text = str(exc.value)
    assert text.startswith(f"{path}:3: ") and (message in text or message == "line 3")


def test_moe_beyond_missing_column_and_token_ids(tmp_path) -> None:
    path = tmp_path / "prompt_1_data.csv"
    path.write_text('Layer ID,Token,Activated Expert IDs\n1,<s>,"[1, 2, 3, 4, 5, 6]"\n')
    with pytest.raises(DataError, match=r"prompt_1_data.csv:1: missing column\(s\) \['Batch Number'\]"):
        import_log("moe-beyond", path, tmp_path / "t")
    rng = np.random.default_rng(11)
    ids = routing(rng, 3, 26, E=64, k=6)
    moe_beyond_csv(path, ["Ġthe", "cat", "Ġzebra"], ids, list(range(1, 27)))
    vocab = tiny_vocab(tmp_path, ["Ġthe", "cat"])
    tr = import_log("moe-beyond", path, tmp_path / "t", tokenizer=str(vocab))
    assert tr.load(["token_id"]).token_id.tolist() == [1, 2, -1]
    assert tr.manifest["source"]["report"]["issues"] == {"unknown_piece": 1}
    assert tr.manifest["tokenizer"]["kind"] == "tokenizers"


# --------------------------------------------------------------------------- vLLM replay arrays
def test_vllm_replay_npy_and_npz(tmp_path) -> None:
    rng = np.random.default_rng(12)
    a, b = routing(rng, 6, 3).astype(np.int32), routing(rng, 4, 3).astype(np.int16)
    a[2, 1] = -1  # an unset slot (never routed)
    np.save(tmp_path / "req0.npy", a)
    np.savez(tmp_path / "batch.npz", r1=b, r2=a[:3])
    tr = import_log(
        "vllm-replay",
        [tmp_path / "req0.npy", tmp_path / "batch.npz"],
        tmp_path / "t",
        num_experts=E,
        moe_layers="1,3,5",
    )
    assert validate_trace(tr.path) == [] and tr.moe_layers == [1, 3, 5]
    x = tr.load()
    for doc, arr in enumerate([a, b, a[:3]]):
        rows = x.doc_id == doc
        unset = (arr < 0).any(-1)
        assert np.array_equal(x.experts[rows][~unset], arr[~unset])
        assert (x.experts[rows][unset] == tr.missing_id).all()
    docs = tr.manifest["source"]["documents"]
    assert [(d["key"], d["tokens"]) for d in docs] == [(None, 6), ("r1", 4), ("r2", 3)]
    assert tr.manifest["source"]["report"]["issues"] == {"unset": 2}
    assert tr.slot_order == "set"  # no weights: rank order cannot be checked

    bad = a.copy()
    bad[4, 2, 0] = 8
    np.savez(tmp_path / "bad.npz", req=bad)
    with pytest.raises(DataError, match=r"bad.npz\[req\]: token 4, MoE layer 2: expert id 8 is out of range"):
        import_log("vllm-replay", tmp_path / "bad.npz", tmp_path / "t2", num_experts=E)
    np.save(tmp_path / "flat.npy", a.reshape(6, -1))
    with pytest.raises(DataError, match=r"flat.npy: shape \(6, 6\), expected 3 axes"):
        import_log("vllm-replay", tmp_path / "flat.npy", tmp_path / "t2", num_experts=E)
    with pytest.raises(ConfigError, match="`num_experts`"):
        import_log("vllm-replay", tmp_path / "req0.npy", tmp_path / "t2")


# --------------------------------------------------------------------------- Megatron router trace
def test_megatron_router_trace_documents_and_gaps(tmp_path) -> None:
    rng = np.random.default_rng(13)
    recs, truth = [], {}
    for step in range(2):
        for mb in range(2):  # two micro-batches per training step
            for layer in (1, 3):
                ids = np.sort(routing(rng, 4, 1)[:, 0], axis=1)  # from the routing map: ascending
                truth[(step, mb, layer)] = ids
                if (step, mb, layer) == (1, 1, 3):
                    continue  # lost record
                recs.append(
                    {
                        "step": step,
                        "stage": "pre_dispatch",
                        "block": "decoder",
                        "layer": layer,
                        "rank": 0,
                        "num_tokens": 4,
                        "topk": K,
                        "top_indices": ids.tolist(),
                    }
                )
    recs.insert(
        1,
        {
            "step": 0,
            "block": "mtp",
            "mtp_idx": 0,
            "layer": 1,
            "num_tokens": 1,
            "topk": K,
            "top_indices": [[0, 1]],
        },
    )
    tr = import_log(
        "megatron-router-trace",
        write_jsonl(tmp_path / "router_trace_rank0.jsonl", recs),
        tmp_path / "t",
        num_experts=E,
    )
    assert tr.moe_layers == [1, 3] and tr.num_tokens == 16
    x = tr.load()
    docs = tr.manifest["source"]["documents"]
    assert [d[3:] for d in docs] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    for doc_id, _, _, step, mb in docs:
        rows = x.doc_id == doc_id
        for col, layer in enumerate((1, 3)):
            if (step, mb, layer) == (1, 1, 3):
                assert (x.experts[rows, col] == tr.missing_id).all()
            else:
                assert np.array_equal(x.experts[rows, col], truth[(step, mb, layer)])
    src = tr.manifest["source"]
    assert tr.slot_order == "set" and "sorted by id" in src["slot_order_note"]
    assert src["report"]["issues"] == {"mtp_skipped": 1, "missing_layer": 1}

    recs[0]["num_tokens"] = 5
    path = write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(DataError, match=rf"{path}:1: top_indices has 4 rows, num_tokens says 5"):
        import_log("megatron-router-trace", path, tmp_path / "t2", num_experts=E)


# --------------------------------------------------------------------------- API and CLI
def test_options_that_do_not_apply_are_refused(tmp_path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((1, 1, 1), np.int32))
    with pytest.raises(ConfigError, match="option tokenizer does not apply to format 'vllm-replay'"):
        import_log("vllm-replay", tmp_path / "a.npy", tmp_path / "t", num_experts=E, tokenizer="x")
    with pytest.raises(ConfigError, match="unknown import format 'csv'"):
        import_log("csv", tmp_path / "a.npy", tmp_path / "t")
    with pytest.raises(ConfigError, match="`model`: unknown model 'gpt'"):
        import_log("vllm-replay", tmp_path / "a.npy", tmp_path / "t", model="gpt")


def test_cli_lists_formats_and_imports_with_one_json_document(tmp_path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(app, ["import", "--help"]).output
    for name in IMPORT_FORMATS:
        assert name in help_text
    assert all(name in runner.invoke(app, ["export", "-h"]).output for name in EXPORT_FORMATS)
    rng = np.random.default_rng(14)
    recs, _ = seed004_records(rng, {0: 3}, L=32)
    log = write_jsonl(tmp_path / "r.jsonl", recs)
    res = runner.invoke(app, ["import", "seed004-routing", str(log), "-o", str(tmp_path / "t"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["tokens"], doc["documents"], doc["routing"]["top_k"], doc["issues"]) == (3, 1, 2, {})
    res = runner.invoke(
        app,
        [
            "export",
            "seed004-journeys",
            str(tmp_path / "t"),
            "-o",
            str(tmp_path / "j"),
            "--tokens",
            "0",
            "2",
            "--json",
        ],
    )
    assert res.exit_code == 0 and json.loads(res.stdout)["files"] == 2
    res = runner.invoke(
        app,
        ["export", "seed002-json", str(tmp_path / "t"), "-o", str(tmp_path / "x.json"), "--tokens", "0", "2"],
    )
    assert res.exit_code == 1 and isinstance(res.exception, MoescopeError)


def test_cli_error_is_one_line_naming_file_and_line(tmp_path, capsys, monkeypatch) -> None:
    from moescope.cli import main

    path = tmp_path / "r.jsonl"
    path.write_text('{"problem_id": 0, "layer": 0, "experts": [1], "token_idx": 0}\n{oops\n')
    monkeypatch.setattr(
        sys, "argv", ["moescope", "import", "seed004-routing", str(path), "-o", str(tmp_path / "t")]
    )
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"Error: {path}:2: invalid JSON")


# --------------------------------------------------------------------------- format names
def test_formats_are_named_for_what_they_are_and_seed_names_are_aliases(tmp_path) -> None:
    from typer.testing import CliRunner

    from moescope.cli import app
    from moescope.interop import EXPORT_FORMATS, FORMAT_ALIASES, IMPORT_FORMATS, canonical_format

    assert not any(n.startswith("seed") for n in [*IMPORT_FORMATS, *EXPORT_FORMATS])
    assert canonical_format("seed002-json") == "router-logger-json"
    assert all(target in IMPORT_FORMATS for target in FORMAT_ALIASES.values())
    rng = np.random.default_rng(5)
    recs, _ = seed004_records(rng, {0: 3}, L=2)
    log = write_jsonl(tmp_path / "r.jsonl", recs)
    new = import_log("routing-records-jsonl", log, tmp_path / "new", model="none", num_experts=E)
    old = import_log("seed004-routing", log, tmp_path / "old", model="none", num_experts=E)
    assert cells(new) == cells(old)
    assert new.manifest["source"]["format"] == "routing-records-jsonl"
    export_trace("seed004-journeys", new, tmp_path / "j_old")
    export_trace("token-journeys-jsonl", new, tmp_path / "j_new")
    assert sorted(p.name for p in (tmp_path / "j_old").iterdir()) == sorted(
        p.name for p in (tmp_path / "j_new").iterdir()
    )
    r = CliRunner().invoke(app, ["import", "--help"])
    assert "router-logger-json (alias seed002-json)" in " ".join(r.output.split())
    r = CliRunner().invoke(
        app,
        [
            "import",
            "seed004-routing",
            str(log),
            "-o",
            str(tmp_path / "cli"),
            "--model",
            "none",
            "--num-experts",
            str(E),
        ],
    )
    assert r.exit_code == 0, r.output
    with pytest.raises(ConfigError, match=r"known: .*router-logger-json.*seed002-json"):
        import_log("seed002-jsn", log, tmp_path / "x")


def test_seed002_round_trip_keeps_loss_and_strategy(tmp_path) -> None:
    """Regression: per-sample ``loss`` was dropped on import and ``strategy`` always exported as topk_baseline."""
    rng = np.random.default_rng(11)
    log = seed002_log(rng, [4, 3, 2], layers=[0, 1])
    log["strategy"] = "pvalue_threshold_0.05"
    for s, loss in zip(log["samples"], [2.341, 1.5, None], strict=True):
        s["loss"] = loss
    path = tmp_path / "tiny_lambada_internal_routing.json"
    path.write_text(json.dumps(log))
    tr = import_log("seed002-json", path, tmp_path / "t")
    assert validate_trace(tr.path) == []
    assert tr.has_doc_loss and tr.document_losses() == pytest.approx({0: 2.341, 1: 1.5})
    b = tr.load(["doc_id", "doc_loss"])
    assert np.isnan(b.doc_loss[b.doc_id == 2]).all()
    out = tmp_path / "export.json"
    export_trace("seed002-json", tr, out)
    exported = json.loads(out.read_text())
    assert exported["strategy"] == "pvalue_threshold_0.05"
    assert [s.get("loss") for s in exported["samples"]] == pytest.approx([2.341, 1.5, None])
    back = import_log("seed002-json", out, tmp_path / "t2")
    assert back.document_losses() == tr.document_losses()
    assert back.manifest["source"]["strategy"] == "pvalue_threshold_0.05"
    # a log without losses makes a trace without the column (older readers see nothing new)
    for s in log["samples"]:
        del s["loss"]
    path.write_text(json.dumps(log))
    plain = import_log("seed002-json", path, tmp_path / "t3")
    assert not plain.has_doc_loss and "doc_loss" not in plain.to_arrow().column_names
    export_trace("seed002-json", plain, tmp_path / "plain.json")
    assert all("loss" not in s for s in json.loads((tmp_path / "plain.json").read_text())["samples"])
