"""Mergeable accumulators and ``moescope analyze`` over shard groups (processes, Ray): exact results.

The merge tests cut the stream of batches at arbitrary rows (inside documents too), fold each piece
into fresh accumulators, merge the pieces in order, and compare with one accumulator that saw every
batch: the two paths share no state, and for pairs across a cut (repetition, token transitions,
per-document counts) the merge runs code the single pass never does.
"""

from __future__ import annotations

import itertools
import json
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from moescope.analysis import cooccurrence, density, dependence, entropy, load, locality, specialisation
from moescope.analysis import trajectories as traj
from moescope.analysis._stream import ExactSum, iter_views, make_context, row_uniform
from moescope.analysis.parallel import shard_groups, shard_view
from moescope.analysis.run import analyze
from moescope.errors import ConfigError
from moescope.trace.synthetic import write_synthetic_trace


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    """2,400 tokens in 6 shards of 400 rows; documents of 80 tokens, three domains, logits."""
    return write_synthetic_trace(
        tmp_path_factory.mktemp("par") / "t",
        n_tokens=2400,
        num_layers=4,
        law="markov",
        noise=0.3,
        logits=True,
        doc_len=80,
        labels=("a", "b", "c"),
        chunk_tokens=400,
        shard_rows=400,
        seed=3,
    )


def _accumulators(ctx):
    return [
        load.LoadAccumulator(ctx),
        entropy.EntropyAccumulator(ctx),
        cooccurrence.TransitionAccumulator(ctx, (1, 2)),
        cooccurrence.CoactivationAccumulator(ctx),
        cooccurrence.TokenTransitionAccumulator(ctx),
        locality.RepetitionAccumulator(ctx),
        specialisation.VocabAccumulator(ctx),
        specialisation.DomainAccumulator(ctx),
        specialisation.DomainAccumulator(ctx, max_doc_cells=20 * ctx.Ls * ctx.E),  # drops per-doc counts
        traj.TrajectoryAccumulator(ctx, max_tokens=500, seed=1),
        dependence.DependenceAccumulator(ctx, max_tokens=700, seed=2),
        density.LogitSampleAccumulator(ctx, max_points=100, seed=3),
    ]


def _results(accs) -> list:
    out = []
    for a in accs:
        if isinstance(a, specialisation.VocabAccumulator):
            out.append(specialisation.vocab_frames(a, 2, 5))
        elif isinstance(a, specialisation.DomainAccumulator):
            out.append(a.result(20, 0))
        elif isinstance(a, traj.TrajectoryAccumulator):
            s = a.result()
            out.append([s.experts, s.valid, s.label, s.token_id])
        elif isinstance(a, dependence.DependenceAccumulator):
            s = a.result()
            out.append([s.experts, s.valid, s.weights])
        else:
            out.append(a.result())
    return out


def _assert_same(a, b, where="") -> None:
    if isinstance(a, pl.DataFrame):
        assert_frame_equal(a, b, check_exact=True)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


@pytest.mark.parametrize("cuts", [[5], [1, 2, 9], [3, 4, 5, 6, 7]])
def test_merging_pieces_cut_anywhere_equals_one_pass(trace, cuts):
    ctx = make_context(trace)
    whole = _accumulators(ctx)
    cols = set().union(*(a.columns for a in whole))
    views = list(iter_views(ctx, cols, batch_size=57))  # 57 does not divide 80 or 400: cuts inside docs
    for v in views:
        for a in whole:
            a.update(v)
    merged = _accumulators(ctx)
    bounds = [0, *cuts, len(views)]
    inside = 0
    for lo, hi in itertools.pairwise(bounds):
        piece = _accumulators(ctx)
        for v in views[lo:hi]:
            for a in piece:
                a.update(v)
        piece = pickle.loads(pickle.dumps(piece))  # what a worker sends back
        for m, p in zip(merged, piece, strict=True):
            m.merge(p)
        if lo > 0:
            inside += int(views[lo - 1].batch.doc_id[-1] == views[lo].batch.doc_id[0])
    assert inside >= 1  # at least one cut falls inside a document
    _assert_same(_results(whole), _results(merged))
    # the cut pairs are really counted: the repetition total is every consecutive pair of the trace
    rep = merged[5].result().filter(pl.col("domain") == "all")
    assert rep["pairs"].to_list() == [2400 - 2400 // 80] * 4


def test_exact_sum_is_the_rational_sum_rounded_once():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=4) * 10.0 ** rng.integers(-200, 200, 4) for _ in range(60)]
    whole, a, b = ExactSum(4), ExactSum(4), ExactSum(4)
    for x in xs:
        whole.add(x)
    for x in xs[:17]:
        a.add(x)
    for x in xs[17:]:
        b.add(x)
    b.merge(a)  # other order too
    ref = [float(sum(Fraction(float(x[i])) for x in xs)) for i in range(4)]
    assert whole.value().tolist() == ref
    assert b.value().tolist() == ref
    whole.add(np.array([np.inf, np.nan, 1.0, -np.inf]))
    v = whole.value()
    assert v[0] == np.inf and np.isnan(v[1]) and v[3] == -np.inf


def test_row_uniform_is_uniform_and_ignores_order():
    doc, pos = np.repeat(np.arange(400), 250), np.tile(np.arange(250), 400)
    u = row_uniform(doc, pos, 7)
    assert abs(u.mean() - 0.5) < 0.005 and 0 <= u.min() and u.max() < 1
    hist = np.bincount((u * 10).astype(int), minlength=10) / len(u)
    assert np.abs(hist - 0.1).max() < 0.005
    perm = np.random.default_rng(0).permutation(len(u))
    np.testing.assert_array_equal(row_uniform(doc[perm], pos[perm], 7), u[perm])
    assert np.corrcoef(u, row_uniform(doc, pos, 8))[0, 1] < 0.01


def test_shard_groups_are_contiguous_and_balanced(trace):
    assert shard_groups(trace, 1) == [[0, 1, 2, 3, 4, 5]]
    assert shard_groups(trace, 2) == [[0, 1, 2], [3, 4, 5]]
    four = shard_groups(trace, 4)
    assert len(four) == 4 and [i for g in four for i in g] == list(range(6)) and max(map(len, four)) == 2
    assert shard_groups(trace, 99) == [[i] for i in range(6)]
    assert shard_view(trace, [1, 2]).num_tokens == 800


def _outputs(folder: Path) -> dict[str, object]:
    """Every CSV (as text) and JSON (parsed; the output folder's own path removed) of an analysis."""
    out: dict[str, object] = {}
    for f in sorted(folder.iterdir()):
        if f.suffix == ".csv":
            out[f.name] = f.read_text()
        elif f.suffix == ".json":
            doc = json.loads(f.read_text())
            if isinstance(doc, dict):
                doc.pop("output", None)
            out[f.name] = doc
    return out


ANALYSES = ["load", "entropy", "cooccurrence", "repetition", "specialisation", "trajectories", "density"]


def _run(trace, out, **kw):
    return analyze(
        trace.path,
        out,
        analyses=ANALYSES,
        max_tokens=600,
        kde_points=100,
        tsne_points=0,
        permutations=20,
        **kw,
    )


@pytest.mark.slow
def test_analyze_on_two_processes_equals_one(trace, tmp_path):
    one = _run(trace, tmp_path / "one", workers=1)
    two = _run(trace, tmp_path / "two", workers=2)
    a, b = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert len(a) > 20 and a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    one.pop("output"), two.pop("output")
    assert one == two


def test_workers_must_be_positive(trace, tmp_path):
    with pytest.raises(ConfigError, match="workers"):
        analyze(trace.path, tmp_path / "x", analyses=["load"], workers=0)


@pytest.mark.slow
def test_domain_filter_with_empty_groups(trace, tmp_path):
    """A filter that leaves some shard groups empty: the empty groups merge as nothing."""
    docs = list(range(0, 5))  # only in the first shard
    tr = trace.filter(documents=docs)
    one = analyze(tr, tmp_path / "one", analyses=["load", "repetition"], workers=1)
    analyze(tr, tmp_path / "two", analyses=["load", "repetition"], workers=3)
    assert one["tokens"] == 400
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "two")


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_analyze_on_ray_equals_one_process(trace, tmp_path, ray_local):
    one = _run(trace, tmp_path / "one", workers=1)
    rayed = _run(trace, tmp_path / "ray", workers=3, ray_address="local")
    a, b = _outputs(tmp_path / "one"), _outputs(tmp_path / "ray")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    one.pop("output"), rayed.pop("output")
    assert one == rayed


@pytest.mark.slow
def test_a_damaged_shard_in_a_worker_names_the_file(trace, tmp_path):
    import shutil

    from moescope.errors import TraceError

    copy = tmp_path / "t"
    shutil.copytree(trace.path, copy)
    shard = copy / trace.manifest["shards"][4]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TraceError, match=shard.name):
        analyze(copy, tmp_path / "out", analyses=["load"], workers=2)
