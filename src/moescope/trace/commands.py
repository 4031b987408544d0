"""CLI: ``moescope validate``, ``moescope info``, ``moescope split`` and ``moescope merge``."""

from __future__ import annotations

from pathlib import Path

import typer

from moescope.cli_utils import AllowIncompleteOpt, JsonOpt, OverwriteOpt, TraceArg, emit


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
    app.command("info")(info)
    app.command("split")(split)
    app.command("merge")(merge)


def validate(
    trace: TraceArg,
    no_checksums: bool = typer.Option(False, "--no-checksums", help="Skip SHA-256 verification (faster)."),
    json_out: JsonOpt = False,
) -> None:
    """Check a trace: manifest, shard checksums, schema, shapes, expert id ranges, duplicates.

    Exits 1 and lists every problem (file and field named) when the trace is not sound.

    Example: moescope validate runs/mixtral-wikitext
    """
    from moescope.errors import as_flags
    from moescope.trace.validate import validate_trace

    problems = [as_flags(p) for p in validate_trace(trace, checksums=not no_checksums)]
    emit(
        {"trace": str(trace), "ok": not problems, "problems": problems},
        json_out,
        text=f"{trace}: OK" if not problems else "\n".join(problems),
    )
    if problems:
        raise typer.Exit(1)


def info(trace: TraceArg, json_out: JsonOpt = False) -> None:
    """Summarise a trace: model, routing facts, columns, labels, size.

    Example: moescope info runs/mixtral-wikitext --json
    """
    from moescope.trace.reader import Trace

    tr = Trace.open(trace, allow_incomplete=True)  # info reports an incomplete trace, marked as such
    m = tr.manifest
    summary = {
        "trace": str(trace),
        "model": m.get("model", {}),
        "routing": m["routing"],
        "columns": m["columns"],
        "labels": tr.labels,
        "tokens": tr.num_tokens,
        "shards": len(m["shards"]),
        "bytes": sum(s.get("bytes", 0) for s in m["shards"]),
        "complete": tr.complete,
    }
    r = tr.routing
    text = (
        f"{trace}: {summary['tokens']} tokens in {summary['shards']} shard(s), {summary['bytes']} bytes"
        f"{'' if tr.complete else ' (INCOMPLETE)'}\n"
        f"model: {m.get('model', {}).get('id', '?')} ({r.family}), {r.num_moe_layers} MoE layers "
        f"{r.moe_layers}, top-{r.top_k} of {r.num_experts}, router {r.router_kind}, "
        f"{r.n_shared_experts} shared expert(s)\n"
        f"labels: {', '.join(tr.labels) or '-'}\n"
        f"optional columns: "
        + ", ".join(k for k in ("weights", "logits") if m["columns"].get(k))
        + (", " + ", ".join(tr.lookahead_columns) if tr.lookahead_columns else "")
    )
    emit(summary, json_out, text=text)


def split(
    trace: TraceArg,
    output: Path = typer.Option(
        ..., "--output", "-o", help="Folder that receives train/ and test/ (two traces)."
    ),
    test_fraction: float = typer.Option(
        0.2, "--test-fraction", help="Share of documents in the test trace, in (0, 1)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random document split (same seed, same split)."),
    overwrite: OverwriteOpt = False,
    allow_incomplete: AllowIncompleteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Split a trace by document into OUTPUT/train and OUTPUT/test (all columns kept).

    A document's tokens never straddle the split, so predictors fitted on train and evaluated or
    replayed on test (moescope predict fit/eval, moescope simulate --train) are judged on unseen text.
    It is the split `moescope predict fit --test-fraction F --seed S` holds out for `predict eval`.

    Example: moescope split runs/deepseek -o runs/deepseek-split --test-fraction 0.2
    """
    from moescope.trace.outputs import claim
    from moescope.trace.reader import Trace

    source = Trace.open(trace, allow_incomplete=allow_incomplete)
    with claim(output, "split", overwrite=overwrite, inputs=[trace]) as c:
        c.traces = ["train", "test"]
        train, test = source.split(test_fraction, seed, output=output, overwrite=True)
    summary = {
        "train": {"trace": str(train.path), "documents": len(train.documents()), "tokens": train.num_tokens},
        "test": {"trace": str(test.path), "documents": len(test.documents()), "tokens": test.num_tokens},
    }
    emit(
        summary,
        json_out,
        text="\n".join(
            f"{k}: {v['trace']} ({v['documents']} documents, {v['tokens']} tokens)"
            for k, v in summary.items()
        ),
    )


def merge(
    traces: list[Path] = typer.Argument(
        ..., help="Traces of the same model to join (two or more), in order.", show_default=False
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Trace directory to write.", show_default=False),
    overwrite: OverwriteOpt = False,
    allow_incomplete: AllowIncompleteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Join traces of one model (captured separately, e.g. on other machines) into one trace.

    Documents are renumbered in input order; every column is kept. The traces must agree on the
    model, tokenizer, routing facts and columns; otherwise the error names the two files and the field.

    Example: moescope merge runs/node0 runs/node1 -o runs/all
    """
    from moescope.trace.merge import merge_traces
    from moescope.trace.outputs import claim

    for t in traces:
        if not t.exists():
            raise typer.BadParameter(f"{t}: no such trace directory", param_hint="TRACES")
    with claim(output, "trace", overwrite=overwrite, inputs=traces):
        result = merge_traces(traces, output, overwrite=overwrite, allow_incomplete=allow_incomplete)
    emit(
        result.to_dict(),
        json_out,
        text=f"{result.trace}: {result.tokens} tokens of {result.documents} documents from {len(traces)} traces"
        f" in {result.shards} shard(s)",
    )
