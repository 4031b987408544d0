"""Which trace the policies and prefetchers of a replay learn from: named, never implicit.

A cache policy or prefetcher that learns statistics (static pinning, the transition table, an
unfitted predictor) and is then replayed on the documents it learned from looks better than it
will on new text. So :func:`fit_source` asks for a training trace (``fit_trace``, e.g. the train
half of :meth:`Trace.split`), or for the explicit choice ``fit_trace="replayed"``, and refuses a
training trace that shares documents with the replayed one, as well as a saved predictor that was
fitted on documents being replayed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moescope.errors import ConfigError
from moescope.trace.split import same_trace, shared_documents

#: ``fit_trace=REPLAYED`` fits on the replayed trace itself; its numbers are optimistic.
REPLAYED = "replayed"


def learns_from_trace(estimator: Any) -> bool:
    """Whether fitting ``estimator`` (a policy or prefetcher) reads statistics from a trace, not only its shape."""
    if estimator is None or getattr(estimator, "fitted_", False):
        return False
    own = getattr(estimator, "learns_from_trace", None)
    if callable(own):
        return bool(own())
    owners = [c for c in type(estimator).__mro__ if "_fit" in vars(c)]
    return bool(owners) and owners[0] is not owners[-1]


def _name(estimator: Any) -> str:
    describe = getattr(estimator, "describe", None)
    return describe() if callable(describe) else type(estimator).__name__


def fit_source(trace: Any, fit_trace: Any, *estimators: Any) -> Any:
    """The trace the unfitted ``estimators`` are fitted on before ``trace`` is replayed.

    ``fit_trace`` is a training trace, :data:`REPLAYED`, or ``None`` (allowed only when nothing
    learns from a trace: LRU, Belady, an oracle). Raises :class:`ConfigError` naming the parameter.
    """
    if isinstance(fit_trace, str):
        if fit_trace != REPLAYED:
            raise ConfigError(f"fit_trace must be a training Trace, {REPLAYED!r} or None, got {fit_trace!r}")
        return trace
    for est in estimators:
        record = getattr(est, "fit_record", None)
        record = record() if callable(record) else None
        if record and record.get("trace") == str(trace.path.resolve()):
            created = record.get("trace_created") == trace.manifest.get("created")
            seen = np.setdiff1d(trace.documents(), np.asarray(record.get("test_documents") or [], np.int64))
            if created and seen.size:
                raise ConfigError(
                    f"{_name(est)}: its predictor was fitted on {seen.size} of the replayed documents of"
                    f" {trace.path}: replay only its held-out documents (moescope.trace.split.held_out) or"
                    f" pass fit_trace={REPLAYED!r} to accept optimistic numbers"
                )
    learners = [_name(e) for e in estimators if learns_from_trace(e)]
    if fit_trace is None:
        if learners:
            raise ConfigError(
                f"{', '.join(learners)} learn(s) from a trace: pass fit_trace=<training trace> (e.g. the train"
                f" half of trace.split()) or fit_trace={REPLAYED!r} to fit on the replayed trace itself"
                " (optimistic)"
            )
        return trace
    if learners and same_trace(fit_trace, trace):
        shared = shared_documents(fit_trace, trace)
        if shared.size:
            raise ConfigError(
                f"fit_trace shares {shared.size} document(s) with the replayed trace {trace.path}: pass"
                f" disjoint halves (trace.split()) or fit_trace={REPLAYED!r} to fit on the replayed trace"
            )
    return fit_trace
