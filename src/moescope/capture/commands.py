"""CLI: ``moescope capture``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Capture registers its command here once the capture engine lands."""
