"""The root command imports a stage only when one of its commands runs; its table must say the truth."""

from __future__ import annotations

import importlib
import subprocess
import sys

import typer

from moescope import cli


def _registered(module: str) -> dict[str, str]:
    """Names and help texts that ``module.register`` really adds, on a fresh app."""
    fresh = typer.Typer()
    importlib.import_module(module).register(fresh)
    group = typer.main.get_group(fresh)
    return {name: (cmd.help or "").strip() for name, cmd in group.commands.items()}


def test_table_lists_exactly_what_the_stages_register():
    modules = {module for module, _ in cli.COMMANDS.values()}
    real: dict[str, str] = {}
    for module in sorted(modules):
        for name, text in _registered(module).items():
            assert cli.COMMANDS.get(name, (None,))[0] == module, (
                f"{name} of {module} is missing from cli.COMMANDS"
            )
            real[name] = text
    assert set(real) == set(cli.COMMANDS)
    for name, (_, short) in cli.COMMANDS.items():
        first = " ".join(real[name].split("\n\n")[0].split())
        assert first.startswith(short), f"{name}: table says {short!r}, the command says {first!r}"


def test_help_and_start_do_not_import_the_stages():
    code = (
        "import sys\n"
        "from moescope import cli\n"
        "rc = cli.run(['--help'])\n"
        "heavy = sorted(m for m in ('torch', 'moescope.analysis', 'moescope.predict', 'moescope.capture') if m in sys.modules)\n"
        "print('HEAVY', heavy, rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY [] 0" in out.stdout, out.stdout + out.stderr
    for name in cli.COMMANDS:
        assert name in out.stdout


def test_unknown_command_suggests_the_close_one():
    assert cli.run(["analyse", "x"]) == 2


def test_a_lazily_loaded_command_runs(tmp_path):
    assert cli.run(["validate", str(tmp_path / "missing")]) == 1
