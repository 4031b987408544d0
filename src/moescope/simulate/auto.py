"""Policy ``auto``: choose the cache policy on held-out training documents (the decision table's guard).

A predictor-guided policy pays only where its extra hits repay its predictor's time on the critical
path: on DeepSeek-V2-Lite's millisecond layers it does, on the bundled fine-grained model's
microsecond layers it mostly does not (BENCHMARKS.md, "Predictor-guided caching"). Which one wins
depends on the deployment, the cache size, the expert width and the batch, so :class:`AutoPolicy`
decides per replay, from the training trace alone:

1. split TRAIN by document (``holdout``, ``seed``; the same split every time);
2. fit every candidate on the larger part and replay the held-out part under the replay's own
   deployment, expert cost, cache capacity, mode, batch, reset and prefetcher (a guided
   candidate's predictor cost charged on the critical path, as in every replay);
3. keep the fastest (tokens/s; ties go to the earlier candidate, and the predictor-free ones come
   first), refit it on all of TRAIN, and replay as that policy.

The replayed trace is never looked at. ``moescope simulate --policy auto --train TRAIN``,
``moescope.simulate(test, fit_trace=train, policy="auto", ...)`` and
``benchmarks/simulate_policies.py --guard`` all go through this class.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from moescope.core.estimator import Boolean, Interval, Options, OrNone, clone
from moescope.errors import ConfigError
from moescope.simulate.deployment import Deployment, ModelCost
from moescope.simulate.engine import RESETS, Steps, prepare, run, step_prefetch
from moescope.simulate.policies import POLICIES, CachePolicy, fit_on_replay_steps, make_policy

#: The predictor-free candidates (every one the decision table compares) and the predictor-guided ones.
FREE_CANDIDATES: tuple[str, ...] = ("lru", "lfu", "lrfu", "static")
GUIDED_CANDIDATES: tuple[str, ...] = ("learned-reuse", "learned-reuse-admit")


@dataclass
class _HeldOut:
    """What :class:`AutoPolicy` keeps between fits on the same training trace and split."""

    trace: Any
    key: tuple
    part: Any  # the larger part, where the candidates learn
    val: Any  # the held-out part, where they are judged
    steps: Steps  # the held-out part cut into the replay's steps
    fitted: dict[str, CachePolicy]  # every candidate fitted on ``part``
    refits: dict[str, CachePolicy] = field(default_factory=dict)  # choices fitted on all of TRAIN
    ranks: dict[int, tuple] = field(default_factory=dict)  # id(prefetcher): (it, ranked steps, distance)


class AutoPolicy(CachePolicy):
    """The fastest of ``candidates`` on a held-out part of the training trace, then that policy.

    Parameters
    ----------
    candidates : policy names or unfitted :class:`CachePolicy` objects, in order of preference
        on ties (default: lru, lfu, lrfu, static, learned-reuse, learned-reuse-admit).
    holdout : share of the training documents held out to judge the candidates.
    seed : seed of that split by document.
    deployment, cost, capacity, shared : the replay's deployment, expert cost and cache slots
        (``(L,)`` per layer, or ``(1,)`` with ``shared``). :func:`moescope.simulate.replay` and
        ``moescope simulate`` set them (and the next four) from the replay they run.
    mode, batch_size, reset : how the replay cuts tokens into steps and resets the cache.
    prefetcher : the replay's prefetcher, unfitted or fitted (a copy is fitted on the larger part);
        None for none.

    Attributes
    ----------
    choice_ : the chosen candidate's label (its name; its ``describe()`` when names repeat).
    scores_ : ``{label: held-out tokens/s}`` of every candidate, in candidate order.
    heldout_hit_rate_ : ``{label: held-out hit rate}``.
    policy_ : the chosen policy, fitted on the whole training trace; the replay runs it.
    heldout_documents_, heldout_tokens_ : size of the held-out part.

    Examples
    --------
    >>> auto = AutoPolicy(deployment=dep, cost=cost, capacity=cap).fit(train)  # doctest: +SKIP
    >>> auto.choice_, auto.scores_  # doctest: +SKIP
    ('lrfu', {'lru': 20410.0, 'lfu': ..., 'learned-reuse-admit': 16402.0})
    """

    name = "auto"
    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "holdout": Interval(float, 1e-9, 1 - 1e-9),
        "seed": Interval(int, 0, None),
        "shared": Boolean(),
        "mode": Options("decode", "prefill"),
        "batch_size": OrNone(Interval(int, 1, None)),
        "reset": Options(*RESETS),
    }

    def __init__(
        self,
        *,
        candidates: Sequence[str | CachePolicy] = FREE_CANDIDATES + GUIDED_CANDIDATES,
        holdout: float = 0.2,
        seed: int = 1,
        deployment: Deployment | None = None,
        cost: ModelCost | None = None,
        capacity: Any = None,
        shared: bool = False,
        mode: str = "decode",
        batch_size: int | None = None,
        reset: str = "none",
        prefetcher: Any = None,
    ) -> None:
        self.candidates = candidates
        self.holdout = holdout
        self.seed = seed
        self.deployment = deployment
        self.cost = cost
        self.capacity = capacity
        self.shared = shared
        self.mode = mode
        self.batch_size = batch_size
        self.reset = reset
        self.prefetcher = prefetcher

    # ------------------------------------------------------------------ fitting
    def for_replay(  # type: ignore[override]
        self,
        *,
        deployment: Deployment,
        cost: ModelCost,
        capacity: Any,
        shared: bool = False,
        mode: str = "decode",
        batch_size: int | None = None,
        reset: str = "none",
        prefetcher: Any = None,
    ) -> AutoPolicy:
        """Set the replay's conditions (the choice is made under them; ``simulate`` calls this
        before ``fit``); returns ``self``."""
        return self.set_params(  # type: ignore[return-value]
            deployment=deployment,
            cost=cost,
            capacity=np.asarray(capacity, np.int64),
            shared=shared,
            mode=mode,
            batch_size=batch_size,
            reset=reset,
            prefetcher=prefetcher,
        )

    def _labels(self) -> list[str]:
        names = [c if isinstance(c, str) else c.name for c in self.candidates]
        if len(set(names)) == len(names):
            return names
        return [c if isinstance(c, str) else c.describe() for c in self.candidates]

    def _check(self) -> None:
        if not len(self.candidates):
            raise ConfigError("AutoPolicy: parameter candidates is empty; name at least one policy")
        for c in self.candidates:
            if isinstance(c, str):
                if c == self.name or c not in POLICIES:
                    raise ConfigError(
                        f"AutoPolicy: candidate {c!r} is not a policy to choose from; use names of: "
                        + ", ".join(n for n in POLICIES if n != self.name)
                    )
            elif not isinstance(c, CachePolicy) or isinstance(c, AutoPolicy):
                raise ConfigError(f"AutoPolicy: candidate {c!r} is neither a policy name nor a CachePolicy")
        missing = [p for p in ("deployment", "cost", "capacity") if getattr(self, p) is None]
        if missing:
            raise ConfigError(
                f"AutoPolicy needs the replay's {', '.join(missing)} to choose under it: set them "
                "(for_replay(...)), or replay it with moescope.simulate / simulate(...), which do"
            )
        if len(set(self._labels())) != len(self.candidates):
            raise ConfigError("AutoPolicy: parameter candidates names the same policy twice")

    def _new(self, candidate: str | CachePolicy) -> CachePolicy:
        pol = make_policy(candidate) if isinstance(candidate, str) else clone(candidate)
        return fit_on_replay_steps(pol, self.mode, self.batch_size)  # type: ignore[arg-type]

    def _held_out(self, trace: Any) -> _HeldOut:
        """The held-out part and every candidate fitted on the rest, kept while the training trace,
        split and step cut are the same (a sweep refits at every cache size)."""
        key = (self.holdout, self.seed, self.mode, self.batch_size, tuple(map(repr, self.candidates)))
        memo = getattr(self, "_memo", None)
        if memo is not None and memo.trace is trace and memo.key == key:
            return memo
        part, val = trace.split(self.holdout, self.seed)
        steps = prepare(val, mode=self.mode, batch_size=self.batch_size)
        fitted = {lab: self._new(c).fit(part) for lab, c in zip(self._labels(), self.candidates, strict=True)}
        self._memo = _HeldOut(trace, key, part, val, steps, fitted)
        return self._memo

    def _ranked_prefetch(self, held: _HeldOut) -> tuple[Any, int]:
        """The replay's prefetcher fitted on the larger part and ranked on the held-out steps, once
        per prefetcher object (a sweep reuses them)."""
        if self.prefetcher is None:
            return None, 1
        got = held.ranks.get(id(self.prefetcher))
        if got is None or got[0] is not self.prefetcher:
            pf = copy.deepcopy(self.prefetcher).fit(held.part)
            got = (self.prefetcher, step_prefetch(held.steps, pf.ranked(held.val)), int(pf.distance))
            held.ranks[id(self.prefetcher)] = got
        return got[1], got[2]

    def _fit(self, trace: Any) -> None:
        if trace is None:
            raise ConfigError(
                "auto chooses its policy on held-out documents of a training trace: call fit(train) "
                "(`moescope simulate --policy auto` needs --train)"
            )
        self._check()
        held = self._held_out(trace)
        pref, dist = self._ranked_prefetch(held)
        capacity = np.asarray(self.capacity, np.int64)
        self.scores_, self.heldout_hit_rate_ = {}, {}
        for label, pol in held.fitted.items():
            s = run(
                held.steps,
                pol,
                capacity,
                self.deployment,  # type: ignore[arg-type]
                self.cost,  # type: ignore[arg-type]
                shared=self.shared,
                prefetch=pref,
                distance=dist,
                reset=self.reset,
            ).summary()
            self.scores_[label] = float(s["tokens_per_s"])
            self.heldout_hit_rate_[label] = float(s["hit_rate"])
        self.choice_ = max(self.scores_, key=self.scores_.__getitem__)  # the first of equals
        if self.choice_ not in held.refits:  # the choice fitted on all of TRAIN, once per candidate
            cand = dict(zip(self._labels(), self.candidates, strict=True))[self.choice_]
            held.refits[self.choice_] = self._new(cand).fit(trace)
        self.policy_ = held.refits[self.choice_]
        self.heldout_documents_ = len(held.val.documents())
        self.heldout_tokens_ = int(held.steps.tokens.sum())

    def selection(self) -> dict[str, Any]:
        """What was chosen and why, for summaries: the choice, every candidate's held-out tokens/s
        and hit rate, and the held-out part's size."""
        self.check_is_fitted()
        return {
            "choice": self.choice_,
            "chosen_policy": self.policy_.describe(),
            "predictor_guided": bool(self.policy_.predictor_guided),
            "heldout_tokens_per_s": dict(self.scores_),
            "heldout_hit_rate": dict(self.heldout_hit_rate_),
            "heldout_documents": self.heldout_documents_,
            "heldout_tokens": self.heldout_tokens_,
            "holdout": self.holdout,
            "seed": self.seed,
        }

    def describe(self) -> str:
        return "auto"

    # ------------------------------------------------------ the chosen policy's rules
    def _chosen(self) -> CachePolicy:
        self.check_is_fitted()
        return self.policy_

    @property
    def bypass(self) -> bool:  # type: ignore[override]
        return bool(self._chosen().bypass)

    @property
    def protect(self) -> bool:  # type: ignore[override]
        return bool(self._chosen().protect)

    @property
    def needs_future(self) -> bool:  # type: ignore[override]
        return bool(self._chosen().needs_future)

    @property
    def pred_next(self) -> bool:  # type: ignore[override]
        return bool(self._chosen().pred_next)

    @property
    def predictor_guided(self) -> bool:  # type: ignore[override]
        return bool(self._chosen().predictor_guided)

    @property
    def priority_rule(self) -> int:  # type: ignore[override]
        return int(self._chosen().priority_rule)

    @property
    def use_rule(self) -> int:  # type: ignore[override]
        return int(self._chosen().use_rule)

    def param(self) -> float:
        return self._chosen().param()

    def critical_path_s(self) -> float:
        return self._chosen().critical_path_s()

    def horizon_steps(self) -> int:
        return self._chosen().horizon_steps()

    def reuse_model(
        self, num_layers: int, num_experts: int, load_time: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._chosen().reuse_model(num_layers, num_experts, load_time)

    def next_use(self, steps: Any) -> np.ndarray:
        return self._chosen().next_use(steps)

    def pinned(self, num_layers: int, num_experts: int, capacity: np.ndarray, per_layer: bool) -> np.ndarray:
        return self._chosen().pinned(num_layers, num_experts, capacity, per_layer)


POLICIES[AutoPolicy.name] = AutoPolicy  # the registry: make_policy("auto")

__all__ = ["FREE_CANDIDATES", "GUIDED_CANDIDATES", "AutoPolicy"]
