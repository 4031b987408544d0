"""CLI: ``moescope report``: one self-contained HTML page of a trace (analyses, token viewer, atlas, compare)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moescope.cli_utils import AllowIncompleteOpt, JsonOpt, OverwriteOpt, TraceArg, emit, progress_enabled


def register(app: typer.Typer) -> None:
    app.command("report")(report)


def report(
    trace: TraceArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")] = Path(
        "report.html"
    ),
    analysis: Annotated[
        Path | None,
        typer.Option(
            "--analysis",
            help="A folder written by `moescope analyze` for this trace (default: run the analyses now).",
        ),
    ] = None,
    predict: Annotated[
        Path | None,
        typer.Option(
            "--predict", help="A predictor file (`moescope predict fit`): colour tokens by hit or miss."
        ),
    ] = None,
    compare: Annotated[
        Path | None,
        typer.Option(
            "--compare", help="A second trace of the same tokens: per-layer mismatch, changed tokens."
        ),
    ] = None,
    ablation: Annotated[
        Path | None,
        typer.Option(
            "--ablation", help="A `moescope ablate` folder of the same model: impacts on the atlas cards."
        ),
    ] = None,
    max_tokens: Annotated[
        int,
        typer.Option(
            "--max-tokens", help="Tokens the token viewer embeds (whole documents, round-robin by domain)."
        ),
    ] = 20_000,
    overwrite: OverwriteOpt = False,
    allow_incomplete: AllowIncompleteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write one self-contained HTML report: summary, every analysis with figures and tables, a token
    viewer coloured by expert, an expert atlas and (with --compare) the routing difference.

    The page inlines its script, style, figures and data, so it opens offline.

    Example: moescope report runs/mixtral-wiki --analysis out/mixtral --predict best.npz -o report.html
    """
    from moescope.errors import ConfigError
    from moescope.report.build import build_report
    from moescope.trace.atomic import atomic_write
    from moescope.trace.outputs import claim
    from moescope.trace.reader import Trace, reading_incomplete

    if max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {max_tokens}")
    with reading_incomplete(allow_incomplete):
        Trace.open(trace)
        with claim(
            output, "report", overwrite=overwrite, inputs=[trace, analysis, compare, predict, ablation]
        ):
            page, info = build_report(
                trace,
                analysis=analysis,
                predict=predict,
                compare=compare,
                ablation=ablation,
                max_tokens=max_tokens,
                progress=progress_enabled() and not json_out,
            )
            output.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(output, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    info["output"] = str(output)
    emit(
        info,
        json_out,
        text=f"{output}: report of {info['trace']} ({info['bytes'] / 1e6:.1f} MB, token viewer "
        f"{info['sample_tokens']} tokens of {info['sample_documents']} document(s))",
    )
