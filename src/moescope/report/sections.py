"""The analysis sections of the report: figures of an ``analyze`` folder, their tables and a reading.

Each figure ``X.png`` of the folder comes with ``X.csv`` holding its numbers; the page shows the PNG
(base64) and the first :data:`MAX_ROWS` rows of the CSV as a sortable table. The one-sentence
reading of each analysis is computed from its ``summary.json`` numbers.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from moescope.errors import ConfigError

#: Rows of each figure's CSV shown as a table (the page says when a table is cut).
MAX_ROWS = 200
#: Analysis name -> file-name prefixes of its figures and tables, in ``moescope analyze`` order.
PREFIXES: dict[str, tuple[str, ...]] = {
    "load": ("load_",),
    "entropy": ("entropy_",),
    "cooccurrence": ("cooccurrence_", "coactivation"),
    "repetition": ("repetition",),
    "specialisation": ("vocab_", "domain_"),
    "trajectories": ("trajectory_",),
    "density": ("density_",),
    "dependence": ("dependence_",),
    "compare": ("compare_",),
}
TITLES = {
    "load": "Expert load",
    "entropy": "Routing entropy",
    "cooccurrence": "Co-occurrence across layers",
    "repetition": "Repetition between consecutive tokens",
    "specialisation": "Specialisation (vocabulary, domain)",
    "trajectories": "Trajectories through the layers",
    "density": "Logit density and p-values",
    "dependence": "Dependence between layers",
    "compare": "Loads against a second trace",
}


def _f(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def reading(name: str, x: dict[str, Any], E: int, k: int) -> str:
    """One sentence saying what the analysis shows, from its summary numbers."""
    try:
        if name == "load":
            return (
                f"Load is {'far from' if x['mean_cv'] > 0.5 else 'close to'} balanced: the coefficient of"
                f" variation of expert loads averages {_f(x['mean_cv'])} (0 is perfectly even) and at layer"
                f" {x['worst_layer']} expert {x['worst_top_expert']} takes {_f(x['worst_top_expert_share'], '.1%')}"
                f" of assignments, against {1 / E:.1%} for an even share; {x['dead_experts']} (layer, expert)"
                " pairs receive no token."
            )
        if name == "entropy":
            return (
                f"Routing uses {x['mean_entropy_bits'] / x['max_possible_bits']:.0%} of the maximum entropy"
                f" ({_f(x['mean_entropy_bits'], '.2f')} of {_f(x['max_possible_bits'], '.2f')} bits); it"
                f" {'rises' if x['last_layer_mean_bits'] > x['first_layer_mean_bits'] else 'falls'} from"
                f" {_f(x['first_layer_mean_bits'], '.2f')} bits at the first layer to"
                f" {_f(x['last_layer_mean_bits'], '.2f')} at the last."
            )
        if name == "cooccurrence":
            return (
                f"A token's experts at one layer tell {_f(x['mean_mi_corrected_bits'])} bits (bias-corrected"
                f" mutual information, normalised {_f(x['mean_nmi'])}) about its experts at the next."
            )
        if name == "repetition":
            ratio = x["first_choice_same_mean"] / max(x["first_choice_null"], 1e-12)
            return (
                f"Consecutive tokens share their first expert {_f(x['first_choice_same_mean'], '.1%')} of the"
                f" time, {ratio:.1f}x the {_f(x['first_choice_null'], '.1%')} expected by chance; any expert"
                f" is shared {_f(x['any_shared_mean'], '.1%')} of the time (chance {_f(x['any_shared_null'], '.1%')})."
            )
        if name == "specialisation":
            dom = (
                f" domain labels carry {_f(x['domain_mi_bits_mean'])} bits about the expert"
                f" (permutation p = {_f(x['domain_p_value'], '.3g')})"
                if x.get("domain_mi_bits_mean") is not None
                else f" no domain test ({x.get('domain_test_note', 'one domain')})"
            )
            return (
                f"Frequent tokens send on average {_f(x['vocab_specialisation_weighted_mean'], '.1%')} of"
                f" their routings to their top {k} experts (uniform routing: {_f(x['uniform_fraction'], '.1%')});"
                + dom
                + "."
            )
        if name == "trajectories":
            return (
                f"The most common full path through the layers is taken by {_f(x['top_path_share'], '.2%')}"
                f" of the {x['sampled_tokens']} sampled tokens."
            )
        if name == "density":
            return (
                f"Scored on the {x['scored_on']}, {_f(x['mean_share_p_below_0.05'], '.1%')} of router-logit"
                " vectors fall below p = 0.05 under the fitted density (5% if they came from the same"
                f" distribution); mean KS statistic against uniform p-values {_f(x['mean_ks_stat_vs_uniform'])}."
            )
        if name == "dependence":
            if not x.get("pairs"):
                return "No pair of adjacent layers to compare."
            return (
                f"Adjacent layers are dependent: corrected mutual information {_f(x['mean_mi_corrected_bits'])}"
                f" bits against {_f(x['mean_shuffled_mi_bits'])} for shuffled data, significant (p <= 0.05)"
                f" for {x['pairs_p_below_0.05']} of {x['pairs']} layer pairs."
            )
        if name == "compare":
            return (
                f"Expert loads differ from the second trace by a mean Jensen-Shannon divergence of"
                f" {_f(x['mean_jsd_bits'], '.4f')} bits (permutation p = {_f(x['p_value'], '.3g')})."
            )
    except (KeyError, TypeError, ZeroDivisionError):
        pass
    numbers = ", ".join(f"{k2} {v}" for k2, v in x.items() if isinstance(v, int | float))
    return f"Key numbers: {numbers}." if numbers else "No numbers recorded."


def read_summary(folder: Path) -> dict[str, Any]:
    """An ``analyze`` folder's ``summary.json``; a clear error when the folder is not one."""
    path = Path(folder) / "summary.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"`analysis` {folder}: no summary.json; give a folder written by moescope analyze"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"`analysis` {path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("analyses"), dict):
        raise ConfigError(f"`analysis` {path}: no 'analyses' object; not written by moescope analyze")
    return doc


def _table_html(csv_path: Path, tid: str) -> str:
    with csv_path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return ""
    head, body = rows[0], rows[1:]
    shown = body[:MAX_ROWS]
    cut = (
        f" (first {len(shown)} of {len(body)} rows; all in {csv_path.name})" if len(body) > len(shown) else ""
    )

    def cell(v: str) -> str:
        try:
            x = float(v)
            txt = v if abs(x) >= 1e-3 or x == 0 or len(v) < 9 else f"{x:.3g}"
            if "." in v and len(v) > 9 and abs(x) >= 1e-3:
                txt = f"{x:.4g}"
            return f'<td class="num" data-v="{html.escape(v)}">{html.escape(txt)}</td>'
        except ValueError:
            return f"<td>{html.escape(v)}</td>"

    ths = "".join(f'<th title="click to sort">{html.escape(h)}</th>' for h in head)
    trs = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in shown)
    return (
        f'<details class="table"><summary>numbers behind it: {html.escape(csv_path.name)}{cut}</summary>'
        f'<table class="sortable" id="{tid}"><thead><tr>{ths}</tr></thead><tbody>{trs}</tbody></table></details>'
    )


#: Figures drawn again as an inline zoomable scatter (SVG, the page's own script), from their CSV:
#: figure stem -> the x and y columns.
ZOOM_PLOTS = {"trajectory_pca": ("pc1", "pc2"), "trajectory_tsne": ("tsne1", "tsne2")}
#: Points a zoomable scatter embeds at most (the first ones of the CSV; the page says when it cuts).
ZOOM_POINTS = 5000


def script_json(data: Any) -> str:
    """``data`` as compact JSON that is safe inside an inline ``<script>`` (no ``</`` can close it)."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def zoom_plot_html(csv_path: Path, stem: str) -> str:
    """A ``<div class="zoom-plot">`` holding the scatter's points as JSON for the page's script.

    Points: x, y (rounded to 4 significant digits), the group (the CSV's ``domain`` or ``token_class``
    column, as an index into ``groups``), the token id and the sample index, for the hover.
    """
    xcol, ycol = ZOOM_PLOTS[stem]
    with csv_path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    gcol = next((c for c in ("domain", "token_class") if rows and c in rows[0]), None)
    groups: dict[str, int] = {}
    pts = []
    for r in rows:
        try:
            x, y = float(r[xcol]), float(r[ycol])
        except (KeyError, ValueError):
            continue  # an empty cell (t-SNE not computed for this point)
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        g = groups.setdefault(r.get(gcol, "") if gcol else "", len(groups))
        pts.append(
            [
                float(f"{x:.4g}"),
                float(f"{y:.4g}"),
                g,
                int(r.get("token_id") or -1),
                int(r.get("sample_index") or -1),
            ]
        )
    shown = pts[:ZOOM_POINTS]
    data = {
        "x": xcol,
        "y": ycol,
        "group_by": gcol or "",
        "groups": list(groups),
        "points": shown,
        "of": len(pts),
    }
    payload = script_json(data)
    return (
        f'<div class="zoom-plot" data-plot="{html.escape(stem)}" data-points="{len(shown)}">'
        f'<script type="application/json" class="zoom-data">{payload}</script></div>'
    )


#: Heatmap figures whose CSV holds one cell per row: stem pattern -> (row column, column column, value
#: column; ``None`` = the pattern's group), drawn again as an SVG heatmap whose cells show their value on hover.
HEAT_PLOTS = (
    (re.compile(r"load_heatmap$"), ("layer", "expert", "assignment_share")),
    (re.compile(r"coactivation_layer\d+$"), ("a", "b", "p_b_given_a")),
    (re.compile(r"cooccurrence_L\d+_L\d+_(lift|p_col|p_joint|p_row)$"), ("i", "j", None)),
)
#: Cells a hoverable heatmap embeds at most; a larger one keeps only its PNG (the page says so).
HEAT_CELLS = 20000


def heat_plot_html(csv_path: Path, stem: str) -> str:
    """A ``<div class="heat-plot">`` with the heatmap's cells as JSON for the page's script, or ``""``
    when ``stem`` is no long-form heatmap; rows and columns are labelled with the CSV's symbols."""
    cols = next(((m, c) for pat, c in HEAT_PLOTS if (m := pat.match(stem))), None)
    if cols is None:
        return ""
    m, (rcol, ccol, vcol) = cols
    vcol = vcol or m.group(1)
    with csv_path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {rcol, ccol, vcol} <= set(rows[0]):
        return ""
    if len(rows) > HEAT_CELLS:
        return f'<p class="muted heat-cut">{len(rows):,} cells: too many to hover, the PNG only.</p>'
    rlab = "symbol_from" if "symbol_from" in rows[0] else None
    clab = "symbol_to" if "symbol_to" in rows[0] else None
    rkeys: dict[int, str] = {}
    ckeys: dict[int, str] = {}
    cells = []
    for r in rows:
        try:
            i, j, v = int(r[rcol]), int(r[ccol]), float(r[vcol])
        except ValueError:
            continue
        if not math.isfinite(v):
            continue
        rkeys.setdefault(i, r[rlab] if rlab else str(i))
        ckeys.setdefault(j, r[clab] if clab else str(j))
        cells.append([i, j, float(f"{v:.4g}")])
    # plain ids (layers, experts) keep every index up to the largest, so the map lines up with the PNG
    if rlab is None and rkeys:
        rkeys = {i: str(i) for i in range(min(0, *rkeys), max(rkeys) + 1)}
    if clab is None and ckeys:
        ckeys = {j: str(j) for j in range(min(0, *ckeys), max(ckeys) + 1)}
    ri = {k: n for n, k in enumerate(sorted(rkeys))}
    ci = {k: n for n, k in enumerate(sorted(ckeys))}
    data = {
        "row": rcol,
        "col": ccol,
        "value": vcol,
        "rows": [rkeys[k] for k in sorted(rkeys)],
        "cols": [ckeys[k] for k in sorted(ckeys)],
        "cells": [[ri[i], ci[j], v] for i, j, v in cells],
    }
    payload = script_json(data)
    return (
        f'<div class="heat-plot" data-plot="{html.escape(stem)}" data-cells="{len(cells)}">'
        f'<script type="application/json" class="heat-data">{payload}</script></div>'
    )


def analysis_sections(folder: Path, summary: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """HTML of one ``<section>`` per analysis in the folder, and the summary's headline rows."""
    folder = Path(folder)
    E, k = int(summary.get("num_experts", 0) or 0), int(summary.get("top_k", 0) or 0)
    pngs = sorted(folder.glob("*.png"))
    parts, heads = [], []
    for name, x in summary["analyses"].items():
        if not isinstance(x, dict):
            continue
        prefixes = PREFIXES.get(name, (name,))
        figs = [p for p in pngs if p.name.startswith(prefixes)]
        text = reading(name, x, E, k)
        heads.append({"name": name, "title": TITLES.get(name, name), "reading": text})
        body = []
        for i, p in enumerate(figs):
            b64 = base64.b64encode(p.read_bytes()).decode("ascii")
            csv_path = p.with_suffix(".csv")
            table = _table_html(csv_path, f"table-{name}-{i}") if csv_path.is_file() else ""
            plot = zoom_plot_html(csv_path, p.stem) if p.stem in ZOOM_PLOTS and csv_path.is_file() else ""
            heat = heat_plot_html(csv_path, p.stem) if not plot and csv_path.is_file() else ""
            note = " (the PNG for papers; above, the same points to zoom and hover)" if plot else ""
            if heat.startswith("<div"):
                note = " (the PNG for papers; above, the same cells: hover one for its value)"
            body.append(
                f'<figure class="fig" data-figure="{html.escape(p.stem)}">{plot}{heat}<img alt="{html.escape(p.stem)}"'
                f' loading="lazy" src="data:image/png;base64,{b64}"><figcaption>{html.escape(p.stem)}'
                f"{note}"
                f"</figcaption>{table}</figure>"
            )
        nums = "".join(
            f"<tr><th>{html.escape(str(k2))}</th><td>{html.escape(_num(v))}</td></tr>"
            for k2, v in x.items()
            if isinstance(v, int | float | str) or v is None
        )
        parts.append(
            f'<section class="analysis" id="analysis-{html.escape(name)}" data-analysis="{html.escape(name)}">'
            f"<h2>{html.escape(TITLES.get(name, name))}</h2>"
            f'<p class="reading">{html.escape(text)}</p>'
            f'<table class="numbers">{nums}</table>' + "".join(body) + "</section>"
        )
    notes = summary.get("notes") or []
    if notes:
        parts.append(
            '<section class="analysis" id="analysis-notes"><h2>Skipped</h2><ul>'
            + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes)
            + "</ul></section>"
        )
    return "".join(parts), heads


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)
