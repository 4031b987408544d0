"""Next-token metrics per document, and paired bootstrap intervals for the change an ablation causes.

Each predicted position (a token followed by another in the same window) scores three numbers:
top-1 correct, top-5 correct and the negative log-likelihood (nats) of the true next token.
They are summed per document, so a comparison needs only a few arrays of length D.

Confidence intervals come from a **paired, document-level bootstrap**: documents (not tokens) are
resampled with replacement, because tokens of one document are correlated, and the same resample
scores both the baseline and the ablated run, so the interval is for the change itself. A
domain's interval resamples that domain's documents; the overall interval resamples documents
within each domain (stratified), keeping the domain mix of the data. Intervals are percentile
intervals. Accuracy and mean NLL are ratios of sums over the resampled documents (token-weighted);
perplexity is ``exp(mean NLL)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moescope.errors import ConfigError

#: Metrics compared between runs; ``impact`` of an ablation is the harm in one of them.
METRICS = ("accuracy", "top5", "nll", "perplexity")
#: Sign turning a change (ablated - baseline) into harm: accuracy falls, NLL and perplexity rise.
HARM_SIGN = {"accuracy": -1.0, "top5": -1.0, "nll": 1.0, "perplexity": 1.0}


def token_scores(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score each next-token prediction of a right-padded batch.

    Returns ``valid`` (B, T-1) bool (position t predicts t+1, both real tokens), and ``correct1``,
    ``correct5`` (bool) and ``nll`` (float32, nats) of shape (B, T-1), meaningful where valid.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V)
    target = input_ids[:, 1:].long()  # (B, T-1)
    valid = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    true_logit = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    nll = torch.logsumexp(logits, dim=-1) - true_logit
    top = torch.topk(logits, min(5, logits.shape[-1]), dim=-1).indices  # (B, T-1, 5)
    hits = top == target.unsqueeze(-1)
    return valid, hits[..., 0], hits.any(dim=-1), nll


@dataclass
class DocTotals:
    """Per-document sums over predicted positions: counts, top-1 and top-5 hits, NLL (nats)."""

    n: np.ndarray  # (D,) int64
    correct1: np.ndarray  # (D,) int64
    correct5: np.ndarray  # (D,) int64
    nll: np.ndarray  # (D,) float64

    @classmethod
    def zeros(cls, num_docs: int) -> DocTotals:
        z = np.zeros(num_docs, dtype=np.int64)
        return cls(z.copy(), z.copy(), z.copy(), np.zeros(num_docs, dtype=np.float64))

    def add(self, doc: np.ndarray, correct1: np.ndarray, correct5: np.ndarray, nll: np.ndarray) -> None:
        """Accumulate per-position scores; ``doc`` (n,) gives each position's document index."""
        D = len(self.n)
        self.n += np.bincount(doc, minlength=D)
        self.correct1 += np.bincount(doc, weights=correct1, minlength=D).astype(np.int64)
        self.correct5 += np.bincount(doc, weights=correct5, minlength=D).astype(np.int64)
        self.nll += np.bincount(doc, weights=nll, minlength=D)

    def point(self, docs: np.ndarray | None = None) -> dict[str, float]:
        """Accuracy, top-5 accuracy, mean NLL and perplexity over ``docs`` (default: all)."""
        sel: slice | np.ndarray = slice(None) if docs is None else docs
        n = float(self.n[sel].sum())
        if n == 0:
            return {m: float("nan") for m in METRICS}
        nll = float(self.nll[sel].sum()) / n
        return {
            "accuracy": float(self.correct1[sel].sum()) / n,
            "top5": float(self.correct5[sel].sum()) / n,
            "nll": nll,
            "perplexity": float(np.exp(nll)),
        }


def resample_counts(groups: Sequence[np.ndarray], num_docs: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap multiplicities ``(n_boot, num_docs)``: each group's documents resampled within the group.

    ``groups`` are disjoint index arrays into the documents (one per domain); documents in no group
    get multiplicity 0. A multinomial draw of size ``len(group)`` over the group's documents has the
    distribution of drawing that many of them uniformly with replacement. The columns of one group
    are therefore a bootstrap of that group alone, and all columns together a stratified bootstrap.
    """
    if n_boot < 1:
        raise ConfigError(f"option bootstrap must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, num_docs), dtype=np.float64)
    for g in groups:
        if len(g):
            counts[:, g] = rng.multinomial(len(g), np.full(len(g), 1.0 / len(g)), size=n_boot)
    return counts


def _stats(totals: DocTotals, W: np.ndarray, docs: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric over ``docs`` under every bootstrap multiplicity row of ``W`` (B, D)."""
    Wd = W[:, docs]  # (B, d)
    n = Wd @ totals.n[docs]
    with np.errstate(invalid="ignore", divide="ignore"):
        nll = (Wd @ totals.nll[docs]) / n
        return {
            "accuracy": (Wd @ totals.correct1[docs]) / n,
            "top5": (Wd @ totals.correct5[docs]) / n,
            "nll": nll,
            "perplexity": np.exp(nll),
        }


def compare(
    base: DocTotals, ablated: DocTotals, docs: np.ndarray, W: np.ndarray, confidence: float = 0.95
) -> dict[str, float]:
    """Baseline, ablated and change (ablated - baseline) of every metric over ``docs``, with CIs.

    ``W`` holds bootstrap multiplicities (B, D) from :func:`resample_counts`, shared by every
    comparison so that all conditions see the same resamples. Keys:
    ``<metric>_base``, ``<metric>_ablated``, ``delta_<metric>``, ``delta_<metric>_lo``/``_hi``.
    """
    if not 0 < confidence < 1:
        raise ConfigError(f"option confidence must be in (0, 1), got {confidence}")
    pb, pa = base.point(docs), ablated.point(docs)
    sb, sa = _stats(base, W, docs), _stats(ablated, W, docs)
    q = [(1 - confidence) / 2, 1 - (1 - confidence) / 2]
    out: dict[str, float] = {}
    for m in METRICS:
        out[f"{m}_base"] = pb[m]
        out[f"{m}_ablated"] = pa[m]
        out[f"delta_{m}"] = pa[m] - pb[m]
        diff = sa[m] - sb[m]
        diff = diff[np.isfinite(diff)]
        lo, hi = np.quantile(diff, q) if diff.size else (float("nan"), float("nan"))
        out[f"delta_{m}_lo"] = float(lo)
        out[f"delta_{m}_hi"] = float(hi)
    return out


def baseline_intervals(
    base: DocTotals, docs: np.ndarray, W: np.ndarray, confidence: float = 0.95
) -> dict[str, float]:
    """Every metric of one run over ``docs`` with its bootstrap interval (``<metric>``, ``_lo``, ``_hi``)."""
    p = base.point(docs)
    s = _stats(base, W, docs)
    q = [(1 - confidence) / 2, 1 - (1 - confidence) / 2]
    out: dict[str, float] = {}
    for m in METRICS:
        v = s[m][np.isfinite(s[m])]
        lo, hi = np.quantile(v, q) if v.size else (float("nan"), float("nan"))
        out[m], out[f"{m}_lo"], out[f"{m}_hi"] = p[m], float(lo), float(hi)
    return out
