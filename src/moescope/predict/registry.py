"""Predictor names for ``moescope predict list|fit`` and :func:`~moescope.predict.base.make_predictor`."""

from __future__ import annotations

from moescope.predict.base import register_predictor
from moescope.predict.baselines import FrequencyPredictor, TokenPredictor
from moescope.predict.combined import CombinedPredictor
from moescope.predict.cooccurrence import CooccurrencePredictor
from moescope.predict.learned import LearnedPredictor
from moescope.predict.lookahead import LookaheadPredictor
from moescope.predict.rules import RulesPredictor

#: name -> one-line description, in the order ``moescope predict list`` shows them.
DESCRIPTIONS: dict[str, str] = {
    "uniform": "baseline: uniformly random ranking (slot recall k/E)",
    "popularity": "baseline: the layer's most used experts in training",
    "previous": "baseline: the previous token's experts at the same layer",
    "window": "baseline: experts used most by the last W tokens at the same layer (--param window=W)",
    "same-token": "baseline: the experts of the same token's most recent earlier occurrence in the document",
    "token": "per-layer table of the experts each token id used most (hashed token text when no ids)",
    "lookahead": "gate lookahead, next gates on the current gate input (needs captured lookahead columns)",
    "lookahead-residual": "gate lookahead, next gates on the normed residual stream (needs lookahead columns)",
    "rules-level1": "seed 004 level 1: (layer, expert) -> next expert, majority vote",
    "rules-level2": "seed 004 level 2: (layer, expert at N-1, N)",
    "rules-level3": "seed 004 level 3: (layer, experts at N-2, N-1, N)",
    "rules-level4": "seed 004 level 4: (layer, primary, secondary)",
    "rules-level5": "seed 004 level 5: (layer, expert) -> expert K layers ahead, K = 2, 4, 8",
    "rules-hybrid": "seed 004 hybrid: level 3, else 2, else 1, else the layer's most frequent expert",
    "cooccurrence": "seed 000 method 3: smoothed conditional probabilities from inter-layer co-occurrence",
    "learned": "seed 000 method 2: residual MLP on token ids, every known layer and earlier tokens' full routing",
    "combined": "everything the trace holds: learned model + gate lookahead blend (the best)",
    "best": "alias of combined",
}

register_predictor("uniform", FrequencyPredictor, strategy="uniform")
register_predictor("popularity", FrequencyPredictor, strategy="most_frequent")
register_predictor("previous", FrequencyPredictor, strategy="previous_token")
register_predictor("window", FrequencyPredictor, strategy="window", window=4)
register_predictor("same-token", FrequencyPredictor, strategy="same_token")
register_predictor("frequency", FrequencyPredictor)
register_predictor("token", TokenPredictor)
register_predictor("lookahead", LookaheadPredictor, variant="gate_input")
register_predictor("lookahead-residual", LookaheadPredictor, variant="residual")
for _lv in (1, 2, 3, 4):
    register_predictor(f"rules-level{_lv}", RulesPredictor, level=_lv)
register_predictor("rules-level5", RulesPredictor, level=1, distances=(2, 4, 8))
register_predictor("rules-hybrid", RulesPredictor, level="hybrid")
register_predictor("rules", RulesPredictor)
register_predictor("cooccurrence", CooccurrencePredictor)
register_predictor("learned", LearnedPredictor)
register_predictor("combined", CombinedPredictor)
register_predictor("best", CombinedPredictor)

#: names whose predictors answer any mode without a ``distances`` parameter
MODELESS = ("uniform", "popularity", "previous", "window", "frequency")
