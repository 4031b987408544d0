"""Analyses of routing traces: each a plain function over a :class:`~moescope.trace.Trace`.

Every function streams the trace (memory stays flat) and returns Polars DataFrames with units in
the column names; ``plot_*`` functions turn those frames into matplotlib figures, and
:func:`~moescope.analysis.run.run_analyses` runs them all in one pass (``moescope analyze``).
"""

from moescope.analysis.cooccurrence import coactivation, layer_transitions
from moescope.analysis.density import LogitDensity, fit_logit_density, score_logits
from moescope.analysis.entropy import routing_entropy, token_entropy_bits
from moescope.analysis.load import aux_loss, load_balance, load_summary
from moescope.analysis.locality import repetition, table5
from moescope.analysis.specialisation import compare_traces, domain_specialisation, vocabulary_specialisation
from moescope.analysis.trajectories import sample_trajectories

__all__ = [
    "LogitDensity",
    "aux_loss",
    "coactivation",
    "compare_traces",
    "domain_specialisation",
    "fit_logit_density",
    "layer_transitions",
    "load_balance",
    "load_summary",
    "repetition",
    "routing_entropy",
    "sample_trajectories",
    "score_logits",
    "table5",
    "token_entropy_bits",
    "vocabulary_specialisation",
]
