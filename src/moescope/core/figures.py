"""Saving figures with their data, and the few plotting helpers every stage shares.

:func:`save_figure` writes ``stem.png``, ``stem.csv`` (exactly the plotted numbers) and, when
parameters are given, ``stem.json``; each file goes to a temporary name beside the target and is
moved into place only when complete, so a reader never sees half a figure.

This module never selects a matplotlib backend: a notebook keeps its inline figures, and only the
command line (:func:`moescope.cli.main`) asks for the headless ``Agg`` backend. ``pyplot`` is imported
inside the functions so that importing a stage stays fast.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.trace.atomic import atomic_write, atomic_write_json

Rows = Sequence[Mapping[str, Any]]


def save_table(df: Any, path: str | Path) -> Path:
    """Write a table as CSV atomically; returns the path.

    ``df`` is a Polars DataFrame (nested columns are not allowed in CSV: flatten them first) or a
    sequence of dicts with the same keys (the first row's keys are the header).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(df, "write_csv"):
        atomic_write(path, lambda tmp: df.write_csv(tmp))
    else:
        rows = list(df)
        cols = list(rows[0]) if rows else []

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(rows)

        atomic_write(path, write)
    return path


def save_figure(
    fig: Any, df: Any, stem: str | Path, params: dict[str, Any] | None = None, *, dpi: int = 110
) -> list[Path]:
    """Save ``fig`` as ``stem.png`` beside ``stem.csv`` (its numbers) and ``stem.json`` (its parameters).

    ``df`` is what :func:`save_table` accepts. The figure is closed afterwards (also when saving
    fails), so a loop of figures does not accumulate memory. Returns the paths written.

    Examples
    --------
    >>> import tempfile, matplotlib.pyplot as plt, polars as pl
    >>> fig, ax = plt.subplots(); _ = ax.plot([0, 1], [2, 3])
    >>> d = tempfile.mkdtemp()
    >>> [p.name for p in save_figure(fig, pl.DataFrame({"x": [0, 1], "y": [2, 3]}), f"{d}/line", {"k": 2})]
    ['line.csv', 'line.png', 'line.json']
    """
    import matplotlib.pyplot as plt

    stem = Path(stem)
    try:
        out = [save_table(df, stem.with_name(stem.name + ".csv"))]
        png = stem.with_name(stem.name + ".png")
        atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)
    out.append(png)
    if params is not None:
        meta = stem.with_name(stem.name + ".json")
        atomic_write_json(meta, json.loads(json.dumps(params, default=str)))
        out.append(meta)
    return out


def subplot_grid(n: int, *, width: float = 3.0, height: float = 2.4, max_cols: int = 4):
    """A figure with ``n`` axes in a near-square grid; returns ``(fig, axes[:n])`` (extra axes hidden)."""
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt
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
