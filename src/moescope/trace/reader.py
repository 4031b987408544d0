"""Read traces: manifest facts, NumPy arrays, and chunked iteration with flat memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moescope.errors import TraceError
from moescope.trace.manifest import read_manifest, routing_from_manifest
from moescope.trace.readahead import read_ahead_iter
from moescope.trace.schema import missing_id, nested_to_numpy

ROUTING_COLUMNS = ("experts", "weights", "logits")

_ALLOW_INCOMPLETE: ContextVar[bool] = ContextVar("moescope_allow_incomplete", default=False)


@contextmanager
def reading_incomplete(allow: bool = True) -> Iterator[None]:
    """Within the block, :meth:`Trace.open` accepts incomplete traces (the ``--allow-incomplete`` option)."""
    token = _ALLOW_INCOMPLETE.set(allow)
    try:
        yield
    finally:
        _ALLOW_INCOMPLETE.reset(token)


@dataclass
class Batch:
    """A block of consecutive trace rows as NumPy arrays.

    ``experts`` is ``(n, L, k)``, ``weights`` ``(n, L, k)``, ``logits`` ``(n, L, E)`` and every
    ``lookahead[name]`` ``(n, L, m)``; ``label`` holds codes into :attr:`Trace.labels` (-1: none).
    Columns that were not asked for are ``None``.
    """

    doc_id: np.ndarray | None = None
    position: np.ndarray | None = None
    token_id: np.ndarray | None = None
    label: np.ndarray | None = None
    experts: np.ndarray | None = None
    weights: np.ndarray | None = None
    logits: np.ndarray | None = None
    token: list[str] | None = None
    lookahead: dict[str, np.ndarray] = field(default_factory=dict)
    doc_loss: np.ndarray | None = None

    def __len__(self) -> int:
        for v in (
            self.doc_id,
            self.experts,
            self.position,
            self.token_id,
            self.label,
            self.weights,
            self.logits,
        ):
            if v is not None:
                return len(v)
        return 0


class Trace:
    """A routing trace on disk: one row per token, routing columns shaped ``(L, k)`` per row.

    Open with :meth:`open`; read everything with :meth:`load` or stream with :meth:`iter_batches`.
    :meth:`filter` returns a view restricted to domains or documents; every reader honours it.

    Examples
    --------
    >>> tr = Trace.open("my-trace")  # doctest: +SKIP
    >>> tr.num_experts, tr.top_k, tr.moe_layers  # doctest: +SKIP
    (8, 2, [0, 1, 2, 3])
    >>> for b in tr.filter(domain="code").iter_batches(["experts"]):  # doctest: +SKIP
    ...     b.experts.shape  # (n, L, k)
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        domains: tuple[str, ...] | None = None,
        documents: np.ndarray | None = None,
        *,
        verify: bool = True,
    ) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.routing = routing_from_manifest(manifest, str(self.path / "manifest.json"))
        self._domains = domains
        self._documents = documents
        self._verify = verify

    @classmethod
    def open(cls, path: str | Path, *, allow_incomplete: bool | None = None, verify: bool = True) -> Trace:
        """Open the trace directory ``path``, trusting nothing; errors name the file and the field.

        Checks the manifest's types and ranges, that every shard lies inside ``path``, is listed
        once and holds the rows and columns the manifest says (from its footer), and that the trace
        is ``complete`` unless ``allow_incomplete`` (default: :func:`reading_incomplete`'s setting).
        With ``verify``, each shard's SHA-256 is checked as it streams in, and expert ids are
        checked against ``num_experts``.
        """
        from moescope.trace.integrity import check_open

        path = Path(path)
        manifest = read_manifest(path)
        if allow_incomplete is None:
            allow_incomplete = _ALLOW_INCOMPLETE.get()
        check_open(path, manifest, allow_incomplete=allow_incomplete)
        return cls(path, manifest, verify=verify)

    # ----------------------------------------------------------------- facts
    @property
    def num_experts(self) -> int:
        return self.routing.num_experts

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def moe_layers(self) -> list[int]:
        """Decoder-layer index of each MoE layer (column ``l`` of the routing arrays)."""
        return list(self.routing.moe_layers)

    @property
    def num_layers(self) -> int:
        """Number of MoE layers, the ``L`` of every routing array."""
        return self.routing.num_moe_layers

    @property
    def slot_order(self) -> str:
        """``"rank"`` (slot 0 is the first choice) or ``"set"`` (slot order means nothing)."""
        return self.routing.slot_order

    @property
    def ranked(self) -> bool:
        """Whether first-choice statistics mean something: slots in rank order (or a single slot)."""
        return self.routing.slot_order == "rank" or self.routing.top_k == 1

    @property
    def model_id(self) -> str | None:
        """The model the routing came from (hub id or path), when the trace says."""
        return (self.manifest.get("model") or {}).get("id")

    @property
    def labels(self) -> list[str]:
        """Domain or category names; ``Batch.label`` holds indices into this list."""
        return list(self.manifest.get("labels", []))

    @property
    def columns(self) -> dict[str, Any]:
        return self.manifest["columns"]

    @property
    def has_weights(self) -> bool:
        return bool(self.columns.get("weights"))

    @property
    def has_logits(self) -> bool:
        return bool(self.columns.get("logits"))

    @property
    def has_doc_loss(self) -> bool:
        """Whether rows carry their document's loss (``doc_loss``; absent in older traces)."""
        return bool(self.columns.get("doc_loss"))

    def document_losses(self) -> dict[int, float]:
        """``{doc_id: loss}`` (mean next-token cross-entropy, nats) for documents with a known loss."""
        if not self.has_doc_loss:
            return {}
        out: dict[int, float] = {}
        for b in self.iter_batches(["doc_id", "doc_loss"]):
            first = np.flatnonzero(np.r_[True, b.doc_id[1:] != b.doc_id[:-1]])
            for i in first:
                if np.isfinite(b.doc_loss[i]):
                    out[int(b.doc_id[i])] = float(b.doc_loss[i])
        return out

    @property
    def lookahead_columns(self) -> list[str]:
        la = self.columns.get("lookahead")
        if not la:
            return []
        return [f"lookahead_{v}_d{d}" for v in la["variants"] for d in la["distances"]]

    @property
    def missing_id(self) -> int:
        """Expert id stored where a (token, layer) has no recorded routing."""
        return missing_id(self.num_experts)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest["shards"]]

    @property
    def num_tokens(self) -> int:
        """Rows in the trace, after any filter (a filtered count needs one pass over ``doc_id``/``label``)."""
        if self._domains is None and self._documents is None:
            return int(sum(s["rows"] for s in self.manifest["shards"]))
        return sum(len(b) for b in self.iter_batches(["doc_id"]))

    def __repr__(self) -> str:
        r = self.routing
        return (
            f"Trace({str(self.path)!r}, family={r.family!r}, tokens={self.num_tokens}, "
            f"moe_layers={r.num_moe_layers}, experts={r.num_experts}, top_k={r.top_k})"
        )

    # ----------------------------------------------------------------- views
    def filter(
        self, *, domain: str | Iterable[str] | None = None, documents: Iterable[int] | None = None
    ) -> Trace:
        """A view of the rows whose label is in ``domain`` and whose document is in ``documents``."""
        domains = self._domains
        if domain is not None:
            wanted = (domain,) if isinstance(domain, str) else tuple(domain)
            unknown = [d for d in wanted if d not in self.labels]
            if unknown:
                raise TraceError(f"{self.path}: unknown domain(s) {unknown}; the trace has {self.labels}")
            domains = wanted if domains is None else tuple(d for d in domains if d in wanted)
        docs = self._documents
        if documents is not None:
            new = np.unique(np.fromiter(documents, dtype=np.int64))
            docs = new if docs is None else np.intersect1d(docs, new)
        return Trace(self.path, self.manifest, domains, docs, verify=self._verify)

    def split(
        self,
        test_fraction: float = 0.2,
        seed: int = 0,
        *,
        output: str | Path | None = None,
        overwrite: bool = False,
    ) -> tuple[Trace, Trace]:
        """``(train, test)`` traces from a random split by document (never by token).

        Without ``output`` both are views of this trace (no copy; every stage reads them like any
        trace); with it they are written to ``output/train`` and ``output/test``, as ``moescope
        split`` does. The same ``test_fraction`` and ``seed`` give the same split either way, and
        the one ``moescope predict fit`` holds out.

        Examples
        --------
        >>> train, test = Trace.open("my-trace").split(0.2, seed=0)  # doctest: +SKIP
        """
        from moescope.trace.split import split_documents, split_trace

        if output is not None:
            return split_trace(self, output, test_fraction=test_fraction, seed=seed, overwrite=overwrite)
        train, test = split_documents(self, test_fraction, seed)
        return self.filter(documents=train), self.filter(documents=test)

    # ----------------------------------------------------------------- reading
    def _check_columns(self, columns: list[str]) -> None:
        available = self._available_columns()
        bad = [c for c in columns if c not in available]
        if bad:
            raise TraceError(f"{self.path}: no column(s) {bad}; this trace has {sorted(available)}")

    def _available_columns(self) -> list[str]:
        """Column names in shard order."""
        cols = ["doc_id", "position", "token_id", "label"]
        cols += ["token"] if self.columns.get("token_text") else []
        cols += ["experts"]
        cols += ["weights"] if self.has_weights else []
        cols += ["logits"] if self.has_logits else []
        cols += self.lookahead_columns
        return cols + (["doc_loss"] if self.has_doc_loss else [])

    def iter_arrow(
        self, columns: list[str] | None = None, batch_size: int = 65536, read_ahead: int = 1
    ) -> Iterator[pa.RecordBatch]:
        """Stream Arrow record batches of at most ``batch_size`` rows, filters applied.

        ``read_ahead`` batches are decoded in a background thread while the caller works on the
        current one (Parquet decoding releases the GIL), so reading overlaps computing; 0 reads
        in the caller's thread. Memory grows by at most ``read_ahead`` batches.
        """
        if read_ahead <= 0:
            return self._read_arrow(columns, batch_size)
        # The producer hands over emptied batches too, so that it sees a close between any two
        # batches instead of decoding on to the next row a filter keeps (or the end of the trace).
        return _non_empty(read_ahead_iter(self._read_arrow(columns, batch_size, keep_empty=True), read_ahead))

    def _read_arrow(
        self, columns: list[str] | None, batch_size: int, keep_empty: bool = False
    ) -> Iterator[pa.RecordBatch]:
        columns = list(columns) if columns is not None else self._available_columns()
        self._check_columns(columns)
        need = list(columns)
        if self._documents is not None and "doc_id" not in need:
            need.append("doc_id")
        if self._domains is not None and "label" not in need:
            need.append("label")
        doc_set = pa.array(self._documents) if self._documents is not None else None
        from moescope.trace.integrity import check_batch, open_shard, shard_errors

        for entry, path in zip(self.manifest["shards"], self.shard_paths, strict=True):
            pf = open_shard(path, entry, verify=self._verify)
            with shard_errors(path):
                for rb in pf.iter_batches(batch_size=batch_size, columns=need):
                    if self._verify:
                        check_batch(rb, path, self.num_experts)
                    yield from self._filtered(rb, columns, doc_set, keep_empty)

    def _filtered(
        self, rb: pa.RecordBatch, columns: list[str], doc_set: pa.Array | None, keep_empty: bool
    ) -> Iterator[pa.RecordBatch]:
        mask = None
        if doc_set is not None:
            mask = pc.is_in(rb.column("doc_id"), value_set=doc_set)
        if self._domains is not None:
            lab = pc.is_in(rb.column("label").cast(pa.string()), value_set=pa.array(self._domains))
            mask = lab if mask is None else pc.and_(mask, lab)
        if mask is not None:
            rb = rb.filter(mask)
            if rb.num_rows == 0 and not keep_empty:
                return
        yield rb.select(columns)

    def iter_batches(self, columns: list[str] | None = None, batch_size: int = 65536) -> Iterator[Batch]:
        """Stream :class:`Batch` objects so memory stays flat whatever the trace length."""
        for rb in self.iter_arrow(columns, batch_size):
            yield self.to_batch(rb)

    def to_batch(self, rb: pa.RecordBatch | pa.Table) -> Batch:
        """Turn Arrow rows read from this trace (e.g. by :meth:`iter_arrow`) into a :class:`Batch`."""
        b = Batch()
        names = rb.schema.names
        for name in ("doc_id", "position", "token_id"):
            if name in names:
                setattr(b, name, rb.column(name).to_numpy())
        if "label" in names:
            b.label = self.label_codes(rb.column("label"))
        if "token" in names:
            b.token = rb.column("token").to_pylist()
        for name in ROUTING_COLUMNS:
            if name in names:
                setattr(b, name, nested_to_numpy(rb.column(name)))
        for name in names:
            if name.startswith("lookahead_"):
                b.lookahead[name] = nested_to_numpy(rb.column(name))
        if "doc_loss" in names:
            b.doc_loss = rb.column("doc_loss").to_numpy(zero_copy_only=False).astype(np.float32)
        return b

    def label_codes(self, col: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Codes into :attr:`labels` for a ``label`` column, -1 where a row has no known label."""
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        col = col.unify_dictionaries() if isinstance(col, pa.ChunkedArray) else col
        lookup = pc.index_in(col.dictionary, value_set=pa.array(self.labels, pa.string()))
        lookup = lookup.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
        idx = col.indices.fill_null(0).to_numpy(zero_copy_only=False)
        codes = lookup[idx] if len(lookup) else np.full(len(idx), -1, np.int32)
        if col.null_count:
            codes[col.is_null().to_numpy(zero_copy_only=False)] = -1
        return codes

    def load(self, columns: list[str] | None = None) -> Batch:
        """Every row (after filters) in memory at once; prefer :meth:`iter_batches` for large traces."""
        columns = list(columns) if columns is not None else self._available_columns()
        table = self.to_arrow(columns)
        return self.to_batch(table.combine_chunks())

    def experts(self) -> np.ndarray:
        """All expert ids, ``(N, L, k)``."""
        return self.load(["experts"]).experts

    def weights(self) -> np.ndarray:
        """All routing weights, ``(N, L, k)``."""
        return self.load(["weights"]).weights

    def logits(self) -> np.ndarray:
        """All router logits, ``(N, L, E)``."""
        return self.load(["logits"]).logits

    def documents(self) -> np.ndarray:
        """Distinct document ids, sorted."""
        ids = [np.unique(b.doc_id) for b in self.iter_batches(["doc_id"])]
        return np.unique(np.concatenate(ids)) if ids else np.array([], np.int64)

    def to_arrow(self, columns: list[str] | None = None) -> pa.Table:
        """The (filtered) trace as one Arrow table."""
        columns = list(columns) if columns is not None else self._available_columns()
        batches = list(self.iter_arrow(columns))
        if batches:
            return pa.Table.from_batches(batches)
        if not self.shard_paths:
            raise TraceError(f"{self.path}: the trace has no shards yet")
        return pq.read_schema(self.shard_paths[0]).empty_table().select(columns)

    def to_polars(self, columns: list[str] | None = None, lazy: bool = False):
        """The trace as a Polars DataFrame (or LazyFrame scanning the shards when ``lazy``)."""
        import polars as pl

        if lazy:
            if self._domains is not None or self._documents is not None:
                raise TraceError("to_polars(lazy=True) reads shards directly: apply filters in Polars")
            lf = pl.scan_parquet([str(p) for p in self.shard_paths])
            return lf.select(columns) if columns else lf
        return pl.from_arrow(self.to_arrow(columns))


def _non_empty(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Drop empty batches; closing this closes ``batches`` (and so stops its read-ahead thread)."""
    try:
        for rb in batches:
            if rb.num_rows:
                yield rb
    finally:
        batches.close()
