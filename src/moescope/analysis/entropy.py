"""Per-token router entropy from the logits (seed 001), in bits and normalised by log2 E.

Softmax routers (and sparsemixer, whose scores are a masked softmax) use ``softmax(logits)``;
sigmoid routers use ``sigmoid(logits)`` normalised to sum 1 (FIELD-NOTES section 3). A trace whose
router kind is ``unknown`` is treated as softmax and says so in the result's ``normaliser`` column.
Histograms use fixed bins on ``[0, log2 E]`` (entropy cannot leave that range), so they stream.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import polars as pl

from moescope.analysis._stream import _FIX, ExactSum, PassContext, View, make_context, require, run_pass
from moescope.trace.reader import Trace


def token_entropy_bits(logits: np.ndarray, router_kind: str = "softmax") -> np.ndarray:
    """Entropy in bits of each router distribution; ``logits`` is ``(..., E)``, returns ``(...)``."""
    z = np.asarray(logits, np.float64)
    if router_kind == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-z))
        p = s / s.sum(-1, keepdims=True)
    else:
        z = z - z.max(-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(-1)


def normaliser(router_kind: str) -> str:
    return "sigmoid/sum" if router_kind == "sigmoid" else "softmax"


class EntropyAccumulator:
    """Per layer: count, exact sums of h and h^2 (mean and variance rounded once), min, max, fixed-bin histogram."""

    def __init__(self, ctx: PassContext, bins: int = 50) -> None:
        require(ctx.trace, "logits", "routing entropy")
        self.ctx = ctx
        self.columns = {"logits"}
        self.kind = ctx.trace.routing.router_kind
        self.bins = bins
        self.hmax = float(np.log2(ctx.E)) if ctx.E > 1 else 1.0
        Ls = ctx.Ls
        self.n = np.zeros(Ls, np.int64)
        self.s1 = ExactSum(Ls)  # sum of entropies (each batch's float64 sum, added exactly)
        self.s2 = ExactSum(Ls)  # sum of squared entropies
        self.lo = np.full(Ls, np.inf)
        self.hi = np.full(Ls, -np.inf)
        self.hist = np.zeros(Ls * bins, np.int64)

    def _entropy(self, v: View) -> np.ndarray:
        if self.kind == "sigmoid":
            s = 1.0 / (1.0 + np.exp(-v.logits))
            p = s / s.sum(-1, keepdims=True)
        else:
            p = v.softmax()
        with np.errstate(divide="ignore", invalid="ignore"):
            lp = np.log2(p)
        lp[~np.isfinite(lp)] = 0.0
        return -(p * lp).sum(-1, dtype=np.float64)  # (n, Ls)

    def update(self, v: View) -> None:
        if v.logits is None:
            return
        h = self._entropy(v)
        ok = v.logit_valid
        hz = np.where(ok, h, 0.0)
        self.n = self.n + ok.sum(0)
        self.s1.add(hz.sum(0))
        self.s2.add((hz * hz).sum(0))
        self.lo = np.minimum(self.lo, np.where(ok, h, np.inf).min(0))
        self.hi = np.maximum(self.hi, np.where(ok, h, -np.inf).max(0))
        idx = np.clip((h / self.hmax * self.bins).astype(np.int64), 0, self.bins - 1)
        key = idx + (np.arange(self.ctx.Ls) * self.bins)[None, :]
        self.hist += np.bincount(key[ok], minlength=self.ctx.Ls * self.bins)

    def merge(self, other: EntropyAccumulator) -> None:
        self.n = self.n + other.n
        self.s1.merge(other.s1)
        self.s2.merge(other.s2)
        self.lo = np.minimum(self.lo, other.lo)
        self.hi = np.maximum(self.hi, other.hi)
        self.hist = self.hist + other.hist

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance (ddof 0) per layer from the exact sums, each rounded once; NaN without tokens."""
        mean, var = np.full(self.ctx.Ls, np.nan), np.full(self.ctx.Ls, np.nan)
        special = self.s1.special + self.s2.special
        for i, n in enumerate(self.n.tolist()):
            if n == 0:
                continue
            if special[i] != 0:
                mean[i] = var[i] = np.nan
                continue
            a, b = self.s1.fixed[i], self.s2.fixed[i]  # sums times 2**_FIX
            mean[i] = a / (n << _FIX)
            var[i] = max(n * b * (1 << _FIX) - a * a, 0) / ((n * n) << (2 * _FIX))
        return mean, var

    def result(self) -> dict[str, pl.DataFrame]:
        ctx, bins = self.ctx, self.bins
        Ls = ctx.Ls
        has = self.n > 0
        mean, var = self.moments()
        std = np.sqrt(var)
        log2e = float(np.log2(ctx.E))
        by_layer = pl.DataFrame(
            {
                "layer": np.asarray(ctx.layer_ids, np.int32),
                "tokens": self.n,
                "mean_entropy_bits": mean,
                "std_entropy_bits": std,
                "min_entropy_bits": np.where(has, self.lo, np.nan),
                "max_entropy_bits": np.where(has, self.hi, np.nan),
                "mean_entropy_norm": mean / log2e if log2e > 0 else np.nan,
                "max_possible_bits": np.full(Ls, log2e),
                "normaliser": [normaliser(self.kind)] * Ls,
            }
        ).with_columns(pl.col(pl.Float64).fill_nan(None))
        edges = np.linspace(0.0, self.hmax, bins + 1)
        counts = self.hist.reshape(Ls, bins)
        width = edges[1] - edges[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            dens = counts / (counts.sum(1, keepdims=True) * width)
        hist = pl.DataFrame(
            {
                "layer": np.repeat(ctx.layer_ids, bins).astype(np.int32),
                "bin_left_bits": np.tile(edges[:-1], Ls),
                "bin_right_bits": np.tile(edges[1:], Ls),
                "count": counts.ravel(),
                "density_per_bit": np.nan_to_num(dens).ravel(),
            }
        )
        return {"by_layer": by_layer, "histogram": hist}


def routing_entropy(
    trace: Trace, layers: Iterable[int] | None = None, *, bins: int = 50, batch_size: int = 65536
) -> dict[str, pl.DataFrame]:
    """Router entropy per layer (``by_layer``: mean, std (ddof 0), min, max in bits, mean normalised
    by log2 E) and its histogram per layer (``histogram``: fixed bins on [0, log2 E]).

    Needs the logits column; raises :class:`~moescope.errors.DataError` naming it otherwise.

    Examples
    --------
    >>> res = routing_entropy(Trace.open("runs/t"))  # doctest: +SKIP
    >>> res["by_layer"].select("layer", "mean_entropy_bits")  # doctest: +SKIP
    """
    ctx = make_context(trace, layers)
    acc = EntropyAccumulator(ctx, bins)
    run_pass(ctx, [acc], batch_size)
    return acc.result()


def entropy_summary(by_layer: pl.DataFrame) -> dict[str, float]:
    """Token-weighted mean over layers, and the range of per-token entropy, in bits."""
    t = by_layer["tokens"].to_numpy().astype(np.float64)
    m = by_layer["mean_entropy_bits"].fill_null(0).to_numpy()
    return {
        "mean_entropy_bits": float(np.sum(t * m) / t.sum()) if t.sum() else float("nan"),
        "min_entropy_bits": float(by_layer["min_entropy_bits"].min()),
        "max_entropy_bits": float(by_layer["max_entropy_bits"].max()),
        "first_layer_mean_bits": float(by_layer["mean_entropy_bits"][0]),
        "last_layer_mean_bits": float(by_layer["mean_entropy_bits"][-1]),
        "max_possible_bits": float(by_layer["max_possible_bits"][0]),
    }


def hist_median(hist: pl.DataFrame) -> float:
    """Median read off a binned histogram by linear interpolation inside the median bin."""
    c = hist["count"].to_numpy().astype(np.float64)
    if c.sum() == 0:
        return float("nan")
    cum = np.cumsum(c) / c.sum()
    i = int(np.searchsorted(cum, 0.5))
    prev = cum[i - 1] if i else 0.0
    lo, hi = hist["bin_left_bits"][i], hist["bin_right_bits"][i]
    return float(lo + (hi - lo) * (0.5 - prev) / max(cum[i] - prev, 1e-12))


def plot_entropy_by_layer(by_layer: pl.DataFrame):
    """Mean router entropy by layer with a +-1 std band and the maximum log2 E."""
    import matplotlib.pyplot as plt

    x = by_layer["layer"].to_numpy()
    m = by_layer["mean_entropy_bits"].to_numpy()
    s = by_layer["std_entropy_bits"].to_numpy()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(x, m, "o-", label="mean")
    ax.fill_between(x, m - s, m + s, alpha=0.25, label="±1 std")
    ax.axhline(by_layer["max_possible_bits"][0], color="gray", ls=":", label="log2 E (uniform router)")
    ax.set_xlabel("layer")
    ax.set_ylabel("router entropy (bits)")
    ax.set_title(f"Routing entropy by layer ({by_layer['normaliser'][0]})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_entropy_histogram(hist: pl.DataFrame, by_layer: pl.DataFrame, layer: int):
    """Histogram of per-token entropy at one layer, with the mean and (binned) median."""
    import matplotlib.pyplot as plt

    h = hist.filter(pl.col("layer") == layer)
    row = by_layer.filter(pl.col("layer") == layer)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    left = h["bin_left_bits"].to_numpy()
    ax.bar(left, h["count"].to_numpy(), width=h["bin_right_bits"].to_numpy() - left, align="edge", alpha=0.8)
    ax.axvline(
        row["mean_entropy_bits"][0], color="red", ls="--", label=f"mean {row['mean_entropy_bits'][0]:.3f}"
    )
    med = hist_median(h)
    ax.axvline(med, color="green", ls=":", label=f"median ≈ {med:.3f}")
    ax.set_xlabel("router entropy (bits)")
    ax.set_ylabel("tokens")
    ax.set_title(f"Routing entropy at layer {layer}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
