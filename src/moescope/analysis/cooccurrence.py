"""Co-occurrence of expert choices between layers, and co-activation inside a layer (seed 000).

Between layers ``L`` and ``L+d`` a token's choice is a symbol from one of two alphabets: the k-subset
of experts (``subset``; C(8,2) = 28 symbols, used when C(E,k) <= ``max_alphabet``) or, for large
E, the single experts (``expert``: each token contributes its k x k slot pairs, weight 1 each).
From the count matrix come three normalisations (row: P(j at L+d | i at L), column: P(i | j),
joint: P(i, j)), the lift P(i, j) / (P(i) P(j)), pointwise MI, and total MI in bits.

Total MI is the plug-in estimate, biased upwards: for independent choices its expectation is about
``(K_ij - K_i - K_j + 1) / (2 N ln 2)`` bits (Miller-Madow; K are non-empty cells, N the samples),
reported as ``mi_bias_bits`` with ``mi_corrected_bits`` = plug-in minus that. In ``expert`` mode the
k^2 pairs of a token are not independent samples, so the bias there is indicative only.

Layer pairs are taken among the selected MoE layers, ``d`` steps apart in the selection (all MoE
layers by default, so ``d = 1`` is each layer against the next MoE layer).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from math import comb
from typing import Any

import numpy as np
import polars as pl

from moescope.analysis._stream import (
    PassContext,
    View,
    bincount,
    entropy_bits,
    make_context,
    run_pass,
    subset_name,
    subset_rank_table,
    subset_ranks,
)
from moescope.errors import ConfigError
from moescope.trace.reader import Trace

MAX_ALPHABET = 300


def choose_alphabet(
    E: int, k: int, alphabet: str = "auto", max_alphabet: int = MAX_ALPHABET, variable_k: bool = False
) -> str:
    """``subset`` when C(E,k) <= ``max_alphabet`` (or asked), else ``expert``.

    A variable-k strategy trace has expert sets of different sizes, so the k-subset alphabet is
    undefined: ``auto`` gives ``expert`` there, and asking for ``subset`` is an error.
    """
    if alphabet not in ("auto", "subset", "expert"):
        raise ConfigError(f"alphabet must be auto, subset or expert, got {alphabet!r}")
    if variable_k:
        if alphabet == "subset":
            raise ConfigError(
                "alphabet subset: a variable-k strategy trace has expert sets of different sizes; use expert"
            )
        return "expert"
    if alphabet == "auto":
        return "subset" if comb(E, k) <= max_alphabet else "expert"
    if alphabet == "subset" and comb(E, k) > 4096:
        raise ConfigError(f"alphabet subset: C({E},{k}) = {comb(E, k)} symbols is too many; use expert")
    return alphabet


class TransitionAccumulator:
    """Count matrices (A x A) for every selected layer pair at each distance."""

    def __init__(
        self,
        ctx: PassContext,
        distances: Sequence[int] = (1,),
        alphabet: str = "auto",
        max_alphabet: int = MAX_ALPHABET,
    ) -> None:
        self.ctx = ctx
        self.columns = {"experts"}
        self.mode = choose_alphabet(ctx.E, ctx.k, alphabet, max_alphabet, ctx.variable_k)
        self.A = comb(ctx.E, ctx.k) if self.mode == "subset" else ctx.E
        self.table = subset_rank_table(ctx.E, ctx.k)
        bad = [d for d in distances if d < 1]
        if bad:
            raise ConfigError(f"distances must be >= 1, got {bad}")
        self.distances = [d for d in distances if d < ctx.Ls]
        self.pairs = [(i, i + d, d) for d in self.distances for i in range(ctx.Ls - d)]
        self.counts = np.zeros(len(self.pairs) * self.A * self.A, np.int64)

    def update(self, v: View) -> None:
        A, off = self.A, 0
        sym = subset_ranks(v.experts, self.table) if self.mode == "subset" else None  # (n, Ls)
        for d in self.distances:
            npair = self.ctx.Ls - d
            base = (off + np.arange(npair)) * A * A  # (npair,)
            ok = v.valid[:, :-d] & v.valid[:, d:]  # (n, npair)
            if self.mode == "subset":
                key = base[None, :] + sym[:, :-d] * A + sym[:, d:]
                self.counts += bincount(key[ok], len(self.counts))
            else:
                a = v.experts[:, :-d, :, None]  # (n, npair, k, 1)
                b = v.experts[:, d:, None, :]  # (n, npair, 1, k)
                key = base[None, :, None, None] + a * A + b  # (n, npair, k, k)
                if v.slots is not None:  # variable k: only slots both tokens used
                    ok = v.slots[:, :-d, :, None] & v.slots[:, d:, None, :]
                self.counts += bincount(key[ok], len(self.counts))
            off += npair

    def merge(self, other: TransitionAccumulator) -> None:
        self.counts = self.counts + other.counts

    def matrices(self) -> np.ndarray:
        """Counts ``(pairs, A, A)``, in the order of :attr:`pairs`."""
        return self.counts.reshape(len(self.pairs), self.A, self.A)

    def symbol_names(self) -> list[str]:
        if self.mode == "subset":
            return [subset_name(r, self.ctx.E, self.ctx.k) for r in range(self.A)]
        return [str(e) for e in range(self.A)]

    def result(self) -> dict[str, pl.DataFrame]:
        ids = self.ctx.layer_ids
        mats = self.matrices()
        names = np.asarray(self.symbol_names())
        cells, summary = [], []
        for p, (i, j, d) in enumerate(self.pairs):
            c = mats[p]
            s = summarise_counts(c)
            summary.append(
                {"layer_from": ids[i], "layer_to": ids[j], "distance": d, "alphabet": self.mode, **s}
            )
            frame = transition_frame(c)
            frame = frame.with_columns(
                pl.lit(ids[i], pl.Int32).alias("layer_from"),
                pl.lit(ids[j], pl.Int32).alias("layer_to"),
                pl.lit(d, pl.Int32).alias("distance"),
                pl.Series("symbol_from", names[frame["i"].to_numpy()]),
                pl.Series("symbol_to", names[frame["j"].to_numpy()]),
            )
            cells.append(frame)
        first = ["layer_from", "layer_to", "distance", "i", "j", "symbol_from", "symbol_to"]
        cells_df = pl.concat(cells) if cells else pl.DataFrame()
        if cells:
            cells_df = cells_df.select(first + [c for c in cells_df.columns if c not in first])
        return {"cells": cells_df, "summary": pl.DataFrame(summary)}


def transition_frame(c: np.ndarray) -> pl.DataFrame:
    """Non-zero cells of one count matrix with row, column and joint normalisations, lift and PMI."""
    c = np.asarray(c, np.float64)
    n = c.sum()
    row = c.sum(1, keepdims=True)
    col = c.sum(0, keepdims=True)
    i, j = np.nonzero(c)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_row = (c / row)[i, j]
        p_col = (c / col)[i, j]
        joint = c[i, j] / n
        lift = joint / ((row[i, 0] / n) * (col[0, j] / n))
    return pl.DataFrame(
        {
            "i": i.astype(np.int32),
            "j": j.astype(np.int32),
            "count": c[i, j].astype(np.int64),
            "p_row": p_row,
            "p_col": p_col,
            "p_joint": joint,
            "lift": lift,
            "pmi_bits": np.log2(lift),
        }
    )


def summarise_counts(c: np.ndarray) -> dict[str, float]:
    """MI (plug-in, bits), its Miller-Madow bias and corrected value, marginal entropies, NMI."""
    c = np.asarray(c, np.float64)
    n = c.sum()
    if n == 0:
        return {
            "samples": 0,
            "mi_bits": None,
            "mi_bias_bits": None,
            "mi_corrected_bits": None,
            "h_from_bits": None,
            "h_to_bits": None,
            "nmi": None,
        }
    pj = c / n
    pi, pk = pj.sum(1), pj.sum(0)
    h_from, h_to, h_joint = float(entropy_bits(pi)), float(entropy_bits(pk)), float(entropy_bits(pj.ravel()))
    mi = max(0.0, h_from + h_to - h_joint)
    kij, ki, kj = np.count_nonzero(c), np.count_nonzero(pi), np.count_nonzero(pk)
    bias = max(0.0, (kij - ki - kj + 1) / (2 * n * np.log(2)))
    return {
        "samples": int(n),
        "mi_bits": mi,
        "mi_bias_bits": bias,
        "mi_corrected_bits": mi - bias,
        "h_from_bits": h_from,
        "h_to_bits": h_to,
        "nmi": mi / min(h_from, h_to) if min(h_from, h_to) > 0 else None,
    }


def layer_transitions(
    trace: Trace,
    layers: Iterable[int] | None = None,
    *,
    distances: Sequence[int] = (1,),
    alphabet: str = "auto",
    max_alphabet: int = MAX_ALPHABET,
    batch_size: int = 65536,
) -> dict[str, pl.DataFrame]:
    """Transition counts between layer pairs: ``cells`` (non-zero cells with all normalisations) and
    ``summary`` (per pair: samples, MI bits with plug-in bias, marginal entropies, NMI).

    Examples
    --------
    >>> res = layer_transitions(Trace.open("runs/t"), distances=[1, 2])  # doctest: +SKIP
    >>> res["summary"].select("layer_from", "layer_to", "mi_bits")  # doctest: +SKIP
    """
    ctx = make_context(trace, layers)
    acc = TransitionAccumulator(ctx, distances, alphabet, max_alphabet)
    run_pass(ctx, [acc], batch_size)
    return acc.result()


class CoactivationAccumulator:
    """Per layer: tokens choosing a, and tokens choosing both a and b (a != b)."""

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx
        self.columns = {"experts"}
        k = ctx.k
        s, t = np.nonzero(~np.eye(k, dtype=bool))
        self.s, self.t = s, t
        self.pair = np.zeros(ctx.Ls * ctx.E * ctx.E, np.int64)
        self.single = np.zeros(ctx.Ls * ctx.E, np.int64)
        self.tokens = np.zeros(ctx.Ls, np.int64)
        # per layer, sum over tokens of c and of c(c - 1), c the token's expert count (the null's parts)
        self.slots = np.zeros(ctx.Ls, np.int64)
        self.ordered_pairs = np.zeros(ctx.Ls, np.int64)

    def update(self, v: View) -> None:
        E, Ls = self.ctx.E, self.ctx.Ls
        lay = np.arange(Ls)[None, :, None]
        ex = v.experts
        ok = v.valid
        self.tokens += ok.sum(0)
        if v.slots is None:
            self.single += bincount((lay * E + ex)[ok], Ls * E)
            if len(self.s):
                key = (lay * E + ex[..., self.s]) * E + ex[..., self.t]  # (n, Ls, k(k-1))
                self.pair += bincount(key[ok], Ls * E * E)
            return
        m = v.slots  # variable k: padding slots take part in no pair
        c = m.sum(-1)  # (n, Ls)
        self.slots += c.sum(0)
        self.ordered_pairs += (c * (c - 1)).sum(0)
        self.single += bincount(np.broadcast_to(lay * E, ex.shape)[m] + ex[m], Ls * E)
        if len(self.s):
            key = (lay * E + ex[..., self.s]) * E + ex[..., self.t]
            self.pair += bincount(key[m[..., self.s] & m[..., self.t]], Ls * E * E)

    def merge(self, other: CoactivationAccumulator) -> None:
        self.pair, self.single = self.pair + other.pair, self.single + other.single
        self.tokens = self.tokens + other.tokens
        self.slots, self.ordered_pairs = self.slots + other.slots, self.ordered_pairs + other.ordered_pairs

    def result(self) -> pl.DataFrame:
        ctx = self.ctx
        E, Ls, k = ctx.E, ctx.Ls, ctx.k
        pair = self.pair.reshape(Ls, E, E)
        single = self.single.reshape(Ls, E)
        null = (k - 1) / (E - 1) if E > 1 else np.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            if ctx.variable_k:  # random sets of each token's own size: sum c(c-1) / (sum c * (E - 1))
                null = (self.ordered_pairs / (self.slots * (E - 1)))[:, None, None] if E > 1 else null
            cond = pair / single[:, :, None]
            lift = cond / null
        lay, a, b = np.meshgrid(np.arange(Ls), np.arange(E), np.arange(E), indexing="ij")
        off = a != b
        return pl.DataFrame(
            {
                "layer": np.asarray(ctx.layer_ids, np.int32)[lay[off]],
                "a": a[off].astype(np.int32),
                "b": b[off].astype(np.int32),
                "count_ab": pair[off],
                "count_a": single[lay[off], a[off]],
                "p_b_given_a": cond[off],
                "null_p_b_given_a": np.broadcast_to(np.asarray(null, np.float64), (Ls, E, E))[off],
                "ratio_to_null": lift[off],
            }
        ).with_columns(pl.col("p_b_given_a", "ratio_to_null").fill_nan(None))


def coactivation(
    trace: Trace, layers: Iterable[int] | None = None, *, batch_size: int = 65536
) -> pl.DataFrame:
    """Intra-layer co-activation P(b | a) over all ordered pairs of a token's k chosen experts.

    Under uniform random k-subsets P(b | a) = (k - 1) / (E - 1) (column ``null_p_b_given_a``);
    ``ratio_to_null`` is P(b | a) over that null.
    """
    ctx = make_context(trace, layers)
    acc = CoactivationAccumulator(ctx)
    run_pass(ctx, [acc], batch_size)
    return acc.result()


def transition_matrix(
    cells: pl.DataFrame, layer_from: int, layer_to: int, value: str, size: int
) -> np.ndarray:
    """Dense ``(A, A)`` matrix of one pair's ``value`` column (zeros where no count; NaN lift/PMI there)."""
    g = cells.filter((pl.col("layer_from") == layer_from) & (pl.col("layer_to") == layer_to))
    if g.is_empty():
        raise ConfigError(f"no transitions from layer {layer_from} to layer {layer_to} in this result")
    fill = np.nan if value in ("lift", "pmi_bits") else 0.0
    m = np.full((size, size), fill)
    m[g["i"].to_numpy(), g["j"].to_numpy()] = g[value].to_numpy()
    return m


def plot_transition(
    cells: pl.DataFrame,
    layer_from: int,
    layer_to: int,
    value: str,
    names: Sequence[str],
    min_count: int = 10,
):
    """Heatmap of one layer pair: ``value`` in p_row, p_col, p_joint, lift, pmi_bits or count.

    Seed 000's pitfall is built in: a conditional map (``p_row``: P(j | i), ``p_col``: P(i | j))
    writes each row's (column's) count beside it and greys out the rows (columns) seen fewer than
    ``min_count`` times, whose near-1 conditionals rest on a handful of tokens; the joint map
    (``p_joint``, ``count``) uses a log colour scale so that rare paths stay visible next to frequent ones.
    """
    if value in ("p_row", "p_col", "p_joint", "count"):
        return plot_transition_pitfall(cells, layer_from, layer_to, value, names, min_count)
    from moescope.core.figures import heatmap

    m = transition_matrix(cells, layer_from, layer_to, value, len(names))
    titles = {
        "p_row": f"P(j at layer {layer_to} | i at layer {layer_from})",
        "p_col": f"P(i at layer {layer_from} | j at layer {layer_to})",
        "p_joint": f"P(i at layer {layer_from}, j at layer {layer_to})",
        "lift": "lift P(i,j) / (P(i) P(j))",
        "pmi_bits": "pointwise MI (bits)",
        "count": "count",
    }
    center = {"lift": 1.0, "pmi_bits": 0.0}.get(value)
    return heatmap(
        m,
        xlabel=f"j (layer {layer_to})",
        ylabel=f"i (layer {layer_from})",
        title=titles[value],
        cbar=value,
        xticklabels=names,
        yticklabels=names,
        center=center,
    )


def _matrix_or_zeros(
    cells: pl.DataFrame, layer_from: int, layer_to: int, value: str, size: int
) -> np.ndarray:
    """:func:`transition_matrix`, or zeros for a pair without any count (a masked series)."""
    try:
        return transition_matrix(cells, layer_from, layer_to, value, size)
    except ConfigError:
        return np.zeros((size, size))


def _margins(cells: pl.DataFrame, layer_from: int, layer_to: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column counts of one pair's count matrix."""
    c = transition_matrix(cells, layer_from, layer_to, "count", size)
    return c.sum(1), c.sum(0)


def plot_transition_pitfall(
    cells: pl.DataFrame,
    layer_from: int,
    layer_to: int,
    value: str,
    names: Sequence[str],
    min_count: int = 10,
    ax: Any = None,
    labels: bool = True,
):
    """One pair's conditional (row or column normalised) or joint map, with counts and grey-outs."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    A = len(names)
    m = transition_matrix(cells, layer_from, layer_to, value, A)
    rows, cols = _margins(cells, layer_from, layer_to, A)
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(15, 3.8 + 0.3 * A), min(13, 2.8 + 0.3 * A)))
    else:
        fig = ax.figure
    ax.set_facecolor("0.85")
    shown = m.astype(float).copy()
    if value in ("p_joint", "count"):
        shown[shown <= 0] = np.nan
        pos = shown[np.isfinite(shown)]
        lo = float(pos.min()) if pos.size else 1.0
        hi = float(pos.max()) if pos.size else 1.0
        norm = LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001))
        im = ax.imshow(shown, cmap="viridis", norm=norm, interpolation="nearest", aspect="auto")
        cb = "P(i, j), log scale" if value == "p_joint" else "tokens, log scale"
        title = f"Joint P(i at L{layer_from}, j at L{layer_to})" if value == "p_joint" else "Joint counts"
        title += " (grey: never seen)"
    else:
        few = (rows if value == "p_row" else cols) < min_count
        if value == "p_row":
            shown[few, :] = np.nan
        else:
            shown[:, few] = np.nan
        im = ax.imshow(shown, cmap="viridis", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        cb = "P(j at next | i)" if value == "p_row" else "P(i at previous | j)"
        what = "rows" if value == "p_row" else "columns"
        cond = (
            f"P(j at L{layer_to} | i at L{layer_from})"
            if value == "p_row"
            else f"P(i at L{layer_from} | j at L{layer_to})"
        )
        title = f"{cond}: {what} with < {min_count} tokens greyed out"
    fig.colorbar(im, ax=ax, label=cb, shrink=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"expert set j at layer {layer_to}")
    ax.set_ylabel(f"expert set i at layer {layer_from}")
    fs = 7 if A > 20 else 8
    if labels and A <= 64:
        ax.set_xticks(np.arange(A), labels=list(names), rotation=90, fontsize=fs)
        ax.set_yticks(np.arange(A), labels=list(names), fontsize=fs)
        if value in ("p_row", "p_col"):
            # each row's (column's) count beside it: how many tokens the conditional rests on
            if value == "p_row":
                twin = ax.secondary_yaxis("right")
                twin.set_yticks(np.arange(A), labels=[str(int(x)) for x in rows], fontsize=fs - 1)
                twin.set_ylabel("tokens in row i", fontsize=8)
            else:
                twin = ax.secondary_xaxis("top")
                twin.set_xticks(
                    np.arange(A), labels=[str(int(x)) for x in cols], fontsize=fs - 1, rotation=90
                )
                twin.set_xlabel("tokens in column j", fontsize=8)
    return fig


def plot_transition_grid(
    cells: pl.DataFrame, pairs: Sequence[tuple[int, int]], value: str, size: int, min_count: int = 10
):
    """Every layer pair's map in one figure (same colour scale; conditionals greyed under ``min_count``)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    n = len(pairs)
    ncols = min(6, max(1, n))
    nrows = -(-n // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(2.3 * ncols + 1.3, 2.3 * nrows + 0.9), squeeze=False)
    fig.subplots_adjust(
        left=0.05, right=0.86, bottom=0.05, top=1 - 0.7 / (2.3 * nrows + 0.9), wspace=0.35, hspace=0.5
    )
    axes = list(grid.ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    mats = [_matrix_or_zeros(cells, lf, lt, value, size).astype(float) for lf, lt in pairs]
    if value in ("p_joint", "count"):
        pos = np.concatenate([m[m > 0] for m in mats] + [np.array([1.0])])
        norm = LogNorm(vmin=float(pos.min()), vmax=max(float(pos.max()), float(pos.min()) * 1.0001))
    else:
        norm = None
    im = None
    for ax, (lf, lt), m in zip(axes, pairs, mats, strict=False):
        c = _matrix_or_zeros(cells, lf, lt, "count", size)
        if value == "p_row":
            m[c.sum(1) < min_count, :] = np.nan
        elif value == "p_col":
            m[:, c.sum(0) < min_count] = np.nan
        else:
            m[m <= 0] = np.nan
        ax.set_facecolor("0.85")
        im = ax.imshow(
            m,
            cmap="viridis",
            norm=norm,
            vmin=None if norm else 0,
            vmax=None if norm else 1,
            interpolation="nearest",
            aspect="auto",
        )
        ax.set_title(f"layer {lf} -> {lt}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"set at {lt}", fontsize=7)
        ax.set_ylabel(f"set at {lf}", fontsize=7)
    label = {
        "p_row": "P(j | i), rows < min count grey",
        "p_col": "P(i | j), columns < min count grey",
        "p_joint": "P(i, j), log scale",
        "count": "tokens, log scale",
    }[value]
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.89, 0.2, 0.015, 0.6)), label=label)
    fig.suptitle(f"Every adjacent layer pair: {label} (min count {min_count})")
    return fig


class TokenTransitionAccumulator:
    """Per layer: counts of (choice at token t, choice at token t+1) for consecutive tokens of a document.

    The consecutive-token counterpart of :class:`TransitionAccumulator` (seed 000: "entre token"),
    in the same alphabet, so the two maps can be set side by side.
    """

    def __init__(self, ctx: PassContext, alphabet: str = "auto", max_alphabet: int = MAX_ALPHABET) -> None:
        self.ctx = ctx
        self.columns = {"experts", "doc_id", "position"}
        self.mode = choose_alphabet(ctx.E, ctx.k, alphabet, max_alphabet, ctx.variable_k)
        self.A = comb(ctx.E, ctx.k) if self.mode == "subset" else ctx.E
        self.table = subset_rank_table(ctx.E, ctx.k)
        self.counts = np.zeros(ctx.Ls * self.A * self.A, np.int64)
        # (doc, position, symbols, valid) of the last row seen, and of the first (joined at a merge)
        self.carry: tuple[int, int, np.ndarray, np.ndarray] | None = None
        self.head: tuple[int, int, np.ndarray, np.ndarray] | None = None

    def _pair(self, a: tuple, b: tuple) -> None:
        """Count the pair (row ``a``, row ``b``) when ``b`` follows ``a`` in its document."""
        if b[0] == a[0] and b[1] == a[1] + 1:
            A = self.A
            base = np.arange(self.ctx.Ls) * A * A
            self.counts += bincount((base + a[2] * A + b[2])[a[3] & b[3]], len(self.counts))

    def merge(self, other: TokenTransitionAccumulator) -> None:
        if self.carry is not None and other.head is not None:
            self._pair(self.carry, other.head)
        self.counts = self.counts + other.counts
        self.head = self.head if self.head is not None else other.head
        self.carry = other.carry if other.carry is not None else self.carry

    def update(self, v: View) -> None:
        from moescope.analysis._stream import consecutive_pairs

        A, Ls = self.A, self.ctx.Ls
        if self.mode == "subset":
            sym = subset_ranks(v.experts, self.table)  # (n, Ls)
        else:
            sym = v.experts[..., 0]
        doc, pos = v.batch.doc_id, v.batch.position
        within, first = consecutive_pairs(doc, pos, self.carry[:2] if self.carry else None)
        base = (np.arange(Ls) * A * A)[None, :]
        ok = within[:, None] & v.valid[:-1] & v.valid[1:]
        self.counts += bincount((base + sym[:-1] * A + sym[1:])[ok], len(self.counts))
        if first and self.carry is not None:
            okf = self.carry[3] & v.valid[0]
            self.counts += bincount((base[0] + self.carry[2] * A + sym[0])[okf], len(self.counts))
        if v.n:
            if self.head is None:
                self.head = (int(doc[0]), int(pos[0]), sym[0].copy(), v.valid[0].copy())
            self.carry = (int(doc[-1]), int(pos[-1]), sym[-1].copy(), v.valid[-1].copy())

    def matrices(self) -> np.ndarray:
        """``(Ls, A, A)`` counts: row = choice at token t, column = choice at token t+1."""
        return self.counts.reshape(self.ctx.Ls, self.A, self.A)

    def result(self) -> pl.DataFrame:
        ids, mats, rows = self.ctx.layer_ids, self.matrices(), []
        for li, c in enumerate(mats):
            s = summarise_counts(c)
            rows.append({"layer": ids[li], "alphabet": self.mode, **s})
        return pl.DataFrame(rows)


def plot_layer_and_token_pairs(
    layer_counts: np.ndarray, token_counts: np.ndarray, names: Sequence[str], layer: int, next_layer: int
):
    """Side by side, log colour scale: layer L -> next layer for the same token, and token t -> t+1 at layer L."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    A = len(names)
    fig, axes = plt.subplots(1, 2, figsize=(min(26, 6 + 0.55 * A), min(13, 3 + 0.3 * A)))
    both = np.concatenate([layer_counts.ravel(), token_counts.ravel()])
    pos = both[both > 0]
    norm = LogNorm(vmin=1, vmax=max(float(pos.max()) if pos.size else 1.0, 1.0001))
    fs = 7 if A > 20 else 8
    for ax, m, title, xl, yl in (
        (
            axes[0],
            layer_counts,
            f"Same token, layer {layer} -> {next_layer}",
            f"set at layer {next_layer}",
            f"set at layer {layer}",
        ),
        (
            axes[1],
            token_counts,
            f"Same layer {layer}, token t -> t+1",
            f"set of token t+1 (layer {layer})",
            f"set of token t (layer {layer})",
        ),
    ):
        shown = np.where(m > 0, m, np.nan).astype(float)
        ax.set_facecolor("0.85")
        im = ax.imshow(shown, cmap="viridis", norm=norm, interpolation="nearest", aspect="auto")
        ax.set_title(f"{title} ({int(m.sum())} pairs)", fontsize=10)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        if A <= 64:
            ax.set_xticks(np.arange(A), labels=list(names), rotation=90, fontsize=fs)
            ax.set_yticks(np.arange(A), labels=list(names), fontsize=fs)
    fig.colorbar(im, ax=list(axes), label="pairs (log scale; grey = none)", shrink=0.8)
    return fig


def plot_mi(summary: pl.DataFrame):
    """Plug-in MI and its bias-corrected value for each layer pair, by distance."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for (d,), g in summary.group_by("distance", maintain_order=True):
        ax.plot(g["layer_from"], g["mi_bits"], "o-", label=f"d={d} plug-in")
        ax.plot(g["layer_from"], g["mi_corrected_bits"], "x--", label=f"d={d} bias-corrected")
    ax.set_xlabel("layer L")
    ax.set_ylabel("I(choice at L; choice at L+d) (bits)")
    ax.set_title(f"Mutual information between layers ({summary['alphabet'][0]} alphabet)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_coactivation(coact: pl.DataFrame, layer: int, num_experts: int):
    """Heatmap of P(b | a) at one layer (diagonal blank)."""
    from moescope.core.figures import heatmap

    g = coact.filter(pl.col("layer") == layer)
    m = np.full((num_experts, num_experts), np.nan)
    m[g["a"].to_numpy(), g["b"].to_numpy()] = g["p_b_given_a"].fill_null(np.nan).to_numpy()
    names = [str(e) for e in range(num_experts)]
    return heatmap(
        m,
        xlabel="b",
        ylabel="a",
        title=f"Co-activation P(b | a) at layer {layer}",
        cbar="P(b|a)",
        xticklabels=names,
        yticklabels=names,
    )
