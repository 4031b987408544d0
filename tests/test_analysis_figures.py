"""Every figure ``moescope analyze`` draws on a trace of a bundled model: titles, axis labels, units.

The figures are checked as matplotlib objects (not pixels) just before they are saved.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moescope.data import corpus_path

UNITS = {  # figure name prefix -> a unit or scale one of its labels must state
    "entropy_by_layer_plot": "bits",
    "entropy_histogram": "bits",
    "cooccurrence_mi": "bits",
    "dependence_mi_permutation_plot": "bits",
    "density_model_comparison_plot": "nats",
    "trajectory_pca": "% of variance",
    "load_bars": "%",
    "cooccurrence_L": "P(",
    "cooccurrence_all_pairs_p_joint": "log scale",
    "dependence_bicluster": "log scale",
    "cooccurrence_layer_vs_token": "log scale",
}


@pytest.fixture(scope="module")
def bundled_trace(tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from moescope.cli import app

    out = tmp_path_factory.mktemp("fig") / "trace"
    corpus = sorted(str(p) for p in corpus_path().glob("heldout-*.jsonl"))
    r = CliRunner().invoke(
        app,
        [
            "capture",
            "tiny-mixtral",
            *corpus,
            "--label-field",
            "domain",
            "--max-documents",
            "3",
            "--max-tokens",
            "900",
            "--seq-len",
            "128",
            "--logits",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    return out


def _labels(fig) -> list[str]:
    out = [t.get_text() for t in fig.texts]
    for name in ("_suptitle", "_supxlabel", "_supylabel"):
        t = getattr(fig, name, None)
        if t is not None:
            out.append(t.get_text())
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        if hasattr(ax, "get_zlabel"):
            out.append(ax.get_zlabel())
        leg = ax.get_legend()
        if leg is not None:
            out += [t.get_text() for t in leg.get_texts()]
    return [s for s in out if s]


def check_figure(name: str, fig) -> list[str]:
    """Problems of one figure: a missing title, axis label or colour-bar label, a missing unit."""
    problems = []
    sup = {n: getattr(fig, n, None) for n in ("_suptitle", "_supxlabel", "_supylabel")}
    has_sup = {n: t is not None and bool(t.get_text()) for n, t in sup.items()}
    axes = [ax for ax in fig.axes if ax.get_visible()]
    bars = [ax for ax in axes if hasattr(ax, "_colorbar")]
    plots = [ax for ax in axes if ax not in bars]
    if not has_sup["_suptitle"] and not any(ax.get_title() for ax in plots):
        problems.append(f"{name}: no title")
    for ax in plots:
        if not (ax.get_xlabel() or has_sup["_supxlabel"]):
            problems.append(f"{name}: an axes without an x label ({ax.get_title()!r})")
        if not (ax.get_ylabel() or has_sup["_supylabel"]):
            problems.append(f"{name}: an axes without a y label ({ax.get_title()!r})")
        if hasattr(ax, "get_zlabel") and not ax.get_zlabel():
            problems.append(f"{name}: a 3D axes without a z label")
    for cb in bars:
        if not (cb.get_ylabel() or cb.get_xlabel()):
            problems.append(f"{name}: a colour bar without a label")
    for prefix, unit in UNITS.items():
        if name.startswith(prefix) and not any(unit in s for s in _labels(fig)):
            problems.append(f"{name}: no label states {unit!r}")
    return problems


@pytest.mark.slow
def test_every_analyze_figure_has_titles_labels_and_units(bundled_trace, tmp_path, monkeypatch):
    import moescope.core.figures as figures_mod
    from moescope.analysis.run import AnalyzeOptions, run_analyses

    seen: dict[str, list[str]] = {}
    real = figures_mod.save_figure

    def recording(fig, df, stem, params=None, **kw):
        seen[Path(stem).name] = check_figure(Path(stem).name, fig)
        return real(fig, df, stem, params, **kw)

    monkeypatch.setattr(figures_mod, "save_figure", recording)  # AnalysisRun.figure saves through it
    opts = AnalyzeOptions(tsne_points=60, permutations=20, kde_points=150, max_tokens=2000)
    summary = run_analyses(bundled_trace, tmp_path / "out", opts)
    assert not summary["notes"] or all("skipped" not in n for n in summary["notes"])
    for must in (
        "load_bars",
        "entropy_by_layer_plot",
        "cooccurrence_all_pairs_p_row",
        "trajectory_curves_3d",
        "dependence_bicluster",
        "density_model_comparison_plot",
        "density_weight_sums_and_choice_counts_plot",
        "cooccurrence_layer_vs_token",
    ):
        assert any(n.startswith(must) for n in seen), must
    problems = [p for ps in seen.values() for p in ps]
    assert problems == [], "\n".join(problems)
    assert len(seen) >= 25
    for name in seen:
        assert (tmp_path / "out" / f"{name}.csv").is_file() and (tmp_path / "out" / f"{name}.png").is_file()
