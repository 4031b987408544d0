"""Seed 002's pipeline JSON (``{model}_{dataset}_internal_routing.json``), import and export.

Layout (what seed 002's Stage 1 writes and ``logs_eda.ipynb`` / the KDE stages read)::

    {"config": "deepseek-ai/DeepSeek-V2-Lite", "strategy": "topk_baseline",
     "num_experts": 64, "top_k": 6, "num_layers": 27, "dataset": "lambada",
     "samples": [
       {"sample_id": 0, "num_tokens": 45, "loss": 2.34,
        "layers": [
          {"layer": 1, "router_logits_shape": [45, 64],
           "router_logits_sample": [[...64 logits...], ...],   # (tokens, E), may cover only the first tokens
           "selected_experts": [[12, 5, 33, 8, 41, 2], ...],   # (tokens, k), rank order
           "expert_weights": [[0.18, 0.15, ...], ...]}]}]}     # (tokens, k)

``layer`` is the decoder-layer index (dense layers are absent); ``top_k`` and ``dataset`` are
optional (``top_k`` defaults to the width of ``selected_experts``). A sample's ``loss`` (its mean
next-token cross-entropy) goes to the trace's ``doc_loss`` column when the first sample has one
(later samples without it get NaN), and comes back on export; ``strategy`` is kept in the
manifest's ``source`` section and written back on export. Lists shaped
``[1, tokens, ...]`` (a batch axis) are flattened. A ``null`` row means "no routing recorded"
for that token and layer (the exporter writes one where the trace has the missing sentinel).

The file is read incrementally: one sample is decoded at a time, so a log with every token's
logits never has to fit in memory as Python objects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from moescope.errors import ConfigError, DataError
from moescope.interop.common import (
    ROUTING_OPTIONS,
    Facts,
    Imported,
    ImportOptions,
    ImportReport,
    RoutedDocument,
    check_ids,
    default_label,
    expand_paths,
    iter_trace_documents,
    resolve_facts,
    slot_order_of,
)
from moescope.trace.atomic import atomic_write

NAME = "router-logger-json"  # alias: seed002-json
DESCRIPTION = (
    "seed 002 pipeline JSON: samples[].layers[] with selected_experts, expert_weights, router logits"
)
DEFAULT_MODEL = None
OPTIONS = ROUTING_OPTIONS
_WS = re.compile(r"[ \t\n\r]*")


class JsonStream:
    """Decode one JSON value at a time from a text file, tracking line numbers for errors."""

    CHUNK = 1 << 20

    def __init__(self, f: TextIO, path: Path) -> None:
        self.f, self.path = f, path
        self.buf, self.pos, self.eof = "", 0, False
        self.line_base = 1  # line number of buf[0]
        self._cursor = (0, 1)  # (position, line) last computed
        self.decoder = json.JSONDecoder()

    def _more(self) -> bool:
        """Read more text (at least as much as is buffered, so re-decoding a long item stays linear)."""
        if self.eof:
            return False
        try:
            chunk = self.f.read(max(self.CHUNK, len(self.buf) - self.pos))
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.path}: not UTF-8 text ({exc.reason})") from None
        if not chunk:
            self.eof = True
            return False
        self.line_base += self.buf.count("\n", 0, self.pos)
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0
        self._cursor = (0, self.line_base)
        return True

    def line(self, pos: int | None = None) -> int:
        pos = self.pos if pos is None else pos
        cp, cl = self._cursor
        if pos < cp:
            cp, cl = 0, self.line_base
        cl += self.buf.count("\n", cp, pos)
        self._cursor = (pos, cl)
        return cl

    def peek(self) -> str:
        """The next non-blank character ("" at the end of the file)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def expect(self, ch: str) -> None:
        got = self.peek()
        if got != ch:
            raise DataError(
                f"{self.path}:{self.line()}: invalid JSON: expected {ch!r}, found {got or 'the end of the file'!r}"
            )
        self.pos += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self._more():
                    continue
                raise DataError(f"{self.path}:{self.line(exc.pos)}: invalid JSON: {exc.msg}") from None
            if end == len(self.buf) and isinstance(obj, int | float) and self._more():
                continue  # a number at the end of the buffer may go on
            self.pos = end
            return obj

    def top_level(self) -> Iterator[tuple[str, Any, Any]]:
        """``("meta", key, value)`` for top-level fields and ``("sample", (index, line), obj)`` per sample."""
        self.expect("{")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            key = self.value()
            if not isinstance(key, str):
                raise DataError(f"{self.path}:{self.line()}: invalid JSON: object keys must be strings")
            self.expect(":")
            if key == "samples":
                self.expect("[")
                i = 0
                if self.peek() == "]":
                    self.pos += 1
                else:
                    while True:
                        line = self.line(self.pos) if self.peek() else self.line()
                        yield "sample", (i, line), self.value()
                        i += 1
                        if self.peek() == ",":
                            self.pos += 1
                            continue
                        self.expect("]")
                        break
            else:
                yield "meta", key, self.value()
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("}")
            break
        if self.peek():
            raise DataError(f"{self.path}:{self.line()}: invalid JSON: extra data after the top-level object")


def _open_log(path: Path) -> tuple[dict[str, Any], Iterator[tuple[int, int, Any]], TextIO]:
    """Top-level fields, and an iterator over ``(index, line, sample)``.

    Fields that come after ``samples`` in the file are only known once every sample was read, so
    when the fields needed to start (``num_experts``) are not before the samples, the samples are
    read into memory first.
    """
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    events = JsonStream(f, path).top_level()
    meta: dict[str, Any] = {}
    first = None
    for kind, key, value in events:
        if kind == "meta":
            meta[key] = value
        else:
            first = (key, value)
            break

    def samples() -> Iterator[tuple[int, int, Any]]:
        if first is None:
            return
        yield first[0][0], first[0][1], first[1]
        for kind, key, value in events:
            if kind == "meta":
                meta[key] = value
            else:
                yield key[0], key[1], value

    it = samples()
    if first is not None and "num_experts" not in meta:
        buffered = list(it)
        it = iter(buffered)
    return meta, it, f


def read(paths: Sequence[str | Path], opts: ImportOptions) -> Imported:
    """Open the logs, settle the routing facts from the first one, then stream samples as documents."""
    files = expand_paths(paths, (".json",), "seed 002 JSON")
    meta, samples, handle = _open_log(files[0])
    _check_meta(meta, files[0])
    first = next(samples, None)
    if first is None:
        handle.close()
        raise DataError(f"{files[0]}: field 'samples' is missing or empty")
    idx, line, sample = first
    where = f"{files[0]}:{line}: samples[{idx}]"
    entries = _entries(sample, where)
    width = None
    for e, _ in entries:
        sel = e.get("selected_experts")
        if isinstance(sel, list) and sel:
            width = _first_row_width(sel)
            if width is not None:
                break
    facts = resolve_facts(
        opts,
        DEFAULT_MODEL,
        num_experts=meta.get("num_experts"),
        top_k=meta.get("top_k", width),
        num_hidden_layers=meta.get("num_layers"),
        model_id=meta.get("config"),
        seen_layers=[e["layer"] for e, _ in entries if isinstance(e.get("layer"), int)],
        where=str(files[0]),
    )
    has_logits = any("router_logits_sample" in e for e, _ in entries)
    has_loss = "loss" in sample
    has_weights = any("expert_weights" in e for e, _ in entries)
    report = ImportReport()
    source: dict[str, Any] = {
        "format": NAME,
        "files": [str(f) for f in files],
        "doc_id": "sample_id (or the sample's index); each further file adds an offset (largest doc id so far + 1)",
        "position": "index of the token in the sample",
        "slot_order": "rank",
        "config": meta.get("config"),
        "strategy": meta.get("strategy"),
    }

    def documents() -> Iterator[RoutedDocument]:
        offset, last = 0, -1
        ordered = True
        for fi, path in enumerate(files):
            if fi == 0:
                m, it, h = meta, _chain(first, samples), handle
            else:
                m, it, h = _open_log(path)
                _check_meta(m, path)
            with h:
                for i, ln, s in it:
                    where = f"{path}:{ln}: samples[{i}]"
                    if not isinstance(s, dict):
                        raise DataError(f"{where}: expected an object, got {type(s).__name__}")
                    sid = s.get("sample_id", i)
                    if isinstance(sid, bool) or not isinstance(sid, int) or sid < 0:
                        raise DataError(
                            f"{where}: field 'sample_id' must be an integer >= 0, got {sid!r:.40}"
                        )
                    doc_id = offset + sid
                    if doc_id <= last:
                        raise DataError(
                            f"{where}: sample_id {sid} after a larger one; sample ids must increase"
                        )
                    last = doc_id
                    label = default_label(opts, s.get("dataset") or m.get("dataset"), path)
                    doc = _document(s, where, facts, doc_id, label, has_weights, has_logits, report)
                    doc.loss = _loss(s, where) if has_loss else None
                    if ordered and doc.weights is not None:
                        ordered = slot_order_of(doc.weights, doc.experts, facts.sentinel, "rank") == "rank"
                    yield doc
            _check_meta(m, path, facts)
            offset = last + 1
        source["slot_order"] = "rank" if ordered else "set"

    return Imported(
        facts, documents(), report, source, weights=has_weights, logits=has_logits, doc_loss=has_loss
    )


def _loss(s: dict[str, Any], where: str) -> float | None:
    """The sample's ``loss`` as a float (None when absent or null); anything else names the field."""
    v = s.get("loss")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise DataError(f"{where}: field 'loss' must be a number, got {v!r:.40}")
    return float(v)


def _chain(
    first: tuple[int, int, Any], rest: Iterator[tuple[int, int, Any]]
) -> Iterator[tuple[int, int, Any]]:
    yield first
    yield from rest


def _check_meta(meta: dict[str, Any], path: Path, facts: Facts | None = None) -> None:
    for key in ("num_experts", "top_k", "num_layers"):
        if key in meta and (isinstance(meta[key], bool) or not isinstance(meta[key], int)):
            raise DataError(f"{path}: field {key!r} must be an integer, got {meta[key]!r:.40}")
    if facts is not None:
        for key, want in (("num_experts", facts.num_experts), ("top_k", facts.top_k)):
            if key in meta and meta[key] != want:
                raise DataError(f"{path}: field {key!r} is {meta[key]}, but the first file has {want}")


def _entries(sample: Any, where: str) -> list[tuple[dict[str, Any], str]]:
    if not isinstance(sample, dict):
        raise DataError(f"{where}: expected an object, got {type(sample).__name__}")
    layers = sample.get("layers")
    if not isinstance(layers, list):
        raise DataError(f"{where}: missing field 'layers' (a list of per-layer records)")
    out = []
    for j, e in enumerate(layers):
        wj = f"{where}.layers[{j}]"
        if not isinstance(e, dict):
            raise DataError(f"{wj}: expected an object, got {type(e).__name__}")
        for key in ("layer", "selected_experts"):
            if key not in e:
                raise DataError(f"{wj}: missing field {key!r}")
        if isinstance(e["layer"], bool) or not isinstance(e["layer"], int):
            raise DataError(f"{wj}: field 'layer' must be an integer, got {e['layer']!r:.40}")
        out.append((e, wj))
    return out


def _first_row_width(rows: list[Any]) -> int | None:
    r = rows[0]
    while isinstance(r, list) and r and isinstance(r[0], list):
        r = r[0]
    return len(r) if isinstance(r, list) else None


def _matrix(value: Any, width: int, kind: str, field: str, where: str) -> np.ndarray:
    """A ``(tokens, width)`` array from nested lists; ``null`` rows become -1 (ids) or NaN (floats).

    A leading batch axis (``[1, tokens, width]``) is flattened; anything else names the field.
    """
    dtype = np.int64 if kind == "ids" else np.float32
    if not isinstance(value, list):
        raise DataError(f"{where}: field {field!r} must be a list of rows, got {type(value).__name__}")
    try:
        arr = np.array(value)
        if arr.ndim >= 2 and arr.shape[-1] == width and arr.dtype.kind in ("iu" if kind == "ids" else "iuf"):
            return arr.reshape(-1, width).astype(dtype)
    except (ValueError, TypeError):
        pass
    rows = (
        value[0]
        if len(value) == 1 and isinstance(value[0], list) and value[0] and isinstance(value[0][0], list)
        else value
    )
    out = np.full((len(rows), width), -1 if kind == "ids" else np.nan, dtype)
    for i, r in enumerate(rows):
        if r is None:
            continue
        ok = isinstance(r, list) and len(r) == width
        if ok and kind == "ids":
            ok = all(type(x) is int for x in r)
        elif ok:
            ok = all(isinstance(x, int | float) and not isinstance(x, bool) for x in r)
        if not ok:
            what = f"{width} integer expert ids (top_k={width})" if kind == "ids" else f"{width} numbers"
            got = f"{len(r)} values" if isinstance(r, list) else type(r).__name__
            raise DataError(f"{where}: {field}[{i}] must be a list of {what}, got {got}: {r!r:.80}")
        out[i] = r
    return out


def _document(
    s: dict[str, Any],
    where: str,
    facts: Facts,
    doc_id: int,
    label: str,
    has_weights: bool,
    has_logits: bool,
    report: ImportReport,
) -> RoutedDocument:
    """One sample as a document: each layer entry to its column, problems masked and counted."""
    L, k, E = len(facts.moe_layers), facts.top_k, facts.num_experts
    column = facts.column_of()
    parsed: dict[int, tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str]] = {}
    prev = -1
    for e, wj in _entries(s, where):
        layer = e["layer"]
        if layer not in column:
            raise DataError(
                f"{wj}: layer {layer} is not a MoE layer of this model (moe_layers {facts.moe_layers[0]}.."
                f"{facts.moe_layers[-1]}); pass `moe_layers` or the right `model`"
            )
        if layer < prev:
            report.add("out_of_order", 1, f"{wj}: layer {layer} after layer {prev}; placed by its number")
        prev = max(prev, layer)
        ids = _matrix(e["selected_experts"], k, "ids", "selected_experts", wj)
        null = (ids < 0).all(axis=1)
        valid = ids[~null]
        check_ids(valid, E, lambda r, wj=wj, null=null: f"{wj}: selected_experts[{np.flatnonzero(~null)[r]}]")
        w = None
        if "expert_weights" in e:
            w = _matrix(e["expert_weights"], k, "floats", "expert_weights", wj)
            if len(w) != len(ids):
                raise DataError(f"{wj}: expert_weights has {len(w)} rows, selected_experts {len(ids)}")
        lg = None
        if "router_logits_sample" in e:
            lg = _matrix(e["router_logits_sample"], E, "floats", "router_logits_sample", wj)
            if len(lg) > len(ids):
                raise DataError(
                    f"{wj}: router_logits_sample has {len(lg)} rows, selected_experts only {len(ids)}"
                )
        col = column[layer]
        if col in parsed:
            old = parsed[col]
            same = old[0].shape == ids.shape and (old[0] == ids).all()
            report.add(
                "duplicate" if same else "conflict",
                1,
                f"{wj}: a second entry for layer {layer}" + ("" if same else " that differs from the first"),
            )
            if not same:
                parsed[col] = (np.full((0, k), -1), None, None, "conflicting entries for this layer")
            continue
        parsed[col] = (ids, w, lg, "")
    lengths = [len(v[0]) for v in parsed.values() if not v[3]]
    logged = s.get("num_tokens")
    if isinstance(logged, int) and logged in lengths:
        n = logged
    elif lengths:
        values, counts = np.unique(lengths, return_counts=True)
        n = int(values[counts == counts.max()].max())
    else:
        n = 0
    if isinstance(logged, int) and logged != n:
        report.add("num_tokens_differs", 1, f"{where}: num_tokens {logged}, layers hold {n} rows")
    experts = np.full((n, L, k), facts.sentinel, facts.id_dtype)
    weights = np.full((n, L, k), np.nan, np.float32) if has_weights else None
    logits = np.full((n, L, E), np.nan, np.float32) if has_logits else None
    for col in range(L):
        layer = facts.moe_layers[col]
        if col not in parsed:
            report.add("missing_layer", 1, f"{where}: no entry for layer {layer}")
            report.mask(doc_id, layer, n, 0, "no entry for this layer in the sample", n)
            continue
        ids, w, lg, problem = parsed[col]
        if problem or len(ids) != n:
            if not problem:
                report.add(
                    "length_mismatch", 1, f"{where}: layer {layer} has {len(ids)} rows, the sample {n}"
                )
            report.mask(doc_id, layer, n, 0, problem or f"{len(ids)} rows where the sample has {n}", n)
            continue
        null = (ids < 0).all(axis=1)
        experts[~null, col] = ids[~null]
        if null.any():
            report.add(
                "null_rows", int(null.sum()), f"{where}: layer {layer} has null rows (no routing recorded)"
            )
            report.mask(
                doc_id, layer, n, n - int(null.sum()), "null rows (no routing recorded)", int(null.sum())
            )
        if weights is not None:
            if w is None:
                report.add("no_weights", 1, f"{where}: layer {layer} has no expert_weights")
            else:
                weights[~null, col] = w[~null]
        if logits is not None:
            if lg is None:
                report.add("no_logits", 1, f"{where}: layer {layer} has no router_logits_sample")
            else:
                if len(lg) < n:
                    report.add(
                        "logits_truncated",
                        1,
                        f"{where}: layer {layer} logs logits for {len(lg)} of {n} tokens",
                    )
                logits[: len(lg), col] = lg
    return RoutedDocument(doc_id, label, np.arange(n), experts, weights, logits)


def export(
    trace: Any,
    out: Path,
    *,
    documents: Sequence[int] | None = None,
    overwrite: bool = False,
    config: str | None = None,
    strategy: str | None = None,
) -> dict[str, Any]:
    """Write ``trace`` (or its ``documents``) as one seed 002 JSON file: a sample per document.

    ``strategy`` defaults to the one the trace records (:func:`trace_strategy`). A sample's
    ``loss`` is written when the trace has a ``doc_loss`` column and the document's loss is known.
    ``router_logits_sample`` / ``expert_weights`` are written when the trace has logits / weights;
    a (token, layer) without routing is a ``null`` row and a layer without any routing in a
    document is left out of that sample. Streams one document at a time.
    """
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: already exists; pass `overwrite` to replace it")
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; {NAME} writes one file")
    if documents is not None:
        absent = sorted(set(int(d) for d in documents) - set(trace.documents().tolist()))
        if absent:
            raise ConfigError(f"`documents`: the trace has no document(s) {absent}")
        trace = trace.filter(documents=documents)
    moe, E, k, sentinel = trace.moe_layers, trace.num_experts, trace.top_k, trace.missing_id
    labels = trace.labels
    cols = ["position", "label", "experts"]
    cols += ["weights"] if trace.has_weights else []
    cols += ["logits"] if trace.has_logits else []
    cols += ["doc_loss"] if getattr(trace, "has_doc_loss", False) else []
    header = {
        "config": config or trace.manifest.get("model", {}).get("id") or trace.routing.family,
        "strategy": strategy or trace_strategy(trace),
        "num_experts": E,
        "top_k": k,
        "num_layers": trace.routing.num_hidden_layers or max(moe) + 1,
        "dataset": labels[0] if len(labels) == 1 else "mixed",
    }
    stats = {"format": NAME, "output": str(out), "documents": 0, "tokens": 0}

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(header)[:-1] + ', "samples": [')
            for n_doc, (doc_id, b) in enumerate(iter_trace_documents(trace, cols)):
                f.write((",\n" if n_doc else "\n") + json.dumps(_sample(doc_id, b, moe, E, sentinel, labels)))
                stats["documents"] += 1
                stats["tokens"] += len(b.position)
            f.write("\n]}\n")

    atomic_write(out, write)
    return stats


def trace_strategy(trace: Any) -> str:
    """The routing strategy a trace was recorded under: the imported log's ``strategy``, else the
    capture's (``capture.strategy``, a name or ``{"name": ...}``), else ``"topk_baseline"``."""
    for section in ("source", "capture"):
        v = (trace.manifest.get(section) or {}).get("strategy")
        if isinstance(v, dict):
            v = v.get("name")
        if isinstance(v, str) and v:
            return v
    return "topk_baseline"


def _sample(doc_id: int, b: Any, moe: list[int], E: int, sentinel: int, labels: list[str]) -> dict[str, Any]:
    n = len(b.position)
    sample: dict[str, Any] = {"sample_id": int(doc_id), "num_tokens": n}
    if b.doc_loss is not None and n and np.isfinite(b.doc_loss[0]):
        sample["loss"] = float(b.doc_loss[0])
    if len(labels) > 1 and b.label[0] >= 0:
        sample["dataset"] = labels[int(b.label[0])]
    layers = []
    for col, layer in enumerate(moe):
        missing = (b.experts[:, col] == sentinel).any(axis=1)  # (n,)
        if missing.all():
            continue
        entry: dict[str, Any] = {"layer": int(layer)}
        if b.logits is not None:
            lg = b.logits[:, col].astype(np.float64)
            entry["router_logits_shape"] = [n, E]
            entry["router_logits_sample"] = [None if np.isnan(r).all() else r.tolist() for r in lg]
        entry["selected_experts"] = [
            None if m else r.tolist() for r, m in zip(b.experts[:, col], missing, strict=True)
        ]
        if b.weights is not None:
            w = b.weights[:, col].astype(np.float64)
            entry["expert_weights"] = [None if m else r.tolist() for r, m in zip(w, missing, strict=True)]
        layers.append(entry)
    sample["layers"] = layers
    return sample
