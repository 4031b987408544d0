(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("moescope-data").textContent);
  var M = D.meta, LAYERS = M.layers, L = LAYERS.length, K = M.k, E = M.E, N = D.text.length;
  var $ = function (id) { return document.getElementById(id); };
  var state = { layer: 0, mode: "first", pinned: -1, sel: null };

  function el(tag, attrs, text) {
    var x = document.createElement(tag);
    if (attrs) for (var a in attrs) x.setAttribute(a, attrs[a]);
    if (text !== undefined) x.textContent = text;
    return x;
  }
  function pct(x, d) { return (100 * x).toFixed(d === undefined ? 1 : d) + "%"; }

  // Expert colours: golden-angle hues, three lightness bands so neighbours differ for large E.
  function colour(e) {
    if (e < 0) return "#e4e4e4";
    var h = (e * 137.508) % 360, l = 66 + (Math.floor(e / 7) % 3) * 7;
    return "hsl(" + h.toFixed(1) + ",72%," + l + "%)";
  }
  function ramp(x) { // 0..1 -> blue..red
    x = Math.max(0, Math.min(1, x));
    return "hsl(" + (220 - 220 * x).toFixed(0) + ",75%,72%)";
  }

  // Routing of token i at layer index j.
  function experts(ex, i, j, k) { k = k || K; return ex[j].slice(i * k, i * k + k); }
  function weights(w, i, j) { return w ? w[j].slice(i * K, i * K + K).map(function (v) { return v / 1000; }) : null; }
  // The first expert: slot 0 for rank-ordered traces, else the heaviest (ties: lowest id).
  function first(ex, w, i, j) {
    if (M.slot_order === "rank") return ex[j][i * K];
    var best = -1, bw = -Infinity;
    for (var s = 0; s < K; s++) {
      var e = ex[j][i * K + s], v = w ? w[j][i * K + s] : 0;
      if (e < 0) continue;
      if (best < 0 || v > bw || (v === bw && e < best)) { best = e; bw = v; }
    }
    return best;
  }
  // Whether token i's expert set changed at layer j in the compared trace (computed by the writer).
  function changed(i, j) { var c = D.compare.changed[j][i]; return c < 0 ? null : c === 1; }
  var docOf = new Int32Array(N);
  D.docs.forEach(function (d, di) { for (var i = d.start; i < d.start + d.n; i++) docOf[i] = di; });

  // ---------------------------------------------------------------- summary
  function summary() {
    var t = $("summary-facts");
    var rows = [
      ["model", M.model || "?"], ["trace", M.trace], ["tokens", M.tokens.toLocaleString()],
      ["MoE layers", LAYERS.join(", ")], ["experts (E)", E], ["experts per token (k)", K],
      ["slot order", M.slot_order], ["router", M.router_kind],
      ["domains", M.labels.length ? M.labels.join(", ") : "none"],
      ["token viewer sample", M.sample_docs + " of " + M.of_docs + " documents, " + M.sample_tokens.toLocaleString() +
        " of " + M.of_tokens.toLocaleString() + " tokens" + (M.truncated.length ? " (" + M.truncated.length + " document(s) cut at the bound)" : "")],
      ["entropy from", M.entropy_source]
    ];
    if (D.predict) rows.push(["predictor", D.predict.name + " (" + D.predict.file + "), mode " + D.predict.mode]);
    if (D.compare) rows.push(["compared with", D.compare.name + " (model " + (D.compare.model || "?") + ")"]);
    rows.forEach(function (r) { var tr = el("tr"); tr.appendChild(el("th", null, r[0])); tr.appendChild(el("td", null, String(r[1]))); t.appendChild(tr); });
    var ul = $("summary-headlines");
    D.analyses.forEach(function (a) {
      var li = el("li", { "data-analysis": a.name }); var link = el("a", { href: "#analysis-" + a.name }, a.title);
      li.appendChild(link); li.appendChild(document.createTextNode(": " + a.reading)); ul.appendChild(li);
    });
    heatmap();
  }
  function heatmap() {
    var ns = "http://www.w3.org/2000/svg", cw = Math.max(6, Math.min(26, Math.floor(1100 / E))), ch = 16, left = 56;
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "heat"); svg.setAttribute("width", left + cw * E + 4); svg.setAttribute("height", ch * L + 20);
    var mx = 0; D.atlas.load.forEach(function (r) { r.forEach(function (v) { mx = Math.max(mx, v); }); });
    for (var j = 0; j < L; j++) {
      var lab = document.createElementNS(ns, "text"); lab.setAttribute("x", 2); lab.setAttribute("y", j * ch + 12);
      lab.setAttribute("font-size", "11"); lab.textContent = "layer " + LAYERS[j]; svg.appendChild(lab);
      for (var e = 0; e < E; e++) {
        var v = D.atlas.load[j][e], r = document.createElementNS(ns, "rect");
        r.setAttribute("x", left + e * cw); r.setAttribute("y", j * ch); r.setAttribute("width", cw - 1); r.setAttribute("height", ch - 1);
        r.setAttribute("fill", v > 0 ? "hsl(215,80%," + (95 - 60 * v / (mx || 1)).toFixed(0) + "%)" : "#fff0f0");
        r.setAttribute("data-layer", LAYERS[j]); r.setAttribute("data-expert", e); r.setAttribute("data-share", v);
        var tt = document.createElementNS(ns, "title"); tt.textContent = "layer " + LAYERS[j] + ", expert " + e + ": " + pct(v, 2);
        r.appendChild(tt); svg.appendChild(r);
      }
    }
    var xl = document.createElementNS(ns, "text"); xl.setAttribute("x", left); xl.setAttribute("y", ch * L + 14);
    xl.setAttribute("font-size", "11"); xl.textContent = "expert 0 \u2192 " + (E - 1); svg.appendChild(xl);
    svg.addEventListener("mouseover", function (ev) {
      var r = ev.target; if (r.tagName !== "rect") return;
      $("heat-info").textContent = "layer " + r.getAttribute("data-layer") + ", expert " + r.getAttribute("data-expert") +
        ": " + pct(+r.getAttribute("data-share"), 2) + " of assignments (even share " + pct(1 / E, 2) + ")";
    });
    svg.addEventListener("click", function (ev) {
      var r = ev.target; if (r.tagName !== "rect") return;
      var c = document.querySelector('.card[data-layer="' + r.getAttribute("data-layer") + '"][data-expert="' + r.getAttribute("data-expert") + '"]');
      if (c) { $("atlas-search").value = ""; filterAtlas(); c.scrollIntoView({ block: "center" }); c.style.outline = "2px solid #c00"; }
    });
    $("load-heatmap").appendChild(svg);
  }

  // ---------------------------------------------------------------- sortable tables
  function sortable(table) {
    var ths = table.querySelectorAll("thead th");
    ths.forEach(function (th, c) {
      th.addEventListener("click", function () {
        var asc = !th.classList.contains("asc");
        ths.forEach(function (h) { h.classList.remove("asc", "desc"); });
        th.classList.add(asc ? "asc" : "desc");
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[c], y = b.cells[c];
          var xv = x && x.hasAttribute("data-v") ? parseFloat(x.getAttribute("data-v")) : NaN;
          var yv = y && y.hasAttribute("data-v") ? parseFloat(y.getAttribute("data-v")) : NaN;
          var r = (!isNaN(xv) && !isNaN(yv)) ? xv - yv : (x ? x.textContent : "").localeCompare(y ? y.textContent : "");
          return asc ? r : -r;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }

  // ---------------------------------------------------------------- token viewer
  var spans = [];
  function viewer() {
    $("sample-note").textContent = "The viewer embeds " + M.sample_docs + " of " + M.of_docs + " documents (" +
      M.sample_tokens.toLocaleString() + " of " + M.of_tokens.toLocaleString() + " tokens), chosen round-robin over domains in trace order." +
      (M.truncated.length ? " Cut at the bound: document(s) " + M.truncated.join(", ") + "." : "");
    var ls = $("layer-select");
    LAYERS.forEach(function (l, j) { ls.appendChild(el("option", { value: j }, "layer " + l)); });
    ls.value = String(Math.floor(L / 2)); state.layer = Math.floor(L / 2);
    var modes = [["first", "first expert"], ["entropy", "routing entropy"], ["same", "same first expert as previous token"]];
    if (D.predict) modes.push(["hit", "prediction hit / miss (" + D.predict.name + ")"]);
    if (D.compare) modes.push(["diff", "expert set changed in compared trace"]);
    var cm = $("colour-mode");
    modes.forEach(function (m) { cm.appendChild(el("option", { value: m[0] }, m[1])); });
    var df = $("domain-filter");
    df.appendChild(el("option", { value: "" }, "all domains"));
    var labs = {}; D.docs.forEach(function (d) { labs[d.label] = 1; });
    Object.keys(labs).sort().forEach(function (l) { df.appendChild(el("option", { value: l }, l || "(no label)")); });
    var box = $("docs"), frag = document.createDocumentFragment();
    D.docs.forEach(function (d) {
      var div = el("div", { "class": "doc", "data-doc": d.id, "data-label": d.label });
      div.appendChild(el("h4", null, "document " + d.id + (d.label ? " \u00b7 " + d.label : "") + " \u00b7 " + d.n + " tokens"));
      for (var i = d.start; i < d.start + d.n; i++) {
        var s = el("span", { "class": "t", "data-i": i }, D.text[i]);
        spans[i] = s; div.appendChild(s);
      }
      frag.appendChild(div);
    });
    box.appendChild(frag);
    ls.addEventListener("change", function () { state.layer = +ls.value; paint(); });
    cm.addEventListener("change", function () { state.mode = cm.value; paint(); });
    df.addEventListener("change", function () {
      document.querySelectorAll("#docs .doc").forEach(function (d) { d.style.display = (!df.value || d.getAttribute("data-label") === df.value) ? "" : "none"; });
    });
    $("tok-search").addEventListener("input", search);
    box.addEventListener("mouseover", function (ev) { var i = ev.target.getAttribute && ev.target.getAttribute("data-i"); if (i !== null && i !== undefined && state.pinned < 0) detail(+i); });
    box.addEventListener("click", function (ev) {
      var i = ev.target.getAttribute && ev.target.getAttribute("data-i"); if (i === null || i === undefined) return;
      if (state.pinned >= 0) spans[state.pinned].classList.remove("pinned");
      if (state.pinned === +i) { state.pinned = -1; return; }
      state.pinned = +i; spans[+i].classList.add("pinned"); detail(+i);
    });
    paint();
  }
  function legend() {
    var lg = $("legend"); lg.textContent = "";
    var j = state.layer;
    if (state.mode === "first") {
      if (E > 96) { lg.appendChild(el("span", { "class": "muted" }, E + " experts: hover a token for its ids")); return; }
      for (var e = 0; e < E; e++) { var c = el("span", { "class": "chip", "data-e": e }, String(e)); c.style.background = colour(e); lg.appendChild(c); }
    } else if (state.mode === "entropy") {
      var mx = Math.log2(E);
      [0, 0.25, 0.5, 0.75, 1].forEach(function (x) { var c = el("span", { "class": "chip" }, (x * mx).toFixed(1) + " bits"); c.style.background = ramp(x); lg.appendChild(c); });
    } else if (state.mode === "same") {
      [["same as previous", "#8fd694"], ["different", "#f2b8b5"], ["first of document", "#e4e4e4"]].forEach(function (p) { var c = el("span", { "class": "chip" }, p[0]); c.style.background = p[1]; lg.appendChild(c); });
    } else if (state.mode === "hit") {
      [["all " + K + " predicted", "#8fd694"], ["some", "#ffd591"], ["none (miss)", "#f2b8b5"]].forEach(function (p) { var c = el("span", { "class": "chip" }, p[0]); c.style.background = p[1]; lg.appendChild(c); });
      var h = D.predict.hits[j], n = 0, full = 0; for (var i = 0; i < N; i++) if (h[i] >= 0) { n++; if (h[i] === K) full++; }
      lg.appendChild(el("span", { "class": "muted" }, " layer " + LAYERS[j] + ": " + pct(full / Math.max(n, 1)) + " of sampled tokens fully predicted"));
    } else if (state.mode === "diff") {
      [["expert set changed", "#f2b8b5"], ["same set", "#f4f4f4"]].forEach(function (p) { var c = el("span", { "class": "chip" }, p[0]); c.style.background = p[1]; lg.appendChild(c); });
    }
  }
  function paint() {
    var j = state.layer, mode = state.mode, mx = Math.log2(E) || 1;
    for (var i = 0; i < N; i++) {
      var s = spans[i], v, c;
      if (mode === "first") { v = first(D.ex, D.w, i, j); c = colour(v); }
      else if (mode === "entropy") { v = D.ent[j][i] / 100; c = ramp(v / mx); }
      else if (mode === "same") {
        if (i === 0 || docOf[i - 1] !== docOf[i]) { v = -1; c = "#e4e4e4"; }
        else { v = first(D.ex, D.w, i, j) === first(D.ex, D.w, i - 1, j) ? 1 : 0; c = v ? "#8fd694" : "#f2b8b5"; }
      } else if (mode === "hit") { v = D.predict.hits[j][i]; c = v < 0 ? "#e4e4e4" : v === K ? "#8fd694" : v > 0 ? "#ffd591" : "#f2b8b5"; }
      else if (mode === "diff") { var q = changed(i, j); v = q === null ? -1 : q ? 1 : 0; c = v === 1 ? "#f2b8b5" : v === 0 ? "#f4f4f4" : "#e4e4e4"; }
      s.style.backgroundColor = c;
      s.setAttribute("data-v", v);
      if (D.compare) s.classList.toggle("changed", changed(i, j) === true);
      if (state.sel) s.classList.toggle("sel", state.sel[0] === j && experts(D.ex, i, j).indexOf(state.sel[1]) >= 0);
    }
    legend();
    if (state.pinned >= 0) detail(state.pinned);
  }
  function search() {
    var q = $("tok-search").value.trim().toLowerCase(), n = 0, firstHit = null;
    for (var i = 0; i < N; i++) {
      var m = q !== "" && D.text[i].trim().toLowerCase().indexOf(q) >= 0;
      spans[i].classList.toggle("match", m);
      if (m) { n++; if (!firstHit) firstHit = spans[i]; }
    }
    $("search-count").textContent = q ? n + " token(s) match" : "";
    if (firstHit) firstHit.scrollIntoView({ block: "nearest" });
  }
  function detail(i) {
    var box = $("tok-detail"); box.textContent = "";
    var d = D.docs[docOf[i]];
    box.appendChild(el("h4", { id: "detail-token", "data-i": i }, JSON.stringify(D.text[i]) + " \u00b7 document " + d.id + (d.label ? " (" + d.label + ")" : "") + " \u00b7 token " + (i - d.start)));
    var t = el("table", { id: "detail-table" }), hr = el("tr");
    ["layer", "experts (weight)", "entropy"].concat(D.predict ? ["predicted"] : []).concat(D.compare ? ["compared"] : []).forEach(function (h) { hr.appendChild(el("th", null, h)); });
    t.appendChild(hr);
    for (var j = 0; j < L; j++) {
      var ex = experts(D.ex, i, j), w = weights(D.w, i, j);
      var tr = el("tr", { "data-layer": LAYERS[j], "data-experts": ex.join(","), "data-weights": w ? w.map(function (x) { return x.toFixed(3); }).join(",") : "" });
      if (j === state.layer) tr.style.background = "#f2f7ff";
      tr.appendChild(el("th", null, String(LAYERS[j])));
      var td = el("td", { "class": "experts" });
      ex.forEach(function (e, s) {
        var c = el("span", { "class": "chip" }, e < 0 ? "?" : String(e)); c.style.background = colour(e); td.appendChild(c);
        td.appendChild(document.createTextNode(w ? " " + w[s].toFixed(3) + "  " : " "));
      });
      tr.appendChild(td);
      tr.appendChild(el("td", { "class": "num" }, (D.ent[j][i] / 100).toFixed(2)));
      if (D.predict) { var h = D.predict.hits[j][i]; tr.appendChild(el("td", null, h < 0 ? "-" : h + "/" + K)); }
      if (D.compare) {
        var eb = experts(D.compare.ex, i, j, D.compare.k).filter(function (e) { return e >= 0; }), q = changed(i, j);
        var tc = el("td", { "class": q ? "changed" : "" }, eb.join(",") + (q ? " (changed)" : ""));
        tr.appendChild(tc);
      }
      t.appendChild(tr);
    }
    box.appendChild(t);
  }

  // ---------------------------------------------------------------- atlas
  function list(title, items) {
    var div = el("div"); div.appendChild(el("b", null, title));
    if (!items.length) { div.appendChild(document.createTextNode(" none")); return div; }
    div.appendChild(document.createTextNode(" " + items.join(", ")));
    return div;
  }
  function atlas() {
    var A = D.atlas, box = $("atlas-cards"), frag = document.createDocumentFragment(), abl = {};
    if (D.ablation) D.ablation.rows.forEach(function (r) { abl[r[0] + ":" + r[1]] = r; });
    var same = (A.reused || []).indexOf("coactivation.csv") >= 0;
    $("atlas-note").textContent = "One card per (layer, expert). Load, first-choice share and domain lifts count every token of the trace" +
      (same ? ", so do partners in the same layer" : "") + "; " + (same ? "next-layer partners" : "partners") +
      " and the tokens an expert takes most against its baseline (P(expert | token) / P(expert), tokens seen at least 3 times) count " +
      (A.stride > 1 ? "every " + A.stride + "th token (" + A.token_rows.toLocaleString() + " tokens)." : "every token.") +
      ((A.reused || []).length ? " Counts over every token read from the analysis folder: " + A.reused.join(", ") + "." : "");
    for (var j = 0; j < L; j++) for (var e = 0; e < E; e++) {
      var card = el("div", { "class": "card", "data-layer": LAYERS[j], "data-expert": e, "data-load": A.load[j][e], "data-first": A.first[j][e], id: "card-" + LAYERS[j] + "-" + e });
      var h = el("h4"); var chip = el("span", { "class": "chip" }, String(e)); chip.style.background = colour(e);
      h.appendChild(document.createTextNode("L" + LAYERS[j] + " E" + e + " ")); h.appendChild(chip); card.appendChild(h);
      var bar = el("div", { "class": "bar" }); bar.style.width = Math.min(100, 100 * A.load[j][e] * E / 4) + "%"; card.appendChild(bar);
      card.appendChild(el("div", null, "load " + pct(A.load[j][e], 2) + " of assignments (even " + pct(1 / E, 2) + "); first choice " + pct(A.first[j][e], 2)));
      card.appendChild(list("tokens:", A.tokens[j][e].map(function (t) { return JSON.stringify(t[0]) + " \u00d7" + t[2] + " (lift " + t[1] + ")"; })));
      card.appendChild(list("domains:", A.domains[j][e].map(function (t) { return t[0] + " (lift " + t[1] + ")"; })));
      card.appendChild(list("with, same layer:", A.same[j][e].map(function (t) { return "E" + t[0] + " " + pct(t[1], 0); })));
      if (j + 1 < L) card.appendChild(list("then, layer " + LAYERS[j + 1] + ":", A.next[j][e].map(function (t) { return "E" + t[0] + " " + pct(t[1], 0); })));
      var ab = abl[LAYERS[j] + ":" + e];
      if (ab) card.appendChild(el("div", { "class": "ablation", "data-impact": ab[2] }, "ablation: harm " + (+ab[2]).toFixed(3) +
        " in " + D.ablation.metric + (ab[3] === null ? "" : " [" + (+ab[3]).toFixed(3) + ", " + (+ab[4]).toFixed(3) + "]") + (ab[5] ? " (" + ab[5] + ")" : "")));
      var a = el("a", { href: "#viewer", "class": "show-tokens", "data-layer-index": j, "data-expert": e }, "show its tokens in the viewer");
      card.appendChild(a);
      frag.appendChild(card);
    }
    box.appendChild(frag);
    box.addEventListener("click", function (ev) {
      var a = ev.target; if (!a.classList || !a.classList.contains("show-tokens")) return;
      var j = +a.getAttribute("data-layer-index"), e = +a.getAttribute("data-expert");
      state.sel = [j, e]; state.layer = j; state.mode = "first";
      $("layer-select").value = String(j); $("colour-mode").value = "first"; paint();
      var firstSel = document.querySelector("#docs .t.sel"); if (firstSel) setTimeout(function () { firstSel.scrollIntoView({ block: "center" }); }, 0);
    });
    $("atlas-search").addEventListener("input", filterAtlas);
    $("atlas-sort").addEventListener("change", sortAtlas);
    filterAtlas();
  }
  function filterAtlas() {
    var q = $("atlas-search").value.trim().toLowerCase(), n = 0;
    document.querySelectorAll("#atlas-cards .card").forEach(function (c) {
      var show = !q || c.textContent.toLowerCase().indexOf(q) >= 0; c.style.display = show ? "" : "none"; if (show) n++;
    });
    $("atlas-count").textContent = n + " of " + L * E + " cards";
  }
  function sortAtlas() {
    var how = $("atlas-sort").value, box = $("atlas-cards");
    var cards = Array.prototype.slice.call(box.children);
    var key = function (c) { return [+c.getAttribute("data-layer"), +c.getAttribute("data-expert")]; };
    cards.sort(function (a, b) {
      if (how === "load-desc") return b.getAttribute("data-load") - a.getAttribute("data-load");
      if (how === "load-asc") return a.getAttribute("data-load") - b.getAttribute("data-load");
      if (how === "first-desc") return b.getAttribute("data-first") - a.getAttribute("data-first");
      var x = key(a), y = key(b); return x[0] - y[0] || x[1] - y[1];
    });
    cards.forEach(function (c) { box.appendChild(c); });
  }

  // ---------------------------------------------------------------- compare
  function compare() {
    var box = $("compare-body");
    if (!D.compare) { box.appendChild(el("p", { "class": "muted" }, "No second trace given (moescope report TRACE --compare TRACE_B).")); return; }
    box.appendChild(el("p", null, "Routing of " + M.trace + " (A) against " + D.compare.name + " (B), same tokens. " +
      "In the viewer, tokens whose expert set differs at the chosen layer are underlined; the colour mode \u201cexpert set changed\u201d paints them."));
    var t = el("table", { id: "compare-table", "class": "sortable" }), th = el("thead"), hr = el("tr");
    ["layer", "tokens", "set mismatch (all tokens)", "", "mean Jaccard", "experts/token A", "experts/token B", "changed in viewer sample"].forEach(function (h) { hr.appendChild(el("th", null, h)); });
    th.appendChild(hr); t.appendChild(th);
    var tb = el("tbody");
    D.compare.layers.forEach(function (r, j) {
      var n = 0; for (var i = 0; i < N; i++) if (changed(i, j) === true) n++;
      var tr = el("tr", { "data-layer": r.layer, "data-mismatch": r.set_mismatch_rate });
      [[r.layer, r.layer], [r.tokens, r.tokens], [pct(r.set_mismatch_rate), r.set_mismatch_rate]].forEach(function (p) { tr.appendChild(el("td", { "class": "num", "data-v": p[1] }, String(p[0]))); });
      var bar = el("td"), b = el("span", { "class": "cmp-bar" }); b.style.width = (120 * r.set_mismatch_rate).toFixed(0) + "px"; bar.appendChild(b); tr.appendChild(bar);
      [r.mean_jaccard, r.mean_k_a, r.mean_k_b].forEach(function (v) { tr.appendChild(el("td", { "class": "num", "data-v": v }, (+v).toFixed(3))); });
      tr.appendChild(el("td", { "class": "num sample-changed", "data-v": n }, String(n)));
      tb.appendChild(tr);
    });
    t.appendChild(tb); box.appendChild(t); sortable(t);
  }

  // ---------------------------------------------------------------- zoomable scatter (trajectories)
  // The PCA / t-SNE points of the analysis's CSV drawn in SVG; zoom changes the viewBox around the
  // cursor (wheel), drag pans, double-click resets, hover names the point.
  var PAL = ["#4a7fd4", "#e07b39", "#3aa655", "#c0392b", "#8e6cc2", "#8c564b", "#d66bb0", "#7f7f7f", "#bcbd22", "#17becf"];
  function zoomPlot(div) {
    var d = JSON.parse(div.querySelector("script.zoom-data").textContent), P = d.points;
    var W = 640, H = 420, NS = "http://www.w3.org/2000/svg";
    if (!P.length) { div.appendChild(el("p", { "class": "muted" }, "No points to draw.")); return; }
    var x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    P.forEach(function (p) { x0 = Math.min(x0, p[0]); x1 = Math.max(x1, p[0]); y0 = Math.min(y0, p[1]); y1 = Math.max(y1, p[1]); });
    var px = (x1 - x0) * 0.04 || 1, py = (y1 - y0) * 0.04 || 1;
    x0 -= px; x1 += px; y0 -= py; y1 += py;
    var sx = function (x) { return (x - x0) / (x1 - x0) * W; }, sy = function (y) { return H - (y - y0) / (y1 - y0) * H; };
    var svg = document.createElementNS(NS, "svg");
    svg.setAttribute("class", "zoom-svg"); svg.setAttribute("width", W); svg.setAttribute("height", H);
    var g = document.createElementNS(NS, "g");
    P.forEach(function (p, i) {
      var c = document.createElementNS(NS, "circle");
      c.setAttribute("cx", sx(p[0]).toFixed(2)); c.setAttribute("cy", sy(p[1]).toFixed(2));
      c.setAttribute("fill", PAL[p[2] % PAL.length]); c.setAttribute("data-i", i);
      g.appendChild(c);
    });
    svg.appendChild(g);
    var lg = el("div", { "class": "zoom-legend" });
    d.groups.forEach(function (name, gi) { var c = el("span", { "class": "chip" }, (d.group_by ? d.group_by + " " : "") + (name || "(none)")); c.style.background = PAL[gi % PAL.length]; c.style.color = "#fff"; lg.appendChild(c); });
    var info = el("div", { "class": "zoom-info muted" }), tip = el("div", { "class": "zoom-tip" });
    tip.style.display = "none";
    var vb = { x: 0, y: 0, w: W, h: H };
    function fmt(v) { return (+v).toPrecision(3); }
    function apply() {
      svg.setAttribute("viewBox", [vb.x, vb.y, vb.w, vb.h].map(function (v) { return v.toFixed(3); }).join(" "));
      svg.style.setProperty("--r", (3.2 * vb.w / W).toFixed(4) + "px");
      var ax = x0 + vb.x / W * (x1 - x0), bx = x0 + (vb.x + vb.w) / W * (x1 - x0);
      var by = y0 + (H - vb.y) / H * (y1 - y0), ay = y0 + (H - vb.y - vb.h) / H * (y1 - y0);
      info.textContent = d.x + " " + fmt(ax) + " \u2026 " + fmt(bx) + ", " + d.y + " " + fmt(ay) + " \u2026 " + fmt(by) +
        "; zoom " + (W / vb.w).toFixed(1) + "x; " + P.length + (d.of > P.length ? " of " + d.of : "") +
        " points (wheel: zoom, drag: pan, double-click: reset)";
      div.setAttribute("data-zoom", (W / vb.w).toFixed(3));
    }
    svg.addEventListener("wheel", function (ev) {
      ev.preventDefault();
      var r = svg.getBoundingClientRect(), f = ev.deltaY < 0 ? 0.8 : 1.25;
      var mx = vb.x + (ev.clientX - r.left) / r.width * vb.w, my = vb.y + (ev.clientY - r.top) / r.height * vb.h;
      if (vb.w * f > W) { vb = { x: 0, y: 0, w: W, h: H }; apply(); return; }
      vb = { x: mx - (mx - vb.x) * f, y: my - (my - vb.y) * f, w: vb.w * f, h: vb.h * f };
      apply();
    }, { passive: false });
    var drag = null;
    svg.addEventListener("mousedown", function (ev) { drag = { x: ev.clientX, y: ev.clientY, vb: vb }; ev.preventDefault(); });
    window.addEventListener("mouseup", function () { drag = null; });
    svg.addEventListener("mousemove", function (ev) {
      if (!drag) return;
      var r = svg.getBoundingClientRect();
      vb = { x: drag.vb.x - (ev.clientX - drag.x) / r.width * drag.vb.w, y: drag.vb.y - (ev.clientY - drag.y) / r.height * drag.vb.h, w: drag.vb.w, h: drag.vb.h };
      apply();
    });
    svg.addEventListener("dblclick", function () { vb = { x: 0, y: 0, w: W, h: H }; apply(); });
    svg.addEventListener("mouseover", function (ev) {
      var i = ev.target.getAttribute && ev.target.getAttribute("data-i");
      if (i === null || i === undefined) return;
      var p = P[+i];
      tip.textContent = (d.group_by ? d.group_by + " " + (d.groups[p[2]] || "(none)") + " \u00b7 " : "") + "token id " + p[3] +
        " \u00b7 sample " + p[4] + " \u00b7 " + d.x + " " + p[0] + ", " + d.y + " " + p[1];
      tip.setAttribute("data-i", i);
      tip.style.display = "block";
      tip.style.left = (ev.clientX + 12) + "px"; tip.style.top = (ev.clientY + 12) + "px";
    });
    svg.addEventListener("mouseout", function (ev) { if (ev.target.tagName === "circle") tip.style.display = "none"; });
    div.appendChild(lg); div.appendChild(svg); div.appendChild(info); div.appendChild(tip);
    apply();
  }

  // ---------------------------------------------------------------- hoverable heatmaps (from the CSVs)
  // One SVG rect per CSV cell; hovering a cell writes its row, column and value under the map.
  function heatPlot(div) {
    var d = JSON.parse(div.querySelector("script.heat-data").textContent), ns = "http://www.w3.org/2000/svg";
    var R = d.rows.length, C = d.cols.length, left = 64;
    var cw = Math.max(3, Math.min(22, Math.floor(900 / Math.max(C, 1)))), ch = Math.max(3, Math.min(16, Math.floor(600 / Math.max(R, 1))));
    var lo = 0, hi = 0;
    d.cells.forEach(function (c) { lo = Math.min(lo, c[2]); hi = Math.max(hi, c[2]); });
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "heat"); svg.setAttribute("width", left + cw * C + 4); svg.setAttribute("height", ch * R + 4);
    d.cells.forEach(function (c) {
      var r = document.createElementNS(ns, "rect"), t = (c[2] - lo) / ((hi - lo) || 1);
      r.setAttribute("x", left + c[1] * cw); r.setAttribute("y", c[0] * ch); r.setAttribute("width", Math.max(cw - 1, 1)); r.setAttribute("height", Math.max(ch - 1, 1));
      r.setAttribute("fill", "hsl(215,80%," + (95 - 60 * t).toFixed(0) + "%)");
      r.setAttribute("data-r", d.rows[c[0]]); r.setAttribute("data-c", d.cols[c[1]]); r.setAttribute("data-v", c[2]);
      svg.appendChild(r);
    });
    if (R <= 40) d.rows.forEach(function (lab, i) {
      var t = document.createElementNS(ns, "text"); t.setAttribute("x", 2); t.setAttribute("y", i * ch + Math.min(ch, 12));
      t.setAttribute("font-size", Math.min(11, ch)); t.textContent = d.row + " " + lab; svg.appendChild(t);
    });
    var info = el("div", { "class": "heat-info muted" }, d.row + " \u2193, " + d.col + " \u2192; hover a cell for its " + d.value);
    svg.addEventListener("mouseover", function (ev) {
      var r = ev.target; if (r.tagName !== "rect") return;
      info.textContent = d.row + " " + r.getAttribute("data-r") + ", " + d.col + " " + r.getAttribute("data-c") + ": " + d.value + " = " + r.getAttribute("data-v");
    });
    div.appendChild(svg); div.appendChild(info);
  }

  summary();
  viewer();
  atlas();
  compare();
  document.querySelectorAll(".zoom-plot").forEach(zoomPlot);
  document.querySelectorAll(".heat-plot").forEach(heatPlot);
  document.querySelectorAll("table.sortable").forEach(function (t) { if (t.id !== "compare-table") sortable(t); });
  window.moescope = { data: D, state: state, colour: colour, first: first, ready: true };
  window.moescopeReadyMs = performance.now(); // milliseconds from navigation start to a drawn page
  document.body.setAttribute("data-ready", "1");
})();
