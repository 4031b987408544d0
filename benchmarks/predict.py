"""Expert-prediction benchmark: every predictor on real and bundled-model traces, plus table speed.

Sections (``--sections``, default all):

- ``bundled``: the bundled trained models (``moescope.data.bundled_model_path``) captured with gate
  lookahead (distances 1..4, m = 2k) on the bundled held-out corpus, split by document;
- ``deepseek``: the real DeepSeek-V2-Lite prompts in ``../shared/data`` (MoE-Beyond log), split by
  prompt 80/20 (history and token information only: the log has no hidden states);
- ``mixtral``: the real Mixtral-8x7B HumanEval decode log (two problems: fit on one, score the
  other, both ways); unrecorded (token, layer) cells are skipped;
- ``speed``: table predictors' scored predictions per second on a 64-expert, top-6, 26-layer
  synthetic trace (the >= 1,000,000 per second target).

Modes: spatial distances 1, 2, 4 and temporal. Writes ``<out>/predict.md`` (the tables for
BENCHMARKS.md), ``<out>/predict.json`` and figures (PNG + CSV) per data set.

    nice -n 10 .venv/bin/python benchmarks/predict.py --out benchmarks/results/predict
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moescope.predict import evaluate_many, iter_contexts, make_predictor, split_documents
from moescope.predict.figures import plot_by_distance, plot_by_layer
from moescope.trace import Trace

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODES = [1, 2, 4, 0]
TABLES = [
    "uniform",
    "popularity",
    "previous",
    "window",
    "token",
    "rules-level1",
    "rules-level3",
    "rules-hybrid",
    "cooccurrence",
]


def log(msg: str) -> None:
    print(f"[predict-bench] {msg}", file=sys.stderr, flush=True)


ONLY: list[str] = []  # --predictors: restrict every section to these names (empty: all)


def predictors(trace: Trace, quick: bool, lookahead: bool) -> dict:
    """Fresh predictors for a trace; every mode in MODES where the predictor has modes."""
    modes = tuple(MODES)
    out = {}
    for name in TABLES:
        p = make_predictor(name)
        if "distances" in p.get_params():
            p.set_params(distances=modes)
        out[name] = p
    if lookahead:
        out["lookahead"] = make_predictor("lookahead")
        out["lookahead-residual"] = make_predictor("lookahead-residual")
    # default training budgets: an epoch over DeepSeek's 1.6-1.9M training (token, layer) cells takes about
    # two minutes on one thread; --quick trains one epoch on at most 200,000 cells
    small = dict(max_samples=200_000, epochs=1) if quick else {}
    out["learned"] = make_predictor("learned", distances=modes, **small)
    out["best"] = make_predictor("best", distances=modes, **{f"learned__{k}": v for k, v in small.items()})
    return {n: p for n, p in out.items() if not ONLY or n in ONLY}


def run_dataset(name: str, train: Trace, test: Trace, out: Path, quick: bool, n_boot: int) -> dict:
    lookahead = bool(train.lookahead_columns)
    preds = predictors(train, quick, lookahead)
    lookahead = lookahead and "lookahead" in preds
    info = {}
    for pname, p in preds.items():
        if pname.startswith("lookahead") and not lookahead:
            continue
        t0 = time.perf_counter()
        p.fit(train)
        info[pname] = {"fit_seconds": time.perf_counter() - t0, "n_params": p.n_params_}
        log(f"{name}: fitted {pname} in {info[pname]['fit_seconds']:.1f}s ({p.n_params_} parameters)")
    # lookahead only answers the distances the capture recorded; evaluate it separately
    k, E = train.top_k, train.num_experts
    budgets = [k, min(2 * k, E)]
    res = evaluate_many(
        {n: p for n, p in preds.items() if not n.startswith("lookahead")},
        test,
        modes=MODES,
        budgets=budgets,
        n_boot=n_boot,
    )
    if lookahead:
        la_modes = [m for m in MODES if m in preds["lookahead"].modes()]
        res.update(
            evaluate_many(
                {n: preds[n] for n in ("lookahead", "lookahead-residual") if n in preds},
                test,
                modes=la_modes,
                budgets=budgets,
                n_boot=n_boot,
            )
        )
    for pname in [n for n in ("learned", "best") if n in preds]:
        info[pname]["latency_ms_per_token"] = token_latency(preds[pname], test)
    fig_dir = out / "figures" / name
    plot_by_layer(res, fig_dir)
    plot_by_distance(res, fig_dir)
    return {
        "train_tokens": train.num_tokens,
        "test_tokens": test.num_tokens,
        "num_experts": E,
        "top_k": k,
        "layers": train.num_layers,
        "budgets": budgets,
        "info": info,
        "results": {n: r.summary for n, r in res.items()},
    }


def token_latency(pred, trace: Trace, tokens: int = 50) -> float:
    """Online latency: milliseconds to predict every layer of one token at distance 1 (batch of one)."""
    ctx = next(iter_contexts(trace, window=pred.history_window(), lookahead=True, batch_size=4096))
    rows = np.arange(min(tokens, len(ctx)))
    t0 = time.perf_counter()
    for r in rows:
        for layer in range(ctx.num_layers):
            pred.predict(ctx.queries(layer, 1, rows=np.array([r])))
    return 1000 * (time.perf_counter() - t0) / len(rows)


def section_deepseek(work: Path, out: Path, quick: bool, n_boot: int) -> dict | None:
    src = SHARED / "deepseek-v2-lite-puffin" / "training_data_eamc_prompts_0001-1000.tar.xz"
    if not src.is_file():
        log(f"skip deepseek: {src} is absent")
        return None
    from moescope.interop import import_log

    path = work / "deepseek-v2-lite-puffin"
    tr = (
        Trace.open(path)
        if (path / "manifest.json").is_file()
        else import_log("moe-beyond", [src], path, overwrite=True)
    )
    train_docs, test_docs = split_documents(tr, 0.2, seed=0)
    return run_dataset(
        "deepseek", tr.filter(documents=train_docs), tr.filter(documents=test_docs), out, quick, n_boot
    )


def section_mixtral(work: Path, out: Path, quick: bool, n_boot: int) -> dict | None:
    src = SHARED / "mixtral-8x7b-humaneval" / "humaneval_2_routing.jsonl"
    if not src.is_file():
        log(f"skip mixtral: {src} is absent")
        return None
    from moescope.interop import import_log

    path = work / "mixtral-8x7b-humaneval"
    tr = (
        Trace.open(path)
        if (path / "manifest.json").is_file()
        else import_log("seed004-routing", [src], path, overwrite=True)
    )
    docs = tr.documents()
    out_all = {}
    for a, b in ((docs[0], docs[1]), (docs[1], docs[0])):
        out_all[f"fit{a}_test{b}"] = run_dataset(
            f"mixtral_fit{a}", tr.filter(documents=[a]), tr.filter(documents=[b]), out, quick, n_boot
        )
    return out_all


def section_bundled(work: Path, out: Path, quick: bool, n_boot: int, traces: list[str]) -> dict | None:
    from moescope import data

    results = {}
    corpus = sorted((Path(data.__file__).parent / "corpus").glob("heldout-*.jsonl"))
    names = ["tiny-finegrained", "tiny-mixtral"]
    paths = [Path(t) for t in traces]
    for name in names if not paths else []:
        try:
            model = data.bundled_model_path(name)
        except Exception as exc:  # a model not shipped yet
            log(f"skip bundled {name}: {exc}")
            continue
        path = work / f"bundled-{name}"
        if not (path / "manifest.json").is_file():
            from moescope.models.registry import load_config_dict  # noqa: F401  (fails early if absent)

            k = json.loads((Path(model) / "config.json").read_text()).get("num_experts_per_tok", 2)
            cmd = [
                sys.executable,
                "-m",
                "moescope.cli",
                "capture",
                str(model),
                *map(str, corpus),
                "-o",
                str(path),
                "--lookahead",
                "4",
                "--lookahead-m",
                str(2 * k),
                "--device",
                "cpu",
                "--overwrite",
            ]
            log("capturing: " + " ".join(cmd))
            subprocess.run(cmd, check=True)
        paths.append(path)
    for path in paths:
        tr = Trace.open(path)
        train_docs, test_docs = split_documents(tr, 0.2, seed=0)
        results[path.name] = run_dataset(
            path.name, tr.filter(documents=train_docs), tr.filter(documents=test_docs), out, quick, n_boot
        )
    return results or None


def section_speed(work: Path, quick: bool) -> dict:
    """Scored predictions per second of the table predictors (prediction + metrics, as in evaluate)."""
    from moescope.trace.synthetic import write_synthetic_trace

    path = work / "speed-e64k6"
    n = 20_000 if quick else 100_000
    tr = write_synthetic_trace(
        path,
        n_tokens=n,
        num_layers=26,
        num_experts=64,
        top_k=6,
        law="markov",
        noise=0.3,
        doc_len=512,
        vocab_size=5000,
        seed=0,
    )
    train_docs, test_docs = split_documents(tr, 0.5, seed=0)
    train, test = tr.filter(documents=train_docs), tr.filter(documents=test_docs)
    out = {}
    for name in TABLES:
        p = make_predictor(name)
        if "distances" in p.get_params():
            p.set_params(distances=(1,))
        p.fit(train)
        r = evaluate_many({name: p}, test, modes=[1], budgets=[6, 12], n_boot=1)[name]
        out[name] = {
            "predictions": r.predictions,
            "seconds": r.predict_seconds,
            "per_second": r.predictions / r.predict_seconds,
        }
        log(f"speed {name}: {out[name]['per_second']:,.0f} predictions/s")
    return out


def table_md(title: str, d: dict) -> str:
    """One markdown table: predictor x mode slot recall [CI], plus top-1 and recall@2k at distance 1."""
    lines = [
        f"### {title}",
        "",
        f"train {d['train_tokens']} tokens, test {d['test_tokens']} tokens; top-{d['top_k']} of "
        f"{d['num_experts']}, {d['layers']} MoE layers; slot recall over every (token, MoE layer) "
        f"with 95% bootstrap CI (resampling {_unit(d)}); random = k/E = {d['top_k'] / d['num_experts']:.3f}",
        "",
    ]
    m2 = d["budgets"][-1]
    lines.append(
        f"| predictor | d1 | d2 | d4 | temporal | d1 first layer | d1 top-1 | d1 recall@{m2} | d1 coverage | params | fit s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in d["results"].items():
        cells = []
        for mode in ("d1", "d2", "d4", "temporal"):
            e = s["modes"].get(mode)
            if e is None:
                cells.append("-")
                continue
            v = e["overall"]["slot_recall"]
            cells.append(f"{v['value']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]")
        e1 = s["modes"].get("d1")
        first = f"{e1['layers'][0]['slot_recall']:.3f}" if e1 and e1["layers"][0]["queries"] else "-"
        cov = f"{e1['overall']['coverage']['value']:.3f}" if e1 else "-"
        top1 = f"{e1['overall']['top1']['value']:.3f}" if e1 else "-"
        rec = f"{e1['overall'][f'recall@{m2}']['value']:.3f}" if e1 else "-"
        inf = d["info"].get(name, {})
        lines.append(
            f"| {name} | {' | '.join(cells)} | {first} | {top1} | {rec} | {cov} | {inf.get('n_params', '-')} | "
            f"{inf.get('fit_seconds', 0):.1f} |"
        )
    for name in ("learned", "best"):
        if "latency_ms_per_token" in d["info"].get(name, {}):
            lines.append("")
            lines.append(
                f"{name}: {d['info'][name]['latency_ms_per_token']:.2f} ms per token for all layers "
                f"(batch of one, CPU, one thread)"
            )
    return "\n".join(lines) + "\n"


def _unit(d: dict) -> str:
    unit = next(iter(d["results"].values()))["ci"]["unit"]
    return "documents" if unit == "document" else unit.replace("block", "blocks")


def render(report: dict) -> str:
    """The markdown of a saved report."""
    md = ["## Expert prediction (`benchmarks/predict.py`)", ""]
    if "speed" in report:
        md += speed_md(report["speed"])
    if "deepseek" in report:
        md.append(
            table_md(
                "DeepSeek-V2-Lite, MoE-Beyond prompts, split by prompt (80/20, seed 0)", report["deepseek"]
            )
        )
    for key, v in report.get("mixtral", {}).items():
        md.append(table_md(f"Mixtral-8x7B HumanEval decode log, {key}", v))
    for key, v in report.get("bundled", {}).items():
        md.append(table_md(f"Bundled model {key} (gate lookahead captured, m = 2k)", v))
    return "\n".join(md) + "\n"


def speed_md(speed: dict) -> list[str]:
    md = [
        "### Table predictors, scored predictions per second (E=64, k=6, 26 layers, d1)",
        "",
        f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        "",
        "| predictor | predictions/s |",
        "|---|---|",
    ]
    md += [f"| {n} | {v['per_second']:,.0f} |" for n, v in speed.items()]
    md.append("")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predict")
    ap.add_argument(
        "--work", type=Path, default=Path("/tmp/moescope-bench-predict"), help="imported/captured traces"
    )
    ap.add_argument("--sections", default="speed,mixtral,deepseek,bundled")
    ap.add_argument(
        "--bundled-trace", action="append", default=[], help="use this captured trace (with lookahead)"
    )
    ap.add_argument("--quick", action="store_true", help="smaller training budgets")
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--predictors", default="", help="comma-separated predictor names to run (default: all)")
    ap.add_argument("--render", type=Path, help="only rewrite the markdown from a saved predict.json")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    ONLY[:] = [n for n in args.predictors.split(",") if n]
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    md = ["## Expert prediction (`benchmarks/predict.py`)", ""]
    for section in args.sections.split(","):
        t0 = time.perf_counter()
        if section == "speed":
            report["speed"] = section_speed(args.work, args.quick)
            md += speed_md(report["speed"])
        elif section == "deepseek":
            d = section_deepseek(args.work, args.out, args.quick, args.n_boot)
            if d:
                report["deepseek"] = d
                md.append(
                    table_md("DeepSeek-V2-Lite, MoE-Beyond prompts, split by prompt (80/20, seed 0)", d)
                )
        elif section == "mixtral":
            d = section_mixtral(args.work, args.out, args.quick, args.n_boot)
            if d:
                report["mixtral"] = d
                for key, v in d.items():
                    md.append(table_md(f"Mixtral-8x7B HumanEval decode log, {key}", v))
        elif section == "bundled":
            d = section_bundled(args.work, args.out, args.quick, args.n_boot, args.bundled_trace)
            if d:
                report["bundled"] = d
                for key, v in d.items():
                    md.append(table_md(f"Bundled model {key} (gate lookahead captured, m = 2k)", v))
        else:
            raise SystemExit(f"unknown section {section!r}")
        log(f"section {section} done in {time.perf_counter() - t0:.0f}s")
        (args.out / "predict.json").write_text(json.dumps(report, indent=1, default=str))
        (args.out / "predict.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
