"""Check a trace against its manifest: files, checksums, schema, shapes and id ranges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from moescope.errors import TraceError
from moescope.trace.integrity import check_shard_entries
from moescope.trace.manifest import read_manifest, routing_from_manifest
from moescope.trace.schema import build_schema, missing_id, nested_to_numpy
from moescope.trace.writer import file_sha256


def validate_trace(path: str | Path, *, checksums: bool = True, max_problems: int = 50) -> list[str]:
    """Return a list of problems (empty when the trace is sound). Each names the file and field.

    Checks: manifest fields, shard files present, SHA-256 and row counts, the Arrow schema of every
    shard against the routing facts, expert ids in ``0..E-1`` (or the missing sentinel), no repeated
    expert in a token's top-k, finite weights, and unique ``(doc_id, position)`` pairs.
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
        spec = routing_from_manifest(manifest, str(path / "manifest.json"))
        check_shard_entries(path, manifest)
        expected = build_schema(spec, manifest["columns"])
    except TraceError as exc:
        return [str(exc)]
    problems: list[str] = []
    if any(s.get("sha256") is None for s in manifest["shards"]):
        checksums = False
        problems.append(
            f"{path / 'manifest.json'}: note: shards carry no SHA-256 (an older trace); damage inside them"
            " cannot be detected"
        )
    E, sentinel = spec.num_experts, missing_id(spec.num_experts)
    listed = set()
    seen_pairs: list[np.ndarray] = []
    total = 0
    for shard in manifest["shards"]:
        f = path / shard["file"]
        listed.add(shard["file"])
        if not f.is_file():
            problems.append(f"{f}: listed in manifest.json but missing")
            continue
        if checksums and file_sha256(f) != shard["sha256"]:
            problems.append(
                f"{f}: SHA-256 differs from manifest.json (the shard is corrupted or was replaced)"
            )
            continue
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            problems.append(f"{f}: not a readable Parquet file ({exc})")
            continue
        schema = pf.schema_arrow
        for fld in expected:
            if fld.name not in schema.names:
                problems.append(f"{f}: missing column {fld.name!r}")
            elif not schema.field(fld.name).type.equals(fld.type):
                problems.append(
                    f"{f}: column {fld.name!r} has type {schema.field(fld.name).type}, expected {fld.type}"
                )
        if pf.metadata.num_rows != shard["rows"]:
            problems.append(f"{f}: {pf.metadata.num_rows} rows, manifest.json says {shard['rows']}")
        total += pf.metadata.num_rows
        if any(p.startswith(str(f)) for p in problems):
            continue
        for rb in pf.iter_batches(batch_size=65536):
            ex = nested_to_numpy(rb.column("experts")).astype(np.int64)
            bad = (ex >= E) & (ex != sentinel)
            if bad.any():
                row, layer, slot = np.argwhere(bad)[0]
                problems.append(
                    f"{f}: column 'experts' has id {ex[row, layer, slot]} >= num_experts={E}"
                    f" ({int(bad.sum())} such values; first at row {row}, MoE layer {layer})"
                )
            srt = np.sort(ex, axis=-1)
            dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] != sentinel)
            if dup.any():
                row, layer, _ = np.argwhere(dup)[0]
                problems.append(
                    f"{f}: column 'experts' repeats an expert within top-k at row {row}, MoE layer {layer}"
                )
            if "weights" in rb.schema.names:
                w = nested_to_numpy(rb.column("weights"))
                nonfinite = ~np.isfinite(w) & (ex != sentinel)
                if nonfinite.any():
                    problems.append(f"{f}: column 'weights' has {int(nonfinite.sum())} non-finite values")
            seen_pairs.append(
                rb.column("doc_id").to_numpy().astype(np.int64) * (1 << 31) + rb.column("position").to_numpy()
            )
        if len(problems) >= max_problems:
            break
    if seen_pairs:
        pairs = np.concatenate(seen_pairs)
        if len(np.unique(pairs)) != len(pairs):
            problems.append(
                f"{path}: {len(pairs) - len(np.unique(pairs))} duplicated (doc_id, position) rows"
            )
    if manifest.get("progress", {}).get("rows", total) != total:
        problems.append(
            f"{path / 'manifest.json'}: progress.rows={manifest['progress']['rows']} but shards hold {total}"
        )
    for p in path.glob("*.parquet"):
        if p.name not in listed:
            problems.append(f"{p}: shard not listed in manifest.json (an orphan from an interrupted write)")
    for p in sorted(path.glob("*.tmp")) + sorted(path.glob(".*.tmp")):
        problems.append(f"{p}: stray temporary file (an interrupted write; `resume` removes moescope's own)")
    if not manifest.get("complete"):
        problems.append(
            f"{path / 'manifest.json'}: trace is incomplete (interrupted; continue it with `resume`)"
        )
    return problems[:max_problems]
