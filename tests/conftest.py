"""Shared fixtures: offline hub, a small hand-built trace, the third-party data folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Tiny models: thread start-up costs more than it saves, and oversubscribed cores make it far worse.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def make_rows(doc: int, n: int, L: int = 3, k: int = 2, E: int = 8, seed: int = 0) -> dict:
    """Rows of one document with random distinct experts per (token, layer)."""
    rng = np.random.default_rng(seed + doc)
    experts = np.argsort(rng.random((n, L, E)), axis=-1)[..., :k].astype(np.uint8)
    weights = rng.random((n, L, k)).astype(np.float32)
    return {
        "doc_id": np.full(n, doc),
        "position": np.arange(n),
        "token_id": rng.integers(0, 100, n),
        "experts": experts,
        "weights": weights / weights.sum(-1, keepdims=True),
    }


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory) -> tuple[Path, str]:
    """``moescope demo`` run once per session (small budget, table predictor): its folder and output.

    Shared by the demo test and the report's browser tests, which open the demo's report.
    """
    from typer.testing import CliRunner

    from moescope.cli import app

    # A folder the same demo run wrote (its printed output saved as demo.log), to iterate on the tests.
    reuse = os.environ.get("MOESCOPE_TEST_DEMO")
    if reuse:
        log = Path(reuse) / "demo.log"
        return Path(reuse), log.read_text(encoding="utf-8") if log.is_file() else ""
    out = tmp_path_factory.mktemp("demo") / "demo"
    res = CliRunner().invoke(
        app, ["demo", "-o", str(out), "--max-tokens", "1500", "--predictor", "cooccurrence"]
    )
    assert res.exit_code == 0, res.output
    return out, res.output
