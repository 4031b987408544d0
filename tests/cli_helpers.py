"""Run the installed ``moescope`` executable in a subprocess, as a shell script would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def executable() -> str:
    """The console script installed beside this Python (it imports the checkout via PYTHONPATH)."""
    beside = Path(sys.executable).parent / "moescope"
    if beside.is_file():
        return str(beside)
    found = shutil.which("moescope")
    assert found, "the moescope console script is not installed"
    return found


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [e.get("PYTHONPATH")])])
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    e.pop("MOESCOPE_DEBUG", None)
    return e


def run(*args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``moescope ARGS`` to the end; returns the completed process (text stdout/stderr)."""
    return subprocess.run(
        [executable(), *map(str, args)], env=env(), capture_output=True, text=True, timeout=timeout
    )


def start(*args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [executable(), *map(str, args)],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Poll until ``predicate()`` holds (True) or the process ends or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if predicate():
                return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    return False


def run_here(*args: object) -> subprocess.CompletedProcess:
    """``moescope ARGS`` through :func:`moescope.cli.run` in this process: same exit status, stdout
    and stderr as the executable, without a Python start-up (and a torch import) per call.

    Use :func:`run` where the process itself matters (its exit status, signals).
    """
    import contextlib
    import io

    from moescope.cli import run as cli_run

    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_run(argv)
    return subprocess.CompletedProcess(["moescope", *argv], rc, out.getvalue(), err.getvalue())
