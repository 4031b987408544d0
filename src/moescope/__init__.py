"""moescope: record, analyse and predict expert routing in Mixture-of-Experts language models."""

from moescope.errors import MoescopeError
from moescope.trace import RoutingSpec, Trace, TraceWriter

__version__ = "0.1.0"

__all__ = ["MoescopeError", "RoutingSpec", "Trace", "TraceWriter", "__version__"]
