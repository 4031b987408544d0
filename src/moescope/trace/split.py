"""Split a trace by document into train and test traces (never by token: a document's tokens share context)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import ConfigError, DataError
from moescope.trace.reader import Trace
from moescope.trace.writer import TraceWriter


def split_documents(trace: Trace, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random train/test split of the trace's document ids (sorted arrays); both sides non-empty."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    docs = trace.documents()
    if len(docs) < 2:
        raise DataError(f"{trace.path}: {len(docs)} document(s): a document split needs at least 2")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(docs)
    n_test = min(max(1, round(test_fraction * len(docs))), len(docs) - 1)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def write_subset(
    trace: Trace, documents: np.ndarray, output: str | Path, *, overwrite: bool = False, note: str = ""
) -> Trace:
    """Copy the rows of ``documents`` (every column) into a new trace at ``output``, streaming.

    The manifest keeps the source's model, tokenizer, datasets and capture sections, and its
    ``source`` section names the parent trace and the documents kept (``note`` says why).
    """
    sub = trace.filter(documents=np.asarray(documents))
    m = trace.manifest
    source = {"tool": "moescope split", "parent": str(trace.path), "documents": len(documents), "note": note}
    with TraceWriter.create(
        output,
        trace.routing,
        columns=m["columns"],
        model=m.get("model"),
        tokenizer=m.get("tokenizer"),
        datasets=m.get("datasets"),
        capture=m.get("capture"),
        source=source,
        overwrite=overwrite,
    ) as writer:
        for b in sub.iter_batches():
            writer.append_batch(b, trace.labels)
            writer.commit(int(b.doc_id[-1]))
    return Trace.open(output)


def split_trace(
    trace: Trace, output: str | Path, *, test_fraction: float = 0.2, seed: int = 0, overwrite: bool = False
) -> tuple[Trace, Trace]:
    """Write ``output/train`` and ``output/test``: the :func:`split_documents` halves of ``trace``."""
    train_docs, test_docs = split_documents(trace, test_fraction, seed)
    note = f"test_fraction={test_fraction}, seed={seed}"
    output = Path(output)
    train = write_subset(trace, train_docs, output / "train", overwrite=overwrite, note=f"train half, {note}")
    test = write_subset(trace, test_docs, output / "test", overwrite=overwrite, note=f"test half, {note}")
    return train, test


def same_trace(a: Trace, b: Trace) -> bool:
    """Whether two :class:`Trace` objects read the same trace on disk (views of it included)."""
    return a.path.resolve() == b.path.resolve() and a.manifest.get("created") == b.manifest.get("created")


def shared_documents(a: Trace, b: Trace) -> np.ndarray:
    """Documents both traces hold when they read the same trace on disk (sorted; empty otherwise)."""
    if not same_trace(a, b):
        return np.array([], np.int64)
    return np.intersect1d(a.documents(), b.documents())


def fit_record(
    trace: Trace, train_documents: Any, test_documents: Any, seed: int | None = None
) -> dict[str, Any]:
    """What an estimator fitted on ``trace``'s ``train_documents`` keeps, so scoring can hold the rest out.

    :func:`held_out` reads it back; ``moescope predict fit`` stores it in the model file's header.
    """
    return {
        "trace": str(trace.path.resolve()),
        "trace_created": trace.manifest.get("created"),
        "trace_tokens": trace.num_tokens,
        "train_documents": len(train_documents),
        "test_documents": [int(d) for d in test_documents],
        "split_seed": seed,
    }


@dataclass
class Scoring:
    """The part of a trace that may be scored: ``trace`` (maybe a view), what it is, and a warning."""

    trace: Trace
    scored: str
    warning: str | None = None


def held_out(
    trace: Trace, record: dict[str, Any], documents: str = "test", what: str = "the model"
) -> Scoring:
    """Restrict scoring on the training trace to its held-out documents.

    ``record`` is the :func:`fit_record` of what is scored. On another trace every document is
    scored. On the trace it was fitted on, ``documents="test"`` keeps the held-out documents (and
    refuses when none were held out) and ``documents="all"`` scores everything with a warning,
    since training documents flatter it.
    """
    if documents not in ("test", "all"):
        raise ConfigError(f"documents must be 'test' or 'all', got {documents!r}")
    same = record.get("trace") == str(trace.path.resolve()) and record.get(
        "trace_created"
    ) == trace.manifest.get("created")
    if not same:
        return Scoring(trace, "all documents")
    if documents == "all":
        return Scoring(
            trace,
            "all documents",
            "scoring the training documents too (documents='all'): numbers are optimistic",
        )
    test_docs = record.get("test_documents") or []
    if not test_docs:
        raise ConfigError(
            f"{what} was fitted on every document of {trace.path} (no held-out split): score it on another trace"
        )
    return Scoring(trace.filter(documents=test_docs), f"{len(test_docs)} held-out documents")
