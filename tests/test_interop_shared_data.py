"""Import the real third-party logs in ../shared/data and check the facts their READMEs publish.

Skipped when ../shared/data is absent. Expected values are the published ones, and the routing
is compared with the raw files read here with the standard library only.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from moescope.interop import export_trace, import_log
from moescope.trace.validate import validate_trace

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MIXTRAL = SHARED_DATA / "mixtral-8x7b-humaneval"
DEEPSEEK = SHARED_DATA / "deepseek-v2-lite-puffin" / "training_data_eamc_prompts_0001-1000.tar.xz"

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present"),
]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    pytest.importorskip("mistral_common")
    out = tmp_path_factory.mktemp("interop") / "mixtral-he"
    return import_log(
        "seed004-routing",
        MIXTRAL / "humaneval_2_routing.jsonl",
        out,
        text=MIXTRAL / "humaneval_2_outputs.jsonl",
        tokenizer="mistral-common:tokenizer.model.v1",
    )


def raw_mixtral() -> list[dict]:
    with open(MIXTRAL / "humaneval_2_routing.jsonl") as f:
        return [json.loads(line) for line in f]


def test_mixtral_published_facts(mixtral) -> None:
    tr = mixtral
    assert validate_trace(tr.path) == []
    assert (tr.num_layers, tr.top_k, tr.num_experts, tr.routing.family) == (32, 2, 8, "mixtral")
    b = tr.load()
    assert collections.Counter(b.doc_id.tolist()) == {0: 83, 1: 255}  # decode tokens per problem
    complete = {d: int((b.experts[b.doc_id == d] != tr.missing_id).all(axis=(0, 2)).sum()) for d in (0, 1)}
    assert complete == {0: 25, 1: 12}  # complete layers: 25 of 32 and 12 of 32
    assert tr.slot_order == "rank"


def test_mixtral_incomplete_series_are_exactly_the_short_ones(mixtral) -> None:
    recs = raw_mixtral()
    count = collections.Counter((r["problem_id"], r["layer"]) for r in recs)
    longest = {p: max(n for (q, _), n in count.items() if q == p) for p in (0, 1)}
    short = sorted((p, layer) for (p, layer), n in count.items() if n < longest[p])
    masked = mixtral.manifest["source"]["report"]["masked_series"]
    assert sorted((s["doc_id"], s["layer"]) for s in masked) == short
    for s in masked:
        assert (s["expected"], s["found"]) == (longest[s["doc_id"]], count[(s["doc_id"], s["layer"])])
    # every cell of a complete series holds exactly its record; every cell of a short one is missing
    b = mixtral.load()
    row = {(int(d), int(p)): i for i, (d, p) in enumerate(zip(b.doc_id, b.position, strict=True))}
    for r in recs:
        i = row.get((r["problem_id"], r["token_idx"]))
        ex = b.experts[i, r["layer"]]
        if (r["problem_id"], r["layer"]) in short:
            assert (ex == mixtral.missing_id).all()
        else:
            assert ex.tolist() == r["experts"]
            assert b.weights[i, r["layer"]].tolist() == [float(np.float32(x)) for x in r["gating_probs"]]


def test_mixtral_token_ids_rebuilt_from_the_generated_text(mixtral) -> None:
    spm = pytest.importorskip("sentencepiece")
    import mistral_common

    sp = spm.SentencePieceProcessor(
        model_file=str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")
    )
    with open(MIXTRAL / "humaneval_2_outputs.jsonl") as f:
        generated = {r["problem_id"]: r["generated"] for r in map(json.loads, f)}
    b = mixtral.load(["doc_id", "token_id", "token"])
    ids0 = b.token_id[b.doc_id == 0].tolist()
    assert sp.decode(ids0) == generated[0]  # the 83 routed tokens are the whole generated text
    ids1 = b.token_id[b.doc_id == 1].tolist()
    assert generated[1].startswith(sp.decode(ids1))  # 256 generated, the last one never routed
    assert [sp.id_to_piece(i) for i in ids0[:3]] == b.token[:3]
    assert mixtral.manifest["source"]["report"]["issues"] == {"short_series": 27}


def test_mixtral_journeys_export_matches_the_raw_records(mixtral, tmp_path) -> None:
    export_trace("seed004-journeys", mixtral, tmp_path, documents=[0], tokens=(0, 10))
    files = sorted(tmp_path.glob("p0_token_*.jsonl"))
    assert len(files) == 10
    raw = {(r["layer"], r["token_idx"]): r for r in raw_mixtral() if r["problem_id"] == 0}
    count = collections.Counter(layer for layer, _ in raw)
    complete = {layer for layer, n in count.items() if n == 83}
    for t in range(10):
        lines = [json.loads(x) for x in (tmp_path / f"p0_token_{t}.jsonl").read_text().splitlines()]
        assert [r["layer"] for r in lines] == sorted(complete)
        for r in lines:
            src = raw[(r["layer"], t)]
            assert r == {k: src[k] for k in ("layer", "experts", "gating_probs", "token_idx")}


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return import_log("moe-beyond", DEEPSEEK, tmp_path_factory.mktemp("interop") / "dsv2-puffin")


def test_deepseek_published_facts(deepseek) -> None:
    tr = deepseek
    assert (tr.num_layers, tr.top_k, tr.num_experts) == (26, 6, 64)
    assert tr.moe_layers == list(range(1, 27)) and tr.routing.n_shared_experts == 2
    assert tr.routing.num_hidden_layers == 27 and tr.routing.family == "deepseek_v2"
    docs = tr.documents()
    assert len(docs) == 999 and 317 not in docs and docs[0] == 1 and docs[-1] == 1000
    assert tr.num_tokens == 94_165
    ex = tr.experts()
    assert (ex != tr.missing_id).all(axis=-1).sum() == 2_448_290  # (token, layer) rows, none missing
    src = tr.manifest["source"]
    assert tr.slot_order == "set" and src["report"]["issues"] == {}


def test_deepseek_prompts_match_the_csv_read_plainly(deepseek) -> None:
    b = deepseek.filter(documents=[1, 2, 500]).load(["doc_id", "token", "experts"])
    with tarfile.open(DEEPSEEK, "r:xz") as tar:
        for m in tar:
            num = m.name.rsplit("prompt_", 1)[-1].split("_")[0] if m.isfile() else None
            if num not in ("1", "2", "500"):
                continue
            rows = list(csv.DictReader(io.TextIOWrapper(tar.extractfile(m), encoding="utf-8")))
            mine = b.doc_id == int(num)
            n = int(mine.sum())
            assert len(rows) == 26 * n
            assert [r["Token"] for r in rows[:n]] == [t for t, k in zip(b.token, mine, strict=True) if k]
            for i, r in enumerate(rows):
                col, t = divmod(i, n)
                assert int(r["Layer ID"]) == col + 1
                assert b.experts[mine][t, col].tolist() == json.loads(r["Activated Expert IDs"])
