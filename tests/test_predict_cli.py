"""``moescope predict list|fit|eval`` in-process: JSON on stdout, held-out documents, error sentences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moescope.cli import app
from moescope.errors import ConfigError
from moescope.predict import load_predictor
from moescope.predict.base import read_header
from moescope.trace import Trace
from moescope.trace.synthetic import write_synthetic_trace


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "t"
    write_synthetic_trace(
        path, n_tokens=20 * 64, num_layers=3, num_experts=8, top_k=2, law="markov", doc_len=64, seed=7
    )
    return path


runner = CliRunner()


def test_list_names_every_predictor() -> None:
    r = runner.invoke(app, ["predict", "list", "--json"])
    assert r.exit_code == 0
    names = [p["name"] for p in json.loads(r.stdout)["predictors"]]
    for n in (
        "uniform",
        "popularity",
        "previous",
        "window",
        "lookahead",
        "lookahead-residual",
        "rules-level1",
        "rules-ahead",
        "frequency",
        "rules",
        "rules-hybrid",
        "cooccurrence",
        "learned",
        "combined",
        "best",
    ):
        assert n in names


def test_fit_then_eval_scores_only_held_out_documents(trace: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.npz"
    r = runner.invoke(
        app,
        [
            "predict",
            "fit",
            str(trace),
            "-p",
            "cooccurrence",
            "-d",
            "1",
            "-d",
            "2",
            "--temporal",
            "--test-fraction",
            "0.25",
            "-o",
            str(model),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert (
        out["modes"] == ["temporal", "d1", "d2"]
        and out["test_documents"] == 5
        and out["train_documents"] == 15
    )
    header = read_header(model)
    test_docs = header["extra"]["test_documents"]
    assert len(test_docs) == 5
    r = runner.invoke(
        app,
        [
            "predict",
            "eval",
            str(model),
            str(trace),
            "--n-boot",
            "50",
            "--budget",
            "2",
            "--budget",
            "4",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["scored"] == "5 held-out documents"
    assert set(doc["modes"]) == {"temporal", "d1", "d2"}
    d1 = doc["modes"]["d1"]
    assert d1["queries"] == 5 * 64 * 3
    assert set(d1["overall"]) == {
        "slot_recall",
        "top1",
        "exact",
        "recall@2",
        "recall@4",
        "precision@2",
        "precision@4",
        "coverage",
    }
    # markov law: first choice certain from layer 1 on, chance at layer 0 -> top-1 about (2 + 0.25) / 3
    assert d1["overall"]["top1"]["value"] == pytest.approx((2 + 0.25) / 3, abs=0.05)
    # the same number computed directly on the held-out documents with the loaded model
    from moescope.predict import evaluate

    direct = evaluate(
        load_predictor(model), Trace.open(trace).filter(documents=test_docs), modes=[1], n_boot=10
    )
    assert direct.value("top1", 1) == pytest.approx(d1["overall"]["top1"]["value"])


def test_eval_writes_figures_with_csv(trace: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.npz"
    assert (
        runner.invoke(app, ["predict", "fit", str(trace), "-p", "previous", "-o", str(model)]).exit_code == 0
    )
    r = runner.invoke(
        app, ["predict", "eval", str(model), str(trace), "--n-boot", "20", "--figures", str(tmp_path / "fig")]
    )
    assert r.exit_code == 0, r.output
    assert "slot_recall" in r.output and "random 0.2500" in r.output
    csv = (tmp_path / "fig" / "predict_slot_recall_by_layer.csv").read_text().splitlines()
    assert csv[0].startswith("predictor,mode,distance,layer,value") and len(csv) == 1 + 3
    assert (tmp_path / "fig" / "predict_slot_recall_by_layer.png").stat().st_size > 0


def test_fit_errors_are_sentences(trace: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["predict", "fit", str(trace), "-p", "oracle", "-o", str(tmp_path / "m.npz")])
    assert r.exit_code != 0 and isinstance(r.exception, ConfigError)
    assert "--predictor 'oracle' is unknown" in str(r.exception)
    r = runner.invoke(
        app,
        [
            "predict",
            "fit",
            str(trace),
            "-p",
            "cooccurrence",
            "--param",
            "alpha",
            "-o",
            str(tmp_path / "m.npz"),
        ],
    )
    assert "expected KEY=VALUE" in str(r.exception)
    r = runner.invoke(
        app,
        [
            "predict",
            "fit",
            str(trace),
            "-p",
            "cooccurrence",
            "--param",
            "alpha=-2",
            "-o",
            str(tmp_path / "m.npz"),
        ],
    )
    assert "parameter alpha=-2 is invalid" in str(r.exception)
    r = runner.invoke(app, ["predict", "fit", str(trace), "-p", "lookahead", "-o", str(tmp_path / "m.npz")])
    assert "no lookahead_gate_input_d* columns" in str(r.exception)
    model = tmp_path / "all.npz"
    assert (
        runner.invoke(
            app, ["predict", "fit", str(trace), "-p", "popularity", "--no-split", "-o", str(model)]
        ).exit_code
        == 0
    )
    r = runner.invoke(app, ["predict", "eval", str(model), str(trace)])
    assert "fitted on every document" in str(r.exception)
    r = runner.invoke(app, ["predict", "eval", str(model), str(trace), "--mode", "d3"])
    assert r.exit_code != 0


def test_main_prints_error_line(trace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import sys

    from moescope.cli import main

    monkeypatch.setattr(sys, "argv", ["moescope", "predict", "eval", str(tmp_path / "nope.npz"), str(trace)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip() == f"Error: {tmp_path / 'nope.npz'}: no such predictor file"


def test_model_file_holds_no_pickle(trace: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.npz"
    assert (
        runner.invoke(app, ["predict", "fit", str(trace), "-p", "rules-hybrid", "-o", str(model)]).exit_code
        == 0
    )
    with np.load(model, allow_pickle=False) as z:  # would raise on object arrays
        assert all(z[k].dtype != object for k in z.files)


@pytest.mark.shared_data
def test_real_mixtral_log_skips_unrecorded_cells(shared_data: Path, tmp_path: Path) -> None:
    from moescope.interop import import_log
    from moescope.predict import evaluate, make_predictor

    tr = import_log(
        "seed004-routing",
        [shared_data / "mixtral-8x7b-humaneval" / "humaneval_2_routing.jsonl"],
        tmp_path / "mx",
    )
    docs = tr.documents()
    train, test = tr.filter(documents=[docs[0]]), tr.filter(documents=[docs[1]])
    r = evaluate(make_predictor("previous").fit(train), test, modes=[1], n_boot=20)
    recorded = int((~(test.experts() == tr.missing_id).any(-1)).sum())
    assert 0 < recorded < test.num_tokens * tr.num_layers  # the log has gaps
    assert r.summary["modes"]["d1"]["queries"] == recorded
    assert 0.25 < r.value("slot_recall", 1) < 1.0
