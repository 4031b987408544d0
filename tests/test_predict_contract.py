"""The estimator contract, checked on every registered predictor (STYLE.md: one parametrised test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moescope.core.estimator import plain_params
from moescope.errors import ConfigError, MoescopeError
from moescope.predict import NotFittedError, clone, iter_contexts, load_predictor, make_predictor
from moescope.predict.base import registered_predictors
from moescope.trace import RoutingSpec, Trace, TraceWriter
from moescope.trace.schema import default_columns

L, E, K, M = 4, 8, 2, 3
SMALL_MODEL = {"hidden": 16, "epochs": 1, "batch_size": 256, "token_buckets": 64, "max_samples": 4000}


def write_trace(path: Path, n_docs: int = 12, doc_len: int = 48, seed: int = 0) -> Trace:
    """A small trace with every optional column a predictor may use (token ids, gate lookahead)."""
    rng = np.random.default_rng(seed)
    spec = RoutingSpec(num_experts=E, top_k=K, moe_layers=list(range(L)), family="synthetic")
    cols = default_columns(weights=True, lookahead_distances=[1, 2], lookahead_m=M)
    with TraceWriter.create(path, spec, columns=cols, overwrite=True) as w:
        for doc in range(n_docs):
            n = doc_len
            experts = np.argsort(rng.random((n, L, E)), axis=-1)[..., :K].astype(np.uint8)
            weights = np.sort(rng.random((n, L, K)).astype(np.float32), axis=-1)[..., ::-1]
            look = {}
            for v in ("gate_input", "residual"):
                for d in (1, 2):
                    look[f"lookahead_{v}_d{d}"] = np.argsort(rng.random((n, L, E)), axis=-1)[..., :M].astype(
                        np.uint8
                    )
            w.append(
                doc_id=np.full(n, doc),
                position=np.arange(n),
                token_id=rng.integers(0, 30, n),
                label="x",
                experts=experts,
                weights=np.ascontiguousarray(weights),
                lookahead=look,
            )
            w.commit(doc)
    return Trace.open(path)


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Trace:
    return write_trace(tmp_path_factory.mktemp("contract") / "t")


def _make(name: str):
    params = {}
    if name == "learned":
        params = dict(SMALL_MODEL)
    elif name in ("combined", "best"):
        params = {f"learned__{k}": v for k, v in SMALL_MODEL.items()}
    return make_predictor(name, **params)


def _first_queries(trace: Trace, pred) -> list:
    modes = pred.modes() or [1]
    out = []
    for ctx in iter_contexts(trace, window=pred.history_window()):
        for layer in range(L):
            for d in modes:
                out.append(ctx.queries(layer, d))
        break
    return out


NAMES = list(registered_predictors())


@pytest.mark.parametrize("name", NAMES)
def test_contract(name: str, trace: Trace, tmp_path: Path) -> None:
    pred = _make(name)
    # unfitted: predict refuses
    q0 = None
    for ctx in iter_contexts(trace, window=1):
        q0 = ctx.queries(1, 1)
        break
    with pytest.raises(NotFittedError, match="not fitted"):
        pred.predict(q0)
    # clone keeps parameters, drops state
    c = clone(pred)
    assert type(c) is type(pred) and plain_params(c) == plain_params(pred)
    pred.fit(trace)
    assert pred.is_fitted() and not clone(pred).is_fitted()
    qs = _first_queries(trace, pred)
    first = [pred.predict(q, m=4) for q in qs]
    for (ids, scores), q in zip(first, qs, strict=True):
        assert ids.shape == (len(q), 4) and scores.shape == (len(q), 4)
        answered = ids[:, 0] >= 0
        assert ((ids[answered] >= 0) & (ids[answered] < E)).all()
        # ranked: distinct ids, scores non-increasing
        srt = np.sort(ids[answered], axis=1)
        assert (np.diff(srt, axis=1) != 0).all()
        assert (np.diff(scores[answered], axis=1) <= 1e-6).all()
    # refit on the same data gives the same predictions (seed determinism, no state carried over)
    pred.fit(trace)
    again = [pred.predict(q, m=4)[0] for q in qs]
    for a, (b, _) in zip(again, first, strict=True):
        np.testing.assert_array_equal(a, b)
    # a fresh predictor with the same parameters gives the same predictions too
    fresh = clone(pred).fit(trace)
    for q, (b, _) in zip(qs, first, strict=True):
        np.testing.assert_array_equal(fresh.predict(q, m=4)[0], b)
    # save / load round trip without pickle
    path = pred.save(tmp_path / "m.npz")
    with np.load(path, allow_pickle=False) as z:
        assert "__header__" in z.files
    loaded = load_predictor(path)
    assert type(loaded) is type(pred) and plain_params(loaded) == plain_params(pred)
    for q, (b, s) in zip(qs, first, strict=True):
        ids, scores = loaded.predict(q, m=4)
        np.testing.assert_array_equal(ids, b)
        np.testing.assert_allclose(scores, s, rtol=1e-5, atol=1e-6)
    assert pred.n_params_ > 0 or name == "uniform"


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("frequency", {"strategy": "median"}, "strategy"),
        ("window", {"window": 0}, "window"),
        ("cooccurrence", {"alpha": -1.0}, "alpha"),
        ("rules", {"level": 7}, "level"),
        ("rules", {"distances": ()}, "distances"),
        ("learned", {"hidden": "big"}, "hidden"),
        ("lookahead", {"variant": "logits"}, "variant"),
    ],
)
def test_bad_parameters_name_the_parameter(name: str, params: dict, field: str, trace: Trace) -> None:
    pred = make_predictor(name, **params)  # __init__ stores without validating
    assert pred.get_params()[field] == params[field]
    with pytest.raises(ConfigError, match=f"parameter {field}="):
        pred.fit(trace)


def test_unknown_predictor_and_parameter() -> None:
    with pytest.raises(ConfigError, match="unknown predictor 'oracle'"):
        make_predictor("oracle")
    with pytest.raises(ConfigError, match="no parameter 'depth'"):
        make_predictor("cooccurrence").set_params(depth=3)


def test_unfitted_mode_is_refused(trace: Trace) -> None:
    pred = make_predictor("cooccurrence", distances=(1,)).fit(trace)
    for ctx in iter_contexts(trace, window=1):
        with pytest.raises(ConfigError, match="refit with that distance"):
            pred.predict(ctx.queries(2, 2))
        break


def test_lookahead_needs_lookahead_columns(tmp_path: Path) -> None:
    from moescope.trace.synthetic import write_synthetic_trace

    tr = write_synthetic_trace(tmp_path / "s", n_tokens=256, num_layers=2, law="uniform")
    with pytest.raises(MoescopeError, match="no lookahead_gate_input_d"):
        make_predictor("lookahead").fit(tr)


def test_load_rejects_foreign_files(tmp_path: Path) -> None:
    bad = tmp_path / "x.npz"
    np.savez(bad, a=np.zeros(3))
    with pytest.raises(ConfigError, match="not a moescope predictor file"):
        load_predictor(bad)
    with pytest.raises(ConfigError, match="no such predictor file"):
        load_predictor(tmp_path / "missing.npz")
