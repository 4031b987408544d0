"""CLI: ``moescope demo``."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add ``moescope demo``; the demo's steps run in-process on this same ``app``."""

    def run_step(args: list[str]) -> None:
        app(args, standalone_mode=False)

    def demo(
        output: Path = typer.Option(
            Path("demo-out"), "--output", "-o", help="Directory for traces, tables and figures."
        ),
        max_tokens: int = typer.Option(16000, "--max-tokens", help="Tokens captured per bundled model."),
        predictor: str = typer.Option(
            "best",
            "--predictor",
            help="Predictor to fit, evaluate and prefetch with (see `moescope predict list`).",
        ),
    ) -> None:
        """Run the whole pipeline on the bundled models and held-out corpus, offline: capture both
        models, validate, analyse, fit and evaluate the best predictor, simulate an expert cache, ablate each
        expert of one layer.

        Each step is printed as the moescope command it runs, so any step can be copied and changed.

        Example: moescope demo -o demo-out
        """
        from moescope.demo import run_demo

        run_demo(output, max_tokens=max_tokens, predictor=predictor, run=run_step)

    app.command("demo")(demo)
