"""Variable-k strategy traces: every reader masks padding slot by slot (issue 17).

A synthetic strategy trace (each token uses 1..K experts, the rest of its row is the missing-id
sentinel with weight 0, ``capture.variable_k``) is read by each analysis, the predictor scorer and
the simulator's demand; every result is checked against a plain-Python count that drops padded
slots. A CLI test runs analyze, predict fit/eval and simulate on a trace captured under
``topp:p=0.7``.
"""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import polars as pl
import pytest

from moescope.trace import RoutingSpec, Trace, TraceWriter, missing_id
from moescope.trace.schema import default_columns

E, K, L = 6, 4, 3


def _rows(seed: int = 0, docs: int = 12, doc_len: int = 40) -> dict:
    rng = np.random.default_rng(seed)
    n = docs * doc_len
    experts = np.full((n, L, K), missing_id(E), np.uint8)
    weights = np.zeros((n, L, K), np.float32)
    counts = rng.integers(1, K + 1, size=(n, L))
    for t in range(n):
        for li in range(L):
            c = counts[t, li]
            # skewed choice so that statistics are not all at their nulls
            p = np.array([6, 5, 4, 3, 2, 1], float) if (t // doc_len) % 2 else np.ones(E)
            ids = rng.choice(E, size=c, replace=False, p=p / p.sum())
            experts[t, li, :c] = ids
            w = rng.random(c).astype(np.float32)
            weights[t, li, :c] = w / w.sum()
    doc = np.repeat(np.arange(docs), doc_len)
    return {
        "doc": doc,
        "position": np.tile(np.arange(doc_len), docs),
        "token": rng.integers(0, 12, n),
        "label": np.where(doc % 2 == 1, "code", "prose"),
        "experts": experts,
        "weights": weights,
    }


@pytest.fixture(scope="module")
def vk(tmp_path_factory):
    """``(trace, rows)``: a synthetic variable-k strategy trace and the arrays written to it."""
    a = _rows()
    path = tmp_path_factory.mktemp("vk") / "t"
    capture = {"strategy": "topp:p=0.7", "model_top_k": 2, "variable_k": True}
    return _write(path, a, a["experts"], a["weights"], capture), a


def _write(path, a: dict, experts: np.ndarray, weights: np.ndarray | None = None, capture=None) -> Trace:
    """A trace of ``a``'s documents with these ``experts`` (and ``weights``), one commit per document."""
    spec = RoutingSpec(num_experts=E, top_k=K, moe_layers=list(range(L)), family="mixtral")
    cols = default_columns(weights=weights is not None)
    with TraceWriter.create(path, spec, columns=cols, capture=capture) as w:
        for d in np.unique(a["doc"]):
            m = a["doc"] == d
            extra = {} if weights is None else {"weights": weights[m]}
            w.append(
                doc_id=a["doc"][m],
                position=a["position"][m],
                token_id=a["token"][m],
                label=str(a["label"][m][0]),
                experts=experts[m],
                **extra,
            )
            w.commit(int(d))
    return Trace.open(path)


def _sets(a: dict, t: int, li: int) -> list[int]:
    """The experts token ``t`` used at layer ``li`` (padding dropped), in slot order."""
    return [int(e) for e in a["experts"][t, li] if e != missing_id(E)]


def _layer_pair_counts(a: dict, n: int, li: int) -> np.ndarray:
    """(E, E) counts of expert x at layer ``li`` with expert y at ``li + 1`` over the first ``n`` tokens."""
    m = np.zeros((E, E), int)
    for t in range(n):
        for x in _sets(a, t, li):
            for y in _sets(a, t, li + 1):
                m[x, y] += 1
    return m


def _pairs(a: dict):
    """Consecutive (t, t+1) token pairs of the same document."""
    for t in range(len(a["doc"]) - 1):
        if a["doc"][t] == a["doc"][t + 1] and a["position"][t + 1] == a["position"][t] + 1:
            yield t, t + 1


def test_load_counts_only_used_slots(vk):
    from moescope.analysis.load import load_balance

    trace, a = vk
    df = load_balance(trace)
    for li in range(L):
        counts = np.zeros(E)
        wsum = np.zeros(E)
        first = np.zeros(E)
        for t in range(len(a["doc"])):
            s = _sets(a, t, li)
            first[s[0]] += 1
            for slot, e in enumerate(s):
                counts[e] += 1
                wsum[e] += a["weights"][t, li, slot]
        g = df.filter(pl.col("layer") == li).sort("expert")
        assert g["assignments"].to_list() == counts.astype(int).tolist()
        assert g["first_choice_count"].to_list() == first.astype(int).tolist()
        np.testing.assert_allclose(g["assignment_share"].to_numpy(), counts / counts.sum())
        np.testing.assert_allclose(g["mean_router_weight"].to_numpy(), wsum / counts, rtol=1e-6)
        assert g["tokens"][0] == len(a["doc"])


def test_coactivation_and_transitions_mask_padding(vk):
    from moescope.analysis.cooccurrence import coactivation, layer_transitions

    trace, a = vk
    co = coactivation(trace)
    tr = layer_transitions(trace, distances=[1])
    assert set(tr["summary"]["alphabet"]) == {"expert"}  # k-subsets are undefined for variable k
    from moescope.errors import ConfigError

    with pytest.raises(ConfigError, match="alphabet subset: a variable-k strategy trace"):
        layer_transitions(trace, alphabet="subset")
    n = len(a["doc"])
    for li in range(L):
        pair = np.zeros((E, E))
        single = np.zeros(E)
        cc = sc = 0
        for t in range(n):
            s = _sets(a, t, li)
            c = len(s)
            cc, sc = cc + c * (c - 1), sc + c
            for x in s:
                single[x] += 1
            for x, y in itertools.permutations(s, 2):
                pair[x, y] += 1
        g = co.filter(pl.col("layer") == li)
        for row in g.iter_rows(named=True):
            assert row["count_ab"] == pair[row["a"], row["b"]]
            assert row["count_a"] == single[row["a"]]
        assert g["null_p_b_given_a"][0] == pytest.approx(cc / (sc * (E - 1)))
    for li in range(L - 1):
        m = _layer_pair_counts(a, n, li)
        cells = tr["cells"].filter(pl.col("layer_from") == li)
        got = np.zeros((E, E), int)
        for row in cells.iter_rows(named=True):
            got[row["i"], row["j"]] = row["count"]
        assert np.array_equal(got, m)


def test_repetition_masks_padding_and_uses_each_pairs_sizes(vk):
    from moescope.analysis.locality import repetition

    trace, a = vk
    rep = repetition(trace).filter(pl.col("domain") == "all")
    for li in range(L):
        pairs = shared = same_first = 0
        null = 0.0
        for t, u in _pairs(a):
            x, y = _sets(a, t, li), _sets(a, u, li)
            pairs += 1
            shared += bool(set(x) & set(y))
            same_first += x[0] == y[0]
            null += 1 - comb(E - len(x), len(y)) / comb(E, len(y))
        row = rep.filter(pl.col("layer") == li).row(0, named=True)
        assert row["pairs"] == pairs
        assert row["any_shared"] == pytest.approx(shared / pairs)
        assert row["any_shared_null"] == pytest.approx(null / pairs)
        if row["first_choice_same"] is not None:
            assert row["first_choice_same"] == pytest.approx(same_first / pairs)


def test_specialisation_counts_slots_and_occurrences(vk):
    from moescope.analysis.specialisation import domain_specialisation, vocabulary_specialisation

    trace, a = vk
    n = len(a["doc"])
    voc = vocabulary_specialisation(trace, min_count=1)
    per = voc["per_token"]
    for li in range(L):
        for tok in np.unique(a["token"]):
            rows = [t for t in range(n) if a["token"][t] == tok]
            c = np.zeros(E)
            for t in rows:
                for e in _sets(a, t, li):
                    c[e] += 1
            r = per.filter((pl.col("layer") == li) & (pl.col("token_id") == int(tok))).row(0, named=True)
            assert r["occurrences"] == len(rows)
            assert r["top_expert_fraction"] == pytest.approx(c.max() / len(rows))
    dom = domain_specialisation(trace, n_perm=20)["share"]
    total_slots = sum(len(_sets(a, t, li)) for t in range(n) for li in range(L))
    for lab in ("code", "prose"):
        rows = [t for t in range(n) if a["label"][t] == lab]
        for li in range(L):
            c = np.zeros(E)
            for t in rows:
                for e in _sets(a, t, li):
                    c[e] += 1
            g = dom.filter((pl.col("domain") == lab) & (pl.col("layer") == li)).sort("expert")
            assert g["count"].to_list() == c.astype(int).tolist()
            np.testing.assert_allclose(g["uniform_fraction"].to_numpy(), total_slots / (n * L) / E)


def test_trajectories_and_dependence_ignore_padding(vk):
    from moescope.analysis._stream import make_context, run_pass
    from moescope.analysis.dependence import DependenceAccumulator
    from moescope.analysis.trajectories import TrajectoryAccumulator

    trace, a = vk
    n = len(a["doc"])
    ctx = make_context(trace)
    tacc, dacc = TrajectoryAccumulator(ctx, max_tokens=10**6), DependenceAccumulator(ctx, 10**6)
    run_pass(ctx, [tacc, dacc])
    sample = tacc.result()
    X = sample.encodings()
    want = np.zeros((n, L * E), np.float32)
    for t in range(n):
        for li in range(L):
            for e in _sets(a, t, li):
                want[t, li * E + e] = 1
    assert np.array_equal(X, want)
    paths = sample.top_paths(top=5)
    from collections import Counter

    full = Counter(
        " > ".join("-".join(map(str, sorted(_sets(a, t, li)))) for li in range(L)) for t in range(n)
    )
    for row in paths.iter_rows(named=True):
        assert row["count"] == full[row["path"]]
    assert paths["count"][0] == max(full.values())
    dep = dacc.result()
    for li in range(L - 1):
        m = _layer_pair_counts(a, n, li)
        assert np.array_equal(dep.pair_counts(li, li + 1), m)
    corr = dep.correlation_frame().filter((pl.col("variable") == "indicator") & (pl.col("layer_from") == 0))
    x = want[:, :E].astype(float)
    y = want[:, E : 2 * E].astype(float)
    r = np.corrcoef(x.T, y.T)[:E, E:]
    got = np.full((E, E), np.nan)
    for row in corr.iter_rows(named=True):
        got[row["expert_from"], row["expert_to"]] = row["pearson_r"]
    np.testing.assert_allclose(got, r, atol=1e-9)


def test_analyze_runs_every_analysis_on_a_variable_k_trace(vk, tmp_path):
    from moescope.analysis.run import analyze

    trace, _ = vk
    summary = analyze(trace, tmp_path / "a")
    assert set(summary["analyses"]) >= {"load", "cooccurrence", "repetition", "specialisation"}
    assert any("variable-k strategy trace (topp:p=0.7)" in n for n in summary["notes"])


def _brute_metrics(scores: np.ndarray, sets: list[list[int]], budgets: list[int]) -> np.ndarray:
    """Per query: slot recall, top-1, exact, recall@m, precision@m, coverage at the query's own k."""
    out = []
    for s, act in zip(scores, sets, strict=True):
        order = sorted(range(len(s)), key=lambda e: (-s[e], e))  # descending, ties to the lower id
        c = len(act)
        hit = {m: len(set(order[:m]) & set(act)) for m in {c, *budgets}}
        row = [hit[c] / c, float(order[0] in act), float(set(order[:c]) == set(act))]
        row += [hit[m] / c for m in budgets] + [hit[m] / m for m in budgets] + [1.0]
        out.append(row)
    return np.array(out)


def test_score_kernel_divides_by_each_querys_own_k():
    from moescope.predict.metrics import score_metrics

    rng = np.random.default_rng(3)
    n, budgets = 500, [2, 4]
    scores = rng.random((n, E)).astype(np.float32)
    scores[:50, :3] = 0.5  # ties go to the lower id
    actual = np.full((n, K), missing_id(E), np.uint8)
    sets = []
    for i in range(n):
        c = rng.integers(1, K + 1)
        ids = rng.choice(E, size=c, replace=False)
        actual[i, :c] = ids
        sets.append(ids.tolist())
    got = score_metrics(scores, actual, E, missing_id(E), budgets, variable_k=True)
    np.testing.assert_allclose(got, _brute_metrics(scores, sets, budgets))


def test_predictor_evaluation_on_a_variable_k_trace(vk):
    from moescope.predict.baselines import FrequencyPredictor
    from moescope.predict.evaluate import evaluate

    trace, a = vk
    p = FrequencyPredictor(strategy="most_frequent").fit(trace)
    res = evaluate(p, trace, budgets=[2, 4])
    table = pl.DataFrame(res.table)
    n = len(a["doc"])
    for li in range(L):
        pop = np.zeros(E)
        for t in range(n):
            for e in _sets(a, t, li):
                pop[e] += 1
        sets = [_sets(a, t, li) for t in range(n)]
        want = _brute_metrics(np.tile(pop, (n, 1)), sets, [2, 4]).mean(0)
        rows = table.filter((pl.col("layer") == li) & (pl.col("metric") == "slot_recall"))
        assert rows["value"][0] == pytest.approx(want[0])
        assert rows["queries"][0] == n
        exact = table.filter((pl.col("layer") == li) & (pl.col("metric") == "exact"))["value"][0]
        assert exact == pytest.approx(want[2])
    counts = np.bincount([len(_sets(a, t, li)) for t in range(n) for li in range(L)], minlength=K + 1)
    want_rand = sum(counts[c] * c / E for c in range(K + 1)) / counts.sum()
    assert res.summary["random"]["slot_recall"] == pytest.approx(want_rand)


def test_simulator_demand_requests_only_used_slots(vk):
    from moescope.simulate import LRU, ModelCost, get_preset, simulate
    from moescope.simulate.engine import prepare

    trace, a = vk
    n = len(a["doc"])
    steps = prepare(trace, mode="decode")
    for t in range(0, n, 37):
        for li in range(L):
            got = [int(e) for e in steps.demand[t, li] if e >= 0]
            assert got == _sets(a, t, li)
    pre = prepare(trace, mode="prefill")  # one step per document: the union, by count then id
    for d in np.unique(a["doc"]):
        rows = np.flatnonzero(a["doc"] == d)
        for li in range(L):
            c = np.zeros(E)
            for t in rows:
                for e in _sets(a, t, li):
                    c[e] += 1
            want = [e for e in sorted(range(E), key=lambda e: (-c[e], e)) if c[e] > 0]
            assert [int(e) for e in pre.demand[d, li] if e >= 0] == want
    # every expert fits: each used slot is one access, each layer's distinct experts one cold miss
    res = simulate(
        trace, LRU(), np.full(L, E), get_preset("rtx4090-pcie4"), ModelCost(expert_params=6144, top_k=2)
    )
    per = res.per_layer()
    for li in range(L):
        used = [e for t in range(n) for e in _sets(a, t, li)]
        assert per["accesses"][li] == len(used)
        assert per["demand_misses"][li] == len(set(used))


@pytest.mark.slow
def test_cli_analyze_predict_simulate_on_a_top_p_capture(tmp_path):
    """The commands a user runs next, on a trace captured under topp:p=0.7, end to end."""
    import json

    from typer.testing import CliRunner

    from moescope.capture.runner import CaptureOptions, capture
    from moescope.cli import app

    data = tmp_path / "d.txt"
    data.write_text(
        "In the beginning God created the heaven and the earth.\n\nAnd the earth was without form, and void.\n\n"
        "And God said, Let there be light: and there was light.\n\nAnd God saw the light, that it was good.\n"
    )
    trace = tmp_path / "p"
    capture("tiny:mixtral", [str(data)], trace, CaptureOptions(strategy="topp:p=0.7"), device="cpu")
    t = Trace.open(trace)
    b = next(t.iter_batches(["experts"]))
    used = (b.experts != t.missing_id).sum(-1)
    assert t.manifest["capture"]["variable_k"] and used.min() >= 1 and (used < t.top_k).any()
    runner = CliRunner()
    r = runner.invoke(app, ["analyze", str(trace), "-o", str(tmp_path / "a"), "--json"])
    assert r.exit_code == 0, r.output
    load = pl.read_csv(next((tmp_path / "a").rglob("load_per_expert.csv")))
    for li, layer in enumerate(t.moe_layers):
        counts = np.bincount(b.experts[:, li][b.experts[:, li] != t.missing_id], minlength=t.num_experts)
        got = load.filter(pl.col("layer") == layer).sort("expert")["assignments"].to_numpy()
        assert np.array_equal(got, counts)
    model = tmp_path / "m.npz"
    r = runner.invoke(app, ["predict", "fit", str(trace), "-p", "popularity", "-o", str(model)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["predict", "eval", str(model), str(trace), "--n-boot", "20", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    mode = next(iter(doc["modes"].values()))
    assert 0 < mode["queries"] <= len(b.experts) * t.num_layers and mode["queries"] % t.num_layers == 0
    mean_k = used.mean()  # the random ranking's slot recall is each query's own k over E
    assert mode["overall"]["slot_recall"]["random"] == pytest.approx(mean_k / t.num_experts, rel=0.25)
    r = runner.invoke(
        app,
        [
            "simulate",
            str(trace),
            "--expert-params",
            "6144",
            "--cache-fraction",
            "0.5",
            "-o",
            str(tmp_path / "s"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output


def _figure_texts(monkeypatch, trace, out) -> str:
    """Every title, axis label and legend entry of the figures ``analyze`` saves for ``trace``."""
    import matplotlib.figure

    from moescope.analysis.run import analyze

    texts: list[str] = []
    save = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        texts.extend(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    analyze(trace, out, analyses=["load", "repetition", "specialisation"])
    return "\n".join(texts)


def test_figures_of_a_variable_k_trace_do_not_claim_a_fixed_k(vk, tmp_path, monkeypatch):
    trace, a = vk
    rng = np.random.default_rng(1)
    full = np.argsort(rng.random((len(a["doc"]), L, E)), -1)[..., :K].astype(np.uint8)
    plain = _figure_texts(monkeypatch, _write(tmp_path / "fixed", a, full), tmp_path / "a_fixed")
    assert "top-k" in plain and f"top-{K}" in plain and "k/E" in plain and "C(E-k,k)" in plain
    variable = _figure_texts(monkeypatch, trace, tmp_path / "a_vk")
    for claim in ("top-k", f"top-{K}", "k/E", "C(E-k,k)"):
        assert claim not in variable, claim
    assert f"variable experts per token, up to {K}" in variable
    assert "mean experts per token / E" in variable
