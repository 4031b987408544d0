"""moescope evaluate and diff: metrics against a plain forward pass, active-expert accounting, match-k,
trace recording under a strategy, diff, and errors that name the file, field or option."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moescope.capture.tiny import tiny_model
from moescope.cli import app
from moescope.errors import ConfigError, DataError, MoescopeError
from moescope.evaluate import evaluate, parse_task
from moescope.evaluate.calibrate import mean_active
from moescope.evaluate.diff import diff_traces
from moescope.evaluate.localdata import make_task_files
from moescope.evaluate.scorer import Scorer
from moescope.models.params import count_parameters
from moescope.models.tokenizer import byte_tokenizer
from moescope.strategies import StrategyRouter, parse_strategy
from moescope.strategies.trace import StrategyTraceWriter
from moescope.trace.reader import Trace

torch.set_num_threads(1)


@functools.cache
def _lm():
    model = tiny_model("mixtral")
    return model, byte_tokenizer(model.config.vocab_size)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_task_files(tmp_path_factory.mktemp("tasks"), n=12)


def test_lambada_numbers_equal_a_plain_forward_pass(files):
    model, tok = _lm()
    rep = evaluate(model, tok, [parse_task(f"lambada={files['lambada']}")], ["baseline"], limit=5, n_boot=50)
    docs = [json.loads(line) for line in files["lambada"].read_text().splitlines()][:5]
    lls, hits = [], []
    for d in docs:  # brute force: one unbatched forward per document
        ctx, word = d["text"].rsplit(" ", 1)
        ids_ctx, ids_all = tok.encode(ctx), tok.encode(ctx + " " + word)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids_all[:-1]])).logits[0], -1)
        cont = ids_all[len(ids_ctx) :]
        rows = logp[len(ids_ctx) - 1 :]
        lls.append(sum(float(rows[i, t]) for i, t in enumerate(cont)))
        hits.append(all(int(rows[i].argmax()) == t for i, t in enumerate(cont)))
    m = rep.rows[0].metrics
    assert m["acc"] == pytest.approx(np.mean(hits))
    assert m["perplexity"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-5)
    lo, hi = rep.rows[0].score_lo, rep.rows[0].score_hi
    assert lo <= m["acc"] <= hi


def test_active_experts_params_and_flops_follow_the_strategy(files):
    model, tok = _lm()
    task = parse_task(f"mc={files['mc']}")
    rep = evaluate(model, tok, [task], ["baseline", "topk:k=1", "topk:k=4", "topp:p=0.6"], limit=6, n_boot=20)
    pc = count_parameters(model.config)
    base, one, four, topp = rep.rows
    assert base.mean_active == 2 and one.mean_active == 1 and four.mean_active == 4
    assert base.active_params == pc.active
    per_expert = pc.expert_params * len(pc.moe_layers)
    assert one.active_params == pc.active - per_expert and four.active_params == pc.active + 2 * per_expert
    assert base.flops_per_token == 2 * pc.active_compute
    assert 1 <= topp.mean_active <= 8 and len(topp.active_per_layer) == len(pc.moe_layers)
    assert base.metrics != one.metrics  # the strategy reached the scores


def test_rolling_windows_and_corpus_counts(files):
    model, tok = _lm()
    scorer = Scorer(model, tok, None, max_length=64)
    text = "In the beginning God created the heaven and the earth. " * 4
    (ll,) = scorer.loglikelihood_rolling([text])
    ids = tok.encode(text)
    assert sum(len(c) for _, c in scorer.rolling_tokens([text])[0]) == len(ids)
    # the same sum from one long forward pass, where the context fits
    long = Scorer(model, tok, None, max_length=512)
    assert long.loglikelihood_rolling([text])[0] != ll  # windows of 64 lose context
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[tok.bos_token_id, *ids[:-1]]])).logits[0], -1)
    assert long.loglikelihood_rolling([text])[0] == pytest.approx(
        float(logp.gather(1, torch.tensor(ids)[:, None]).sum()), rel=1e-5
    )


def test_match_k_reaches_the_target_on_the_calibration_split(files):
    model, tok = _lm()
    task = parse_task(f"lambada={files['lambada']}")
    logs: list[str] = []
    rep = evaluate(
        model,
        tok,
        [task],
        ["topp", "threshold"],
        limit=12,
        match=1.5,
        calibration=4,
        n_boot=20,
        log=logs.append,
    )
    texts = [json.loads(line)["text"] for line in files["lambada"].read_text().splitlines()][:4]
    for row in rep.rows:
        assert row.n_samples == 8
        k = mean_active(model, tok, parse_strategy(row.strategy), texts)
        assert k == pytest.approx(1.5, abs=0.1), row.strategy
    assert any("--match-k 1.5" in line for line in logs)


def _trace(tmp_path, spec, name):
    model, _ = _lm()
    router = StrategyRouter(model, spec, record=True)
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[2, 6:] = False
    writer = StrategyTraceWriter(tmp_path / name, router)
    with torch.no_grad(), router:
        model(ids)
    writer.add(ids, valid, label="demo")
    writer.close()
    return Trace.open(tmp_path / name), router


def test_strategy_trace_holds_the_applied_routing_and_diff_reads_it(tmp_path):
    base, _ = _trace(tmp_path, "baseline", "base")
    topp, router = _trace(tmp_path, "topp:p=0.8", "topp")
    assert topp.manifest["capture"]["strategy"] == "topp:p=0.8" and topp.top_k == 8
    b = next(topp.iter_batches(["experts", "weights"]))
    counts = (b.experts != topp.missing_id).sum(-1)  # (n, L)
    expect = torch.stack([a.count for a in router.applied], 1)[:24]  # rows 24..26 are the padding
    assert counts.shape == (24, 4) and (counts == expect.numpy()).all() and counts.mean() > 2
    assert np.allclose(b.weights[b.experts == topp.missing_id], 0)
    same = diff_traces(base, base, n_perm=50)
    assert same["layers"]["set_mismatch_rate"].max() == 0 and same["experts"]["p_value"].min() == 1
    d = diff_traces(base, topp, n_perm=200)
    assert d["layers"]["set_mismatch_rate"].min() > 0
    assert (d["layers"]["mean_k_a"] == 2).all() and (d["layers"]["mean_k_b"] > 2).all()
    assert d["experts"]["change"].abs().max() > 0


def test_diff_refuses_traces_of_different_tokens(tmp_path):
    base, _ = _trace(tmp_path, "baseline", "a")
    model, _ = _lm()
    router = StrategyRouter(model, "baseline", record=True)
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(2))
    w = StrategyTraceWriter(tmp_path / "b", router)
    with torch.no_grad(), router:
        model(ids)
    w.add(ids, torch.ones(3, 9, dtype=torch.bool))
    w.close()
    with pytest.raises(ConfigError, match="do not hold the same tokens"):
        diff_traces(base, Trace.open(tmp_path / "b"))


@pytest.mark.parametrize(
    ("line", "task", "match"),
    [
        ({"txt": "a b"}, "lambada", "record 1 has no field 'text'"),
        ({"query": "q", "choices": ["a", "b"], "gold": 5}, "mc", "field 'gold'=5 is not a choice index"),
        ({"query": "q", "choices": "ab", "gold": 0}, "mc", "field 'choices' is str, expected list"),
        (
            {"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["c"], "label": "z"},
            "hellaswag",
            "field 'label' is not an integer",
        ),
        ({"text": "t"}, "corpus", "record 1 has no field 'label'"),
    ],
)
def test_task_files_missing_fields_name_file_record_and_field(tmp_path, line, task, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError, match=match) as err:
        parse_task(f"{task}={path}").load()
    assert str(path) in str(err.value)


def test_unknown_task_and_hub_preset_offline(monkeypatch):
    with pytest.raises(ConfigError, match="unknown task 'piqa'"):
        parse_task("piqa")
    with pytest.raises(ConfigError, match="mc=FILE"):
        parse_task("mc")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MoescopeError, match=r"lambada=FILE\.jsonl"):
        parse_task("lambada").load(limit=2)


def test_cli_evaluate_json_and_errors(tmp_path, files):
    out = tmp_path / "ev"
    r = CliRunner().invoke(
        app,
        [
            "evaluate",
            "tiny:mixtral",
            f"mc={files['mc']}",
            "-s",
            "baseline",
            "-s",
            "topk:k=1",
            "--limit",
            "4",
            "--bootstrap",
            "20",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [row["strategy"] for row in doc["results"]] == ["baseline", "topk:k=1"]
    for name in ("results.json", "summary.csv", "layers.csv", "pareto.png", "pareto.csv"):
        assert (out / name).is_file()
    assert len(list((out / "samples").glob("*.csv"))) == 2
    bad = CliRunner().invoke(
        app, ["evaluate", "tiny:mixtral", f"mc={files['mc']}", "-s", "topk:k=99", "-o", str(tmp_path / "x")]
    )
    assert bad.exit_code != 0 and "k=99 is outside 1..E=8" in str(bad.exception)


def test_capture_with_a_strategy_records_the_applied_routing(tmp_path):
    from moescope.capture.runner import CaptureOptions, capture

    data = tmp_path / "d.txt"
    data.write_text(
        "In the beginning God created the heaven and the earth.\n\nAnd the earth was without form.\n"
    )
    capture("tiny:mixtral", [str(data)], tmp_path / "plain", device="cpu")
    capture("tiny:mixtral", [str(data)], tmp_path / "own", CaptureOptions(strategy="topk"), device="cpu")
    capture(
        "tiny:mixtral", [str(data)], tmp_path / "topp", CaptureOptions(strategy="topp:p=0.8"), device="cpu"
    )
    plain, own, topp = (Trace.open(tmp_path / n) for n in ("plain", "own", "topp"))
    a, b = next(plain.iter_batches(["experts", "weights"])), next(own.iter_batches(["experts", "weights"]))
    assert np.array_equal(a.experts, b.experts) and np.array_equal(
        a.weights, b.weights
    )  # own k: same routing
    assert (
        topp.manifest["capture"]["strategy"] == "topp:p=0.8" and topp.manifest["capture"]["model_top_k"] == 2
    )
    c = next(topp.iter_batches(["experts", "weights"]))
    used = c.experts != topp.missing_id
    assert used.sum(-1).min() >= 1 and used.sum(-1).mean() > 2 and topp.top_k == 8
    np.testing.assert_allclose(c.weights.sum(-1), 1, rtol=1e-5)  # Mixtral renormalises over the kept set


def test_strategy_capture_composes_with_logits_lookahead_and_loss(tmp_path):
    """--strategy with --logits, --lookahead and --loss: one pass, checked against separate runs."""
    import torch

    from moescope.capture.runner import CaptureOptions, capture
    from moescope.capture.tiny import tiny_model

    data = tmp_path / "d.txt"
    data.write_text(
        "In the beginning God created the heaven and the earth.\n\nAnd the earth was without form.\n"
    )
    capture("tiny:mixtral", [str(data)], tmp_path / "plain", CaptureOptions(logits=True), device="cpu")
    capture("tiny:mixtral", [str(data)], tmp_path / "s", CaptureOptions(strategy="topp:p=0.7"), device="cpu")
    opts = CaptureOptions(strategy="topp:p=0.7", logits=True, lookahead=1, loss=True)
    capture("tiny:mixtral", [str(data)], tmp_path / "all", opts, device="cpu")
    plain, only, full = (Trace.open(tmp_path / n) for n in ("plain", "s", "all"))
    assert full.manifest["capture"]["strategy"] == "topp:p=0.7"
    a = next(only.iter_batches(["experts", "weights"]))
    cols = ["doc_id", "token_id", "experts", "weights", "logits", "doc_loss", "lookahead_gate_input_d1"]
    b = next(full.iter_batches(cols))
    assert np.array_equal(a.experts, b.experts) and np.array_equal(a.weights, b.weights)
    lp = next(plain.iter_batches(["logits"])).logits
    assert np.array_equal(lp[:, 0], b.logits[:, 0])  # the first router sees the same input
    assert not np.array_equal(lp[:, 1:], b.logits[:, 1:])  # later ones see the strategy's hidden states
    assert b.lookahead["lookahead_gate_input_d1"].shape[1:] == (full.num_layers, 2)
    model = tiny_model("mixtral")
    for d in np.unique(b.doc_id):
        ids = torch.tensor(b.token_id[b.doc_id == d], dtype=torch.long)[None]
        with torch.no_grad(), StrategyRouter(model, "topp:p=0.7"):
            logp = torch.log_softmax(model(ids).logits.float(), -1)
        nll = -logp[0, :-1].gather(1, ids[0, 1:, None]).mean()
        np.testing.assert_allclose(b.doc_loss[b.doc_id == d], float(nll), rtol=1e-4)


def test_readers_mask_padded_strategy_rows(tmp_path):
    """analyze and predictor evaluation read a padded strategy trace slot by slot (tests/test_variable_k.py)."""
    from moescope.analysis.run import analyze
    from moescope.capture.runner import CaptureOptions, capture
    from moescope.predict.baselines import FrequencyPredictor
    from moescope.predict.evaluate import evaluate as evaluate_predictor

    data = tmp_path / "d.txt"
    data.write_text("In the beginning God created the heaven and the earth.\n")
    capture("tiny:mixtral", [str(data)], tmp_path / "p", CaptureOptions(strategy="topp:p=0.7"), device="cpu")
    capture("tiny:mixtral", [str(data)], tmp_path / "k", CaptureOptions(strategy="topk"), device="cpu")
    padded, own = Trace.open(tmp_path / "p"), Trace.open(tmp_path / "k")
    analyze(padded, tmp_path / "a", analyses=["load"])
    res = evaluate_predictor(FrequencyPredictor().fit(padded), padded)
    assert res.summary["variable_k"] and res.summary["random"]["slot_recall"] > 2 / 8  # mean k above 2
    analyze(own, tmp_path / "b")  # the model's own k: no padding, read as any trace
    evaluate_predictor(FrequencyPredictor().fit(own), own)
