"""Capture on a CUDA GPU agrees with capture on the CPU (skipped where no GPU is present).

The CPU float32 capture is the reference: the GPU run must pick the same experts (float32), nearly
the same ones in bfloat16 (where near-ties may flip), and the whole ``capture`` path must write a
valid trace on ``--device cuda`` and ``--device auto`` (``device_map="auto"``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from moescope.capture.engine import RoutingRecorder
from moescope.capture.runner import CaptureOptions, capture
from moescope.capture.tiny import TINY_CONFIGS, tiny_model
from moescope.data import corpus_path
from moescope.trace import Trace, validate_trace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[3, 10:] = 0
    return ids * mask, mask


def _set_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of each (token, layer) top-k set that two captures have in common."""
    a, b = np.sort(a, -1), np.sort(b, -1)
    return float((a[..., :, None] == b[..., None, :]).any(-1).mean())


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_cuda_float32_picks_the_cpu_experts(family):
    cpu = tiny_model(family)
    gpu = copy.deepcopy(cpu).to("cuda")
    ref = RoutingRecorder(cpu, lookahead=1).run(*_batch())
    out = RoutingRecorder(gpu, lookahead=1).run(*_batch())
    assert out["experts"].shape == ref["experts"].shape
    assert _set_agreement(out["experts"], ref["experts"]) >= 0.995
    same = (np.sort(out["experts"], -1) == np.sort(ref["experts"], -1)).all(-1)
    np.testing.assert_allclose(
        np.sort(out["weights"], -1)[same], np.sort(ref["weights"], -1)[same], rtol=1e-3, atol=1e-4
    )
    for col in RoutingRecorder(gpu, lookahead=1).lookahead_columns:
        assert _set_agreement(out[col], ref[col]) >= 0.99


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_cuda_bfloat16_is_close_to_float32(family):
    cpu = tiny_model(family)
    gpu = copy.deepcopy(cpu).to("cuda", torch.bfloat16)
    ref = RoutingRecorder(cpu).run(*_batch())
    rec = RoutingRecorder(gpu, logits=True)
    out = rec.run(*_batch())
    assert rec.spec.dtype == "bfloat16"
    assert np.isfinite(out["weights"]).all() and np.isfinite(out["logits"]).all()
    assert _set_agreement(out["experts"], ref["experts"]) >= 0.8


@pytest.mark.parametrize(("device", "dtype"), [("cuda", "bfloat16"), ("cuda", "float32"), ("auto", "auto")])
def test_bundled_capture_on_gpu_matches_cpu(tmp_path, device, dtype):
    data = [str(corpus_path() / "heldout-code.jsonl")]
    opts = CaptureOptions(max_documents=4, max_tokens=2048, batch_size=4, lookahead=1)
    capture("tiny-finegrained", data, tmp_path / "cpu", opts, device="cpu", dtype="float32")
    res = capture("tiny-finegrained", data, tmp_path / "gpu", opts, device=device, dtype=dtype)
    assert res.tokens == 2048
    assert validate_trace(tmp_path / "gpu") == []
    a = Trace.open(tmp_path / "cpu").experts()
    b = Trace.open(tmp_path / "gpu").experts()
    assert _set_agreement(a, b) >= (0.999 if dtype == "float32" else 0.9)
