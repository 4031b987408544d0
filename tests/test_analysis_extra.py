"""Trajectories, router-logit densities, figures and the ``moescope analyze`` CLI."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import polars as pl
import pytest
from scipy import stats
from typer.testing import CliRunner

from analysis_helpers import build_trace
from moescope.analysis import LogitDensity, fit_logit_density, sample_trajectories, score_logits
from moescope.cli import app
from moescope.core.figures import save_figure
from moescope.errors import ConfigError
from moescope.trace.synthetic import write_synthetic_trace


def test_top_paths_match_counter(tmp_path):
    tr, a = build_trace(tmp_path / "t", E=4, k=1, L=3, missing_frac=0.0, docs=8)
    s = sample_trajectories(tr, max_tokens=10**6)
    assert s.rate == 1.0
    cnt = Counter(tuple(int(x) for x in a["experts"][t, :, 0]) for t in range(len(a["doc"])))
    top = s.top_paths(5)
    want = sorted(cnt.values(), reverse=True)[:5]
    assert top["count"].to_list() == want
    best = " > ".join(str(e) for e in cnt.most_common(1)[0][0])
    assert top.filter(pl.col("count") == want[0])["path"].to_list().count(best) == 1
    emb = s.embedding(tsne_points=0)  # t-SNE itself runs in the CLI test
    assert emb.height == len(a["doc"]) and emb["tsne1"].null_count() == emb.height
    X = s.encodings()
    assert X.shape == (len(a["doc"]), 3 * 4) and (X.sum(1) == 3).all()  # k=1 one per layer
    cur = s.curves(4)
    assert cur.height == 4 * 3


def test_density_pvalues_uniform_under_null_and_small_under_shift(tmp_path):
    a = write_synthetic_trace(
        tmp_path / "a", n_tokens=6000, num_layers=2, num_experts=4, logits=True, law="uniform", seed=1
    )
    b = write_synthetic_trace(
        tmp_path / "b", n_tokens=6000, num_layers=2, num_experts=4, logits=True, law="uniform", seed=2
    )
    m = write_synthetic_trace(
        tmp_path / "m", n_tokens=6000, num_layers=2, num_experts=4, logits=True, law="markov", seed=3
    )
    model = fit_logit_density(a, max_points=900, seed=0)
    same = score_logits(model, b, max_points=600)
    p = same["p_values"]["p_value"].to_numpy()
    assert stats.kstest(p, "uniform").pvalue > 0.001
    shifted = score_logits(model, m, max_points=600)
    assert shifted["summary"]["share_p_below_0.05"].min() > 0.5  # a logit of 10 is far outside N(0,1)


def test_density_save_load_round_trip_without_pickle(tmp_path):
    a = write_synthetic_trace(tmp_path / "a", n_tokens=3000, num_layers=2, num_experts=6, logits=True, seed=1)
    for kernel, trim in (("gaussian", None), ("epanechnikov", 3)):
        model = fit_logit_density(a, kernel=kernel, trim=trim, bandwidth="scott", max_points=300)
        model.save(tmp_path / f"kde-{kernel}")
        with np.load(tmp_path / f"kde-{kernel}.npz", allow_pickle=False) as z:
            assert all(z[name].dtype != object for name in z.files)
        back = LogitDensity.load(tmp_path / f"kde-{kernel}")
        x = model.raw[0][:20].astype(np.float64) + 0.1
        np.testing.assert_allclose(back.log_density(0, x), model.log_density(0, x), rtol=1e-10)
        assert back.trim == trim and back.kernel == kernel
    with pytest.raises(ConfigError, match="kde_kernel"):
        fit_logit_density(a, kernel="box", max_points=300)


def test_gaussian_kde_is_scipy(tmp_path):
    a = write_synthetic_trace(tmp_path / "a", n_tokens=2000, num_layers=1, num_experts=3, logits=True, seed=4)
    model = fit_logit_density(a, max_points=200, bandwidth="silverman")
    ref = stats.gaussian_kde(model.points[0].T, bw_method="silverman")
    x = np.zeros((3, 3))
    np.testing.assert_allclose(model.log_density(0, x), ref.logpdf(x.T), rtol=1e-10)


def test_save_figure_writes_png_csv_json(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    df = pl.DataFrame({"x": [1, 2], "y": [3, 4]})
    paths = save_figure(fig, df, tmp_path / "sub" / "fig", {"k": 2})
    assert sorted(p.name for p in paths) == ["fig.csv", "fig.json", "fig.png"]
    assert pl.read_csv(tmp_path / "sub" / "fig.csv").equals(df)
    assert (tmp_path / "sub" / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "sub").glob(".*tmp"))


def test_cli_analyze_json_and_files(tmp_path):
    t = write_synthetic_trace(
        tmp_path / "t", n_tokens=3000, num_layers=3, logits=True, law="markov", noise=0.2, seed=1
    )
    o = write_synthetic_trace(tmp_path / "o", n_tokens=2000, num_layers=3, logits=True, law="uniform", seed=2)
    r = CliRunner().invoke(
        app,
        [
            "analyze",
            str(t.path),
            "-o",
            str(tmp_path / "out"),
            "--json",
            "--tsne-points",
            "50",
            "--permutations",
            "20",
            "--kde-points",
            "200",
            "--compare",
            str(o.path),
            "--target-layer",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc["analyses"]) == {
        "load",
        "entropy",
        "cooccurrence",
        "repetition",
        "specialisation",
        "trajectories",
        "density",
        "dependence",
        "compare",
    }
    assert doc["analyses"]["density"]["models"]  # seed 002 stage 2: the full, trimmed and kernel models
    out = tmp_path / "out"
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) > 15
    for p in pngs:
        assert p.with_suffix(".csv").is_file(), p
    assert json.loads((out / "summary.json").read_text())["files"] == doc["files"]
    assert pl.read_csv(out / "trajectory_tsne.csv").height == 50
    rep = pl.read_csv(out / "repetition.csv")
    assert rep.filter(pl.col("domain") == "all").height == 3


def test_cli_errors_name_the_option(tmp_path):
    t = write_synthetic_trace(tmp_path / "t", n_tokens=600, num_layers=2, seed=1)
    run = CliRunner().invoke
    r = run(app, ["analyze", str(t.path), "-o", str(tmp_path / "o"), "--analyses", "load,bogus"])
    assert r.exit_code == 1 and "--analyses" in str(r.exception)
    r = run(app, ["analyze", str(t.path), "-o", str(tmp_path / "o"), "--layers", "7"])
    assert "layers: [7] not MoE layer" in str(r.exception)
    # no logits: entropy and density are skipped with a note, the rest runs
    r = run(app, ["analyze", str(t.path), "-o", str(tmp_path / "o"), "--json", "-a", "load,entropy,density"])
    assert r.exit_code == 0, r.output
    notes = json.loads(r.stdout)["notes"]
    assert any("entropy skipped" in n for n in notes) and any("density skipped" in n for n in notes)
