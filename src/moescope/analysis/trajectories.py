"""Token trajectories: a token's expert sets through the layers (seed 000).

A trajectory is the sequence of a token's expert sets over the selected layers. The analysis keeps
a Bernoulli sample of at most about ``max_tokens`` tokens (every token when the trace is smaller;
``sample_rate`` says which), then gives: the most frequent full paths and partial paths (``window``
consecutive layers) with their counts in the sample, PCA and t-SNE of one-hot path encodings
(``Ls * E`` dimensions, k ones per layer) coloured by domain or token class, and parametric curves
``(E1(l), E2(l))`` of a few tokens, where E1/E2 are the first and second choice (sorted ids when
the trace's slots form a set, ``routing.slot_order == "set"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import polars as pl

from moescope.analysis._stream import PassContext, View, make_context, row_uniform, run_pass
from moescope.errors import ConfigError, DataError
from moescope.trace.reader import Trace

_NUM = re.compile(r"^\s*[0-9]+\s*$")
_WORD = re.compile(r"^[\s▁Ġ]*[^\W\d_]+\s*$")
_SPACE = re.compile(r"^[\s▁ĠĊ]*$")


def token_class(text: str | None) -> str:
    """Coarse class of a token string: space, number, word, punctuation or other."""
    if text is None:
        return "unknown"
    if _SPACE.match(text):
        return "space"
    if _NUM.match(text):
        return "number"
    if _WORD.match(text):
        return "word"
    if all(not c.isalnum() for c in text.strip("▁Ġ ")):
        return "punctuation"
    return "other"


class TrajectoryAccumulator:
    """Keeps a seeded Bernoulli sample of tokens: expert sets (all layers), label, token id, text.

    A row is kept when :func:`~moescope.analysis._stream.row_uniform` of its (document, position)
    falls below the rate, so the sample does not depend on batches, shard groups or arrival order.
    """

    def __init__(self, ctx: PassContext, max_tokens: int = 100_000, seed: int = 0) -> None:
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        self.ctx = ctx
        self.with_text = bool(ctx.trace.columns.get("token_text"))
        self.columns = {"experts", "label", "token_id", "doc_id", "position"}
        self.columns |= {"token"} if self.with_text else set()
        total = ctx.trace.num_tokens
        self.rate = min(1.0, max_tokens / max(total, 1))
        self.seed = seed
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str | None]]] = []

    def update(self, v: View) -> None:
        b = v.batch
        keep = (
            np.ones(v.n, bool) if self.rate >= 1 else row_uniform(b.doc_id, b.position, self.seed) < self.rate
        )
        if not keep.any():
            return
        idx = np.flatnonzero(keep)
        dtype = np.uint8 if self.ctx.E <= 255 else np.uint16
        text = [v.batch.token[i] for i in idx] if self.with_text else [None] * len(idx)
        ex = v.experts[idx]
        if v.slots is not None:  # variable k: padding is stored as E (sorts after every expert)
            ex = np.where(v.slots[idx], ex, self.ctx.E)
        self.parts.append((ex.astype(dtype), v.valid[idx], v.batch.label[idx], v.batch.token_id[idx], text))

    def merge(self, other: TrajectoryAccumulator) -> None:
        self.parts = self.parts + other.parts

    def result(self) -> TrajectorySample:
        if not self.parts:
            raise DataError(f"{self.ctx.trace.path}: the trajectory sample is empty")
        ex = np.concatenate([p[0] for p in self.parts])
        valid = np.concatenate([p[1] for p in self.parts])
        lab = np.concatenate([p[2] for p in self.parts])
        tok = np.concatenate([p[3] for p in self.parts])
        text = [t for p in self.parts for t in p[4]]
        return TrajectorySample(self.ctx, ex, valid, lab, tok, text, self.rate)


class TrajectorySample:
    """The sampled trajectories and the analyses over them."""

    def __init__(self, ctx: PassContext, experts, valid, label, token_id, text, rate: float) -> None:
        self.ctx = ctx
        self.experts = experts  # (n, Ls, k)
        self.valid = valid  # (n, Ls)
        self.label = label
        self.token_id = token_id
        self.text = text
        self.rate = rate

    def _paths(self, start: int, width: int, top: int) -> pl.DataFrame:
        rows = self.valid[:, start : start + width].all(1)
        seg = np.sort(self.experts[rows, start : start + width], axis=-1)  # (m, w, k)
        if len(seg) == 0:
            return pl.DataFrame()
        flat = seg.reshape(len(seg), -1)
        u, counts = np.unique(flat, axis=0, return_counts=True)
        order = np.argsort(-counts, kind="stable")[:top]
        ids = self.ctx.layer_ids[start : start + width]
        E = self.ctx.E  # a variable-k trace's padding (E) is not named
        names = [
            " > ".join("-".join(str(e) for e in r.reshape(width, -1)[i] if e < E) for i in range(width))
            for r in u[order]
        ]
        return pl.DataFrame(
            {
                "first_layer": [ids[0]] * len(order),
                "last_layer": [ids[-1]] * len(order),
                "path": names,
                "count": counts[order],
                "share": counts[order] / len(seg),
                "sampled_tokens": [len(seg)] * len(order),
                "sample_rate": [self.rate] * len(order),
            }
        )

    def top_paths(self, top: int = 20) -> pl.DataFrame:
        """Most frequent full paths (expert sets over all selected layers) in the sample."""
        return self._paths(0, self.ctx.Ls, top)

    def top_partial_paths(self, window: int = 3, top: int = 20) -> pl.DataFrame:
        """Most frequent paths over ``window`` consecutive selected layers, from every start layer."""
        if not 1 <= window <= self.ctx.Ls:
            raise ConfigError(f"window must be in 1..{self.ctx.Ls}, got {window}")
        frames = [self._paths(s, window, top) for s in range(self.ctx.Ls - window + 1)]
        frames = [f for f in frames if f.height]
        return pl.concat(frames).sort("count", descending=True).head(top) if frames else pl.DataFrame()

    def encodings(self) -> np.ndarray:
        """One-hot path encodings ``(n, Ls * E)`` (float32); invalid layers are all zeros."""
        n, Ls, _ = self.experts.shape
        E = self.ctx.E
        X = np.zeros((n, Ls * E), np.float32)
        cols = (np.arange(Ls) * E)[None, :, None] + self.experts.astype(np.int64)  # (n, Ls, k)
        rows = np.broadcast_to(np.arange(n)[:, None, None], cols.shape)
        ok = np.broadcast_to(self.valid[..., None], cols.shape) & (self.experts < E)  # padding: none
        X[rows[ok], cols[ok]] = 1.0
        return X

    def embedding(self, *, pca_points: int = 20000, tsne_points: int = 1000, seed: int = 0) -> pl.DataFrame:
        """PCA (2 components, numpy SVD) and t-SNE (scikit-learn) coordinates of a subsample.

        t-SNE runs on the first 50 principal components of ``tsne_points`` tokens (0 disables it).
        """
        rng = np.random.default_rng(seed)
        n = len(self.experts)
        pick = np.sort(rng.choice(n, size=min(n, pca_points), replace=False))
        X = self.encodings()[pick]
        Xc = X - X.mean(0)
        _, s, vt = np.linalg.svd(Xc, full_matrices=False)
        ncomp = min(50, vt.shape[0])
        Z = Xc @ vt[:ncomp].T  # (m, ncomp)
        var = s**2 / max(np.sum(s**2), 1e-12)
        labels = self.ctx.labels
        dom = [labels[c] if 0 <= c < len(labels) else "" for c in self.label[pick]]
        df = pl.DataFrame(
            {
                "sample_index": pick,
                "token_id": self.token_id[pick],
                "domain": dom,
                "token_class": [token_class(self.text[i]) for i in pick],
                "pc1": Z[:, 0] if ncomp > 0 else np.zeros(len(pick)),
                "pc2": Z[:, 1] if ncomp > 1 else np.zeros(len(pick)),
                "pc1_variance": np.full(len(pick), var[0] if len(var) else np.nan),
                "pc2_variance": np.full(len(pick), var[1] if len(var) > 1 else np.nan),
            }
        )
        t1 = np.full(len(pick), np.nan)
        t2 = np.full(len(pick), np.nan)
        m = min(len(pick), tsne_points)
        if m >= 5:
            from sklearn.manifold import TSNE

            sub = np.sort(rng.choice(len(pick), size=m, replace=False))
            perplexity = float(min(30.0, (m - 1) / 3))
            emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
                Z[sub]
            )
            t1[sub], t2[sub] = emb[:, 0], emb[:, 1]
        return df.with_columns(pl.Series("tsne1", t1).fill_nan(None), pl.Series("tsne2", t2).fill_nan(None))

    def curves(self, n_tokens: int = 12, seed: int = 0) -> pl.DataFrame:
        """``(E1(l), E2(l))`` for ``n_tokens`` sampled tokens with routing at every selected layer."""
        full = np.flatnonzero(self.valid.all(1))
        if len(full) == 0:
            return pl.DataFrame()
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(full, size=min(n_tokens, len(full)), replace=False))
        ex = self.experts[pick].astype(np.int64)
        if not self.ctx.ordered:
            ex = np.sort(ex, axis=-1)
        Ls = self.ctx.Ls
        e2 = ex[..., 1] if self.ctx.k > 1 else ex[..., 0]
        e2 = np.where(e2 < self.ctx.E, e2, ex[..., 0])  # variable k: one expert, E2 = E1
        return pl.DataFrame(
            {
                "curve": np.repeat(np.arange(len(pick)), Ls),
                "sample_index": np.repeat(pick, Ls),
                "layer": np.tile(self.ctx.layer_ids, len(pick)),
                "e1": ex[..., 0].ravel(),
                "e2": e2.ravel(),
                "slot_order": ["rank" if self.ctx.ordered else "set (sorted ids)"] * (len(pick) * Ls),
            }
        )

    def typical_paths(self, n_paths: int = 8) -> pl.DataFrame:
        """The ``n_paths`` most frequent full paths as curves ``(E1(l), E2(l))``, one row per layer.

        Ordering: a path is a sequence of expert *sets*, so E1 is the lower and E2 the higher id of
        the set (top-1: E2 = E1). Ties in frequency go to the path whose layer-to-layer steps are the
        most common in the sample (mean share of tokens taking the same step), so that with few
        tokens, where every full path is seen once, the drawn paths are still typical ones.
        """
        full = np.flatnonzero(self.valid.all(1))
        if len(full) == 0:
            return pl.DataFrame()
        seg = np.sort(self.experts[full], axis=-1)  # (m, Ls, k)
        m, Ls, k = seg.shape
        u, inv, counts = np.unique(seg.reshape(m, -1), axis=0, return_inverse=True, return_counts=True)
        inv = inv.ravel()
        # typicality: how many tokens take each of the path's steps (set at l -> set at l+1)
        E = self.ctx.E
        if self.ctx.variable_k:  # sets of several sizes (padding E): number the distinct sets
            code = np.unique(seg.reshape(m * Ls, k), axis=0, return_inverse=True)[1].reshape(m, Ls)
            base = int(code.max()) + 1 if code.size else 1
        else:
            code = (seg * (E ** np.arange(k))).sum(-1)  # (m, Ls) one integer per set
            base = E**k
        typ = np.zeros(len(u))
        if Ls > 1:
            step = code[:, :-1] * base + code[:, 1:]  # (m, Ls-1)
            share = np.zeros(step.shape)
            for li in range(Ls - 1):
                _, si, sc = np.unique(step[:, li], return_inverse=True, return_counts=True)
                share[:, li] = sc[si.ravel()] / m
            per_token = share.mean(1)
            np.maximum.at(typ, inv, per_token)
        order = np.lexsort((-typ, -counts))[:n_paths]
        rows = []
        for rank, p in enumerate(order):
            sets = u[p].reshape(Ls, k)
            for li, layer in enumerate(self.ctx.layer_ids):
                rows.append(
                    {
                        "path_rank": rank,
                        "layer": layer,
                        "e1": int(sets[li, 0]),
                        "e2": int(sets[li][sets[li] < E][-1]),  # the highest id (padding E excluded)
                        "count": int(counts[p]),
                        "share": counts[p] / m,
                        "typicality": float(typ[p]),
                        "sampled_tokens": m,
                    }
                )
        return pl.DataFrame(rows)


def sample_trajectories(
    trace: Trace,
    layers: Iterable[int] | None = None,
    *,
    max_tokens: int = 100_000,
    seed: int = 0,
    batch_size: int = 65536,
) -> TrajectorySample:
    """Sample trajectories from ``trace``; call :meth:`TrajectorySample.top_paths`, ``embedding``, ``curves``.

    Examples
    --------
    >>> s = sample_trajectories(Trace.open("runs/t"), max_tokens=20000)  # doctest: +SKIP
    >>> s.top_paths(10)  # doctest: +SKIP
    """
    ctx = make_context(trace, layers)
    acc = TrajectoryAccumulator(ctx, max_tokens, seed)
    run_pass(ctx, [acc], batch_size)
    return acc.result()


def plot_embedding(emb: pl.DataFrame, x: str, y: str, color: str, title: str):
    """Scatter of one embedding (``pc1``/``pc2`` or ``tsne1``/``tsne2``) coloured by a category column."""
    import matplotlib.pyplot as plt

    g = emb.drop_nulls([x, y])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    cats = g[color].unique().sort().to_list()
    # a qualitative palette: ten distinct hues first, then tab20's lighter ones
    palette = [plt.cm.tab10(i) for i in range(10)] + [plt.cm.tab20(2 * i + 1) for i in range(10)]
    for i, c in enumerate(cats[:20]):
        h = g.filter(pl.col(color) == c)
        ax.scatter(h[x], h[y], s=5, alpha=0.6, color=palette[i], label=str(c) or "(none)")
    names = {"pc1": "PC1", "pc2": "PC2", "tsne1": "t-SNE 1 (no unit)", "tsne2": "t-SNE 2 (no unit)"}
    labels = []
    for axis in (x, y):
        var = f"{axis}_variance"
        if var in g.columns and g.height and g[var][0] is not None:
            labels.append(f"{names.get(axis, axis)} ({100 * g[var][0]:.1f}% of variance)")
        else:
            labels.append(names.get(axis, axis))
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title, fontsize=10)
    if len(cats) <= 20:
        ax.legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    return fig


def plot_typical_curves(paths: pl.DataFrame, num_experts: int):
    """Typical paths as parametrised curves (E1(l), E2(l)): width = frequency, layers marked.

    Each path is drawn with a small offset so that paths sharing cells stay apart; its first layer
    is a circle, its last a square, and every few layers carry their number.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    n = int(paths["path_rank"].max()) + 1 if paths.height else 0
    cmax = max(int(paths["count"].max()), 1) if paths.height else 1
    for (r,), g in paths.group_by("path_rank", maintain_order=True):
        off = (r - (n - 1) / 2) * 0.5 / max(n, 1)
        x, y = g["e1"].to_numpy() + off, g["e2"].to_numpy() + off
        color = plt.cm.tab10(r % 10)
        lw = 0.8 + 5.0 * g["count"][0] / cmax
        ax.plot(
            x,
            y,
            "-",
            lw=lw,
            color=color,
            alpha=0.75,
            label=f"#{r + 1}: {g['count'][0]} tokens ({g['share'][0]:.1%})",
        )
        ax.plot(x[0], y[0], "o", color=color, ms=7)
        ax.plot(x[-1], y[-1], "s", color=color, ms=7)
        layers = g["layer"].to_list()
        every = max(1, len(layers) // 6)
        for i in range(0, len(layers), every):
            ax.annotate(
                str(layers[i]),
                (x[i], y[i]),
                fontsize=6,
                color=color,
                xytext=(2, 2),
                textcoords="offset points",
            )
    ticks = np.arange(num_experts)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlim(-0.6, num_experts - 0.4)
    ax.set_ylim(-0.6, num_experts - 0.4)
    ax.grid(alpha=0.3)
    ax.set_xlabel("E1(l): lower expert id of the set")
    ax.set_ylabel("E2(l): higher expert id of the set")
    tokens = int(paths["sampled_tokens"][0]) if paths.height else 0
    ax.set_title(
        f"{n} most frequent full paths of {tokens} tokens (o = first layer, square = last, numbers = layers)",
        fontsize=9,
    )
    ax.legend(
        fontsize=7,
        title="path: frequency = line width",
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
    )
    fig.tight_layout()
    return fig


def plot_curves_3d(paths: pl.DataFrame, num_experts: int):
    """Typical paths as 3D curves (E1, E2, layer); E1 < E2 are the set's sorted ids."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(7.5, 6.5))
    ax = fig.add_subplot(projection="3d")
    cmax = max(int(paths["count"].max()), 1) if paths.height else 1
    for (r,), g in paths.group_by("path_rank", maintain_order=True):
        lw = 0.8 + 4.0 * g["count"][0] / cmax
        ax.plot(
            g["e1"].to_numpy(),
            g["e2"].to_numpy(),
            g["layer"].to_numpy(),
            "-o",
            ms=2,
            lw=lw,
            color=plt.cm.tab10(r % 10),
            label=f"#{r + 1}: {g['count'][0]} tokens",
        )
    ax.set_xlabel("E1 (lower id)")
    ax.set_ylabel("E2 (higher id)")
    ax.set_zlabel("MoE layer")
    ax.set_xticks(np.arange(num_experts))
    ax.set_yticks(np.arange(num_experts))
    ax.set_title("Typical paths as curves (E1(l), E2(l), l)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def plot_top_paths(paths: pl.DataFrame, title: str):
    """Horizontal bars of the most frequent paths with their counts, each labelled with its layers."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.3 * paths.height + 1.5))
    raw = paths["path"].to_list()
    if "first_layer" in paths.columns:
        raw = [
            f"L{a}-L{b}: {p}" for a, b, p in zip(paths["first_layer"], paths["last_layer"], raw, strict=True)
        ]
    labels = [p if len(p) < 80 else p[:77] + "..." for p in raw]
    ax.barh(np.arange(paths.height)[::-1], paths["count"].to_numpy())
    ax.set_yticks(np.arange(paths.height)[::-1], labels=labels, fontsize=6)
    ax.set_xlabel("tokens in the sample")
    ax.set_ylabel("path (layers: expert sets)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title + " (label: layers covered, then the expert set at each)", fontsize=10)
    fig.tight_layout()
    return fig
