"""The estimator contract of moescope.core.estimator, on every registered predictor and cache policy.

Fitting and predicting are checked per family in test_predict_contract.py and test_simulate.py; this
file checks what every estimator shares, unfitted: parameters round-trip, clone, one not-fitted error.
"""

from __future__ import annotations

from typing import ClassVar

import pytest

from moescope.core.estimator import Estimator, Interval, NotFittedError, clone, plain_params
from moescope.errors import ConfigError
from moescope.predict import CombinedPredictor, LearnedPredictor, make_predictor
from moescope.predict.base import registered_predictors
from moescope.simulate.policies import POLICIES, make_policy

ESTIMATORS = [("predictor", n) for n in registered_predictors()] + [("policy", n) for n in POLICIES]


def _make(kind: str, name: str) -> Estimator:
    return make_predictor(name) if kind == "predictor" else make_policy(name)


@pytest.mark.parametrize(("kind", "name"), ESTIMATORS)
def test_params_round_trip(kind: str, name: str) -> None:
    est = _make(kind, name)
    params = est.get_params(deep=False)
    # __init__ stores every argument unchanged under its own name
    again = type(est)(**params)
    assert all(again.get_params(deep=False)[k] is v for k, v in params.items())
    # set_params acts like the constructor, deep keys included
    other = type(est)()
    assert other.set_params(**params) is other
    assert plain_params(other) == plain_params(est)
    deep = est.get_params(deep=True)
    assert set(params) <= set(deep)
    fresh = clone(est)
    fresh.set_params(**{k: v for k, v in deep.items() if "__" in k})
    assert plain_params(fresh) == plain_params(est)
    with pytest.raises(ConfigError, match="has no parameter 'no_such_parameter'"):
        est.set_params(no_such_parameter=1)


@pytest.mark.parametrize(("kind", "name"), ESTIMATORS)
def test_clone_is_unfitted_with_equal_parameters_and_its_own_parts(kind: str, name: str) -> None:
    est = _make(kind, name)
    est.fitted_ = True  # pretend: clone must not carry state
    c = clone(est)
    assert type(c) is type(est) and c is not est
    assert plain_params(c) == plain_params(est)
    assert not c.is_fitted()
    for k, v in est.get_params(deep=False).items():
        if isinstance(v, Estimator):
            assert c.get_params(deep=False)[k] is not v


@pytest.mark.parametrize(("kind", "name"), ESTIMATORS)
def test_one_not_fitted_error(kind: str, name: str) -> None:
    est = _make(kind, name)
    with pytest.raises(NotFittedError) as info:
        est.check_is_fitted()
    assert str(info.value) == f"{type(est).__name__} is not fitted yet: call fit(...) first"


def test_clone_refuses_a_constructor_that_alters_a_parameter() -> None:
    class Rounds(Estimator):
        def __init__(self, *, x: float = 1.0) -> None:
            self.x = x + 1

    with pytest.raises(ConfigError, match="altered parameter 'x'"):
        clone(Rounds(x=1.5))


def test_constraints_name_the_parameter() -> None:
    class Bounded(Estimator):
        _parameter_constraints: ClassVar[dict] = {"x": Interval(float, 0.0, 1.0)}

        def __init__(self, *, x: float = 0.5) -> None:
            self.x = x

    Bounded()._validate_params()
    with pytest.raises(
        ConfigError, match=r"Bounded: parameter x=2 is invalid; it must be a number in \[0.0, 1.0\]"
    ):
        Bounded(x=2)._validate_params()
    with pytest.raises(ConfigError, match="parameter decay="):
        make_policy("lrfu", decay="fast").fit()


def test_combined_takes_its_learned_part_as_an_estimator() -> None:
    a, b = make_predictor("best"), make_predictor("best", learned__hidden=8, learned__epochs=1)
    assert isinstance(a.learned, LearnedPredictor) and (a.learned.hidden, a.learned.epochs) == (128, 2)
    assert b.learned.hidden == 8 and b.learned.epochs == 1
    assert make_predictor("best").learned is not a.learned  # registry defaults are cloned per call
    part = LearnedPredictor(hidden=4)
    c = CombinedPredictor(learned=part)
    assert c.learned is part and c.get_params()["learned__hidden"] == 4
    assert CombinedPredictor().learned is None
    with pytest.raises(ConfigError, match="not an estimator"):
        CombinedPredictor().set_params(learned__hidden=4)


def test_registry_lists_every_name_with_its_description() -> None:
    reg = registered_predictors()
    listed = {n for n, r in reg.items() if r.listed}
    assert {"frequency", "rules", "rules-ahead", "best"} <= listed
    assert all(r.description for r in reg.values())
    ahead = make_predictor("rules-ahead")
    assert ahead.level == 1 and ahead.distances == (2, 4, 8)
    assert not reg["rules-level5"].listed and "rules-ahead" in reg["rules-level5"].description
