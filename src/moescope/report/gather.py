"""A report that gathers every figure of one or more output folders into one Markdown page.

Each figure is shown with a link to the CSV that holds its numbers, grouped by folder; the page is
written atomically as ``report.md`` with relative links, so the folder can be moved or zipped whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from moescope.errors import ConfigError
from moescope.trace.atomic import atomic_write


def write_report(folders: Sequence[str | Path], out: str | Path, *, title: str = "moescope report") -> Path:
    """Write ``out/report.md`` showing every ``*.png`` under ``folders`` beside its CSV; returns its path.

    A folder's ``summary.json`` (written by ``analyze``, ``simulate``, ...) is shown as its key numbers.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    figures = 0
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ConfigError(f"folders: {folder} is not a folder")
        lines += [f"## {folder.name}", ""]
        summary = folder / "summary.json"
        if summary.is_file():
            data = json.loads(summary.read_text(encoding="utf-8"))
            scalars = {k: v for k, v in data.items() if isinstance(v, int | float | str) and k != "output"}
            lines += [f"- {k}: {v}" for k, v in scalars.items()] + [""]
        for png in sorted(folder.rglob("*.png")):
            rel = os.path.relpath(png, out)
            csv = png.with_suffix(".csv")
            data_link = f" ([data]({os.path.relpath(csv, out)}))" if csv.is_file() else ""
            lines += [f"### {png.stem}{data_link}", "", f"![{png.stem}]({rel})", ""]
            figures += 1
    if figures == 0:
        raise ConfigError(f"folders: no figures (*.png) under {', '.join(str(f) for f in folders)}")
    path = out / "report.md"
    text = "\n".join(lines)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
