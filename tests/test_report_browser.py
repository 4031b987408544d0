"""The demo's HTML report opened in a real headless Chromium (Playwright driving the system browser).

Everything the page shows is checked against the trace read independently with pyarrow: the colours
the layer control gives, the experts and weights a hover shows, the atlas's load shares and the tokens
the compare view marks. Every request that is not the file itself is blocked and must not happen.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moescope.trace.schema import ROUTING_METADATA_KEY

pytestmark = pytest.mark.slow

CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()), None
)


def read_routing(trace: Path) -> dict[str, np.ndarray]:
    """doc, position, experts (n, L, k) and weights straight from the parquet shards (no moescope reader)."""
    manifest = json.loads((trace / "manifest.json").read_text())
    tables = [pq.read_table(trace / s["file"]) for s in manifest["shards"]]
    t = pa.concat_tables(tables)
    r = manifest["routing"]
    L, k = len(r["moe_layers"]), r["top_k"]
    ex = np.asarray(t["experts"].combine_chunks().flatten().flatten()).reshape(-1, L, k).astype(np.int64)
    w = np.asarray(t["weights"].combine_chunks().flatten().flatten()).reshape(-1, L, k)
    return {
        "doc": t["doc_id"].to_numpy(),
        "pos": t["position"].to_numpy(),
        "experts": ex,
        "weights": w,
        "ranked": r.get("slot_order", "rank") == "rank",
        "E": r["num_experts"],
        "layers": r["moe_layers"],
    }


def first_expert(r: dict, i: int, j: int) -> int:
    """The page's rule: slot 0 of a rank-ordered trace, else the heaviest expert (ties: lowest id)."""
    ex, w = r["experts"][i, j], r["weights"][i, j]
    if r["ranked"]:
        return int(ex[0])
    order = sorted(range(len(ex)), key=lambda s: (-w[s], ex[s]))
    return int(ex[order[0]])


def artifact(path: Path) -> None:
    """Copy a test artifact where CI collects them (``MOESCOPE_ARTIFACTS``), if set."""
    dest = os.environ.get("MOESCOPE_ARTIFACTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(dest) / path.name)


class Page:
    """One page opened offline: every request but the file itself is aborted and recorded."""

    def __init__(self, browser, path: Path) -> None:
        self.url = path.resolve().as_uri()
        self.page = browser.new_page(viewport={"width": 1300, "height": 900})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def route(r):
            self.requests.append(r.request.url)
            if r.request.url == self.url:
                r.continue_()
            else:
                r.abort()

        self.page.route("**/*", route)
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-ready='1']", timeout=60_000)

    def foreign_requests(self) -> list[str]:
        return [u for u in self.requests if u != self.url]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium binary (apt-get install -y chromium); CI installs it in .ci/run")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def demo_page(browser, demo_out):
    out, _ = demo_out
    page = Page(browser, out / "report.html")
    yield page, out
    page.page.close()


def test_page_loads_offline_with_every_section(demo_page, tmp_path):
    page, out = demo_page
    p = page.page
    assert page.errors == []
    assert page.foreign_requests() == []
    summary = json.loads((out / "analysis-tiny-finegrained" / "summary.json").read_text())
    for sel in ("#summary", "#viewer", "#atlas", "#compare", "#load-heatmap svg", "#summary-facts tr"):
        assert p.locator(sel).count() >= 1, sel
    for name in summary["analyses"]:
        sec = p.locator(f"#analysis-{name}")
        assert sec.count() == 1, name
        assert sec.locator(".reading").inner_text().strip(), name
    assert p.locator("section.analysis figure img").count() >= 10
    assert p.locator("table.sortable").count() >= 10
    # the predictor's view is offered, and the page states its sample
    assert p.locator("#colour-mode option[value='hit']").count() == 1
    assert "documents" in p.inner_text("#sample-note")
    shot = tmp_path / "report-demo.png"
    p.locator("#viewer").scroll_into_view_if_needed()
    p.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000
    artifact(shot)


def test_layer_control_colours_tokens_by_the_traces_first_expert(demo_page):
    page, out = demo_page
    p = page.page
    r = read_routing(out / "trace-tiny-finegrained")
    n = p.evaluate("window.moescope.data.text.length")
    assert n == len(r["doc"])  # the whole (small) trace is shown, in trace order
    probe = (
        "(e) => { const d = document.createElement('div'); d.style.backgroundColor = window.moescope.colour(e);"
        " document.body.appendChild(d); const c = getComputedStyle(d).backgroundColor; d.remove(); return c; }"
    )
    rng = np.random.default_rng(0)
    tokens = rng.choice(n, 6, replace=False).tolist()
    p.select_option("#colour-mode", "first")
    for j in (0, len(r["layers"]) // 2, len(r["layers"]) - 1):
        p.select_option("#layer-select", str(j))
        for i in tokens:
            span = p.locator(f"#docs .t[data-i='{i}']")
            want = first_expert(r, i, j)
            assert int(span.get_attribute("data-v")) == want, (i, j)
            got = span.evaluate("s => getComputedStyle(s).backgroundColor")
            assert got == p.evaluate(probe, want), (i, j)
    assert page.errors == []


def test_hover_shows_every_layers_experts_and_weights(demo_page):
    page, out = demo_page
    p = page.page
    r = read_routing(out / "trace-tiny-finegrained")
    for i in (3, 77, len(r["doc"]) - 2):
        p.locator(f"#docs .t[data-i='{i}']").scroll_into_view_if_needed()
        p.hover(f"#docs .t[data-i='{i}']")
        assert int(p.get_attribute("#detail-token", "data-i")) == i
        for j, layer in enumerate(r["layers"]):
            row = p.locator(f"#detail-table tr[data-layer='{layer}']")
            assert [int(x) for x in row.get_attribute("data-experts").split(",")] == r["experts"][
                i, j
            ].tolist()
            w = [float(x) for x in row.get_attribute("data-weights").split(",")]
            np.testing.assert_allclose(w, r["weights"][i, j], atol=6e-4)


def test_atlas_load_shares_search_and_link_to_the_viewer(demo_page):
    page, out = demo_page
    p = page.page
    r = read_routing(out / "trace-tiny-finegrained")
    L, E = len(r["layers"]), r["E"]
    assert p.locator("#atlas-cards .card").count() == L * E
    j = L - 1
    counts = np.bincount(r["experts"][:, j].ravel(), minlength=E)[:E]
    for e in range(E):
        card = p.locator(f".card[data-layer='{r['layers'][j]}'][data-expert='{e}']")
        assert float(card.get_attribute("data-load")) == pytest.approx(counts[e] / counts.sum(), abs=1e-5)
    p.fill("#atlas-search", f"L{r['layers'][j]} E1")
    assert p.locator("#atlas-cards .card:visible").count() >= 1
    p.fill("#atlas-search", "")
    e = int(np.argmax(counts))
    p.locator(f".card[data-layer='{r['layers'][j]}'][data-expert='{e}'] a.show-tokens").click()
    marked = sorted(
        int(x) for x in p.eval_on_selector_all("#docs .t.sel", "els => els.map(x => x.dataset.i)")
    )
    assert marked == np.nonzero((r["experts"][:, j] == e).any(-1))[0].tolist()
    assert p.input_value("#layer-select") == str(j)
    p.select_option("#atlas-sort", "load-desc")
    loads = [
        float(x) for x in p.eval_on_selector_all("#atlas-cards .card", "els => els.map(x => x.dataset.load)")
    ]
    assert loads == sorted(loads, reverse=True)


def _in_view(p, loc) -> dict:
    """Scroll ``loc`` into the viewport until it stays there (lazy PNGs above it load and shift it)."""
    for _ in range(20):
        loc.scroll_into_view_if_needed()
        p.wait_for_timeout(150)
        box = loc.bounding_box()
        if box and box["y"] >= 0 and box["y"] + box["height"] <= p.viewport_size["height"]:
            return box
    raise AssertionError("the element does not stay in view")


def test_trajectory_scatters_zoom_pan_and_hover_with_the_csvs_points(demo_page, tmp_path):
    import csv
    import re

    page, out = demo_page
    p = page.page
    ana = out / "analysis-tiny-finegrained"
    for stem, (xc, yc) in (("trajectory_pca", ("pc1", "pc2")), ("trajectory_tsne", ("tsne1", "tsne2"))):
        if not (ana / f"{stem}.csv").is_file():
            assert stem == "trajectory_tsne", stem
            continue
        with (ana / f"{stem}.csv").open(encoding="utf-8", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r[xc] not in ("", "nan")]
        plot = p.locator(f".zoom-plot[data-plot='{stem}']")
        assert plot.count() == 1, stem
        fig = p.locator(f"figure[data-figure='{stem}']")
        assert fig.locator("img").count() == 1  # the PNG stays, for papers
        svg = plot.locator("svg")
        assert svg.locator("circle").count() == min(len(rows), 5000)
        w0 = float(svg.get_attribute("viewBox").split()[2])
        box = _in_view(p, svg)
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        p.mouse.move(cx, cy)
        p.mouse.wheel(0, -240)
        p.wait_for_function(
            f"() => +document.querySelector(\".zoom-plot[data-plot='{stem}']\").dataset.zoom > 1"
        )
        vb = [float(v) for v in svg.get_attribute("viewBox").split()]
        assert vb[2] < w0 and float(plot.get_attribute("data-zoom")) > 1
        # drag pans: the viewBox moves, its size stays
        p.mouse.down()
        p.mouse.move(cx - 60, cy - 30, steps=4)
        p.mouse.up()
        vb2 = [float(v) for v in svg.get_attribute("viewBox").split()]
        assert vb2[0] > vb[0] and vb2[1] > vb[1] and vb2[2:] == vb[2:]
        if stem == "trajectory_pca":
            shot = tmp_path / "report-trajectory-zoom.png"
            plot.screenshot(path=str(shot))
            artifact(shot)
        svg.dblclick()
        assert float(svg.get_attribute("viewBox").split()[2]) == w0
        # hover: the tip names the point's token id and coordinates, as the CSV holds them
        for i in (0, len(rows) // 2, len(rows) - 1):
            svg.locator(f"circle[data-i='{i}']").hover(force=True)
            tip = plot.locator(".zoom-tip")
            assert tip.is_visible()
            hit = int(tip.get_attribute("data-i"))  # the topmost circle under the cursor
            row, text = rows[hit], tip.inner_text()
            assert f"token id {int(row['token_id'])}" in text
            m = re.search(rf"{xc} (\S+), {yc} (\S+)", text)
            assert float(m.group(1)) == pytest.approx(float(row[xc]), rel=1e-3, abs=1e-9)
            assert float(m.group(2)) == pytest.approx(float(row[yc]), rel=1e-3, abs=1e-9)
    assert page.errors == []


def test_heatmaps_show_each_cells_value_from_the_csv_on_hover(demo_page):
    import csv
    import math
    import re

    from moescope.report.sections import HEAT_PLOTS

    page, out = demo_page
    p = page.page
    ana = out / "analysis-tiny-finegrained"
    seen = 0
    for csv_path in sorted(ana.glob("*.csv")):
        hit = next(((m, c) for pat, c in HEAT_PLOTS if (m := pat.match(csv_path.stem))), None)
        if hit is None or not csv_path.with_suffix(".png").is_file():
            continue
        (m, (rc, cc, vc)) = hit
        vc = vc or m.group(1)
        with csv_path.open(encoding="utf-8", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r[vc] not in ("", "nan") and math.isfinite(float(r[vc]))]
        plot = p.locator(f".heat-plot[data-plot='{csv_path.stem}']")
        assert plot.count() == 1, csv_path.stem
        rects = plot.locator("svg rect")
        assert rects.count() == len(rows)
        seen += 1
        # the cell under the cursor names its row, column and value as the CSV holds them
        for i in sorted({0, len(rows) // 2, len(rows) - 1}):
            rect = rects.nth(i)
            r, c = rect.get_attribute("data-r"), rect.get_attribute("data-c")
            text = ""
            for _ in range(3):  # a hover that lands while the page still scrolls or lays out is retried
                rect.scroll_into_view_if_needed()
                p.mouse.move(0, 0)  # off the plot, so that the hover below is a move onto the cell
                rect.hover(force=True)
                text = plot.locator(".heat-info").inner_text()
                if re.search(rf" {re.escape(r)}, .* {re.escape(c)}: {re.escape(vc)} = ", text):
                    break
            want = [
                x for x in rows if (x.get("symbol_from") or x[rc]) == r and (x.get("symbol_to") or x[cc]) == c
            ]
            assert len(want) == 1, (csv_path.stem, r, c)
            got = re.search(rf" {re.escape(r)}, .* {re.escape(c)}: {re.escape(vc)} = (\S+)$", text)
            assert got, (csv_path.stem, r, c, text)
            assert float(got.group(1)) == pytest.approx(float(want[0][vc]), rel=1e-3, abs=1e-12)
    assert seen >= 2  # at least the load heatmap and one co-activation map
    assert page.errors == []


def _edited_copy(src: Path, dst: Path, seed: int = 1) -> None:
    """A copy of trace ``src`` whose expert ids are changed at random (token, layer) cells; some cells
    only swap two slots (same set, must not be marked)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    E = manifest["routing"]["num_experts"]
    rng = np.random.default_rng(seed)
    for s in manifest["shards"]:
        path = dst / s["file"]
        t = pq.read_table(path)
        col = t["experts"].combine_chunks()
        L, k = col.type.list_size, col.type.value_type.list_size
        ex = np.asarray(col.flatten().flatten()).reshape(-1, L, k).copy()
        n = len(ex)
        for _ in range(max(n // 20, 5)):  # a new expert in one slot
            i, j, sl = rng.integers(n), rng.integers(L), rng.integers(k)
            free = [e for e in range(E) if e not in ex[i, j]]
            ex[i, j, sl] = rng.choice(free)
        for _ in range(max(n // 20, 5)):  # the same set in another order
            i, j = rng.integers(n), rng.integers(L)
            ex[i, j] = ex[i, j][::-1]
        flat = pa.array(ex.reshape(-1), type=col.type.value_type.value_type)
        inner = pa.FixedSizeListArray.from_arrays(flat, k)
        outer = pa.FixedSizeListArray.from_arrays(inner, L).cast(col.type)
        t = t.set_column(t.schema.get_field_index("experts"), t.schema.field("experts"), outer)
        assert ROUTING_METADATA_KEY.encode() in (t.schema.metadata or {})
        pq.write_table(t, path)
        data = path.read_bytes()
        s["bytes"] = len(data)
        s["sha256"] = hashlib.sha256(data).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))


def test_compare_marks_exactly_the_tokens_whose_expert_sets_differ(browser, demo_out, tmp_path):
    from moescope.report.build import build_report

    out, _ = demo_out
    a = out / "trace-tiny-finegrained"
    b = tmp_path / "trace-b"
    _edited_copy(a, b)
    html_text, _info = build_report(a, analysis=out / "analysis-tiny-finegrained", compare=b)
    path = tmp_path / "compare.html"
    path.write_text(html_text, encoding="utf-8")
    ra, rb = read_routing(a), read_routing(b)
    expected = np.array(
        [
            [
                set(x.tolist()) != set(y.tolist())
                for x, y in zip(ra["experts"][i], rb["experts"][i], strict=True)
            ]
            for i in range(len(ra["doc"]))
        ]
    )
    assert expected.any() and not expected.all()
    page = Page(browser, path)
    p = page.page
    try:
        assert page.errors == [] and page.foreign_requests() == []
        for j in range(len(ra["layers"])):
            p.select_option("#layer-select", str(j))
            marked = sorted(
                int(x) for x in p.eval_on_selector_all("#docs .t.changed", "els => els.map(x => x.dataset.i)")
            )
            assert marked == np.nonzero(expected[:, j])[0].tolist(), j
            row = p.locator(f"#compare-table tr[data-layer='{ra['layers'][j]}']")
            assert float(row.get_attribute("data-mismatch")) == pytest.approx(expected[:, j].mean())
        p.select_option("#colour-mode", "diff")
        shot = tmp_path / "report-compare.png"
        p.locator("#compare").scroll_into_view_if_needed()
        p.screenshot(path=str(shot))
        artifact(shot)
    finally:
        p.close()
