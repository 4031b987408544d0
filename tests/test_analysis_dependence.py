"""Seed 000's dependence statistics against independent computations: scipy.stats, a brute-force
permutation loop, and a planted bicluster that spectral co-clustering must recover."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import polars as pl
import pytest
from scipy import stats

from analysis_helpers import build_trace
from moescope.analysis import dependence as D
from moescope.analysis._stream import make_context, run_pass
from moescope.errors import ConfigError


def test_correlations_equal_scipy():
    rng = np.random.default_rng(0)
    n, E = 60, 5
    x = (rng.random((n, E)) < 0.4).astype(float)
    y = np.clip(x[:, ::-1] + (rng.random((n, E)) < 0.2), 0, 1) * rng.uniform(0.2, 1.0, (n, E))
    res = D.correlations(x, y)
    for a in range(E):
        for b in range(E):
            r, p = stats.pearsonr(x[:, a], y[:, b])
            rho, q = stats.spearmanr(x[:, a], y[:, b])
            assert res["pearson_r"][a, b] == pytest.approx(r, abs=1e-12)
            assert res["pearson_p"][a, b] == pytest.approx(p, rel=1e-9, abs=1e-15)
            assert res["spearman_rho"][a, b] == pytest.approx(rho, abs=1e-12)
            assert res["spearman_p"][a, b] == pytest.approx(q, rel=1e-6, abs=1e-15)
    const = D.correlations(np.ones((10, 2)), rng.random((10, 2)))
    assert np.isnan(const["pearson_r"]).all() and np.isnan(const["pearson_p"]).all()


def _mi_corrected(x, y):
    """Plug-in MI (bits) minus the Miller-Madow bias, by counting in plain Python."""
    n = len(x)
    cxy, cx, cy = Counter(zip(x, y, strict=True)), Counter(x), Counter(y)
    mi = sum(c / n * math.log2((c / n) / ((cx[a] / n) * (cy[b] / n))) for (a, b), c in cxy.items())
    bias = max(0.0, (len(cxy) - len(cx) - len(cy) + 1) / (2 * n * math.log(2)))
    return max(0.0, mi) - bias


def test_mi_permutation_equals_a_brute_force_loop():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, 30)
    y = (x + (rng.random(30) < 0.3) * rng.integers(0, 4, 30)) % 4
    got = D.mi_permutation_test(x, y, 4, permutations=99, seed=5)
    obs = _mi_corrected(x.tolist(), y.tolist())
    perm_rng = np.random.default_rng(5)
    null = []
    for _ in range(99):
        yp = y[perm_rng.permutation(30)]
        null.append(_mi_corrected(x.tolist(), yp.tolist()))
    assert got["mi_corrected_bits"] == pytest.approx(obs, abs=1e-12)
    assert got["shuffled_mean_bits"] == pytest.approx(np.mean(null), abs=1e-12)
    assert got["excess_bits"] == pytest.approx(obs - np.mean(null), abs=1e-12)
    assert got["p_value"] == pytest.approx((1 + sum(v >= obs - 1e-12 for v in null)) / 100)
    assert got["p_value"] < 0.05  # y follows x most of the time


def test_mi_permutation_p_value_is_uniform_ish_under_independence():
    rng = np.random.default_rng(1)
    ps = [
        D.mi_permutation_test(rng.integers(0, 3, 50), rng.integers(0, 3, 50), 3, permutations=49, seed=s)[
            "p_value"
        ]
        for s in range(60)
    ]
    assert 0.02 < np.mean(np.asarray(ps) <= 0.1) < 0.25  # about 10% under the null


def test_planted_bicluster_is_recovered():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(7)
    A, K = 28, 4
    truth_r = rng.permutation(np.arange(A) % K)
    truth_c = rng.permutation(np.arange(A) % K)
    lam = np.where(truth_r[:, None] == truth_c[None, :], 40.0, 1.0)
    counts = rng.poisson(lam)
    rl, cl, st = D.bicluster(counts, K, seed=0)
    assert adjusted_rand_score(truth_r, rl) == 1.0 and adjusted_rand_score(truth_c, cl) == 1.0
    assert st["clusters"] == K and st["block_share"] > 0.85 > 0.3 > st["block_share_null"]
    # empty rows / columns are labelled -1 and do not break the fit
    counts[3] = 0
    counts[:, 5] = 0
    rl, cl, _ = D.bicluster(counts, K, seed=0)
    assert rl[3] == -1 and cl[5] == -1
    keep_r, keep_c = np.arange(A) != 3, np.arange(A) != 5
    assert adjusted_rand_score(truth_r[keep_r], rl[keep_r]) == 1.0
    assert adjusted_rand_score(truth_c[keep_c], cl[keep_c]) == 1.0
    rl2, _cl2, st2 = D.bicluster(rng.poisson(lam), K, method="bicluster", seed=0)
    assert st2["clusters"] == K and (rl2 >= 0).all()
    with pytest.raises(ConfigError, match="`bicluster_method`"):
        D.bicluster(counts, K, method="kmeans")


def test_sample_statistics_match_direct_counts(tmp_path):
    tr, arr = build_trace(tmp_path / "t", L=3, E=6, k=2, docs=5, doc_len=30)
    ctx = make_context(tr)
    acc = D.DependenceAccumulator(ctx, 10_000, 0)
    run_pass(ctx, [acc], batch_size=37)
    s = acc.result()
    ex, w, sentinel = arr["experts"], arr["weights"], arr["sentinel"]
    ok = (ex[:, 0] != sentinel).all(-1) & (ex[:, 1] != sentinel).all(-1)
    corr = s.correlation_frame()
    g = corr.filter((corr["layer_from"] == arr["layers"][0]) & (corr["variable"] == "weight"))
    x = np.zeros((ok.sum(), 6))
    y = np.zeros((ok.sum(), 6))
    np.put_along_axis(x, ex[ok, 0], w[ok, 0], axis=1)
    np.put_along_axis(y, ex[ok, 1], w[ok, 1], axis=1)
    row = g.filter((g["expert_from"] == 2) & (g["expert_to"] == 4))
    assert row["spearman_rho"][0] == pytest.approx(stats.spearmanr(x[:, 2], y[:, 4])[0], abs=1e-9)
    assert row["samples"][0] == ok.sum()
    counts = s.pair_counts(0, 1)
    assert counts.sum() == ok.sum()
    mi = s.mi_frame(permutations=20, seed=0)
    assert mi.height == 2 and mi["permutations"].to_list() == [20, 20]


def test_analyze_writes_dependence_figures(tmp_path):
    from moescope.analysis.run import AnalyzeOptions, run_analyses

    tr, _ = build_trace(tmp_path / "t", L=3, E=6, k=2)
    s = run_analyses(tr.path, tmp_path / "out", AnalyzeOptions(analyses=["dependence"], permutations=20))
    d = s["analyses"]["dependence"]
    assert d["pairs"] == 2 and d["permutations"] == 20
    for stem in (
        "dependence_pearson_r_indicator_grid",
        "dependence_spearman_rho_weight_grid",
        "dependence_mi_permutation_plot",
        "dependence_bicluster_L3_L5",
    ):
        assert (tmp_path / "out" / f"{stem}.png").is_file() and (tmp_path / "out" / f"{stem}.csv").is_file()


def test_token_to_token_counts_equal_a_loop(tmp_path):
    from itertools import combinations

    from moescope.analysis.cooccurrence import TokenTransitionAccumulator

    tr, arr = build_trace(tmp_path / "t", L=3, E=6, k=2, docs=4, doc_len=25)
    ctx = make_context(tr)
    acc = TokenTransitionAccumulator(ctx)
    run_pass(ctx, [acc], batch_size=17)  # pairs cross batch boundaries
    rank = {s: r for r, s in enumerate(sorted(combinations(range(6), 2), key=lambda s: (s[1], s[0])))}
    ex, doc, pos, sentinel = arr["experts"], arr["doc"], arr["pos"], arr["sentinel"]
    want = np.zeros((3, 15, 15), np.int64)
    for i in range(1, len(doc)):
        if doc[i] != doc[i - 1] or pos[i] != pos[i - 1] + 1:
            continue
        for layer in range(3):
            a, b = ex[i - 1, layer], ex[i, layer]
            if (a == sentinel).any() or (b == sentinel).any():
                continue
            want[layer, rank[tuple(sorted(a))], rank[tuple(sorted(b))]] += 1
    np.testing.assert_array_equal(acc.matrices(), want)


def test_conditional_maps_grey_out_rare_rows(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from moescope.analysis.cooccurrence import layer_transitions, plot_transition

    tr, _ = build_trace(tmp_path / "t", L=2, E=4, k=2, docs=3, doc_len=20)
    res = layer_transitions(tr)
    names = [str(i) for i in range(6)]
    lf, lt = tr.moe_layers[0], tr.moe_layers[1]
    counts = res["cells"].group_by("i").agg(pl.col("count").sum())
    rare = set(counts.filter(pl.col("count") < 12)["i"].to_list())
    fig = plot_transition(res["cells"], lf, lt, "p_row", names, min_count=12)
    ax = fig.axes[0]
    img = ax.get_images()[0].get_array()
    for i in range(6):
        assert bool(np.ma.getmaskarray(img)[i].all() or np.isnan(np.ma.filled(img, np.nan)[i]).all()) == (
            i in rare or i not in counts["i"].to_list()
        )
    assert "greyed out" in ax.get_title()
    joint = plot_transition(res["cells"], lf, lt, "p_joint", names)
    from matplotlib.colors import LogNorm

    assert isinstance(joint.axes[0].get_images()[0].norm, LogNorm)
