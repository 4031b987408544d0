"""Load balance per layer and expert (seed 001; conventions of FIELD-NOTES section 3).

Counts use every top-k slot, not only the first choice. Per layer: CV of the counts (ddof 0),
MaxVio = max/mean - 1 (Loss-Free Balancing, arXiv 2408.15664), max/mean, Gini, load entropy,
dead experts (share < 0.001) and the Switch/GShard auxiliary loss ``E * sum_e f_e P_e`` with
``f_e = c_e / T`` and ``P_e`` the mean softmax router probability, exactly as transformers'
``load_balancing_loss_func`` computes it (it pools all layers; perfectly balanced = k, collapsed = E).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import polars as pl

from moescope.analysis._stream import (
    ExactSum,
    PassContext,
    View,
    bincount,
    entropy_bits,
    make_context,
    run_pass,
)
from moescope.trace.reader import Trace

DEAD_SHARE = 0.001


class LoadAccumulator:
    """Per (layer, expert): assignments, first choices, router weight sums, softmax probability sums."""

    def __init__(self, ctx: PassContext, *, use_logits: bool | None = None) -> None:
        self.ctx = ctx
        self.use_logits = ctx.trace.has_logits if use_logits is None else use_logits
        self.columns = {"experts"} | ({"weights"} if ctx.trace.has_weights else set())
        self.columns |= {"logits"} if self.use_logits else set()
        Ls, E = ctx.Ls, ctx.E
        self.tokens = np.zeros(Ls, np.int64)
        self.counts = np.zeros(Ls * E, np.int64)
        self.first = np.zeros(Ls * E, np.int64)
        self.wsum = ExactSum(Ls * E)
        self.prob_tokens = np.zeros(Ls, np.int64)
        self.psum = ExactSum((Ls, E))
        counts = ctx.trace.manifest.get("counts")
        if counts:  # a counts-only trace (an engine's per-expert counts, no rows): start from its totals
            self.counts += np.asarray(counts["assignments"], np.int64)[ctx.cols].ravel()
            self.tokens += np.asarray(counts["tokens"], np.int64)[ctx.cols]

    def update(self, v: View) -> None:
        E, Ls = self.ctx.E, self.ctx.Ls
        key = v.experts + (np.arange(Ls) * E)[None, :, None]  # (n, Ls, k)
        valid3 = v.slot_mask()  # padding of a variable-k trace is no assignment
        sel = key[valid3]
        self.tokens += v.valid.sum(0)
        self.counts += bincount(sel, Ls * E)
        self.first += bincount(key[..., 0][v.valid], Ls * E)
        if v.weights is not None:
            self.wsum.add(bincount(sel, Ls * E, v.weights[valid3].astype(np.float64)))
        if self.use_logits and v.logits is not None:
            p = v.softmax()
            self.psum.add(np.sum(p, axis=0, where=v.logit_valid[..., None], dtype=np.float64))
            self.prob_tokens += v.logit_valid.sum(0)

    def merge(self, other: LoadAccumulator) -> None:
        for name in ("tokens", "counts", "first", "prob_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.wsum.merge(other.wsum)
        self.psum.merge(other.psum)

    def result(self) -> pl.DataFrame:
        ctx = self.ctx
        Ls, E, k = ctx.Ls, ctx.E, ctx.k
        counts = self.counts.reshape(Ls, E)
        first = self.first.reshape(Ls, E)
        tok = self.tokens[:, None].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            # variable k: a share of the layer's assignments (k * tokens when every token uses k)
            share = counts / (counts.sum(1, keepdims=True) if ctx.variable_k else k * tok)
            first_share = first / tok
            mean_w = self.wsum.value().reshape(Ls, E) / counts
            mean_p = self.psum.value() / self.prob_tokens[:, None]
        df = pl.DataFrame(
            {
                "layer": np.repeat(ctx.layer_ids, E).astype(np.int32),
                "expert": np.tile(np.arange(E), Ls).astype(np.int32),
                "tokens": np.repeat(self.tokens, E),
                "assignments": counts.ravel(),
                "assignment_share": share.ravel(),
                "first_choice_count": first.ravel(),
                "first_choice_share": first_share.ravel(),
                "mean_router_weight": mean_w.ravel(),
                "logit_tokens": np.repeat(self.prob_tokens, E),
                "mean_router_prob": mean_p.ravel(),
            }
        )
        df = df.with_columns(pl.col("mean_router_weight", "mean_router_prob").fill_nan(None))
        if not ctx.trace.has_weights:
            df = df.with_columns(pl.lit(None, pl.Float64).alias("mean_router_weight"))
        if not ctx.ordered:
            df = df.with_columns(pl.lit(None, pl.Float64).alias("first_choice_share"))
        if not self.use_logits:
            df = df.with_columns(pl.lit(None, pl.Float64).alias("mean_router_prob"))
        return df


def load_balance(
    trace: Trace, layers: Iterable[int] | None = None, *, batch_size: int = 65536
) -> pl.DataFrame:
    """Per (layer, expert) load: counts over all k slots, shares, first choices, mean weight and probability.

    ``assignment_share`` = assignments / (k * tokens) sums to 1 over a layer's experts (perfect
    balance: 1/E); in a variable-k strategy trace the denominator is the layer's assignments
    (padding slots are not counted). ``first_choice_share`` is null when the trace's slots form a set;
    ``mean_router_weight`` (mean weight of the assignments) needs weights, ``mean_router_prob``
    (mean softmax probability over all tokens, the ``P_e`` of the aux loss) needs logits.
    (token, layer) entries without recorded routing are excluded.

    Examples
    --------
    >>> df = load_balance(Trace.open("runs/t"))  # doctest: +SKIP
    >>> df.filter(pl.col("layer") == 0)["assignment_share"].sum()  # doctest: +SKIP
    1.0
    """
    ctx = make_context(trace, layers)
    acc = LoadAccumulator(ctx)
    run_pass(ctx, [acc], batch_size)
    return acc.result()


def gini(x: np.ndarray) -> float:
    """Gini coefficient of non-negative values (0 = equal, (n-1)/n = one holds everything)."""
    x = np.sort(np.asarray(x, np.float64))
    n, s = len(x), x.sum()
    if n == 0 or s == 0:
        return float("nan")
    i = np.arange(1, n + 1)
    return float(np.sum((2 * i - n - 1) * x) / (n * s))


def load_summary(per_expert: pl.DataFrame, top_k: int) -> pl.DataFrame:
    """Per-layer balance metrics from :func:`load_balance`'s frame.

    Columns: ``cv`` (std/mean of counts, ddof 0), ``max_violation`` (max/mean - 1), ``max_over_mean``,
    ``gini``, ``load_entropy_bits`` and ``load_entropy_norm`` (over log2 E), ``dead_experts``
    (share < 0.001), ``top_expert``/``top_expert_share``, and ``aux_loss`` (this layer alone,
    ``E * sum f_e P_e``; null without logits).
    """
    rows = []
    for (layer,), g in per_expert.sort("layer", "expert").group_by("layer", maintain_order=True):
        c = g["assignments"].to_numpy().astype(np.float64)
        E = len(c)
        share = g["assignment_share"].to_numpy()
        mean = c.mean()
        T = int(g["tokens"][0])
        p = g["mean_router_prob"].to_numpy()
        aux = None
        if g["mean_router_prob"].null_count() == 0 and T > 0:
            aux = float(E * np.sum((c / T) * p))
        top = int(np.argmax(c))
        rows.append(
            {
                "layer": int(layer),
                "tokens": T,
                "experts": E,
                "cv": float(c.std(ddof=0) / mean) if mean > 0 else None,
                "max_violation": float(c.max() / mean - 1) if mean > 0 else None,
                "max_over_mean": float(c.max() / mean) if mean > 0 else None,
                "gini": gini(c) if mean > 0 else None,
                "load_entropy_bits": float(entropy_bits(share)) if mean > 0 else None,
                "load_entropy_norm": float(entropy_bits(share) / np.log2(E)) if mean > 0 and E > 1 else None,
                "dead_experts": int(np.sum(share < DEAD_SHARE)) if mean > 0 else None,
                "top_expert": top,
                "top_expert_share": float(share[top]) if mean > 0 else None,
                "aux_loss": aux,
            }
        )
    return pl.DataFrame(rows)


def aux_loss(per_expert: pl.DataFrame) -> float | None:
    """Switch/GShard auxiliary loss pooled over the frame's layers, as transformers computes it.

    ``f_e`` = all layers' assignments to e over all layers' tokens, ``P_e`` = the mean softmax
    probability over the same rows; returns ``E * sum f_e P_e`` (None without logits). Note that
    transformers applies a softmax even for sigmoid routers; so does this.
    """
    if per_expert["mean_router_prob"].null_count():
        return None
    g = (
        per_expert.group_by("expert")
        .agg(
            pl.col("assignments").sum(),
            (pl.col("mean_router_prob") * pl.col("logit_tokens")).sum().alias("psum"),
        )
        .sort("expert")
    )
    layers = per_expert.group_by("layer").agg(pl.col("tokens").first(), pl.col("logit_tokens").first())
    T, Tp = layers["tokens"].sum(), layers["logit_tokens"].sum()
    if T == 0 or Tp == 0:
        return None
    E = g.height
    return float(E * np.sum(g["assignments"].to_numpy() / T * (g["psum"].to_numpy() / Tp)))


def plot_load(
    per_expert: pl.DataFrame, top_k: int, summary: pl.DataFrame | None = None, *, variable_k: bool = False
):
    """One bar subplot per layer: assignment share by expert, with the perfect-balance line 1/E.

    Panels share one y-scale so that layers compare at a glance; with ``summary`` (from
    :func:`load_summary`) each panel writes its CV and MaxVio.
    """
    from matplotlib.ticker import MaxNLocator

    from moescope.core.figures import subplot_grid

    layers = per_expert["layer"].unique().sort().to_list()
    fig, axes = subplot_grid(len(layers), width=3.0, height=2.2)
    top = 100 * float(per_expert["assignment_share"].max() or 0.0) * 1.15 or 1.0
    metrics = {}
    if summary is not None:
        metrics = {r["layer"]: (r["cv"], r["max_violation"]) for r in summary.iter_rows(named=True)}
    for ax, layer in zip(axes, layers, strict=False):
        g = per_expert.filter(pl.col("layer") == layer).sort("expert")
        E = g.height
        ax.bar(g["expert"].to_numpy(), 100 * g["assignment_share"].to_numpy(), color="tab:blue", width=0.85)
        ax.axhline(100 / E, color="red", ls="--", lw=1, label=f"perfect {100 / E:.1f}%")
        ax.set_ylim(0, top)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"layer {layer}", fontsize=9)
        if layer in metrics and metrics[layer][0] is not None:
            cv, mv = metrics[layer]
            ax.text(
                0.98,
                0.95,
                f"CV {cv:.2f}\nMaxVio {mv:.2f}",
                transform=ax.transAxes,
                ha="right",
                va="top",
                fontsize=7,
                bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8, "lw": 0},
            )
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.supxlabel("expert")
    if variable_k:  # a strategy trace: each token used 0..top_k experts
        fig.supylabel("share of assignments (%), every expert a token used")
        fig.suptitle(f"Expert load per layer (variable experts per token, up to {top_k})")
    else:
        fig.supylabel("share of assignments (%), all top-k slots")
        fig.suptitle(f"Expert load per layer (top-{top_k})")
    return fig


def plot_load_heatmap(per_expert: pl.DataFrame):
    """Heatmap layer x expert of the assignment share relative to perfect balance (1/E)."""
    from moescope.core.figures import heatmap

    layers = per_expert["layer"].unique().sort().to_list()
    E = int(per_expert["expert"].max()) + 1
    m = np.full((len(layers), E), np.nan)
    for i, layer in enumerate(layers):
        g = per_expert.filter(pl.col("layer") == layer).sort("expert")
        m[i, g["expert"].to_numpy()] = g["assignment_share"].to_numpy() * E
    return heatmap(
        m,
        xlabel="expert",
        ylabel="layer",
        yticklabels=[str(x) for x in layers],
        title="Load relative to perfect balance (share x E; 1 = balanced)",
        cbar="share x E",
        center=1.0,
    )


def plot_balance_metrics(summary: pl.DataFrame):
    """CV and MaxVio by layer."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(summary["layer"], summary["cv"], "o-", label="CV (ddof 0)")
    ax.plot(summary["layer"], summary["max_violation"], "s-", label="MaxVio")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("imbalance (0 = perfect, unitless)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.set_title("Load imbalance by layer")
    fig.tight_layout()
    return fig
