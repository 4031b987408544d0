"""How much a token's expert choice at one layer says about its choice at the next (seed 000, method 3).

Seed 000 asks for "three types of correlation" and a bi-clustering of the expert-pair co-occurrence.
On a seeded Bernoulli sample of tokens (at most about ``max_tokens``; every token of a small trace):

- **Linear and rank correlation** between layers: for each adjacent pair of selected layers and
  each expert pair ``(a, b)``, Pearson's r and Spearman's rho between the indicator "token chose
  ``a`` at layer L" and "token chose ``b`` at layer L+1" (for 0/1 indicators Pearson's r is the
  phi coefficient and Spearman's rho equals it, so both are also computed on the routing *weights*,
  0 for an expert not chosen, where ranks differ). Two-sided p-values as in :mod:`scipy.stats`.
- **Mutual information with a permutation baseline**: the plug-in MI between the k-subsets
  (alphabet C(E,k), 28 for top-2 of 8; single experts when that is too large) of the two layers,
  Miller-Madow bias-corrected, against the same statistic after shuffling the layer-L+1 choices
  across tokens ``permutations`` times. The shuffle keeps both marginals and breaks the pairing, so
  its mean is what a sample of this size shows with *no* dependence; the excess over it and the
  permutation p-value ``(1 + #{shuffled >= observed}) / (1 + permutations)`` are the honest numbers
  on small logs (83 tokens and 784 cells make even the corrected MI mostly bias).
- **Spectral co-clustering** (:class:`sklearn.cluster.SpectralCoclustering`, or
  :class:`~sklearn.cluster.SpectralBiclustering`) of each pair's co-occurrence count matrix: groups
  of layer-L subsets that send tokens to groups of layer-L+1 subsets. ``block_share`` is the share
  of the counts inside the diagonal blocks and ``block_share_null`` its expectation under
  independence with the same margins, so a block structure shows as ``block_share`` well above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb
from typing import Any

import numpy as np
import polars as pl

from moescope.analysis._stream import (
    PassContext,
    View,
    row_uniform,
    subset_name,
    subset_rank_table,
    subset_ranks,
)
from moescope.analysis.cooccurrence import choose_alphabet, summarise_counts
from moescope.errors import ConfigError, DataError

BICLUSTER_METHODS = ("cocluster", "bicluster")


class DependenceAccumulator:
    """Seeded Bernoulli sample of tokens (per row, from a hash of document and position): expert ids,
    validity and (when present) routing weights."""

    def __init__(self, ctx: PassContext, max_tokens: int = 100_000, seed: int = 0) -> None:
        if max_tokens < 1:
            raise ConfigError(f"`max_tokens` must be >= 1, got {max_tokens}")
        self.ctx = ctx
        self.with_weights = bool(ctx.trace.has_weights)
        self.columns = {"experts", "doc_id", "position"} | ({"weights"} if self.with_weights else set())
        self.rate = min(1.0, max_tokens / max(ctx.trace.num_tokens, 1))
        self.seed = seed
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []

    def update(self, v: View) -> None:
        b = v.batch
        keep = (
            np.ones(v.n, bool) if self.rate >= 1 else row_uniform(b.doc_id, b.position, self.seed) < self.rate
        )
        if not keep.any():
            return
        dtype = np.uint8 if self.ctx.E <= 255 else np.uint16
        w = v.weights[keep].astype(np.float32) if self.with_weights and v.weights is not None else None
        ex = v.experts[keep]
        if v.slots is not None:  # variable k: padding stored as E, which no statistic counts
            ex = np.where(v.slots[keep], ex, self.ctx.E)
        self.parts.append((ex.astype(dtype), v.valid[keep], w))

    def merge(self, other: DependenceAccumulator) -> None:
        self.parts = self.parts + other.parts

    def result(self) -> DependenceSample:
        if not self.parts:
            raise DataError(f"{self.ctx.trace.path}: the dependence sample is empty")
        ex = np.concatenate([p[0] for p in self.parts]).astype(np.int64)
        valid = np.concatenate([p[1] for p in self.parts])
        w = np.concatenate([p[2] for p in self.parts]) if self.parts[0][2] is not None else None
        return DependenceSample(self.ctx, ex, valid, w, self.rate)


def expert_matrix(experts: np.ndarray, num_experts: int, weights: np.ndarray | None = None) -> np.ndarray:
    """``(n, E)`` per-token values of one layer: 1 (or the routing weight) for chosen experts, else 0.

    ``experts`` is ``(n, k)``; ``weights`` ``(n, k)`` or None (indicators). An id equal to
    ``num_experts`` (a variable-k trace's padding) sets nothing.
    """
    n, k = experts.shape
    out = np.zeros((n, num_experts + 1), np.float64)
    vals = np.ones((n, k)) if weights is None else np.nan_to_num(np.asarray(weights, np.float64))
    out[np.arange(n)[:, None], experts] = vals
    return out[:, :num_experts]


def _pearson_matrix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(A, B)`` Pearson r between every column of ``x`` ``(n, A)`` and of ``y`` ``(n, B)``; NaN if constant."""
    xc = x - x.mean(0)
    yc = y - y.mean(0)
    sx = np.sqrt((xc * xc).sum(0))
    sy = np.sqrt((yc * yc).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (xc.T @ yc) / np.outer(sx, sy)
    r[(sx == 0)[:, None] | (sy == 0)[None, :]] = np.nan
    return np.clip(r, -1.0, 1.0)


def _p_value(r: np.ndarray, n: int) -> np.ndarray:
    """Two-sided p-value of a correlation from the t distribution with n-2 degrees of freedom (scipy's)."""
    from scipy import stats

    if n < 3:
        return np.full_like(r, np.nan)
    # scipy.stats.pearsonr: the exact null of r is a beta distribution on [-1, 1] with a = b = n/2 - 1
    dist = stats.beta(n / 2 - 1, n / 2 - 1, loc=-1, scale=2)
    with np.errstate(invalid="ignore"):
        p = 2 * dist.sf(np.abs(r))
    return np.where(np.isnan(r), np.nan, np.clip(p, 0.0, 1.0))


def correlations(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Pearson and Spearman correlation (and p-values) between the columns of ``x`` and ``y``.

    Spearman's rho is Pearson's r of the average ranks (ties share their mean rank), as
    :func:`scipy.stats.spearmanr` computes it.
    """
    from scipy.stats import rankdata

    n = len(x)
    r = _pearson_matrix(x, y)
    rho = _pearson_matrix(rankdata(x, axis=0), rankdata(y, axis=0)) if n else r
    return {"pearson_r": r, "pearson_p": _p_value(r, n), "spearman_rho": rho, "spearman_p": _p_value(rho, n)}


def mi_permutation_test(
    x: np.ndarray, y: np.ndarray, num_symbols: int, permutations: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Bias-corrected MI of paired symbols ``x``, ``y`` against ``permutations`` shuffles of ``y``.

    Each shuffle is ``rng.permutation(n)`` of a ``numpy.random.default_rng(seed)``. Returns the
    plug-in and Miller-Madow corrected MI (bits), the shuffles' mean and standard deviation of the
    corrected MI, the excess of the observed value over that mean, and the permutation p-value.
    """
    x, y = np.asarray(x, np.int64), np.asarray(y, np.int64)
    if x.shape != y.shape:
        raise ConfigError(f"x and y must pair up, got {x.shape} and {y.shape}")
    A = int(num_symbols)
    n = len(x)

    def corrected(yy: np.ndarray) -> float:
        c = np.bincount(x * A + yy, minlength=A * A).reshape(A, A)
        return float(summarise_counts(c)["mi_corrected_bits"])

    if n == 0:
        return {
            "samples": 0,
            "mi_bits": None,
            "mi_corrected_bits": None,
            "shuffled_mean_bits": None,
            "shuffled_sd_bits": None,
            "excess_bits": None,
            "p_value": None,
            "permutations": 0,
        }
    obs = summarise_counts(np.bincount(x * A + y, minlength=A * A).reshape(A, A))
    rng = np.random.default_rng(seed)
    null = np.array([corrected(y[rng.permutation(n)]) for _ in range(int(permutations))])
    mean = float(null.mean()) if len(null) else None
    return {
        "samples": n,
        "mi_bits": obs["mi_bits"],
        "mi_corrected_bits": obs["mi_corrected_bits"],
        "shuffled_mean_bits": mean,
        "shuffled_sd_bits": float(null.std(ddof=1)) if len(null) > 1 else None,
        "excess_bits": obs["mi_corrected_bits"] - mean if mean is not None else None,
        "p_value": float((1 + np.sum(null >= obs["mi_corrected_bits"] - 1e-12)) / (1 + len(null)))
        if len(null)
        else None,
        "permutations": int(permutations),
    }


def bicluster(
    counts: np.ndarray, n_clusters: int = 4, *, method: str = "cocluster", seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Spectral co-clustering of a count matrix: row labels, column labels and block statistics.

    Empty rows and columns cannot be normalised; they get label -1. ``n_clusters`` is lowered to
    the number of non-empty rows or columns when larger. ``method`` is ``cocluster``
    (:class:`~sklearn.cluster.SpectralCoclustering`, diagonal blocks) or ``bicluster``
    (:class:`~sklearn.cluster.SpectralBiclustering`, a checkerboard; blocks are then the pairs of
    row and column clusters with the largest share of counts).
    """
    from sklearn.cluster import SpectralBiclustering, SpectralCoclustering

    if method not in BICLUSTER_METHODS:
        raise ConfigError(f"`bicluster_method` must be one of {BICLUSTER_METHODS}, got {method!r}")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ConfigError(f"`biclusters` must be an integer >= 1, got {n_clusters!r}")
    c = np.asarray(counts, np.float64)
    rows, cols = c.sum(1) > 0, c.sum(0) > 0
    row_labels = np.full(c.shape[0], -1)
    col_labels = np.full(c.shape[1], -1)
    sub = c[np.ix_(rows, cols)]
    kk = min(n_clusters, int(rows.sum()), int(cols.sum()))
    stats = {"clusters": 0, "block_share": float("nan"), "block_share_null": float("nan")}
    if kk < 1 or sub.sum() == 0:
        return row_labels, col_labels, stats
    if kk == 1:
        rl, cl = np.zeros(sub.shape[0], int), np.zeros(sub.shape[1], int)
    elif method == "cocluster":
        model = SpectralCoclustering(n_clusters=kk, n_init=5, random_state=seed).fit(sub)
        rl, cl = model.row_labels_, model.column_labels_
    else:
        model = SpectralBiclustering(n_clusters=kk, n_init=5, random_state=seed).fit(sub)
        rl, cl = model.row_labels_, model.column_labels_
    row_labels[rows], col_labels[cols] = rl, cl
    n = sub.sum()
    pr, pc = sub.sum(1) / n, sub.sum(0) / n
    inside = null = 0.0
    for g in range(kk):
        r, q = rl == g, cl == g
        inside += sub[np.ix_(r, q)].sum() / n
        null += pr[r].sum() * pc[q].sum()
    stats = {"clusters": kk, "block_share": float(inside), "block_share_null": float(null)}
    return row_labels, col_labels, stats


def cluster_order(labels: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Indices sorted by cluster (empty ones, label -1, last), heaviest first inside a cluster."""
    lab = np.where(labels < 0, labels.max() + 1, labels)
    return np.lexsort((-weight, lab))


class DependenceSample:
    """The sampled tokens and every statistic of this module over adjacent layer pairs."""

    def __init__(self, ctx: PassContext, experts, valid, weights, rate: float) -> None:
        self.ctx = ctx
        self.experts = experts  # (n, Ls, k) int64, 0 where invalid
        self.valid = valid  # (n, Ls)
        self.weights = weights  # (n, Ls, k) or None
        self.rate = rate
        self.mode = choose_alphabet(ctx.E, ctx.k, variable_k=ctx.variable_k)
        self.A = comb(ctx.E, ctx.k) if self.mode == "subset" else ctx.E
        self.pairs = [(i, i + 1) for i in range(ctx.Ls - 1)]

    def symbol_names(self) -> list[str]:
        if self.mode == "subset":
            return [subset_name(r, self.ctx.E, self.ctx.k) for r in range(self.A)]
        return [str(e) for e in range(self.A)]

    def symbols(self, col: int) -> np.ndarray:
        """``(n,)`` symbol of every sampled token at selected layer ``col`` (subset rank or first expert)."""
        ex = self.experts[:, col]
        if self.mode == "subset":
            return subset_ranks(ex, subset_rank_table(self.ctx.E, self.ctx.k))
        return ex[:, 0]

    def pair_counts(self, i: int, j: int) -> np.ndarray:
        """``(A, A)`` co-occurrence counts of the symbols at selected layers ``i`` and ``j``."""
        ok = self.valid[:, i] & self.valid[:, j]
        A = self.A
        if self.mode == "subset":
            key = self.symbols(i)[ok] * A + self.symbols(j)[ok]
        else:  # every slot pair of a token, as the co-occurrence analysis does for large E
            a, b = self.experts[ok, i][:, :, None], self.experts[ok, j][:, None, :]
            key = (a * A + b)[(a < self.ctx.E) & (b < self.ctx.E)]  # variable k: padding (E) out
        return np.bincount(key, minlength=A * A).reshape(A, A)

    def correlation_frame(self) -> pl.DataFrame:
        """Per adjacent pair, variable (indicator, weight) and expert pair: r, rho and their p-values."""
        ids, E = self.ctx.layer_ids, self.ctx.E
        frames = []
        a, b = np.meshgrid(np.arange(E), np.arange(E), indexing="ij")
        variables = ["indicator"] + (["weight"] if self.weights is not None else [])
        for i, j in self.pairs:
            ok = self.valid[:, i] & self.valid[:, j]
            if ok.sum() < 3:  # no correlation from fewer than three tokens (masked series)
                continue
            for var in variables:
                w_i = self.weights[ok, i] if var == "weight" else None
                w_j = self.weights[ok, j] if var == "weight" else None
                x = expert_matrix(self.experts[ok, i], E, w_i)
                y = expert_matrix(self.experts[ok, j], E, w_j)
                res = correlations(x, y)
                frames.append(
                    pl.DataFrame(
                        {
                            "layer_from": np.full(E * E, ids[i], np.int32),
                            "layer_to": np.full(E * E, ids[j], np.int32),
                            "variable": [var] * (E * E),
                            "expert_from": a.ravel().astype(np.int32),
                            "expert_to": b.ravel().astype(np.int32),
                            "samples": np.full(E * E, int(ok.sum()), np.int64),
                            **{name: v.ravel() for name, v in res.items()},
                        }
                    )
                )
        if not frames:
            return pl.DataFrame()
        return pl.concat(frames).with_columns(
            pl.col("pearson_r", "pearson_p", "spearman_rho", "spearman_p").fill_nan(None)
        )

    def mi_frame(self, permutations: int = 200, seed: int = 0) -> pl.DataFrame:
        """Per adjacent pair: MI, corrected MI, the shuffles' mean, the excess over it and the p-value."""
        ids, rows = self.ctx.layer_ids, []
        for p, (i, j) in enumerate(self.pairs):
            ok = self.valid[:, i] & self.valid[:, j]
            if self.mode == "subset":
                x, y = self.symbols(i)[ok], self.symbols(j)[ok]
            else:
                x, y = self.experts[ok, i, 0], self.experts[ok, j, 0]  # first choices
            res = mi_permutation_test(x, y, self.A, permutations, seed + p)
            rows.append({"layer_from": ids[i], "layer_to": ids[j], "alphabet": self.mode, **res})
        return pl.DataFrame(rows)

    def bicluster_frame(
        self, n_clusters: int = 4, method: str = "cocluster", seed: int = 0
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """``(labels, summary)``: each symbol's row/column cluster per pair, and each pair's block shares."""
        ids, names = self.ctx.layer_ids, self.symbol_names()
        labels, summary = [], []
        for i, j in self.pairs:
            c = self.pair_counts(i, j)
            rl, cl, st = bicluster(c, n_clusters, method=method, seed=seed)
            for side, lab, tot in (("from", rl, c.sum(1)), ("to", cl, c.sum(0))):
                labels.append(
                    pl.DataFrame(
                        {
                            "layer_from": np.full(self.A, ids[i], np.int32),
                            "layer_to": np.full(self.A, ids[j], np.int32),
                            "side": [side] * self.A,
                            "symbol": names,
                            "cluster": lab.astype(np.int32),
                            "count": tot.astype(np.int64),
                        }
                    )
                )
            summary.append(
                {"layer_from": ids[i], "layer_to": ids[j], "method": method, "samples": int(c.sum()), **st}
            )
        return (pl.concat(labels) if labels else pl.DataFrame()), pl.DataFrame(summary)


def correlation_summary(frame: pl.DataFrame) -> pl.DataFrame:
    """Per pair and variable: mean |r| and |rho|, the strongest expert pair, and the share with p < 0.05."""
    if frame.is_empty():
        return frame
    return (
        frame.group_by("layer_from", "layer_to", "variable", maintain_order=True)
        .agg(
            pl.col("samples").first(),
            pl.col("pearson_r").abs().mean().alias("mean_abs_pearson_r"),
            pl.col("spearman_rho").abs().mean().alias("mean_abs_spearman_rho"),
            pl.col("pearson_r").abs().max().alias("max_abs_pearson_r"),
            pl.col("spearman_rho").abs().max().alias("max_abs_spearman_rho"),
            (pl.col("pearson_p") < 0.05).mean().alias("share_pearson_p_below_0.05"),
            (pl.col("spearman_p") < 0.05).mean().alias("share_spearman_p_below_0.05"),
        )
        .sort("variable", "layer_from")
    )


# ------------------------------------------------------------------------------------------- figures


def plot_correlation_grid(frame: pl.DataFrame, variable: str, column: str, num_experts: int):
    """One E x E panel per adjacent layer pair, all on the same [-1, 1] colour scale."""

    import matplotlib.pyplot as plt

    g = frame.filter(pl.col("variable") == variable)
    pairs = g.select("layer_from", "layer_to").unique(maintain_order=True).rows()
    ncols = min(6, max(1, len(pairs)))
    nrows = -(-len(pairs) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(2.4 * ncols + 1.2, 2.3 * nrows + 0.8), squeeze=False)
    fig.subplots_adjust(
        left=0.06, right=0.86, bottom=0.06, top=1 - 0.6 / (2.3 * nrows + 0.8), wspace=0.45, hspace=0.6
    )
    axes = list(grid.ravel())
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)
    axes = axes[: len(pairs)]
    label = {"pearson_r": "Pearson r", "spearman_rho": "Spearman rho"}[column]
    im = None
    ticks = (
        np.arange(num_experts) if num_experts <= 16 else np.arange(0, num_experts, max(1, num_experts // 8))
    )
    for ax, (lf, lt) in zip(axes, pairs, strict=True):
        h = g.filter((pl.col("layer_from") == lf) & (pl.col("layer_to") == lt))
        m = np.full((num_experts, num_experts), np.nan)
        m[h["expert_from"].to_numpy(), h["expert_to"].to_numpy()] = h[column].fill_null(np.nan).to_numpy()
        im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(f"layer {lf} -> {lt}", fontsize=8)
        ax.set_xlabel(f"expert at layer {lt}", fontsize=7)
        ax.set_ylabel(f"expert at layer {lf}", fontsize=7)
        ax.set_xticks(ticks, labels=[str(t) for t in ticks], fontsize=6)
        ax.set_yticks(ticks, labels=[str(t) for t in ticks], fontsize=6)
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.89, 0.2, 0.015, 0.6)), label=f"{label} (1 = always together)")
    what = "routing weights" if variable == "weight" else "expert indicators"
    fig.suptitle(f"{label} of per-token {what} between adjacent layers")
    return fig


def plot_mi_permutation(mi: pl.DataFrame):
    """Observed bias-corrected MI per layer pair against the shuffled baseline (mean and 95% band)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    mi = mi.filter(pl.col("samples") > 0)
    x = mi["layer_from"].to_numpy()
    mean = mi["shuffled_mean_bits"].to_numpy().astype(float)
    sd = mi["shuffled_sd_bits"].fill_null(0.0).to_numpy().astype(float)
    ax.fill_between(x, mean - 1.96 * sd, mean + 1.96 * sd, color="0.8", label="shuffled: mean +/- 1.96 sd")
    ax.plot(x, mean, color="0.4", lw=1, label="shuffled mean (no dependence)")
    ax.plot(x, mi["mi_corrected_bits"], "o-", color="C0", label="observed, bias-corrected")
    ax.plot(x, mi["mi_bits"], "x:", color="C1", label="observed, plug-in")
    sig = mi["p_value"].to_numpy() <= 0.05
    if sig.any():
        ax.plot(x[sig], mi["mi_corrected_bits"].to_numpy()[sig], "*", ms=10, color="C3", label="p <= 0.05")
    ax.set_xlabel("layer L (pair L -> next MoE layer)")
    ax.set_ylabel("mutual information (bits)")
    n = int(mi["samples"].max()) if mi.height else 0
    perms = int(mi["permutations"].max()) if mi.height else 0
    ax.set_title(
        f"MI between consecutive layers' {mi['alphabet'][0]} choices vs {perms} shuffles ({n} tokens)"
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_bicluster(
    counts: np.ndarray,
    row_labels: np.ndarray,
    col_labels: np.ndarray,
    names: Sequence[str],
    layer_from: int,
    layer_to: int,
    stats: dict[str, float],
):
    """The pair co-occurrence counts reordered by row and column cluster, log colour scale, blocks outlined."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    ro = cluster_order(row_labels, counts.sum(1))
    co = cluster_order(col_labels, counts.sum(0))
    m = counts[np.ix_(ro, co)].astype(float)
    A = len(names)
    fig, ax = plt.subplots(figsize=(min(14, 3.0 + 0.3 * A), min(12, 2.5 + 0.3 * A)))
    shown = np.where(m > 0, m, np.nan)
    vmax = max(float(np.nanmax(shown)) if np.isfinite(shown).any() else 1.0, 1.0)
    im = ax.imshow(
        shown, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(vmax, 1.0001)), interpolation="nearest"
    )
    ax.set_facecolor("0.93")
    fig.colorbar(im, ax=ax, label="tokens (log scale; grey = none)", shrink=0.7)
    rl, cl = row_labels[ro], col_labels[co]
    for g in sorted(set(rl.tolist()) & set(cl.tolist()) - {-1}):
        r, c = np.flatnonzero(rl == g), np.flatnonzero(cl == g)
        ax.add_patch(plt.Rectangle((c[0] - 0.5, r[0] - 0.5), len(c), len(r), fill=False, ec="red", lw=1.5))
    fs = 7 if A > 20 else 9
    ax.set_xticks(np.arange(A), labels=[names[i] for i in co], rotation=90, fontsize=fs)
    ax.set_yticks(np.arange(A), labels=[names[i] for i in ro], fontsize=fs)
    ax.set_xlabel(f"expert set at layer {layer_to} (ordered by cluster)")
    ax.set_ylabel(f"expert set at layer {layer_from} (ordered by cluster)")
    ax.set_title(
        f"Spectral co-clustering, layer {layer_from} -> {layer_to}: {stats['clusters']} blocks hold "
        f"{stats['block_share']:.0%} of tokens (independence: {stats['block_share_null']:.0%})",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def report(
    sample: DependenceSample,
    target: int,
    *,
    permutations: int,
    n_clusters: int,
    method: str,
    seed: int,
    table: Any,
    figure: Any,
) -> dict[str, Any]:
    """Write the tables and figures of this module through ``table(df, name)`` and
    ``figure(fig, df, name, **params)``; returns the headline numbers for ``summary.json``."""
    corr = sample.correlation_frame()
    if corr.is_empty():
        return {"note": "fewer than two layers selected: no layer pair"}
    table(corr, "dependence_correlations")
    cs = correlation_summary(corr)
    table(cs, "dependence_correlation_summary")
    E = sample.ctx.E
    # Pearson on 0/1 indicators (phi); Spearman where it differs from Pearson: on the weights
    shown = [("indicator", "pearson_r")]
    if "weight" in corr["variable"].to_list():
        shown.append(("weight", "spearman_rho"))
    for var, col in shown:
        g = corr.filter(pl.col("variable") == var)
        figure(
            plot_correlation_grid(corr, var, col, E),
            g.select("layer_from", "layer_to", "expert_from", "expert_to", col),
            f"dependence_{col}_{var}_grid",
            variable=var,
        )
    mi = sample.mi_frame(permutations, seed)
    table(mi, "dependence_mi_permutation")
    figure(plot_mi_permutation(mi), mi, "dependence_mi_permutation_plot", permutations=permutations)
    labels, bsum = sample.bicluster_frame(n_clusters, method, seed)
    table(labels, "dependence_biclusters")
    table(bsum, "dependence_bicluster_summary")
    ids = sample.ctx.layer_ids
    i = ids.index(target) if target in ids[:-1] else 0
    j = i + 1
    c = sample.pair_counts(i, j)
    rl, cl, st = bicluster(c, n_clusters, method=method, seed=seed)
    names = sample.symbol_names()
    ro, co = cluster_order(rl, c.sum(1)), cluster_order(cl, c.sum(0))
    a, b = np.meshgrid(ro, co, indexing="ij")
    cells = pl.DataFrame(
        {
            "row": np.repeat(np.arange(len(ro)), len(co)).astype(np.int32),
            "col": np.tile(np.arange(len(co)), len(ro)).astype(np.int32),
            "symbol_from": [names[x] for x in a.ravel()],
            "symbol_to": [names[x] for x in b.ravel()],
            "cluster_from": rl[a.ravel()].astype(np.int32),
            "cluster_to": cl[b.ravel()].astype(np.int32),
            "count": c[a, b].ravel().astype(np.int64),
        }
    )
    figure(
        plot_bicluster(c, rl, cl, names, ids[i], ids[j], st),
        cells,
        f"dependence_bicluster_L{ids[i]}_L{ids[j]}",
        layer_from=ids[i],
        layer_to=ids[j],
        method=method,
        clusters=n_clusters,
    )
    ind = cs.filter(pl.col("variable") == "indicator")
    return {
        "sampled_tokens": len(sample.experts),
        "sample_rate": sample.rate,
        "alphabet": sample.mode,
        "mean_abs_pearson_r": float(ind["mean_abs_pearson_r"].mean()),
        "mean_abs_spearman_rho_weight": float(
            cs.filter(pl.col("variable") == "weight")["mean_abs_spearman_rho"].mean()
        )
        if "weight" in cs["variable"].to_list()
        else None,
        "mean_mi_corrected_bits": float(mi["mi_corrected_bits"].mean()),
        "mean_shuffled_mi_bits": float(mi["shuffled_mean_bits"].mean()),
        "mean_excess_mi_bits": float(mi["excess_bits"].mean()),
        "pairs_p_below_0.05": int((mi["p_value"] <= 0.05).sum()),
        "pairs": mi.height,
        "permutations": permutations,
        "mean_block_share": float(np.nanmean(bsum["block_share"].to_numpy())),
        "mean_block_share_null": float(np.nanmean(bsum["block_share_null"].to_numpy())),
    }
