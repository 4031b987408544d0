"""Vocabulary and domain specialisation of experts (OLMoE, arXiv 2409.02060), and trace comparison.

Vocabulary: for a token id seen at least ``min_count`` times at a layer, the fraction of its
occurrences routed to its most frequent expert, ``max_e N(x, e) / N(x)`` (OLMoE's definition; 1 =
always that expert, uniform routing gives about k/E). Each expert's top tokens are those with the
largest fraction ``N(x, e) / N(x)``.

Domain: each expert's fraction of a domain's tokens ``N(d, e) / N(d)`` against the uniform k/E,
the Jensen-Shannon divergence (bits) between domains' load distributions, and a permutation test:
the statistic is ``I(domain; expert)`` in bits averaged over layers, recomputed with the domain
labels shuffled between *documents* (tokens of a document are not independent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import polars as pl

from moescope.analysis._stream import (
    PassContext,
    View,
    bincount,
    check_same_model,
    entropy_bits,
    make_context,
    run_pass,
)
from moescope.errors import ConfigError
from moescope.trace.reader import Trace

DENSE_CELLS = 1 << 24
MAX_DOC_CELLS = 1 << 26


class _SparseCounter:
    """Counts of int64 keys with memory bounded by the number of distinct keys."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self._pk: list[np.ndarray] = []
        self._pc: list[np.ndarray] = []
        self._pending = 0

    def add(self, keys: np.ndarray) -> None:
        u, c = np.unique(keys, return_counts=True)
        self._pk.append(u)
        self._pc.append(c)
        self._pending += len(u)
        if self._pending > max(1 << 22, len(self.keys)):
            self.compact()

    def add_counts(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts[i]`` to key ``keys[i]`` (keys distinct)."""
        self._pk.append(np.asarray(keys, np.int64))
        self._pc.append(np.asarray(counts, np.int64))
        self._pending += len(keys)
        if self._pending > max(1 << 22, len(self.keys)):
            self.compact()

    def compact(self) -> None:
        if not self._pk:
            return
        k = np.concatenate([self.keys, *self._pk])
        c = np.concatenate([self.counts, *self._pc])
        u, inv = np.unique(k, return_inverse=True)
        self.keys, self.counts = u, np.bincount(inv, weights=c, minlength=len(u)).astype(np.int64)
        self._pk, self._pc, self._pending = [], [], 0


class VocabAccumulator:
    """Per (layer, token id): occurrences, and per (layer, token id, expert): assignments."""

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx
        self.with_text = bool(ctx.trace.columns.get("token_text"))
        self.columns = {"experts", "token_id"} | ({"token"} if self.with_text else set())
        self.V = 0
        self.dense: np.ndarray | None = np.zeros((ctx.Ls, 0, ctx.E), np.int64)
        self.sparse: _SparseCounter | None = None
        self.text: dict[int, str] = {}
        # variable k: occurrences are not assignments / k; the first slots count them (one per row)
        self.occ: VocabAccumulator | None = None
        if ctx.variable_k:
            self.occ = VocabAccumulator(dataclasses.replace(ctx, variable_k=False))
            self.occ.with_text = False

    def _sparsify(self) -> None:
        """Move the dense counts to a sparse counter (token ids too large for a dense array)."""
        if self.dense is None:
            return
        self.sparse = _SparseCounter()
        ls, t, e = np.nonzero(self.dense)
        if len(ls):
            keys = (ls * (1 << 31) + t) * self.ctx.E + e
            self.sparse.keys, self.sparse.counts = keys, self.dense[ls, t, e]
        self.dense = None

    def _grow(self, V: int) -> None:
        if self.dense is not None and V > self.V:
            if self.ctx.Ls * V * self.ctx.E > DENSE_CELLS:
                self._sparsify()
            else:
                pad = max(V, int(self.V * 1.5))
                self.dense = np.pad(self.dense, ((0, 0), (0, pad - self.V), (0, 0)))
                self.V = pad

    def update(self, v: View) -> None:
        tok = v.batch.token_id.astype(np.int64)
        keep = tok >= 0
        if not keep.any():
            return
        self._grow(int(tok.max()) + 1)
        Ls, E = self.ctx.Ls, self.ctx.E
        ok = v.valid & keep[:, None]  # (n, Ls)
        lay = np.arange(Ls)[None, :, None]
        if v.slots is not None:  # variable k: count the slots used; occurrences from the first slots
            first = dataclasses.replace(v, experts=v.experts[..., :1], slots=None)
            self.occ.update(first)
            ok = v.slots & keep[:, None, None]
        if self.dense is not None:
            key = (lay * self.V + tok[:, None, None]) * E + v.experts  # (n, Ls, k)
            self.dense += bincount(key[ok], Ls * self.V * E).reshape(Ls, self.V, E)
        else:
            key = (lay * (1 << 31) + tok[:, None, None]) * E + v.experts
            self.sparse.add(key[ok])
        if self.with_text:
            ids, first = np.unique(tok, return_index=True)
            toks = v.batch.token
            for t, i in zip(ids.tolist(), first.tolist(), strict=True):
                if t >= 0 and t not in self.text:
                    self.text[t] = toks[i]

    def merge(self, other: VocabAccumulator) -> None:
        if self.occ is not None and other.occ is not None:
            self.occ.merge(other.occ)
        for t, text in other.text.items():
            self.text.setdefault(t, text)
        if other.dense is not None and self.dense is not None:
            self._grow(other.V)
        if other.dense is not None and self.dense is not None:
            self.dense[:, : other.V] += other.dense
            return
        self._sparsify()
        ls, t, e, c = other.cells()
        self.sparse.add_counts((ls.astype(np.int64) * (1 << 31) + t) * self.ctx.E + e, c)

    def cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Non-zero ``(layer column, token id, expert, count)`` arrays."""
        if self.dense is not None:
            ls, t, e = np.nonzero(self.dense)
            return ls, t, e, self.dense[ls, t, e]
        self.sparse.compact()
        k, c = self.sparse.keys, self.sparse.counts
        E = self.ctx.E
        e, rest = k % E, k // E
        return rest // (1 << 31), rest % (1 << 31), e, c


def vocab_frames(acc: VocabAccumulator, min_count: int, top: int) -> dict[str, pl.DataFrame]:
    """Per-token, top-token and summary frames of vocabulary specialisation from a filled accumulator."""
    ctx = acc.ctx
    k, E = ctx.k, ctx.E
    ls, t, e, c = acc.cells()
    cells = pl.DataFrame(
        {
            "col": ls.astype(np.int32),
            "token_id": t.astype(np.int64),
            "expert": e.astype(np.int32),
            "count": c.astype(np.int64),
        }
    )
    uniform = k / E
    if acc.occ is not None:  # variable k: one first slot per occurrence; uniform = mean experts / E
        ols, ot, _, oc = acc.occ.cells()
        uniform = float(c.sum() / oc.sum() / E) if oc.sum() else float("nan")
        occ = (
            pl.DataFrame(
                {"col": ols.astype(np.int32), "token_id": ot.astype(np.int64), "n": oc.astype(np.int64)}
            )
            .group_by("col", "token_id")
            .agg(pl.col("n").sum().alias("occurrences"))
        )
    else:
        occ = cells.group_by("col", "token_id").agg((pl.col("count").sum() // k).alias("occurrences"))
    cells = cells.join(occ, on=["col", "token_id"]).filter(pl.col("occurrences") >= min_count)
    cells = cells.with_columns((pl.col("count") / pl.col("occurrences")).alias("token_fraction"))
    layer_map = pl.DataFrame(
        {"col": np.arange(ctx.Ls, dtype=np.int32), "layer": np.asarray(ctx.layer_ids, np.int32)}
    )
    per_token = (
        cells.sort("count", "expert", descending=[True, False])
        .group_by("col", "token_id")
        .agg(
            pl.col("occurrences").first(),
            pl.col("expert").first().alias("top_expert"),
            pl.col("token_fraction").first().alias("top_expert_fraction"),
        )
        .join(layer_map, on="col")
        .sort("layer", "occurrences", "token_id", descending=[False, True, False])
    )
    text = acc.text
    if text:
        per_token = per_token.with_columns(
            pl.col("token_id").replace_strict(text, default=None, return_dtype=pl.String).alias("token")
        )
    summary = (
        per_token.group_by("layer")
        .agg(
            pl.len().alias("token_ids"),
            pl.col("occurrences").sum(),
            (
                (pl.col("top_expert_fraction") * pl.col("occurrences")).sum() / pl.col("occurrences").sum()
            ).alias("specialisation_weighted"),
            pl.col("top_expert_fraction").mean().alias("specialisation_mean"),
        )
        .with_columns(pl.lit(uniform).alias("uniform_fraction"), pl.lit(min_count).alias("min_count"))
        .sort("layer")
    )
    tops = (
        cells.join(layer_map, on="col")
        .sort("token_fraction", "count", "token_id", descending=[True, True, False])
        .group_by("layer", "expert", maintain_order=True)
        .head(top)
        .with_columns(pl.int_range(1, pl.len() + 1).over("layer", "expert").alias("rank"))
        .select("layer", "expert", "rank", "token_id", "count", "occurrences", "token_fraction")
        .sort("layer", "expert", "rank")
    )
    if text:
        tops = tops.with_columns(
            pl.col("token_id").replace_strict(text, default=None, return_dtype=pl.String).alias("token")
        )
    return {"per_token": per_token.drop("col"), "summary": summary, "top_tokens": tops}


def vocabulary_specialisation(
    trace: Trace,
    layers: Iterable[int] | None = None,
    *,
    min_count: int = 10,
    top: int = 10,
    batch_size: int = 65536,
) -> dict[str, pl.DataFrame]:
    """Vocabulary specialisation: ``per_token`` (token ids seen >= ``min_count`` times: top expert and
    its fraction of the occurrences), ``summary`` per layer (occurrence-weighted and plain means against
    k/E) and ``top_tokens`` (each expert's ``top`` token ids by fraction routed to it).

    Examples
    --------
    >>> vocabulary_specialisation(Trace.open("runs/t"))["summary"]  # doctest: +SKIP
    """
    if min_count < 1:
        raise ConfigError(f"min_count must be >= 1, got {min_count}")
    ctx = make_context(trace, layers)
    acc = VocabAccumulator(ctx)
    run_pass(ctx, [acc], batch_size)
    return vocab_frames(acc, min_count, top)


class DomainAccumulator:
    """Per (domain, layer, expert) counts, and per (document, layer, expert) counts for the permutation test."""

    def __init__(
        self, ctx: PassContext, max_doc_cells: int = MAX_DOC_CELLS, *, single_domain: bool = False
    ) -> None:
        self.ctx = ctx
        self.single = single_domain  # every row is domain 0 (used to compare whole traces)
        self.columns = {"experts", "doc_id"} | (set() if single_domain else {"label"})
        self.D = 1 if single_domain else len(ctx.labels)
        self.counts = np.zeros((max(self.D, 1), ctx.Ls, ctx.E), np.int64)
        self.tokens = np.zeros((max(self.D, 1), ctx.Ls), np.int64)
        self.max_doc_cells = max_doc_cells
        self.doc_counts: list[np.ndarray] = []
        self.doc_labels: list[int] = []
        self.ndocs = 0  # runs of rows of one document seen (kept when the per-document counts are dropped)
        self.first_doc: int | None = None
        self.last_doc: int | None = None
        self.dropped_docs = False

    def _drop(self, ndocs: int, force: bool = False) -> bool:
        """Drop the per-document counts once ``ndocs`` documents would exceed ``max_doc_cells``."""
        if not self.dropped_docs and (force or ndocs * self.ctx.Ls * self.ctx.E > self.max_doc_cells):
            self.dropped_docs, self.doc_counts, self.doc_labels = True, [], []
        return self.dropped_docs

    def update(self, v: View) -> None:
        Ls, E = self.ctx.Ls, self.ctx.E
        lab = np.zeros(v.n, np.int32) if self.single else v.batch.label
        has = lab >= 0
        lay = np.arange(Ls)[None, :, None]
        ok = v.valid & has[:, None]
        key = (lab[:, None, None] * Ls + lay) * E + v.experts  # (n, Ls, k)
        slot_ok = ok if v.slots is None else v.slots & has[:, None, None]  # variable k: padding out
        self.counts += bincount(key[slot_ok], self.counts.size).reshape(self.counts.shape)
        self.tokens += bincount((lab[:, None] * Ls + np.arange(Ls)[None, :])[ok], self.tokens.size).reshape(
            self.tokens.shape
        )
        doc = v.batch.doc_id
        if v.n == 0:
            return
        new = np.empty(len(doc), bool)
        new[0] = self.last_doc is None or doc[0] != self.last_doc
        new[1:] = doc[1:] != doc[:-1]
        self.ndocs += int(new.sum())
        if self.first_doc is None:
            self.first_doc = int(doc[0])
        if not self._drop(self.ndocs):
            local = np.cumsum(new) - 1 + (0 if new[0] else 1)  # row 0 continues the previous doc when not new
            nd = int(local[-1]) + 1
            key = (local[:, None, None] * Ls + lay) * E + v.experts
            dc = bincount(key[v.valid if v.slots is None else v.slots], nd * Ls * E)
            dc = dc.reshape(nd, Ls, E).astype(np.int32)
            start = 0
            if not new[0]:
                self.doc_counts[-1] = self.doc_counts[-1] + dc[0]
                start = 1
            starts = np.flatnonzero(new)
            self.doc_counts.extend(dc[start:])
            self.doc_labels.extend(lab[starts].tolist())
        self.last_doc = int(doc[-1])

    def merge(self, other: DomainAccumulator) -> None:
        self.counts, self.tokens = self.counts + other.counts, self.tokens + other.tokens
        joined = self.last_doc is not None and other.first_doc == self.last_doc
        total = self.ndocs + other.ndocs - int(joined)
        if not self._drop(total, force=other.dropped_docs):  # other saw too many documents: so did the whole
            counts, labels = list(other.doc_counts), list(other.doc_labels)
            if joined and counts:
                self.doc_counts[-1] = self.doc_counts[-1] + counts[0]
                counts, labels = counts[1:], labels[1:]
            self.doc_counts.extend(counts)
            self.doc_labels.extend(labels)
        self.ndocs = total
        self.first_doc = self.first_doc if self.first_doc is not None else other.first_doc
        self.last_doc = other.last_doc if other.last_doc is not None else self.last_doc

    def result(self, n_perm: int = 200, seed: int = 0) -> dict[str, pl.DataFrame]:
        return domain_frames(
            self.ctx,
            self.ctx.labels,
            self.counts,
            self.tokens,
            None if self.dropped_docs else (np.asarray(self.doc_counts), np.asarray(self.doc_labels)),
            n_perm,
            seed,
        )


def _js_bits(p: np.ndarray, q: np.ndarray) -> float:
    m = 0.5 * (p + q)
    return float(entropy_bits(m) - 0.5 * entropy_bits(p) - 0.5 * entropy_bits(q))


def mi_domain_expert(counts: np.ndarray) -> np.ndarray:
    """I(domain; expert) in bits per layer from ``(D, Ls, E)`` assignment counts; returns ``(Ls,)``.

    Equals the token-weighted generalised Jensen-Shannon divergence of the domains' load distributions.
    """
    c = counts.astype(np.float64)
    n = c.sum((0, 2))  # (Ls,)
    with np.errstate(invalid="ignore", divide="ignore"):
        pj = c / n[None, :, None]
    pd = pj.sum(2)  # (D, Ls)
    pe = pj.sum(0)  # (Ls, E)
    h = lambda x, ax: entropy_bits(np.moveaxis(x, ax, -1))  # noqa: E731
    return h(pd, 0) + h(pe, 1) - entropy_bits(pj.transpose(1, 0, 2).reshape(c.shape[1], -1))


def domain_frames(
    ctx: PassContext,
    names: list[str],
    counts: np.ndarray,
    tokens: np.ndarray,
    docs: tuple[np.ndarray, np.ndarray] | None,
    n_perm: int,
    seed: int,
) -> dict[str, pl.DataFrame]:
    """Domain shares, pairwise JSD and the permutation test from accumulated counts."""
    k, E = ctx.k, ctx.E
    ids = ctx.layer_ids
    D = len(names)
    uniform = k / E  # variable k: the mean experts per token over E
    if ctx.variable_k:
        uniform = float(counts.sum() / tokens.sum() / E) if tokens.sum() else float("nan")
    rows = []
    for d in range(D):
        for i, layer in enumerate(ids):
            T = tokens[d, i]
            for e in range(E):
                rows.append((names[d], layer, e, int(T), int(counts[d, i, e])))
    share = (
        pl.DataFrame(rows, schema=["domain", "layer", "expert", "tokens", "count"], orient="row")
        .with_columns(
            (pl.col("count") / pl.col("tokens")).alias("token_fraction"),
            pl.lit(uniform).alias("uniform_fraction"),
        )
        .with_columns((pl.col("token_fraction") / pl.col("uniform_fraction")).alias("ratio_to_uniform"))
    )
    jsd = []
    for a in range(D):
        for b in range(a + 1, D):
            for i, layer in enumerate(ids):
                ca, cb = counts[a, i].astype(float), counts[b, i].astype(float)
                if ca.sum() and cb.sum():
                    jsd.append(
                        {
                            "domain_a": names[a],
                            "domain_b": names[b],
                            "layer": layer,
                            "jsd_bits": _js_bits(ca / ca.sum(), cb / cb.sum()),
                        }
                    )
    test: dict[str, object] = {
        "domains": D,
        "permutations": 0,
        "mi_bits_mean": None,
        "p_value": None,
        "note": "",
    }
    present = [d for d in range(D) if counts[d].sum()]
    if len(present) < 2:
        test["note"] = "fewer than two domains with tokens: no test"
    else:
        obs = mi_domain_expert(counts[present])
        test["mi_bits_mean"] = float(np.nanmean(obs))
        if docs is None:
            test["note"] = "too many documents to keep per-document counts: permutation test skipped"
        elif n_perm > 0:
            dc, dl = docs
            keep = dl >= 0
            dc, dl = dc[keep].reshape(keep.sum(), -1).astype(np.float64), dl[keep]
            rng = np.random.default_rng(seed)
            groups = np.unique(dl, return_inverse=True)[1]
            G = int(groups.max()) + 1
            ge = 0
            for _ in range(n_perm):
                onehot = np.eye(G)[rng.permutation(groups)]  # (docs, G)
                agg = onehot.T @ dc  # (G, Ls * E)
                stat = float(np.nanmean(mi_domain_expert(agg.reshape(G, len(ids), E))))
                ge += stat >= test["mi_bits_mean"] - 1e-12
            test.update(
                permutations=n_perm,
                p_value=(1 + ge) / (1 + n_perm),
                note=f"domain labels permuted across {len(dl)} documents",
            )
    return {
        "share": share,
        "jsd": pl.DataFrame(
            jsd,
            schema={"domain_a": pl.String, "domain_b": pl.String, "layer": pl.Int64, "jsd_bits": pl.Float64},
        ),
        "test": pl.DataFrame([test]),
        "mi_by_layer": pl.DataFrame({"layer": ids, "mi_bits": mi_domain_expert(counts[present])})
        if len(present) >= 2
        else pl.DataFrame({"layer": [], "mi_bits": []}),
    }


def domain_specialisation(
    trace: Trace,
    layers: Iterable[int] | None = None,
    *,
    n_perm: int = 200,
    seed: int = 0,
    batch_size: int = 65536,
) -> dict[str, pl.DataFrame]:
    """Domain specialisation: ``share`` (expert fraction of each domain's tokens vs k/E), ``jsd`` (pairwise
    Jensen-Shannon divergence in bits, per layer), ``mi_by_layer`` and ``test`` (permutation test of
    the domain labels across documents: statistic, permutations, p-value).

    Examples
    --------
    >>> domain_specialisation(Trace.open("runs/t"), n_perm=100)["test"]  # doctest: +SKIP
    """
    ctx = make_context(trace, layers)
    acc = DomainAccumulator(ctx)
    run_pass(ctx, [acc], batch_size)
    return acc.result(n_perm, seed)


def compare_traces(
    a: Trace,
    b: Trace,
    layers: Iterable[int] | None = None,
    *,
    n_perm: int = 200,
    seed: int = 0,
    batch_size: int = 65536,
) -> dict[str, pl.DataFrame]:
    """Compare two traces of the same model (the effect of the data set, seed 000).

    The traces play the part of two domains: per-expert fractions of each trace's tokens, the JSD
    between their load distributions per layer, and a permutation test of the trace labels across
    documents. Raises :class:`ConfigError` when the models differ.
    """
    check_same_model(a, b)
    accs = []
    for tr in (a, b):
        ctx = make_context(tr, layers)
        acc = DomainAccumulator(ctx, single_domain=True)
        run_pass(ctx, [acc], batch_size)
        accs.append(acc)
    ctx = make_context(a, layers)
    names = [f"A:{a.path.name}", f"B:{b.path.name}"]
    counts = np.concatenate([x.counts for x in accs])
    tokens = np.concatenate([x.tokens for x in accs])
    docs = None
    if not any(x.dropped_docs for x in accs):
        dc = np.concatenate([np.asarray(x.doc_counts) for x in accs])
        dl = np.concatenate([np.zeros(len(accs[0].doc_labels), int), np.ones(len(accs[1].doc_labels), int)])
        docs = (dc, dl)
    return domain_frames(ctx, names, counts, tokens, docs, n_perm, seed)


def plot_domain_share(share: pl.DataFrame, layer: int, *, variable_k: bool = False):
    """Heatmap domain x expert of the fraction of tokens routed to the expert, relative to k/E."""
    from moescope.core.figures import heatmap

    uniform = "mean experts per token / E" if variable_k else "k/E"
    g = share.filter(pl.col("layer") == layer)
    doms = g["domain"].unique(maintain_order=True).to_list()
    E = int(g["expert"].max()) + 1
    m = np.full((len(doms), E), np.nan)
    for i, d in enumerate(doms):
        h = g.filter(pl.col("domain") == d)
        m[i, h["expert"].to_numpy()] = h["ratio_to_uniform"].to_numpy()
    return heatmap(
        m,
        xlabel="expert",
        ylabel="domain",
        yticklabels=doms,
        center=1.0,
        cbar=f"fraction / ({uniform})",
        title=f"Domain specialisation at layer {layer} (1 = uniform {uniform})",
    )


def plot_vocab_specialisation(summary: pl.DataFrame, *, variable_k: bool = False):
    """Occurrence-weighted vocabulary specialisation by layer, against the uniform k/E."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(summary["layer"], summary["specialisation_weighted"], "o-", label="weighted by occurrences")
    ax.plot(summary["layer"], summary["specialisation_mean"], "s--", label="mean over token ids")
    uniform = "mean experts per token / E" if variable_k else "k/E"
    ax.axhline(summary["uniform_fraction"][0], color="gray", ls=":", label=uniform)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of a token's occurrences\nrouted to its top expert")
    ax.set_title(f"Vocabulary specialisation (token ids seen >= {summary['min_count'][0]} times)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
