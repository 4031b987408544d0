"""Readers behind :class:`moescope.core.sources.Source`: files, saved data sets and the hub.

Each yields ``(record, where)`` pairs (``where`` names the file and line or row for errors), or
plain texts for ``.txt`` files; the field mapping and document ids are the sources module's job.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moescope.errors import ConfigError, DataError

#: A CSV cell this long is almost certainly not what was meant.
CSV_FIELD_LIMIT = 1 << 30


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_txt(path: Path, unit: str) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte {exc.start}); convert it or use another format"
        ) from None
    if unit == "file":
        yield text
    elif unit == "line":
        yield from text.splitlines()
    else:
        yield from re.split(r"\n[ \t\r\f\v]*\n", text)


def read_json(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """Records of a JSON or JSONL file with their labels; non-UTF-8 text is an error naming the file."""
    try:
        yield from _read_json_utf8(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} near byte {exc.start} of a block)") from None


def _read_json_utf8(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if path.suffix == ".json" and head.startswith("["):
            try:
                rows = json.load(f)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
                ) from None
            for i, rec in enumerate(rows):
                if not isinstance(rec, dict):
                    raise DataError(
                        f"{path}: item {i} is {type(rec).__name__}, expected an object with fields"
                    )
                yield rec, f"{path} item {i}"
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON at column {exc.colno}: {exc.msg}") from None
            if not isinstance(rec, dict):
                raise DataError(
                    f"{path}:{lineno}: a JSON line must be an object with fields, got {type(rec).__name__}"
                )
            yield rec, f"{path}:{lineno}"


def read_csv(path: Path, mapping: Any, delimiter: str) -> Iterator[tuple[dict[str, Any], str]]:
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return
        mapping.check_fields(list(reader.fieldnames), str(path))
        for i, rec in enumerate(reader):
            yield rec, f"{path} row {i + 1}"


def read_parquet(path: Path, mapping: Any) -> Iterator[tuple[dict[str, Any], str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    mapping.check_fields(names, str(path))
    row = 0
    for rb in pf.iter_batches(batch_size=4096):
        for rec in rb.to_pylist():
            yield rec, f"{path} row {row}"
            row += 1


_WIKITEXT_TITLE = re.compile(r"^ = (?!=).* = ?\n?$")


def group_wikitext(
    records: Iterator[tuple[dict[str, Any], str]], rule: str | Callable
) -> Iterator[tuple[dict[str, Any], str]]:
    """Join WikiText's one-line rows into articles; a top-level `` = Title = `` row starts one."""
    if not isinstance(rule, str):
        yield from records
        return
    lines: list[str] = []
    start = ""
    for rec, where in records:
        if rule not in rec:
            yield rec, where  # let the mapping raise its unknown-field error
            return
        line = rec[rule] or "\n"  # an empty row stands for a blank line of the original text
        if _WIKITEXT_TITLE.match(line) and any(s.strip() for s in lines):
            yield {rule: "".join(lines).strip()}, start
            lines = []
        if not lines:
            start = where
        lines.append(line)
    if any(s.strip() for s in lines):
        yield {rule: "".join(lines).strip()}, start


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def pick_split(dsd: Any, split: str | None, where: str) -> Any:
    splits = list(dsd.keys())
    if split is not None:
        if split not in dsd:
            raise DataError(
                f"{where}: no split {split!r}; available splits: {', '.join(splits)} (use `split`)"
            )
        return dsd[split]
    if len(splits) == 1:
        return dsd[splits[0]]
    raise DataError(f"{where}: has several splits ({', '.join(splits)}); choose one with `split`")


def load_from_disk(path: Path, split: str | None) -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{path}: reading a saved data set needs the 'datasets' package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ...
        raise DataError(f"{path}: cannot load the saved data set: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = pick_split(ds, split, str(path))
    elif split is not None and ds.split is not None and str(ds.split) != split:
        raise DataError(f"{path}: holds split {str(ds.split)!r}, not `split` {split!r}")
    return ds


def load_hub(src: Any) -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{src.name}: loading a hub data set needs the 'datasets' package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_dataset(src.hub_path, src.config, split=src.split)
    except Exception as exc:  # offline, unknown name, bad config: datasets raises many types
        raise DataError(
            f"{src.name}: not a file or directory, and loading it as a hub data set"
            f" ({src.hub_path!r}, config {src.config!r}, split {src.split!r}) failed: {exc}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        ds = pick_split(ds, None, src.name)
    return ds
