"""Routing strategies: change which experts each token uses at run time, for every captured family.

>>> from moescope.strategies import parse_strategy, STRATEGIES
>>> sorted(STRATEGIES)
['entropy', 'mask', 'pvalue', 'random', 'skip', 'threshold', 'topk', 'topp']
>>> parse_strategy("topp:p=0.7").items[0][0]
TopP(p=0.7, min=1, max=None)
"""

from moescope.strategies.apply import Applied, StrategyRouter, materialise, model_facts
from moescope.strategies.base import BaseStrategy, ModelFacts, Routing
from moescope.strategies.rules import (
    STRATEGIES,
    Entropy,
    ExpertNull,
    Mask,
    PValue,
    Random,
    Skip,
    Threshold,
    TopK,
    TopP,
)
from moescope.strategies.spec import BASELINE_NAMES, StrategyPlan, parse_strategy

__all__ = [
    "BASELINE_NAMES",
    "STRATEGIES",
    "Applied",
    "BaseStrategy",
    "Entropy",
    "ExpertNull",
    "Mask",
    "ModelFacts",
    "PValue",
    "Random",
    "Routing",
    "Skip",
    "StrategyPlan",
    "StrategyRouter",
    "Threshold",
    "TopK",
    "TopP",
    "materialise",
    "model_facts",
    "parse_strategy",
]
