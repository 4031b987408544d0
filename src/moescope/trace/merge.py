"""Join traces of one model into one trace: documents renumbered, every column kept.

Traces captured separately (other machines, other days, other data) of the same model and with the
same columns become one, so every stage reads them as a single trace. Before a row is written the
inputs must agree on the model (its config fingerprint, else its id), the tokenizer, the routing
facts and the columns; the error names the two files that disagree and the field. Documents are
renumbered densely in input order (input 1's documents first, in their order), so ids never collide.
The output is built beside its place and renamed into it at the end: a failed merge leaves nothing.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import ConfigError, TraceError
from moescope.trace.manifest import MANIFEST_NAME
from moescope.trace.reader import Trace
from moescope.trace.writer import TraceWriter


@dataclass
class MergeResult:
    """What :func:`merge_traces` wrote; ``--json`` prints it."""

    trace: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0
    shards: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_key(m: dict[str, Any]) -> tuple[str, Any]:
    model = m.get("model") or {}
    if model.get("config_sha256"):
        return "model.config_sha256", model["config_sha256"]
    return "model.id", model.get("id")


def check_compatible(traces: Sequence[Trace]) -> None:
    """Raise :class:`TraceError` naming both files and the field when two traces cannot be merged."""
    first = traces[0]
    f0 = first.path / MANIFEST_NAME
    for tr in traces[1:]:
        f = tr.path / MANIFEST_NAME
        key0, val0 = _model_key(first.manifest)
        key, val = _model_key(tr.manifest)
        if key0 == key and val0 != val:
            ids = ((first.manifest.get("model") or {}).get("id"), (tr.manifest.get("model") or {}).get("id"))
            raise TraceError(
                f"cannot merge {f0} and {f}: they come from different models ({key} {val0!r} vs {val!r};"
                f" model ids {ids[0]!r} and {ids[1]!r})"
            )
        r0, r = first.routing.to_dict(), tr.routing.to_dict()
        for name in r0:
            if r0[name] != r[name]:
                raise TraceError(
                    f"cannot merge {f0} and {f}: routing.{name} is {r0[name]!r} in one and {r[name]!r} in the other"
                )
        c0, c = first.columns, tr.columns
        for name in sorted(set(c0) | set(c)):
            if c0.get(name) != c.get(name):
                raise TraceError(
                    f"cannot merge {f0} and {f}: columns.{name} is {c0.get(name)!r} in one and {c.get(name)!r}"
                    " in the other (capture both with the same `logits`/`lookahead`/`token_text`/`loss`)"
                )
        t0, t = first.manifest.get("tokenizer") or {}, tr.manifest.get("tokenizer") or {}
        for name in ("name", "vocab_size"):
            if name in t0 and name in t and t0[name] != t[name]:
                raise TraceError(
                    f"cannot merge {f0} and {f}: tokenizer.{name} is {t0[name]!r} in one and {t[name]!r} in the"
                    " other: token ids would mean different things"
                )


def merge_traces(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    progress: Callable[[int], None] | None = None,
) -> MergeResult:
    """Merge the traces ``inputs`` (at least two) into a new trace ``output``.

    ``progress(rows)`` is called after each block written. Raises :class:`TraceError` (naming the
    files) when the inputs disagree, and :class:`ConfigError` for a bad output.

    Examples
    --------
    >>> merge_traces(["runs/node0", "runs/node1"], "runs/all")  # doctest: +SKIP
    """
    if len(inputs) < 2:
        raise ConfigError(f"merge needs at least two traces, got {len(inputs)}")
    seen: dict[Path, str] = {}
    for item in inputs:
        key = Path(item).resolve()
        if key in seen:
            raise ConfigError(f"{item}: given twice (also as {seen[key]}); its documents would be doubled")
        seen[key] = str(item)
    traces = [Trace.open(p, allow_incomplete=allow_incomplete) for p in inputs]
    check_compatible(traces)
    out = Path(output)
    from moescope.trace.outputs import check_replace_trace

    check_replace_trace(out, overwrite)
    from moescope.trace.outputs import remove_leftovers

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.incomplete")
    first = traces[0].manifest
    result = MergeResult(trace=str(out))
    try:
        writer = TraceWriter.create(
            tmp,
            traces[0].routing,
            columns=first["columns"],
            model=first.get("model"),
            tokenizer=first.get("tokenizer"),
            datasets=[],
            capture={},
            source={"tool": "moescope merge", "inputs": []},
        )
        with writer:
            base = 0
            for tr in traces:
                docs = tr.documents()
                rows = 0
                for b in tr.iter_batches():
                    new_id = np.searchsorted(docs, b.doc_id) + base
                    writer.append_batch(b, tr.labels, doc_id=new_id)
                    writer.commit(int(new_id.max()))
                    rows += len(b)
                    if progress is not None:
                        progress(len(b))
                entry = {
                    "trace": str(tr.path),
                    "documents": len(docs),
                    "tokens": rows,
                    "first_doc": base,
                    "last_doc": base + len(docs) - 1,
                    "capture": tr.manifest.get("capture", {}),
                    "created": tr.manifest.get("created"),
                }
                writer.manifest["source"]["inputs"].append(entry)
                writer.manifest["datasets"].extend(
                    _shift(d, docs, base, str(tr.path)) for d in tr.manifest.get("datasets", [])
                )
                result.inputs.append({k: entry[k] for k in ("trace", "documents", "tokens", "first_doc")})
                result.documents += len(docs)
                result.tokens += rows
                base += len(docs)
        result.shards = len(writer.manifest["shards"])
        from moescope.trace.outputs import swap_in

        swap_in(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return result


def _shift(dataset: dict[str, Any], docs: np.ndarray, base: int, trace: str) -> dict[str, Any]:
    """A data set entry of an input with its document range in the merged numbering."""
    out = {**dataset, "trace": trace}
    for key in ("first_doc", "last_doc"):
        v = dataset.get(key)
        if isinstance(v, int) and len(docs):
            out[key] = int(np.searchsorted(docs, v)) + base
    return out
