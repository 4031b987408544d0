"""The trace: a directory of Parquet shards plus a JSON manifest, one row per token.

Every stage reads routing through :class:`Trace` and writes it through :class:`TraceWriter`.
The layout is documented in ``docs/trace-format.md``.
"""

from moescope.trace.manifest import FORMAT_VERSION, RoutingSpec
from moescope.trace.reader import Batch, Trace
from moescope.trace.schema import missing_id
from moescope.trace.validate import validate_trace
from moescope.trace.writer import TraceWriter

__all__ = ["FORMAT_VERSION", "Batch", "RoutingSpec", "Trace", "TraceWriter", "missing_id", "validate_trace"]
