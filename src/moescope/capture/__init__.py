"""Capture: run a transformers MoE model over texts and record the routing it really used.

The package is callable: ``moescope.capture("tiny-mixtral", ["texts.jsonl"], "runs/t", max_tokens=2000)``
is :func:`capture_routing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moescope.core.modules import make_callable


def capture_routing(
    model: Any,
    data: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    **options: Any,
) -> Any:
    """Capture the routing of ``model`` over ``data`` into the trace directory ``output``.

    ``model`` is a bundled name (``tiny-mixtral``), a hub id or a local folder; ``data`` files,
    folders, presets or hub data sets; ``options`` are the fields of
    :class:`~moescope.capture.runner.CaptureOptions` (``max_tokens``, ``seq_len``, ``logits``,
    ``label_field``, ...). Returns the :class:`~moescope.capture.runner.CaptureResult`; open the
    trace with ``moescope.Trace.open(result.trace)``.
    """
    import dataclasses

    from moescope.capture.runner import CaptureOptions, capture
    from moescope.errors import ConfigError

    known = {f.name for f in dataclasses.fields(CaptureOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"capture: unknown option(s) {unknown}; options: {', '.join(sorted(known))}")
    items = [str(data)] if isinstance(data, str | Path) else [str(d) for d in data]
    return capture(model, items, output, CaptureOptions(**options), device=device, dtype=dtype)


make_callable(__name__, "capture_routing")
