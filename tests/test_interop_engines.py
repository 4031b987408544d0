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

from moescope.interop import import_log

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
