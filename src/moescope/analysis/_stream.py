"""One streaming pass over a trace, shared by every analysis.

Each analysis is an *accumulator* (:class:`~moescope.analysis.base.Accumulator`): it names the
columns it needs, folds each :class:`View` (a batch restricted to the chosen MoE layers, with the
missing-routing mask computed once) into fixed-size counters, merges exactly with another of its
kind, and turns the counters into DataFrames at the end. :func:`run_pass` reads the union of the
columns once for all accumulators, so ``moescope analyze`` pays for one read of the trace and
memory stays flat whatever its length; :mod:`moescope.analysis.parallel` runs it over shard groups
in several processes (or on Ray) and merges.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from math import comb

import numpy as np

from moescope.analysis.base import Accumulator
from moescope.errors import ConfigError, DataError
from moescope.trace.reader import Batch, Trace

__all__ = ["Accumulator", "ExactSum", "PassContext", "View", "iter_views", "row_uniform", "run_pass"]


def resolve_layers(trace: Trace, layers: Iterable[int] | None, option: str = "layers") -> list[int]:
    """Column indices of the requested MoE layers, given as *decoder-layer* indices.

    ``None`` means every MoE layer. An index that is not an MoE layer raises :class:`ConfigError`
    naming the option and listing the MoE layers.
    """
    moe = trace.moe_layers
    if layers is None:
        return list(range(len(moe)))
    wanted = list(layers)
    bad = [x for x in wanted if x not in moe]
    if bad:
        raise ConfigError(f"{option}: {bad} not MoE layer(s) of this trace; its MoE layers are {moe}")
    if not wanted:
        raise ConfigError(f"{option}: no layer selected")
    return sorted({moe.index(x) for x in wanted})


def subset_rank_table(num_experts: int, k: int) -> np.ndarray:
    """``table[v, j] = C(v, j + 1)``: ranks sorted k-subsets in the combinatorial number system."""
    t = np.zeros((num_experts + 1, k), dtype=np.int64)
    for v in range(num_experts + 1):
        for j in range(k):
            t[v, j] = comb(v, j + 1)
    return t


def subset_ranks(experts: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Colex rank in ``0..C(E,k)-1`` of each expert set; ``experts`` is ``(..., k)``, any slot order."""
    srt = np.sort(experts, axis=-1)  # (..., k)
    k = srt.shape[-1]
    return table[srt, np.arange(k)].sum(-1)


def subset_from_rank(rank: int, num_experts: int, k: int) -> tuple[int, ...]:
    """Inverse of :func:`subset_ranks` for one rank: the sorted expert ids."""
    out = []
    v = num_experts
    for j in range(k, 0, -1):
        v -= 1
        while comb(v, j) > rank:
            v -= 1
        out.append(v)
        rank -= comb(v, j)
    return tuple(sorted(out))


def subset_name(rank: int, num_experts: int, k: int) -> str:
    return "-".join(str(e) for e in subset_from_rank(rank, num_experts, k))


@dataclass
class View:
    """A batch restricted to the selected MoE layers (``Ls`` of them), ready for counting.

    ``experts`` is ``(n, Ls, k)`` int64 with missing slots set to 0 and ``valid`` ``(n, Ls)`` False
    there, so that indices stay in range and every counter masks with ``valid``. In a variable-k
    strategy trace (``capture.variable_k``), ``slots`` ``(n, Ls, k)`` marks the slots a token used
    (padding is False) and ``valid`` is "at least one slot used"; elsewhere ``slots`` is ``None``.
    """

    n: int
    experts: np.ndarray  # (n, Ls, k) int64
    valid: np.ndarray  # (n, Ls) bool
    batch: Batch
    weights: np.ndarray | None = None  # (n, Ls, k) float32
    logits: np.ndarray | None = None  # (n, Ls, E) float32
    logit_valid: np.ndarray | None = None  # (n, Ls) bool: valid routing and finite logits
    slots: np.ndarray | None = None  # (n, Ls, k) bool, variable-k traces only
    _softmax: np.ndarray | None = None

    def slot_mask(self) -> np.ndarray:
        """``(n, Ls, k)`` bool: the slots to count (padding and missing routing excluded)."""
        if self.slots is not None:
            return self.slots
        return np.broadcast_to(self.valid[..., None], self.experts.shape)

    def softmax(self) -> np.ndarray:
        """Softmax of the logits over experts, computed once per batch and shared; ``(n, Ls, E)``."""
        if self._softmax is None:
            if self.logits is None:
                raise DataError("internal: softmax() asked of a batch read without logits")
            z = self.logits - self.logits.max(-1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(-1, keepdims=True)
            self._softmax = z
        return self._softmax


@dataclass
class PassContext:
    """Facts every accumulator needs about the trace and the selection."""

    trace: Trace
    cols: list[int]  # MoE column indices
    E: int
    k: int
    ordered: bool
    labels: list[str]
    notes: list[str] = field(default_factory=list)
    variable_k: bool = False  # a strategy trace: tokens use 0..k experts, the rest of a row is padding

    @property
    def layer_ids(self) -> list[int]:
        """Decoder-layer index of each selected column."""
        return [self.trace.moe_layers[c] for c in self.cols]

    @property
    def Ls(self) -> int:
        return len(self.cols)


def make_context(trace: Trace, layers: Iterable[int] | None = None) -> PassContext:
    return PassContext(
        trace=trace,
        cols=resolve_layers(trace, layers),
        E=trace.num_experts,
        k=trace.top_k,
        ordered=trace.ranked,
        labels=trace.labels,
        variable_k=is_variable_k(trace),
    )


def is_variable_k(trace: Trace) -> bool:
    """Whether the trace records a variable number of experts per token (``capture.variable_k``)."""
    return bool(trace.manifest.get("capture", {}).get("variable_k"))


def require(trace: Trace, column: str, analysis: str) -> None:
    """Raise :class:`DataError` naming the analysis when the trace lacks an optional column."""
    have = {"weights": trace.has_weights, "logits": trace.has_logits}
    if column in have and not have[column]:
        raise DataError(
            f"{trace.path}: {analysis} needs the {column!r} column, which this trace does not have"
        )


def iter_views(
    ctx: PassContext, columns: set[str], batch_size: int = 65536, source: Trace | None = None
) -> Iterator[View]:
    """The :class:`View` of each batch of ``source`` (default ``ctx.trace``), read with ``columns``.

    Batches never span shards, so a shard yields the same views whichever shards are read with it.
    """
    trace = ctx.trace if source is None else source
    cols = {"experts", *columns}
    order = [
        c
        for c in ("doc_id", "position", "token_id", "label", "token", "experts", "weights", "logits")
        if c in cols
    ]
    sel = np.asarray(ctx.cols)
    all_layers = ctx.Ls == trace.num_layers
    missing = trace.missing_id
    variable_k = is_variable_k(trace)
    for batch in trace.iter_batches(order, batch_size=batch_size):
        ex = batch.experts if all_layers else batch.experts[:, sel]
        bad = ex == missing  # (n, Ls, k)
        slots = ~bad if variable_k else None  # padding is masked slot by slot
        valid = slots.any(-1) if variable_k else ~bad.any(-1)
        ex = ex.astype(np.int64)
        if bad.any():
            ex[bad] = 0
        view = View(n=len(ex), experts=ex, valid=valid, batch=batch, slots=slots)
        if batch.weights is not None:
            view.weights = batch.weights if all_layers else batch.weights[:, sel]
        if batch.logits is not None:
            lg = batch.logits if all_layers else batch.logits[:, sel]
            view.logits = lg.astype(np.float32)
            view.logit_valid = valid & np.isfinite(view.logits).all(-1)
        yield view


def run_pass(
    ctx: PassContext,
    accumulators: Sequence[Accumulator],
    batch_size: int = 65536,
    progress: bool = False,
    *,
    source: Trace | None = None,
    allow_empty: bool = False,
) -> int:
    """Stream the trace once, feeding each batch (restricted to ``ctx.cols``) to every accumulator.

    ``source`` reads another view of the trace (a group of its shards) while ``ctx`` keeps the whole
    trace's facts; ``allow_empty`` accepts a source without rows. Returns the number of rows read.
    """
    trace = ctx.trace if source is None else source
    cols: set[str] = set()
    for acc in accumulators:
        cols |= acc.columns
    seen = 0
    total = trace.num_tokens if progress else 0
    for view in iter_views(ctx, cols, batch_size, source):
        for acc in accumulators:
            acc.update(view)
        seen += view.n
        if progress:
            sys.stderr.write(f"\ranalyze: {seen}/{total} tokens")
            sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    if seen == 0 and not allow_empty and not trace.manifest.get("counts"):  # counts-only: totals, no rows
        raise DataError(f"{trace.path}: no tokens to analyse (empty trace or filter)")
    return seen


#: Fixed-point scale of :class:`ExactSum`: every finite float64 is an integer multiple of 2**-1074,
#: and 53 more bits keep the mantissa shift non-negative for subnormals.
FIXED_BITS = 1127


class ExactSum:
    """Exact running sums of float64 arrays of one shape: adding in any grouping gives the same bits.

    Each finite value is added as an exact integer multiple of ``2**-1127`` (Python integers), and
    :meth:`value` rounds once, correctly, to float64. Infinities and NaN are summed apart (their sum
    does not depend on the order either) and win over the finite part. Used for the float sums of the
    accumulators, so that merging shard groups reproduces the one-process result exactly.
    """

    def __init__(self, shape: int | tuple[int, ...]) -> None:
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        size = int(np.prod(self.shape))
        self.fixed: list[int] = [0] * size
        self.special = np.zeros(size)

    def add(self, x: np.ndarray) -> None:
        """Add ``x`` (of :attr:`shape`, converted to float64) cell by cell."""
        x = np.asarray(x, np.float64).reshape(-1)
        if len(x) != len(self.fixed):
            raise ValueError(f"ExactSum of shape {self.shape} cannot add {x.size} values")
        fin = np.isfinite(x)
        if not fin.all():
            self.special += np.where(fin, 0.0, x)
            x = np.where(fin, x, 0.0)
        m, e = np.frexp(x)
        mant = (m * 9007199254740992.0).astype(np.int64).tolist()  # m * 2**53: exact
        shift = (e + (FIXED_BITS - 53)).tolist()
        f = self.fixed
        for i in np.flatnonzero(x).tolist():
            f[i] += mant[i] << shift[i]

    def merge(self, other: ExactSum) -> None:
        self.fixed = [a + b for a, b in zip(self.fixed, other.fixed, strict=True)]
        self.special = self.special + other.special

    def value(self) -> np.ndarray:
        """The sums, each correctly rounded to float64, in :attr:`shape`."""
        scale = 1 << FIXED_BITS
        out = np.array([f / scale for f in self.fixed], np.float64)
        out = np.where(self.special != 0, self.special, out)  # NaN != 0 too
        return out.reshape(self.shape)


_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_uniform(doc_id: np.ndarray, position: np.ndarray, seed: int) -> np.ndarray:
    """A number in [0, 1) per row from a hash of (seed, document id, position).

    Samples drawn with it (``row_uniform(...) < rate``) pick the same rows whatever the batch size,
    the shard grouping or the order in which workers finish, unlike a generator consumed in arrival
    order; different seeds give independent-looking samples.
    """
    with np.errstate(over="ignore"):
        s = _mix64(np.asarray([seed], np.int64).astype(np.uint64) * _GOLD + _GOLD)
        d = _mix64(np.asarray(doc_id, np.int64).astype(np.uint64) + s)
        x = _mix64(d ^ (np.asarray(position, np.int64).astype(np.uint64) * _GOLD))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def bincount(idx: np.ndarray, size: int, weights: np.ndarray | None = None) -> np.ndarray:
    """``np.bincount`` with a fixed length (float when weighted, int64 otherwise)."""
    return np.bincount(idx.ravel(), weights=None if weights is None else weights.ravel(), minlength=size)


def consecutive_pairs(
    doc: np.ndarray, pos: np.ndarray, carry: tuple[int, int] | None
) -> tuple[np.ndarray, bool]:
    """Which rows ``i >= 1`` follow row ``i-1`` in the same document, and whether row 0 follows ``carry``.

    Rows pair only when the document is the same and the position advances by exactly one, so the
    last token of a document never pairs with the first of the next, and gaps (filtered or dropped
    rows) break the chain.
    """
    within = (doc[1:] == doc[:-1]) & (pos[1:] == pos[:-1] + 1)  # (n-1,)
    first = carry is not None and len(doc) > 0 and doc[0] == carry[0] and pos[0] == carry[1] + 1
    return within, bool(first)


def entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in bits of distributions along ``axis`` (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return -t.sum(axis)


def check_same_model(a: Trace, b: Trace) -> None:
    """Two traces are comparable only with the same experts, top-k and MoE layers."""
    for name in ("num_experts", "top_k", "moe_layers"):
        if getattr(a, name) != getattr(b, name):
            raise ConfigError(
                f"--compare: {b.path} has {name}={getattr(b, name)} but {a.path} has {getattr(a, name)}"
            )
