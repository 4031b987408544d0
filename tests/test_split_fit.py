"""``Trace.split`` gives train/test traces every stage reads, and fitting on replayed documents is never implicit."""

from __future__ import annotations

import numpy as np
import pytest

from moescope.analysis.load import load_balance
from moescope.errors import ConfigError
from moescope.predict import evaluate, make_predictor
from moescope.simulate import LRU, ModelCost, StaticPin, TablePrefetcher, get_preset, simulate
from moescope.simulate.fitting import REPLAYED, fit_source
from moescope.simulate.prefetch import PredictorPrefetcher
from moescope.trace.split import fit_record, held_out, split_documents
from moescope.trace.synthetic import write_synthetic_trace

COST = ModelCost(expert_params=6144, top_k=2)
DEP = get_preset("rtx4090-pcie4")


@pytest.fixture(scope="module")
def tr(tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "t"
    return write_synthetic_trace(
        path, n_tokens=1200, num_layers=3, num_experts=8, top_k=2, law="markov", noise=0.3, doc_len=40, seed=5
    )


def test_split_views_and_written_halves_agree(tr, tmp_path) -> None:
    train, test = tr.split(0.25, seed=3)
    want_train, want_test = split_documents(tr, 0.25, 3)
    assert np.array_equal(train.documents(), want_train) and np.array_equal(test.documents(), want_test)
    assert np.intersect1d(train.documents(), test.documents()).size == 0
    assert train.num_tokens + test.num_tokens == tr.num_tokens
    wtrain, wtest = tr.split(0.25, seed=3, output=tmp_path / "s")
    assert (wtrain.path, wtest.path) == (tmp_path / "s" / "train", tmp_path / "s" / "test")
    assert np.array_equal(wtrain.experts(), train.experts()) and np.array_equal(
        wtest.experts(), test.experts()
    )
    # every stage reads a view like a trace on disk
    assert load_balance(test).equals(load_balance(wtest))
    a = evaluate(make_predictor("cooccurrence").fit(train), test, n_boot=10).value("slot_recall")
    b = evaluate(make_predictor("cooccurrence").fit(wtrain), wtest, n_boot=10).value("slot_recall")
    assert a == b
    cap = np.full(3, 3)
    sv = simulate(test, LRU(), cap, DEP, COST, prefetcher=TablePrefetcher(budget=2), fit_trace=train)
    sw = simulate(wtest, LRU(), cap, DEP, COST, prefetcher=TablePrefetcher(budget=2), fit_trace=wtrain)
    assert sv.summary()["hits"] == sw.summary()["hits"]
    with pytest.raises(ConfigError, match=r"test_fraction must be in \(0, 1\)"):
        tr.split(1.0)


def test_held_out_restricts_scoring_on_the_training_trace(tr, tmp_path) -> None:
    train_docs, test_docs = split_documents(tr, 0.25, 0)
    record = fit_record(tr, train_docs, test_docs, 0)
    part = held_out(tr, record)
    assert (
        np.array_equal(part.trace.documents(), test_docs)
        and part.scored == f"{len(test_docs)} held-out documents"
    )
    everything = held_out(tr, record, "all")
    assert everything.trace is tr and "optimistic" in everything.warning
    other = write_synthetic_trace(tmp_path / "o", n_tokens=80, num_layers=3, num_experts=8, doc_len=40)
    assert held_out(other, record).trace is other and held_out(other, record).warning is None
    with pytest.raises(ConfigError, match="fitted on every document"):
        held_out(tr, fit_record(tr, tr.documents(), [], 0))
    with pytest.raises(ConfigError, match="documents must be 'test' or 'all'"):
        held_out(tr, record, "train")


def test_simulate_fits_only_on_a_named_trace(tr, tmp_path) -> None:
    cap = np.full(3, 3)
    train, test = tr.split(0.25, seed=0)
    with pytest.raises(ConfigError, match=r"table\(.*learn\(s\) from a trace: pass fit_trace=.*'replayed'"):
        simulate(tr, LRU(), cap, DEP, COST, prefetcher=TablePrefetcher(budget=2))
    with pytest.raises(ConfigError, match="static"):
        simulate(tr, StaticPin(), cap, DEP, COST)
    simulate(tr, LRU(), cap, DEP, COST)  # nothing learns: no training trace needed
    with pytest.raises(ConfigError, match=r"fit_trace shares \d+ document\(s\) with the replayed trace"):
        simulate(test, LRU(), cap, DEP, COST, prefetcher=TablePrefetcher(budget=2), fit_trace=tr)
    honest = simulate(test, LRU(), cap, DEP, COST, prefetcher=TablePrefetcher(budget=2), fit_trace=train)
    self_fit = simulate(test, LRU(), cap, DEP, COST, prefetcher=TablePrefetcher(budget=2), fit_trace=REPLAYED)
    assert honest.summary()["hits"] != self_fit.summary()["hits"]
    with pytest.raises(ConfigError, match="fit_trace must be a training Trace"):
        fit_source(tr, "train", LRU())


def test_saved_predictor_is_not_replayed_on_its_training_documents(tr, tmp_path) -> None:
    train_docs, test_docs = split_documents(tr, 0.25, 0)
    pred = make_predictor("cooccurrence").fit(tr.filter(documents=train_docs))
    path = pred.save(tmp_path / "p.npz", extra=fit_record(tr, train_docs, test_docs, 0))
    cap = np.full(3, 3)
    with pytest.raises(ConfigError, match=r"fitted on \d+ of the replayed documents"):
        simulate(tr, LRU(), cap, DEP, COST, prefetcher=PredictorPrefetcher(predictor=str(path)))
    test = held_out(tr, fit_record(tr, train_docs, test_docs, 0)).trace
    res = simulate(test, LRU(), cap, DEP, COST, prefetcher=PredictorPrefetcher(predictor=str(path)))
    assert res.summary()["hits"] > 0
    simulate(
        tr, LRU(), cap, DEP, COST, prefetcher=PredictorPrefetcher(predictor=str(path)), fit_trace=REPLAYED
    )
