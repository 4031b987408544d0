"""The ``moescope`` command: one entry point, a subcommand per stage.

Each stage registers its own commands (``<stage>/commands.py``); this file only assembles them and
turns :class:`~moescope.errors.MoescopeError` into a one-line "Error: ..." with exit status 1
(see :func:`main` for every exit status).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import typer

from moescope.errors import MoescopeError, as_flags

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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs :func:`run` and exits with its status."""
    sys.exit(run(argv))


def _notes_as_lines() -> None:
    """Print moescope's integrity warnings as one ``note: ...`` line on stderr, not Python's format."""
    import warnings

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__name__ == "IntegrityWarning":  # by name: importing it would slow every start
            typer.echo(f"note: {as_flags(str(message))}", err=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _interrupt_on_sigterm() -> Any:
    """Make SIGTERM interrupt like Ctrl-C, so writers clean up the same way; returns the old handler.

    Only the main thread may set handlers; elsewhere (a command run from a worker thread) this does
    nothing and returns ``None``.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def run(argv: list[str] | None = None) -> int:
    """Run the ``moescope`` command line and return the exit status.

    0: success. 1: a failed check or bad input (``Error: ...`` names the file, field or option).
    2: a usage error (unknown option, missing argument). 130: interrupted (Ctrl-C or SIGTERM, as
    sent by ``kill``, ``timeout`` or a batch scheduler), with one line saying what was left behind
    (a resumable trace, a partial output folder).
    """
    from typer._click.exceptions import ClickException

    from moescope.trace.outputs import left_behind

    os.environ.setdefault("MPLBACKEND", "Agg")  # headless figures; the library never switches backends
    debug = os.environ.get("MOESCOPE_DEBUG") == "1"
    _notes_as_lines()
    previous = _interrupt_on_sigterm()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="moescope")
    except MoescopeError as exc:
        if debug:
            raise
        typer.echo(f"Error: {as_flags(str(exc))}", err=True)
        return 1
    except KeyboardInterrupt:
        rv = 130
    except typer.Abort:
        typer.echo("Error: aborted.", err=True)
        return 1
    except ClickException as exc:  # usage errors: exit status 2
        exc.show()
        return exc.exit_code
    except OSError as exc:  # a read-only or full output location, a vanished input
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"Error: {where}{exc.strerror or exc}", err=True)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if rv == 130:
        left = left_behind()
        typer.echo(
            "Interrupted; left " + ("; ".join(left) if left else "nothing half-written") + ".", err=True
        )
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    main()
