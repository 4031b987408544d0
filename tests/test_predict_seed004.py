"""Seed 004's rule workflow: file formats, known rules reaching 100%, a brute-force count, the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moescope.cli import app
from moescope.errors import ConfigError, DataError
from moescope.predict.seed004 import create_rules, evaluate_rules, extract_tokens, load_journey

LAYERS, E = 12, 8


def write_raw(path: Path, journeys: dict[tuple[int, int], list[list[int]]]) -> Path:
    """Seed 004's raw JSONL: one record per (problem, layer, token), layers interleaved like the log."""
    lines = []
    for (problem, tok), layers in journeys.items():
        for layer, ex in enumerate(layers):
            rec = {
                "dataset": "humaneval",
                "problem_id": problem,
                "layer": layer,
                "experts": ex,
                "gating_probs": [0.7, 0.3],
                "token_idx": tok,
            }
            lines.append((problem, layer, tok, json.dumps(rec)))
    lines.sort()
    path.write_text("".join(x[3] + "\n" for x in lines), encoding="utf-8")
    return path


def rule_journeys(n_tokens: int, problems=(0, 1), seed: int = 0, start: int | None = None) -> dict:
    """Primary at layer n+1 = (primary at n + 3) % 8; the secondary is random."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in problems:
        for t in range(n_tokens):
            prim = [int(rng.integers(E)) if start is None else start]
            for _ in range(LAYERS - 1):
                prim.append((prim[-1] + 3) % E)
            out[(p, t)] = [[a, int((a + 1 + rng.integers(E - 1)) % E)] for a in prim]
    return out


def test_known_rule_reaches_100_percent(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw.jsonl", rule_journeys(60))
    train = extract_tokens(raw, 0, 0, 60, tmp_path / "j")
    test = extract_tokens(raw, 1, 0, 6, tmp_path / "j")
    assert [f.name for f in train[:3]] == [f"p0_token_{i}.jsonl" for i in range(3)]
    rec = json.loads(train[0].read_text().splitlines()[3])
    assert set(rec) >= {"layer", "experts", "gating_probs", "token_idx"} and rec["layer"] == 3
    rules = create_rules(train)
    doc = evaluate_rules(rules, test, rules_file="r.json")
    res = doc["results"]
    # 60 training tokens start from every expert, so every test transition has a rule
    for level in ("level1", "level2", "level3", "level5", "hybrid"):
        assert res[level]["accuracy_percent"] == 100.0, level
    assert res["level1"]["total"] == res["hybrid"]["total"] == 6 * (LAYERS - 1)
    assert res["level1"]["vs_random"] == pytest.approx(100.0 / 12.5)
    assert set(doc) == {"metadata", "results", "best_level"}
    assert doc["metadata"]["num_test_files"] == 6 and doc["metadata"]["rules_file"] == "r.json"
    assert doc["metadata"]["training_files"][0] == "p0_token_0.jsonl"
    assert doc["best_level"]["accuracy_percent"] == 100.0


def test_counts_match_a_plain_reimplementation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    journeys = {
        (0, t): [list(map(int, rng.choice(4, 2, replace=False))) for _ in range(LAYERS)] for t in range(30)
    }
    raw = write_raw(tmp_path / "raw.jsonl", journeys)
    files = extract_tokens(raw, 0, 0, 30, tmp_path / "j")
    train, test = files[:20], files[20:]
    rules = create_rules(train, num_experts=4)
    res = evaluate_rules(rules, test)["results"]
    # level 2 by hand: key (N, prev primary, curr primary) -> most common next primary (first seen on ties)
    votes: dict = {}
    for t in range(20):
        p = [ex[0] for ex in journeys[(0, t)]]
        for n in range(1, LAYERS - 1):
            votes.setdefault((n, p[n - 1], p[n]), Counter())[p[n + 1]] += 1
    table = {key: c.most_common(1)[0][0] for key, c in votes.items()}
    correct = total = 0
    for t in range(20, 30):
        p = [ex[0] for ex in journeys[(0, t)]]
        for n in range(1, LAYERS - 1):
            if (n, p[n - 1], p[n]) in table:
                total += 1
                correct += table[(n, p[n - 1], p[n])] == p[n + 1]
    assert (res["level2"]["correct"], res["level2"]["total"]) == (correct, total)
    assert res["level2"]["vs_random"] == pytest.approx(round(100 * correct / total / 25, 2))
    # the hybrid answers every transition
    assert res["hybrid"]["total"] == 10 * (LAYERS - 1)


def test_missing_layers_drop_transitions(tmp_path: Path) -> None:
    journeys = rule_journeys(2, problems=(0,))
    raw = tmp_path / "raw.jsonl"
    write_raw(raw, journeys)
    lines = [
        ln for ln in raw.read_text().splitlines() if not ('"layer": 5,' in ln and '"token_idx": 1' in ln)
    ]
    raw.write_text("\n".join(lines) + "\n")
    files = extract_tokens(raw, 0, 0, 2, tmp_path / "j")
    assert len(load_journey(files[1])) == LAYERS - 1
    res = evaluate_rules(create_rules(files[:1]), files[1:])["results"]
    assert res["hybrid"]["total"] == LAYERS - 1 - 2  # transitions 4->5 and 5->6 are gone


def test_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"layer": 0}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: record has no field 'experts'"):
        load_journey(bad)
    bad.write_text("not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: not valid JSON"):
        load_journey(bad)
    raw = write_raw(tmp_path / "raw.jsonl", rule_journeys(2, problems=(0,)))
    with pytest.raises(DataError, match="no records for problem 7"):
        extract_tokens(raw, 7, 0, 10, tmp_path / "j")


def test_cli_workflow_as_in_the_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = write_raw(tmp_path / "raw.jsonl", rule_journeys(4, start=2))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    r = runner.invoke(
        app, ["predict", "seed004", "extract", str(raw), "--problem", "0", "--tokens", "0", "4"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["predict", "seed004", "extract", str(raw), "-p", "1", "-t", "0", "4", "-o", "d"])
    assert r.exit_code == 0 and (tmp_path / "d" / "p1_token_3.jsonl").is_file()
    r = runner.invoke(
        app,
        [
            "predict",
            "seed004",
            "create-rules",
            "p0_token_0.jsonl",
            "p0_token_1.jsonl",
            "--output",
            "rules.json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "rules.json").read_text())["level1"]
    r = runner.invoke(
        app,
        [
            "predict",
            "seed004",
            "evaluate-rules",
            "--rules",
            "rules.json",
            "--test",
            "d/p1_token_0.jsonl",
            "d/p1_token_1.jsonl",
            "d/p1_token_2.jsonl",
            "--output",
            "results.json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "EVALUATION RESULTS" in r.output and "BEST:" in r.output
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["metadata"]["test_files"] == ["p1_token_0.jsonl", "p1_token_1.jsonl", "p1_token_2.jsonl"]
    for level in ("level1", "level2", "level3", "level4", "level5"):
        assert set(doc["results"][level]) == {"correct", "total", "accuracy_percent", "vs_random"}
    r = runner.invoke(
        app,
        ["predict", "seed004", "evaluate-rules", "-r", "rules.json", "-t", "d/p1_token_0.jsonl", "--json"],
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["best_level"] == {
        "name": "level1",
        "accuracy_percent": 100.0,
    }


@pytest.mark.shared_data
def test_real_mixtral_log_workflow(shared_data: Path, tmp_path: Path) -> None:
    raw = shared_data / "mixtral-8x7b-humaneval" / "humaneval_2_routing.jsonl"
    files = extract_tokens(raw, 0, 0, 10, tmp_path) + extract_tokens(raw, 1, 0, 10, tmp_path)
    assert len(files) == 20
    assert all(len(load_journey(f)) <= 32 for f in files)
    doc = evaluate_rules(create_rules(files[:1]), files[1:])
    r = doc["results"]
    assert r["level1"]["total"] > 0 and 0 < r["level1"]["accuracy_percent"] <= 100
    assert r["hybrid"]["total"] >= r["level1"]["total"]
    assert doc["best_level"]["name"] in {f"level{i}" for i in range(1, 6)}


def _drop_and_renumber(raw: Path, problem: int, layer: int, token: int) -> None:
    """What the Mixtral recorder did with a [0.5, 0.5] row: drop it and number later ones one lower."""
    out = []
    for ln in raw.read_text().splitlines():
        rec = json.loads(ln)
        if rec["problem_id"] == problem and rec["layer"] == layer:
            if rec["token_idx"] == token:
                continue
            if rec["token_idx"] > token:
                rec["token_idx"] -= 1
        out.append(json.dumps(rec))
    raw.write_text("\n".join(out) + "\n")


def test_extract_names_renumbered_series_like_the_importer(tmp_path: Path) -> None:
    """Regression: extract reproduced the shifted token_idx records without a word."""
    from moescope.interop import import_log
    from moescope.predict.seed004 import extract_journeys

    raw = write_raw(tmp_path / "raw.jsonl", rule_journeys(6, problems=(0, 1)))
    _drop_and_renumber(raw, 0, 5, 2)
    _drop_and_renumber(raw, 1, 3, 0)
    files, short = extract_journeys(raw, 0, 0, 6, tmp_path / "m")
    assert short == [{"problem": 0, "layer": 5, "tokens": 6, "records": 5}]
    assert all(5 not in load_journey(f) for f in files) and all(
        len(load_journey(f)) == LAYERS - 1 for f in files
    )
    kept, short_k = extract_journeys(raw, 0, 0, 6, tmp_path / "k", short_series="keep-prefix")
    assert short_k == short and sum(5 in load_journey(f) for f in kept) == 5  # the 5 records, as logged
    with pytest.raises(ConfigError, match="`short_series`"):
        extract_journeys(raw, 0, 0, 6, tmp_path / "x", short_series="shift")
    # the same series as the importer masks
    tr = import_log(
        "seed004-routing",
        raw,
        tmp_path / "t",
        model="none",
        num_experts=E,
        top_k=2,
        moe_layers=",".join(map(str, range(LAYERS))),
    )
    masked = {(s["doc_id"], s["layer"]) for s in tr.manifest["source"]["report"]["masked_series"]}
    assert masked == {(0, 5), (1, 3)}
    assert extract_journeys(raw, 1, 0, 6, tmp_path / "p1")[1] == [
        {"problem": 1, "layer": 3, "tokens": 6, "records": 5}
    ]
    # the CLI warns on stderr and offers the importer's choices
    r = CliRunner().invoke(
        app,
        [
            "predict",
            "seed004",
            "extract",
            str(raw),
            "-p",
            "0",
            "-t",
            "0",
            "6",
            "-o",
            str(tmp_path / "c"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (
        "problem 0: 1 series have dropped records" in r.stderr
        and "layer 5 (5 records for 6 tokens)" in r.stderr
    )
    assert json.loads(r.stdout)["short_series"] == short


@pytest.mark.shared_data
def test_real_mixtral_extract_flags_the_series_the_importer_masks(shared_data: Path, tmp_path: Path) -> None:
    from moescope.interop import import_log
    from moescope.predict.seed004 import extract_journeys

    raw = shared_data / "mixtral-8x7b-humaneval" / "humaneval_2_routing.jsonl"
    tr = import_log("seed004-routing", raw, tmp_path / "t")
    masked = {(s["doc_id"], s["layer"]) for s in tr.manifest["source"]["report"]["masked_series"]}
    found = set()
    for p in (0, 1):
        found |= {(p, s["layer"]) for s in extract_journeys(raw, p, 0, 5, tmp_path / f"j{p}")[1]}
    assert found == masked and len(found) == 27
