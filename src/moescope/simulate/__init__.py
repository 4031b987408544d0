"""``moescope simulate``: replay traces through an expert cache, a prefetcher and a timing model."""

from moescope.simulate.deployment import (
    PRESETS,
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

__all__ = [
    "LFU",
    "LRFU",
    "LRU",
    "POLICIES",
    "PREFETCHERS",
    "PRESETS",
    "Belady",
    "CachePolicy",
    "Deployment",
    "ModelCost",
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
    "run",
    "simulate",
    "step_prefetch",
]
