"""Assemble per-record logs (one record per document, layer and token) into documents.

Used by the seed 004 formats, whose records name their token index explicitly. The assembler
never moves a record to another token: it places each record at its own ``(doc, layer, token)``
cell, counts records that are out of order or duplicated, and masks cells it cannot trust.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moescope.errors import ConfigError
from moescope.interop.common import Facts, ImportReport, RoutedDocument

SHORT_SERIES_POLICIES = ("mask", "keep-prefix")


@dataclass
class Records:
    """Parsed records as parallel arrays (``R`` records).

    doc : (R,) document id; col : (R,) routing column (index into ``moe_layers``); t : (R,) token
    index; experts : (R, k); weights : (R, k) or None; where : record index -> "file:line".
    """

    doc: np.ndarray
    col: np.ndarray
    t: np.ndarray
    experts: np.ndarray
    weights: np.ndarray | None
    where: Callable[[int], str]


@dataclass
class SeriesTable:
    """Rows (distinct ``(doc, token)``) and per-``(doc, column)`` series statistics of deduplicated cells.

    Series ``s = doc_index * L + column``; ``present[s]`` cells have a record, ``expected[s]`` is
    the document's row count and ``top_rank[s]`` the highest row rank (index inside the document)
    holding a record (-1: none).
    """

    L: int
    row_of_cell: np.ndarray  # (C,) row of each cell
    row_t: np.ndarray  # (rows,) token index of each row
    docs: np.ndarray  # (D,) distinct document ids
    doc_start: np.ndarray  # (D,) first row of each document
    doc_n: np.ndarray  # (D,) rows of each document
    series: np.ndarray  # (C,) series of each cell
    present: np.ndarray  # (D * L,)
    top_rank: np.ndarray  # (D * L,)
    expected: np.ndarray  # (D * L,)

    @classmethod
    def build(cls, gd: np.ndarray, gc: np.ndarray, gt: np.ndarray, L: int) -> SeriesTable:
        """From distinct cells ``(doc, column, token)`` (no cell twice)."""
        span = int(gt.max()) + 1 if len(gt) else 1
        row_keys, row_of_cell = np.unique(gd * span + gt, return_inverse=True)
        row_doc, row_t = row_keys // span, row_keys % span
        docs, doc_start, doc_n = np.unique(row_doc, return_index=True, return_counts=True)
        doc_of_row = np.repeat(np.arange(len(docs)), doc_n)
        rank = np.arange(len(row_keys)) - doc_start[doc_of_row]  # index of the row inside its document
        series = doc_of_row[row_of_cell] * L + gc
        present = np.bincount(series, minlength=len(docs) * L)
        top_rank = np.full(len(docs) * L, -1)
        np.maximum.at(top_rank, series, rank[row_of_cell])
        expected = np.repeat(doc_n, L)
        return cls(L, row_of_cell, row_t, docs, doc_start, doc_n, series, present, top_rank, expected)

    def is_short(self, s: int) -> bool:
        """Series ``s`` is a contiguous prefix shorter than its document: with a running token counter
        (seed 004's ``token_idx``) a record was dropped and every later index shifted by one."""
        m = int(self.present[s])
        return 0 < m < int(self.expected[s]) and int(self.top_rank[s]) == m - 1


def find_short_series(
    doc: np.ndarray, col: np.ndarray, t: np.ndarray, L: int
) -> list[tuple[int, int, int, int]]:
    """``(doc, column, tokens in the document, records in the series)`` of every short series.

    The importer's detection (:meth:`SeriesTable.is_short`) on raw record arrays; repeated cells count once.
    """
    if not len(doc):
        return []
    cells = np.unique(np.stack([np.asarray(doc), np.asarray(col), np.asarray(t)], 1).astype(np.int64), axis=0)
    tab = SeriesTable.build(cells[:, 0], cells[:, 1], cells[:, 2], L)
    out = []
    for s in range(len(tab.present)):
        if tab.is_short(s):
            di, c = divmod(s, L)
            out.append((int(tab.docs[di]), int(c), int(tab.expected[s]), int(tab.present[s])))
    return out


def assemble(
    rec: Records,
    facts: Facts,
    labels: dict[int, str],
    report: ImportReport,
    *,
    counter_index: bool,
    short_series: str = "mask",
) -> list[RoutedDocument]:
    """Build one :class:`RoutedDocument` per distinct ``doc``; rows are the distinct token indices seen.

    ``counter_index``: the log numbers tokens with a running counter that skips dropped records
    (seed 004's ``token_idx``), so a series that is a contiguous prefix shorter than its document
    has every index after the lost record shifted by one. Such a series is masked whole
    (``short_series="mask"``) or, when the caller knows records were only lost at the end,
    everything past the prefix (``"keep-prefix"``). A series with holes in its indices keeps its
    records and masks only the holes (the indices were not renumbered).
    """
    if short_series not in SHORT_SERIES_POLICIES:
        raise ConfigError(f"`short_series`: must be one of {SHORT_SERIES_POLICIES}, got {short_series!r}")
    L, k, sentinel = len(facts.moe_layers), facts.top_k, facts.sentinel
    R = len(rec.doc)
    idx = np.arange(R)
    _report_out_of_order(rec, facts, report)

    # Sort by cell, file order among records for the same cell.
    order = np.lexsort((idx, rec.t, rec.col, rec.doc))  # (R,)
    d, c, t = rec.doc[order], rec.col[order], rec.t[order]
    ex = rec.experts[order]
    w = rec.weights[order] if rec.weights is not None else None
    same_cell = np.zeros(R, bool)
    same_cell[1:] = (d[1:] == d[:-1]) & (c[1:] == c[:-1]) & (t[1:] == t[:-1])
    gid = np.cumsum(~same_cell) - 1  # cell id of every sorted record
    first = np.flatnonzero(~same_cell)  # sorted index of each cell's first record
    conflict = np.zeros(len(first), bool)
    dup = np.flatnonzero(same_cell)
    if len(dup):
        ref = first[gid[dup]]
        identical = (ex[dup] == ex[ref]).all(axis=1)
        if w is not None:
            identical &= ((w[dup] == w[ref]) | (np.isnan(w[dup]) & np.isnan(w[ref]))).all(axis=1)
        for kind, sel in (("duplicate", identical), ("conflict", ~identical)):
            if sel.any():
                i = int(np.flatnonzero(sel)[0])
                a, b = int(order[dup[i]]), int(order[ref[i]])
                what = "repeats" if kind == "duplicate" else "contradicts"
                report.add(
                    kind,
                    int(sel.sum()),
                    f"{rec.where(a)}: {what} the record at {rec.where(b)} (doc {d[dup[i]]},"
                    f" layer {facts.moe_layers[c[dup[i]]]}, token {t[dup[i]]})",
                )
        conflict[gid[dup[~identical]]] = True

    gd, gc, gt = d[first], c[first], t[first]
    tab = SeriesTable.build(gd, gc, gt, L)
    row_of_cell, row_t, docs, doc_start, doc_n = (
        tab.row_of_cell,
        tab.row_t,
        tab.docs,
        tab.doc_start,
        tab.doc_n,
    )

    experts = np.full((len(row_t), L, k), sentinel, facts.id_dtype)
    keep = ~conflict
    experts[row_of_cell[keep], gc[keep]] = ex[first[keep]]
    weights = None
    if w is not None:
        weights = np.full((len(row_t), L, k), np.nan, np.float32)
        weights[row_of_cell[keep], gc[keep]] = w[first[keep]]

    # Series statistics: records present, highest row rank, conflicts.
    present, expected = tab.present, tab.expected
    n_conflict = np.bincount(tab.series[conflict], minlength=len(docs) * L)
    for s in np.flatnonzero((present < expected) | (n_conflict > 0)):
        di, col = divmod(int(s), L)
        n, m, layer, doc_id = int(expected[s]), int(present[s]), facts.moe_layers[col], int(docs[di])
        lo = int(doc_start[di])
        if m == 0:
            report.add("missing_layer", 1, f"doc {doc_id}, layer {layer}: no record at all")
            report.mask(doc_id, layer, n, 0, "no record for this layer", n)
        elif counter_index and tab.is_short(int(s)):
            report.add(
                "short_series",
                1,
                f"doc {doc_id}, layer {layer}: {m} records for {n} tokens, indices 0..{m - 1} contiguous",
            )
            if short_series == "mask":
                experts[lo : lo + n, col] = sentinel
                if weights is not None:
                    weights[lo : lo + n, col] = np.nan
                report.mask(
                    doc_id,
                    layer,
                    n,
                    m,
                    f"{n - m} record(s) dropped somewhere and the later token_idx values renumbered:"
                    " no position can be trusted, whole series masked",
                    n,
                )
            else:
                report.mask(
                    doc_id, layer, n, m, "shorter than its document: tail masked (keep-prefix)", n - m
                )
        else:
            if m < n:
                report.add("gap", n - m, f"doc {doc_id}, layer {layer}: {n - m} token(s) without a record")
            masked = n - m + int(n_conflict[s])
            reason = "no record for some tokens" if m < n else "conflicting duplicate records"
            report.mask(doc_id, layer, n, m - int(n_conflict[s]), reason, masked)

    out = []
    for di, doc_id in enumerate(docs):
        lo, hi = int(doc_start[di]), int(doc_start[di] + doc_n[di])
        out.append(
            RoutedDocument(
                doc_id=int(doc_id),
                label=labels.get(int(doc_id), ""),
                position=row_t[lo:hi].astype(np.int64),
                experts=experts[lo:hi],
                weights=weights[lo:hi] if weights is not None else None,
            )
        )
    return out


def _report_out_of_order(rec: Records, facts: Facts, report: ImportReport) -> None:
    """Count records whose token index is below the previous record of the same series, in file order."""
    R = len(rec.doc)
    if R < 2:
        return
    order = np.lexsort((np.arange(R), rec.col, rec.doc))  # file order inside each series
    d, c, t = rec.doc[order], rec.col[order], rec.t[order]
    back = (d[1:] == d[:-1]) & (c[1:] == c[:-1]) & (t[1:] < t[:-1])
    if back.any():
        i = int(np.flatnonzero(back)[0])
        report.add(
            "out_of_order",
            int(back.sum()),
            f"{rec.where(int(order[i + 1]))}: token {t[i + 1]} after token {t[i]}"
            f" (doc {d[i + 1]}, layer {facts.moe_layers[c[i + 1]]}); placed by its index",
        )
