"""CLI: ``moescope analyze``: every analysis in one streaming pass, tables and figures to a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moescope.analysis.suite import ANALYSIS_NAMES as ANALYSES
from moescope.cli_utils import (
    AllowIncompleteOpt,
    JsonOpt,
    OutDirOpt,
    OverwriteOpt,
    SeedOpt,
    TraceArg,
    emit,
    progress_enabled,
)


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze)


def _int_list(text: str | None, option: str) -> list[int] | None:
    from moescope.errors import ConfigError

    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{option}: expected comma-separated integers, got {text!r}") from None


def analyze(
    trace: TraceArg,
    output: OutDirOpt = Path("analysis"),
    analyses: Annotated[
        str,
        typer.Option(
            "--analyses", "-a", help=f"Comma-separated analyses to run, from: {', '.join(ANALYSES)}."
        ),
    ] = ",".join(ANALYSES),
    layers: Annotated[
        str | None,
        typer.Option("--layers", help="Comma-separated decoder-layer indices of MoE layers (default: all)."),
    ] = None,
    domains: Annotated[
        str | None, typer.Option("--domains", help="Comma-separated domain labels to keep (default: all).")
    ] = None,
    target_layer: Annotated[
        int | None,
        typer.Option(
            "--target-layer", help="Layer for single-layer figures (histograms, heatmaps); default: middle."
        ),
    ] = None,
    compare: Annotated[
        Path | None,
        typer.Option("--compare", help="A second trace of the same model: compare loads, score its logits."),
    ] = None,
    distances: Annotated[
        str, typer.Option("--distances", help="Comma-separated layer distances d for co-occurrence L -> L+d.")
    ] = "1",
    min_count: Annotated[
        int,
        typer.Option("--min-count", help="Vocabulary specialisation: token ids seen at least this often."),
    ] = 10,
    permutations: Annotated[
        int,
        typer.Option(
            "--permutations",
            help="Permutations: of the domain labels (specialisation test) and of the next layer's choices"
            " (dependence: MI against shuffled data).",
        ),
    ] = 200,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Trajectories: sample about this many tokens (all if fewer).")
    ] = 100_000,
    tsne_points: Annotated[
        int, typer.Option("--tsne-points", help="Trajectories: points in the t-SNE (0: skip).")
    ] = 1000,
    kde_kernel: Annotated[
        str,
        typer.Option(
            "--kde-kernel", help="Density: gaussian, tophat, epanechnikov, exponential, linear, cosine."
        ),
    ] = "gaussian",
    kde_bandwidth: Annotated[
        str, typer.Option("--kde-bandwidth", help="Density: scott, silverman or a number.")
    ] = "scott",
    kde_trim: Annotated[
        int | None,
        typer.Option("--kde-trim", help="Density: fit on the t largest logits (sorted) instead of all E."),
    ] = None,
    kde_points: Annotated[
        int, typer.Option("--kde-points", help="Density: logit vectors sampled per layer.")
    ] = 2000,
    per_expert_plots: Annotated[
        bool,
        typer.Option(
            "--per-expert-plots", help="Density: one figure of per-expert logit histograms per layer."
        ),
    ] = False,
    biclusters: Annotated[
        int, typer.Option("--biclusters", help="Dependence: clusters of the spectral co-clustering.")
    ] = 4,
    bicluster_method: Annotated[
        str,
        typer.Option(
            "--bicluster-method",
            help="Dependence: cocluster (SpectralCoclustering) or bicluster (SpectralBiclustering).",
        ),
    ] = "cocluster",
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            "-j",
            help="Processes reading shard groups in parallel (default: all cores; a trace under 250k"
            " tokens per core uses fewer). Results equal one process's exactly.",
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run the shard groups as Ray tasks: 'local' (a Ray instance on this machine), 'auto'"
            " or a cluster address such as ray://head:10001. The trace must be at the same path on every node.",
        ),
    ] = None,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    allow_incomplete: AllowIncompleteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Run the analyses on a trace, write one CSV per result plus PNG figures, print a summary.

    Each figure ``X.png`` comes with ``X.csv`` holding exactly the plotted numbers; ``summary.json``
    lists the key numbers, the files and any analysis skipped (and why).

    Example: moescope analyze runs/mixtral-wikitext -o out/mixtral --analyses load,entropy --target-layer 15

    On 8 cores, or on a Ray cluster: moescope analyze runs/big -o out/big --workers 8;
    moescope analyze /shared/runs/big -o out/big --ray ray://head:10001
    """
    from moescope.analysis.run import AnalyzeOptions, run_analyses, summary_text
    from moescope.errors import ConfigError

    chosen = [a.strip() for a in analyses.split(",") if a.strip()]
    bad = [a for a in chosen if a not in ANALYSES]
    if bad or not chosen:
        raise ConfigError(f"--analyses: unknown {bad or 'empty list'}; choose from {', '.join(ANALYSES)}")
    opts = AnalyzeOptions(
        analyses=chosen,
        layers=_int_list(layers, "layers"),
        domains=[d.strip() for d in domains.split(",")] if domains else None,
        target_layer=target_layer,
        compare=compare,
        distances=_int_list(distances, "distances") or [1],
        min_count=min_count,
        permutations=permutations,
        max_tokens=max_tokens,
        tsne_points=tsne_points,
        kde_kernel=kde_kernel,
        kde_bandwidth=kde_bandwidth,
        kde_trim=kde_trim,
        kde_points=kde_points,
        per_expert_plots=per_expert_plots,
        biclusters=biclusters,
        bicluster_method=bicluster_method,
        seed=seed,
        progress=progress_enabled() and not json_out,
        workers=workers,
        ray_address=ray,
    )
    from moescope.trace.outputs import claim
    from moescope.trace.reader import Trace, reading_incomplete

    with reading_incomplete(allow_incomplete):
        Trace.open(trace)  # refuse a damaged or incomplete trace before touching the output
        with claim(output, "analysis", overwrite=overwrite, inputs=[trace, compare]):
            summary = run_analyses(trace, output, opts)
    emit(summary, json_out, text=summary_text(summary))
