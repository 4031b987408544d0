"""Router-logit density models (seed 002, stages 2 to 6): fit on one trace, score others.

Stage 2 fits, per layer, a kernel density on a seeded sample of the router-logit vectors: a Gaussian
KDE via ``scipy.stats.gaussian_kde`` as the seed does, or another kernel via scikit-learn's
``KernelDensity`` (tophat, epanechnikov, exponential, linear, cosine). ``trim=t`` fits on the t
largest logits of each vector sorted in decreasing order, a low-dimensional view that stays
tractable when E is large (our reading of the seed's "trimmed" models).

P-values are conformal: part of the sample (``holdout``) is kept out of the fit, and the p-value of
an observed vector x is ``(1 + #{reference r: f(r) <= f(x)}) / (1 + n_ref)``. Vectors drawn from the
fitted distribution get uniform p-values; vectors the model finds unusual pile up near 0. Marginal
p-values (by k-th best logit, by expert ordered by popularity) use 1-D Gaussian KDEs of the same
sample: ``p = 2 min(F(x), 1 - F(x))``.

Models are saved as ``.npz`` (arrays, loaded with ``allow_pickle=False``) plus a ``.json`` of
metadata: never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from moescope.analysis._stream import PassContext, View, make_context, require, row_uniform, run_pass
from moescope.errors import ConfigError, DataError
from moescope.trace.atomic import atomic_write, atomic_write_json
from moescope.trace.reader import Trace

KERNELS = ("gaussian", "tophat", "epanechnikov", "exponential", "linear", "cosine")
FORMAT = "moescope-logit-density"


class LogitSampleAccumulator:
    """A seeded Bernoulli sample of about ``max_points`` valid logit vectors per layer (rows picked by a
    hash of document and position, so the sample does not depend on batches or shard groups)."""

    def __init__(self, ctx: PassContext, max_points: int = 2000, seed: int = 0) -> None:
        require(ctx.trace, "logits", "router-logit density")
        if max_points < 10:
            raise ConfigError(f"kde_points must be >= 10, got {max_points}")
        self.ctx = ctx
        self.columns = {"logits", "doc_id", "position"}
        self.rate = min(1.0, 1.3 * max_points / max(ctx.trace.num_tokens, 1))
        self.max_points = max_points
        self.seed = seed
        self.parts: list[list[np.ndarray]] = [[] for _ in ctx.cols]

    def update(self, v: View) -> None:
        if v.logits is None:
            return
        b = v.batch
        pick = (
            row_uniform(b.doc_id, b.position, self.seed) < self.rate if self.rate < 1 else np.ones(v.n, bool)
        )
        for i in range(self.ctx.Ls):
            ok = pick & v.logit_valid[:, i]
            if ok.any():
                self.parts[i].append(v.logits[ok, i].copy())

    def merge(self, other: LogitSampleAccumulator) -> None:
        self.parts = [a + b for a, b in zip(self.parts, other.parts, strict=True)]

    def result(self) -> dict[int, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        out = {}
        for layer, parts in zip(self.ctx.layer_ids, self.parts, strict=True):
            x = np.concatenate(parts) if parts else np.zeros((0, self.ctx.E), np.float32)
            if len(x) > self.max_points:
                x = x[rng.choice(len(x), self.max_points, replace=False)]
            out[layer] = x
        return out


def sample_logits(
    trace: Trace, layers: Iterable[int] | None = None, *, max_points: int = 2000, seed: int = 0
) -> dict[int, np.ndarray]:
    """A seeded sample of at most ``max_points`` logit vectors ``(m, E)`` per layer."""
    ctx = make_context(trace, layers)
    acc = LogitSampleAccumulator(ctx, max_points, seed)
    run_pass(ctx, [acc])
    return acc.result()


def features(logits: np.ndarray, trim: int | None) -> np.ndarray:
    """Raw logit vectors, or their ``trim`` largest values in decreasing order; ``(m, E)`` -> ``(m, d)``."""
    x = np.asarray(logits, np.float64)
    if trim is None:
        return x
    return -np.sort(-x, axis=-1)[:, :trim]


@dataclass
class LogitDensity:
    """Per-layer fitted densities: training points, held-out reference log-densities, bandwidths."""

    kernel: str
    bandwidth: str | float
    trim: int | None
    num_experts: int
    top_k: int
    points: dict[int, np.ndarray]  # layer -> (m, d) training features
    raw: dict[int, np.ndarray]  # layer -> (m, E) training logits (for marginals)
    ref_logdens: dict[int, np.ndarray] = field(default_factory=dict)
    popularity: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (E,) top-k counts
    bw_value: dict[int, float] = field(default_factory=dict)  # resolved: scipy factor or sklearn bandwidth
    source: str = ""
    _models: dict = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> list[int]:
        return sorted(self.points)

    def _model(self, layer: int):
        from scipy import stats

        if layer not in self._models:
            pts = self.points[layer]
            if self.kernel == "gaussian":
                try:
                    self._models[layer] = stats.gaussian_kde(
                        pts.T, bw_method=self.bw_value.get(layer, self.bandwidth)
                    )
                except np.linalg.LinAlgError:
                    raise DataError(
                        f"layer {layer}: the logit sample's covariance is singular ({len(pts)} points in"
                        f" {pts.shape[1]} dimensions; bf16 logits tie often): use kde_trim or more points"
                    ) from None
            else:
                from sklearn.neighbors import KernelDensity

                self._models[layer] = KernelDensity(
                    kernel=self.kernel, bandwidth=self.bw_value.get(layer, self.bandwidth)
                ).fit(pts)
        return self._models[layer]

    def log_density(self, layer: int, logits: np.ndarray) -> np.ndarray:
        """Log density of logit vectors ``(m, E)`` under the layer's model."""
        if layer not in self.points:
            raise ConfigError(f"the density model has no layer {layer}; it has {self.layers}")
        x = features(logits, self.trim)
        m = self._model(layer)
        if self.kernel == "gaussian":
            return m.logpdf(x.T)
        return m.score_samples(x)

    def p_values(self, layer: int, logits: np.ndarray) -> np.ndarray:
        """Conformal p-values of logit vectors against the held-out reference sample."""
        ref = np.sort(self.ref_logdens[layer])
        ld = self.log_density(layer, logits)
        return (1 + np.searchsorted(ref, ld, side="right")) / (1 + len(ref))

    # ------------------------------------------------------------ save / load, never pickle
    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path.npz`` (arrays) and ``path.json`` (metadata) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for layer in self.layers:
            arrays[f"points_{layer}"] = self.points[layer]
            arrays[f"raw_{layer}"] = self.raw[layer]
            arrays[f"ref_{layer}"] = self.ref_logdens[layer]
            arrays[f"pop_{layer}"] = self.popularity[layer]
        npz = path.with_suffix(".npz")

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)

        atomic_write(npz, write)
        meta = {
            "format": FORMAT,
            "version": 1,
            "kernel": self.kernel,
            "bandwidth": self.bandwidth,
            "trim": self.trim,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "layers": self.layers,
            "bandwidth_value": {str(k): v for k, v in self.bw_value.items()},
            "source": self.source,
            "points": {str(k): len(v) for k, v in self.points.items()},
        }
        atomic_write_json(path.with_suffix(".json"), meta)
        return npz, path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | Path) -> LogitDensity:
        """Read a model written by :meth:`save`; errors name the file and field."""
        path = Path(path)
        meta_path, npz_path = path.with_suffix(".json"), path.with_suffix(".npz")
        for p in (meta_path, npz_path):
            if not p.is_file():
                raise DataError(f"{p}: missing (a density model is a .json plus a .npz)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta_path}: invalid JSON: {exc.msg}") from None
        if meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
        with np.load(npz_path, allow_pickle=False) as z:
            try:
                get = {
                    name: {int(layer): z[f"{name}_{layer}"] for layer in meta["layers"]}
                    for name in ("points", "raw", "ref", "pop")
                }
            except KeyError as exc:
                raise DataError(f"{npz_path}: missing array {exc}") from None
        return cls(
            kernel=meta["kernel"],
            bandwidth=meta["bandwidth"],
            trim=meta["trim"],
            num_experts=meta["num_experts"],
            top_k=meta["top_k"],
            points=get["points"],
            raw=get["raw"],
            ref_logdens=get["ref"],
            popularity=get["pop"],
            bw_value={int(k): v for k, v in meta["bandwidth_value"].items()},
            source=meta.get("source", ""),
        )


def _parse_bandwidth(bandwidth: str | float) -> str | float:
    if isinstance(bandwidth, str) and bandwidth not in ("scott", "silverman"):
        try:
            bandwidth = float(bandwidth)
        except ValueError:
            raise ConfigError(
                f"`kde_bandwidth` must be scott, silverman or a positive number, got {bandwidth!r}"
            ) from None
    if isinstance(bandwidth, float) and bandwidth <= 0:
        raise ConfigError(f"kde_bandwidth must be positive, got {bandwidth}")
    return bandwidth


def fit_from_samples(
    samples: dict[int, np.ndarray],
    *,
    num_experts: int,
    top_k: int,
    kernel: str = "gaussian",
    bandwidth: str | float = "scott",
    trim: int | None = None,
    holdout: float = 0.3,
    seed: int = 0,
    source: str = "",
) -> LogitDensity:
    """Fit per-layer densities on sampled logits ``{layer: (m, E)}``, keeping ``holdout`` for p-values."""
    if kernel not in KERNELS:
        raise ConfigError(f"kde_kernel must be one of {KERNELS}, got {kernel!r}")
    if trim is not None and not 1 <= trim <= num_experts:
        raise ConfigError(f"kde_trim must be in 1..{num_experts}, got {trim}")
    if not 0 < holdout < 1:
        raise ConfigError(f"holdout must be in (0, 1), got {holdout}")
    bandwidth = _parse_bandwidth(bandwidth)
    rng = np.random.default_rng(seed)
    model = LogitDensity(kernel, bandwidth, trim, num_experts, top_k, {}, {}, source=source)
    for layer, x in samples.items():
        if len(x) < 10:
            raise DataError(f"layer {layer}: only {len(x)} logit vectors to fit a density on (need >= 10)")
        perm = rng.permutation(len(x))
        n_ref = max(5, round(holdout * len(x)))
        ref, fit = x[perm[:n_ref]], x[perm[n_ref:]]
        model.points[layer] = features(fit, trim)
        model.raw[layer] = fit.astype(np.float32)
        top = np.argpartition(-fit, top_k - 1, axis=1)[:, :top_k]
        model.popularity[layer] = np.bincount(top.ravel(), minlength=num_experts)
        m = model._model(layer)
        model.bw_value[layer] = float(m.factor if kernel == "gaussian" else m.bandwidth_)
        model.ref_logdens[layer] = model.log_density(layer, ref)
    return model


def fit_logit_density(
    trace: Trace,
    layers: Iterable[int] | None = None,
    *,
    kernel: str = "gaussian",
    bandwidth: str | float = "scott",
    trim: int | None = None,
    max_points: int = 2000,
    seed: int = 0,
) -> LogitDensity:
    """Fit per-layer router-logit densities on a seeded sample of ``trace`` (stage 2 of seed 002).

    Examples
    --------
    >>> model = fit_logit_density(Trace.open("runs/lambada"), trim=8)  # doctest: +SKIP
    >>> model.save("models/lambada-kde")  # doctest: +SKIP
    >>> score_logits(model, Trace.open("runs/wikitext"))["summary"]  # doctest: +SKIP
    """
    samples = sample_logits(trace, layers, max_points=max_points, seed=seed)
    return fit_from_samples(
        samples,
        num_experts=trace.num_experts,
        top_k=trace.top_k,
        kernel=kernel,
        bandwidth=bandwidth,
        trim=trim,
        seed=seed,
        source=str(trace.path),
    )


def _marginal_p(train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Two-sided p-values of ``x`` under a 1-D Gaussian KDE of ``train`` (Scott bandwidth)."""
    from scipy import special

    train = np.asarray(train, np.float64)
    h = max(train.std(), 1e-6) * len(train) ** (-0.2)
    grid = np.linspace(train.min() - 6 * h, train.max() + 6 * h, 512)  # the CDF is smooth at scale h
    cdf_grid = special.ndtr((grid[:, None] - train[None, :]) / h).mean(1)
    cdf = np.interp(np.asarray(x, np.float64), grid, cdf_grid, left=0.0, right=1.0)
    return np.clip(2 * np.minimum(cdf, 1 - cdf), 0, 1)


def score_from_samples(model: LogitDensity, samples: dict[int, np.ndarray]) -> dict[str, pl.DataFrame]:
    """Stage 6 on sampled logits: joint p-values, their summary against the uniform, by rank and popularity."""
    from scipy import stats

    joint, summ, by_rank, by_pop = [], [], [], []
    k = model.top_k
    for layer, x in samples.items():
        if layer not in model.points:
            raise ConfigError(f"the density model has no layer {layer}; it has {model.layers}")
        if len(x) == 0:
            continue
        ld = model.log_density(layer, x)
        p = model.p_values(layer, x)
        joint.append(pl.DataFrame({"layer": np.full(len(p), layer), "log_density": ld, "p_value": p}))
        ks = stats.kstest(p, "uniform")
        summ.append(
            {
                "layer": layer,
                "vectors": len(p),
                "mean_p": float(p.mean()),
                "share_p_below_0.05": float((p < 0.05).mean()),
                "ks_stat_vs_uniform": float(ks.statistic),
                "ks_p_value": float(ks.pvalue),
            }
        )
        train = model.raw[layer]
        srt_t, srt_x = -np.sort(-train, 1), -np.sort(-x, 1)
        for r in range(min(k + 1, x.shape[1])):
            pr = _marginal_p(srt_t[:, r], srt_x[:, r])
            by_rank.append(
                {
                    "layer": layer,
                    "rank": r + 1,
                    "vectors": len(pr),
                    "mean_p": float(pr.mean()),
                    "share_p_below_0.05": float((pr < 0.05).mean()),
                    "ks_stat_vs_uniform": float(stats.kstest(pr, "uniform").statistic),
                }
            )
        order = np.argsort(-model.popularity[layer], kind="stable")
        for pos, e in enumerate(order):
            pe = _marginal_p(train[:, e], x[:, e])
            by_pop.append(
                {
                    "layer": layer,
                    "popularity_rank": pos + 1,
                    "expert": int(e),
                    "train_topk_count": int(model.popularity[layer][e]),
                    "mean_p": float(pe.mean()),
                    "share_p_below_0.05": float((pe < 0.05).mean()),
                    "ks_stat_vs_uniform": float(stats.kstest(pe, "uniform").statistic),
                }
            )
    return {
        "p_values": pl.concat(joint) if joint else pl.DataFrame(),
        "summary": pl.DataFrame(summ),
        "by_rank": pl.DataFrame(by_rank),
        "by_popularity": pl.DataFrame(by_pop),
    }


def score_logits(
    model: LogitDensity, trace: Trace, *, max_points: int = 2000, seed: int = 1
) -> dict[str, pl.DataFrame]:
    """Score a seeded sample of ``trace``'s logit vectors under ``model`` (stage 6 of seed 002)."""
    if trace.num_experts != model.num_experts:
        raise ConfigError(
            f"{trace.path}: {trace.num_experts} experts, the density model has {model.num_experts}"
        )
    samples = sample_logits(
        trace, [x for x in model.layers if x in trace.moe_layers], max_points=max_points, seed=seed
    )
    return score_from_samples(model, samples)


# ---------------------------------------------------------------------------- plots (stages 3 to 6)
def logit_distributions(samples: dict[int, np.ndarray], router_kind: str, bins: int = 60) -> pl.DataFrame:
    """Histograms per layer of raw logits and of router probabilities (softmax, or sigmoid/sum), all experts."""
    from scipy import special

    rows = []
    for layer, x in samples.items():
        if not len(x):
            continue
        x = x.astype(np.float64)
        if router_kind == "sigmoid":
            s = special.expit(x)
            p = s / s.sum(1, keepdims=True)
        else:
            p = special.softmax(x, axis=1)
        for name, vals, rng in (("raw_logit", x.ravel(), None), ("probability", p.ravel(), (0.0, 1.0))):
            c, edges = np.histogram(vals, bins=bins, range=rng)
            rows.append(
                pl.DataFrame(
                    {
                        "layer": layer,
                        "quantity": name,
                        "bin_left": edges[:-1],
                        "bin_right": edges[1:],
                        "count": c,
                    }
                )
            )
    return pl.concat(rows)


def plot_logit_distributions(hist: pl.DataFrame, quantity: str):
    from moescope.core.figures import subplot_grid

    h = hist.filter(pl.col("quantity") == quantity)
    layers = h["layer"].unique().sort().to_list()
    fig, axes = subplot_grid(len(layers), width=2.8, height=2.1)
    for ax, layer in zip(axes, layers, strict=False):
        g = h.filter(pl.col("layer") == layer)
        left = g["bin_left"].to_numpy()
        ax.bar(left, g["count"].to_numpy(), width=g["bin_right"].to_numpy() - left, align="edge")
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=6)
        if quantity == "probability":
            ax.set_yscale("log")
    fig.supxlabel("router probability (softmax)" if quantity == "probability" else "raw router logit")
    fig.supylabel("expert-token pairs" + (" (log scale)" if quantity == "probability" else ""))
    fig.suptitle(f"Router {quantity.replace('_', ' ')} distribution (all experts)")
    return fig


def per_expert_distributions(samples: dict[int, np.ndarray], layer: int, bins: int = 40) -> pl.DataFrame:
    """Stage 4: histogram of each expert's raw logit at one layer."""
    x = samples[layer]
    lo, hi = float(x.min()), float(x.max())
    rows = []
    for e in range(x.shape[1]):
        c, edges = np.histogram(x[:, e], bins=bins, range=(lo, hi))
        rows.append(
            pl.DataFrame(
                {"layer": layer, "expert": e, "bin_left": edges[:-1], "bin_right": edges[1:], "count": c}
            )
        )
    return pl.concat(rows)


def plot_per_expert(hist: pl.DataFrame):
    from moescope.core.figures import subplot_grid

    experts = hist["expert"].unique().sort().to_list()
    fig, axes = subplot_grid(len(experts), width=2.0, height=1.5, max_cols=8)
    for ax, e in zip(axes, experts, strict=False):
        g = hist.filter(pl.col("expert") == e)
        left = g["bin_left"].to_numpy()
        ax.bar(left, g["count"].to_numpy(), width=g["bin_right"].to_numpy() - left, align="edge")
        ax.set_title(f"expert {e}", fontsize=7)
        ax.tick_params(labelsize=5)
    fig.supxlabel("raw router logit")
    fig.supylabel("tokens")
    fig.suptitle(f"Raw logit per expert, layer {hist['layer'][0]}")
    return fig


def kernel_comparison(
    model: LogitDensity,
    layer: int,
    kernels: Iterable[str] = ("gaussian", "epanechnikov", "tophat"),
    grid: int = 200,
) -> pl.DataFrame:
    """Stage 5: 1-D densities of the top-1 logit under several kernels (same Scott bandwidth), the KDE
    CDF against the empirical CDF, for one layer."""
    from scipy import special
    from sklearn.neighbors import KernelDensity

    top1 = -np.sort(-model.raw[layer].astype(np.float64), 1)[:, 0]
    h = max(top1.std(), 1e-6) * len(top1) ** (-0.2)
    xs = np.linspace(top1.min() - 3 * h, top1.max() + 3 * h, grid)
    cols = {"layer": np.full(grid, layer), "top1_logit": xs}
    for kern in kernels:
        kd = KernelDensity(kernel=kern, bandwidth=h).fit(top1[:, None])
        cols[f"density_{kern}"] = np.exp(kd.score_samples(xs[:, None]))
    cols["kde_cdf"] = special.ndtr((xs[:, None] - top1[None, :]) / h).mean(1)
    cols["empirical_cdf"] = np.searchsorted(np.sort(top1), xs, side="right") / len(top1)
    return pl.DataFrame(cols)


def plot_kernel_comparison(df: pl.DataFrame):
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for c in [c for c in df.columns if c.startswith("density_")]:
        a.plot(df["top1_logit"], df[c], label=c.removeprefix("density_"))
    a.set_xlabel("top-1 logit")
    a.set_ylabel("density")
    a.set_title("Kernel comparison (same bandwidth)")
    a.legend(fontsize=8)
    b.plot(df["top1_logit"], df["kde_cdf"], label="Gaussian KDE")
    b.step(df["top1_logit"], df["empirical_cdf"], where="post", label="empirical")
    b.set_xlabel("top-1 logit")
    b.set_ylabel("cumulative probability")
    b.set_title(f"Cumulative density, layer {df['layer'][0]}")
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def pvalue_histogram(pv: pl.DataFrame, bins: int = 20) -> pl.DataFrame:
    rows = []
    for (layer,), g in pv.group_by("layer", maintain_order=True):
        c, edges = np.histogram(g["p_value"].to_numpy(), bins=bins, range=(0, 1))
        rows.append(
            pl.DataFrame(
                {
                    "layer": layer,
                    "bin_left": edges[:-1],
                    "bin_right": edges[1:],
                    "count": c,
                    "uniform_count": np.full(bins, len(g) / bins),
                }
            )
        )
    return pl.concat(rows)


def plot_pvalues(hist: pl.DataFrame, title: str):
    from moescope.core.figures import subplot_grid

    layers = hist["layer"].unique().sort().to_list()
    fig, axes = subplot_grid(len(layers), width=2.8, height=2.1)
    for ax, layer in zip(axes, layers, strict=False):
        g = hist.filter(pl.col("layer") == layer)
        left = g["bin_left"].to_numpy()
        ax.bar(left, g["count"].to_numpy(), width=g["bin_right"].to_numpy() - left, align="edge")
        ax.axhline(g["uniform_count"][0], color="red", ls="--", lw=1)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.supxlabel("conformal p-value")
    fig.supylabel("logit vectors")
    fig.suptitle(title + " (red: uniform)")
    return fig


def plot_pvalue_groups(df: pl.DataFrame, group: str, title: str):
    """Share of p < 0.05 by rank or popularity rank, one line per layer, against the nominal 0.05."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for (layer,), g in df.group_by("layer", maintain_order=True):
        ax.plot(g[group], g["share_p_below_0.05"], "-", lw=1, alpha=0.7, label=f"layer {layer}")
    ax.axhline(0.05, color="red", ls="--", label="nominal 0.05")
    ax.set_xlabel(group.replace("_", " "))
    ax.set_ylabel("share of p < 0.05")
    ax.set_title(title)
    if df["layer"].n_unique() <= 12:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def model_variants(
    num_experts: int, top_k: int, kernels: Iterable[str] | None = None
) -> list[tuple[str, int | None]]:
    """Seed 002's stage-2 family: the full Gaussian model, ``_trimmed_{t}`` Gaussian models for
    t = k and 2k (below E), and one full-space model per other kernel."""
    out: list[tuple[str, int | None]] = [("gaussian", None)]
    for t in sorted({top_k, 2 * top_k}):
        if 1 <= t < num_experts:
            out.append(("gaussian", t))
    for kern in kernels if kernels is not None else ("epanechnikov", "tophat", "exponential"):
        if kern != "gaussian":
            out.append((kern, None))
    return out


def variant_name(kernel: str, trim: int | None) -> str:
    """File-name suffix as in seed 002: ``""`` (full Gaussian), ``_trimmed_{t}`` or ``_{kernel}``."""
    if trim is not None:
        return f"_trimmed_{trim}" + ("" if kernel == "gaussian" else f"_{kernel}")
    return "" if kernel == "gaussian" else f"_{kernel}"


def compare_models(
    fit_samples: dict[int, np.ndarray],
    score_samples: dict[int, np.ndarray],
    *,
    num_experts: int,
    top_k: int,
    variants: Iterable[tuple[str, int | None]] | None = None,
    bandwidth: str | float = "scott",
    seed: int = 0,
    source: str = "",
) -> tuple[pl.DataFrame, dict[str, LogitDensity]]:
    """Stage 2 as seed 002 lists it: full, trimmed and per-kernel models fitted in one run and
    compared on held-out logit vectors.

    Per model and layer: the mean held-out log-density (nats per vector; comparable between models
    of the same dimension, ``dims``), the share of held-out vectors with zero density (compact
    kernels), and the calibration of the conformal p-values (KS distance to the uniform: 0 for a
    model that describes the held-out data, larger when it does not).
    """
    from scipy import stats

    rows, models = [], {}
    for kernel, trim in variants if variants is not None else model_variants(num_experts, top_k):
        name = variant_name(kernel, trim)
        try:
            model = fit_from_samples(
                fit_samples,
                num_experts=num_experts,
                top_k=top_k,
                kernel=kernel,
                bandwidth=bandwidth,
                trim=trim,
                seed=seed,
                source=source,
            )
        except DataError as exc:  # a singular covariance in this space: say so, keep the others
            rows.append({"model": name or "_full", "kernel": kernel, "trim": trim, "note": str(exc)})
            continue
        models[name] = model
        for layer, x in score_samples.items():
            if len(x) == 0 or layer not in model.points:
                continue
            ld = model.log_density(layer, x)
            finite = np.isfinite(ld)
            p = model.p_values(layer, x)
            rows.append(
                {
                    "model": name or "_full",
                    "kernel": kernel,
                    "trim": trim,
                    "dims": int(model.points[layer].shape[1]),
                    "layer": layer,
                    "heldout_vectors": len(x),
                    "heldout_mean_logdensity": float(ld[finite].mean()) if finite.any() else None,
                    "zero_density_share": float(1 - finite.mean()),
                    "ks_stat_vs_uniform": float(stats.kstest(p, "uniform").statistic),
                    "bandwidth": model.bw_value.get(layer),
                    "note": "",
                }
            )
    return pl.DataFrame(rows, infer_schema_length=None), models


def plot_model_comparison(df: pl.DataFrame):
    """Held-out mean log-density (per dimension group) and p-value calibration of every stage-2 model, by layer."""
    import matplotlib.pyplot as plt

    g = (
        df.filter(pl.col("heldout_mean_logdensity").is_not_null())
        if "heldout_mean_logdensity" in df.columns
        else df
    )
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), sharex=True)
    names = g["model"].unique(maintain_order=True).to_list() if g.height else []
    for i, name in enumerate(names):
        h = g.filter(pl.col("model") == name)
        style = "-" if h["trim"].null_count() == h.height else "--"
        label = f"{name} ({h['kernel'][0]}, {h['dims'][0]} dims)"
        a.plot(
            h["layer"],
            h["heldout_mean_logdensity"],
            style + "o",
            ms=3,
            color=plt.cm.tab10(i % 10),
            label=label,
        )
        b.plot(
            h["layer"], h["ks_stat_vs_uniform"], style + "o", ms=3, color=plt.cm.tab10(i % 10), label=label
        )
    a.set_xlabel("MoE layer")
    a.set_ylabel("held-out mean log density (nats / vector)")
    a.set_title("Fit: higher is better (compare models of equal dims)", fontsize=9)
    b.set_xlabel("MoE layer")
    b.set_ylabel("KS distance of p-values to uniform")
    b.set_title("Calibration on held-out vectors: 0 is perfect", fontsize=9)
    for ax in (a, b):
        ax.xaxis.get_major_locator().set_params(integer=True)
    b.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Stage 2: full, trimmed and per-kernel density models fitted in one run")
    fig.tight_layout()
    return fig


def plot_weight_sums_and_counts(ws: pl.DataFrame, *, variable_k: bool = False):
    """Stage 3: per layer and expert, the sum of routing weights and the number of times chosen."""
    import matplotlib.pyplot as plt

    layers = ws["layer"].unique().sort().to_list()
    E = int(ws["expert"].max()) + 1
    fig, axes = plt.subplots(1, 2, figsize=(min(20, 4 + 0.35 * E) * 1.6, min(12, 2.5 + 0.25 * len(layers))))
    for ax, col, label in (
        (axes[0], "weight_sum", "sum of routing weights"),
        (
            axes[1],
            "assignments",
            "times chosen (every expert a token used)" if variable_k else "times chosen (top-k slots)",
        ),
    ):
        m = np.full((len(layers), E), np.nan)
        li = {layer: i for i, layer in enumerate(layers)}
        m[[li[x] for x in ws["layer"].to_list()], ws["expert"].to_numpy()] = (
            ws[col].fill_null(np.nan).to_numpy()
        )
        im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(im, ax=ax, label=label)
        step = max(1, E // 32)
        ax.set_xticks(np.arange(0, E, step), labels=[str(e) for e in range(0, E, step)], fontsize=7)
        lstep = max(1, len(layers) // 32)
        ax.set_yticks(np.arange(0, len(layers), lstep), labels=[str(x) for x in layers[::lstep]], fontsize=7)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"Stage 3: {label}", fontsize=10)
    fig.tight_layout()
    return fig
