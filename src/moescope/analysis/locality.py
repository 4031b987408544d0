"""Temporal locality: how often consecutive tokens reuse experts (Mixtral paper, arXiv 2401.04088, Table 5).

For each pair of consecutive tokens (same document, position + 1) and layer: is token i+1's first
choice token i's first choice, and do their expert sets share any expert? Analytic nulls for
independent uniform routing: 1/E and ``1 - C(E-k, k) / C(E, k)`` (E8k2 = 0.464). Pairs never cross
a document boundary, a gap in positions, or a (token, layer) without routing; a row is carried
across batch boundaries so the result does not depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Iterable
from math import comb

import numpy as np
import polars as pl

from moescope.analysis._stream import PassContext, View, bincount, consecutive_pairs, make_context, run_pass
from moescope.trace.reader import Trace


def null_any_shared(E: int, k: int, k2: int | None = None) -> float:
    """P(two independent uniform subsets of E, of sizes k and k2 (default k), share an expert).

    ``1 - C(E-k, k2) / C(E, k2)``.
    """
    k2 = k if k2 is None else k2
    return 1.0 - comb(E - k, k2) / comb(E, k2)


class RepetitionAccumulator:
    """Per (domain, layer): consecutive pairs, first-choice repeats, any-shared repeats."""

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx
        self.columns = {"experts", "doc_id", "position", "label"}
        D = len(ctx.labels) + 1  # code -1 (no label) goes to the last slot
        self.D = D
        size = D * ctx.Ls
        self.pairs = np.zeros(size, np.int64)
        self.first = np.zeros(size, np.int64)
        self.anys = np.zeros(size, np.int64)
        K = ctx.k + 1  # variable k: pairs by (experts of token i, experts of token i+1), for the null
        self.sizes = np.zeros(size * K * K, np.int64) if ctx.variable_k else None
        # (doc, position, experts, valid, label) of the last row seen, and of the first (joined at a merge)
        self.carry: tuple[int, int, np.ndarray, np.ndarray] | None = None
        self.head: tuple[int, int, np.ndarray, np.ndarray, int] | None = None

    def merge(self, other: RepetitionAccumulator) -> None:
        a, b = self.carry, other.head
        if a is not None and b is not None and b[0] == a[0] and b[1] == a[1] + 1:
            self._fold(a[2][None], b[2][None], (a[3] & b[3])[None], np.asarray([b[4]]))
        self.pairs, self.first = self.pairs + other.pairs, self.first + other.first
        self.anys = self.anys + other.anys
        if self.sizes is not None:
            self.sizes = self.sizes + other.sizes
        self.head = self.head if self.head is not None else other.head
        self.carry = other.carry if other.carry is not None else self.carry

    def _fold(self, a: np.ndarray, b: np.ndarray, ok: np.ndarray, lab: np.ndarray) -> None:
        """``a``, ``b``: ``(m, Ls, k)`` expert ids of token i and i+1; ``ok``: ``(m, Ls)``; ``lab``: (m,)."""
        Ls = self.ctx.Ls
        key = np.where(lab < 0, self.D - 1, lab)[:, None] * Ls + np.arange(Ls)[None, :]  # (m, Ls)
        kk = key[ok]
        self.pairs += bincount(kk, len(self.pairs))
        same_first = a[..., 0] == b[..., 0]  # (m, Ls)
        self.first += bincount(key[ok & same_first], len(self.first))
        eq = a[..., :, None] == b[..., None, :]
        if self.sizes is not None:  # variable k: padding (-1) matches nothing
            eq &= a[..., :, None] >= 0
            K = self.ctx.k + 1
            ca, cb = (a >= 0).sum(-1), (b >= 0).sum(-1)  # (m, Ls)
            self.sizes += bincount(((key * K + ca) * K + cb)[ok], len(self.sizes))
        shared = eq.any((-1, -2))  # (m, Ls)
        self.anys += bincount(key[ok & shared], len(self.anys))

    def update(self, v: View) -> None:
        b = v.batch
        if v.n == 0:
            return
        doc, pos = b.doc_id, b.position
        prev = None if self.carry is None else (self.carry[0], self.carry[1])
        ex = v.experts if v.slots is None else np.where(v.slots, v.experts, -1)  # variable k: pad = -1
        within, first_pairs = consecutive_pairs(doc, pos, prev)
        if first_pairs:
            a0, ok0 = self.carry[2], self.carry[3]
            self._fold(a0[None], ex[:1], (ok0 & v.valid[0])[None], b.label[:1])
        if v.n > 1:
            ok = within[:, None] & v.valid[:-1] & v.valid[1:]
            self._fold(ex[:-1], ex[1:], ok, b.label[1:])
        if self.head is None:
            self.head = (int(doc[0]), int(pos[0]), ex[0].copy(), v.valid[0].copy(), int(b.label[0]))
        self.carry = (int(doc[-1]), int(pos[-1]), ex[-1].copy(), v.valid[-1].copy())

    def result(self) -> pl.DataFrame:
        ctx = self.ctx
        E, k, Ls, D = ctx.E, ctx.k, ctx.Ls, self.D
        pairs = self.pairs.reshape(D, Ls)
        first = self.first.reshape(D, Ls)
        anys = self.anys.reshape(D, Ls)
        names = [*ctx.labels, ""]
        rows = []
        null = np.full((D, Ls), null_any_shared(E, k))
        if self.sizes is not None:  # variable k: the null of each pair's two set sizes, averaged
            K = k + 1
            table = np.array([[null_any_shared(E, i, j) for j in range(K)] for i in range(K)])
            sizes = self.sizes.reshape(D, Ls, K, K)
            null = (sizes * table).sum((-1, -2))  # (D, Ls) summed nulls
        groups = [("all", pairs.sum(0), first.sum(0), anys.sum(0), null.sum(0))]
        if len(ctx.labels) > 1:
            groups += [
                (names[d], pairs[d], first[d], anys[d], null[d]) for d in range(D - 1) if pairs[d].sum()
            ]
        for name, p, f, a, nl in groups:
            for i, layer in enumerate(ctx.layer_ids):
                n = int(p[i])
                rows.append(
                    {
                        "domain": name,
                        "layer": layer,
                        "pairs": n,
                        "first_choice_same": (f[i] / n if ctx.ordered else None) if n else None,
                        "first_choice_null": 1.0 / E,
                        "any_shared": a[i] / n if n else None,
                        "any_shared_null": (nl[i] / n if n else None)
                        if self.sizes is not None
                        else null_any_shared(E, k),
                    }
                )
        return pl.DataFrame(
            rows, schema_overrides={"first_choice_same": pl.Float64, "any_shared": pl.Float64}
        )


def repetition(trace: Trace, layers: Iterable[int] | None = None, *, batch_size: int = 65536) -> pl.DataFrame:
    """Consecutive-token repetition per layer, overall (``domain == "all"``) and per domain.

    Columns ``first_choice_same`` (null when the trace's slots form a set) and ``any_shared``
    are shares of consecutive pairs, next to their analytic nulls.

    Examples
    --------
    >>> repetition(Trace.open("runs/t")).filter(pl.col("domain") == "all")  # doctest: +SKIP
    """
    ctx = make_context(trace, layers)
    acc = RepetitionAccumulator(ctx)
    run_pass(ctx, [acc], batch_size)
    return acc.result()


def table5(rep: pl.DataFrame) -> pl.DataFrame:
    """The Mixtral Table 5 layout: one row per layer, one column per (domain, measure), in percent."""
    wide = None
    for (dom,), g in rep.group_by("domain", maintain_order=True):
        part = g.select(
            "layer",
            (pl.col("first_choice_same") * 100).alias(f"{dom}: first choice (%)"),
            (pl.col("any_shared") * 100).alias(f"{dom}: any shared (%)"),
        )
        wide = part if wide is None else wide.join(part, on="layer", how="left")
    E_null = rep["first_choice_null"][0] * 100
    a_null = rep["any_shared_null"][0] * 100
    return wide.with_columns(
        pl.lit(E_null).alias("null: first choice (%)"), pl.lit(a_null).alias("null: any shared (%)")
    )


def plot_repetition(rep: pl.DataFrame, *, variable_k: bool = False):
    """First-choice and any-shared repetition by layer (all tokens), with the analytic nulls."""
    import matplotlib.pyplot as plt

    g = rep.filter(pl.col("domain") == "all")
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    x = g["layer"].to_numpy()
    if g["first_choice_same"].null_count() < g.height:
        ax.plot(x, 100 * g["first_choice_same"].fill_null(np.nan).to_numpy(), "o-", label="first choice same")
    ax.plot(x, 100 * g["any_shared"].fill_null(np.nan).to_numpy(), "s-", label="any expert shared")
    ax.axhline(100 * g["first_choice_null"][0], color="C0", ls=":", label="null 1/E")
    shared_null = "null: uniform sets of the pairs' sizes" if variable_k else "null 1-C(E-k,k)/C(E,k)"
    ax.axhline(100 * g["any_shared_null"][0], color="C1", ls=":", label=shared_null)
    ax.set_xlabel("layer")
    ax.set_ylabel("consecutive token pairs (%)")
    ax.set_title("Expert reuse by the next token")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
