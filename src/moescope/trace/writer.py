"""Write traces: shards first, each atomically, then the manifest that commits them.

Rows are buffered in memory and cut into shards only at document boundaries, so the manifest's
progress marker (the last complete document) tells a resumed capture exactly where to go on.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moescope.errors import TraceError
from moescope.trace.atomic import atomic_write, atomic_write_json
from moescope.trace.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SLOT_ORDERS,
    RoutingSpec,
    read_manifest,
    routing_from_manifest,
)
from moescope.trace.outputs import clear_trace_dir, is_trace_dir, trace_orphans
from moescope.trace.schema import (
    ROUTING_METADATA_KEY,
    build_schema,
    default_columns,
    id_dtype,
    numpy_to_nested,
)

if TYPE_CHECKING:
    from moescope.trace.reader import Batch

SHARD_PATTERN = "part-{:05d}.parquet"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class TraceWriter:
    """Append routing rows to a trace directory.

    Use :meth:`create` for a new trace and :meth:`resume` to continue an interrupted one. Call
    :meth:`append` with whole or partial documents, :meth:`commit` once every row of the
    documents up to ``doc_id`` has been appended, and :meth:`close` at the end (or use ``with``).
    A crash loses at most the rows after the last written shard, never a committed one.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> from moescope.trace import RoutingSpec, Trace, TraceWriter
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "t"
    >>> spec = RoutingSpec(num_experts=8, top_k=2, moe_layers=[0, 1])
    >>> with TraceWriter.create(d, spec) as w:
    ...     w.append(doc_id=np.zeros(3, int), position=np.arange(3), token_id=np.arange(3),
    ...              label="prose", experts=np.zeros((3, 2, 2), np.uint8) + [0, 1],
    ...              weights=np.full((3, 2, 2), 0.5, np.float32))
    ...     w.commit(0)
    >>> Trace.open(d).num_tokens
    3
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], shard_rows: int) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.routing = routing_from_manifest(manifest, str(Path(directory) / MANIFEST_NAME))
        manifest["routing"] = self.routing.to_dict()
        # Each shard's footer repeats the routing facts, so a reader notices a manifest edited afterwards.
        self.schema = build_schema(self.routing, manifest["columns"]).with_metadata(
            {ROUTING_METADATA_KEY: json.dumps(self.routing.to_dict(), sort_keys=True)}
        )
        self.shard_rows = int(shard_rows)
        self._pending: list[pa.Table] = []  # appended, not yet committed to a document boundary
        self._ready: list[pa.Table] = []  # complete documents waiting for a shard
        self._ready_rows = 0
        self._ready_last_doc: int | None = None
        self._closed = False

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(
        cls,
        directory: str | Path,
        routing: RoutingSpec,
        *,
        columns: dict[str, Any] | None = None,
        model: dict[str, Any] | None = None,
        tokenizer: dict[str, Any] | None = None,
        datasets: list[dict[str, Any]] | None = None,
        capture: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
        shard_rows: int = 65536,
        overwrite: bool = False,
    ) -> TraceWriter:
        """Start a new trace in ``directory`` (which must be absent or empty unless ``overwrite``)."""
        from moescope import __version__

        directory = Path(directory)
        routing.check()
        if directory.exists() and any(directory.iterdir()):
            if not overwrite:
                raise TraceError(
                    f"{directory}: already exists and is not empty; pass `resume` to continue it or"
                    " `overwrite` to replace it"
                )
            if not is_trace_dir(directory):
                raise TraceError(
                    f"{directory}: exists and is not a moescope trace (no manifest.json); moescope replaces"
                    " only what it wrote, so it leaves this alone: move it away or choose another `output`"
                )
            clear_trace_dir(directory)  # only the manifest, part-NNNNN.parquet and their temporaries
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "moescope_version": __version__,
            "created": _now(),
            "model": model or {},
            "routing": routing.to_dict(),
            "tokenizer": tokenizer or {},
            "datasets": datasets or [],
            "labels": [],
            "columns": columns or default_columns(),
            "capture": capture or {},
            "source": source or {},
            "shards": [],
            "progress": {"last_document": None, "rows": 0},
            "complete": False,
        }
        writer = cls(directory, manifest, shard_rows)
        writer._write_manifest()
        return writer

    @classmethod
    def resume(
        cls, directory: str | Path, *, capture: dict[str, Any] | None = None, shard_rows: int = 65536
    ) -> TraceWriter:
        """Reopen an interrupted trace. Shards the manifest does not list are orphans and are deleted
        (only moescope's own ``part-NNNNN.parquet`` and temporary names).

        ``capture`` must equal the parameters the trace was started with; the first differing key
        is named in the error, since resuming with other settings would mix two traces in one.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        if capture is not None:
            old = manifest.get("capture", {})
            for key in sorted(set(old) | set(capture)):
                if key in ("resume",):
                    continue
                if old.get(key) != capture.get(key):
                    raise TraceError(
                        f"{directory}: cannot resume: capture setting {key!r} was {old.get(key)!r},"
                        f" now {capture.get(key)!r}"
                    )
        for p in trace_orphans(directory, {s["file"] for s in manifest["shards"]}):
            p.unlink()  # moescope's own shard and temporary names only, never a user's file
        manifest["complete"] = False
        writer = cls(directory, manifest, shard_rows)
        writer._write_manifest()
        return writer

    def set_slot_order(self, slot_order: str) -> None:
        """Declare what the slot order means (``"rank"`` or ``"set"``) once an importer knows it."""
        if slot_order not in SLOT_ORDERS:
            raise TraceError(f"{self.directory}: slot order must be one of {SLOT_ORDERS}, got {slot_order!r}")
        self.routing.slot_order = slot_order
        self.manifest["routing"] = self.routing.to_dict()

    @property
    def last_document(self) -> int | None:
        """The last document whose rows are all in committed shards (``None`` before the first)."""
        return self.manifest["progress"]["last_document"]

    # ----------------------------------------------------------------- appending
    def append(
        self,
        *,
        doc_id: np.ndarray,
        position: np.ndarray,
        token_id: np.ndarray,
        label: str | list[str] | np.ndarray | None,
        experts: np.ndarray,
        weights: np.ndarray | None = None,
        logits: np.ndarray | None = None,
        lookahead: dict[str, np.ndarray] | None = None,
        token: list[str] | np.ndarray | None = None,
        doc_loss: np.ndarray | None = None,
    ) -> None:
        """Buffer rows. Routing arrays are ``(n, L, k)`` (logits ``(n, L, E)``, lookahead ``(n, L, m)``).

        ``doc_loss`` ``(n,)``: each row's document loss (NaN: unknown), for traces with that column.
        """
        if self._closed:
            raise TraceError(f"{self.directory}: writer is closed")
        n = len(doc_id)
        L, k, E = self.routing.num_moe_layers, self.routing.top_k, self.routing.num_experts
        experts = np.asarray(experts)
        if experts.shape != (n, L, k):
            raise TraceError(
                f"experts has shape {experts.shape}, expected {(n, L, k)} (rows, MoE layers, top_k)"
            )
        cols = self.manifest["columns"]
        if isinstance(label, str) or label is None:
            label_arr = pa.array([label or ""] * n, pa.string()).dictionary_encode()
        else:
            label_arr = pa.array(list(label), pa.string()).dictionary_encode()
        data: dict[str, pa.Array] = {
            "doc_id": pa.array(np.asarray(doc_id, np.int64)),
            "position": pa.array(np.asarray(position, np.int32)),
            "token_id": pa.array(np.asarray(token_id, np.int32)),
            "label": label_arr.cast(pa.dictionary(pa.int32(), pa.string())),
        }
        if cols.get("token_text"):
            if token is None:
                raise TraceError("this trace has a 'token' column: pass token=")
            data["token"] = pa.array(list(token), pa.string())
        data["experts"] = numpy_to_nested(experts.astype(id_dtype(E), copy=False))
        self._add_optional(data, "weights", weights, cols.get("weights"), (n, L, k))
        self._add_optional(data, "logits", logits, cols.get("logits"), (n, L, E))
        la = cols.get("lookahead")
        if la:
            lookahead = lookahead or {}
            for name in [f for f in self.schema.names if f.startswith("lookahead_")]:
                if name not in lookahead:
                    raise TraceError(f"this trace has column {name!r}: pass it in lookahead=")
                arr = np.asarray(lookahead[name])
                if arr.shape != (n, L, la["m"]):
                    raise TraceError(f"{name} has shape {arr.shape}, expected {(n, L, la['m'])}")
                data[name] = numpy_to_nested(arr.astype(id_dtype(E), copy=False))
        if cols.get("doc_loss"):
            if doc_loss is None:
                raise TraceError("this trace has a 'doc_loss' column: pass doc_loss=")
            dl = np.asarray(doc_loss, np.float32)
            if dl.shape != (n,):
                raise TraceError(f"doc_loss has shape {dl.shape}, expected {(n,)}")
            data["doc_loss"] = pa.array(dl)
        self._pending.append(pa.Table.from_pydict(data, schema=self.schema))

    @staticmethod
    def _add_optional(
        data: dict, name: str, values: np.ndarray | None, dtype: str | None, shape: tuple
    ) -> None:
        if not dtype:
            return
        if values is None:
            raise TraceError(f"this trace has a {name!r} column: pass {name}=")
        values = np.asarray(values)
        if values.shape != shape:
            raise TraceError(f"{name} has shape {values.shape}, expected {shape}")
        data[name] = numpy_to_nested(values.astype(dtype, copy=False))

    def append_batch(self, batch: Batch, labels: Sequence[str], doc_id: np.ndarray | None = None) -> None:
        """Buffer the rows of ``batch``, read from a trace whose label names are ``labels`` (its
        :attr:`~moescope.trace.reader.Trace.labels`), with every column, under ``doc_id`` (default:
        the batch's own): how split and merge copy rows from one trace to another."""
        names = np.asarray([*labels, ""], dtype=object)  # code -1 (no label) -> ""
        self.append(
            doc_id=batch.doc_id if doc_id is None else doc_id,
            position=batch.position,
            token_id=batch.token_id,
            label=list(names[batch.label]),
            experts=batch.experts,
            weights=batch.weights,
            logits=batch.logits,
            lookahead=batch.lookahead or None,
            token=batch.token,
            doc_loss=batch.doc_loss,
        )

    def commit(self, through_doc: int) -> None:
        """Declare every row of documents ``<= through_doc`` appended; write a shard when enough are ready."""
        if self._pending:
            last = max(int(pc.max(t["doc_id"]).as_py()) for t in self._pending)
            if last > through_doc:
                raise TraceError(f"commit({through_doc}) but rows of document {last} were appended")
            self._ready.extend(self._pending)
            self._ready_rows += sum(t.num_rows for t in self._pending)
            self._pending = []
        self._ready_last_doc = int(through_doc)
        if self._ready_rows >= self.shard_rows:
            self._write_shard()

    def close(self) -> None:
        """Write what is buffered and mark the trace complete."""
        if self._closed:
            return
        if self._pending:
            self.commit(max(int(pc.max(t["doc_id"]).as_py()) for t in self._pending))
        if self._ready_rows:
            self._write_shard()
        self.manifest["complete"] = True
        self._write_manifest()
        self._closed = True

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True  # keep committed shards; the trace stays resumable, not complete

    def write_unit(self, name: str, **extra: Any) -> dict[str, Any] | None:
        """Write every row appended so far as one shard ``name`` and return its manifest entry.

        For unit-structured (distributed) captures, where each rank writes its own shards and rank 0
        lists them later: the manifest is left alone. The entry carries ``extra`` and the shard's
        ``labels``; ``None`` when no row was appended.
        """
        tables, self._pending, self._ready, self._ready_rows = self._pending + self._ready, [], [], 0
        if not tables:
            return None
        table = pa.concat_tables(tables).unify_dictionaries().combine_chunks()
        path = self.directory / name
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        doc = table["doc_id"].to_numpy()
        labels = table["label"].combine_chunks().dictionary.to_pylist()
        return {
            "file": name,
            "rows": table.num_rows,
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
            "first_doc": int(doc.min()),
            "last_doc": int(doc.max()),
            **extra,
            "labels": sorted(v for v in set(labels) if v is not None),
        }

    # ----------------------------------------------------------------- internals
    def _write_shard(self) -> None:
        table = pa.concat_tables(self._ready).unify_dictionaries().combine_chunks()
        index = len(self.manifest["shards"])
        name = SHARD_PATTERN.format(index)
        path = self.directory / name
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        doc = table["doc_id"].to_numpy()
        labels = set(self.manifest["labels"])
        labels.update(v for v in table["label"].combine_chunks().dictionary.to_pylist() if v is not None)
        self.manifest["labels"] = sorted(labels)
        self.manifest["shards"].append(
            {
                "file": name,
                "rows": table.num_rows,
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
                "first_doc": int(doc.min()),
                "last_doc": int(doc.max()),
            }
        )
        self.manifest["progress"] = {
            "last_document": self._ready_last_doc,
            "rows": self.manifest["progress"]["rows"] + table.num_rows,
        }
        self._write_manifest()  # the commit record, written last
        self._ready, self._ready_rows = [], 0

    def _write_manifest(self) -> None:
        self.manifest["updated"] = _now()
        atomic_write_json(self.directory / MANIFEST_NAME, self.manifest)
