"""What every reader checks on every open, and while shards stream in: trust nothing on disk.

On open (cheap: the manifest and each shard's Parquet footer): the manifest's types and ranges,
shard paths inside the trace directory, no shard listed twice, each shard's rows and columns
against the manifest, and ``complete`` unless the caller accepts an interrupted trace.

While streaming: each shard's SHA-256 is computed over the bytes as they are read (one read, the
hash releases the GIL so it overlaps the caller's work) and compared before a row is handed out;
expert ids are checked against ``num_experts``. A trace written before checksums existed opens with
an :class:`IntegrityWarning` saying that its shards cannot be verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moescope.errors import TraceError
from moescope.trace.manifest import RoutingSpec, is_int
from moescope.trace.schema import ROUTING_METADATA_KEY, build_schema, missing_id

_SHA = re.compile(r"^[0-9a-f]{64}$")


class IntegrityWarning(UserWarning):
    """A trace can be read but not fully verified (e.g. its shards carry no checksums)."""


def check_shard_entries(path: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Types of the ``shards`` entries, paths inside ``path``, no duplicates; returns the entries."""
    where = path / "manifest.json"
    root = path.resolve()
    seen: dict[str, int] = {}
    for i, shard in enumerate(manifest["shards"]):
        name = shard.get("file")
        if not isinstance(name, str) or not name:
            raise TraceError(f"{where}: shards[{i}].file must be a file name, got {name!r}")
        target = (path / name).resolve()
        if target.parent != root:
            raise TraceError(
                f"{where}: shards[{i}].file {name!r} points outside the trace directory; a shard must sit"
                " directly in it"
            )
        if target.name in seen:
            raise TraceError(
                f"{where}: shards[{i}].file {name!r} is listed twice (also shards[{seen[target.name]}]);"
                " every row would be read twice"
            )
        seen[target.name] = i
        rows = shard.get("rows")
        if not is_int(rows) or rows < 0:
            raise TraceError(f"{where}: shards[{i}].rows must be a non-negative integer, got {rows!r}")
        sha = shard.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not _SHA.match(sha)):
            raise TraceError(f"{where}: shards[{i}].sha256 must be 64 hex digits or null, got {sha!r}")
    progress = manifest.get("progress")
    if isinstance(progress, dict) and progress.get("rows") is not None:
        total = sum(s["rows"] for s in manifest["shards"])
        if not is_int(progress["rows"]) or progress["rows"] != total:
            raise TraceError(f"{where}: progress.rows={progress['rows']!r} but the shards list {total} rows")
    if not isinstance(manifest.get("columns"), dict):
        raise TraceError(f"{where}: field 'columns' must be an object")
    return manifest["shards"]


def check_open(path: Path, manifest: dict[str, Any], *, allow_incomplete: bool = False) -> None:
    """Every check a reader can afford on open; raises :class:`TraceError` naming file and field."""
    where = path / "manifest.json"
    spec = RoutingSpec.from_dict(manifest["routing"], source=str(where))
    entries = check_shard_entries(path, manifest)
    if not manifest.get("complete") and not allow_incomplete:
        raise TraceError(
            f"{where}: the trace is incomplete (its capture or import was interrupted); continue it with"
            " `resume`, or pass `allow_incomplete` to read the committed shards"
        )
    try:
        expected = build_schema(spec, manifest["columns"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"{where}: field 'columns' is malformed ({exc})") from None
    for shard in entries:
        f = path / shard["file"]
        if not f.is_file():
            raise TraceError(f"{f}: shard listed in the manifest is missing")
        try:
            meta = pq.read_metadata(f)
            schema = meta.schema.to_arrow_schema()
        except Exception as exc:  # pyarrow raises several types for a damaged footer
            raise TraceError(f"{f}: not a readable Parquet file ({_short(exc)})") from None
        if meta.num_rows != shard["rows"]:
            raise TraceError(f"{f}: holds {meta.num_rows} rows, manifest.json says {shard['rows']}")
        written = (schema.metadata or {}).get(ROUTING_METADATA_KEY.encode())
        if written is not None:
            try:
                facts = json.loads(written)
            except ValueError:
                raise TraceError(
                    f"{f}: its routing metadata is not valid JSON; the shard is damaged"
                ) from None
            for key in ("num_experts", "top_k", "moe_layers"):
                if facts.get(key) != getattr(spec, key):
                    raise TraceError(
                        f"{where}: routing.{key} is {getattr(spec, key)!r} but shard {shard['file']} was"
                        f" written with {facts.get(key)!r}: the manifest was edited or belongs to another trace"
                    )
        for fld in expected:
            if fld.name not in schema.names:
                raise TraceError(f"{f}: missing column {fld.name!r}")
            if not schema.field(fld.name).type.equals(fld.type):
                raise TraceError(
                    f"{f}: column {fld.name!r} has type {schema.field(fld.name).type}, expected {fld.type}"
                )
    if entries and any(s.get("sha256") is None for s in entries):
        warnings.warn(
            f"{path}: shards carry no SHA-256 in manifest.json (an older trace), so damage inside them"
            " cannot be detected; rewrite it (moescope split, or a new capture) to add checksums",
            IntegrityWarning,
            stacklevel=3,
        )


#: Shards whose checksum was verified in this process: (path, size, mtime_ns, inode) -> sha256.
_VERIFIED: dict[tuple[str, int, int, int], str] = {}


def open_shard(path: Path, entry: dict[str, Any], *, verify: bool = True) -> pq.ParquetFile:
    """Open a shard for reading; with ``verify`` its bytes are hashed as they are read, once per process."""
    sha = entry.get("sha256")
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if not verify or sha is None or _VERIFIED.get(key) == sha:
            return pq.ParquetFile(path)
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the shard ({exc.strerror or exc})") from None
    if digest != sha:
        raise TraceError(
            f"{path}: SHA-256 differs from manifest.json: the shard is damaged or was replaced"
            " (moescope validate lists every problem)"
        )
    _VERIFIED[key] = sha
    try:
        return pq.ParquetFile(pa.BufferReader(data))
    except Exception as exc:
        raise TraceError(f"{path}: not a readable Parquet file ({_short(exc)})") from None


@contextlib.contextmanager
def shard_errors(path: Path) -> Iterator[None]:
    """Turn pyarrow's decoding errors into a :class:`TraceError` naming the shard."""
    try:
        yield
    except TraceError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise TraceError(f"{path}: cannot decode the shard ({_short(exc)})") from None


def check_batch(rb: pa.RecordBatch, path: Path, num_experts: int) -> None:
    """Expert ids in ``0..E-1`` (or the missing sentinel); raises naming the shard."""
    if "experts" not in rb.schema.names:
        return
    flat = rb.column("experts").flatten().flatten().to_numpy(zero_copy_only=False)
    if not len(flat):
        return
    top = int(flat.max())
    if top < num_experts:
        return
    bad = (flat >= num_experts) & (flat != missing_id(num_experts))
    if bad.any():
        raise TraceError(
            f"{path}: column 'experts' holds id {int(flat[np.argmax(bad)])} >= num_experts={num_experts}"
            f" ({int(bad.sum())} such values): the shard or its manifest is damaged"
        )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
