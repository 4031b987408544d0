"""Expert prediction: predictors (scikit-learn style), leak-free queries and honest evaluation.

Online use (e.g. a prefetching simulator)::

    from moescope.predict import make_predictor, iter_contexts
    pred = make_predictor("best", distances=(1,)).fit(train_trace)
    for ctx in iter_contexts(test_trace, window=pred.history_window()):
        q = ctx.queries(layer=5, distance=1)      # what is known before layer 5's router runs
        ids, scores = pred.predict(q, m=8)        # (n, 8) ranked expert ids, best first

See ``docs/predict.md``.
"""

from moescope.predict.base import BasePredictor, NotFittedError, clone, load_predictor, make_predictor, rank
from moescope.predict.baselines import FrequencyPredictor
from moescope.predict.combined import CombinedPredictor
from moescope.predict.cooccurrence import CooccurrencePredictor
from moescope.predict.evaluate import EvalResult, evaluate, evaluate_many, split_documents
from moescope.predict.learned import LearnedPredictor
from moescope.predict.lookahead import LookaheadPredictor
from moescope.predict.queries import TEMPORAL, Context, Queries, iter_contexts, mode_name, parse_mode
from moescope.predict.rules import RulesPredictor
from moescope.predict.temporal import NextUsePredictor, ReusePredictor, next_use_distance

make = make_predictor  # the front door's spelling: moescope.predict.make("best")

__all__ = [
    "TEMPORAL",
    "BasePredictor",
    "CombinedPredictor",
    "Context",
    "CooccurrencePredictor",
    "EvalResult",
    "FrequencyPredictor",
    "LearnedPredictor",
    "LookaheadPredictor",
    "NextUsePredictor",
    "NotFittedError",
    "Queries",
    "ReusePredictor",
    "RulesPredictor",
    "clone",
    "evaluate",
    "evaluate_many",
    "iter_contexts",
    "load_predictor",
    "make",
    "make_predictor",
    "mode_name",
    "next_use_distance",
    "parse_mode",
    "rank",
    "split_documents",
]
