"""``moescope analyze`` as a library call: one streaming pass, then each analysis saves and sums itself up.

Every selected analysis (:data:`~moescope.analysis.suite.ANALYSES`) contributes accumulators to a
single :func:`run_pass`, so the trace is read once whatever the number of analyses. Analyses whose
columns are absent are skipped with a note in ``summary.json`` rather than failing the run.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope.analysis._stream import PassContext, check_same_model, make_context
from moescope.analysis.base import Analysis, AnalysisRun
from moescope.analysis.parallel import fold_shards
from moescope.analysis.suite import ANALYSES, ANALYSIS_NAMES
from moescope.errors import ConfigError
from moescope.trace.atomic import atomic_write_json
from moescope.trace.reader import Trace


@dataclass
class AnalyzeOptions:
    """What ``moescope analyze`` runs; defaults match the CLI."""

    analyses: list[str] = field(default_factory=lambda: list(ANALYSIS_NAMES))
    layers: list[int] | None = None
    domains: list[str] | None = None
    target_layer: int | None = None
    compare: Path | None = None
    distances: list[int] = field(default_factory=lambda: [1])
    min_count: int = 10
    permutations: int = 200
    max_tokens: int = 100_000
    tsne_points: int = 1000
    kde_kernel: str = "gaussian"
    kde_bandwidth: str = "scott"
    kde_trim: int | None = None
    kde_points: int = 2000
    per_expert_plots: bool = False
    biclusters: int = 4
    bicluster_method: str = "cocluster"
    seed: int = 0
    progress: bool = False
    workers: int | None = None  # processes over shard groups; None: all cores (fewer on a small trace)
    ray_address: str | None = None  # run the shard groups on Ray: "local", "auto" or "ray://host:port"


def _log(msg: str) -> None:
    sys.stderr.write(f"analyze: {msg}\n")


def analyze(trace: Any, out: str | Path, **options: Any) -> dict[str, Any]:
    """Run the analyses on ``trace`` (a :class:`~moescope.Trace`, a view of one, or its path) into ``out``.

    ``options`` are the fields of :class:`AnalyzeOptions` (``analyses=["load", "entropy"]``,
    ``target_layer=...``); returns the summary that ``summary.json`` holds.
    """
    known = {f.name for f in dataclasses.fields(AnalyzeOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"analyze: unknown option(s) {unknown}; options: {', '.join(sorted(known))}")
    return run_analyses(trace, out, AnalyzeOptions(**options))


def run_analyses(trace_path: Any, out: str | Path, opts: AnalyzeOptions | None = None) -> dict[str, Any]:
    """Run ``opts.analyses`` on the trace (or its path), write CSV/PNG/JSON under ``out``; returns the summary."""
    opts = opts or AnalyzeOptions()
    unknown = [a for a in opts.analyses if a not in ANALYSIS_NAMES]
    if unknown or not opts.analyses:
        raise ConfigError(
            f"analyses: unknown {unknown or 'empty list'}; choose from {', '.join(ANALYSIS_NAMES)}"
        )
    out = Path(out)
    tr = trace_path if isinstance(trace_path, Trace) else Trace.open(trace_path)
    trace_path = tr.path if isinstance(trace_path, Trace) else trace_path
    if opts.domains:
        tr = tr.filter(domain=opts.domains)
    ctx = make_context(tr, opts.layers)
    ids = ctx.layer_ids
    target = opts.target_layer if opts.target_layer is not None else ids[len(ids) // 2]
    if target not in ids:
        raise ConfigError(f"target_layer: {target} is not among the analysed MoE layers {ids}")
    other = Trace.open(opts.compare) if opts.compare else None
    if other is not None:
        check_same_model(tr, other)
    out.mkdir(parents=True, exist_ok=True)
    run = AnalysisRun(
        trace=tr, trace_path=Path(trace_path), ctx=ctx, opts=opts, out=out, target=target, other=other
    )
    summary: dict[str, Any] = {
        "trace": str(trace_path),
        "output": str(out),
        "tokens": tr.num_tokens,
        "layers": ids,
        "num_experts": ctx.E,
        "top_k": ctx.k,
        "router_kind": tr.routing.router_kind,
        "slots_ordered": ctx.ordered,
        "target_layer": target,
        "analyses": {},
    }
    if not ctx.ordered:
        run.notes.append("slots are unordered in this trace: first-choice measures are null")
    if ctx.variable_k:
        run.notes.append(
            f"variable-k strategy trace ({tr.manifest.get('capture', {}).get('strategy')}): padding slots"
            " are masked; shares, nulls and uniform fractions use each token's own number of experts,"
            " and the k-subset alphabet is undefined (co-occurrence and dependence use the expert alphabet)"
        )
    chosen = []
    for name, cls in ANALYSES.items():
        if cls.selectable and name not in opts.analyses:
            continue
        analysis = cls()
        reason = analysis.skip_reason(run)
        if reason is None:
            chosen.append(analysis)
        elif reason:
            run.notes.append(reason)
    accs = [acc for a in chosen for acc in a.accumulators(run)]
    _log(
        f"{tr.num_tokens} tokens, {ctx.Ls} layers, analyses: {', '.join(a.name for a in chosen if a.selectable)}"
    )
    build = functools.partial(
        build_accumulators,
        names=[a.name for a in chosen],
        opts=opts,
        trace_path=run.trace_path,
        target=target,
        other=other,
    )
    fold_shards(ctx, build, accs, workers=opts.workers, ray_address=opts.ray_address, progress=opts.progress)
    for analysis in chosen:
        entry = analysis.finish(run)
        if entry is not None:
            summary["analyses"][analysis.name] = entry
    summary["notes"] = run.notes
    summary["files"] = sorted(set(run.files))
    atomic_write_json(out / "summary.json", _clean(summary))
    for n in run.notes:
        _log(n)
    return _clean(summary)


def build_accumulators(
    trace: Trace,
    *,
    names: list[str],
    opts: AnalyzeOptions,
    trace_path: Path,
    target: int,
    other: Trace | None,
) -> tuple[PassContext, list[Any]]:
    """Fresh accumulators of the analyses ``names``, as :func:`run_analyses` makes them (for workers)."""
    ctx = make_context(trace, opts.layers)
    run = AnalysisRun(
        trace=trace, trace_path=trace_path, ctx=ctx, opts=opts, out=Path("."), target=target, other=other
    )
    analyses: list[Analysis] = [ANALYSES[n]() for n in names]
    return ctx, [acc for a in analyses for acc in a.accumulators(run)]


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN becomes None, NumPy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def summary_text(s: dict[str, Any]) -> str:
    """A few lines a person can read: the headline number of each analysis."""
    lines = [
        f"{s['trace']}: {s['tokens']} tokens, {len(s['layers'])} MoE layers, top-{s['top_k']} of {s['num_experts']}"
    ]
    for name, entry in s["analyses"].items():
        if name in ANALYSES:
            lines.append(ANALYSES[name].describe(entry))
    lines += [f"note: {n}" for n in s["notes"]]
    lines.append(f"{len(s['files'])} files in {s['output']}")
    return "\n".join(lines)
