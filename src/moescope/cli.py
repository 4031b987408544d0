"""The ``moescope`` command: one entry point, a subcommand per stage.

Each stage registers its own commands (``<stage>/commands.py``); this file only assembles them and
turns :class:`~moescope.errors.MoescopeError` into a one-line "Error: ..." with exit status 1.
"""

from __future__ import annotations

import os
import sys

import typer

from moescope.errors import MoescopeError

app = typer.Typer(
    name="moescope",
    help="Record, analyse and predict expert routing in Mixture-of-Experts language models.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from moescope.ablate import commands as ablate_commands
    from moescope.analysis import commands as analysis_commands
    from moescope.capture import commands as capture_commands
    from moescope.demo import commands as demo_commands
    from moescope.evaluate import commands as evaluate_commands
    from moescope.interop import commands as interop_commands
    from moescope.models import commands as models_commands
    from moescope.predict import commands as predict_commands
    from moescope.simulate import commands as simulate_commands
    from moescope.trace import commands as trace_commands

    trace_commands.register(app)
    analysis_commands.register(app)
    capture_commands.register(app)
    interop_commands.register(app)
    models_commands.register(app)
    predict_commands.register(app)
    demo_commands.register(app)
    simulate_commands.register(app)
    ablate_commands.register(app)
    evaluate_commands.register(app)


_register()


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("MPLBACKEND", "Agg")  # headless figures; the library never switches backends
    try:
        app(standalone_mode=False)
    except MoescopeError as exc:
        if os.environ.get("MOESCOPE_DEBUG") == "1":
            raise
        typer.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(1)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
