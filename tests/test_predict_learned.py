"""The learned model: its two input paths agree, it reaches far-away evidence, and stale files fail clearly."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from moescope.errors import ConfigError
from moescope.predict import evaluate_many, iter_contexts, load_predictor, make_predictor, split_documents
from moescope.trace import RoutingSpec, Trace, TraceWriter
from moescope.trace.schema import default_columns

TINY = {"hidden": 16, "epochs": 1, "batch_size": 64, "token_buckets": 16}


def _random_trace(path: Path, L: int = 4, E: int = 8, K: int = 2, docs: int = 6, doc_len: int = 24) -> Trace:
    """Random routing with token ids and two gate-lookahead variants at distances 1 and 2."""
    rng = np.random.default_rng(1)
    spec = RoutingSpec(num_experts=E, top_k=K, moe_layers=list(range(L)), family="synthetic")
    cols = default_columns(weights=False, lookahead_distances=[1, 2], lookahead_m=3)
    with TraceWriter.create(path, spec, columns=cols, overwrite=True) as w:
        for doc in range(docs):
            look = {
                f"lookahead_{v}_d{d}": np.argsort(rng.random((doc_len, L, E)), -1)[..., :3].astype(np.uint8)
                for v in ("gate_input", "residual")
                for d in (1, 2)
            }
            w.append(
                doc_id=np.full(doc_len, doc),
                position=np.arange(doc_len),
                token_id=rng.integers(0, 6, doc_len),
                label="x",
                experts=np.argsort(rng.random((doc_len, L, E)), -1)[..., :K].astype(np.uint8),
                lookahead=look,
            )
            w.commit(doc)
    return Trace.open(path)


@pytest.mark.parametrize("history_layers", [0, 2])
def test_training_and_prediction_paths_compute_the_same_logits(tmp_path: Path, history_layers: int) -> None:
    """Training embeds whole tokens at once (``Net.grid``), prediction one query at a time (``Net.flat``):
    the logits of every (token, layer) must agree in every mode, lookahead and same-token inputs included."""
    import torch

    tr = _random_trace(tmp_path / "t")
    p = make_predictor(
        "learned", distances=(1, 2, 0), use_lookahead=True, history_layers=history_layers, **TINY
    )
    p.fit(tr)
    data = p._collect(tr, np.random.default_rng(0))
    L = p.num_layers_
    for mi, d in enumerate(p.modes_):
        n = len(data["tok"])
        with torch.no_grad():
            grid = p._module.grid(
                *(torch.from_numpy(data[k]).long() for k in ("own", "prev", "same", "tok", "ptok")),
                torch.full((n, L), mi),
                torch.full((n, L), int(d)),
                torch.from_numpy(data["look"]).long()[:, mi],
            ).numpy()
        start = 0
        for ctx in iter_contexts(tr, window=p.history_window()):
            for layer in range(L):
                flat = p.predict_scores(ctx.queries(layer, int(d)))
                np.testing.assert_allclose(flat, grid[start : start + len(ctx), layer], atol=1e-5, rtol=1e-5)
            start += len(ctx)


E, K, L, DOC_LEN = 8, 2, 8, 64


@pytest.fixture(scope="module")
def far_rules(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trace, Trace]:
    """Layer 0 is random. Layers 1..L-2 are a fixed expert permutation of the *previous token's* layer-0
    set; the last layer is one of the token's *own* layer-0 set. Neither cue is in the previous
    tokens' target layer or in the four newest own layers, which is all the version-1 model saw."""
    rng = np.random.default_rng(7)
    perms = np.stack([rng.permutation(E) for _ in range(L)])  # (L, E)
    spec = RoutingSpec(num_experts=E, top_k=K, moe_layers=list(range(L)), family="synthetic")
    path = tmp_path_factory.mktemp("far") / "t"
    with TraceWriter.create(path, spec, columns=default_columns(weights=False), overwrite=True) as w:
        for doc in range(40):
            ex = np.zeros((DOC_LEN, L, K), np.uint8)
            ex[:, 0] = np.argsort(rng.random((DOC_LEN, E)), -1)[:, :K]
            for layer in range(1, L - 1):
                src = np.concatenate(
                    [np.argsort(rng.random((1, E)), -1)[:, :K], ex[:-1, 0]]
                )  # previous token
                ex[:, layer] = perms[layer][src]
            ex[:, L - 1] = perms[L - 1][ex[:, 0]]
            w.append(
                doc_id=np.full(DOC_LEN, doc),
                position=np.arange(DOC_LEN),
                token_id=rng.integers(0, 50, DOC_LEN),
                label="x",
                experts=ex,
            )
            w.commit(doc)
    tr = Trace.open(path)
    train, test = split_documents(tr, 0.25, seed=0)
    return tr.filter(documents=train), tr.filter(documents=test)


def test_far_layers_and_the_previous_tokens_full_routing_are_learned(far_rules: tuple[Trace, Trace]) -> None:
    train, test = far_rules
    kw = dict(distances=(1,), hidden=32, epochs=12, batch_size=256, lr=1e-2, dropout=0.0, random_state=0)
    full = make_predictor("learned", **kw).fit(train)
    short = make_predictor("learned", history_layers=4, **kw).fit(train)
    res = evaluate_many({"full": full, "short": short}, test, modes=[1], n_boot=20)
    chance = K / E
    first = 1 / DOC_LEN  # the document's first token has no previous token: chance there
    for layer in range(1, L - 1):  # from the previous token's layer 0
        target = (1 - first) + first * chance
        assert res["full"].value("slot_recall", 1, layer) >= target - 0.01, layer
    assert res["full"].value("exact", 1, L - 1) == 1.0  # from the token's own layer 0, seven layers back
    # with only the four newest own layers the last layer is back to chance
    assert abs(res["short"].value("slot_recall", 1, L - 1) - chance) < 0.08
    assert abs(res["full"].value("slot_recall", 1, 0) - chance) < 0.08  # layer 0 is random


def test_device_parameter(tmp_path: Path) -> None:
    import torch

    tr = _random_trace(tmp_path / "t", docs=4)
    auto = make_predictor("learned", device="auto", **TINY).fit(tr)
    assert auto.predict_scores(next(iter_contexts(tr)).queries(1, 1)).shape[1] == 8
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            make_predictor("learned", device="cuda", **TINY).fit(tr)
    with pytest.raises(ConfigError, match="parameter device="):
        make_predictor("learned", device="tpu", **TINY).fit(tr)


def _rewrite_header(path: Path, out: Path, edit) -> Path:
    """Copy a saved predictor with its JSON header changed by ``edit(header)``."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays.pop("__header__").tobytes().decode("utf-8"))
    edit(header)
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    np.savez_compressed(out, **arrays)
    return out


def test_files_of_an_older_model_ask_for_a_refit(tmp_path: Path) -> None:
    tr = _random_trace(tmp_path / "t", docs=4)
    learned = make_predictor("learned", **TINY).fit(tr).save(tmp_path / "learned.npz")
    best = make_predictor("best", **{f"learned__{k}": v for k, v in TINY.items()}).fit(tr)
    best = best.save(tmp_path / "best.npz")
    assert load_predictor(learned).is_fitted() and load_predictor(best).is_fitted()

    # a file written before the model changed: version 1 (or no version at all)
    old = _rewrite_header(learned, tmp_path / "old.npz", lambda h: h.pop("predictor_version"))
    with pytest.raises(ConfigError, match=r"old\.npz: .*'learned' predictor of version 1.*version 2.*refit"):
        load_predictor(old)

    # a best file whose inner learned model is of the old version
    def nested_v1(h: dict) -> None:
        h["state"]["learned_"]["version"] = 1

    old_best = _rewrite_header(best, tmp_path / "old_best.npz", nested_v1)
    with pytest.raises(
        ConfigError, match=r"old_best\.npz: its 'learned' part is a 'learned' predictor of version 1"
    ):
        load_predictor(old_best)

    # same version, arrays of another shape (an architecture change without a version bump)
    bad = tmp_path / "bad.npz"
    with np.load(learned, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    key = next(k for k in arrays if k.endswith("head_w"))
    arrays[key] = arrays[key][:, :-1]
    np.savez_compressed(bad, **arrays)
    with pytest.raises(ConfigError, match=r"bad\.npz: the saved 'learned' predictor does not fit .*refit"):
        load_predictor(bad)
    assert zipfile.is_zipfile(bad)
