"""What an analysis is to ``moescope analyze``: an object that computes, saves and summarises itself.

An :class:`Analysis` adds accumulators to the one streaming pass (:func:`~moescope.analysis._stream.run_pass`),
then writes its tables and figures through the :class:`AnalysisRun` it is given and returns the few
numbers that go into ``summary.json``; :meth:`Analysis.describe` turns those numbers into the line
``moescope analyze`` prints. The list of analyses is :data:`moescope.analysis.suite.ANALYSES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from moescope.analysis._stream import PassContext, View
    from moescope.trace.reader import Trace


class Accumulator(Protocol):
    """What the streaming pass drives: the columns it needs, a fold step, a merge and a result.

    ``merge(other)`` folds the state of ``other`` (an accumulator built the same way, which saw the
    rows that come *after* this one's in trace order) into ``self``. State has a fixed size (or a
    bounded one: samples), and merging is exact: folding the shards of a trace in groups and merging
    the groups in order gives the same bits as one pass, whatever the grouping. So counters are
    integers, float sums are kept exactly (:class:`~moescope.analysis._stream.ExactSum`), samples are
    drawn per row from a hash of (seed, document, position), never from arrival order, and state that
    spans consecutive rows (pairs of tokens, per-document counts) carries its first and last rows so
    that a document split between two groups is joined at the merge.
    """

    columns: set[str]

    def update(self, view: View) -> None: ...

    def merge(self, other: Any) -> None: ...

    def result(self) -> Any: ...


@dataclass
class AnalysisRun:
    """One run of the analyses on a trace: inputs, options, and where files go.

    ``results`` lets a later analysis reuse an earlier one's frame (density reads load's table).
    """

    trace: Trace
    trace_path: Path
    ctx: PassContext
    opts: Any  # AnalyzeOptions
    out: Path
    target: int
    other: Trace | None = None
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        """Parameters written beside every figure."""
        return {
            "trace": str(self.trace_path),
            "k": self.ctx.k,
            "num_experts": self.ctx.E,
            "seed": self.opts.seed,
        }

    def table(self, df: Any, name: str) -> None:
        """Save ``df`` as ``name.csv`` in the output folder."""
        from moescope.core.figures import save_table

        self.files.append(save_table(df, self.out / f"{name}.csv").name)

    def figure(self, fig: Any, df: Any, name: str, **extra: Any) -> None:
        """Save ``fig`` as ``name.png`` beside ``name.csv`` (``df``) and ``name.json`` (parameters)."""
        from moescope.core.figures import save_figure

        self.files.extend(p.name for p in save_figure(fig, df, self.out / name, {**self.params, **extra}))


class Analysis:
    """Base of every analysis; subclasses set ``name`` and implement :meth:`accumulators` and :meth:`finish`."""

    name: ClassVar[str] = "base"
    needs_logits: ClassVar[bool] = False  # skipped, with a note, on traces without router logits
    selectable: ClassVar[bool] = True  # False: runs when its option is given (``compare``)
    reads_counts: ClassVar[bool] = False  # True: also runs on a counts-only trace (no rows, only totals)

    def skip_reason(self, run: AnalysisRun) -> str | None:
        """Why this analysis cannot run on ``run.trace`` (a note in ``summary.json``), or None."""
        if self.needs_logits and not run.trace.has_logits:
            return f"{self.name} skipped: the trace has no 'logits' column"
        if run.trace.manifest.get("counts") and not self.reads_counts:
            return f"{self.name} skipped: a counts-only trace has per-expert counts, no token rows"
        return None

    def accumulators(self, run: AnalysisRun) -> list[Any]:
        """Accumulators to fold into the shared streaming pass (kept on ``self`` for :meth:`finish`)."""
        return []

    def finish(self, run: AnalysisRun) -> dict[str, Any] | None:
        """Write tables and figures after the pass; return this analysis's entry of ``summary.json``."""
        raise NotImplementedError

    @staticmethod
    def describe(entry: dict[str, Any]) -> str:
        """One line a person can read from the summary entry."""
        return ""


def fmt(x: Any, spec: str = ".3f") -> str:
    """A number for a summary line; ``-`` for a missing one."""
    return "-" if x is None else format(x, spec)
