"""Split a trace by document into train and test traces (never by token: a document's tokens share context)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moescope.errors import ConfigError, DataError
from moescope.trace.reader import Trace
from moescope.trace.writer import TraceWriter


def split_documents(trace: Trace, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random train/test split of the trace's document ids (sorted arrays); both sides non-empty."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"--test-fraction must be in (0, 1), got {test_fraction}")
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
        labels = np.asarray([*trace.labels, ""], dtype=object)
        for b in sub.iter_batches():
            writer.append(
                doc_id=b.doc_id,
                position=b.position,
                token_id=b.token_id,
                label=list(labels[b.label]),
                experts=b.experts,
                weights=b.weights,
                logits=b.logits,
                lookahead=b.lookahead or None,
                token=b.token,
                doc_loss=b.doc_loss,
            )
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
