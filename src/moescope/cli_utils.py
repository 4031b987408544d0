"""Options and output helpers shared by every subcommand (defined once, behave the same everywhere)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of text.")]
TraceArg = Annotated[
    Path, typer.Argument(help="Trace directory (holds manifest.json and part-*.parquet).", show_default=False)
]
OutDirOpt = Annotated[Path, typer.Option("--output", "-o", help="Output directory.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace the output if moescope wrote it (anything else is refused, never deleted).",
    ),
]
AllowIncompleteOpt = Annotated[
    bool,
    typer.Option("--allow-incomplete", help="Read a trace whose capture or import did not finish."),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same result.")]


def emit(result: Any, as_json: bool, text: str | None = None) -> None:
    """Write the result to stdout: JSON when asked, else ``text`` (or a plain rendering)."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=_jsonable) + "\n")
    else:
        typer.echo(text if text is not None else json.dumps(result, indent=2, default=_jsonable))


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def progress_enabled() -> bool:
    """Progress bars only on a terminal: scripts and CI logs get clean stderr."""
    return sys.stderr.isatty()
