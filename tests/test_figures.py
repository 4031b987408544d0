"""Figure saving: PNG beside its CSV, atomic, and never a switch of the caller's matplotlib backend."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from moescope.core.figures import save_figure, save_table

# Runs in a fresh interpreter: a notebook-like session picks a backend first, then uses moescope.
_SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    from pathlib import Path
    import matplotlib
    matplotlib.use("svg")  # stands for a notebook's inline backend: anything but Agg
    import moescope
    for m in pkgutil.walk_packages(moescope.__path__, "moescope."):
        if m.name != "moescope.cli":
            importlib.import_module(m.name)
    from moescope.analysis.run import AnalyzeOptions, run_analyses
    from moescope.trace.synthetic import write_synthetic_trace
    from moescope.predict import make_predictor as make
    from moescope.predict.evaluate import evaluate
    from moescope.predict.figures import plot_by_distance, plot_by_layer
    out = Path(sys.argv[1])
    tr = write_synthetic_trace(out / "t", n_tokens=600, num_layers=3, num_experts=6, logits=True, doc_len=100)
    run_analyses(out / "t", out / "a", AnalyzeOptions(tsne_points=0, permutations=5, kde_points=100))
    p = make("frequency").fit(tr)
    res = {"frequency": evaluate(p, tr, modes=[1], n_boot=20)}
    plot_by_layer(res, out / "p"); plot_by_distance(res, out / "p")
    from moescope.simulate import ModelCost, get_preset
    from moescope.simulate.sweep import plot_sweep, sweep
    df = sweep(tr, get_preset("rtx4090-pcie4"), ModelCost(expert_params=10**6, top_k=2),
               fractions=(0.25, 0.5), policies=("lru", "static"), fit_trace="replayed")
    plot_sweep(df, out / "s" / "sweep")
    print("BACKEND", matplotlib.get_backend())
    """
)


@pytest.mark.slow
def test_library_never_switches_the_backend(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    r = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "BACKEND svg" in r.stdout, r.stdout
    assert any(tmp_path.glob("a/*.png")) and any(tmp_path.glob("p/*.png")) and any(tmp_path.glob("s/*.png"))


def test_cli_main_asks_for_agg_only_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    from moescope import cli

    monkeypatch.delenv("MPLBACKEND", raising=False)
    assert cli.run(["--help"]) == 0
    assert os.environ["MPLBACKEND"] == "Agg"
    monkeypatch.setenv("MPLBACKEND", "svg")
    assert cli.run(["--help"]) == 0
    assert os.environ["MPLBACKEND"] == "svg"


def test_save_figure_writes_png_csv_json_and_leaves_no_temporaries(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [3, 1, 2])
    df = pl.DataFrame({"x": [0, 1, 2], "y": [3, 1, 2]})
    paths = save_figure(fig, df, tmp_path / "sub" / "line.v1", {"k": 2, "path": tmp_path})
    assert [p.name for p in paths] == ["line.v1.csv", "line.v1.png", "line.v1.json"]
    assert pl.read_csv(paths[0]).equals(df)
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"path"' in paths[2].read_text()
    assert not plt.fignum_exists(fig.number)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [
        "line.v1.csv",
        "line.v1.json",
        "line.v1.png",
    ]


def test_save_figure_failure_keeps_the_old_png_and_closes_the_figure(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    (tmp_path / "f.png").write_bytes(b"old")
    fig, _ = plt.subplots()

    def broken(*args: object, **kwargs: object) -> None:
        Path(args[0]).write_bytes(b"half")
        raise RuntimeError("disk full")

    fig.savefig = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, [{"a": 1}], tmp_path / "f")
    assert (tmp_path / "f.png").read_bytes() == b"old"
    assert not plt.fignum_exists(fig.number)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.csv", "f.png"]


def test_save_table_accepts_rows(tmp_path: Path) -> None:
    p = save_table([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}], tmp_path / "t.csv")
    assert p.read_text().splitlines() == ["a,b", "1,x", "2,y"]
