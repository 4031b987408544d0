"""The demo's strategy comparison: one ``moescope evaluate`` command on the bundled model."""

from __future__ import annotations

from pathlib import Path


def demo_step(out: Path, model: str = "tiny-mixtral", match_k: float = 1.5, limit: int = 1) -> list[str]:
    """Arguments of ``moescope evaluate`` comparing baseline, top-1, and top-p and p-value routing
    calibrated to the same mean experts per token, on the bundled corpus by domain (prints the table)."""
    return [
        "evaluate",
        model,
        "corpus",
        "-s",
        "baseline",
        "-s",
        "topk:k=1",
        "-s",
        "topp",
        "-s",
        "pvalue:correction=bh",
        "--match-k",
        str(match_k),
        "--calibration",
        "1",
        "--limit",
        str(limit),
        "--bootstrap",
        "200",
        "-o",
        str(Path(out) / f"evaluate-{model}"),
    ]
