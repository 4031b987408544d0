"""Slot order is one typed routing fact (``rank`` or ``set``): written, validated, read the same way.

The traces under ``tests/data/main-de621f0`` were written by ``main`` before the change (see the
``make.py`` beside them); they must still open and mean the same thing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from moescope.analysis.load import load_balance
from moescope.analysis.locality import repetition
from moescope.errors import ConfigError, TraceError
from moescope.predict import make_predictor
from moescope.trace import RoutingSpec, Trace, TraceWriter
from moescope.trace.manifest import LEGACY_SLOT_ORDERS
from moescope.trace.split import write_subset
from moescope.trace.validate import validate_trace

LEGACY = Path(__file__).parent / "data" / "main-de621f0"


@pytest.mark.parametrize(
    ("name", "order"), [("megatron-ascending", "set"), ("vllm-as-logged", "set"), ("synthetic-rank", "rank")]
)
def test_traces_written_by_main_still_open(name: str, order: str) -> None:
    tr = Trace.open(LEGACY / name)
    assert "slot_order" not in tr.manifest["routing"]  # written before the field existed
    assert tr.slot_order == order and tr.ranked == (order == "rank")
    assert validate_trace(tr.path) == []
    b = tr.load()
    assert b.experts.shape == (tr.num_tokens, tr.num_layers, tr.top_k)


def test_megatron_ascending_ids_get_no_first_choice_statistic() -> None:
    tr = Trace.open(LEGACY / "megatron-ascending")
    ex = tr.experts()
    assert (np.diff(ex.astype(int), axis=-1) > 0).all()  # sorted by id: slot 0 is the smallest id
    assert load_balance(tr)["first_choice_share"].null_count() == load_balance(tr).height
    assert repetition(tr)["first_choice_same"].null_count() == repetition(tr).height
    ranked = load_balance(Trace.open(LEGACY / "synthetic-rank"))["first_choice_share"]
    assert ranked.null_count() == 0 and ranked.sum() == pytest.approx(2.0)  # shares sum to 1 per layer


def test_first_choice_predictors_refuse_set_traces_and_auto_follows_the_fact() -> None:
    st, rk = Trace.open(LEGACY / "megatron-ascending"), Trace.open(LEGACY / "synthetic-rank")
    with pytest.raises(ConfigError, match=r"target='primary' needs slots in rank order.*'set'"):
        make_predictor("rules", target="primary").fit(st)
    with pytest.raises(ConfigError, match=r"slots='ordered' needs slots in rank order"):
        make_predictor("cooccurrence", slots="ordered").fit(st)
    assert make_predictor("rules", target="auto").fit(st).primary_ is False
    assert make_predictor("rules", target="auto").fit(rk).primary_ is True
    assert make_predictor("cooccurrence", slots="auto").fit(st).ordered_ is False
    assert make_predictor("cooccurrence", slots="auto").fit(rk).ordered_ is True


@pytest.mark.parametrize("spelling", sorted(LEGACY_SLOT_ORDERS))
def test_every_old_spelling_is_mapped(tmp_path: Path, spelling: str) -> None:
    d = tmp_path / "t"
    shutil.copytree(LEGACY / "synthetic-rank", d)
    m = json.loads((d / "manifest.json").read_text())
    m["source"]["slot_order"] = spelling
    (d / "manifest.json").write_text(json.dumps(m))
    want = "rank" if spelling in ("rank", "ranked") else "set"
    assert Trace.open(d).slot_order == want


def test_unknown_spellings_are_refused_by_reader_and_writer(tmp_path: Path) -> None:
    d = tmp_path / "t"
    shutil.copytree(LEGACY / "synthetic-rank", d)
    m = json.loads((d / "manifest.json").read_text())
    m["source"]["slot_order"] = "sorted"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceError, match=r"source.slot_order: unknown slot order 'sorted'"):
        Trace.open(d)
    m["routing"]["slot_order"] = "ascending"  # the typed field takes no legacy spelling
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceError, match=r"routing.slot_order must be one of \('rank', 'set'\)"):
        Trace.open(d)
    spec = RoutingSpec(num_experts=4, top_k=2, moe_layers=[0], slot_order="unordered")
    with pytest.raises(TraceError, match=r"routing\.slot_order must be one of"):
        TraceWriter.create(tmp_path / "w", spec)
    w = TraceWriter.create(tmp_path / "w2", RoutingSpec(num_experts=4, top_k=2, moe_layers=[0]))
    with pytest.raises(TraceError, match="slot order must be one of"):
        w.set_slot_order("ascending")
    w.set_slot_order("set")
    w.close()
    assert Trace.open(tmp_path / "w2").manifest["routing"]["slot_order"] == "set"


def test_subsets_and_resumed_traces_keep_the_slot_order(tmp_path: Path) -> None:
    tr = Trace.open(LEGACY / "megatron-ascending")
    sub = write_subset(tr, tr.documents()[:1], tmp_path / "sub")
    assert sub.slot_order == "set" and sub.manifest["routing"]["slot_order"] == "set"
    d = tmp_path / "old"
    shutil.copytree(LEGACY / "megatron-ascending", d)
    TraceWriter.resume(d).close()
    assert json.loads((d / "manifest.json").read_text())["routing"]["slot_order"] == "set"
