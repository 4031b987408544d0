"""Predictor names for ``moescope predict list|fit`` and :func:`~moescope.predict.base.make_predictor`.

Each registration carries its one-line description, so a name cannot be registered without being
listed (aliases say ``listed=False``). ``moescope predict list`` shows them in this order.
"""

from __future__ import annotations

from moescope.predict.base import register_predictor
from moescope.predict.baselines import FrequencyPredictor, TokenPredictor
from moescope.predict.combined import CombinedPredictor
from moescope.predict.cooccurrence import CooccurrencePredictor
from moescope.predict.learned import LearnedPredictor
from moescope.predict.lookahead import LookaheadPredictor
from moescope.predict.rules import RulesPredictor

register_predictor(
    "uniform", FrequencyPredictor, "baseline: uniformly random ranking (slot recall k/E)", strategy="uniform"
)
register_predictor(
    "popularity",
    FrequencyPredictor,
    "baseline: the layer's most used experts in training",
    strategy="most_frequent",
)
register_predictor(
    "previous",
    FrequencyPredictor,
    "baseline: the previous token's experts at the same layer",
    strategy="previous_token",
)
register_predictor(
    "window",
    FrequencyPredictor,
    "baseline: experts used most by the last W tokens at the same layer (--param window=W)",
    strategy="window",
    window=4,
)
register_predictor(
    "same-token",
    FrequencyPredictor,
    "baseline: the experts of the same token's most recent earlier occurrence in the document",
    strategy="same_token",
)
register_predictor(
    "frequency",
    FrequencyPredictor,
    "any baseline above by its parameter (--param strategy=uniform|most_frequent|previous_token|window|same_token)",
)
register_predictor(
    "token",
    TokenPredictor,
    "per-layer table of the experts each token id used most (hashed token text when no ids)",
)
register_predictor(
    "lookahead",
    LookaheadPredictor,
    "gate lookahead, next gates on the current gate input (needs captured lookahead columns)",
    variant="gate_input",
)
register_predictor(
    "lookahead-residual",
    LookaheadPredictor,
    "gate lookahead, next gates on the normed residual stream (needs lookahead columns)",
    variant="residual",
)
_LEVELS = {
    1: "(layer, expert) -> next expert, majority vote",
    2: "(layer, expert at N-1, N)",
    3: "(layer, experts at N-2, N-1, N)",
    4: "(layer, primary, secondary)",
}
for _lv, _what in _LEVELS.items():
    register_predictor(f"rules-level{_lv}", RulesPredictor, f"seed 004 level {_lv}: {_what}", level=_lv)
register_predictor(
    "rules-ahead",
    RulesPredictor,
    "level-1 rules (layer, expert) -> expert K layers ahead, K = 2, 4, 8 (seed 004's 'level 5')",
    level=1,
    distances=(2, 4, 8),
)
register_predictor(
    "rules-level5",
    RulesPredictor,
    "seed 004's name of rules-ahead",
    listed=False,
    level=1,
    distances=(2, 4, 8),
)
register_predictor(
    "rules-hybrid",
    RulesPredictor,
    "seed 004 hybrid: level 3, else 2, else 1, else the layer's most frequent expert",
    level="hybrid",
)
register_predictor(
    "rules", RulesPredictor, "seed 004 rules by parameter (--param level=1|2|3|4|hybrid, distances=[...])"
)
register_predictor(
    "cooccurrence",
    CooccurrencePredictor,
    "seed 000 method 3: smoothed conditional probabilities from inter-layer co-occurrence",
)
register_predictor(
    "learned",
    LearnedPredictor,
    "seed 000 method 2: residual MLP on token ids, every known layer and earlier tokens' full routing",
)
# The learned part of ``best``: sized to fit the 1,999 DeepSeek-V2-Lite prompts (172k tokens) in
# minutes on one CPU thread (BENCHMARKS.md "Expert prediction", benchmarks/predict_fit.py): width 128
# costs a quarter of width 256 per (token, layer) cell, dropout (30% of a step) is dropped, and
# 8192-cell steps with a higher one-cycle peak replace 2048-cell steps.
BEST_LEARNED = {"hidden": 128, "epochs": 2, "dropout": 0.0, "batch_size": 8192, "lr": 3e-3}
register_predictor(
    "combined",
    CombinedPredictor,
    "everything the trace holds: learned model + tables + gate lookahead, stacked (the best)",
    learned=LearnedPredictor(**BEST_LEARNED),
)
register_predictor("best", CombinedPredictor, "alias of combined", learned=LearnedPredictor(**BEST_LEARNED))
