"""MoE-Beyond routing CSVs (arXiv 2508.17137 data): one file per prompt, rows grouped by layer.

Layout of ``prompt_<N>_data.csv``::

    Layer ID,Batch Number,Token,Activated Expert IDs
    1,0,<｜begin▁of▁sentence｜>,"[8, 26, 56, 57, 60, 11]"
    1,0,something,"[0, 2, 8, 22, 63, 15]"
    ...                                  (every token of the prompt for layer 1, then layer 2, ...)

``Layer ID`` is the decoder layer (DeepSeek-V2-Lite: 1..26, layer 0 is dense), ``Token`` the
byte-level BPE piece (``Ġ`` = space), ``Activated Expert IDs`` the top-k ids from
``torch.topk(..., sorted=False)``: **a set, not rank order** (``routing.slot_order`` is
``"set"``). No weights. Inputs: CSV files, folders of them, or tar archives of them
(``.tar.xz`` etc., read in one pass with the standard library).

A prompt's token sequence is that of its first complete layer block. A layer block that is
shorter or longer than the prompt, whose tokens differ, or whose rows are split into several
blocks cannot be placed token by token (no row carries a token index), so the whole
(prompt, layer) series is masked and reported. Document ids are the prompt numbers in the file
names when every name has exactly one distinct number, else 0.. in natural name order.
"""

from __future__ import annotations

import csv
import io
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from moescope.errors import DataError
from moescope.interop.common import (
    ROUTING_OPTIONS,
    Facts,
    Imported,
    ImportOptions,
    ImportReport,
    RoutedDocument,
    check_ids,
    default_label,
    natural_key,
    resolve_facts,
)
from moescope.trace.readahead import read_ahead_iter

NAME = "moe-beyond"
DESCRIPTION = (
    "MoE-Beyond CSVs (Layer ID,Batch Number,Token,Activated Expert IDs), files, folders or a .tar.xz"
)
DEFAULT_MODEL = "deepseek-v2-lite"
OPTIONS = ROUTING_OPTIONS | {"tokenizer"}
COLUMNS = ("Layer ID", "Batch Number", "Token", "Activated Expert IDs")
CHUNK_BYTES = 8 << 20  # CSV text parsed per Arrow call; bounds the memory held as raw text and temporaries
_ALLOWED = np.zeros(256, bool)
_ALLOWED[[ord(c) for c in "0123456789 ,[]"]] = True


@dataclass
class _Parsed:
    """One prompt file, parsed: routing ``(n, L, k)`` with the sentinel where masked, and its tokens."""

    name: str
    experts: np.ndarray
    tokens: list[str]
    masks: list[tuple[int, int, int, str, int]]  # (layer, expected, found, reason, masked)


def read(paths: Sequence[str | Path], opts: ImportOptions) -> Imported:
    """Parse every prompt file (archive members included), then yield documents in doc-id order."""
    facts = resolve_facts(opts, DEFAULT_MODEL, where=str(paths[0]) if paths else NAME)
    report = ImportReport()
    parsed: dict[str, _Parsed] = {}
    origin: dict[str, Path] = {}  # member -> the input (file, folder or archive) it came from
    batch: list[tuple[str, bytes]] = []
    size = 0
    for name, data, src in read_ahead_iter(_members([Path(p) for p in paths]), 64):
        if name in parsed or any(name == b[0] for b in batch):
            raise DataError(f"{name}: given twice")
        origin[name] = src
        batch.append((name, data))
        size += len(data)
        if size >= CHUNK_BYTES:
            _parse_batch(batch, facts, report, parsed)
            batch, size = [], 0
    if batch:
        _parse_batch(batch, facts, report, parsed)
    if not parsed:
        raise DataError(f"{', '.join(map(str, paths))}: no CSV files found")
    names = sorted(parsed, key=natural_key)
    numbers = [re.findall(r"\d+", Path(n).name) for n in names]
    by_number = all(len(set(x)) == 1 for x in numbers) and len({x[0] for x in numbers}) == len(names)
    if by_number:
        ids = [int(x[0]) for x in numbers]
        order = np.argsort(ids, kind="stable")
        names, ids = [names[i] for i in order], [ids[i] for i in order]
    else:
        ids = list(range(len(names)))
    labels = {name: default_label(opts, None, origin[name]) for name in names}
    vocab = None
    if opts.tokenizer is not None:
        from moescope.interop.vocab import load_vocab

        vocab = load_vocab(opts.tokenizer)
    for name, doc_id in zip(names, ids, strict=True):
        for layer, expected, found, reason, masked in parsed[name].masks:
            report.mask(doc_id, layer, expected, found, reason, masked)
    source = {
        "format": NAME,
        "files": [str(p) for p in paths],
        "members": len(names),
        "doc_id": "prompt number in the file name" if by_number else "index in natural file-name order",
        "first_member": names[0],
        "position": "row order inside a layer block (the token's index in the prompt)",
        "slot_order": "set",
        "slot_order_note": "ids come from torch.topk(sorted=False): treat each token's ids as a set",
    }

    def documents() -> Iterator[RoutedDocument]:
        cache: dict[str, int] = {}
        unknown = 0
        for name, doc_id in zip(names, ids, strict=True):
            p = parsed.pop(name)
            n = len(p.tokens)
            token_id = np.full(n, -1, np.int32)
            if vocab is not None:
                for i, piece in enumerate(p.tokens):
                    if piece not in cache:
                        cache[piece] = vocab.piece_to_id(piece)
                    token_id[i] = cache[piece]
                missing = int((token_id < 0).sum())
                if missing:
                    unknown += missing
                    report.add(
                        "unknown_piece", missing, f"{name}: piece {p.tokens[int(np.argmax(token_id < 0))]!r}"
                    )
            yield RoutedDocument(
                doc_id, labels[name], np.arange(n), p.experts, token_id=token_id, token=p.tokens
            )

    return Imported(
        facts, documents(), report, source, token_text=True, tokenizer=vocab.describe() if vocab else None
    )


def _members(paths: list[Path]) -> Iterator[tuple[str, bytes, Path]]:
    """``(name, bytes, input)`` of every CSV: plain files, files in folders, members of tar archives (one pass).

    ``input`` is the path given (file, folder or archive): each document's label is named after it.
    """
    for p in paths:
        if p.is_dir():
            files = sorted((q for q in p.rglob("*.csv") if q.is_file()), key=natural_key)
            if not files:
                raise DataError(f"{p}: folder holds no .csv files")
            for q in files:
                yield str(q), q.read_bytes(), p
        elif p.is_file() and (".tar" in p.name or p.suffix in (".tgz", ".txz")):
            try:
                with tarfile.open(p, "r:*") as tar:
                    for m in tar:
                        if m.isfile() and m.name.endswith(".csv"):
                            f = tar.extractfile(m)
                            if f is not None:
                                yield f"{p}!{m.name}", f.read(), p
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise DataError(f"{p}: not a readable tar archive ({exc})") from None
        elif p.is_file():
            yield str(p), p.read_bytes(), p
        else:
            raise DataError(f"{p}: no such file or folder")


@dataclass
class _Table:
    """Rows of several files: string columns, each file's row range and every row's line number."""

    names: list[str]
    layer: pa.Array
    batch: pa.Array
    token: pa.Array
    ids: pa.Array
    starts: np.ndarray  # (F + 1,) row offsets of the files
    lines: np.ndarray  # (R,) line number of each row in its file


def _parse_batch(
    batch: list[tuple[str, bytes]], facts: Facts, report: ImportReport, out: dict[str, _Parsed]
) -> None:
    """Parse files with the standard header in one Arrow call; others (or on any doubt) one by one."""
    canonical = ",".join(COLUMNS).encode()
    fast = [(n, d) for n, d in batch if _header(d) == canonical]
    slow = [(n, d) for n, d in batch if _header(d) != canonical]
    tables = []
    if fast:
        t = _fast_table(fast)
        if t is None:
            slow = fast + slow
        else:
            tables.append(t)
    tables.extend(_slow_table(n, d) for n, d in slow)
    for t in tables:
        _split(t, facts, report, out)


def _header(data: bytes) -> bytes:
    line = data.split(b"\n", 1)[0]
    return line.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r")


def _fast_table(files: list[tuple[str, bytes]]) -> _Table | None:
    """All files as one CSV text; each file's header row marks where it starts. None: use the slow path."""
    big = b"".join(d if d.endswith(b"\n") else d + b"\n" for _, d in files)
    try:
        t = pcsv.read_csv(
            pa.py_buffer(big),
            read_options=pcsv.ReadOptions(column_names=["a", "b", "c", "d"], block_size=8 << 20),
            parse_options=pcsv.ParseOptions(newlines_in_values=False),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in "abcd"},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid:
        return None  # e.g. a row with a wrong number of fields: the slow path names file and line
    cols = [t.column(c).combine_chunks() for c in "abcd"]
    is_header = pc.equal(cols[0], COLUMNS[0]).to_numpy(zero_copy_only=False)
    heads = np.flatnonzero(is_header)
    if len(heads) != len(files) or (len(heads) and heads[0] != 0):
        return None
    keep = ~is_header
    row_in = np.arange(len(is_header))
    file_of_row = np.cumsum(is_header) - 1
    lines = (row_in - heads[file_of_row] + 1)[keep]  # header is line 1
    mask = pa.array(keep)
    starts = np.concatenate([heads - np.arange(len(heads)), [int(keep.sum())]])
    return _Table(
        [n for n, _ in files],
        *(c.filter(mask) for c in cols),
        starts=starts,
        lines=lines,
    )


def _slow_table(name: str, data: bytes) -> _Table:
    """One file through the csv module: any column order, quoted newlines, exact line numbers."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{name}: empty file; expected the header {','.join(COLUMNS)}")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataError(f"{name}:1: missing column(s) {missing}; the header is {header}")
    pos = [header.index(c) for c in COLUMNS]
    cols: list[list[str]] = [[], [], [], []]
    lines = []
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{name}:{reader.line_num}: {len(row)} fields, the header has {len(header)}")
        for j, p in enumerate(pos):
            cols[j].append(row[p])
        lines.append(reader.line_num)
    return _Table(
        [name],
        *(pa.array(c, pa.string()) for c in cols),
        starts=np.array([0, len(lines)]),
        lines=np.asarray(lines, np.int64),
    )


def _where(t: _Table) -> Any:
    file_of_row = None

    def where(row: int) -> str:
        nonlocal file_of_row
        if file_of_row is None:
            file_of_row = np.searchsorted(t.starts, np.arange(len(t.lines)), side="right") - 1
        return f"{t.names[int(file_of_row[row])]}:{int(t.lines[row])}"

    return where


def _int_column(col: pa.Array, name: str, where: Any) -> np.ndarray:
    ok = pc.match_substring_regex(col, r"^\s*-?\d+\s*$").to_numpy(zero_copy_only=False)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise DataError(f"{where(row)}: column {name!r} must be an integer, got {col[row].as_py()!r:.40}")
    return pc.cast(pc.utf8_trim_whitespace(col), pa.int64()).to_numpy()


def _id_lists(col: pa.Array, k: int, where: Any) -> np.ndarray:
    """``"[8, 26, 56]"`` strings as an ``(R, k)`` int64 array, parsed on the raw bytes in one pass."""
    R = len(col)
    if R == 0:
        return np.zeros((0, k), np.int64)
    offs = np.frombuffer(col.buffers()[1], np.int32)[col.offset : col.offset + R + 1].astype(np.int64)
    buf = np.frombuffer(col.buffers()[2], np.uint8)[offs[0] : offs[-1]]
    offs = offs - offs[0]
    field = COLUMNS[3]

    def fail(row: int, why: str) -> None:
        raise DataError(
            f"{where(row)}: column {field!r} must be a list of {k} integer expert ids like [3, 17, ...]"
            f" (top_k={k}); {why}: {col[row].as_py()!r:.80}"
        )

    bad = ~_ALLOWED[buf]
    if bad.any():
        fail(int(np.searchsorted(offs, np.flatnonzero(bad)[0], side="right") - 1), "found other characters")
    lens = np.diff(offs)
    if (lens < 2).any():
        fail(int(np.flatnonzero(lens < 2)[0]), "too short")
    if (buf[offs[:-1]] != ord("[")).any() or (buf[offs[1:] - 1] != ord("]")).any():
        row = np.flatnonzero((buf[offs[:-1]] != ord("[")) | (buf[offs[1:] - 1] != ord("]")))[0]
        fail(int(row), "not in brackets")
    digit = (buf >= ord("0")) & (buf <= ord("9"))
    first = digit.copy()
    first[1:] &= ~digit[:-1]  # first digit of a number (rows start with "[", so never across rows)
    numbers = np.add.reduceat(first.view(np.uint8), offs[:-1], dtype=np.int32)
    commas = np.add.reduceat((buf == ord(",")).view(np.uint8), offs[:-1], dtype=np.int32)
    wrong = (numbers != k) | (commas != k - 1)
    if wrong.any():
        row = int(np.flatnonzero(wrong)[0])
        fail(row, f"has {numbers[row]} ids and {commas[row]} commas")
    start = np.flatnonzero(first).astype(np.int32)  # (R*k,) the buffer is < 2 GiB (one Arrow string array)
    last = digit.copy()
    last[:-1] &= ~digit[1:]
    width = np.flatnonzero(last) - start + 1
    if width.max() > 9:
        fail(int(np.searchsorted(offs, start[np.argmax(width)], side="right") - 1), "an id is too long")
    width = width.astype(np.int8)
    values = np.zeros(len(start), np.int64)
    for j in range(int(width.max())):  # Horner over digit places: a few passes over all ids at once
        more = width > j
        values[more] = values[more] * 10 + (buf[start[more] + j] - ord("0"))
    return values.reshape(R, k)


def _split(t: _Table, facts: Facts, report: ImportReport, out: dict[str, _Parsed]) -> None:
    """Validate a table and cut it into prompts: each layer block to its column, bad blocks masked."""
    where = _where(t)
    L, k = len(facts.moe_layers), facts.top_k
    layer = _int_column(t.layer, COLUMNS[0], where)
    batch = _int_column(t.batch, COLUMNS[1], where)
    moe = np.asarray(facts.moe_layers)
    col = np.searchsorted(moe, layer)
    bad = (col >= L) | (moe[np.minimum(col, L - 1)] != layer)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{where(row)}: layer {layer[row]} is not a MoE layer of this model (moe_layers"
            f" {facts.moe_layers[0]}..{facts.moe_layers[-1]}); pass --moe-layers or the right --model"
        )
    ids = _id_lists(t.ids, k, where)  # (R, k)
    check_ids(ids, facts.num_experts, where)
    for f, name in enumerate(t.names):
        lo, hi = int(t.starts[f]), int(t.starts[f + 1])
        if hi == lo:
            raise DataError(f"{name}: no rows after the header")
        b = batch[lo:hi]
        if (b != b[0]).any():
            row = lo + int(np.flatnonzero(b != b[0])[0])
            raise DataError(
                f"{where(row)}: column 'Batch Number' changes within a file ({b[0]} then {batch[row]});"
                " one file must hold one sequence"
            )
        out[name] = _prompt(name, lo, hi, col, ids, t, facts, report, where)


def _prompt(
    name: str,
    lo: int,
    hi: int,
    col: np.ndarray,
    ids: np.ndarray,
    t: _Table,
    facts: Facts,
    report: ImportReport,
    where: Any,
) -> _Parsed:
    L, k, sentinel = len(facts.moe_layers), facts.top_k, facts.sentinel
    c = col[lo:hi]
    cut = np.flatnonzero(np.diff(c)) + 1
    bstart = np.concatenate([[0], cut])
    bend = np.concatenate([cut, [hi - lo]])
    bcol = c[bstart]
    blen = bend - bstart
    uniq, counts = np.unique(bcol, return_counts=True)
    split_cols = set(uniq[counts > 1].tolist())
    single = np.array([cc not in split_cols for cc in bcol])
    lens, freq = np.unique(blen[single], return_counts=True) if single.any() else (blen, np.ones_like(blen))
    n = int(lens[freq == freq.max()].max())
    ref = int(np.flatnonzero(single & (blen == n))[0]) if (single & (blen == n)).any() else 0
    ref_tokens = t.token.slice(lo + int(bstart[ref]), n)
    experts = np.full((n, L, k), sentinel, facts.id_dtype)
    masks: list[tuple[int, int, int, str, int]] = []
    for j in range(len(bstart)):
        cc, s, m = int(bcol[j]), int(bstart[j]), int(blen[j])
        layer = facts.moe_layers[cc]
        if cc in split_cols:
            if j == int(np.flatnonzero(bcol == cc)[1]):
                report.add(
                    "out_of_order", 1, f"{where(lo + s)}: rows of layer {layer} resume after other layers"
                )
                masks.append((layer, n, 0, "rows of this layer are split into several blocks", n))
            continue
        if m != n:
            kind = "short_series" if m < n else "extra_rows"
            report.add(kind, 1, f"{where(lo + s)}: layer {layer} has {m} rows, the prompt {n} tokens")
            masks.append(
                (layer, n, m, f"{m} rows for {n} tokens: which token lacks (or repeats) a row is unknown", n)
            )
            continue
        if not t.token.slice(lo + s, n).equals(ref_tokens):
            report.add(
                "token_mismatch",
                1,
                f"{where(lo + s)}: layer {layer} lists other tokens than layer"
                f" {facts.moe_layers[int(bcol[ref])]}",
            )
            masks.append((layer, n, m, "its tokens differ from the prompt's", n))
            continue
        experts[:, cc] = ids[lo + s : lo + s + n]
    for cc in sorted(set(range(L)) - set(bcol.tolist())):
        report.add("missing_layer", 1, f"{name}: no rows for layer {facts.moe_layers[cc]}")
        masks.append((facts.moe_layers[cc], n, 0, "no rows for this layer", n))
    return _Parsed(name, experts, ref_tokens.to_pylist(), masks)
