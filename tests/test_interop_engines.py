"""Importers of the serving and training engines' routing logs, on fixtures written here in each layout.

Every fixture is written the way the engine writes it (numpy for vLLM, ``torch.save`` for SGLang,
``safetensors`` for TensorRT-LLM, the CSV / Parquet / JSONL / bf16 layouts for llama.cpp, FLAME-MoE
and Megatron) and every check compares the trace with the numbers the test wrote, computed plainly.
Each bad input must fail naming the file.
"""

from __future__ import annotations

import csv
import tarfile

import numpy as np
import pytest

from moescope.errors import DataError
from moescope.interop import import_log
from moescope.trace.validate import validate_trace

E, K = 8, 2


def routing(rng: np.random.Generator, n: int, L: int, E: int = E, k: int = K) -> np.ndarray:
    """(n, L, k) distinct expert ids per (token, layer)."""
    return np.argsort(rng.random((n, L, E)), axis=-1)[..., :k]


# --------------------------------------------------------------------------- MoE-Beyond labels
def _moe_beyond_csv(path, tokens, ids, layers) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Layer ID", "Batch Number", "Token", "Activated Expert IDs"])
        for c, layer in enumerate(layers):
            for t, tok in enumerate(tokens):
                w.writerow([layer, 0, tok, str(ids[t, c].tolist())])


def test_moe_beyond_each_archive_labels_its_own_documents(tmp_path) -> None:
    rng = np.random.default_rng(1)
    opts = {"model": "none", "num_experts": 64, "top_k": 6, "moe_layers": "1-2"}
    archives = []
    for name, nums in (("puffin", (1, 2)), ("alpaca", (3,))):
        folder = tmp_path / name
        folder.mkdir()
        for num in nums:
            _moe_beyond_csv(folder / f"prompt_{num}_data.csv", ["a", "b"], routing(rng, 2, 2, 64, 6), [1, 2])
        archive = tmp_path / f"{name}.tar.xz"
        with tarfile.open(archive, "w:xz") as tar:
            tar.add(folder, arcname=name)
        archives.append(archive)
    tr = import_log("moe-beyond", archives, tmp_path / "t", **opts)
    b = tr.load()
    labels = {int(d): tr.labels[c] for d, c in zip(b.doc_id, b.label, strict=True)}
    assert labels == {1: "puffin", 2: "puffin", 3: "alpaca"}
    assert sorted(tr.labels) == ["alpaca", "puffin"]


# --------------------------------------------------------------------------- TensorRT-LLM
def _trtllm_statistics(folder, selections: dict[int, dict[tuple[int, int], np.ndarray]], slots: int, k: int):
    """Write the folder as ExpertStatistic does: meta_info.json from rank 0, rank<r>.safetensors of bincounts."""
    import json

    import torch
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": slots, "num_experts_per_token": k}))
    for r, recs in selections.items():
        save_file(
            {
                f"{it}_{layer}": torch.bincount(torch.from_numpy(ids).flatten(), minlength=slots)
                for (it, layer), ids in recs.items()
            },
            str(folder / f"rank{r}.safetensors"),
        )


def test_tensorrt_llm_counts_only_trace_and_load_analysis(tmp_path) -> None:
    import polars as pl

    from moescope.analysis.load import load_balance
    from moescope.trace import Trace

    rng = np.random.default_rng(3)
    layers, sel = [1, 3], {}
    for r in range(2):  # two attention-DP ranks, each with its own tokens
        sel[r] = {(it, layer): routing(rng, 5 + r, 1)[:, 0] for it in (10, 11) for layer in layers}
    sel[2] = sel[1]  # a third rank that routed the same tokens as rank 1: counted once
    folder = tmp_path / "expert_statistic"
    _trtllm_statistics(folder, sel, E, K)
    tr = import_log("tensorrt-llm-expert-statistic", folder, tmp_path / "t")
    assert validate_trace(tr.path) == [] and tr.num_tokens == 0
    assert (tr.num_experts, tr.top_k, tr.moe_layers) == (E, K, layers)
    rep = tr.manifest["source"]["report"]
    assert (
        rep["issues"] == {"duplicate_rank": 1} and "rank2.safetensors" in rep["examples"]["duplicate_rank"][0]
    )
    df = load_balance(Trace.open(tr.path))
    for layer in layers:
        ids = np.concatenate([sel[r][(it, layer)] for r in (0, 1) for it in (10, 11)])
        got = df.filter(pl.col("layer") == layer).sort("expert")
        assert got["assignments"].to_list() == np.bincount(ids.ravel(), minlength=E).tolist()
        assert got["tokens"][0] == len(ids)
        assert got["first_choice_share"].null_count() == E  # counts carry no slot order

    # A load-balancer run: 10 physical slots, slots 8 and 9 replicate experts 2 and 5.
    p2l = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 2, 5]] * 2)
    phys: dict = {0: {}}
    for layer in layers:  # a real selection on physical slots
        logical = routing(rng, 6, 1)[:, 0]
        phys[0][(0, layer)] = np.where(logical == 2, 8, logical)
    folder2 = tmp_path / "eplb"
    _trtllm_statistics(folder2, phys, 10, K)
    np.save(tmp_path / "map.npy", p2l)
    with pytest.raises(DataError, match=r"10 slots counted but the model has 8 experts.*`expert_map`"):
        import_log("tensorrt-llm-expert-statistic", folder2, tmp_path / "t2", num_experts=E)
    tr2 = import_log(
        "tensorrt-llm-expert-statistic",
        folder2,
        tmp_path / "t2",
        num_experts=E,
        expert_map=tmp_path / "map.npy",
    )
    want = np.stack([np.bincount(p2l[0][phys[0][(0, layer)].ravel()], minlength=E) for layer in layers])
    assert tr2.manifest["counts"]["assignments"] == want.tolist()
    assert tr2.manifest["source"]["report"]["issues"]["physical_replicas_mapped"] == int(
        sum((phys[0][(0, layer)] == 8).sum() for layer in layers)
    )


def test_tensorrt_llm_bad_inputs_name_the_file(tmp_path) -> None:
    rng = np.random.default_rng(4)
    sel = {r: {(0, 1): routing(rng, 4, 1)[:, 0]} for r in range(2)}
    folder = tmp_path / "s"
    _trtllm_statistics(folder, sel, E, K)
    import torch
    from safetensors.torch import save_file

    save_file({"0_2": torch.zeros(E, dtype=torch.int64)}, str(folder / "rank1.safetensors"))
    with pytest.raises(DataError, match=r"rank1.safetensors: ranks disagree"):
        import_log("tensorrt-llm-expert-statistic", folder, tmp_path / "t")
    (folder / "rank1.safetensors").write_bytes((folder / "rank0.safetensors").read_bytes()[:40])
    with pytest.raises(DataError, match=r"rank1.safetensors: not a readable safetensors file"):
        import_log("tensorrt-llm-expert-statistic", folder, tmp_path / "t")
    (folder / "rank1.safetensors").unlink()
    (folder / "meta_info.json").write_text('{"num_experts": 8}')
    with pytest.raises(DataError, match=r"meta_info.json: expected"):
        import_log("tensorrt-llm-expert-statistic", folder, tmp_path / "t")
    (folder / "meta_info.json").write_text('{"num_experts": 6, "num_experts_per_token": 2}')
    with pytest.raises(
        DataError, match=r"rank0.safetensors: '0_1' has 8 counts, meta_info.json says 6 slots"
    ):
        import_log("tensorrt-llm-expert-statistic", folder, tmp_path / "t")
    (folder / "meta_info.json").write_text('{"num_experts": 8, "num_experts_per_token": 3}')
    tr = import_log("tensorrt-llm-expert-statistic", folder, tmp_path / "t")
    assert tr.manifest["source"]["report"]["issues"] == {"counts_not_multiple_of_top_k": 1}


# --------------------------------------------------------------------------- vLLM routed experts
def test_vllm_routed_experts_npz_and_http_json_tell_prefill_from_decode(tmp_path) -> None:
    import json

    from moescope.interop.vllm import row_phase

    rng = np.random.default_rng(5)
    L = 3
    p1, c1 = (
        routing(rng, 5, L).astype(np.int16),
        routing(rng, 3, L).astype(np.int16),
    )  # int16, as vLLM returns
    c1[1, 2, 1] = -1  # a slot never written
    np.savez(
        tmp_path / "req.npz", prompt_routed_experts=p1, routed_experts=c1, prompt_token_ids=np.arange(5) + 100
    )
    p2, c2a, c2b = routing(rng, 4, L), routing(rng, 2, L), routing(rng, 3, L)
    response = {
        "id": "cmpl-1",
        "object": "chat.completion",
        "prompt_routed_experts": p2.tolist(),
        "prompt_token_ids": [7, 8, 9, 10],
        "choices": [
            {
                "index": 0,
                "message": {"content": "hi"},
                "routed_experts": c2a.tolist(),
                "token_ids": [1, 2, 3],
            },
            {
                "index": 1,
                "message": {"content": "yo"},
                "routed_experts": c2b.tolist(),
                "token_ids": [4, 5, 6, 7],
            },
        ],
        "usage": {"prompt_tokens": 4},
    }
    (tmp_path / "resp.json").write_text(json.dumps(response))
    # The same request answered again (logged by a second data-parallel rank): counted once.
    (tmp_path / "resp2.jsonl").write_text(json.dumps(response) + "\n")
    tr = import_log(
        "vllm-routed-experts",
        [tmp_path / "req.npz", tmp_path / "resp.json", tmp_path / "resp2.jsonl"],
        tmp_path / "t",
        num_experts=E,
    )
    assert validate_trace(tr.path) == [] and tr.num_tokens == 8 + 6 + 3
    b = tr.load()
    rows = b.doc_id == 0
    want = np.concatenate([p1, c1]).astype(np.int64)
    unset = (want < 0).any(-1)
    assert (
        np.array_equal(b.experts[rows][~unset], want[~unset])
        and (b.experts[rows][unset] == tr.missing_id).all()
    )
    assert b.token_id[rows].tolist() == [100, 101, 102, 103, 104, -1, -1, -1]
    assert np.array_equal(b.experts[b.doc_id == 1], np.concatenate([p2, c2a]))
    assert b.token_id[b.doc_id == 1].tolist() == [7, 8, 9, 10, 1, 2]
    assert b.position[b.doc_id == 2].tolist() == [4, 5, 6]  # second choice: after the shared prompt
    assert np.array_equal(b.experts[b.doc_id == 2], c2b)
    decode = row_phase(tr)
    assert decode[b.doc_id == 0].tolist() == [False] * 5 + [True] * 3
    assert decode[b.doc_id == 1].tolist() == [False] * 4 + [True] * 2 and decode[b.doc_id == 2].all()
    rep = tr.manifest["source"]["report"]
    assert rep["issues"] == {"sentinel_-1": 1, "partial_row": 1, "duplicate_request": 2}
    assert "resp2.jsonl:1" in rep["examples"]["duplicate_request"][0]


def test_vllm_routed_experts_bad_inputs_name_the_file(tmp_path) -> None:
    import json

    rng = np.random.default_rng(6)
    np.savez(tmp_path / "a.npz", prompt_routed_experts=routing(rng, 3, 2))
    np.savez(tmp_path / "b.npz", prompt_routed_experts=routing(rng, 3, 4))
    with pytest.raises(DataError, match=r"b.npz\[request\]: prompt_routed_experts has shape \(3, 4, 2\)"):
        import_log(
            "vllm-routed-experts", [tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "t", num_experts=E
        )
    bad = routing(rng, 3, 2)
    bad[1, 0, 0] = 9
    np.savez(tmp_path / "c.npz", routed_experts=bad)
    with pytest.raises(
        DataError, match=r"c.npz\[request\]: completion token 1, MoE layer 0: expert id 9 is out of range"
    ):
        import_log("vllm-routed-experts", tmp_path / "c.npz", tmp_path / "t", num_experts=E)
    (tmp_path / "d.npz").write_bytes((tmp_path / "a.npz").read_bytes()[:50])
    with pytest.raises(DataError, match=r"d.npz: not a readable .npz file"):
        import_log("vllm-routed-experts", tmp_path / "d.npz", tmp_path / "t", num_experts=E)
    (tmp_path / "e.json").write_text(json.dumps({"id": "x", "choices": [{"index": 0, "text": "no routing"}]}))
    with pytest.raises(
        DataError, match=r"e.json: no 'prompt_routed_experts'.*--enable-return-routed-experts"
    ):
        import_log("vllm-routed-experts", tmp_path / "e.json", tmp_path / "t", num_experts=E)
    (tmp_path / "f.json").write_text('{"id": "x", "choices": [')
    with pytest.raises(DataError, match=r"f.json: not a JSON response"):
        import_log("vllm-routed-experts", tmp_path / "f.json", tmp_path / "t", num_experts=E)


# --------------------------------------------------------------------------- SGLang
def _sglang_pass(
    topk_logical: np.ndarray, l2p: dict, positions, input_ids, lens, mode: int, rank: int, pid: int
):
    """A _DetailAccumulator record: physical ids in an 8-slot int32 buffer padded with -1, dense layer 0 unset."""
    import torch

    n = topk_logical.shape[1]
    buf = torch.full((topk_logical.shape[0] + 1, n, 8), -1, dtype=torch.int32)
    phys = np.vectorize(lambda e: l2p.get(int(e), int(e)))(topk_logical)
    buf[1:, :, : topk_logical.shape[2]] = torch.from_numpy(phys.astype(np.int32))
    return {
        "forward_pass_id": pid,
        "rank": rank,
        "gatherer_key": "primary",
        "input_ids": list(input_ids),
        "positions": list(positions),
        "extend_seq_lens": lens,
        "forward_mode": mode,
        "topk_ids_of_layer": buf,
        "misc_objects": [],
        "global_physical_count": torch.zeros((topk_logical.shape[0] + 1, 10), dtype=torch.int32),
    }


def test_sglang_per_token_dump_maps_replicas_and_drops_repeated_ranks(tmp_path) -> None:
    import torch

    rng = np.random.default_rng(7)
    L = 3  # decoder layers 1..3 are MoE, layer 0 is dense
    p2l = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 2, 5]] * (L + 1))  # physical 8, 9 replicate experts 2, 5
    pre = routing(rng, 5, L).transpose(1, 0, 2)  # (layers, tokens, k) logical truth
    dec = routing(rng, 2, L).transpose(1, 0, 2)
    recs = [
        _sglang_pass(pre, {2: 8}, [0, 1, 2, 0, 1], [11, 12, 13, 21, 22], [3, 2], 1, 0, 0),
        _sglang_pass(dec, {5: 9}, [3, 2], [14, 23], None, 2, 0, 1),
    ]
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    torch.save(
        {"records": recs, "last_physical_to_logical_map": p2l},
        dumps / "expert_distribution_recorder_1.0_0.pt",
    )
    # Tensor parallelism: rank 1 recorded the same passes.
    rank1 = [dict(r, rank=1) for r in recs]
    torch.save(
        {"records": rank1, "last_physical_to_logical_map": p2l},
        dumps / "expert_distribution_recorder_1.0_1.pt",
    )
    tr = import_log(
        "sglang-expert-distribution", dumps, tmp_path / "t", num_experts=E, top_k=K, moe_layers="1-3"
    )
    assert validate_trace(tr.path) == [] and tr.num_tokens == 7
    b = tr.load()
    docs = tr.manifest["source"]["documents"]
    assert [(d["sequence"], d["forward_mode"]) for d in docs] == [
        (0, "extend"),
        (1, "extend"),
        (0, "decode"),
        (1, "decode"),
    ]
    want = [pre[:, :3], pre[:, 3:], dec[:, :1], dec[:, 1:]]
    for d, w in zip(docs, want, strict=True):
        rows = b.doc_id == d["doc_id"]
        assert np.array_equal(b.experts[rows], w.transpose(1, 0, 2))
    assert b.position[b.doc_id == 0].tolist() == [0, 1, 2] and b.token_id[b.doc_id == 1].tolist() == [21, 22]
    assert b.position[b.doc_id == 3].tolist() == [2] and b.token_id[b.doc_id == 3].tolist() == [23]
    issues = tr.manifest["source"]["report"]["issues"]
    assert issues["duplicate_rank"] == 2 and "sentinel_-1" not in issues  # 8-slot buffer padding: not counted
    assert issues["physical_replicas_mapped"] == int((pre == 2).sum() + (dec == 5).sum())


def test_sglang_shared_expert_fused_as_routed_is_dropped(tmp_path) -> None:
    import torch

    rng = np.random.default_rng(8)
    truth = routing(rng, 4, 1).transpose(1, 0, 2)  # (1 layer, 4 tokens, 2)
    fused = np.concatenate([truth, np.full((1, 4, 1), E)], axis=2)  # the shared expert as a third slot, id E
    rec = _sglang_pass(fused, {}, [0, 1, 2, 3], [1, 2, 3, 4], [4], 1, 0, 0)
    torch.save(
        {"records": [rec], "last_physical_to_logical_map": torch.arange(E).repeat(2, 1)}, tmp_path / "d.pt"
    )
    tr = import_log(
        "sglang-expert-distribution",
        tmp_path / "d.pt",
        tmp_path / "t",
        num_experts=E,
        top_k=K,
        moe_layers="1",
        n_shared_experts=1,
    )
    assert np.array_equal(tr.load().experts[:, 0], truth[0])
    assert tr.manifest["source"]["report"]["issues"]["shared_as_routed"] == 4
    with pytest.raises(
        DataError,
        match=r"d.pt: records\[0\]: token 0, layer 1: 3 routed ids where top_k=2|expert id 8 is out of range",
    ):
        import_log(
            "sglang-expert-distribution",
            tmp_path / "d.pt",
            tmp_path / "t2",
            num_experts=E,
            top_k=K,
            moe_layers="1",
        )


def test_sglang_per_pass_and_stat_dumps_are_counts_only(tmp_path) -> None:
    import torch

    from moescope.analysis.load import load_balance
    from moescope.trace import Trace

    rng = np.random.default_rng(9)
    p2l = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 2, 5]] * 3)
    passes, truth = [], np.zeros((2, E), np.int64)
    for pid in range(3):
        logical = routing(rng, 6, 2)  # layers 1, 2
        phys = np.where(logical == 5, 9, logical)
        count = np.zeros((3, 10), np.int32)
        for c in range(2):
            count[c + 1] = np.bincount(phys[:, c].ravel(), minlength=10)
            truth[c] += np.bincount(logical[:, c].ravel(), minlength=E)
        passes.append(
            {
                "forward_pass_id": pid,
                "rank": 0,
                "gatherer_key": "primary",
                "global_physical_count": torch.from_numpy(count),
            }
        )
    torch.save({"records": passes, "last_physical_to_logical_map": p2l}, tmp_path / "pp.pt")
    tr = import_log(
        "sglang-expert-distribution",
        tmp_path / "pp.pt",
        tmp_path / "t",
        num_experts=E,
        top_k=K,
        moe_layers="1-2",
    )
    assert tr.manifest["counts"]["assignments"] == truth.tolist() and tr.manifest["counts"]["tokens"] == [
        18,
        18,
    ]
    df = load_balance(Trace.open(tr.path))
    assert df.sort("layer", "expert")["assignments"].to_list() == truth.ravel().tolist()

    stat = torch.zeros((4, 3, E), dtype=torch.int32)  # a circular buffer of 4 steps, 2 used
    stat[0, 1:] = torch.from_numpy(truth // 2)
    stat[1, 1:] = torch.from_numpy(truth - truth // 2)
    torch.save(
        {"rank": 0, "logical_count": stat, "average_utilization_rate_over_window": None}, tmp_path / "stat.pt"
    )
    tr2 = import_log(
        "sglang-expert-distribution", tmp_path / "stat.pt", tmp_path / "t2", top_k=K, moe_layers="1-2"
    )
    assert tr2.manifest["counts"]["assignments"] == truth.tolist() and tr2.num_experts == E
    assert "all-reduced over ranks" in tr2.manifest["source"]["report"]["notes"][0]


def test_sglang_bad_dumps_name_the_file(tmp_path) -> None:
    import torch

    (tmp_path / "a.pt").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"a.pt: not a readable torch .pt file"):
        import_log("sglang-expert-distribution", tmp_path / "a.pt", tmp_path / "t", num_experts=E)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"records": [Evil()]}, tmp_path / "b.pt")
    with pytest.raises(DataError, match=r"b.pt: not a readable torch .pt file"):  # weights_only refuses code
        import_log("sglang-expert-distribution", tmp_path / "b.pt", tmp_path / "t", num_experts=E)
    torch.save({"something": 1}, tmp_path / "c.pt")
    with pytest.raises(DataError, match=r"c.pt: not an ExpertDistributionRecorder dump"):
        import_log("sglang-expert-distribution", tmp_path / "c.pt", tmp_path / "t", num_experts=E)
    rng = np.random.default_rng(10)
    rec = _sglang_pass(routing(rng, 2, 1).transpose(1, 0, 2), {}, [0, 1], [1, 2], [2], 1, 0, 0)
    torch.save(
        {"records": [rec], "last_physical_to_logical_map": torch.arange(10).repeat(2, 1) % E},
        tmp_path / "d0.pt",
    )
    other = torch.arange(10).repeat(2, 1) % E
    other[1, 9] = 0
    torch.save({"records": [dict(rec, rank=1)], "last_physical_to_logical_map": other}, tmp_path / "d1.pt")
    with pytest.raises(DataError, match=r"d1.pt: ranks disagree: its physical-to-logical map differs"):
        import_log(
            "sglang-expert-distribution",
            [tmp_path / "d0.pt", tmp_path / "d1.pt"],
            tmp_path / "t",
            num_experts=E,
            top_k=K,
            moe_layers="1",
        )
    bad = dict(rec)
    bad["topk_ids_of_layer"] = rec["topk_ids_of_layer"].clone()
    bad["topk_ids_of_layer"][1, 0, 0] = 12
    torch.save(
        {"records": [bad], "last_physical_to_logical_map": torch.arange(10).repeat(2, 1) % E},
        tmp_path / "e.pt",
    )
    with pytest.raises(
        DataError, match=r"e.pt: records\[0\]: token 0, layer 1: expert id 12 is out of range"
    ):
        import_log(
            "sglang-expert-distribution",
            tmp_path / "e.pt",
            tmp_path / "t",
            num_experts=E,
            top_k=K,
            moe_layers="1",
        )


def test_sglang_routed_experts_base64(tmp_path) -> None:
    import base64
    import json

    rng = np.random.default_rng(11)
    full = np.full((6, 3, K), -1, np.int32)  # 3 decoder layers, layer 0 dense (-1)
    truth = routing(rng, 6, 2)
    full[:, 1:] = truth
    meta = {
        "id": "r1",
        "prompt_tokens": 4,
        "completion_tokens": 3,
        "routed_experts": base64.b64encode(full.tobytes()).decode(),
    }
    (tmp_path / "gen.json").write_text(json.dumps({"text": "x", "meta_info": meta}))
    tr = import_log(
        "sglang-routed-experts",
        tmp_path / "gen.json",
        tmp_path / "t",
        num_experts=E,
        top_k=K,
        moe_layers="1-2",
        num_hidden_layers=3,
    )
    assert np.array_equal(tr.load().experts, truth)
    assert tr.manifest["source"]["documents"][0]["prefill_rows"] == 4
    assert tr.manifest["source"]["report"]["issues"] == {}
    meta["routed_experts"] = "@@@"
    (tmp_path / "bad.json").write_text(json.dumps({"meta_info": meta}))
    with pytest.raises(DataError, match=r"bad.json: meta_info.routed_experts is not base64 int32"):
        import_log(
            "sglang-routed-experts",
            tmp_path / "bad.json",
            tmp_path / "t2",
            num_experts=E,
            top_k=K,
            moe_layers="1-2",
            num_hidden_layers=3,
        )
    meta["routed_experts"] = base64.b64encode(full.ravel()[:-1].tobytes()).decode()
    (tmp_path / "short.json").write_text(json.dumps({"meta_info": meta}))
    with pytest.raises(
        DataError, match=r"short.json: 35 ids do not split into \(tokens, 3 layers, top_k=2\)"
    ):
        import_log(
            "sglang-routed-experts",
            tmp_path / "short.json",
            tmp_path / "t2",
            num_experts=E,
            top_k=K,
            moe_layers="1-2",
            num_hidden_layers=3,
        )


# --------------------------------------------------------------------------- llama.cpp
def _moe_trace_csv(path, ids: np.ndarray, layers: list[int], n_prompt: int, skip=()) -> None:
    """Rows as moe-trace.cpp prints them: per ubatch, per layer, per token, per rank."""
    lines = ["phase,token,layer,rank,expert"]
    for t in range(len(ids)):
        for c, layer in enumerate(layers):
            for r in range(ids.shape[2]):
                if (t, layer, r) not in skip:
                    lines.append(f"{'prefill' if t < n_prompt else 'decode'},{t},{layer},{r},{ids[t, c, r]}")
    path.write_text("\n".join(lines) + "\n")


def test_llama_cpp_moe_trace_csv(tmp_path) -> None:
    rng = np.random.default_rng(12)
    layers = [1, 2, 4]
    ids = routing(rng, 7, 3, E=16, k=4)
    _moe_trace_csv(tmp_path / "routing.csv", ids, layers, n_prompt=5, skip={(6, 2, 3)})
    with open(tmp_path / "routing.csv", "a") as f:
        f.write(f"prefill,3,4,0,{ids[3, 2, 0]}\n")  # a repeated row: dropped
    tr = import_log("llama-cpp-moe-trace", tmp_path / "routing.csv", tmp_path / "t", num_experts=16)
    assert (
        validate_trace(tr.path) == [] and (tr.top_k, tr.moe_layers) == (4, layers) and tr.slot_order == "rank"
    )
    b = tr.load()
    assert b.position.tolist() == list(range(7))
    ok = np.ones((7, 3), bool)
    ok[6, 1] = False  # token 6, layer 2 lost its rank-3 row: masked
    assert np.array_equal(b.experts[ok], ids[ok]) and (b.experts[~ok] == tr.missing_id).all()
    doc = tr.manifest["source"]["documents"][0]
    assert (doc["prefill_rows"], doc["decode_rows"]) == (5, 2)
    rep = tr.manifest["source"]["report"]
    assert rep["issues"] == {"duplicate": 1, "partial_row": 1} and rep["masked_cells"] == 1


def test_cli_names_the_shared_experts_option(tmp_path, capsys) -> None:
    """The library names the parameter `n_shared_experts`; the command line shows the import
    command's option, --shared-experts (not --n-shared-experts), and that option fixes the import."""
    from moescope.cli import run

    ids = routing(np.random.default_rng(14), 3, 1, E=4, k=2)
    ids[1, 0, 1] = 4  # the shared expert (id E) logged as a routed slot
    _moe_trace_csv(tmp_path / "a.csv", ids, [0], n_prompt=2)
    cmd = ["import", "llama-cpp-moe-trace", str(tmp_path / "a.csv"), "--num-experts", "4"]
    assert run([*cmd, "-o", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert "is --num-experts / --model right" in err and "routed (--shared-experts)?" in err
    assert run([*cmd, "--shared-experts", "1", "-o", str(tmp_path / "t2")]) == 0


def test_llama_cpp_bad_csv_names_the_file(tmp_path) -> None:
    rng = np.random.default_rng(13)
    ids = routing(rng, 3, 1)
    _moe_trace_csv(tmp_path / "a.csv", ids, [0], n_prompt=2)
    text = (tmp_path / "a.csv").read_text()
    (tmp_path / "trunc.csv").write_text(text[: text.rindex(",")])  # cut inside the last row
    with pytest.raises(DataError, match=r"trunc.csv: not a llama-moe-trace CSV"):
        import_log("llama-cpp-moe-trace", tmp_path / "trunc.csv", tmp_path / "t", num_experts=E)
    (tmp_path / "hdr.csv").write_text(text.replace("phase,token,layer,rank,expert", "token,layer,expert"))
    with pytest.raises(DataError, match=r"hdr.csv: missing column"):
        import_log("llama-cpp-moe-trace", tmp_path / "hdr.csv", tmp_path / "t", num_experts=E)
    with pytest.raises(DataError, match=r"a.csv: token 0, layer 0: expert id \d is out of range 0..3"):
        import_log("llama-cpp-moe-trace", tmp_path / "a.csv", tmp_path / "t", num_experts=4)
    (tmp_path / "ph.csv").write_text(
        text.replace("decode,2", "prefill,2", 1).replace("prefill,2,0,1", "decode,2,0,1")
    )
    with pytest.raises(DataError, match=r"ph.csv: token 2 is marked both prefill and decode"):
        import_log("llama-cpp-moe-trace", tmp_path / "ph.csv", tmp_path / "t", num_experts=E)


# --------------------------------------------------------------------------- FLAME-MoE
def _flame_capture(
    root, ids: np.ndarray, scores: np.ndarray, token_ids: np.ndarray, layer_numbers, rows_per_group=3
):
    """The data set card's layout: samples/*.parquet (token_id int32), actives/iter_N/layer_NN.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "samples").mkdir(parents=True)
    half = len(token_ids) // 2
    for i, part in enumerate((token_ids[:half], token_ids[half:])):
        pq.write_table(
            pa.table({"token_id": pa.array(part, pa.int32())}), root / "samples" / f"{i:03d}.parquet"
        )
    it = root / "actives" / "iter_0540"
    it.mkdir(parents=True)
    for c, num in enumerate(layer_numbers):
        table = pa.table(
            {
                "scores": pa.array(list(scores[:, c].astype(np.float16)), pa.list_(pa.float16())),
                "indices": pa.array(list(ids[:, c].astype(np.int16)), pa.list_(pa.int16())),
            }
        )
        pq.write_table(table, it / f"layer_{num:02d}.parquet", row_group_size=rows_per_group)
    return it


def test_flame_moe_parquet_streams_sequences(tmp_path) -> None:
    rng = np.random.default_rng(14)
    n = 10
    ids = routing(rng, n, 2, E=64, k=6)
    scores = np.sort(rng.random((n, 2, 6)), axis=-1)[..., ::-1].astype(np.float16)
    tok = rng.integers(0, 50000, n).astype(np.int32)
    it = _flame_capture(tmp_path / "flame-moe-290m", ids, scores, tok, [2, 3])
    tr = import_log("flame-moe-parquet", it, tmp_path / "t", num_experts=64, seq_len=4)
    assert validate_trace(tr.path) == [] and tr.moe_layers == [1, 2] and tr.slot_order == "rank"
    b = tr.load()
    assert b.doc_id.tolist() == [0] * 4 + [1] * 4 + [2] * 2 and b.position.tolist() == [0, 1, 2, 3] * 2 + [
        0,
        1,
    ]
    assert np.array_equal(b.experts, ids) and np.array_equal(b.token_id, tok)
    assert np.array_equal(b.weights, scores.astype(np.float32))
    assert tr.manifest["source"]["report"]["issues"] == {"short_last_sequence": 1}


def test_flame_moe_bad_inputs_name_the_file(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(15)
    ids = routing(rng, 6, 2, E=64, k=6)
    sc = np.sort(rng.random((6, 2, 6)), axis=-1)[..., ::-1]
    it = _flame_capture(tmp_path / "m", ids, sc, np.arange(6), [2, 3])
    pq.write_table(pq.read_table(it / "layer_03.parquet").slice(0, 5), it / "layer_03.parquet")
    with pytest.raises(DataError, match=r"layer_03.parquet: 5 rows, layer_02.parquet has 6"):
        import_log("flame-moe-parquet", it, tmp_path / "t", num_experts=64)
    (it / "layer_03.parquet").write_bytes((it / "layer_02.parquet").read_bytes()[:100])
    with pytest.raises(DataError, match=r"layer_03.parquet: not a readable Parquet file"):
        import_log("flame-moe-parquet", it, tmp_path / "t", num_experts=64)
    (it / "layer_03.parquet").unlink()
    with pytest.raises(DataError, match=r"layer_02.parquet: row 0: expert id \d+ is out of range 0..7"):
        import_log("flame-moe-parquet", it, tmp_path / "t", num_experts=8, top_k=6)
    pq.write_table(
        pa.table({"token_id": pa.array([1], pa.int32())}), tmp_path / "m" / "samples" / "002.parquet"
    )
    with pytest.raises(DataError, match=r"samples: samples hold 7 tokens"):
        import_log("flame-moe-parquet", it, tmp_path / "t", num_experts=64)


# --------------------------------------------------------------------------- Megatron logits sidecar
def test_megatron_router_trace_reads_the_bf16_logits_sidecar(tmp_path) -> None:
    import json

    import torch

    rng = np.random.default_rng(16)
    recs, truth, blob = [], {}, bytearray()
    for layer in (1, 2):
        logits = torch.from_numpy(rng.normal(size=(5, E)).astype(np.float32)).to(torch.bfloat16)
        ids = torch.topk(logits.float(), K).indices.sort(dim=1).values.numpy()  # routing map order: ascending
        raw = logits.view(torch.int16).numpy().tobytes()  # what the tracer appends to logits_rank0.bin
        truth[layer] = (ids, logits.float().numpy())
        recs.append(
            {
                "step": 0,
                "stage": "pre_dispatch",
                "block": "decoder",
                "layer": layer,
                "rank": 0,
                "num_tokens": 5,
                "topk": K,
                "top_indices": ids.tolist(),
                "logit_offset": len(blob),
                "logit_bytes": len(raw),
                "logit_shape": [5, E],
            }
        )
        blob += raw
    d = tmp_path / "trace"
    d.mkdir()
    (d / "router_trace_rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "logits_rank0.bin").write_bytes(bytes(blob))
    tr = import_log("megatron-router-trace", d / "router_trace_rank0.jsonl", tmp_path / "t")
    assert tr.num_experts == E and tr.has_logits and validate_trace(tr.path) == []  # E from logit_shape
    b = tr.load()
    for c, layer in enumerate((1, 2)):
        assert np.array_equal(b.experts[:, c], truth[layer][0])
        assert np.array_equal(
            b.logits[:, c].astype(np.float32), truth[layer][1].astype(np.float16).astype(np.float32)
        )

    (d / "logits_rank0.bin").write_bytes(bytes(blob[:-10]))
    with pytest.raises(
        DataError, match=r"logits_rank0.bin: \d+ bytes at offset \d+, the record at .*:2 needs 80"
    ):
        import_log("megatron-router-trace", d / "router_trace_rank0.jsonl", tmp_path / "t2")
    (d / "logits_rank0.bin").unlink()
    with pytest.raises(DataError, match=r"logits_rank0.bin: missing"):
        import_log("megatron-router-trace", d / "router_trace_rank0.jsonl", tmp_path / "t2")


# --------------------------------------------------------------------------- the shared checks
def test_clean_rows_sentinels_shared_experts_and_partial_rows() -> None:
    from moescope.interop.common import ImportReport
    from moescope.interop.engine_checks import clean_rows

    rows = np.array(
        [
            [3, 1, -1],  # padding slot: kept ids in logged order
            [255, 2, 0],  # uint8 padding (E < 255)
            [8, 5, 6],  # shared expert logged as routed (id E with one shared expert)
            [-1, -1, -1],  # no routing (a dense layer or an unused row)
            [4, -1, -1],  # one id where top_k = 2: partial, masked
        ]
    )
    rep = ImportReport()
    ids, valid = clean_rows(rows, num_experts=E, top_k=2, n_shared=1, report=rep, where=lambda i: f"row {i}")
    assert valid.tolist() == [True, True, True, False, False]
    assert ids[valid].tolist() == [[3, 1], [2, 0], [5, 6]]
    assert rep.counts == {"sentinel_-1": 6, "sentinel_255": 1, "shared_as_routed": 1, "partial_row": 1}
    with pytest.raises(DataError, match=r"row 2: expert id 8 is out of range 0..7.*`n_shared_experts`"):
        clean_rows(
            rows, num_experts=E, top_k=2, n_shared=0, report=ImportReport(), where=lambda i: f"row {i}"
        )
    with pytest.raises(DataError, match=r"row 0: expert \[3, 3\] repeats an id"):
        clean_rows(
            np.array([[3, 3]]),
            num_experts=E,
            top_k=2,
            n_shared=0,
            report=ImportReport(),
            where=lambda i: f"row {i}",
        )


def test_cli_engine_import_reports_checks_in_json(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from moescope.cli import app

    rng = np.random.default_rng(17)
    sel = {r: {(0, 1): routing(rng, 4, 1)[:, 0]} for r in range(2)}
    sel[1] = sel[0]
    _trtllm_statistics(tmp_path / "s", sel, E, K)
    res = CliRunner().invoke(
        app,
        ["import", "tensorrt-llm-expert-statistic", str(tmp_path / "s"), "-o", str(tmp_path / "t"), "--json"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["counts_only"] is True and out["issues"] == {"duplicate_rank": 1} and out["tokens"] == 0
    help_text = CliRunner().invoke(app, ["import", "--help"]).output
    for name in (
        "vllm-routed-experts",
        "sglang-expert-distribution",
        "sglang-routed-experts",
        "llama-cpp-moe-trace",
        "flame-moe-parquet",
        "tensorrt-llm-expert-statistic",
    ):
        assert name in help_text
