"""``moescope simulate``: replay traces through an expert cache, a prefetcher and a timing model.

The package is callable: ``moescope.simulate(test, fit_trace=train, cache_fraction=0.25)`` is
:func:`~moescope.simulate.replay.replay`.
"""

from moescope.core.modules import make_callable
from moescope.simulate.auto import AutoPolicy
from moescope.simulate.deployment import (
    DEPLOYMENT_PRESETS,
    Deployment,
    ModelCost,
    Tier,
    cache_capacity,
    get_preset,
    model_cost,
)
from moescope.simulate.engine import SimResult, Steps, prepare, run, simulate, step_prefetch
from moescope.simulate.policies import (
    LFU,
    LRFU,
    LRU,
    POLICIES,
    Belady,
    CachePolicy,
    HorizonOracle,
    LearnedReuse,
    LearnedReuseAdmit,
    NextUse,
    NextUseEvict,
    OracleNextUse,
    ProtectedLRU,
    StaticPin,
    make_policy,
)
from moescope.simulate.prefetch import (
    PREFETCHERS,
    OraclePrefetcher,
    PredictorPrefetcher,
    Prefetcher,
    PreviousTokenPrefetcher,
    TablePrefetcher,
    make_prefetcher,
)
from moescope.simulate.replay import replay

__all__ = [
    "DEPLOYMENT_PRESETS",
    "LFU",
    "LRFU",
    "LRU",
    "POLICIES",
    "PREFETCHERS",
    "AutoPolicy",
    "Belady",
    "CachePolicy",
    "Deployment",
    "HorizonOracle",
    "LearnedReuse",
    "LearnedReuseAdmit",
    "ModelCost",
    "NextUse",
    "NextUseEvict",
    "OracleNextUse",
    "OraclePrefetcher",
    "PredictorPrefetcher",
    "Prefetcher",
    "PreviousTokenPrefetcher",
    "ProtectedLRU",
    "SimResult",
    "StaticPin",
    "Steps",
    "TablePrefetcher",
    "Tier",
    "cache_capacity",
    "get_preset",
    "make_policy",
    "make_prefetcher",
    "model_cost",
    "prepare",
    "replay",
    "run",
    "simulate",
    "step_prefetch",
]

make_callable(__name__, "replay")
