"""The training monitor against independent computations.

The reference routing of every training batch is recorded by the capture engine
(:class:`RoutingRecorder`, eval mode, same weights, same inputs) just before the training forward
pass, written as traces, and analysed offline by :mod:`moescope.analysis`; the model-level aux loss
is compared with the model's own ``aux_loss`` output.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import polars as pl
import pytest
import torch

from moescope.analysis.entropy import routing_entropy
from moescope.analysis.load import load_balance, load_summary
from moescope.capture.engine import RoutingRecorder
from moescope.capture.tiny import tiny_model
from moescope.errors import ConfigError
from moescope.monitor import AlertRules, CSVSink, JSONLSink, RoutingMonitor, TensorBoardSink
from moescope.monitor.alerts import AlertState
from moescope.monitor.metrics import RoutingReport, layer_metrics, summarise
from moescope.trace import Trace, TraceWriter
from moescope.trace.schema import default_columns

VOCAB = 128


def batches(n: int, bsz: int = 4, seq: int = 12, seed: int = 0):
    """Right-padded random batches (so positions match an unpadded run) with labels."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (bsz, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (bsz,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
        labels = ids.masked_fill(mask == 0, -100)
        yield ids, mask, labels


def reference(recorder: RoutingRecorder, model, ids, mask) -> dict:
    """The capture engine's routing of one batch with the current weights (eval, no grad)."""
    model.eval()
    try:
        out = recorder.run(ids, mask)
    finally:
        model.train()
    m = mask.numpy().astype(bool)
    rows = np.nonzero(m)
    out.update(doc_id=rows[0], position=rows[1], token_id=ids.numpy()[rows])
    return out


def write_trace(path, spec, records: list[dict]) -> Trace:
    cols = default_columns(weights=True, logits=True, logits_dtype="float32")
    with TraceWriter.create(path, spec, columns=cols) as w:
        doc = 0
        for r in records:
            w.append(
                doc_id=r["doc_id"] + doc,
                position=r["position"],
                token_id=r["token_id"],
                label="train",
                experts=r["experts"],
                weights=r["weights"],
                logits=r["logits"],
            )
            doc += int(r["doc_id"].max()) + 1
            w.commit(doc - 1)
    return Trace.open(path)


def offline(
    tmp_path, name: str, spec, window: list[dict], dead_share: float = 0.001
) -> dict[str, np.ndarray]:
    """Per-layer metrics of the window's routing by the offline analyses."""
    trace = write_trace(tmp_path / name, spec, window)
    per_expert = load_balance(trace)
    summ = load_summary(per_expert, spec.top_k).sort("layer")
    ent = routing_entropy(trace)["by_layer"].sort("layer")
    first = (
        per_expert.group_by("layer")
        .agg(pl.col("first_choice_share").max())
        .sort("layer")["first_choice_share"]
    )
    aux_steps = []
    for i, r in enumerate(window):  # the aux loss is per forward pass, averaged over the window
        t = write_trace(tmp_path / f"{name}-step{i}", spec, [r])
        aux_steps.append(load_summary(load_balance(t), spec.top_k).sort("layer")["aux_loss"].to_numpy())
    return {
        "load_cv": summ["cv"].to_numpy(),
        "max_vio": summ["max_violation"].to_numpy(),
        "gini": summ["gini"].to_numpy(),
        "dead_experts": summ["dead_experts"].to_numpy().astype(float),
        "entropy_bits": ent["mean_entropy_bits"].to_numpy(),
        "entropy_norm": ent["mean_entropy_norm"].to_numpy(),
        "first_max_share": first.to_numpy(),
        "aux_loss": np.mean(aux_steps, axis=0),
        "tokens": summ["tokens"].to_numpy(),
    }


def assert_report_matches(report: RoutingReport, ref: dict[str, np.ndarray]) -> None:
    assert report.tokens == int(ref["tokens"][0])
    for metric, values in report.per_layer.items():
        np.testing.assert_allclose(values, ref[metric], rtol=1e-5, atol=1e-6, err_msg=metric)
    for metric, stats in report.summary.items():
        assert stats["mean"] == pytest.approx(np.mean(ref[metric]), rel=1e-5, abs=1e-6)
        assert stats["p90"] == pytest.approx(np.percentile(ref[metric], 90), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_plain_loop_metrics_equal_offline_analyses(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("mixtral").train()
    recorder = RoutingRecorder(model, logits=True, logits_dtype="float32")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    every, steps = 6, 24
    window, model_aux, reports = [], [], []
    with RoutingMonitor(model, every=every, alerts=None) as monitor:
        for step, (ids, mask, labels) in enumerate(batches(steps), start=1):
            window.append(reference(recorder, model, ids, mask))
            out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            model_aux.append(float(out.aux_loss.detach()))
            report = monitor.step()
            assert (report is None) == (step % every != 0)
            if report is not None:
                ref = offline(tmp_path, f"w{step}", monitor.spec, window)
                assert_report_matches(report, ref)
                # the pooled aux loss is the model's own aux_loss output, averaged over the window
                assert report.aux_loss_model == pytest.approx(np.mean(model_aux), rel=1e-5)
                reports.append(report)
                window, model_aux = [], []
    assert len(reports) == steps // every
    # training moved the routing: the reports are not all the same
    assert len({round(r.summary["load_cv"]["mean"], 6) for r in reports}) > 1


@pytest.mark.slow
def test_trainer_callback_logs_offline_metrics(tmp_path):
    from transformers import Trainer, TrainingArguments

    from moescope.monitor.integrations import RoutingMonitorCallback

    torch.manual_seed(0)
    model = tiny_model("mixtral").train()
    recorder = RoutingRecorder(model, logits=True, logits_dtype="float32")
    data = [
        {"input_ids": i, "attention_mask": m, "labels": lab}
        for ids, mask, labels in batches(8, bsz=4, seed=1)
        for i, m, lab in zip(ids, mask, labels, strict=True)
    ]
    windows: list[list[dict]] = [[]]
    busy = []

    def record(module, args, kwargs):  # independent record of every training batch, before the monitor's hook
        if busy or not module.training:
            return
        busy.append(1)
        try:
            windows[-1].append(reference(recorder, model, kwargs["input_ids"], kwargs["attention_mask"]))
        finally:
            busy.clear()

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=24,
        learning_rate=3e-3,
        logging_steps=1000,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    monitor = RoutingMonitor(model, every=8, alerts=None)

    class Cut(RoutingMonitorCallback):  # close the reference window exactly where the monitor reports
        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            if state.global_step % 8 == 0:
                windows.append([])

    trainer.add_callback(Cut(monitor, trainer))
    trainer.train()
    handle.remove()
    logged = [h for h in trainer.state.log_history if "moe/load_cv/mean" in h]
    assert [h["step"] for h in logged] == [8, 16, 24]
    for i, h in enumerate(logged):
        ref = offline(tmp_path, f"t{i}", monitor.spec, windows[i])
        assert h["moe/tokens"] == int(ref["tokens"][0])
        for metric in ("load_cv", "max_vio", "gini", "entropy_bits", "aux_loss", "first_max_share"):
            assert h[f"moe/{metric}/mean"] == pytest.approx(np.mean(ref[metric]), rel=1e-5)
            for j, layer in enumerate(monitor.spec.moe_layers):
                assert h[f"moe/{metric}/layer_{layer:02d}"] == pytest.approx(
                    ref[metric][j], rel=1e-5, abs=1e-7
                )
        assert not any("/expert_" in key for key in h)  # per-expert series only when asked
    assert not monitor.hooks._handles  # detached at train end


def test_state_does_not_grow_with_steps(tmp_path):
    model = tiny_model("qwen3_moe").train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)

    def reachable_bytes(obj) -> int:
        """Bytes of every tensor/array reachable from the monitor (the model excluded)."""
        seen, total, stack = set(), 0, [obj]
        while stack:
            o = stack.pop()
            if id(o) in seen or o is model or isinstance(o, torch.nn.Module):
                continue
            seen.add(id(o))
            if isinstance(o, torch.Tensor):
                total += o.numel() * o.element_size()
            elif isinstance(o, np.ndarray):
                total += o.nbytes
            elif isinstance(o, dict):
                stack.extend(o.values())
            elif isinstance(o, list | tuple | set):
                stack.extend(o)
            elif hasattr(o, "__dict__"):
                stack.extend(vars(o).values())
        return total

    sizes = {}
    with RoutingMonitor(model, every=5, sinks=[JSONLSink(tmp_path / "m.jsonl")]) as monitor:
        for step, (ids, mask, labels) in enumerate(batches(60, seed=2), start=1):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
            if step in (10, 60):
                sizes[step] = (reachable_bytes(monitor), monitor.state_nbytes())
    assert sizes[10] == sizes[60]
    L, E = monitor.spec.num_moe_layers, monitor.spec.num_experts
    assert monitor.state_nbytes() == 8 * (2 * L * E + 3 * L + 1)


def test_eval_and_checkpoint_recompute_are_not_counted():
    model = tiny_model("mixtral").train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids, mask, labels = next(batches(1))
    with RoutingMonitor(model, every=1, alerts=None) as monitor:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()  # recomputes in backward
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)  # evaluation pass: skipped
        model.train()
        report = monitor.step()
    assert report.forwards == 1
    assert report.tokens == int(mask.sum())


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "llama4_text", "jetmoe", "dbrx", "phimoe"])
def test_families_count_what_the_engine_captures(family):
    # eval mode on both sides: PhiMoE's training-mode sparsemixer samples, so only eval routing is reproducible
    model = tiny_model(family).eval()
    recorder = RoutingRecorder(model, logits=True, logits_dtype="float32")
    ids, mask, _labels = next(batches(1, seq=8))
    ref = recorder.run(ids, mask)
    with RoutingMonitor(model, every=1, alerts=None, train_only=False) as monitor:
        model(input_ids=ids, attention_mask=mask)
        report = monitor.step()
    E, k = monitor.spec.num_experts, monitor.spec.top_k
    n = len(ref["experts"])
    counts = np.stack(
        [np.bincount(ref["experts"][:, j].ravel(), minlength=E) for j in range(ref["experts"].shape[1])]
    )
    np.testing.assert_allclose(report.load_share, counts / (k * n), atol=1e-12)
    first = np.stack([np.bincount(ref["experts"][:, j, 0], minlength=E) for j in range(counts.shape[0])])
    np.testing.assert_allclose(report.first_share, first / n, atol=1e-12)


def test_metric_definitions_on_hand_counts():
    counts = np.array([[10, 0, 0, 10], [5, 5, 5, 5]], float)  # k=2, T=10
    m = layer_metrics(
        counts,
        counts / 2,
        np.array([10, 10]),
        np.array([10.0, 20.0]),
        np.zeros(2),
        1,
        top_k=2,
        dead_share=0.001,
    )
    np.testing.assert_allclose(m["load_cv"], [1.0, 0.0])
    np.testing.assert_allclose(m["max_vio"], [1.0, 0.0])
    np.testing.assert_allclose(m["gini"], [0.5, 0.0])
    np.testing.assert_allclose(m["dead_experts"], [2, 0])
    np.testing.assert_allclose(m["entropy_norm"], [0.5, 1.0])
    s = summarise(np.array([1.0, 2.0, np.nan, 3.0]))
    assert (s["mean"], s["min"], s["max"], s["p50"]) == (2.0, 1.0, 3.0, 2.0)


def _report(counts: np.ndarray, entropy_norm: float, step: int) -> RoutingReport:
    L, E = counts.shape
    T = counts.sum(1) / 2
    pl_ = layer_metrics(
        counts,
        counts / 2,
        T,
        np.full(L, entropy_norm * np.log2(E)) * T,
        np.zeros(L),
        1,
        top_k=2,
        dead_share=0.001,
    )
    return RoutingReport(
        step,
        list(range(L)),
        int(T[0]),
        1,
        pl_,
        {},
        None,
        counts / (2 * T[:, None]),
        counts / (2 * T[:, None]),
    )


def test_alerts_name_layer_and_experts(caplog):
    state = AlertState(
        AlertRules(max_dead_fraction=0.25, max_cv=1.0, min_entropy_norm=0.2, max_change=0.3, warmup=2)
    )
    balanced = np.full((2, 8), 100.0)
    for step in (1, 2, 3):
        assert state.evaluate(_report(balanced, 0.9, step)) == []
    skewed = balanced.copy()
    skewed[1] = [700, 100, 0, 0, 0, 0, 0, 0]
    with caplog.at_level(logging.WARNING, logger="moescope.monitor"):
        alerts = state.evaluate(_report(skewed, 0.9, 4))
    by_rule = {a.rule: a for a in alerts}
    assert set(by_rule) == {"dead_experts", "load_cv", "sudden_change"}
    assert all(a.layer == 1 for a in alerts)
    assert by_rule["dead_experts"].experts == (2, 3, 4, 5, 6, 7)
    assert by_rule["load_cv"].experts[0] == 0
    assert "MoE layer 1" in caplog.text and "[2, 3, 4, 5, 6, 7]" in caplog.text
    collapsed = state.evaluate(_report(balanced, 0.05, 5))
    assert {a.rule for a in collapsed} >= {"entropy_collapse"}


def test_sinks_and_bad_options(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_model("mixtral").train()
    sinks = [CSVSink(tmp_path / "m.csv"), JSONLSink(tmp_path / "m.jsonl"), TensorBoardSink(tmp_path / "tb")]
    with RoutingMonitor(model, every=2, sinks=sinks, alerts=None) as monitor:
        for ids, mask, _labels in batches(4):
            model(input_ids=ids, attention_mask=mask)
            monitor.step()
    last = monitor.last_report
    csv = pl.read_csv(tmp_path / "m.csv")
    assert csv.height == 2 * monitor.spec.num_moe_layers
    row = csv.filter((pl.col("step") == 4) & (pl.col("layer") == 2))
    assert row["load_cv"][0] == pytest.approx(last.per_layer["load_cv"][2])
    docs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert docs[-1]["summary"]["load_cv"]["p50"] == pytest.approx(last.summary["load_cv"]["p50"])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    ev = acc.Scalars("moe/entropy_bits/mean")
    assert [e.step for e in ev] == [2, 4]
    assert ev[-1].value == pytest.approx(last.summary["entropy_bits"]["mean"], rel=1e-6)
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match=r"other\.csv"):
        CSVSink(tmp_path / "other.csv")
    with pytest.raises(ConfigError, match="every"):
        RoutingMonitor(model, every=0)
    with pytest.raises(ConfigError, match="sample_dir"):
        RoutingMonitor(model, sample_every=3)


def test_sampled_capture_writes_analysable_traces(tmp_path):
    from typer.testing import CliRunner

    from moescope.cli import app

    model = tiny_model("mixtral").train()
    recorder = RoutingRecorder(model, logits=True, logits_dtype="float32")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with RoutingMonitor(
        model, every=3, sample_every=3, sample_dir=tmp_path / "samples", alerts=None
    ) as monitor:
        for ids, mask, labels in batches(6, seed=3):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    ref = reference(recorder, model, ids, mask)  # the last batch, final weights = the step-6 sample
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-00000003", "step-00000006"]
    sample = tmp_path / "samples" / "step-00000006"
    t = Trace.open(sample)
    assert t.num_tokens == int(mask.sum())
    np.testing.assert_array_equal(t.experts(), ref["experts"])
    np.testing.assert_allclose(t.logits(), ref["logits"])
    res = CliRunner().invoke(app, ["analyze", str(sample), "-o", str(tmp_path / "an"), "-a", "load,entropy"])
    assert res.exit_code == 0, res.output
    assert any((tmp_path / "an").rglob("*.csv"))


def test_summary_table_matches_report_and_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from moescope.monitor.figures import plot_training, summary_table

    model = tiny_model("qwen3_moe").train()
    with RoutingMonitor(model, every=1, sinks=[CSVSink(tmp_path / "m.csv")], alerts=None) as monitor:
        for ids, mask, _labels in batches(2, seed=4):
            model(input_ids=ids, attention_mask=mask)
            monitor.step()
    table = summary_table(pl.read_csv(tmp_path / "m.csv")).filter(pl.col("step") == 2)
    for metric, stats in monitor.last_report.summary.items():
        row = table.filter(pl.col("metric") == metric)
        for stat, value in stats.items():
            assert row[stat][0] == pytest.approx(value, rel=1e-9), (metric, stat)
    fig = plot_training(summary_table(pl.read_csv(tmp_path / "m.csv")))
    assert len([ax for ax in fig.axes if ax.lines]) == 6


def test_trainer_callback_reports_the_partial_window_at_train_end():
    from moescope.monitor.integrations import RoutingMonitorCallback

    class FakeTrainer:
        def __init__(self):
            self.logged = []

        def log(self, logs):
            self.logged.append(dict(logs))

    class State:
        global_step = 1

    model = tiny_model("mixtral").train()
    fake = FakeTrainer()
    cb = RoutingMonitorCallback(RoutingMonitor(model, every=4, alerts=None), fake)
    ids, mask, _labels = next(batches(1))
    cb.on_train_begin(None, State(), None, model=model)
    model(input_ids=ids, attention_mask=mask)
    cb.on_step_end(None, State(), None)
    assert fake.logged == []
    cb.on_train_end(None, State(), None)
    assert [d["moe/tokens"] for d in fake.logged] == [int(mask.sum())]
    assert not cb.monitor.hooks._handles
