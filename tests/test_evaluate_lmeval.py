"""Peer check: ``moescope evaluate`` with unmodified routing equals lm-evaluation-harness itself.

lm-eval runs offline on local JSONL files in the hub schemas, through task YAMLs that ``include``
lm-eval's own ``lambada_openai``, ``hellaswag`` and ``wikitext`` definitions and only swap the data
source; the model is the bundled tiny-mixtral in float32. Also: the lm-eval plug-in (``--model
moescope``) applies a strategy, reports mean active experts, and with ``topk`` at the model's own k
gives lm-eval's ``hf`` numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from moescope.data import bundled_model_path  # noqa: E402
from moescope.evaluate import evaluate, parse_task  # noqa: E402
from moescope.evaluate.localdata import make_task_files  # noqa: E402

pytestmark = pytest.mark.slow

SPLITS = {
    "lambada": ("lambada/lambada_openai.yaml", "test", {"test_split": "test"}),
    "hellaswag": (
        "hellaswag/hellaswag.yaml",
        "validation",
        {"training_split": None, "validation_split": "validation"},
    ),
    "wikitext": (
        "wikitext/wikitext.yaml",
        "test",
        {"training_split": None, "validation_split": None, "test_split": "test"},
    ),
}
LIMITS = {"lambada": 6, "hellaswag": 3, "wikitext": 2}
METRICS = {
    "lambada": ("acc", "perplexity"),
    "hellaswag": ("acc", "acc_norm"),
    "wikitext": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("lmeval")
    files = make_task_files(root / "data", n=8)
    for name, n in LIMITS.items():  # few, short records keep the test fast
        rows = [json.loads(line) for line in files[name].read_text().splitlines()][:n]
        if name == "wikitext":  # still more than one 1024-token rolling window each
            rows = [{"page": r["page"][:1400]} for r in rows]
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    for name, (inc, split, extra) in SPLITS.items():
        cfg = {
            "include": str(tasks_dir / inc),
            "task": f"local_{name}",
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(files[name])}},
            **extra,
        }
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return root, files


def _lm_eval(root, model: str, model_args: str, monkeypatch, tasks=tuple(SPLITS)):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "cache"))
    torch.set_num_threads(1)
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[f"local_{n}" for n in tasks],
        task_manager=TaskManager(include_path=str(root)),
        batch_size=1,
        device="cpu",
        bootstrap_iters=0,
    )


@pytest.fixture(scope="module")
def peer(local_tasks):
    mp = pytest.MonkeyPatch()
    try:
        root, _ = local_tasks
        path = bundled_model_path("tiny-mixtral")
        return _lm_eval(root, "hf", f"pretrained={path},dtype=float32", mp)
    finally:
        mp.undo()


def test_unmodified_numbers_equal_lm_evaluation_harness(local_tasks, peer):
    from moescope.capture.runner import load_model

    _, files = local_tasks
    lm = load_model(str(bundled_model_path("tiny-mixtral")), device="cpu", dtype="float32")
    for name, metrics in METRICS.items():
        ours = evaluate(
            lm.model,
            lm.tokenizer,
            [parse_task(f"{name}={files[name]}")],
            ["baseline"],
            limit=LIMITS[name],
            n_boot=10,
        )
        theirs = peer["results"][f"local_{name}"]
        assert theirs["sample_len"] == LIMITS[name] == ours.rows[0].n_samples
        for metric in metrics:
            a, b = ours.rows[0].metrics[metric], theirs[f"{metric},none"]
            assert a == pytest.approx(b, rel=1e-4, abs=1e-4), (name, metric, a, b)


def test_plugin_applies_a_strategy_and_reports_active_experts(local_tasks, peer, tmp_path, monkeypatch):
    import moescope.evaluate.lmeval  # noqa: F401  (registers --model moescope)

    root, _ = local_tasks
    path = bundled_model_path("tiny-mixtral")
    same = _lm_eval(
        root, "moescope", f"pretrained={path},dtype=float32,strategy=topk", monkeypatch, ("lambada",)
    )
    for name in ("lambada",):
        for metric in METRICS[name]:
            a, b = (
                same["results"][f"local_{name}"][f"{metric},none"],
                peer["results"][f"local_{name}"][f"{metric},none"],
            )
            assert a == pytest.approx(b, rel=1e-6, abs=1e-6), (name, metric)
    assert same["config"]["moescope_mean_active_experts"] == pytest.approx(2.0)
    trace = tmp_path / "trace"
    changed = _lm_eval(
        root,
        "moescope",
        f"pretrained={path},dtype=float32,strategy=topp:p=0.7,trace={trace}",
        monkeypatch,
        ("lambada",),
    )
    k = changed["config"]["moescope_mean_active_experts"]
    assert 2.0 < k < 8.0
    assert changed["config"]["moescope_strategy"] == "topp:p=0.7"
    from moescope.trace import Trace

    t = Trace.open(trace)
    assert t.manifest["capture"]["strategy"] == "topp:p=0.7"
    assert t.manifest["capture"]["variable_k"] and t.top_k == 8
    counts = []
    for b in t.iter_batches(["experts", "weights"]):
        used = b.experts != t.missing_id
        counts.append(used.sum(-1))
        assert ((b.weights > 0) == used).all()
    assert np.concatenate(counts).mean() == pytest.approx(k, rel=0.05)
