"""The combined ("best") predictor: every source of evidence the trace holds, stacked per layer.

Evidence for "expert e is used by this (token, layer)", each as a log-likelihood ratio against the
layer's marginal so that uninformative sources contribute zero:

- the token id (:class:`~moescope.predict.baselines.TokenPredictor`), the only cue for the first
  MoE layer;
- the token's own experts at each of its ``history`` most recent known layers, through smoothed
  co-occurrence tables (:class:`~moescope.predict.cooccurrence.CooccurrencePredictor`) of the
  matching distances;
- the previous token's experts at the target layer (temporal co-occurrence, and plain membership of
  the previous token's set and of the last ``window`` tokens' sets);
- the same token's earlier occurrence in the document: membership of its expert set at the target
  layer (``use_same_token``; the learned model also sees it, with its agreement on known layers);
- the logits of a :class:`~moescope.predict.learned.LearnedPredictor` (the ``learned`` part), which
  sees every known layer of the token, the previous tokens' and the same token's full routing, and
  interactions the tables cannot;
- the gate-lookahead ranking, when the capture recorded it.

A logistic regression per (mode, target layer) weighs these features and the marginal log-odds.
The tables and the model are fitted on the training documents minus ``validation_fraction`` of
them; the weights on those held-out documents (so they learn how far each source generalises),
after which the tables, which are plain counts, are refitted on every training document.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, ClassVar

import numpy as np

from moescope.core.estimator import clone
from moescope.predict.base import BasePredictor, Boolean, InstanceOf, Interval, Modes, OrNone, RandomState
from moescope.predict.baselines import TokenPredictor
from moescope.predict.cooccurrence import CooccurrencePredictor
from moescope.predict.learned import LearnedPredictor, torch_threads
from moescope.predict.lookahead import LookaheadPredictor
from moescope.predict.queries import (
    TEMPORAL,
    Queries,
    iter_labelled,
    scatter_counts,
    set_mask,
    split_lookahead_column,
)


class CombinedPredictor(BasePredictor):
    """Stacked token, history, previous-token, learned and lookahead evidence; see the module docstring.

    Parameters
    ----------
    distances : modes to fit (spatial distances >= 1; 0 = temporal).
    history : own earlier layers used through co-occurrence tables (layers ``l-d, ..., l-d-history+1``).
    learned : a :class:`LearnedPredictor` whose logits become a feature (a clone of it is fitted, with
        this predictor's ``distances`` and ``use_same_token``, and lookahead input when the trace has
        it), or None for none. ``make_predictor("best")`` gives
        ``LearnedPredictor(**registry.BEST_LEARNED)`` (width 128, two epochs, no dropout, 8192-cell
        steps); set its settings as ``learned__hidden=64`` (``--param learned__hidden=64``).
    use_same_token : use the routing of the same token's earlier occurrence in the document.
    window : previous tokens whose expert sets are features.
    alpha : smoothing of the token and co-occurrence tables.
    validation_fraction : share of training documents held out to fit the stacking weights.
    max_stack_rows : held-out queries per (mode, layer) used to fit the weights.
    random_state : seed of the validation split and the stacking sample.
    num_threads : torch threads for the stacking fit (None: torch's default).
    verbose : progress lines on stderr.

    Attributes
    ----------
    token_, cooc_, learned_, lookahead_ : the fitted sources (``learned_``/``lookahead_`` may be None).
    coef_ : ``(M, L, F)`` feature weights; ``bias_`` ``(M, L)`` intercepts; ``features_`` the feature names.
    """

    name: ClassVar[str] = "combined"
    version: ClassVar[int] = 3  # 2: holds a version-2 learned model; 3: the learned model is a parameter
    table: ClassVar[bool] = False
    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "distances": Modes(),
        "history": Interval(int, 1, 16),
        "learned": InstanceOf(LearnedPredictor, optional=True),
        "use_same_token": Boolean(),
        "window": Interval(int, 0, 64),
        "alpha": Interval(float, 0.0, None),
        "validation_fraction": Interval(float, 0.0, 0.5),
        "max_stack_rows": Interval(int, 16, None),
        "random_state": RandomState(),
        "num_threads": OrNone(Interval(int, 1, 256)),
        "verbose": Boolean(),
    }

    def __init__(
        self,
        *,
        distances: tuple[int, ...] = (1,),
        history: int = 3,
        learned: LearnedPredictor | None = None,
        use_same_token: bool = True,
        window: int = 2,
        alpha: float = 1.0,
        validation_fraction: float = 0.15,
        max_stack_rows: int = 3000,
        random_state: int | None = 0,
        num_threads: int | None = 1,
        verbose: bool = False,
    ) -> None:
        self.distances = distances
        self.history = history
        self.learned = learned
        self.use_same_token = use_same_token
        self.window = window
        self.alpha = alpha
        self.validation_fraction = validation_fraction
        self.max_stack_rows = max_stack_rows
        self.random_state = random_state
        self.num_threads = num_threads
        self.verbose = verbose

    def history_window(self) -> int:
        part = self.learned.history_window() if self.learned is not None else 1
        return max(self.window, part, 1)

    def _modes(self) -> list[int]:
        return [int(d) for d in self.modes_]

    def _log(self, msg: str) -> None:
        if self.verbose:
            t = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
            print(f"combined: {msg} ({t:.0f}s)", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ fit
    def _fit_tables(self, trace: Any) -> None:
        cooc_modes = {0}
        for d in self.modes_:
            if d != TEMPORAL:
                cooc_modes.update(int(d) + j for j in range(self.history))
        self.token_ = TokenPredictor(alpha=self.alpha).fit(trace)
        self.cooc_ = CooccurrencePredictor(distances=tuple(sorted(cooc_modes)), alpha=self.alpha).fit(trace)

    def _fit(self, trace: Any) -> None:
        from moescope.predict.evaluate import split_documents

        self._t0 = time.perf_counter()
        self.modes_ = np.asarray(sorted(set(int(d) for d in self.distances)), np.int64)
        variants = sorted({v for v, _ in map(split_lookahead_column, trace.lookahead_columns)})
        docs = trace.documents()
        fit_trace, val_trace = trace, trace
        if self.validation_fraction > 0 and len(docs) >= 4:
            train_docs, val_docs = split_documents(
                trace, self.validation_fraction, seed=self.random_state or 0
            )
            fit_trace, val_trace = trace.filter(documents=train_docs), trace.filter(documents=val_docs)
        self._log("fitting tables")
        self._fit_tables(fit_trace)
        self.learned_ = None
        if self.learned is not None:
            self._log("training the neural model")
            part = clone(self.learned).set_params(
                distances=tuple(int(d) for d in self.modes_),
                use_lookahead=bool(variants),
                use_same_token=self.use_same_token,
            )
            self.learned_ = part.fit(fit_trace)
        self.lookahead_ = None
        if variants:
            self.lookahead_ = LookaheadPredictor(
                variant="gate_input" if "gate_input" in variants else variants[0]
            )
            self.lookahead_.fit(fit_trace)
        self.features_ = self._feature_names()
        self._log(f"stacking {len(self.features_)} features on held-out documents")
        self._fit_stack(val_trace)
        if val_trace is not trace:
            self._log("refitting the tables on every training document")
            self._fit_tables(trace)
        self._log("done")

    def _feature_names(self) -> list[str]:
        names = ["marginal", "token"] + [f"own_l-{j}" for j in range(self.history)]
        names += ["prev_token", "prev_set", "window_set"]
        if self.use_same_token:
            names.append("same_token")
        if self.learned_ is not None:
            names.append("learned")
        if self.lookahead_ is not None:
            names.append("lookahead")
        return names

    def _fit_stack(self, val_trace: Any) -> None:
        import torch

        E, L, M, F = self.num_experts_, self.num_layers_, len(self.modes_), len(self.features_)
        self.coef_ = np.zeros((M, L, F), np.float32)
        self.bias_ = np.zeros((M, L), np.float32)
        rng = np.random.default_rng(self.random_state)
        rows: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        total = val_trace.num_tokens
        keep = min(1.0, self.max_stack_rows / max(total, 1))
        look = self.lookahead_ is not None or (self.learned_ is not None and bool(self.learned_.variants_))
        for q, actual, valid in iter_labelled(
            val_trace, list(self.modes_), window=self.history_window(), lookahead=look
        ):
            sel = valid & (rng.random(len(q)) < keep)
            if not sel.any():
                continue
            sub = _subset(q, np.nonzero(sel)[0])
            x = self._features(sub)  # (n, E, F)
            y = set_mask(actual[sel], E, q.missing).astype(np.float32)
            mi = int(np.searchsorted(self.modes_, q.distance))
            rows.setdefault((mi, q.layer), []).append((x, y))
        with torch_threads(self.num_threads):
            for (mi, layer), parts in rows.items():
                x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
                y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
                w, b = _logistic(x, y)
                self.coef_[mi, layer], self.bias_[mi, layer] = w, b
        if self.verbose:
            mean = self.coef_.mean(axis=(0, 1))
            self._log(
                "mean weights " + ", ".join(f"{n} {v:.2f}" for n, v in zip(self.features_, mean, strict=True))
            )

    # ------------------------------------------------------------------ features
    def _features(self, q: Queries) -> np.ndarray:
        """``(n, E, F)`` evidence of every expert for each query (0 where a source is unknown)."""
        n, E = len(q), q.num_experts
        feats = []
        p = np.clip(self.token_.popularity_[q.layer] * self.top_k_, 1e-6, 1 - 1e-6)
        logp = np.log(p)
        feats.append(np.broadcast_to(np.log(p / (1 - p)), (n, E)).astype(np.float32))  # marginal log-odds
        feats.append(self.token_.log_proba(q) - logp if not q.temporal else np.zeros((n, E), np.float32))
        V = q.own.shape[1]
        for j in range(self.history):
            if q.temporal or V - j <= 0:
                feats.append(np.zeros((n, E), np.float32))
                continue
            qj = dataclasses.replace(q, distance=q.distance + j, own=q.own[:, : V - j], lookahead={})
            feats.append(self._cooc_llr(qj))
        qp = dataclasses.replace(q, distance=TEMPORAL, own=q.own[:, :0], lookahead={})
        feats.append(self._cooc_llr(qp))
        W = q.prev.shape[1]
        prev_sets = q.prev[:, :, q.layer] if W else np.zeros((n, 0, self.top_k_), np.uint8)  # (n, W, k)
        feats.append(
            scatter_counts(prev_sets[:, :1], E, q.missing)[:, 0] if W else np.zeros((n, E), np.float32)
        )
        feats.append(scatter_counts(prev_sets.reshape(n, -1), E, q.missing) / max(W, 1))
        if "same_token" in self.features_:  # the fitted feature list, not the parameter: old files load
            same = q.same_token
            feats.append(
                np.zeros((n, E), np.float32)
                if same is None
                else scatter_counts(same[:, q.layer], E, q.missing)
            )
        if self.learned_ is not None:
            feats.append(self.learned_.predict_scores(q))
        if self.lookahead_ is not None:
            look = q.lookahead.get(self.lookahead_.variant)
            bonus = np.zeros((n, E + 1), np.float32)
            if look is not None:
                m = look.shape[1]
                ids = np.where(look == q.missing, E, look).astype(np.int64)
                np.put_along_axis(
                    bonus, ids, ((m - np.arange(m)) / m).astype(np.float32)[None].repeat(n, 0), axis=1
                )
            feats.append(bonus[:, :E])
        return np.stack(feats, axis=2).astype(np.float32)

    def _cooc_llr(self, q: Queries) -> np.ndarray:
        """Co-occurrence evidence minus its marginal, so an unknown source contributes 0."""
        mi = int(np.searchsorted(self.cooc_.modes_, q.distance))
        marg = np.log(np.clip(self.cooc_._marginal(mi, q.layer), 1e-6, 1 - 1e-6))
        return self.cooc_.predict_scores(q) - marg[None, :]

    def _scores(self, q: Queries) -> np.ndarray:
        mi = int(np.searchsorted(self.modes_, q.distance))
        x = self._features(q)  # (n, E, F)
        return x @ self.coef_[mi, q.layer] + self.bias_[mi, q.layer]


def _subset(q: Queries, rows: np.ndarray) -> Queries:
    """The queries ``rows`` of ``q``."""
    return dataclasses.replace(
        q,
        own=q.own[rows],
        prev=q.prev[rows],
        token_id=q.token_id[rows],
        prev_token_id=q.prev_token_id[rows],
        lookahead={k: v[rows] for k, v in q.lookahead.items()},
        same_token=None if q.same_token is None else q.same_token[rows],
    )


def _logistic(x: Any, y: Any, steps: int = 60) -> tuple[np.ndarray, float]:
    """Weights ``(F,)`` and intercept of ``sigmoid(x @ w + b)`` fitted by L-BFGS on BCE.

    No per-expert bias: the marginal log-odds is a feature, so few held-out documents cannot teach
    the model that an expert they happen not to use is never used. A small ridge keeps weights
    finite when a feature separates perfectly (synthetic laws).
    """
    import torch

    F = x.shape[2]
    w = torch.ones(F, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")
    lossf = torch.nn.BCEWithLogitsLoss()

    def closure() -> Any:
        opt.zero_grad()
        loss = lossf(x @ w + b, y) + 1e-4 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy().astype(np.float32), float(b.detach()[0])
