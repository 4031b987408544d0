"""``moescope report``: one self-contained HTML page of a trace, its analyses, predictions and a comparison.

:func:`build_report` gathers the data (a bounded sample of documents for the token viewer, the expert
atlas over the whole trace, the analysis folder's figures and tables, optional predictor hits and a
second trace's routing), and :func:`render_page` inlines it all with the page's own script and style.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import ConfigError
from moescope.report.atlas import expert_atlas
from moescope.report.data import MAX_TOKENS, Sample, read_sample
from moescope.report.sections import analysis_sections, read_summary, script_json
from moescope.trace.reader import Trace

#: The ``<meta name="generator">`` that proves a file is a moescope report (the output guard reads it).
GENERATOR = "moescope report"
#: The page aims to stay under this many bytes (docs/report.md); the builder warns above it.
SIZE_BUDGET = 12_000_000


def check_analysis(trace: Trace, folder: Path, summary: dict[str, Any]) -> None:
    """Refuse an analysis folder written for a trace of another model or shape, naming both."""
    want = {"num_experts": trace.num_experts, "top_k": trace.top_k, "layers": list(trace.moe_layers)}
    got = {k: summary.get(k) for k in want}
    other = summary.get("trace")
    model = None
    if other:
        try:
            model = json.loads((Path(other) / "manifest.json").read_text(encoding="utf-8"))["model"]["id"]
        except (OSError, ValueError, KeyError, TypeError):
            model = None
    if got != want or (model is not None and model != trace.model_id):
        raise ConfigError(
            f"`analysis` {folder}: written for {other} (model {model or '?'}, E={got['num_experts']},"
            f" k={got['top_k']}, layers {got['layers']}), not for {trace.path} (model {trace.model_id},"
            f" E={want['num_experts']}, k={want['top_k']}, layers {want['layers']}): analyse this trace"
            " or pass the matching folder"
        )


class _Bar:
    """A rich progress bar over the trace's tokens on stderr, or nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled, self.total, self.label = enabled, total, label
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn(self.label),
                BarColumn(),
                TextColumn("{task.completed:,}/{task.total:,} tokens"),
                TimeElapsedColumn(),
                console=Console(file=sys.stderr),
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total)
        return self

    def update(self, tokens: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=tokens)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def run_analyses_into(
    trace_path: Path, out: Path, analyses: list[str] | None, progress: bool = False
) -> None:
    """Run ``moescope analyze``'s suite in-process into ``out`` (used when no --analysis is given)."""
    from moescope.analysis.run import AnalyzeOptions, run_analyses
    from moescope.analysis.suite import ANALYSIS_NAMES

    opts = AnalyzeOptions(
        analyses=list(analyses or ANALYSIS_NAMES), tsne_points=300, permutations=100, progress=progress
    )
    run_analyses(trace_path, out, opts)


def predictor_hits(trace: Trace, model_path: Path, sample: Sample) -> dict[str, Any]:
    """Per sampled token and layer, how many of its true experts the predictor's top-k names."""
    from moescope.predict import iter_contexts, load_predictor
    from moescope.predict.base import read_header

    header = read_header(model_path)
    pred = load_predictor(model_path)
    E_fit, L_fit = getattr(pred, "num_experts_", None), getattr(pred, "num_layers_", None)
    fitted_on = (header.get("extra") or {}).get("trace") or header.get("trace")
    model = None
    if fitted_on:
        try:
            model = json.loads((Path(fitted_on) / "manifest.json").read_text(encoding="utf-8"))["model"]["id"]
        except (OSError, ValueError, KeyError, TypeError):
            model = None
    if (E_fit, L_fit) != (trace.num_experts, trace.num_layers) or (
        model is not None and model != trace.model_id
    ):
        raise ConfigError(
            f"`predict` {model_path}: fitted on {fitted_on or 'another trace'} (model {model or '?'},"
            f" E={E_fit}, L={L_fit}); {trace.path} is model {trace.model_id} with E={trace.num_experts},"
            f" L={trace.num_layers}: fit a predictor on this model's trace"
        )
    modes = pred.modes()
    mode = 1 if (not modes or 1 in modes) else modes[0]
    k = trace.top_k
    docs = [d["id"] for d in sample.docs]
    sub = trace.filter(documents=docs)
    want = {
        (int(d), int(p)): i for i, (d, p) in enumerate(zip(sample.doc_ids, sample.positions, strict=True))
    }
    hits = np.full(sample.experts.shape[:2], -1, np.int16)
    for ctx in iter_contexts(sub, window=pred.history_window()):
        rows = np.array(
            [want.get((int(d), int(p)), -1) for d, p in zip(ctx.doc_id, ctx.position, strict=True)]
        )
        keep = np.nonzero(rows >= 0)[0]
        if not len(keep):
            continue
        actual = ctx.actual[keep].astype(np.int64)
        for j in range(trace.num_layers):
            ids, _ = pred.predict(ctx.queries(j, mode, rows=keep), m=k)
            a = actual[:, j]
            ok = a != trace.missing_id
            h = (ids[:, :, None] == a[:, None, :]).any(1) & ok
            hits[rows[keep], j] = h.sum(1)
    from moescope.predict import mode_name

    return {
        "name": header["predictor"],
        "file": str(model_path),
        "mode": mode_name(mode),
        "hits": hits,
    }


def _variable(t: Trace) -> bool:
    return bool(t.manifest.get("capture", {}).get("variable_k"))


def changed_sets(a: np.ndarray, b: np.ndarray, variable_a: bool, variable_b: bool) -> np.ndarray:
    """``(n, L)``: 1 where the expert sets differ, 0 where equal, -1 where a side is unrecorded.

    Ids are ``-1`` where unrecorded; in a variable-k trace those slots are padding, not a gap.
    """

    def used(x: np.ndarray) -> np.ndarray:
        E = int(max(a.max(initial=0), b.max(initial=0))) + 1
        u = np.zeros((*x.shape[:2], E + 1), bool)
        np.put_along_axis(u, np.where(x < 0, E, x), True, axis=2)
        return u[:, :, :E]

    ok = np.ones(a.shape[:2], bool)
    if not variable_a:
        ok &= (a >= 0).all(-1)
    if not variable_b:
        ok &= (b >= 0).all(-1)
    diff = (used(a) != used(b)).any(-1)
    return np.where(ok, diff.astype(np.int8), np.int8(-1))


def compare_data(a: Trace, b_path: Path, sample: Sample) -> dict[str, Any]:
    """Trace B's routing for the sampled tokens and the per-layer mismatch over all tokens."""
    from moescope.evaluate.diff import diff_traces

    b = Trace.open(b_path)
    if b.num_tokens != a.num_tokens:
        raise ConfigError(
            f"`compare` {b_path}: holds {b.num_tokens} tokens, {a.path} holds {a.num_tokens}; the compare"
            " view needs two traces of the same tokens (same documents, same tokenizer)"
        )
    try:
        tables = diff_traces(a, b, n_perm=1)
    except ConfigError as exc:
        raise ConfigError(f"`compare` {b_path}: {exc}") from None
    sb = read_sample(b, max_tokens=len(sample.text))
    same = (
        len(sb.token_ids) == len(sample.token_ids)
        and np.array_equal(sb.token_ids, sample.token_ids)
        and np.array_equal(sb.doc_ids, sample.doc_ids)
    )
    if not same:
        raise ConfigError(
            f"`compare` {b_path}: its documents do not hold the same tokens as {a.path}'s; the compare"
            " view needs two traces of the same tokens"
        )
    return {
        "name": str(b_path),
        "model": b.model_id,
        "k": b.top_k,
        "changed": changed_sets(sample.experts, sb.experts, _variable(a), _variable(b)),
        "experts": sb.experts,
        "weights": sb.weights,
        "layers": [
            {k: (_finite(v) if isinstance(v, float) else v) for k, v in r.items()}
            for r in tables["layers"].to_dicts()
        ],
    }


def _finite(v: Any) -> float | None:
    """A float for JSON, ``None`` for a missing or non-finite value (JSON has no NaN)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def ablation_impacts(trace: Trace, folder: Path) -> dict[str, Any]:
    """Per (layer, expert), the harm of disabling it alone, from a ``moescope ablate`` folder's ranking."""
    import csv

    folder = Path(folder)
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        with (folder / "ranking.csv").open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"`ablation` {folder}: no {Path(exc.filename).name}; give a folder written by moescope ablate"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"`ablation` {folder}/summary.json: not valid JSON ({exc})") from None
    model, E = summary.get("model"), summary.get("num_experts")
    if E != trace.num_experts or (model and trace.model_id and model != trace.model_id):
        raise ConfigError(
            f"`ablation` {folder}: ablates model {model} (E={E}); {trace.path} is model {trace.model_id}"
            f" (E={trace.num_experts})"
        )
    out = []
    for r in rows:
        if r.get("experts", "").isdigit() and r.get("impact") not in (None, ""):
            out.append(
                [
                    int(r["layer"]),
                    int(r["experts"]),
                    float(r["impact"]),
                    float(r["impact_lo"] or "nan"),
                    float(r["impact_hi"] or "nan"),
                    r.get("effect", ""),
                ]
            )
    return {"metric": summary.get("rank_by", "impact"), "folder": str(folder), "rows": out}


def _ints(a: np.ndarray) -> list[list[int]]:
    """Per layer, a flat list of the ``(n, L, k)`` array's values: ``out[layer][i * k + slot]``."""
    _n, L = a.shape[:2]
    return [a[:, j].reshape(-1).astype(np.int64).tolist() for j in range(L)]


def page_data(
    trace: Trace,
    sample: Sample,
    atlas: dict[str, Any],
    *,
    predict: dict[str, Any] | None,
    compare: dict[str, Any] | None,
    heads: list[dict[str, Any]],
    ablation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object the page's script reads (``window.MOESCOPE``)."""
    w = sample.weights
    data: dict[str, Any] = {
        "meta": {
            "trace": str(trace.path),
            "model": trace.model_id,
            "tokens": trace.num_tokens,
            "layers": list(trace.moe_layers),
            "E": trace.num_experts,
            "k": trace.top_k,
            "slot_order": trace.slot_order,
            "router_kind": trace.routing.router_kind,
            "labels": list(trace.labels),
            "sample_docs": len(sample.docs),
            "sample_tokens": len(sample.text),
            "of_docs": sample.of_docs,
            "of_tokens": sample.of_tokens,
            "truncated": sample.truncated,
            "entropy_source": sample.entropy_source,
            "atlas_token_rows": atlas["token_rows"],
        },
        "docs": sample.docs,
        "text": sample.text,
        "ex": _ints(sample.experts),
        "w": _ints(np.round(np.nan_to_num(w) * 1000)) if w is not None else None,
        "ent": [
            np.round(sample.entropy[:, j] * 100).astype(int).tolist() for j in range(sample.entropy.shape[1])
        ],
        "atlas": atlas,
        "analyses": heads,
        "predict": None,
        "compare": None,
        "ablation": ablation,
    }
    if predict is not None:
        h = predict["hits"]
        data["predict"] = {
            "name": predict["name"],
            "file": predict["file"],
            "mode": predict["mode"],
            "hits": [h[:, j].astype(int).tolist() for j in range(h.shape[1])],
        }
    if compare is not None:
        cw = compare["weights"]
        ch = compare["changed"]
        data["compare"] = {
            "name": compare["name"],
            "model": compare["model"],
            "k": compare["k"],
            "changed": [ch[:, j].astype(int).tolist() for j in range(ch.shape[1])],
            "ex": _ints(compare["experts"]),
            "w": _ints(np.round(np.nan_to_num(cw) * 1000)) if cw is not None else None,
            "layers": compare["layers"],
        }
    return data


def _asset(name: str) -> str:
    return resources.files("moescope.report").joinpath("assets", name).read_text(encoding="utf-8")


def render_page(data: dict[str, Any], sections_html: str, title: str) -> str:
    """The whole HTML page: style, data, script and the analysis sections inlined."""
    payload = script_json(data)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    values = {
        "TITLE": html.escape(title),
        "GENERATOR": GENERATOR,
        "CREATED": created,
        "CSS": _asset("report.css"),
        "SECTIONS": sections_html,
        "JS": _asset("report.js"),
        "DATA": payload,
    }
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda m: values[m.group(1)], _asset("report.html"))


def build_report(
    trace_path: str | Path,
    *,
    analysis: str | Path | None = None,
    predict: str | Path | None = None,
    compare: str | Path | None = None,
    ablation: str | Path | None = None,
    max_tokens: int = MAX_TOKENS,
    analyses: list[str] | None = None,
    progress: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Build the page for ``trace_path``; returns its HTML and a summary of what it holds.

    Without ``analysis`` the analysis suite (or the named ``analyses``) runs in a temporary folder.
    ``progress`` shows a bar on stderr for the passes over the trace (the analyses, the atlas).
    """
    trace = Trace.open(trace_path)
    with tempfile.TemporaryDirectory(prefix="moescope-report-") as tmp:
        if analysis is None:
            folder = Path(tmp)
            run_analyses_into(trace.path, folder, analyses, progress=progress)
        else:
            folder = Path(analysis)
        summary = read_summary(folder)
        if analysis is not None:
            check_analysis(trace, folder, summary)
        sections_html, heads = analysis_sections(folder, summary)
        with _Bar(progress, trace.num_tokens, "report: expert atlas") as bar:
            atlas = expert_atlas(trace, analysis=folder, progress=bar.update)
    sample = read_sample(trace, max_tokens=max_tokens)
    pred = predictor_hits(trace, Path(predict), sample) if predict is not None else None
    cmp = compare_data(trace, Path(compare), sample) if compare is not None else None
    abl = ablation_impacts(trace, Path(ablation)) if ablation is not None else None
    data = page_data(trace, sample, atlas, predict=pred, compare=cmp, heads=heads, ablation=abl)
    title = f"moescope report: {trace.model_id or trace.path.name}"
    page = render_page(data, sections_html, title)
    info = {
        "trace": str(trace.path),
        "analysis": str(analysis) if analysis is not None else "computed in-process",
        "sample_documents": len(sample.docs),
        "sample_tokens": len(sample.text),
        "bytes": len(page.encode("utf-8")),
        "size_budget_bytes": SIZE_BUDGET,
        "predict": str(predict) if predict else None,
        "compare": str(compare) if compare else None,
        "ablation": str(ablation) if ablation else None,
    }
    return page, info
