"""How routing changed between two traces of the same tokens (strategy vs baseline, model vs fine-tune).

Per MoE layer: the share of tokens whose expert *set* differs, the mean Jaccard overlap and the mean
experts per token on each side. Per (layer, expert): usage (share of tokens routed to it) in A and
B, and a paired sign-flip permutation p-value for the change (each token's used-in-B minus
used-in-A is exchangeable under "no change"). Per domain label: the set mismatch rate per layer.
Variable-k traces (``capture.variable_k``) are read slot by slot (sentinel slots are padding); in
other traces a (token, layer) holding the sentinel is missing and left out of every comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from moescope.errors import ConfigError
from moescope.trace.reader import Trace


@dataclass
class _Side:
    used: np.ndarray  # (n, L, E) bool
    valid: np.ndarray  # (n, L) bool
    token_id: np.ndarray
    doc_id: np.ndarray
    label: np.ndarray


def _read(trace: Trace) -> _Side:
    E, L = trace.num_experts, len(trace.moe_layers)
    variable = bool(trace.manifest.get("capture", {}).get("variable_k"))
    used, valid, tok, doc, lab = [], [], [], [], []
    labels = list(trace.labels)
    if trace.num_tokens == 0:
        raise ConfigError(f"{trace.path}: the trace holds no tokens")
    for b in trace.iter_batches(["doc_id", "token_id", "label", "experts"]):
        ex = b.experts.astype(np.int64)
        pad = ex == trace.missing_id
        u = np.zeros((len(ex), L, E + 1), bool)
        np.put_along_axis(u, np.where(pad, E, ex), True, axis=2)
        used.append(u[:, :, :E])
        valid.append(np.ones(pad.shape[:2], bool) if variable else ~pad.any(-1))
        tok.append(b.token_id)
        doc.append(b.doc_id)
        lab.append(
            np.array([labels[c] if c >= 0 else "" for c in b.label])
            if b.label is not None
            else np.full(len(ex), "")
        )
    return _Side(
        np.concatenate(used),
        np.concatenate(valid),
        np.concatenate(tok),
        np.concatenate(doc),
        np.concatenate(lab),
    )


def diff_traces(
    a: Trace, b: Trace, *, n_perm: int = 1000, max_tokens: int = 20000, seed: int = 0
) -> dict[str, pl.DataFrame]:
    """Tables ``layers``, ``experts`` (most changed first) and ``domains`` comparing trace ``b`` to ``a``."""
    if a.num_experts != b.num_experts:
        raise ConfigError(f"{b.path}: E={b.num_experts}, but {a.path} has E={a.num_experts}")
    if list(a.moe_layers) != list(b.moe_layers):
        raise ConfigError(f"{b.path}: MoE layers {b.moe_layers} differ from {a.path}'s {a.moe_layers}")
    if n_perm < 1:
        raise ConfigError(f"option `permutations` must be >= 1, got {n_perm}")
    A, B = _read(a), _read(b)
    if len(A.token_id) != len(B.token_id) or not np.array_equal(A.token_id, B.token_id):
        raise ConfigError(
            f"{a.path} and {b.path} do not hold the same tokens ({len(A.token_id)} vs {len(B.token_id)} rows"
            " or different token ids): diff compares routing of identical token streams"
        )
    ok = A.valid & B.valid  # (n, L)
    layers = list(a.moe_layers)
    rows = []
    for j, layer in enumerate(layers):
        m = ok[:, j]
        ua, ub = A.used[m, j], B.used[m, j]
        inter, union = (ua & ub).sum(1), (ua | ub).sum(1)
        rows.append(
            {
                "layer": layer,
                "tokens": int(m.sum()),
                "set_mismatch_rate": float((ua != ub).any(1).mean()) if m.any() else float("nan"),
                "mean_jaccard": float((inter / np.maximum(union, 1)).mean()) if m.any() else float("nan"),
                "mean_k_a": float(ua.sum(1).mean()) if m.any() else float("nan"),
                "mean_k_b": float(ub.sum(1).mean()) if m.any() else float("nan"),
            }
        )
    rng = np.random.default_rng(seed)
    experts = []
    for j, layer in enumerate(layers):
        idx = np.nonzero(ok[:, j])[0]
        if len(idx) > max_tokens:
            idx = np.sort(rng.choice(idx, max_tokens, replace=False))
        d = B.used[idx, j].astype(np.float32) - A.used[idx, j].astype(np.float32)  # (n, E)
        obs = np.abs(d.mean(0)) if len(idx) else np.zeros(a.num_experts)
        hits = np.zeros(a.num_experts)
        for start in range(0, n_perm, 100):
            s = rng.choice(np.array([-1.0, 1.0], np.float32), size=(min(100, n_perm - start), len(idx)))
            hits += (np.abs(s @ d / max(len(idx), 1)) >= obs - 1e-12).sum(0)
        p = (1 + hits) / (1 + n_perm)
        for e in range(a.num_experts):
            ua, ub = (
                float(A.used[idx, j, e].mean()) if len(idx) else 0.0,
                float(B.used[idx, j, e].mean()) if len(idx) else 0.0,
            )
            experts.append(
                {
                    "layer": layer,
                    "expert": e,
                    "usage_a": ua,
                    "usage_b": ub,
                    "change": ub - ua,
                    "p_value": float(p[e]),
                }
            )
    ex = (
        pl.DataFrame(experts)
        .with_columns(pl.col("change").abs().alias("abs_change"))
        .sort("abs_change", descending=True)
        .drop("abs_change")
    )
    domains = []
    for label in sorted(set(A.label.tolist())):
        sel = A.label == label
        for j, layer in enumerate(layers):
            m = ok[:, j] & sel
            if m.any():
                mis = (A.used[m, j] != B.used[m, j]).any(1).mean()
                domains.append(
                    {"domain": label, "layer": layer, "tokens": int(m.sum()), "set_mismatch_rate": float(mis)}
                )
    return {"layers": pl.DataFrame(rows), "experts": ex, "domains": pl.DataFrame(domains)}


def diff_figure(tables: dict[str, pl.DataFrame]) -> Any:
    """Set mismatch rate per layer (bars) and mean experts per token on each side (lines)."""
    import matplotlib.pyplot as plt

    df = tables["layers"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 2.8), layout="constrained")
    x = np.arange(len(df))
    ax1.bar(x, df["set_mismatch_rate"].to_numpy())
    ax1.set_xticks(x, [str(v) for v in df["layer"].to_list()])
    ax1.set_xlabel("MoE layer")
    ax1.set_ylabel("tokens whose expert set changed")
    ax2.plot(x, df["mean_k_a"].to_numpy(), "o-", label="A")
    ax2.plot(x, df["mean_k_b"].to_numpy(), "s-", label="B")
    ax2.set_xticks(x, [str(v) for v in df["layer"].to_list()])
    ax2.set_xlabel("MoE layer")
    ax2.set_ylabel("experts per token")
    ax2.legend(fontsize=7)
    return fig
