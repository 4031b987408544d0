"""The ``moescope`` command: one entry point, a subcommand per stage.

Each stage registers its own commands (``<stage>/commands.py``); this file only assembles them and
turns :class:`~moescope.errors.MoescopeError` into a one-line "Error: ..." with exit status 1
(see :func:`main` for every exit status).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from difflib import get_close_matches
from typing import Any

import typer
from typer._click.exceptions import UsageError
from typer.core import TyperCommand, TyperGroup

from moescope.errors import MoescopeError, as_flags

# Command name -> (the stage module whose ``register(app)`` adds it, its one-line help). Stages are
# imported only when one of their commands runs, so ``moescope --help`` and every command start fast;
# tests/test_cli_lazy.py checks this table against what each module really registers.
COMMANDS: dict[str, tuple[str, str]] = {
    "capture": (
        "moescope.capture.commands",
        "Run a MoE model over texts and record the experts every token was routed to.",
    ),
    "import": (
        "moescope.interop.commands",
        "Read routing logs of other tools into a trace, so every analysis and predictor runs on them.",
    ),
    "export": (
        "moescope.interop.commands",
        "Write a trace in a format the seed documents' scripts and notebooks read.",
    ),
    "validate": (
        "moescope.trace.commands",
        "Check a trace: manifest, shard checksums, schema, shapes, expert id ranges, duplicates.",
    ),
    "info": ("moescope.trace.commands", "Summarise a trace: model, routing facts, columns, labels, size."),
    "split": (
        "moescope.trace.commands",
        "Split a trace by document into OUTPUT/train and OUTPUT/test (all columns kept).",
    ),
    "merge": (
        "moescope.trace.commands",
        "Join traces of one model (captured separately, e.g. on other machines) into one trace.",
    ),
    "analyze": (
        "moescope.analysis.commands",
        "Run the analyses on a trace, write one CSV per result plus PNG figures, print a summary.",
    ),
    "predict": (
        "moescope.predict.commands",
        "Predict which experts a token will use: fit predictors on one trace, evaluate on held-out documents.",
    ),
    "simulate": (
        "moescope.simulate.commands",
        "Replay a trace through an expert cache, a prefetcher and a timing model.",
    ),
    "ablate": (
        "moescope.ablate.commands",
        "Disable experts by editing the routing at run time and measure accuracy, top-5 and perplexity per domain.",
    ),
    "evaluate": (
        "moescope.evaluate.commands",
        "Score MODEL on TASKs under routing strategies: score with 95% CI, mean active experts, params, FLOPs.",
    ),
    "diff": (
        "moescope.evaluate.commands",
        "How routing changed between two traces of the same tokens: per-layer set mismatch, experts, domains.",
    ),
    "report": (
        "moescope.report.commands",
        "Write one self-contained HTML report: summary, every analysis with figures and tables, a token viewer",
    ),
    "params": (
        "moescope.models.commands",
        "Count parameters from a config alone: total, active per token, and per component.",
    ),
    "demo": (
        "moescope.demo.commands",
        "Run the whole pipeline on the bundled models and held-out corpus, offline",
    ),
}


class LazyGroup(TyperGroup):
    """The root command group: imports a stage's commands only when one of them is asked for."""

    listing = False  # True while the top-level help is printed: describe commands without importing

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, cmd_name: str):
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name not in COMMANDS:
            return None
        module, short = COMMANDS[cmd_name]
        if LazyGroup.listing:
            return TyperCommand(name=cmd_name, help=short)
        _load(module)
        self.commands.update(typer.main.get_group(app).commands)
        return self.commands.get(cmd_name)

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except UsageError as exc:
            close = get_close_matches(args[0], list(COMMANDS)) if args else []
            if close and "Did you mean" not in exc.message:
                exc.message = exc.message.rstrip(".") + ". Did you mean " + ", ".join(map(repr, close)) + "?"
            raise

    def format_help(self, ctx: typer.Context, formatter) -> None:
        LazyGroup.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            LazyGroup.listing = False


app = typer.Typer(
    name="moescope",
    help="Record, analyse and predict expert routing in Mixture-of-Experts language models.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=LazyGroup,
)


@app.callback()
def _root() -> None:
    """Record, analyse and predict expert routing in Mixture-of-Experts language models."""


_loaded: set[str] = set()


def _load(module: str) -> None:
    """Import a stage's command module and let it add its commands to :data:`app` (once)."""
    if module not in _loaded:
        _loaded.add(module)
        importlib.import_module(module).register(app)


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
            as_flags("Interrupted; left " + ("; ".join(left) if left else "nothing half-written") + "."),
            err=True,
        )
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    main()
