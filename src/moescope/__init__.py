"""moescope: record, analyse and predict expert routing in Mixture-of-Experts language models.

The whole pipeline from Python (``docs/python.md`` runs this as a test)::

    import moescope
    result = moescope.capture("tiny-mixtral", ["texts.jsonl"], "runs/t", max_tokens=2000)
    trace = moescope.Trace.open(result.trace)
    train, test = trace.split(0.2, seed=0)
    summary = moescope.analyze(trace, "out/analysis")
    predictor = moescope.predict.make("best").fit(train)
    sim = moescope.simulate(test, fit_trace=train, cache_fraction=0.25, prefetch=predictor)
    moescope.report.write_report(["out/analysis"], "out")

Everything is imported on first use, so ``import moescope`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from moescope.errors import MoescopeError

__version__ = "0.1.0"

#: name -> (module, attribute) loaded on first access.
_LAZY: dict[str, tuple[str, str]] = {
    "Trace": ("moescope.trace.reader", "Trace"),
    "TraceWriter": ("moescope.trace.writer", "TraceWriter"),
    "RoutingSpec": ("moescope.trace.manifest", "RoutingSpec"),
    "validate_trace": ("moescope.trace.validate", "validate_trace"),
    "analyze": ("moescope.analysis.run", "analyze"),
    "load_predictor": ("moescope.predict.base", "load_predictor"),
}

#: Stage packages reachable as attributes (``moescope.predict.make``); ``capture`` and ``simulate`` are callable.
_STAGES = (
    "ablate",
    "analysis",
    "capture",
    "core",
    "demo",
    "interop",
    "models",
    "predict",
    "report",
    "simulate",
    "trace",
)

__all__ = ["MoescopeError", "__version__", *_LAZY, *_STAGES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _STAGES:
        value = importlib.import_module(f"moescope.{name}")
    else:
        raise AttributeError(f"module 'moescope' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
