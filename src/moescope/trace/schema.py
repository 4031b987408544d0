"""Column layout of trace shards, and zero-copy conversion to NumPy.

Routing columns are Arrow fixed-size lists of fixed-size lists, so a shard's ``experts`` column is
one contiguous buffer that reshapes to ``(N, L, k)`` without a copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from moescope.errors import TraceError
from moescope.trace.manifest import RoutingSpec

LOOKAHEAD_VARIANTS = ("gate_input", "residual")
#: Parquet key-value metadata holding the routing facts a shard was written for (JSON).
ROUTING_METADATA_KEY = "moescope.routing"


def id_dtype(num_experts: int) -> np.dtype:
    """Smallest unsigned integer type holding ids 0..E-1 plus the 'missing' sentinel (its max value)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_experts < np.iinfo(dt).max:
            return np.dtype(dt)
    raise TraceError(f"num_experts={num_experts} is too large for an expert id column")


def missing_id(num_experts: int) -> int:
    """Sentinel stored where a (token, layer) has no recorded routing (e.g. a dropped log record)."""
    return int(np.iinfo(id_dtype(num_experts)).max)


def signed_ids(experts: np.ndarray, missing: int, dtype: Any = np.int16) -> np.ndarray:
    """Expert ids as a signed array with the ``missing`` sentinel turned into -1.

    Stored ids are unsigned (uint8 for E < 255), so ``np.where(ids == missing, -1, ids)`` keeps
    the unsigned dtype and wraps -1 back to the sentinel (255). Casting first avoids that.
    """
    out = np.asarray(experts).astype(dtype)
    out[np.asarray(experts) == missing] = -1
    return out


def lookahead_column(variant: str, distance: int) -> str:
    return f"lookahead_{variant}_d{distance}"


def default_columns(
    *,
    weights: bool = True,
    logits: bool = False,
    logits_dtype: str = "float16",
    lookahead_distances: list[int] | None = None,
    lookahead_variants: list[str] | None = None,
    lookahead_m: int | None = None,
    token_text: bool = False,
    doc_loss: bool = False,
) -> dict[str, Any]:
    """The manifest's ``columns`` section: which optional columns a trace holds.

    ``doc_loss`` adds a float32 column holding each document's mean next-token loss (nats) on
    every row of the document; traces written before it existed simply lack the key.
    """
    lookahead = None
    if lookahead_distances:
        lookahead = {
            "distances": list(lookahead_distances),
            "variants": list(lookahead_variants or LOOKAHEAD_VARIANTS),
            "m": lookahead_m,
        }
    return {
        "weights": "float32" if weights else None,
        "logits": logits_dtype if logits else None,
        "lookahead": lookahead,
        "token_text": bool(token_text),
        **({"doc_loss": "float32"} if doc_loss else {}),
    }


def _fsl(value_type: pa.DataType, inner: int, outer: int) -> pa.DataType:
    return pa.list_(pa.list_(value_type, inner), outer)


def build_schema(spec: RoutingSpec, columns: dict[str, Any]) -> pa.Schema:
    """Arrow schema of a shard for these routing facts and optional columns."""
    L, k, E = spec.num_moe_layers, spec.top_k, spec.num_experts
    ids = pa.from_numpy_dtype(id_dtype(E))
    fields = [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("label", pa.dictionary(pa.int32(), pa.string())),
    ]
    if columns.get("token_text"):
        fields.append(pa.field("token", pa.string()))
    fields.append(pa.field("experts", _fsl(ids, k, L), nullable=False))
    if columns.get("weights"):
        fields.append(pa.field("weights", _fsl(pa.from_numpy_dtype(np.dtype(columns["weights"])), k, L)))
    if columns.get("logits"):
        fields.append(pa.field("logits", _fsl(pa.from_numpy_dtype(np.dtype(columns["logits"])), E, L)))
    la = columns.get("lookahead")
    if la:
        for variant in la["variants"]:
            for d in la["distances"]:
                fields.append(pa.field(lookahead_column(variant, d), _fsl(ids, la["m"], L)))
    if columns.get("doc_loss"):
        fields.append(pa.field("doc_loss", pa.float32()))
    return pa.schema(fields)


def nested_to_numpy(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list-of-fixed-size-list column as an ``(N, L, k)`` array, zero-copy when possible."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    outer = arr.type.list_size
    inner = arr.type.value_type.list_size
    flat = arr.flatten().flatten()  # honours slice offsets
    return flat.to_numpy(zero_copy_only=False).reshape(len(arr), outer, inner)


def numpy_to_nested(values: np.ndarray, value_type: pa.DataType | None = None) -> pa.Array:
    """An ``(N, L, k)`` array as a fixed-size-list-of-fixed-size-list Arrow array (no copy)."""
    values = np.ascontiguousarray(values)
    _, outer, inner = values.shape
    flat = pa.array(values.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, inner), outer)
