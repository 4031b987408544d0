"""`moescope report`: the data the page embeds (against brute force), the output guard, bad inputs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from analysis_helpers import build_trace
from moescope.errors import ConfigError
from moescope.report.atlas import expert_atlas
from moescope.report.build import build_report, changed_sets
from moescope.report.data import display_piece, read_sample
from moescope.trace import Trace


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.exit_code, self.stdout, self.output = code, stdout, stdout + stderr


def invoke(args: list[str]) -> Result:
    """Run ``moescope ARGS`` in-process (as the entry point does: errors become ``Error: ...``, status 1)."""
    import contextlib
    import io

    from moescope.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(args)
    return Result(code, out.getvalue(), err.getvalue())


def _payload(page: str) -> dict:
    m = re.search(r'<script id="moescope-data" type="application/json">(.*?)</script>', page, re.S)
    assert m
    return json.loads(m.group(1))


def test_display_piece_decodes_byte_level_and_sentencepiece():
    assert display_piece("Ġthe", 1) == " the"
    assert display_piece("Ċ", 1) == "\n"
    assert display_piece("Â¶", 1) == "¶"
    assert display_piece("▁bonjour", 1) == " bonjour"
    assert display_piece("é", 1) == "é"  # not byte-level text: kept
    assert display_piece(None, 42) == "#42 "


def test_sample_and_atlas_match_a_brute_force_count(tmp_path):
    tr, _raw = build_trace(tmp_path / "t", docs=6, doc_len=23, E=6, k=2, L=3)
    s = read_sample(tr, max_tokens=50)
    # round-robin over the two labels, bounded, in trace order; the last document is cut
    assert [d["label"] for d in s.docs] == ["x", "y", "x"]
    assert sum(d["n"] for d in s.docs) == len(s.text) == 50
    assert s.truncated == [s.docs[-1]["id"]]
    # entropy from the logits equals scipy's entropy of the softmax, in bits
    b = next(Trace.open(tmp_path / "t").iter_batches(["logits"]))
    x = b.logits[0].astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(s.entropy[0], scipy_entropy(p, base=2, axis=-1), rtol=1e-9)
    # atlas load shares and partners against a plain loop over every row
    a = expert_atlas(tr)
    ex = np.concatenate([bb.experts for bb in tr.iter_batches(["experts"])]).astype(int)
    E = tr.num_experts
    for j in range(3):
        cnt = np.zeros(E)
        pair = np.zeros((E, E))
        for row in ex[:, j]:
            if (row == tr.missing_id).any():
                continue
            for e in row:
                cnt[e] += 1
            pair[row[0], row[1]] += 1
            pair[row[1], row[0]] += 1
        np.testing.assert_allclose(a["load"][j], np.round(cnt / cnt.sum(), 5))
        toks = np.concatenate([bb.token_id for bb in tr.iter_batches(["token_id"])])
        for e in range(E):
            for _text, lift, n in a["tokens"][j][e]:
                tid = int(_text.strip("# "))  # the hand-built trace has no text: pieces are "#id "
                rows = toks == tid
                assert n == (ex[rows, j] == e).sum()
                assert lift == pytest.approx(n / rows.sum() / (cnt[e] / len(ex)), abs=0.006)  # 2 decimals
            if a["same"][j][e]:
                top, share = a["same"][j][e][0]
                assert share == pytest.approx(pair[e].max() / cnt[e], abs=1e-4)
                assert pair[e, top] == pair[e].max()


def _brute_atlas(raw: dict, stride: int) -> dict:
    """The atlas's counts by a plain loop over every row and slot (Python sets and dicts, no numpy groupby)."""
    from collections import Counter

    ex, tok, lab = raw["experts"].astype(int), raw["tok"].astype(int), raw["label"]
    L, miss = raw["L"], raw["sentinel"]
    load, first, dom, dom_tok, lay_tok = Counter(), Counter(), Counter(), Counter(), Counter()
    sub_load, same, nxt, tok_n, tok_e = Counter(), Counter(), Counter(), Counter(), Counter()
    for i in range(len(ex)):
        sampled = i % stride == 0
        if sampled:
            tok_n[tok[i]] += 1
        for j in range(L):
            row = [int(e) for e in ex[i, j] if e != miss]
            if ex[i, j, 0] != miss:  # routing recorded for this token at this layer
                first[j, int(ex[i, j, 0])] += 1
                lay_tok[j] += 1
                dom_tok[lab[i], j] += 1
            for e in row:
                load[j, e] += 1
                dom[lab[i], j, e] += 1
            if not sampled:
                continue
            for s, e in enumerate(row):
                sub_load[j, e] += 1
                tok_e[j, e, tok[i]] += 1
                for t, f in enumerate(row):
                    if s != t:
                        same[j, e, f] += 1
                if j + 1 < L:
                    for f in ex[i, j + 1]:
                        if f != miss:
                            nxt[j, e, int(f)] += 1
    return {
        "n": len(ex), "seen": len(range(0, len(ex), stride)), "load": load, "first": first, "dom": dom,
        "dom_tok": dom_tok, "lay_tok": lay_tok, "sub_load": sub_load, "same": same, "nxt": nxt, "tok_n": tok_n, "tok_e": tok_e,
    }  # fmt: skip


def _top(scores: dict, n: int = 5) -> list:
    """Keys by descending score, ties by ascending key (the atlas's stable order), first ``n``."""
    return sorted(scores, key=lambda x: (-scores[x], x))[:n]


@pytest.mark.parametrize("dense", [True, False], ids=["dense-token-table", "sorted-token-keys"])
def test_atlas_matches_a_brute_force_loop_over_rows_and_slots(tmp_path, monkeypatch, dense):
    import moescope.report.atlas as atlas_mod

    if not dense:
        monkeypatch.setattr(atlas_mod, "DENSE_CELLS", 0)
    tr, raw = build_trace(tmp_path / "t", docs=9, doc_len=31, E=6, k=3, L=4, labels=("x", "y", "z"), vocab=7)
    E, L = raw["E"], raw["L"]
    # stride 5 and batches of 50 rows over shards of 40: the sample crosses batch and shard edges
    a = expert_atlas(tr, token_rows=60, batch_size=50)
    assert a["stride"] == 5
    b = _brute_atlas(raw, 5)
    assert a["token_rows"] == b["seen"]
    for j in range(L):
        tot = sum(b["load"][j, e] for e in range(E))
        ftot = sum(b["first"][j, e] for e in range(E))
        for e in range(E):
            assert a["load"][j][e] == pytest.approx(b["load"][j, e] / tot, abs=1e-5)
            assert a["per_token"][j][e] == pytest.approx(b["load"][j, e] / b["lay_tok"][j], abs=1e-5)
            assert a["first"][j][e] == pytest.approx(b["first"][j, e] / ftot, abs=1e-5)
            for key, cnt in (("same", b["same"]), ("next", b["nxt"])):
                if key == "next" and j == L - 1:
                    continue
                p = {f: cnt[j, e, f] / max(b["sub_load"][j, e], 1) for f in range(E) if cnt[j, e, f]}
                want = [[f, round(p[f], 4)] for f in _top(p)]
                assert a[key][j][e] == want, (key, j, e)
            base = b["load"][j, e] / b["lay_tok"][j]
            lift = {d: b["dom"][d, j, e] / b["dom_tok"][d, j] / base for d in ("x", "y", "z")}
            got = a["domains"][j][e]
            assert [g[0] for g in got] == _top(lift)
            for d, li, c in got:
                assert li == pytest.approx(lift[d], abs=1e-3) and c == b["dom"][d, j, e]
            sbase = b["sub_load"][j, e] / b["seen"]
            toks = {}
            for t in range(7):
                c, n = b["tok_e"][j, e, t], b["tok_n"][t]
                if n >= 3 and c and c / n / sbase > 1:
                    toks[t] = (c * np.log(c / n / sbase), c)
            want = sorted(toks, key=lambda t: (-toks[t][0], -toks[t][1], t))[:5]
            assert [int(x[0].strip("# ")) for x in a["tokens"][j][e]] == want, (j, e)
            for text, li, c in a["tokens"][j][e]:
                t = int(text.strip("# "))
                assert c == b["tok_e"][j, e, t]
                assert li == pytest.approx(c / b["tok_n"][t] / sbase, abs=0.006)


def test_atlas_reuses_the_analysis_folders_counts(tmp_path):
    from moescope.analysis.run import AnalyzeOptions, run_analyses

    tr, _raw = build_trace(
        tmp_path / "t", docs=8, doc_len=25, E=6, k=3, L=3, labels=("x", "y"), missing_frac=0.1
    )
    ana = tmp_path / "ana"
    names = ["load", "specialisation", "cooccurrence"]
    run_analyses(tr.path, ana, AnalyzeOptions(analyses=names, permutations=10, progress=False))
    counted = expert_atlas(tr)  # every row sampled (stride 1): same-layer partners over all tokens too
    reused = expert_atlas(tr, analysis=ana)
    assert reused["reused"] == ["load_per_expert.csv", "domain_share.csv", "coactivation.csv"]
    assert counted["reused"] == []
    for key in ("load", "per_token", "first", "same", "next", "domains", "tokens"):
        assert reused[key] == counted[key], key
    # counts of another token count (a subset, another trace) are not taken
    s = json.loads((ana / "summary.json").read_text())
    s["tokens"] += 1
    (ana / "summary.json").write_text(json.dumps(s))
    assert expert_atlas(tr, analysis=ana)["reused"] == []


def test_changed_sets_against_python_sets():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, (40, 3, 2))
    b = a.copy()
    b[::3, 1] = b[::3, 1][:, ::-1]  # same set, other order
    b[::5, 2, 0] = (b[::5, 2, 0] + 1) % 5
    a[7, 0, 1] = -1
    got = changed_sets(a, b, False, False)
    for i in range(40):
        for j in range(3):
            if (a[i, j] < 0).any():
                assert got[i, j] == -1
            else:
                assert got[i, j] == int(set(a[i, j]) != set(b[i, j]))


def test_report_command_writes_one_self_contained_page_and_guards_it(tmp_path):
    tr, _ = build_trace(tmp_path / "t", docs=4, doc_len=20)
    ana = tmp_path / "ana"
    assert (
        invoke(["analyze", str(tr.path), "-o", str(ana), "--analyses", "load,entropy,repetition"]).exit_code
        == 0
    )
    out = tmp_path / "r.html"
    res = invoke(["report", str(tr.path), "--analysis", str(ana), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    page = out.read_text(encoding="utf-8")
    assert info["bytes"] == len(page.encode())
    assert '<meta name="generator" content="moescope report">' in page[:2000]
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere
    data = _payload(page)
    assert data["meta"]["sample_tokens"] == tr.num_tokens
    assert [a["name"] for a in data["analyses"]] == ["load", "entropy", "repetition"]
    for name in ("load", "entropy", "repetition"):
        assert f'id="analysis-{name}"' in page
    # an existing report needs --overwrite; a file moescope did not write is never replaced
    again = invoke(["report", str(tr.path), "--analysis", str(ana), "-o", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert (
        invoke(["report", str(tr.path), "--analysis", str(ana), "-o", str(out), "--overwrite"]).exit_code == 0
    )
    foreign = tmp_path / "notes.html"
    foreign.write_text("<html>mine</html>")
    res = invoke(["report", str(tr.path), "--analysis", str(ana), "-o", str(foreign), "--overwrite"])
    assert res.exit_code == 1 and "leaves this alone" in res.output
    assert foreign.read_text() == "<html>mine</html>"


def test_report_computes_the_analyses_when_no_folder_is_given(tmp_path):
    tr, _ = build_trace(tmp_path / "t", docs=3, doc_len=15)
    page, info = build_report(tr.path, analyses=["load", "entropy"])
    assert info["analysis"] == "computed in-process"
    assert [a["name"] for a in _payload(page)["analyses"]] == ["load", "entropy"]


def test_progress_bar_on_a_terminal_never_in_json_output(tmp_path, monkeypatch):
    import moescope.report.commands as cmd

    tr, _ = build_trace(tmp_path / "t", docs=3, doc_len=15)
    ana = tmp_path / "ana"
    assert invoke(["analyze", str(tr.path), "-o", str(ana), "--analyses", "load"]).exit_code == 0
    monkeypatch.setattr(cmd, "progress_enabled", lambda: True)  # as if stderr were a terminal
    res = invoke(["report", str(tr.path), "--analysis", str(ana), "-o", str(tmp_path / "a.html")])
    assert res.exit_code == 0
    bar = res.output[len(res.stdout) :]
    assert "report: expert atlas" in bar and f"{tr.num_tokens}/{tr.num_tokens} tokens" in bar
    # --json: stdout is one JSON document and stderr carries no bar
    res = invoke(["report", str(tr.path), "--analysis", str(ana), "-o", str(tmp_path / "b.html"), "--json"])
    assert res.exit_code == 0
    assert json.loads(res.stdout)["bytes"] > 0
    assert "expert atlas" not in res.output
    # not a terminal (scripts, CI logs): no bar either
    monkeypatch.setattr(cmd, "progress_enabled", lambda: False)
    res = invoke(["report", str(tr.path), "--analysis", str(ana), "-o", str(tmp_path / "c.html")])
    assert res.exit_code == 0 and "expert atlas" not in res.output


def test_analysis_folder_of_another_trace_shape_is_refused(tmp_path):
    tr, _ = build_trace(tmp_path / "t", docs=3, doc_len=15, E=6)
    other, _ = build_trace(tmp_path / "o", docs=3, doc_len=15, E=8)
    ana = tmp_path / "ana"
    assert invoke(["analyze", str(other.path), "-o", str(ana), "--analyses", "load"]).exit_code == 0
    with pytest.raises(
        ConfigError, match=rf"`analysis` {re.escape(str(ana))}: written for .*{re.escape(str(other.path))}"
    ):
        build_report(tr.path, analysis=ana)
    (tmp_path / "empty").mkdir()
    res = invoke(
        ["report", str(tr.path), "--analysis", str(tmp_path / "empty"), "-o", str(tmp_path / "r.html")]
    )
    assert res.exit_code == 1 and "no summary.json" in res.output


@pytest.mark.slow
def test_bad_inputs_from_the_demo_name_the_files(demo_out, tmp_path):
    out, _ = demo_out
    mix, fine = out / "trace-tiny-mixtral", out / "trace-tiny-finegrained"
    # an analysis folder of the other model
    with pytest.raises(ConfigError, match=r"analysis-tiny-finegrained.*tiny-finegrained.*trace-tiny-mixtral"):
        build_report(mix, analysis=out / "analysis-tiny-finegrained")
    # a predictor fitted on the other model
    model = out / "cooccurrence-tiny-finegrained.npz"
    with pytest.raises(
        ConfigError, match=rf"`predict` {re.escape(str(model))}: fitted on .*trace-tiny-mixtral"
    ):
        build_report(mix, analysis=out / "analysis-tiny-mixtral", predict=model)
    # a compare trace holding other tokens (the held-out split of the same model's trace)
    test_split = out / "split-tiny-finegrained" / "test"
    with pytest.raises(ConfigError, match=rf"`compare` {re.escape(str(test_split))}.*{re.escape(str(fine))}"):
        build_report(fine, analysis=out / "analysis-tiny-finegrained", compare=test_split)
    res = invoke(
        [
            "report",
            str(mix),
            "--analysis",
            str(out / "analysis-tiny-mixtral"),
            "--compare",
            str(fine),
            "-o",
            str(tmp_path / "r.html"),
        ]
    )
    assert res.exit_code == 1 and str(fine) in res.output


def test_prediction_hits_match_the_previous_tokens_sets(tmp_path):
    """A previous-token predictor's hit count per token is |prev set & own set|, counted here by hand."""
    from moescope.predict import FrequencyPredictor

    tr, _ = build_trace(tmp_path / "t", docs=4, doc_len=20, missing_frac=0.1)
    model = tmp_path / "prev.npz"
    FrequencyPredictor(strategy="previous_token").fit(tr).save(model)
    page, _ = build_report(tr.path, analyses=["load"], predict=model)
    hits = _payload(page)["predict"]["hits"]
    b = tr.load(["doc_id", "position", "experts"])
    ex, miss = b.experts.astype(int), tr.missing_id
    checked = 0
    for i in range(1, len(ex)):
        if b.doc_id[i] != b.doc_id[i - 1]:
            continue
        for j in range(ex.shape[1]):
            if (ex[i, j] == miss).any() or (ex[i - 1, j] == miss).any():
                continue
            assert hits[j][i] == len(set(ex[i, j]) & set(ex[i - 1, j])), (i, j)
            checked += 1
    assert checked > 100


@pytest.mark.slow
def test_ablation_impacts_reach_the_atlas_cards(demo_out):
    import csv

    out, _ = demo_out
    abl = out / "ablate-tiny-mixtral-layer3"
    page, _ = build_report(out / "trace-tiny-mixtral", analysis=out / "analysis-tiny-mixtral", ablation=abl)
    rows = _payload(page)["ablation"]["rows"]
    with (abl / "ranking.csv").open() as f:
        want = {(int(r["layer"]), int(r["experts"])): float(r["impact"]) for r in csv.DictReader(f)}
    assert {(r[0], r[1]): r[2] for r in rows} == pytest.approx(want)
    with pytest.raises(ConfigError, match=rf"`ablation` {re.escape(str(abl))}: ablates model tiny-mixtral"):
        build_report(out / "trace-tiny-finegrained", analysis=out / "analysis-tiny-finegrained", ablation=abl)
