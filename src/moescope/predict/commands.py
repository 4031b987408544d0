"""CLI: ``moescope predict list|fit|eval`` and ``moescope predict seed004 extract|create-rules|evaluate-rules``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from moescope.cli_utils import AllowIncompleteOpt, JsonOpt, OverwriteOpt, TraceArg, emit
from moescope.errors import ConfigError

predict_app = typer.Typer(
    help="Predict which experts a token will use: fit predictors on one trace, evaluate on held-out documents.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
seed004_app = typer.Typer(
    help="Seed 004's rule workflow on its own files: extract journeys, create rules, evaluate rules.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def register(app: typer.Typer) -> None:
    predict_app.add_typer(seed004_app, name="seed004")
    app.add_typer(predict_app, name="predict")


def _parse_params(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings -> dict; values are JSON when they parse (numbers, lists, true), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE, e.g. --param hidden=64")
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = tuple(value) if isinstance(value, list) else value
    return out


@predict_app.command("list")
def list_predictors(json_out: JsonOpt = False) -> None:
    """Name every predictor `moescope predict fit --predictor` accepts, with what it uses.

    Example: moescope predict list --json
    """
    from moescope.core.estimator import plain_params
    from moescope.predict.base import make_predictor, registered_predictors

    rows = []
    for name, reg in registered_predictors().items():
        if not reg.listed:
            continue
        rows.append(
            {
                "name": name,
                "class": reg.cls.__name__,
                "description": reg.description,
                "kind": "table" if reg.cls.table else "learned",
                "defaults": plain_params(make_predictor(name)),
            }
        )
    width = max(len(r["name"]) for r in rows)
    emit(
        {"predictors": rows},
        json_out,
        text="\n".join(f"{r['name']:<{width}}  {r['description']}" for r in rows),
    )


@predict_app.command("fit")
def fit(
    trace: TraceArg,
    predictor: str = typer.Option(
        ...,
        "--predictor",
        "-p",
        help="Predictor name (see `moescope predict list`); 'best' = combined.",
        show_default=False,
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Model file to write (.npz, no pickle).", show_default=False
    ),
    distance: list[int] = typer.Option(
        [1], "--distance", "-d", help="Spatial prediction distance(s) in layers to fit (repeat)."
    ),
    temporal: bool = typer.Option(
        False, "--temporal", help="Also fit temporal prediction (same layer, next token)."
    ),
    param: list[str] = typer.Option(
        [], "--param", help="Predictor parameter KEY=VALUE (repeat), e.g. --param alpha=0.5."
    ),
    test_fraction: float = typer.Option(
        0.2, "--test-fraction", help="Share of documents held out for `predict eval`."
    ),
    no_split: bool = typer.Option(
        False, "--no-split", help="Fit on every document (evaluate on another trace)."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the document split (and the predictor's random_state default)."
    ),
    overwrite: OverwriteOpt = False,
    allow_incomplete: AllowIncompleteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Fit a predictor on a trace's training documents and save it; the held-out documents are recorded.

    Example: moescope predict fit runs/olmoe-wiki -p best -d 1 -d 2 -d 4 --temporal -o olmoe-best.npz
    """
    import time

    from moescope.core.estimator import plain_params
    from moescope.predict.base import make_predictor, registered_predictors
    from moescope.trace.outputs import claim
    from moescope.trace.reader import Trace
    from moescope.trace.split import fit_record, split_documents

    tr = Trace.open(trace, allow_incomplete=allow_incomplete)
    registry = registered_predictors()
    if predictor not in registry:
        raise ConfigError(
            f"--predictor {predictor!r} is unknown; choose one of: {', '.join(sorted(registry))}"
        )
    cls = registry[predictor].cls
    params = _parse_params(param)
    names = cls.param_names()
    modes = sorted(set(distance) | ({0} if temporal else set()))
    if any(d < 1 for d in distance):
        raise ConfigError(
            f"--distance values must be >= 1 (use --temporal for the next token), got {distance}"
        )
    if (
        "distances" in names
        and "distances" not in params
        and not (predictor in ("rules-ahead", "rules-level5") and distance == [1])
    ):
        params["distances"] = tuple(modes)
    if "random_state" in names and "random_state" not in params:
        params["random_state"] = seed
    pred = make_predictor(predictor, **params)
    # the output is checked and locked before the (long) fit, released once the file is saved
    with claim(output, "predictor", overwrite=overwrite, inputs=[trace]):
        if no_split:
            train_docs, test_docs = tr.documents(), []
            fit_trace = tr
        else:
            train_docs, test_docs = split_documents(tr, test_fraction, seed)
            fit_trace = tr.filter(documents=train_docs)
        t0 = time.perf_counter()
        pred.fit(fit_trace)
        seconds = time.perf_counter() - t0
        extra = {**fit_record(tr, train_docs, test_docs, seed), "fit_seconds": seconds}
        pred.save(output, extra=extra)
    fitted_modes = pred.modes() or modes
    from moescope.predict.queries import mode_name

    result = {
        "model": str(output),
        "predictor": predictor,
        "params": plain_params(pred),
        "modes": [mode_name(m) for m in fitted_modes],
        "train_documents": len(train_docs),
        "test_documents": len(test_docs),
        "n_params": pred.n_params_,
        "fit_seconds": round(seconds, 3),
    }
    emit(
        result,
        json_out,
        text=f"{output}: {predictor} fitted on {len(train_docs)} document(s) in {seconds:.1f}s, "
        f"{pred.n_params_} parameters, modes {', '.join(result['modes'])}; {len(test_docs)} held out",
    )


@predict_app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(
        ..., help="Model file written by `moescope predict fit`.", show_default=False
    ),
    trace: TraceArg = ...,
    mode: list[str] = typer.Option(
        [], "--mode", "-m", help="Mode(s) to score: d1, d2, ... or temporal (default: the model's)."
    ),
    budget: list[int] = typer.Option(
        [],
        "--budget",
        "-b",
        help="Prefetch budget(s) m >= k for recall@m and precision@m (default k and 2k).",
    ),
    documents: str = typer.Option(
        "test",
        "--documents",
        help="On the training trace: 'test' (held-out documents) or 'all' (leaks training data).",
    ),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the confidence intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    figures: Path | None = typer.Option(
        None, "--figures", help="Directory for accuracy-by-layer/-distance PNG + CSV."
    ),
    allow_incomplete: AllowIncompleteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Score a saved predictor on a trace: per layer, per mode and overall, with CIs and random baselines.

    On the trace it was fitted on, only the held-out documents are scored.

    Example: moescope predict eval olmoe-best.npz runs/olmoe-wiki --budget 8 --budget 16 --json
    """
    from moescope.predict.base import load_predictor, read_header
    from moescope.predict.evaluate import evaluate
    from moescope.predict.queries import parse_mode
    from moescope.trace.reader import Trace
    from moescope.trace.split import held_out

    if documents not in ("test", "all"):
        raise ConfigError(f"--documents must be 'test' or 'all', got {documents!r}")
    if n_boot < 1:
        raise ConfigError(f"--n-boot must be >= 1 (bootstrap resamples for the intervals), got {n_boot}")
    header = read_header(model)
    pred = load_predictor(model)
    part = held_out(
        Trace.open(trace, allow_incomplete=allow_incomplete),
        header.get("extra", {}),
        documents,
        what=str(model),
    )
    if part.warning:
        print(f"warning: {part.warning}", file=sys.stderr)
    tr, scored = part.trace, part.scored
    modes = [parse_mode(m) for m in mode] or None
    try:
        res = evaluate(pred, tr, modes=modes, budgets=budget or None, n_boot=n_boot, seed=seed)
    except (ValueError, IndexError) as exc:  # arrays in the file of a shape the trace cannot use
        detail = " ".join(str(exc).split())[:200]
        raise ConfigError(
            f"{model}: the saved predictor does not fit trace {trace} ({detail}); refit it"
        ) from None
    summary = {"model": str(model), "scored": scored, **res.summary}
    if figures is not None:
        from moescope.predict.figures import plot_by_distance, plot_by_layer

        paths = plot_by_layer({header["predictor"]: res}, figures) + plot_by_distance(
            {header["predictor"]: res}, figures
        )
        summary["figures"] = [str(p) for p in paths]
    emit(summary, json_out, text=_format_eval(summary))


def _format_eval(s: dict[str, Any]) -> str:
    lines = [
        f"{s['model']} ({s['predictor']}) on {s['trace']} ({s['scored']}), top-{s['top_k']} of {s['num_experts']}"
    ]
    for mname, entry in s["modes"].items():
        lines.append(f"{mname}: {entry['queries']} queries")
        for metric, v in entry["overall"].items():
            lo, hi = v["ci"]
            lines.append(f"  {metric:<14}{v['value']:.4f}  [{lo:.4f}, {hi:.4f}]  random {v['random']:.4f}")
        per_layer = " ".join(f"{row['slot_recall']:.2f}" for row in entry["layers"])
        lines.append(f"  slot_recall by layer: {per_layer}")
    pps = s.get("predictions_per_second")
    if pps:
        lines.append(f"throughput: {pps:,.0f} predictions/s (scoring included)")
    return "\n".join(lines)


@seed004_app.command("extract")
def seed004_extract(
    raw: Path = typer.Argument(
        ..., help="Raw routing JSONL (e.g. humaneval_2_routing.jsonl).", show_default=False
    ),
    problem: int = typer.Option(..., "--problem", "-p", help="Problem id to extract.", show_default=False),
    tokens: tuple[int, int] = typer.Option(
        ..., "--tokens", "-t", help="Token range START END (end exclusive).", show_default=False
    ),
    output_dir: Path = typer.Option(
        Path("."), "--output-dir", "-o", help="Directory for p<problem>_token_<i>.jsonl."
    ),
    short_series: str = typer.Option(
        "mask",
        "--short-series",
        help="A (problem, layer) series shorter than its problem had a record dropped and later token_idx"
        " renumbered; 'mask' leaves it out of every journey, 'keep-prefix' keeps it as logged (only if"
        " records can only be lost at the end). Same choices as moescope import.",
    ),
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Extract token journeys (one file per token, one record per layer) from seed 004's raw JSONL.

    Example: moescope predict seed004 extract humaneval_2_routing.jsonl --problem 0 --tokens 0 10 -o journeys/
    """
    from moescope.predict.seed004 import extract_journeys
    from moescope.trace.outputs import claim

    names = [f"p{problem}_token_{t}.jsonl" for t in range(tokens[0], tokens[1])]
    with claim(output_dir, "folder", overwrite=overwrite, inputs=[raw], option="--output-dir", names=names):
        files, short = extract_journeys(
            raw, problem, tokens[0], tokens[1], output_dir, short_series=short_series
        )
    if short:
        what = "left out of every journey" if short_series == "mask" else "kept as logged (keep-prefix)"
        listed = ", ".join(
            f"layer {s['layer']} ({s['records']} records for {s['tokens']} tokens)" for s in short
        )
        print(
            f"warning: problem {problem}: {len(short)} series have dropped records and renumbered token_idx,"
            f" {what}: {listed}",
            file=sys.stderr,
        )
    partial = [
        f
        for f in files
        if sum(1 for _ in open(f, encoding="utf-8"))
        < max(sum(1 for _ in open(g, encoding="utf-8")) for g in files)
    ]
    for f in partial:
        print(
            f"warning: {f} has fewer layers than the others (records missing from the log)", file=sys.stderr
        )
    emit(
        {"files": [str(f) for f in files], "short_series": short, "short_series_policy": short_series},
        json_out,
        text="\n".join(f"wrote {f}" for f in files),
    )


@seed004_app.command("create-rules")
def seed004_create(
    files: list[Path] = typer.Argument(..., help="Training token journey files.", show_default=False),
    output: Path = typer.Option(Path("rules.json"), "--output", "-o", help="Rules JSON to write."),
    num_experts: int = typer.Option(8, "--num-experts", help="Experts per layer (for the random baseline)."),
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Create majority-vote rules of levels 1-5 from token journeys.

    Example: moescope predict seed004 create-rules p0_token_0.jsonl p0_token_1.jsonl -o rules.json
    """
    from moescope.predict.seed004 import create_rules
    from moescope.trace.atomic import atomic_write_json
    from moescope.trace.outputs import claim

    rules = create_rules(files, num_experts=num_experts)
    with claim(output, "file", overwrite=overwrite, inputs=files):
        atomic_write_json(output, rules)
    counts = {f"level{i}": len(rules[f"level{i}"]) for i in range(1, 5)}
    counts.update({f"level5_k{k}": len(v) for k, v in rules["level5"].items()})
    emit(
        {"rules_file": str(output), "rules": counts},
        json_out,
        text=f"{output}: " + ", ".join(f"{k} {v} rules" for k, v in counts.items()),
    )


@seed004_app.command("evaluate-rules")
def seed004_evaluate(
    rules: Path = typer.Option(
        ..., "--rules", "-r", help="Rules JSON from create-rules.", show_default=False
    ),
    test: list[Path] = typer.Option(
        ...,
        "--test",
        "-t",
        help="Test token journey file(s): --test a.jsonl b.jsonl ... as in the seed.",
        show_default=False,
    ),
    more: list[Path] = typer.Argument(
        None, help="More test files (what follows the first --test file).", show_default=False
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the results JSON here."),
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate rules on test journeys: correct / total / accuracy / vs random per level, best level.

    Example: moescope predict seed004 evaluate-rules -r rules.json -t p1_token_0.jsonl -t p1_token_1.jsonl -o results.json
    """
    from moescope.predict.seed004 import evaluate_rules, format_results, load_rules
    from moescope.trace.atomic import atomic_write_json

    doc = evaluate_rules(load_rules(rules), [*test, *(more or [])], rules_file=rules.name)
    if output is not None:
        from moescope.trace.outputs import claim

        with claim(output, "file", overwrite=overwrite, inputs=[rules, *test, *(more or [])]):
            atomic_write_json(output, doc)
    emit(doc, json_out, text=format_results(doc))
