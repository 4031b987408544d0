"""Saving figures with their data, and the few plotting helpers every analysis shares.

:func:`save_figure` writes ``stem.png``, ``stem.csv`` (exactly the plotted numbers) and, when
parameters are given, ``stem.json``; each file goes to a temporary name beside the target and is
moved into place only when complete, so a reader never sees half a figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from moescope.trace.atomic import atomic_write, atomic_write_json


def save_table(df: pl.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as CSV atomically (nested columns are not allowed in CSV: flatten them first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: df.write_csv(tmp))
    return path


def save_figure(
    fig: Any, df: pl.DataFrame, stem: str | Path, params: dict[str, Any] | None = None, *, dpi: int = 110
) -> list[Path]:
    """Save ``fig`` as ``stem.png`` beside ``stem.csv`` (its numbers) and ``stem.json`` (its parameters).

    The figure is closed afterwards. Returns the paths written.

    Examples
    --------
    >>> import tempfile, matplotlib.pyplot as plt, polars as pl
    >>> fig, ax = plt.subplots(); _ = ax.plot([0, 1], [2, 3])
    >>> d = tempfile.mkdtemp()
    >>> [p.name for p in save_figure(fig, pl.DataFrame({"x": [0, 1], "y": [2, 3]}), f"{d}/line", {"k": 2})]
    ['line.csv', 'line.png', 'line.json']
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [save_table(df, stem.with_suffix(".csv"))]
    png = stem.with_suffix(".png")
    try:
        atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)
    out.append(png)
    if params is not None:
        atomic_write_json(stem.with_suffix(".json"), params)
        out.append(stem.with_suffix(".json"))
    return out


def subplot_grid(n: int, *, width: float = 3.0, height: float = 2.4, max_cols: int = 4):
    """A figure with ``n`` axes in a near-square grid; returns ``(fig, axes[:n])`` (extra axes hidden)."""
    cols = min(max_cols, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharey=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    fig.set_layout_engine("constrained")
    return fig, flat[:n]


def heatmap(
    m: np.ndarray,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    cbar: str,
    xticklabels: Sequence[str] | None = None,
    yticklabels: Sequence[str] | None = None,
    center: float | None = None,
    cmap: str | None = None,
    ax: Any = None,
):
    """A matrix as an image with a colour bar; diverging colours around ``center`` when given."""
    from matplotlib.colors import TwoSlopeNorm

    if ax is None:
        h, w = m.shape
        fig, ax = plt.subplots(figsize=(min(16, 2.5 + 0.32 * w), min(14, 2.0 + 0.32 * h)))
    else:
        fig = ax.figure
    norm = None
    finite = m[np.isfinite(m)]
    if center is not None and finite.size and finite.min() < center < finite.max():
        norm = TwoSlopeNorm(vcenter=center, vmin=float(finite.min()), vmax=float(finite.max()))
    im = ax.imshow(
        m, aspect="auto", interpolation="nearest", cmap=cmap or ("RdBu_r" if norm else "viridis"), norm=norm
    )
    fig.colorbar(im, ax=ax, label=cbar)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for labels, setter, n in (
        (xticklabels, ax.set_xticks, m.shape[1]),
        (yticklabels, ax.set_yticks, m.shape[0]),
    ):
        if labels is not None and n <= 64:
            setter(
                np.arange(n),
                labels=list(labels),
                fontsize=7 if n > 20 else 8,
                rotation=90 if setter == ax.set_xticks and n > 20 else 0,
            )
    return fig
