"""`moescope demo` runs end to end on the bundled models (a small budget and a table predictor, for speed)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moescope.cli import app
from moescope.demo import demo_steps
from moescope.trace import Trace, validate_trace


def test_demo_runs_every_step_and_judges_on_unseen_documents(demo_out):
    out, output = demo_out
    for model in ("tiny-mixtral", "tiny-finegrained"):
        assert validate_trace(out / f"trace-{model}") == []
        assert Trace.open(out / f"trace-{model}").num_tokens == 1500
        assert any((out / f"analysis-{model}").glob("*.png"))
    train = Trace.open(out / "split-tiny-finegrained" / "train")
    test = Trace.open(out / "split-tiny-finegrained" / "test")
    assert not set(train.documents()) & set(test.documents())
    assert any((out / "predict-tiny-finegrained").glob("*.png"))
    assert any((out / "simulate-tiny-finegrained").glob("sweep_*.png"))
    sim = json.loads((out / "simulate-tiny-finegrained" / "summary.json").read_text())
    assert sim["policy"] == "auto" and sim["auto"]["choice"] in sim["auto"]["heldout_tokens_per_s"]
    assert (
        "auto (chosen on held-out training documents)" in output and "LRFU" in output and "Belady" in output
    )
    assert any((out / "ablate-tiny-mixtral-layer3").iterdir())
    report = out / "report.html"
    assert report.is_file() and f"open the report: {report}" in output
    assert '<meta name="generator" content="moescope report">' in report.read_text(encoding="utf-8")[:2000]


def test_demo_steps_are_plain_cli_commands(tmp_path):
    steps = demo_steps(tmp_path, max_tokens=100, predictor="token")
    names = [s[0] for s in steps]
    assert names.count("capture") == 2 and {"split", "predict", "simulate", "ablate"} <= set(names)
    for args in steps:
        res = CliRunner().invoke(app, [*args[:2], "--help"] if args[0] == "predict" else [args[0], "--help"])
        assert res.exit_code == 0, (args, res.output)
    json.dumps(steps)  # printable and copyable as written
